//! The Redis broker: publications reach every replica through Redis pub/sub.
//!
//! One supervised subscriber connection per replica holds a SUBSCRIBE for each group that has a
//! local member (the set is the registry's, kept here as `desired`), plus a private health
//! channel. When the connection ends the supervisor reconnects with capped exponential backoff
//! and jitter and re-subscribes everything in batches; the redis crate's own pub/sub never
//! reconnects by itself. Readiness is a real round trip: every probe interval the broker
//! PUBLISHes to its health channel and expects to receive it back. Publishing (HTTP events) uses
//! one shared connection manager that reconnects by itself, under a timeout so a frozen Redis
//! fails fast. Messages are envelopes (`publisher_lib::contract::Envelope`); the event bytes
//! inside reach fan-out untouched. Events published while the subscriber was away are lost
//! here (counted as reconnects and downtime); the recovery work adds sequence numbers.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use futures_util::StreamExt;
use publisher_lib::contract::{Envelope, EventKind, Group};
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use tokio::sync::OnceCell;
use tokio::time::{Instant, MissedTickBehavior, timeout};
use tokio_util::sync::CancellationToken;

use super::{BrokerError, Fanout, Publication, SubscriptionRequest, SubscriptionRequests};
use crate::metrics;
use crate::shutdown::Shutdown;

/// How often the health round trip is made.
const PROBE_INTERVAL: Duration = Duration::from_secs(1);
/// Without a successful round trip for this long, the broker reports unhealthy.
const PROBE_GRACE: Duration = Duration::from_secs(3);
/// Bound on connecting, on one subscribe batch, and on one publish.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(2);
/// Channels per SUBSCRIBE when re-subscribing after a reconnect.
const RESUBSCRIBE_BATCH: usize = 1000;
/// First and longest pause between reconnection attempts.
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(2);

/// Handle of the Redis broker.
#[derive(Clone)]
pub struct RedisBroker {
    client: Arc<redis::Client>,
    publisher: Arc<OnceCell<ConnectionManager>>,
    prefix: Arc<str>,
    healthy: Arc<AtomicBool>,
}

impl std::fmt::Debug for RedisBroker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisBroker")
            .field("prefix", &self.prefix)
            .finish_non_exhaustive()
    }
}

impl RedisBroker {
    /// Starts the supervised subscriber; it connects in the background. `ca_pem` is the
    /// authority that signed the server's certificate, for `rediss://` URLs.
    ///
    /// # Errors
    /// When the URL is not a Redis URL, or the certificate authority is not PEM.
    pub fn start(
        url: &str,
        ca_pem: Option<Vec<u8>>,
        prefix: &str,
        fanout: Arc<dyn Fanout>,
        requests: SubscriptionRequests,
        shutdown: &Shutdown,
    ) -> Result<Self, redis::RedisError> {
        // TLS uses rustls with the ring provider; installing it twice (tests) is harmless.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let client = match ca_pem {
            None => redis::Client::open(url)?,
            Some(root_cert) => redis::Client::build_with_tls(
                url,
                redis::TlsCertificates {
                    client_tls: None,
                    root_cert: Some(root_cert),
                },
            )?,
        };
        let broker = Self {
            client: Arc::new(client),
            publisher: Arc::new(OnceCell::new()),
            prefix: Arc::from(prefix),
            healthy: Arc::new(AtomicBool::new(false)),
        };
        let supervisor = Supervisor {
            broker: broker.clone(),
            fanout,
            health_channel: format!("{prefix}health:{}", uuid::Uuid::new_v4()),
            desired: HashMap::new(),
            stop: shutdown.background_token().clone(),
        };
        shutdown.background().spawn(supervisor.run(requests));
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
    ) -> Result<(), BrokerError> {
        let event = std::str::from_utf8(payload)
            .map_err(|_| BrokerError::Unavailable("event is not UTF-8".to_owned()))?;
        let envelope = Envelope::encode(uuid::Uuid::new_v4(), kind, now_micros(), event);
        let mut pipe = redis::pipe();
        for group in groups {
            pipe.cmd("PUBLISH")
                .arg(group.channel(&self.prefix))
                .arg(&envelope)
                .ignore();
        }
        let mut connection = self.connection().await?;
        match timeout(COMMAND_TIMEOUT, pipe.query_async::<()>(&mut connection)).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(BrokerError::Unavailable(e.to_string())),
            Err(_) => Err(BrokerError::Unavailable(
                "redis did not answer in time".to_owned(),
            )),
        }
    }

    async fn connection(&self) -> Result<ConnectionManager, BrokerError> {
        let init = async {
            let config = ConnectionManagerConfig::new()
                .set_connection_timeout(Some(COMMAND_TIMEOUT))
                .set_response_timeout(Some(COMMAND_TIMEOUT))
                .set_number_of_retries(usize::MAX)
                .set_max_delay(BACKOFF_MAX);
            match timeout(
                COMMAND_TIMEOUT,
                self.client.get_connection_manager_with_config(config),
            )
            .await
            {
                Ok(Ok(manager)) => Ok(manager),
                Ok(Err(e)) => Err(BrokerError::Unavailable(e.to_string())),
                Err(_) => Err(BrokerError::Unavailable(
                    "connecting to redis timed out".to_owned(),
                )),
            }
        };
        self.publisher.get_or_try_init(|| init).await.cloned()
    }
}

/// The task that owns the subscriber connection.
struct Supervisor {
    broker: RedisBroker,
    fanout: Arc<dyn Fanout>,
    health_channel: String,
    /// Every group this replica wants, with the generation that asked for it.
    desired: HashMap<Group, u64>,
    stop: CancellationToken,
}

impl Supervisor {
    async fn run(mut self, mut requests: SubscriptionRequests) {
        let mut backoff = BACKOFF_MIN;
        let mut down_since: Option<Instant> = None;
        loop {
            match self.session(&mut requests, &mut down_since).await {
                Session::Stopped => return,
                Session::Lost => backoff = BACKOFF_MIN,
                Session::Failed => {}
            }
            self.set_healthy(false);
            let since = *down_since.get_or_insert_with(Instant::now);
            metrics::broker_reconnect_attempt();
            // Wait before retrying, answering joins meanwhile: they fail at once so the client
            // hears about it, and the group is subscribed with the others on reconnect.
            let wait = tokio::time::sleep(jitter(backoff));
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
            backoff = (backoff * 2).min(BACKOFF_MAX);
        }
    }

    /// One connection's life: connect, subscribe everything, then serve until it ends.
    async fn session(
        &mut self,
        requests: &mut SubscriptionRequests,
        down_since: &mut Option<Instant>,
    ) -> Session {
        let connect = timeout(COMMAND_TIMEOUT, self.broker.client.get_async_pubsub());
        let pubsub = tokio::select! {
            () = self.stop.cancelled() => return Session::Stopped,
            pubsub = connect => match pubsub {
                Ok(Ok(pubsub)) => pubsub,
                Ok(Err(e)) => {
                    tracing::debug!(error = %e, "redis subscriber cannot connect");
                    return Session::Failed;
                }
                Err(_) => return Session::Failed,
            },
        };
        let (mut sink, mut stream) = pubsub.split();
        let mut channels: Vec<String> = self
            .desired
            .keys()
            .map(|g| g.channel(&self.broker.prefix))
            .collect();
        channels.push(self.health_channel.clone());
        for batch in channels.chunks(RESUBSCRIBE_BATCH) {
            match timeout(COMMAND_TIMEOUT, sink.subscribe(batch.to_vec())).await {
                Ok(Ok(())) => {}
                _ => return Session::Failed,
            }
        }
        if let Some(since) = down_since.take() {
            metrics::broker_reconnected(since.elapsed());
            tracing::info!(
                down_ms = since.elapsed().as_millis() as u64,
                groups = self.desired.len(),
                "redis subscriber reconnected and re-subscribed"
            );
        }
        let mut probe = tokio::time::interval(PROBE_INTERVAL);
        probe.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut last_round_trip: Option<Instant> = None;
        loop {
            tokio::select! {
                biased;
                () = self.stop.cancelled() => return Session::Stopped,
                message = stream.next() => {
                    let Some(message) = message else {
                        tracing::warn!("redis subscriber connection lost");
                        return Session::Lost;
                    };
                    if message.get_channel_name() == self.health_channel {
                        last_round_trip = Some(Instant::now());
                        self.set_healthy(true);
                    } else {
                        self.deliver(message.get_channel_name(), message.get_payload_bytes());
                    }
                }
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
                    if let Err(()) = self.apply(&mut sink, batch).await {
                        return Session::Lost;
                    }
                }
                _ = probe.tick() => {
                    if last_round_trip.is_none_or(|at| at.elapsed() > PROBE_GRACE) {
                        self.set_healthy(false);
                    }
                    self.send_probe();
                }
            }
        }
    }

    /// Applies a batch of requests in order: consecutive subscribes share one SUBSCRIBE.
    /// Fails when Redis refused or did not answer (the session must be rebuilt).
    async fn apply(
        &mut self,
        sink: &mut redis::aio::PubSubSink,
        batch: Vec<SubscriptionRequest>,
    ) -> Result<(), ()> {
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
                    self.desired.insert(group, generation);
                    acks.push(ack);
                }
                SubscriptionRequest::Unsubscribe { group, generation } => {
                    self.flush_subscribes(sink, &mut channels, &mut acks)
                        .await?;
                    if self.desired.get(&group) == Some(&generation) {
                        self.desired.remove(&group);
                        let channel = group.channel(&self.broker.prefix);
                        let _ = timeout(COMMAND_TIMEOUT, sink.unsubscribe(channel)).await;
                    }
                }
            }
        }
        self.flush_subscribes(sink, &mut channels, &mut acks).await
    }

    async fn flush_subscribes(
        &self,
        sink: &mut redis::aio::PubSubSink,
        channels: &mut Vec<String>,
        acks: &mut Vec<tokio::sync::oneshot::Sender<Result<(), BrokerError>>>,
    ) -> Result<(), ()> {
        if channels.is_empty() {
            return Ok(());
        }
        let outcome = match timeout(COMMAND_TIMEOUT, sink.subscribe(std::mem::take(channels))).await
        {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(BrokerError::Unavailable(e.to_string())),
            Err(_) => Err(BrokerError::Unavailable("subscribe timed out".to_owned())),
        };
        let failed = outcome.is_err();
        for ack in acks.drain(..) {
            let _ = ack.send(outcome.clone());
        }
        if failed { Err(()) } else { Ok(()) }
    }

    /// Records a request while disconnected and answers it with `outcome`.
    fn note(&mut self, request: SubscriptionRequest, outcome: Result<(), BrokerError>) {
        match request {
            SubscriptionRequest::Subscribe {
                group,
                generation,
                ack,
            } => {
                self.desired.insert(group, generation);
                let _ = ack.send(outcome);
            }
            SubscriptionRequest::Unsubscribe { group, generation } => {
                if self.desired.get(&group) == Some(&generation) {
                    self.desired.remove(&group);
                }
            }
        }
    }

    /// PUBLISHes a probe on the health channel without holding up the subscriber loop.
    fn send_probe(&self) {
        let broker = self.broker.clone();
        let channel = self.health_channel.clone();
        // A probe that cannot be sent simply never comes back, which is what readiness measures.
        tokio::spawn(async move {
            if let Ok(mut connection) = broker.connection().await {
                let _ = timeout(
                    COMMAND_TIMEOUT,
                    redis::cmd("PUBLISH")
                        .arg(channel)
                        .arg("probe")
                        .query_async::<i64>(&mut connection),
                )
                .await;
            }
        });
    }

    fn deliver(&self, channel: &str, payload: &[u8]) {
        let Some(group) = Group::from_channel(&self.broker.prefix, channel) else {
            metrics::envelope_rejected("unknown_channel");
            return;
        };
        match Envelope::decode(payload) {
            Ok(envelope) => {
                metrics::event_received("redis");
                self.fanout.fan_out(&Publication {
                    group,
                    kind: envelope.kind,
                    payload: Bytes::from(envelope.event),
                    published_at: UNIX_EPOCH + Duration::from_micros(envelope.published_at_micros),
                });
            }
            Err(e) => {
                metrics::envelope_rejected("malformed");
                tracing::warn!(%channel, error = %e, "dropped a message that is not an envelope");
            }
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

/// How a subscriber session ended.
enum Session {
    /// Shutdown.
    Stopped,
    /// It was connected, then the connection ended: reconnect soon.
    Lost,
    /// It could not connect or subscribe: back off further.
    Failed,
}

/// `base` plus up to half of it again, so replicas do not reconnect in step.
fn jitter(base: Duration) -> Duration {
    base + base.mul_f64(rand::random::<f64>() * 0.5)
}

fn now_micros() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}
