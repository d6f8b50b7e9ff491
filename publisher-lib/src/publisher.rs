//! Publishing events to the gateway replicas through Redis pub/sub.
//!
//! A [`Publisher`] validates an event, encodes its [`Envelope`] once and PUBLISHes it to the
//! channel of every group the event is routed to, in one pipeline. It does not queue, retry or
//! deduplicate; [`crate::BackgroundPublisher`] adds a queue and retries on top of it.
//!
//! # Why one shared `ConnectionManager` and not a deadpool pool
//!
//! The scale-out issue asked for deadpool-redis. The redis-rs feasibility notes measured a
//! deadpool checkout per publish at about 15k publishes/s, because every `get()` recycles the
//! connection with a PING round trip, against about 50k/s for one multiplexed connection cloned
//! per task. A `ConnectionManager` is such a multiplexed connection that also reconnects by
//! itself, so the publisher holds exactly one and clones it per call (a cheap handle clone).
//! What deadpool's wait/create/recycle timeouts would bound is bounded here by the manager's
//! connection timeout, its response timeout and [`PublisherConfig::publish_timeout`] around the
//! whole call. Reconnection is retried without limit, with a capped delay, because the notes
//! showed the default retry count giving up for good after a 12 s outage. Behind Sentinel
//! ([`crate::target`]) a failed call drops the manager, and the next call asks the Sentinels for
//! the current master again.

use std::fmt;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use uuid::Uuid;

use crate::contract::{Envelope, Event, EventKind, Group, ValidationError};
use crate::target::RedisTarget;

/// The channel prefix the gateway subscribes under unless configured otherwise.
pub const DEFAULT_PREFIX: &str = "rt:";
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
    /// Redis URL, e.g. `redis://127.0.0.1:6379`, `rediss://...` or
    /// `redis+sentinel://host:26379/<master>` (see [`crate::target`]).
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
}

/// Publishes events to Redis. Cheap to clone; clones share one connection.
#[derive(Clone)]
pub struct Publisher {
    connection: Arc<SharedConnection>,
    prefix: String,
    publish_timeout: Duration,
}

/// The one connection manager all clones share, built on first use from the target.
struct SharedConnection {
    target: RedisTarget,
    config: ConnectionManagerConfig,
    current: Mutex<Option<ConnectionManager>>,
}

impl SharedConnection {
    async fn get(&self) -> Result<ConnectionManager, redis::RedisError> {
        if let Some(manager) = self.lock().as_ref() {
            return Ok(manager.clone());
        }
        let client = self.target.client().await?;
        let manager = ConnectionManager::new_lazy_with_config(client, self.config.clone())?;
        Ok(self.lock().get_or_insert(manager).clone())
    }

    /// After a failure behind Sentinel: the next call resolves the master again.
    fn forget(&self) {
        if self.target.follows_failover() {
            *self.lock() = None;
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<ConnectionManager>> {
        self.current.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// What a successful publish did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublishReceipt {
    /// The envelope id, the same on every channel.
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
    /// How many Redis subscribers (gateway replicas) received the message.
    pub subscribers: u64,
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
        }
    }

    /// Whether trying the same publish again later may succeed.
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            Self::Unreachable(_) | Self::Timeout(_) | Self::Redis(_)
        )
    }

    fn from_redis(error: redis::RedisError, timeout: Duration) -> Self {
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
    /// Must be called inside a Tokio runtime.
    ///
    /// # Errors
    /// [`PublishError::InvalidUrl`] when the URL cannot be parsed.
    pub fn new(config: PublisherConfig) -> Result<Self, PublishError> {
        let target = RedisTarget::parse(
            &config.url,
            config.ca_certificate.as_deref(),
            redis::ProtocolVersion::RESP2,
        )
        .map_err(PublishError::InvalidUrl)?;
        let manager_config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(config.connect_timeout))
            .set_response_timeout(Some(config.response_timeout))
            .set_number_of_retries(usize::MAX)
            .set_max_delay(config.max_reconnect_delay);
        Ok(Self {
            connection: Arc::new(SharedConnection {
                target,
                config: manager_config,
                current: Mutex::new(None),
            }),
            prefix: config.prefix,
            publish_timeout: config.publish_timeout,
        })
    }

    /// The channel prefix in use.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// Publishes `event` under a new random envelope id.
    ///
    /// # Errors
    /// [`PublishError::Invalid`] before any I/O when the event breaks the contract; otherwise
    /// [`PublishError::Unreachable`], [`PublishError::Timeout`] or [`PublishError::Redis`].
    ///
    /// # Cancel safety
    /// Dropping the future may or may not have published the event.
    pub async fn publish(&self, event: &Event) -> Result<PublishReceipt, PublishError> {
        self.publish_with_id(event, Uuid::new_v4()).await
    }

    /// Publishes `event` under envelope id `id`; retries of one event reuse its id so the
    /// gateway can drop duplicates.
    ///
    /// # Errors
    /// As [`Publisher::publish`].
    ///
    /// # Cancel safety
    /// As [`Publisher::publish`].
    pub async fn publish_with_id(
        &self,
        event: &Event,
        id: Uuid,
    ) -> Result<PublishReceipt, PublishError> {
        let json = event.to_json().map_err(PublishError::Invalid)?;
        let json = std::str::from_utf8(&json).expect("serde_json always writes UTF-8");
        self.publish_validated(event.kind(), json, event.groups(), id)
            .await
    }

    /// Publishes an event that was already validated, as its JSON text, to `groups`: the path
    /// of a gateway that validated the event where it entered.
    ///
    /// # Errors
    /// As [`Publisher::publish`], without [`PublishError::Invalid`].
    ///
    /// # Cancel safety
    /// As [`Publisher::publish`].
    pub async fn publish_validated(
        &self,
        kind: EventKind,
        json: &str,
        groups: Vec<Group>,
        id: Uuid,
    ) -> Result<PublishReceipt, PublishError> {
        let envelope = Envelope::encode(id, kind, now_micros(), json);
        let mut pipe = redis::pipe();
        for group in &groups {
            pipe.cmd("PUBLISH")
                .arg(group.channel(&self.prefix))
                .arg(&envelope);
        }
        let counts: Vec<u64> = self.query(&pipe).await?;
        let deliveries = groups
            .into_iter()
            .zip(counts)
            .map(|(group, subscribers)| GroupDelivery { group, subscribers })
            .collect();
        Ok(PublishReceipt {
            id,
            kind,
            deliveries,
        })
    }

    /// PUBLISHes `message` on `channel`, outside the contract (a gateway's health round trip),
    /// and returns how many subscribers received it.
    ///
    /// # Errors
    /// As [`Publisher::publish_validated`].
    pub async fn publish_raw(&self, channel: &str, message: &[u8]) -> Result<u64, PublishError> {
        let mut pipe = redis::pipe();
        pipe.cmd("PUBLISH").arg(channel).arg(message);
        let (count,): (u64,) = self.query(&pipe).await?;
        Ok(count)
    }

    /// Runs `pipe` under the publish timeout; a failure behind Sentinel forgets the master.
    async fn query<T: redis::FromRedisValue>(
        &self,
        pipe: &redis::Pipeline,
    ) -> Result<T, PublishError> {
        let call = async {
            let mut connection = self.connection.get().await?;
            pipe.query_async::<T>(&mut connection).await
        };
        let outcome = match tokio::time::timeout(self.publish_timeout, call).await {
            Ok(Ok(value)) => return Ok(value),
            Ok(Err(e)) => PublishError::from_redis(e, self.publish_timeout),
            Err(_) => PublishError::Timeout(self.publish_timeout),
        };
        self.connection.forget();
        Err(outcome)
    }
}

impl fmt::Debug for Publisher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Publisher")
            .field("prefix", &self.prefix)
            .field("publish_timeout", &self.publish_timeout)
            .field("target", &self.connection.target)
            .finish_non_exhaustive()
    }
}

fn now_micros() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
}
