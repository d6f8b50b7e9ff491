//! Publishing without waiting: a bounded queue drained by one background task.
//!
//! [`BackgroundPublisher::try_publish`] validates the event, fixes its idempotency key and
//! queues it without ever blocking; a full queue drops the event, counts it in
//! `publisher_events_dropped_total` and logs a warning. The task publishes queued events in order
//! through a [`Publisher`], retrying transient failures with capped exponential backoff and
//! jitter; every attempt for one event uses its one key
//! ([`Publisher::publish_with_key`]), so a retry of an attempt that did reach Redis (its reply
//! was lost) is acknowledged as a duplicate instead of being delivered twice. It does not persist
//! anything: events still queued when the process dies are lost.

use std::time::Duration;

use tokio::sync::{mpsc, oneshot};

use crate::backoff::Backoff;
use crate::contract::check_idempotency_key;
use crate::contract::{Event, ValidationError};
use crate::publisher::Publisher;

/// Default queue capacity, in events.
pub const DEFAULT_CAPACITY: usize = 1024;
/// Default number of attempts per event, the first one included.
pub const DEFAULT_MAX_ATTEMPTS: u32 = 5;
/// Default pause before the first retry.
pub const DEFAULT_INITIAL_BACKOFF: Duration = Duration::from_millis(100);
/// Default longest pause between two retries.
pub const DEFAULT_MAX_BACKOFF: Duration = Duration::from_secs(5);

/// How a [`BackgroundPublisher`] queues and retries.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct BackgroundConfig {
    /// Queue capacity, in events; at least 1.
    pub capacity: usize,
    /// Attempts per event, the first one included; at least 1.
    pub max_attempts: u32,
    /// Pause before the first retry; doubled after each failure.
    pub initial_backoff: Duration,
    /// Longest pause between two retries.
    pub max_backoff: Duration,
}

impl Default for BackgroundConfig {
    fn default() -> Self {
        Self {
            capacity: DEFAULT_CAPACITY,
            max_attempts: DEFAULT_MAX_ATTEMPTS,
            initial_backoff: DEFAULT_INITIAL_BACKOFF,
            max_backoff: DEFAULT_MAX_BACKOFF,
        }
    }
}

impl BackgroundConfig {
    /// Replaces the queue capacity.
    #[must_use]
    pub fn with_capacity(mut self, capacity: usize) -> Self {
        self.capacity = capacity;
        self
    }

    /// Replaces the number of attempts per event.
    #[must_use]
    pub fn with_max_attempts(mut self, max_attempts: u32) -> Self {
        self.max_attempts = max_attempts;
        self
    }
}

/// Why [`BackgroundPublisher::try_publish`] did not queue an event.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Dropped {
    /// The queue was full.
    #[error("publish queue is full; event dropped")]
    QueueFull,
    /// The publisher was shut down.
    #[error("background publisher is shut down; event dropped")]
    Closed,
    /// The event breaks a rule of the contract.
    #[error("event refused before queueing")]
    Invalid(#[source] ValidationError),
}

impl Dropped {
    /// Low-cardinality label for metrics and logs.
    pub fn label(&self) -> &'static str {
        match self {
            Self::QueueFull => "queue_full",
            Self::Closed => "closed",
            Self::Invalid(_) => "invalid",
        }
    }
}

/// A publisher that queues events and publishes them from a background task. Cheap to clone;
/// clones share the queue.
#[derive(Debug, Clone)]
pub struct BackgroundPublisher {
    queue: mpsc::Sender<Command>,
}

#[derive(Debug)]
enum Command {
    Publish { event: Box<Event>, key: String },
    Flush(oneshot::Sender<()>),
    Shutdown(oneshot::Sender<()>),
}

impl BackgroundPublisher {
    /// Starts the background task on the current Tokio runtime.
    ///
    /// # Panics
    /// Outside a Tokio runtime.
    pub fn spawn(publisher: Publisher, config: BackgroundConfig) -> Self {
        let (queue, commands) = mpsc::channel(config.capacity.max(1));
        tokio::spawn(drain(publisher, config, commands));
        Self { queue }
    }

    /// Queues `event` under its own unique id as idempotency key ([`Event::unique_id`]), never
    /// blocking, and returns that key.
    ///
    /// # Errors
    /// [`Dropped`] when the event is invalid, the queue is full or the publisher is shut down;
    /// the drop is counted and logged.
    pub fn try_publish(&self, event: Event) -> Result<String, Dropped> {
        let key = event.unique_id();
        self.try_publish_with_key(event, key)
    }

    /// Queues `event` under idempotency key `key` (see [`Publisher::publish_with_key`]), never
    /// blocking, and returns the key.
    ///
    /// # Errors
    /// As [`BackgroundPublisher::try_publish`]; [`Dropped::Invalid`] also for a key the
    /// publisher would refuse.
    pub fn try_publish_with_key(
        &self,
        event: Event,
        key: impl Into<String>,
    ) -> Result<String, Dropped> {
        let key = key.into();
        let result = match event.to_json().and_then(|_| check_idempotency_key(&key)) {
            Err(e) => Err(Dropped::Invalid(e)),
            Ok(()) => self
                .queue
                .try_send(Command::Publish {
                    event: Box::new(event),
                    key: key.clone(),
                })
                .map_err(|e| match e {
                    mpsc::error::TrySendError::Full(_) => Dropped::QueueFull,
                    mpsc::error::TrySendError::Closed(_) => Dropped::Closed,
                }),
        };
        match result {
            Ok(()) => Ok(key),
            Err(dropped) => {
                count_drop(dropped.label());
                tracing::warn!(%key, reason = dropped.label(), "real-time event dropped");
                Err(dropped)
            }
        }
    }

    /// Waits until every event queued before this call is published or given up.
    ///
    /// Returns at once after a shutdown.
    ///
    /// # Cancel safety
    /// Cancel safe: dropping the future only stops waiting.
    pub async fn flush(&self) {
        let (done, finished) = oneshot::channel();
        if self.queue.send(Command::Flush(done)).await.is_ok() {
            // An error means the task has ended, so nothing is left to wait for.
            let _ = finished.await;
        }
    }

    /// Publishes (or gives up) everything queued so far, then stops the task; later
    /// [`BackgroundPublisher::try_publish`] calls return [`Dropped::Closed`].
    ///
    /// # Cancel safety
    /// Cancel safe: dropping the future only stops waiting; the shutdown still happens.
    pub async fn shutdown(&self) {
        let (done, finished) = oneshot::channel();
        if self.queue.send(Command::Shutdown(done)).await.is_ok() {
            let _ = finished.await;
        }
    }
}

async fn drain(
    publisher: Publisher,
    config: BackgroundConfig,
    mut commands: mpsc::Receiver<Command>,
) {
    while let Some(command) = commands.recv().await {
        match command {
            Command::Publish { event, key } => {
                publish_with_retries(&publisher, &config, &event, &key).await
            }
            Command::Flush(done) => {
                let _ = done.send(());
            }
            Command::Shutdown(done) => {
                commands.close();
                // Events queued before the shutdown command were handled above; any still
                // buffered were queued concurrently with it and are published too.
                while let Some(command) = commands.recv().await {
                    match command {
                        Command::Publish { event, key } => {
                            publish_with_retries(&publisher, &config, &event, &key).await;
                        }
                        Command::Flush(done) | Command::Shutdown(done) => {
                            let _ = done.send(());
                        }
                    }
                }
                let _ = done.send(());
                return;
            }
        }
    }
}

async fn publish_with_retries(
    publisher: &Publisher,
    config: &BackgroundConfig,
    event: &Event,
    key: &str,
) {
    let max_attempts = config.max_attempts.max(1);
    let mut backoff = Backoff::new(config.initial_backoff, config.max_backoff);
    for attempt in 1..=max_attempts {
        match publisher.publish_with_key(event, key).await {
            Ok(_) => return,
            Err(error) if error.is_transient() && attempt < max_attempts => {
                tracing::debug!(%key, attempt, error = %error, "publish failed; retrying");
                backoff.wait().await;
            }
            Err(error) => {
                count_drop("gave_up");
                tracing::warn!(%key, attempt, error = %error, reason = error.label(), "giving up on real-time event");
                return;
            }
        }
    }
}

fn count_drop(reason: &'static str) {
    metrics::counter!("publisher_events_dropped_total", "reason" => reason).increment(1);
}
