//! Batching publish script calls on one server's shared connection.
//!
//! Redis spends part of every publish on the script call itself rather than on the script's
//! commands, and a call for many events pays it once. So on a server (not a Redis Cluster, where a script's
//! keys must share one slot) every publish to a group goes through one [`Batcher`]: a task,
//! spawned on the first publish, that takes the first waiting publish and whatever else is
//! already queued, up to [`MAX_BATCH_EVENTS`] or [`MAX_BATCH_BYTES`], runs the publish script
//! once for all of them and answers each caller through its own oneshot. It never waits for a
//! batch to fill: an idle publisher sends each publish at once, and batches grow only while
//! earlier ones are in flight ([`MAX_BATCHES_IN_FLIGHT`]). The task ends when the last
//! [`crate::Publisher`] clone is dropped, which closes its queue.
//!
//! This module knows nothing about a caller's timeout or Sentinel: the caller bounds its own
//! wait and forgets the master after a failure, as for any other call.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, oneshot};

use crate::contract::Group;
use crate::history::{self, Append, Appended, Limits, PubSub};
use crate::publisher::{PublishError, SharedConnection};

/// Most events in one script call. Past a few dozen events the call's own cost (an empty
/// `EVALSHA` alone is a few µs of Redis time, about as much as one event's commands) is already
/// spread thin; a bigger batch saves little more and keeps Redis, which runs a script
/// atomically, from serving anyone else for longer (64 events measured about 0.4 ms of Redis
/// time per call with `loadgen publish-bench`).
pub(crate) const MAX_BATCH_EVENTS: usize = 64;

/// A batch takes no more events once their envelopes reach this many bytes (so it may exceed it
/// by one envelope, at most `MAX_EVENT_BYTES` and its envelope): bounds the size of one request
/// when events are large. 64 events of a typical few hundred bytes fit well within it.
pub(crate) const MAX_BATCH_BYTES: usize = 64 * 1024;

/// Script calls of one server in flight at once. More than one, so that Redis never waits for
/// the next request while a reply travels back; few, so that publishes arriving meanwhile queue
/// up and make the next batch bigger rather than each becoming its own call.
pub(crate) const MAX_BATCHES_IN_FLIGHT: usize = 4;

/// Publishes waiting for a batch, per server. Enough to fill every batch in flight and the next
/// ones ([`MAX_BATCHES_IN_FLIGHT`] × [`MAX_BATCH_EVENTS`] is 256); a caller past it waits for
/// room (back-pressure) within its publish timeout. At most a few MB of envelopes.
pub(crate) const QUEUE_CAPACITY: usize = 1024;

/// What every batch of one server needs besides its events.
#[derive(Debug, Clone)]
pub(crate) struct Settings {
    /// Channel prefix.
    pub(crate) prefix: String,
    /// History bounds and idempotency window.
    pub(crate) limits: Limits,
    /// `PUBLISH` or `SPUBLISH`.
    pub(crate) pubsub: PubSub,
    /// Bound on one script call, connecting included; its callers' own timeouts, which started
    /// earlier, have passed by then.
    pub(crate) timeout: Duration,
}

/// One publish to one group, waiting for its batch.
#[derive(Debug)]
pub(crate) struct Request {
    /// The group.
    pub(crate) group: Group,
    /// The idempotency key.
    pub(crate) key: Arc<str>,
    /// The plain envelope, shared by the event's groups.
    pub(crate) envelope: Arc<[u8]>,
    /// Where the outcome goes.
    pub(crate) reply: oneshot::Sender<Result<Appended, PublishError>>,
}

/// The queue into one server's batching task, which starts on first use.
#[derive(Debug, Default)]
pub(crate) struct Batcher {
    queue: OnceLock<mpsc::Sender<Request>>,
}

impl Batcher {
    /// The queue, spawning the task on `connection` on the first call. Must be called inside a
    /// Tokio runtime; the task lives on that runtime.
    pub(crate) fn queue(
        &self,
        connection: &Arc<SharedConnection>,
        settings: impl FnOnce() -> Settings,
    ) -> &mpsc::Sender<Request> {
        self.queue.get_or_init(|| {
            let (sender, receiver) = mpsc::channel(QUEUE_CAPACITY);
            tokio::spawn(run(receiver, Arc::clone(connection), settings()));
            sender
        })
    }
}

/// Takes batches off `requests` until every sender is gone, with at most
/// [`MAX_BATCHES_IN_FLIGHT`] script calls running.
async fn run(
    mut requests: mpsc::Receiver<Request>,
    connection: Arc<SharedConnection>,
    settings: Settings,
) {
    let settings = Arc::new(settings);
    let in_flight = Arc::new(Semaphore::new(MAX_BATCHES_IN_FLIGHT));
    loop {
        // A free slot first, so that while every slot is busy publishes stay queued and join the
        // next batch. The semaphore is never closed.
        let Ok(slot) = Arc::clone(&in_flight).acquire_owned().await else {
            return;
        };
        let Some(first) = requests.recv().await else {
            return;
        };
        let mut bytes = first.envelope.len();
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH_EVENTS && bytes < MAX_BATCH_BYTES {
            let Ok(request) = requests.try_recv() else {
                break;
            };
            bytes += request.envelope.len();
            batch.push(request);
        }
        // A caller that gave up (timed out or dropped) before its batch left is not published.
        batch.retain(|request| !request.reply.is_closed());
        if batch.is_empty() {
            continue;
        }
        tokio::spawn(call(
            batch,
            Arc::clone(&connection),
            Arc::clone(&settings),
            slot,
        ));
    }
}

/// Runs the publish script once for `batch` and answers each request; a failed call answers
/// every request with its error. Frees `_slot` when done.
async fn call(
    batch: Vec<Request>,
    connection: Arc<SharedConnection>,
    settings: Arc<Settings>,
    _slot: OwnedSemaphorePermit,
) {
    let events: Vec<Append<'_>> = batch
        .iter()
        .map(|request| Append {
            group: &request.group,
            key: &request.key,
            envelope: &request.envelope,
        })
        .collect();
    let timeout = settings.timeout;
    let outcome = tokio::time::timeout(timeout, async {
        let mut connection = connection.get().await?;
        history::append_all(
            &mut connection,
            &settings.prefix,
            &events,
            settings.limits,
            settings.pubsub,
        )
        .await
    })
    .await;
    drop(events);
    match outcome {
        Ok(Ok(appended)) => {
            for (request, appended) in batch.into_iter().zip(appended) {
                // The caller may have given up meanwhile; nobody is left to tell.
                let _ = request.reply.send(Ok(appended));
            }
        }
        Ok(Err(error)) => {
            for request in batch {
                let _ = request
                    .reply
                    .send(Err(PublishError::from_redis(error.clone(), timeout)));
            }
        }
        Err(_) => {
            for request in batch {
                let _ = request.reply.send(Err(PublishError::Timeout(timeout)));
            }
        }
    }
}
