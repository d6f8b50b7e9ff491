//! The Redis broker: publications reach every replica through Redis pub/sub.
//!
//! One supervised subscriber connection per replica (RESP3, multiplexed) holds a SUBSCRIBE for
//! each group that has a local member (the set is the registry's, kept here as `desired`), plus
//! a private health channel. Messages go from the connection into a bounded buffer: when fan-out
//! falls behind, the newest are dropped and counted rather than piling up without limit (the
//! redis crate's own pub/sub buffers without a bound). When the connection ends the supervisor
//! reconnects with capped exponential backoff and jitter, asks the target for the server again
//! (a Sentinel failover is followed here), and re-subscribes everything in batches. Readiness is
//! a real round trip: every probe interval the broker PUBLISHes to its health channel and expects
//! to receive it back. Publishing (HTTP events, probes) goes through `publisher_lib::Publisher`,
//! the same code every backend uses. Messages are envelopes (`publisher_lib::contract::Envelope`);
//! the event bytes inside reach fan-out untouched. Each group's order is kept by
//! `broker/repair.rs` (`Cursors`): a message that reveals a gap (or a reconnect: events published
//! while the subscriber was away are in the history) is held while the history after the
//! replica's cursor is read, so fan-out still gets each event once and in order. This file
//! keeps only the connection: subscribing, reconnecting, probing, decoding.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, UNIX_EPOCH};

use bytes::Bytes;
use publisher_lib::backoff::Backoff;
use publisher_lib::contract::{Envelope, EventKind, Group, Position};
use publisher_lib::target::RedisTarget;
use publisher_lib::{PublishError, Publisher, PublisherConfig};
use redis::{PushInfo, Value};
use tokio::time::{Instant, MissedTickBehavior};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::health::RoundTrips;
use super::link::{Control, Link, Pushes, sharded_probe};
use super::repair::{CursorReader, Cursors, Reading, RepairResults};
use super::{
    BrokerError, Fanout, Handovers, History, HistorySettings, Publication, Published,
    SubscriptionRequest, SubscriptionRequests, Wanted,
};
use crate::metrics;
use crate::shutdown::Shutdown;

/// How often the health round trip is made while healthy.
const PROBE_INTERVAL: Duration = Duration::from_secs(1);
/// How often it is made while unhealthy, so readiness returns soon after Redis does.
const PROBE_INTERVAL_UNHEALTHY: Duration = Duration::from_millis(200);
/// Without a successful round trip for this long, the broker reports unhealthy.
const PROBE_GRACE: Duration = Duration::from_secs(3);
/// Bound on one publish.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(2);
/// On a cluster, a session whose round trip has failed this long is rebuilt: a node may have
/// failed over without the connection noticing.
const CLUSTER_REBUILD_AFTER: Duration = Duration::from_secs(5);
/// On a cluster, how often the masters are listed again, so a node added since the session
/// began gets a health channel too.
const CLUSTER_TOPOLOGY_CHECK: Duration = Duration::from_secs(10);
/// Channels per SUBSCRIBE when re-subscribing after a reconnect.
const RESUBSCRIBE_BATCH: usize = 1000;
/// First and longest pause between reconnection attempts (each drawn from its second half).
const BACKOFF_MIN: Duration = Duration::from_millis(150);
const BACKOFF_MAX: Duration = Duration::from_millis(750);

/// Where the Redis broker connects and how.
#[derive(Debug, Clone)]
pub struct RedisSettings {
    /// `redis://`, `rediss://` or `redis+sentinel://` URL.
    pub url: String,
    /// Certificate authority (PEM) for TLS, when not one of the system roots.
    pub ca_pem: Option<Vec<u8>>,
    /// Channel prefix.
    pub prefix: String,
    /// Messages the subscriber may hold before fan-out takes them; more are dropped.
    pub subscriber_buffer: usize,
    /// History bounds and idempotency window, applied by the publish and read scripts.
    pub history: HistorySettings,
}

/// Handle of the Redis broker.
#[derive(Clone)]
pub struct RedisBroker {
    target: RedisTarget,
    publisher: Publisher,
    prefix: Arc<str>,
    healthy: Arc<AtomicBool>,
    /// This replica's own channel (`<prefix>replica:<uuid>`): other replicas ask it to hand a
    /// stateful connection over there.
    replica_channel: Arc<str>,
}

/// Who holds a stateful connection, by its marker in Redis.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Holder {
    /// No replica ever served it (or its marker expired with its token).
    Nobody,
    /// It ended; an upgrade with its token is refused.
    Ended,
    /// The replica listening on this channel holds it.
    Replica(String),
}

/// What a connection's marker holds once it ended.
const ENDED: &str = "ended";
/// What a handover request on a replica channel starts with, before the connection id.
const HANDOVER: &str = "handover:";

impl std::fmt::Debug for RedisBroker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisBroker")
            .field("target", &self.target)
            .field("prefix", &self.prefix)
            .finish_non_exhaustive()
    }
}

impl RedisBroker {
    /// Starts the supervised subscriber; it connects in the background.
    ///
    /// # Errors
    /// When the URL is not a Redis URL, or the certificate authority is not PEM.
    pub fn start(
        settings: RedisSettings,
        fanout: Arc<dyn Fanout>,
        handovers: Arc<dyn Handovers>,
        requests: SubscriptionRequests,
        shutdown: &Shutdown,
    ) -> Result<Self, BrokerError> {
        let invalid = |e: &dyn std::fmt::Display| BrokerError::Unavailable(e.to_string());
        let target = RedisTarget::parse(
            &settings.url,
            settings.ca_pem.as_deref(),
            redis::ProtocolVersion::RESP3,
        )
        .map_err(|e| invalid(&e))?;
        let mut config = PublisherConfig::new(settings.url.as_str())
            .with_prefix(settings.prefix.as_str())
            .with_publish_timeout(COMMAND_TIMEOUT);
        config.ca_certificate = settings.ca_pem;
        config.max_reconnect_delay = BACKOFF_MAX;
        config = config
            .with_history_size(settings.history.size)
            .with_history_ttl(settings.history.ttl)
            .with_idempotency_window(settings.history.idempotency_window);
        let publisher = Publisher::new(config).map_err(|e| invalid(&describe(&e)))?;
        let broker = Self {
            target,
            publisher,
            prefix: Arc::from(settings.prefix.as_str()),
            healthy: Arc::new(AtomicBool::new(false)),
            replica_channel: Arc::from(format!(
                "{}replica:{}",
                settings.prefix,
                uuid::Uuid::new_v4().simple()
            )),
        };
        let (cursors, repairs) = Cursors::new(fanout, Arc::new(broker.clone()), shutdown);
        let supervisor = Supervisor {
            broker: broker.clone(),
            health_base: format!("{}health:{}", settings.prefix, uuid::Uuid::new_v4()),
            desired: Wanted::default(),
            cursors,
            tasks: shutdown.background().clone(),
            buffer: settings.subscriber_buffer.max(1),
            dropped: Arc::new(AtomicU64::new(0)),
            stop: shutdown.background_token().clone(),
            handovers,
        };
        shutdown
            .background()
            .spawn(supervisor.run(requests, repairs));
        Ok(broker)
    }

    /// Whether the last health round trip succeeded recently.
    pub fn is_healthy(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
    }

    /// Publishes an event's bytes, in an envelope, to each group's channel.
    ///
    /// # Errors
    /// [`BrokerError::Unavailable`] when Redis cannot be reached or does not answer in time.
    pub async fn publish(
        &self,
        kind: EventKind,
        payload: &[u8],
        groups: &[Group],
        key: &str,
    ) -> Result<Vec<Published>, BrokerError> {
        let event = std::str::from_utf8(payload)
            .map_err(|_| BrokerError::Unavailable("event is not UTF-8".to_owned()))?;
        let receipt = self
            .publisher
            .publish_validated(kind, event, groups.to_vec(), key)
            .await
            .map_err(|e| BrokerError::Unavailable(describe(&e)))?;
        Ok(receipt
            .deliveries
            .into_iter()
            .map(|d| Published {
                group: d.group,
                position: d.position,
                duplicate: d.duplicate,
            })
            .collect())
    }

    /// `group`'s head and what a reader at `after` missed, from the history in Redis. `after`
    /// may be anything a client sent: a position ahead of the head is not recovered and changes
    /// nothing.
    ///
    /// # Errors
    /// [`BrokerError::Unavailable`] when Redis cannot be read in time.
    pub async fn read_history(
        &self,
        group: &Group,
        after: Option<&Position>,
    ) -> Result<History, BrokerError> {
        let read = self.publisher.read_history(group, after).await;
        history(group, read)
    }

    /// Marks stateful connection `id` as held by this replica for `ttl`, unless a replica
    /// holds or held it; whether it was new (`<prefix>conn:<id>`, outside the publishers'
    /// contract, `docs/redis-contract.md`).
    ///
    /// # Errors
    /// [`BrokerError::Unavailable`] when Redis cannot be reached in time.
    pub async fn claim_connection(&self, id: &str, ttl: Duration) -> Result<bool, BrokerError> {
        let mut set = redis::cmd("SET");
        set.arg(self.marker(id))
            .arg(&*self.replica_channel)
            .arg("NX")
            .arg("PX")
            .arg(millis(ttl));
        let reply: Option<String> = self.query(set).await?;
        Ok(reply.is_some())
    }

    /// Marks stateful connection `id` as held by this replica for `ttl` (it was carried here).
    ///
    /// # Errors
    /// [`BrokerError::Unavailable`] when Redis cannot be reached in time.
    pub async fn hold_connection(&self, id: &str, ttl: Duration) -> Result<(), BrokerError> {
        let mut set = redis::cmd("SET");
        set.arg(self.marker(id))
            .arg(&*self.replica_channel)
            .arg("PX")
            .arg(millis(ttl));
        self.query::<()>(set).await
    }

    /// Marks stateful connection `id` as ended for `ttl` (until its token expires).
    ///
    /// # Errors
    /// [`BrokerError::Unavailable`] when Redis cannot be reached in time.
    pub async fn end_connection(&self, id: &str, ttl: Duration) -> Result<(), BrokerError> {
        let mut set = redis::cmd("SET");
        set.arg(self.marker(id))
            .arg(ENDED)
            .arg("PX")
            .arg(millis(ttl));
        self.query::<()>(set).await
    }

    /// Who holds stateful connection `id`.
    ///
    /// # Errors
    /// [`BrokerError::Unavailable`] when Redis cannot be reached in time.
    pub async fn holder(&self, id: &str) -> Result<Holder, BrokerError> {
        let mut get = redis::cmd("GET");
        get.arg(self.marker(id));
        let value: Option<String> = self.query(get).await?;
        Ok(match value {
            None => Holder::Nobody,
            Some(v) if v == ENDED => Holder::Ended,
            Some(channel) => Holder::Replica(channel),
        })
    }

    /// Leaves the state of stateful connection `id` in Redis for `ttl`, for the replica its
    /// client comes back to (`<prefix>carried:<id>`).
    ///
    /// # Errors
    /// [`BrokerError::Unavailable`] when Redis cannot be reached in time.
    pub async fn park(&self, id: &str, state: &[u8], ttl: Duration) -> Result<(), BrokerError> {
        let mut set = redis::cmd("SET");
        set.arg(self.carried(id))
            .arg(state)
            .arg("PX")
            .arg(millis(ttl));
        self.query::<()>(set).await
    }

    /// Takes the parked state of stateful connection `id`, if there is one (once: `GETDEL`).
    ///
    /// # Errors
    /// [`BrokerError::Unavailable`] when Redis cannot be reached in time.
    pub async fn take_parked(&self, id: &str) -> Result<Option<Vec<u8>>, BrokerError> {
        let mut take = redis::cmd("GETDEL");
        take.arg(self.carried(id));
        self.query(take).await
    }

    /// Asks the replica listening on `channel` to park stateful connection `id`.
    ///
    /// # Errors
    /// [`BrokerError::Unavailable`] when Redis cannot be reached in time.
    pub async fn request_handover(&self, channel: &str, id: &str) -> Result<(), BrokerError> {
        self.publisher
            .publish_raw(channel, format!("{HANDOVER}{id}").as_bytes())
            .await
            .map(|_| ())
            .map_err(|e| BrokerError::Unavailable(describe(&e)))
    }

    /// This replica's own channel, which other replicas' handover requests arrive on.
    pub fn replica_channel(&self) -> &str {
        &self.replica_channel
    }

    fn marker(&self, id: &str) -> String {
        format!("{}conn:{id}", self.prefix)
    }

    fn carried(&self, id: &str) -> String {
        format!("{}carried:{id}", self.prefix)
    }

    async fn query<T>(&self, command: redis::Cmd) -> Result<T, BrokerError>
    where
        T: redis::FromRedisValue + Send,
    {
        self.publisher
            .query(command)
            .await
            .map_err(|e| BrokerError::Unavailable(describe(&e)))
    }

    /// What this replica missed after `cursor`, the last position it delivered (it came from
    /// Redis itself). A cursor ahead of the head means the history was rewound: the group starts
    /// a new epoch, which the answer names.
    async fn read_history_after_cursor(
        &self,
        group: &Group,
        cursor: &Position,
    ) -> Result<History, BrokerError> {
        let read = self
            .publisher
            .read_history_after_cursor(group, cursor)
            .await;
        history(group, read)
    }
}

impl CursorReader for RedisBroker {
    fn read_after_cursor(&self, group: Group, cursor: Position) -> Reading {
        let broker = self.clone();
        Box::pin(async move { broker.read_history_after_cursor(&group, &cursor).await })
    }
}

/// A history read from Redis as the broker hands it on: envelopes decoded (a malformed one is
/// counted and skipped), errors described.
fn history(
    group: &Group,
    read: Result<publisher_lib::HistoryRead, PublishError>,
) -> Result<History, BrokerError> {
    let read = read.map_err(|e| BrokerError::Unavailable(describe(&e)))?;
    let mut missed = Vec::with_capacity(read.messages.len());
    for message in &read.messages {
        match publication(group.clone(), message) {
            Ok(publication) => missed.push(publication),
            Err(e) => {
                metrics::envelope_rejected("malformed");
                tracing::warn!(%group, error = %e, "history holds a message that is not an envelope");
            }
        }
    }
    Ok(History {
        head: read.head,
        recovered: read.recovered,
        missed,
    })
}

/// A publish error with its cause, for logs.
/// `ttl` in whole milliseconds, at least 1 (`PX 0` is an error).
fn millis(ttl: Duration) -> u64 {
    u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX).max(1)
}

fn describe(error: &PublishError) -> String {
    match std::error::Error::source(error) {
        Some(source) => format!("{error}: {source}"),
        None => error.to_string(),
    }
}

/// The task that owns the subscriber connection.
struct Supervisor {
    broker: RedisBroker,
    /// Names this replica's health channels (one, or one per cluster master).
    health_base: String,
    /// Every group this replica wants, with the generation that asked for it.
    desired: Wanted,
    /// Where each subscribed group's delivery stands, and what waits behind a repair.
    cursors: Cursors,
    /// Tracks the probes it sends.
    tasks: TaskTracker,
    /// Capacity of the message buffer between the connection and fan-out.
    buffer: usize,
    /// Messages dropped because the buffer was full, since start.
    dropped: Arc<AtomicU64>,
    stop: CancellationToken,
    /// Where requests to hand a stateful connection over go.
    handovers: Arc<dyn Handovers>,
}

impl Supervisor {
    async fn run(mut self, mut requests: SubscriptionRequests, mut repairs: RepairResults) {
        let mut backoff = Backoff::new(BACKOFF_MIN, BACKOFF_MAX);
        let mut down_since: Option<Instant> = None;
        loop {
            match self
                .session(&mut requests, &mut repairs, &mut down_since)
                .await
            {
                Session::Stopped => return,
                Session::Lost => backoff.reset(),
                Session::Failed => {}
            }
            self.set_healthy(false);
            let since = *down_since.get_or_insert_with(Instant::now);
            metrics::broker_reconnect_attempt();
            // Wait before retrying, answering joins meanwhile: they fail at once so the client
            // hears about it, and the group is subscribed with the others on reconnect.
            let wait = backoff.wait();
            tokio::pin!(wait);
            loop {
                tokio::select! {
                    biased;
                    () = self.stop.cancelled() => return,
                    () = &mut wait => break,
                    request = requests.recv() => match request {
                        None => return,
                        Some(request) => self.note(request, Err(BrokerError::Unavailable(
                            "redis is unavailable".to_owned(),
                        ))),
                    },
                }
            }
            tracing::warn!(
                down_ms = since.elapsed().as_millis() as u64,
                "redis unavailable; reconnecting"
            );
        }
    }

    /// One connection's life: connect, subscribe everything, then serve until it ends.
    async fn session(
        &mut self,
        requests: &mut SubscriptionRequests,
        repairs: &mut RepairResults,
        down_since: &mut Option<Instant>,
    ) -> Session {
        let open = Link::open(&self.broker.target, self.buffer, self.dropped.clone());
        let (mut link, pushes) = tokio::select! {
            () = self.stop.cancelled() => return Session::Stopped,
            connected = open => match connected {
                Ok(connected) => connected,
                Err(error) => {
                    tracing::debug!(%error, "redis subscriber cannot connect");
                    return Session::Failed;
                }
            },
        };
        let Pushes {
            mut messages,
            mut control,
            overflowed,
        } = pushes;
        let health_channels = match link.health_channels(&self.health_base).await {
            Ok(health) => health,
            Err(error) => {
                tracing::debug!(%error, "redis subscriber cannot name its health channels");
                return Session::Failed;
            }
        };
        let mut channels: Vec<String> = self
            .desired
            .groups()
            .map(|g| g.channel(&self.broker.prefix))
            .collect();
        channels.extend(health_channels.iter().cloned());
        channels.push(self.broker.replica_channel.to_string());
        for batch in channels.chunks(RESUBSCRIBE_BATCH) {
            if let Err(error) = link.subscribe(batch.to_vec()).await {
                tracing::debug!(%error, "redis subscriber cannot subscribe");
                return Session::Failed;
            }
        }
        let probes = link.probe_connection();
        if let Some(since) = down_since.take() {
            metrics::broker_reconnected(since.elapsed());
            tracing::info!(
                down_ms = since.elapsed().as_millis() as u64,
                groups = self.desired.len(),
                "redis subscriber reconnected and re-subscribed"
            );
            // What was published meanwhile is in the history: fill every group's gap before
            // delivering further.
            self.cursors.reconnected();
        }
        let mut probe = tokio::time::interval(PROBE_INTERVAL_UNHEALTHY);
        probe.set_missed_tick_behavior(MissedTickBehavior::Delay);
        // Healthy while every health channel's probe came back recently.
        let mut health = RoundTrips::new(&health_channels, Instant::now());
        let mut topology_checked = Instant::now();
        let mut last_probe: Option<Instant> = None;
        let mut dropped_reported = self.dropped.load(Ordering::Relaxed);
        loop {
            tokio::select! {
                biased;
                () = self.stop.cancelled() => return Session::Stopped,
                message = messages.recv() => {
                    let Some(message) = message else {
                        tracing::warn!("redis subscriber connection lost");
                        return Session::Lost;
                    };
                    let Some((channel, payload)) = message_parts(&message) else {
                        metrics::envelope_rejected("malformed");
                        continue;
                    };
                    if health.is_health(channel) {
                        health.came_back(channel, Instant::now());
                        if health.healthy(Instant::now(), PROBE_GRACE) {
                            self.set_healthy(true);
                        }
                    } else if channel == self.broker.replica_channel.as_bytes() {
                        self.handover_requested(payload);
                    } else {
                        self.deliver(channel, payload);
                    }
                }
                Some(event) = control.recv() => match event {
                    Control::Disconnected => {
                        tracing::warn!("redis subscriber connection lost");
                        return Session::Lost;
                    }
                    Control::Unsubscribed(channel) => {
                        if let Err(()) = self.resubscribe(&mut link, &health, &channel).await {
                            return Session::Lost;
                        }
                    }
                },
                Some(repair) = repairs.recv() => self.cursors.finish(repair),
                request = requests.recv() => {
                    let Some(request) = request else {
                        return Session::Stopped;
                    };
                    // Joins that arrive together (a burst of clients) become one SUBSCRIBE.
                    let mut batch = vec![request];
                    while batch.len() < RESUBSCRIBE_BATCH {
                        let Some(next) = requests.try_recv() else {
                            break;
                        };
                        batch.push(next);
                    }
                    if let Err(()) = self.apply(&mut link, batch).await {
                        return Session::Lost;
                    }
                }
                _ = probe.tick() => {
                    let now = Instant::now();
                    if !health.healthy(now, PROBE_GRACE) {
                        self.set_healthy(false);
                    }
                    if overflowed.load(Ordering::Relaxed)
                        || (link.is_cluster() && health.longest_silence(now) > CLUSTER_REBUILD_AFTER)
                    {
                        tracing::warn!("redis subscriber session rebuilt: its round trip failed");
                        return Session::Lost;
                    }
                    if link.is_cluster() && topology_checked.elapsed() >= CLUSTER_TOPOLOGY_CHECK {
                        topology_checked = now;
                        if let Err(()) = self.follow_masters(&mut link, &mut health).await {
                            return Session::Lost;
                        }
                    }
                    if !self.broker.is_healthy()
                        || last_probe.is_none_or(|at| at.elapsed() >= PROBE_INTERVAL)
                    {
                        last_probe = Some(Instant::now());
                        for channel in health.channels() {
                            self.send_probe(probes.clone(), channel.clone());
                        }
                    }
                    let dropped = self.dropped.load(Ordering::Relaxed);
                    if dropped != dropped_reported {
                        tracing::warn!(
                            dropped = dropped - dropped_reported,
                            buffer = self.buffer,
                            "fan-out fell behind redis; messages dropped"
                        );
                        dropped_reported = dropped;
                    }
                }
            }
        }
    }

    /// Applies a batch of requests in order: consecutive subscribes share one SUBSCRIBE.
    /// Fails when Redis refused or did not answer (the session must be rebuilt).
    async fn apply(&mut self, link: &mut Link, batch: Vec<SubscriptionRequest>) -> Result<(), ()> {
        let mut channels = Vec::new();
        let mut acks = Vec::new();
        for request in batch {
            match request {
                SubscriptionRequest::Subscribe {
                    group,
                    generation,
                    ack,
                } => {
                    channels.push(group.channel(&self.broker.prefix));
                    self.desired.want(group, generation);
                    acks.push(ack);
                }
                SubscriptionRequest::Unsubscribe { group, generation } => {
                    flush_subscribes(link, &mut channels, &mut acks).await?;
                    if self.desired.release(&group, generation) {
                        self.cursors.forget(&group);
                        link.unsubscribe(group.channel(&self.broker.prefix)).await;
                    }
                }
            }
        }
        flush_subscribes(link, &mut channels, &mut acks).await
    }

    /// A cluster node unsubscribed `channel` by itself (its slot moved): subscribes it again
    /// where it now lives when it is still wanted, and reads what its group may have missed
    /// meanwhile. Fails when the subscribe did (the session must be rebuilt).
    async fn resubscribe(
        &mut self,
        link: &mut Link,
        health: &RoundTrips,
        channel: &[u8],
    ) -> Result<(), ()> {
        let Ok(name) = std::str::from_utf8(channel) else {
            return Ok(());
        };
        let group = Group::from_channel(&self.broker.prefix, name)
            .filter(|group| self.desired.contains(group));
        if group.is_none()
            && !health.is_health(channel)
            && channel != self.broker.replica_channel.as_bytes()
        {
            // Our own unsubscribe's confirmation, or a group left since.
            return Ok(());
        }
        metrics::broker_resubscribed();
        if let Err(error) = link.subscribe(vec![name.to_owned()]).await {
            tracing::warn!(channel = name, %error, "a moved channel could not be subscribed again");
            return Err(());
        }
        tracing::info!(
            channel = name,
            "a channel moved with its slot; subscribed again"
        );
        if let Some(group) = group {
            self.cursors.resubscribed(&group);
        }
        Ok(())
    }

    /// Records a request while disconnected and answers it with `outcome`.
    fn note(&mut self, request: SubscriptionRequest, outcome: Result<(), BrokerError>) {
        if let Some(group) = self.desired.apply(request, outcome) {
            self.cursors.forget(&group);
        }
    }

    /// Lists the cluster's masters again and moves the health round trip to them: a master
    /// added since (a slot of ours may have moved to it) gets a channel, a removed one loses
    /// its. Fails when the new channel could not be subscribed (the session must be rebuilt).
    async fn follow_masters(&self, link: &mut Link, health: &mut RoundTrips) -> Result<(), ()> {
        let Ok(channels) = link.health_channels(&self.health_base).await else {
            // Listing failed: the round trip itself tells whether the cluster is there.
            return Ok(());
        };
        let (added, dropped) = health.replace(&channels, Instant::now());
        for channel in dropped {
            link.unsubscribe(channel).await;
        }
        if added.is_empty() {
            return Ok(());
        }
        tracing::info!(
            channels = added.len(),
            "the cluster's masters changed; probing the new ones"
        );
        link.subscribe(added).await.map_err(|error| {
            tracing::warn!(%error, "a new master's health channel could not be subscribed");
        })
    }

    /// PUBLISHes a probe on the health channel without holding up the subscriber loop.
    fn send_probe(
        &self,
        cluster: Option<redis::cluster_async::ClusterConnection>,
        channel: String,
    ) {
        let publisher = self.broker.publisher.clone();
        // A probe that cannot be sent simply never comes back, which is what readiness measures.
        let stop = self.stop.clone();
        self.tasks.spawn(async move {
            let send = async {
                match cluster {
                    Some(connection) => sharded_probe(connection, channel).await,
                    None => {
                        let _ = publisher.publish_raw(&channel, b"probe").await;
                    }
                }
            };
            tokio::select! {
                () = stop.cancelled() => {}
                () = send => {}
            }
        });
    }

    /// Another replica asks for a stateful connection whose client came back there.
    fn handover_requested(&self, payload: &[u8]) {
        let id = std::str::from_utf8(payload)
            .ok()
            .and_then(|text| text.strip_prefix(HANDOVER));
        match id {
            Some(id) => self.handovers.hand_over(id),
            None => metrics::envelope_rejected("malformed"),
        }
    }

    fn deliver(&mut self, channel: &[u8], payload: &[u8]) {
        let Some(group) = std::str::from_utf8(channel)
            .ok()
            .and_then(|channel| Group::from_channel(&self.broker.prefix, channel))
        else {
            metrics::envelope_rejected("unknown_channel");
            return;
        };
        match publication(group, payload) {
            Ok(publication) => {
                metrics::event_received("redis");
                self.sequence(publication);
            }
            Err(e) => {
                metrics::envelope_rejected("malformed");
                let channel = String::from_utf8_lossy(channel);
                tracing::warn!(%channel, error = %e, "dropped a message that is not an envelope");
            }
        }
    }

    /// Hands a publication of a wanted group to its group's order (see [`Cursors::live`]).
    fn sequence(&mut self, publication: Publication) {
        if self.desired.contains(&publication.group) {
            self.cursors.live(publication);
        }
    }

    fn set_healthy(&self, healthy: bool) {
        if self.broker.healthy.swap(healthy, Ordering::Relaxed) != healthy {
            metrics::broker_up(healthy);
            if healthy {
                tracing::info!("redis round trip healthy");
            } else {
                tracing::warn!("redis round trip failing: not ready");
            }
        }
    }
}

/// Decodes a (positioned) envelope received for `group`.
fn publication(
    group: Group,
    message: &[u8],
) -> Result<Publication, publisher_lib::contract::EnvelopeError> {
    let envelope = Envelope::decode(message)?;
    Ok(Publication {
        group,
        kind: envelope.kind,
        payload: Bytes::from(envelope.event),
        published_at: UNIX_EPOCH + Duration::from_micros(envelope.published_at_micros),
        position: envelope.position,
    })
}

/// How a subscriber session ended.
enum Session {
    /// Shutdown.
    Stopped,
    /// It was connected, then the connection ended: reconnect soon.
    Lost,
    /// It could not connect or subscribe: back off further.
    Failed,
}

/// Subscribes the pending `channels` and answers their joins; fails when Redis did not.
async fn flush_subscribes(
    link: &mut Link,
    channels: &mut Vec<String>,
    acks: &mut Vec<tokio::sync::oneshot::Sender<Result<(), BrokerError>>>,
) -> Result<(), ()> {
    if channels.is_empty() {
        return Ok(());
    }
    let outcome = link.subscribe(std::mem::take(channels)).await;
    let failed = outcome.is_err();
    for ack in acks.drain(..) {
        let _ = ack.send(outcome.clone());
    }
    if failed { Err(()) } else { Ok(()) }
}

/// The channel and payload of a RESP3 `message` push.
fn message_parts(push: &PushInfo) -> Option<(&[u8], &[u8])> {
    match push.data.as_slice() {
        [Value::BulkString(channel), Value::BulkString(payload)] => Some((channel, payload)),
        _ => None,
    }
}
