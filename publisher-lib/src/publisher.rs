//! Publishing events to the gateway replicas through Redis pub/sub.
//!
//! A [`Publisher`] validates an event, encodes its [`Envelope`] once and runs the publish script
//! ([`crate::history`]) for every group the event is routed to: the script gives the event its
//! position in the group, appends it to the group's bounded history and PUBLISHes it, unless the
//! same idempotency key was published to that group within the idempotency window. So a retry
//! under the same key is acknowledged without a second delivery. The publisher does not retry;
//! [`crate::BackgroundPublisher`] adds a queue and retries on top of it.
//! [`Publisher::read_history`] reads a group's head and the history after a position, for a
//! gateway that resumes a client.
//!
//! # Batched script calls
//!
//! Part of what Redis spends on each publish is the script call itself (the call boundary and
//! the script's setup), besides the commands it runs; a call for many events pays it once. So
//! on a server (plain, TLS or behind Sentinel), publishes to groups go through one batching
//! task per server (`crate::batch`): it takes the first waiting publish and whatever else is
//! already queued, at most 64 events or 64 KiB of envelopes, runs the publish script once for
//! all of them and answers each caller; at most 4
//! such calls are in flight, so that publishes arriving meanwhile make the next batch bigger. It
//! never waits to fill a batch, so a lone publish is sent at once. Each caller keeps its own
//! publish timeout, its receipt and its error (a failed call fails every event of its batch
//! alike), and an event's groups are still published one after the other. The queue is bounded
//! (1,024 publishes per server); past it a publish waits for room within its timeout. On a Redis
//! Cluster every publish stays one script call (a script's keys must share one slot), as with a
//! pool.
//!
//! # Why one shared `ConnectionManager` and not a deadpool pool
//!
//! The scale-out issue asked for deadpool-redis. The redis-rs feasibility notes measured a
//! deadpool checkout per publish at about 15k publishes/s, because every `get()` recycles the
//! connection with a PING round trip, against about 50k/s for one multiplexed connection cloned
//! per task; with this crate's publish script, `loadgen publish-bench` measured a pool of 8 at
//! 24-33% of the shared connection's rate (`docs/benchmarks.md`). A `ConnectionManager` is such a multiplexed connection that also reconnects by
//! itself, so the publisher holds exactly one and clones it per call (a cheap handle clone).
//! What deadpool's wait/create/recycle timeouts would bound is bounded here by the manager's
//! connection timeout, its response timeout and [`PublisherConfig::publish_timeout`] around the
//! whole call. Reconnection is retried without limit, with a capped delay, because the notes
//! showed the default retry count giving up for good after a 12 s outage. Behind Sentinel
//! ([`crate::target`]) a failed call drops the manager, and the next call asks the Sentinels for
//! the current master again.
//!
//! # A backend's own deadpool pool (feature `deadpool`)
//!
//! A backend that already holds a `deadpool_redis::Pool` can publish through it with
//! `Publisher::from_pool`: each script call (a publish to one group, a history read) takes a
//! connection from the pool and returns it when the call ends. Everything else is the same:
//! the script, duplicates, positions, [`PublishError`] and its [`PublishError::is_transient`],
//! and `PublisherConfig::publish_timeout` around the whole call, the wait for a connection
//! included. The pool's own settings (its size, its wait, create and recycle timeouts, the
//! connections' response timeout) are the backend's. It is not the default, because a pool is
//! slower here: every `get()` recycles the connection with an `UNWATCH` and a `PING`, a round
//! trip before the script runs, and a pooled connection carries one call at a time where the
//! shared one batches every call in flight into one write. `loadgen publish-bench --pool 8`
//! measured 3,500-4,700 publishes/s against 12,500-16,600/s for the shared connection, at 3-4
//! times the latency (`docs/benchmarks.md`, "Publish path"). Only a standalone pool is
//! supported: deadpool's cluster pool pings every master on each `get()`, and its manager
//! cannot set the timeouts.
//!
//! # Redis Cluster
//!
//! With a `redis+cluster://` URL the shared connection is one
//! [`redis::cluster_async::ClusterConnection`] instead (a multiplexed connection per node that
//! routes each script call to the master of its group's slot and follows `MOVED`, `ASK`,
//! `TRYAGAIN` and failovers itself), and the publish script uses `SPUBLISH`: the group's
//! channel is a sharded channel in the same slot as its keys (the `{<group>}` hash tag), so the
//! script runs unchanged on that slot's master. While a master fails over, calls to its slots
//! fail with [`PublishError::Timeout`] (or [`PublishError::Unreachable`]) until its replica is
//! promoted; retrying under the same idempotency key is safe.

use std::fmt;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster::ClusterConfig;
use redis::cluster_async::ClusterConnection;
use redis::{Cmd, Pipeline, RedisFuture, Value};
use uuid::Uuid;

use crate::batch::{self, Batcher};
use crate::contract::{
    DEFAULT_HISTORY_SIZE, DEFAULT_HISTORY_TTL, DEFAULT_IDEMPOTENCY_WINDOW, DEFAULT_PREFIX,
    Envelope, Event, EventKind, Group, Position, ValidationError, check_idempotency_key, shard_of,
};
use crate::history::{self, Appended, HistoryRead, Limits};
use crate::target::RedisTarget;

/// Default bound on one whole publish call, reconnection included.
pub const DEFAULT_PUBLISH_TIMEOUT: Duration = Duration::from_secs(2);
/// Default bound on opening one TCP connection to Redis.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// Default bound on Redis answering one command.
pub const DEFAULT_RESPONSE_TIMEOUT: Duration = Duration::from_secs(1);
/// Default longest pause between two reconnection attempts.
pub const DEFAULT_MAX_RECONNECT_DELAY: Duration = Duration::from_secs(1);

/// How a [`Publisher`] reaches Redis. Build it with [`PublisherConfig::new`] and adjust fields.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct PublisherConfig {
    /// Redis URL, e.g. `redis://127.0.0.1:6379`, `rediss://...`,
    /// `redis+sentinel://host:26379/<master>` or `redis+cluster://host:7000,host:7001` (see
    /// [`crate::target`]). Several URLs separated by spaces spread the groups over as many
    /// independent servers ([`shard_of`]); every publisher and gateway must list the same
    /// servers in the same order.
    pub url: String,
    /// For TLS URLs: the authority (PEM) that signed the server's certificate, when it is not
    /// one of the system roots.
    pub ca_certificate: Option<Vec<u8>>,
    /// Channel prefix; channels are `<prefix>{<group>}`.
    pub prefix: String,
    /// Bound on one whole publish call; past it the call fails with [`PublishError::Timeout`].
    pub publish_timeout: Duration,
    /// Bound on opening one connection.
    pub connect_timeout: Duration,
    /// Bound on Redis answering one command.
    pub response_timeout: Duration,
    /// Longest pause between reconnection attempts (attempts never stop).
    pub max_reconnect_delay: Duration,
    /// Events each group's history keeps (the stream is trimmed to exactly this many).
    pub history_size: usize,
    /// Time without publishes after which a group's position and history expire (whole
    /// seconds, at least 1); the next publish then starts a new epoch.
    pub history_ttl: Duration,
    /// Time within which a publish under an already used idempotency key is acknowledged as a
    /// duplicate without being appended or delivered (whole seconds, at least 1).
    pub idempotency_window: Duration,
}

impl PublisherConfig {
    /// A configuration for `url` with the default prefix and timeouts.
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            ca_certificate: None,
            prefix: DEFAULT_PREFIX.to_owned(),
            publish_timeout: DEFAULT_PUBLISH_TIMEOUT,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            response_timeout: DEFAULT_RESPONSE_TIMEOUT,
            max_reconnect_delay: DEFAULT_MAX_RECONNECT_DELAY,
            history_size: DEFAULT_HISTORY_SIZE,
            history_ttl: DEFAULT_HISTORY_TTL,
            idempotency_window: DEFAULT_IDEMPOTENCY_WINDOW,
        }
    }

    /// Replaces the channel prefix.
    #[must_use]
    pub fn with_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = prefix.into();
        self
    }

    /// Trusts `pem` (a certificate authority) for TLS connections.
    #[must_use]
    pub fn with_ca_certificate(mut self, pem: Vec<u8>) -> Self {
        self.ca_certificate = Some(pem);
        self
    }

    /// Replaces the bound on one whole publish call.
    #[must_use]
    pub fn with_publish_timeout(mut self, timeout: Duration) -> Self {
        self.publish_timeout = timeout;
        self
    }

    /// Replaces the number of events each group's history keeps.
    #[must_use]
    pub fn with_history_size(mut self, size: usize) -> Self {
        self.history_size = size;
        self
    }

    /// Replaces the time without publishes after which a group's history expires.
    #[must_use]
    pub fn with_history_ttl(mut self, ttl: Duration) -> Self {
        self.history_ttl = ttl;
        self
    }

    /// Replaces the window within which a repeated idempotency key is a duplicate.
    #[must_use]
    pub fn with_idempotency_window(mut self, window: Duration) -> Self {
        self.idempotency_window = window;
        self
    }
}

/// Publishes events to Redis. Cheap to clone; clones share one connection per server (or the
/// one pool given to `Publisher::from_pool`).
#[derive(Clone)]
pub struct Publisher {
    /// One per Redis URL of the configuration (several: each group lives on the one
    /// [`shard_of`] names), or the one pool.
    shards: Arc<[Shard]>,
    prefix: String,
    publish_timeout: Duration,
    limits: Limits,
}

/// The one connection to one server (or cluster) that all clones share, built on first use
/// from the target.
pub(crate) struct SharedConnection {
    target: RedisTarget,
    /// `SPUBLISH` on a Redis Cluster, `PUBLISH` otherwise.
    pubsub: history::PubSub,
    config: ConnectionManagerConfig,
    cluster_config: ClusterConfig,
    current: Mutex<Option<Connection>>,
}

/// Where one server's connections come from.
// Built once per server and never moved afterwards: the size of a variant does not matter.
#[allow(clippy::large_enum_variant)]
enum Shard {
    /// The publisher's own shared connection; on a server (not a cluster), publishes go through
    /// the batcher, which holds the connection too.
    Shared {
        connection: Arc<SharedConnection>,
        batcher: Batcher,
    },
    /// A backend's pool: one connection per call, returned to the pool after it.
    #[cfg(feature = "deadpool")]
    Pool(deadpool_redis::Pool),
}

impl Shard {
    /// `SPUBLISH` on a Redis Cluster, `PUBLISH` otherwise.
    fn pubsub(&self) -> history::PubSub {
        match self {
            Self::Shared { connection, .. } => connection.pubsub,
            #[cfg(feature = "deadpool")]
            Self::Pool(_) => history::PubSub::Classic,
        }
    }

    /// After a failed call.
    fn forget(&self) {
        match self {
            Self::Shared { connection, .. } => connection.forget(),
            // The pool recycles (or throws away) the connection itself.
            #[cfg(feature = "deadpool")]
            Self::Pool(_) => {}
        }
    }
}

impl fmt::Debug for Shard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Shared { connection, .. } => fmt::Debug::fmt(&connection.target, f),
            #[cfg(feature = "deadpool")]
            Self::Pool(pool) => f
                .debug_struct("Pool")
                .field("status", &pool.status())
                .finish(),
        }
    }
}

/// The connection one call runs on.
enum CallConnection {
    Shared(Connection),
    /// Back to the pool when dropped.
    #[cfg(feature = "deadpool")]
    Pooled(deadpool_redis::Connection),
}

impl ConnectionLike for CallConnection {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Self::Shared(connection) => connection.req_packed_command(cmd),
            #[cfg(feature = "deadpool")]
            Self::Pooled(connection) => connection.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Self::Shared(connection) => connection.req_packed_commands(pipeline, offset, count),
            #[cfg(feature = "deadpool")]
            Self::Pooled(connection) => connection.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Self::Shared(connection) => connection.get_db(),
            #[cfg(feature = "deadpool")]
            Self::Pooled(connection) => connection.get_db(),
        }
    }
}

/// A connection to one server (reconnecting by itself) or to a Redis Cluster.
#[derive(Clone)]
pub(crate) enum Connection {
    Server(ConnectionManager),
    Cluster(ClusterConnection),
}

impl ConnectionLike for Connection {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Self::Server(connection) => connection.req_packed_command(cmd),
            Self::Cluster(connection) => connection.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Self::Server(connection) => connection.req_packed_commands(pipeline, offset, count),
            Self::Cluster(connection) => connection.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Self::Server(connection) => connection.get_db(),
            Self::Cluster(connection) => connection.get_db(),
        }
    }
}

impl SharedConnection {
    /// The connection, opened on first use (or first use after [`SharedConnection::forget`]).
    pub(crate) async fn get(&self) -> Result<Connection, redis::RedisError> {
        if let Some(connection) = self.lock().as_ref() {
            return Ok(connection.clone());
        }
        let connection = match self.target.cluster_client() {
            Some(cluster) => Connection::Cluster(
                cluster
                    .get_async_connection_with_config(self.cluster_config.clone())
                    .await?,
            ),
            None => {
                let client = self.target.client().await?;
                Connection::Server(ConnectionManager::new_lazy_with_config(
                    client,
                    self.config.clone(),
                )?)
            }
        };
        Ok(self.lock().get_or_insert(connection).clone())
    }

    /// After a failure behind Sentinel: the next call resolves the master again.
    fn forget(&self) {
        if self.target.follows_failover() {
            *self.lock() = None;
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<Connection>> {
        self.current.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// What a successful publish did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublishReceipt {
    /// The envelope id of this call, the same on every channel. A group where the call was a
    /// duplicate holds the envelope of the earlier call instead.
    pub id: Uuid,
    /// Which event was published.
    pub kind: EventKind,
    /// One entry per group the event was published to, in routing order.
    pub deliveries: Vec<GroupDelivery>,
}

/// The outcome of publishing on one group's channel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupDelivery {
    /// The group.
    pub group: Group,
    /// How many Redis subscribers (gateway replicas) received the message; 0 for a duplicate.
    pub subscribers: u64,
    /// The event's position in the group. For a duplicate, the position the earlier publish
    /// got (its epoch is empty if the group's history has expired since).
    pub position: Position,
    /// Whether the idempotency key was already published to this group within the window, so
    /// nothing was appended or delivered this time.
    pub duplicate: bool,
}

/// Why a publish failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PublishError {
    /// The event breaks a rule of the contract; nothing was sent.
    #[error("event refused before publishing")]
    Invalid(#[source] ValidationError),
    /// The Redis URL could not be parsed.
    #[error("invalid redis url")]
    InvalidUrl(#[source] redis::RedisError),
    /// Redis could not be reached (refused, reset or dropped connection).
    #[error("redis is unreachable")]
    Unreachable(#[source] redis::RedisError),
    /// Redis did not answer within the publish timeout. While Redis is down the connection keeps
    /// reconnecting in the background, so an outage usually shows up as this variant.
    #[error("redis did not answer within {0:?}: it is down, unreachable or overloaded")]
    Timeout(Duration),
    /// Redis answered with an error.
    #[error("redis refused the publish")]
    Redis(#[source] redis::RedisError),
    /// The backend's pool ([`Publisher::from_pool`]) gave no connection: it timed out (waiting
    /// for a free connection, creating or recycling one: transient), was closed, or is
    /// misconfigured (no runtime, a failing hook). A Redis that refuses or drops the pool's
    /// new connection is [`PublishError::Unreachable`] instead, as without a pool.
    #[cfg(feature = "deadpool")]
    #[error("the redis connection pool gave no connection")]
    Pool(#[source] deadpool_redis::PoolError),
}

impl PublishError {
    /// Low-cardinality label for metrics and logs.
    pub fn label(&self) -> &'static str {
        match self {
            Self::Invalid(_) => "invalid",
            Self::InvalidUrl(_) => "invalid_url",
            Self::Unreachable(_) => "unreachable",
            Self::Timeout(_) => "timeout",
            Self::Redis(_) => "redis",
            #[cfg(feature = "deadpool")]
            Self::Pool(_) => "pool",
        }
    }

    /// Whether trying the same publish again later may succeed.
    pub fn is_transient(&self) -> bool {
        match self {
            Self::Unreachable(_) | Self::Timeout(_) | Self::Redis(_) => true,
            Self::Invalid(_) | Self::InvalidUrl(_) => false,
            #[cfg(feature = "deadpool")]
            Self::Pool(error) => matches!(error, deadpool_redis::PoolError::Timeout(_)),
        }
    }

    /// A pool's failure to give a connection: Redis's own errors (refused, dropped, timed out)
    /// are mapped as on the shared connection.
    #[cfg(feature = "deadpool")]
    fn from_pool(error: deadpool_redis::PoolError, timeout: Duration) -> Self {
        match error {
            deadpool_redis::PoolError::Backend(error) => Self::from_redis(error, timeout),
            other => Self::Pool(other),
        }
    }

    /// Redis's error, classified: timed out, unreachable, or an answer.
    pub(crate) fn from_redis(error: redis::RedisError, timeout: Duration) -> Self {
        if error.is_timeout() {
            Self::Timeout(timeout)
        } else if error.is_connection_refusal()
            || error.is_connection_dropped()
            || error.is_io_error()
        {
            Self::Unreachable(error)
        } else {
            Self::Redis(error)
        }
    }
}

impl Publisher {
    /// A publisher for `config`. Connects lazily: the first publish opens the connection, and a
    /// Redis that is down at startup is not an error here.
    ///
    /// The connection reconnects on its own, without a limit on attempts and at most
    /// [`PublisherConfig::max_reconnect_delay`] apart. A publish issued while it is reconnecting
    /// waits for it, up to [`PublisherConfig::publish_timeout`], then fails with
    /// [`PublishError::Timeout`]; an error on an established connection that drops gives
    /// [`PublishError::Unreachable`].
    ///
    /// Must be called inside a Tokio runtime, and used on it: the connection's task and, from the
    /// first publish, each server's batching task run there; the batching tasks end when the
    /// last clone is dropped.
    ///
    /// # Errors
    /// [`PublishError::InvalidUrl`] when the URL cannot be parsed.
    pub fn new(config: PublisherConfig) -> Result<Self, PublishError> {
        let manager_config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(config.connect_timeout))
            .set_response_timeout(Some(config.response_timeout))
            .set_number_of_retries(usize::MAX)
            .set_max_delay(config.max_reconnect_delay);
        let cluster_config = ClusterConfig::new()
            .set_connection_timeout(config.connect_timeout)
            .set_response_timeout(config.response_timeout);
        let mut shards = Vec::new();
        for url in config.url.split_whitespace() {
            let target = RedisTarget::parse(
                url,
                config.ca_certificate.as_deref(),
                redis::ProtocolVersion::RESP2,
            )
            .map_err(PublishError::InvalidUrl)?;
            let pubsub = if target.is_cluster() {
                history::PubSub::Sharded
            } else {
                history::PubSub::Classic
            };
            shards.push(Shard::Shared {
                connection: Arc::new(SharedConnection {
                    target,
                    pubsub,
                    config: manager_config.clone(),
                    cluster_config: cluster_config.clone(),
                    current: Mutex::new(None),
                }),
                batcher: Batcher::default(),
            });
        }
        if shards.is_empty() {
            return Err(PublishError::InvalidUrl(redis::RedisError::from((
                redis::ErrorKind::InvalidClientConfig,
                "no redis url",
            ))));
        }
        Ok(Self {
            shards: Arc::from(shards),
            prefix: config.prefix,
            publish_timeout: config.publish_timeout,
            limits: Limits {
                history_size: config.history_size,
                history_ttl: config.history_ttl,
                idempotency_window: config.idempotency_window,
            },
        })
    }

    /// A publisher that runs each script call on a connection from `pool`, a pool of one
    /// Redis server (not a cluster) the backend already holds, and gives it back when the
    /// call ends. Does no I/O.
    ///
    /// The shared connection of [`Publisher::new`] is faster: each `get()` recycles the
    /// connection with a `PING` round trip, and a pooled connection carries one call at a
    /// time (see the module docs). Use this to keep one Redis configuration and one set of
    /// connections in a backend built around deadpool.
    ///
    /// A publish waits for a free connection, Redis's answer and any (re)connection the pool
    /// makes, all within [`PublisherConfig::publish_timeout`]; past it the call fails with
    /// [`PublishError::Timeout`]. A Redis that is down gives [`PublishError::Unreachable`]
    /// (or `Timeout`), and the next call after it is back succeeds without any action: the
    /// pool drops broken connections when it recycles them and opens new ones.
    #[cfg(feature = "deadpool")]
    ///
    /// `config` gives the prefix, the publish timeout, the history bounds and the idempotency
    /// window; its URL, certificate and connection timeouts are not used (the pool has its own).
    pub fn from_pool(pool: deadpool_redis::Pool, config: PublisherConfig) -> Self {
        Self {
            shards: Arc::from([Shard::Pool(pool)]),
            prefix: config.prefix,
            publish_timeout: config.publish_timeout,
            limits: Limits {
                history_size: config.history_size,
                history_ttl: config.history_ttl,
                idempotency_window: config.idempotency_window,
            },
        }
    }

    /// The channel prefix in use.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// Publishes `event` under its own unique id ([`Event::unique_id`]) as idempotency key:
    /// publishing the same event again within the window is acknowledged as a duplicate.
    ///
    /// # Errors
    /// [`PublishError::Invalid`] before any I/O when the event breaks the contract; otherwise
    /// [`PublishError::Unreachable`], [`PublishError::Timeout`] or [`PublishError::Redis`].
    ///
    /// # Cancel safety
    /// Dropping the future may or may not have published the event, to some of its groups;
    /// publishing it again under the same key completes it without duplicates. A publish
    /// dropped (or timed out) while it waits for its batch is left out of it, unless the batch
    /// has already been sent.
    pub async fn publish(&self, event: &Event) -> Result<PublishReceipt, PublishError> {
        self.publish_with_key(event, &event.unique_id()).await
    }

    /// Publishes `event` under idempotency key `key`: within the idempotency window, a second
    /// publish under the same key to the same group is acknowledged (`duplicate` in the
    /// receipt) without being appended or delivered. Retries of one event reuse its key.
    ///
    /// # Errors
    /// As [`Publisher::publish`]; also [`PublishError::Invalid`] when `key` is empty, longer
    /// than [`MAX_IDEMPOTENCY_KEY_LEN`](crate::contract::MAX_IDEMPOTENCY_KEY_LEN) bytes or not
    /// printable ASCII without spaces ([`check_idempotency_key`]).
    ///
    /// # Cancel safety
    /// As [`Publisher::publish`].
    pub async fn publish_with_key(
        &self,
        event: &Event,
        key: &str,
    ) -> Result<PublishReceipt, PublishError> {
        let json = event.to_json().map_err(PublishError::Invalid)?;
        let json = std::str::from_utf8(&json).expect("serde_json always writes UTF-8");
        self.publish_validated(event.kind(), json, event.groups(), key)
            .await
    }

    /// Publishes an event that was already validated, as its JSON text, to `groups` under
    /// idempotency key `key`: the path of a gateway that validated the event where it entered.
    ///
    /// Groups are published one after the other, each atomically; a failure part way leaves
    /// the earlier groups published, and a retry under the same key publishes only the rest.
    ///
    /// # Errors
    /// As [`Publisher::publish_with_key`]; [`PublishError::Invalid`] only for the key.
    ///
    /// # Cancel safety
    /// As [`Publisher::publish`].
    pub async fn publish_validated(
        &self,
        kind: EventKind,
        json: &str,
        groups: Vec<Group>,
        key: &str,
    ) -> Result<PublishReceipt, PublishError> {
        check_idempotency_key(key).map_err(PublishError::Invalid)?;
        let id = history::random_uuid();
        let envelope = Envelope::encode(id, kind, now_micros(), json);
        let limits = self.limits;
        let prefix = self.prefix.as_str();
        // Shared with the batches of the event's groups, only if one of them is batched.
        let mut batched: Option<(Arc<str>, Arc<[u8]>)> = None;
        let mut appended = Vec::with_capacity(groups.len());
        // One script call per group, each on the server that holds the group, one after the
        // other; on a server the call joins a batch with other publishes (`crate::batch`).
        for group in groups {
            let shard = self.shard(&group);
            let outcome = match shard {
                Shard::Shared {
                    connection,
                    batcher,
                } if connection.pubsub == history::PubSub::Classic => {
                    let (key, envelope) = batched
                        .get_or_insert_with(|| (Arc::from(key), Arc::from(envelope.as_slice())));
                    let queue = batcher.queue(connection, || batch::Settings {
                        prefix: self.prefix.clone(),
                        limits,
                        pubsub: connection.pubsub,
                        timeout: self.publish_timeout,
                    });
                    let (reply, answer) = tokio::sync::oneshot::channel();
                    let request = batch::Request {
                        group: group.clone(),
                        key: Arc::clone(key),
                        envelope: Arc::clone(envelope),
                        reply,
                    };
                    self.batched(shard, queue, request, answer).await?
                }
                _ => {
                    let pubsub = shard.pubsub();
                    let envelope = &envelope;
                    let group = &group;
                    self.run(shard, |mut connection| async move {
                        history::append(
                            &mut connection,
                            prefix,
                            group,
                            key,
                            envelope,
                            limits,
                            pubsub,
                        )
                        .await
                    })
                    .await?
                }
            };
            appended.push((group, outcome));
        }
        let deliveries = appended
            .into_iter()
            .map(|(group, outcome)| GroupDelivery {
                group,
                subscribers: outcome.subscribers,
                position: outcome.position,
                duplicate: outcome.duplicate,
            })
            .collect();
        Ok(PublishReceipt {
            id,
            kind,
            deliveries,
        })
    }

    /// Reads `group`'s head and, with `after`, the history after that position (see
    /// [`HistoryRead`]). A group without a history gets one here, empty, under a new epoch, so
    /// the head always names an epoch. `after` may come from anyone: a position ahead of the
    /// head is answered `recovered: Some(false)` and changes nothing.
    ///
    /// # Errors
    /// [`PublishError::Unreachable`], [`PublishError::Timeout`] or [`PublishError::Redis`].
    ///
    /// # Cancel safety
    /// Cancel safe: it changes nothing but, at most, creating an empty history.
    pub async fn read_history(
        &self,
        group: &Group,
        after: Option<&Position>,
    ) -> Result<HistoryRead, PublishError> {
        self.read(group, after, history::AheadOfHead::Unrecovered)
            .await
    }

    /// As [`Publisher::read_history`] after `cursor`, the last position the caller itself
    /// received from Redis (a gateway replica filling a gap). A cursor ahead of the head in the
    /// same epoch means the history was rewound (a failover lost writes): the group starts a
    /// new epoch at once, and the answer names it with head 0 and `recovered: Some(false)`.
    /// Never pass a position a client sent.
    ///
    /// # Errors
    /// As [`Publisher::read_history`].
    ///
    /// # Cancel safety
    /// Cancel safe: at most the group's history is started again, which the next read would do.
    pub async fn read_history_after_cursor(
        &self,
        group: &Group,
        cursor: &Position,
    ) -> Result<HistoryRead, PublishError> {
        self.read(group, Some(cursor), history::AheadOfHead::NewEpoch)
            .await
    }

    async fn read(
        &self,
        group: &Group,
        after: Option<&Position>,
        ahead: history::AheadOfHead,
    ) -> Result<HistoryRead, PublishError> {
        let limits = self.limits;
        let prefix = self.prefix.as_str();
        self.run(self.shard(group), |mut connection| async move {
            history::read(&mut connection, prefix, group, after, ahead, limits).await
        })
        .await
    }

    /// PUBLISHes `message` on `channel`, outside the contract (a gateway's health round trip),
    /// and returns how many subscribers received it. On a Redis Cluster it is an `SPUBLISH` on
    /// the sharded channel `channel` (routed to the master of its slot), which only `SSUBSCRIBE`
    /// subscribers receive. With several servers it goes to the first.
    ///
    /// # Errors
    /// As [`Publisher::read_history`].
    pub async fn publish_raw(&self, channel: &str, message: &[u8]) -> Result<u64, PublishError> {
        let shard = &self.shards[0];
        let command = shard.pubsub().command();
        self.run(shard, |mut connection| async move {
            redis::cmd(command)
                .arg(channel)
                .arg(message)
                .query_async::<u64>(&mut connection)
                .await
        })
        .await
    }

    /// Runs `command` outside the contract, on the first server (or, on a Redis Cluster, the
    /// master of its key's slot), under the publish timeout: a gateway replica's own
    /// bookkeeping (which replica holds a stateful connection, a connection carried to
    /// another replica).
    ///
    /// # Errors
    /// As [`Publisher::read_history`].
    pub async fn query<T>(&self, command: redis::Cmd) -> Result<T, PublishError>
    where
        T: redis::FromRedisValue + Send,
    {
        self.run(&self.shards[0], |mut connection| async move {
            command.query_async::<T>(&mut connection).await
        })
        .await
    }

    /// Runs `call` on the shared connection under the publish timeout; a failure behind
    /// Sentinel forgets the master. A cluster connection is kept: it reconnects to each node
    /// and refreshes its slot map by itself.
    ///
    /// With a pool, `call` takes the pooled connection and drops it when it ends, which gives it
    /// back to the pool (a timed out call drops it too).
    async fn run<T, F, Fut>(&self, shard: &Shard, call: F) -> Result<T, PublishError>
    where
        F: FnOnce(CallConnection) -> Fut,
        Fut: Future<Output = redis::RedisResult<T>>,
    {
        let timeout = self.publish_timeout;
        // The connection is taken here, not in a helper `async fn` of `Shard`: one more level of
        // nested futures overflows the auto-trait recursion limit in the gateway's tests.
        let call = async {
            let connection = match shard {
                Shard::Shared { connection, .. } => connection
                    .get()
                    .await
                    .map(CallConnection::Shared)
                    .map_err(|e| PublishError::from_redis(e, timeout))?,
                #[cfg(feature = "deadpool")]
                Shard::Pool(pool) => pool
                    .get()
                    .await
                    .map(CallConnection::Pooled)
                    .map_err(|e| PublishError::from_pool(e, timeout))?,
            };
            call(connection)
                .await
                .map_err(|e| PublishError::from_redis(e, timeout))
        };
        self.settle(shard, tokio::time::timeout(timeout, call).await)
    }

    /// Queues `request` for its server's batcher and waits for its answer, all within the
    /// publish timeout; a failure behind Sentinel forgets the master, as [`Publisher::run`].
    async fn batched(
        &self,
        shard: &Shard,
        queue: &tokio::sync::mpsc::Sender<batch::Request>,
        request: batch::Request,
        answer: tokio::sync::oneshot::Receiver<Result<Appended, PublishError>>,
    ) -> Result<Appended, PublishError> {
        let timeout = self.publish_timeout;
        let call = async {
            // Neither fails while this publisher lives, unless the batcher's runtime has shut down.
            queue.send(request).await.map_err(|_| stopped())?;
            answer.await.map_err(|_| stopped())?
        };
        self.settle(shard, tokio::time::timeout(timeout, call).await)
    }

    /// The outcome of a call on `shard` bounded by the publish timeout (`Err(Elapsed)` when it
    /// ran out); after a failure behind Sentinel the master is forgotten. Not an `async fn`, so
    /// it adds no level of nested futures (see [`Publisher::run`]).
    fn settle<T>(
        &self,
        shard: &Shard,
        outcome: Result<Result<T, PublishError>, tokio::time::error::Elapsed>,
    ) -> Result<T, PublishError> {
        let error = match outcome {
            Ok(Ok(value)) => return Ok(value),
            Ok(Err(e)) => e,
            Err(_) => PublishError::Timeout(self.publish_timeout),
        };
        shard.forget();
        Err(error)
    }

    /// The server that holds `group`.
    fn shard(&self, group: &Group) -> &Shard {
        if self.shards.len() == 1 {
            return &self.shards[0];
        }
        &self.shards[shard_of(group, self.shards.len())]
    }
}

impl fmt::Debug for Publisher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Publisher")
            .field("prefix", &self.prefix)
            .field("publish_timeout", &self.publish_timeout)
            .field("targets", &self.shards.iter().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

/// The batcher's task is gone (its runtime shut down): nothing can reach Redis any more.
fn stopped() -> PublishError {
    PublishError::Unreachable(redis::RedisError::from((
        redis::ErrorKind::Client,
        "the publisher's batching task has stopped (its Tokio runtime shut down)",
    )))
}

fn now_micros() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
}
