//! Filling a group's gaps from its history, for the Redis broker: each subscribed group's
//! [`Sequencer`] and the history reads they ask for.
//!
//! The subscriber hands every message of a wanted group to [`Cursors::live`] and says when its
//! connection came back ([`Cursors::reconnected`]); the sequencers decide what fan-out gets and
//! which reads to make. A read runs as a task of the shutdown tracker, retried with
//! `publisher_lib::backoff` for up to [`REPAIR_GIVE_UP_AFTER`] (Redis may be restarting or
//! loading), and its result comes back through a bounded channel ([`RepairResults`]) that the
//! subscriber's loop drains into [`Cursors::finish`], so only that loop ever touches a
//! sequencer. It names no Redis type: reads go through [`CursorReader`].

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use publisher_lib::backoff::Backoff;
use publisher_lib::contract::{Group, Position};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::{BrokerError, Fanout, History, Publication};
use crate::order::sequencer::Sequencer;
use crate::shutdown::Shutdown;

/// How long a failed history read is retried before the gap is given up (delivered across):
/// longer than a Redis restart with a loaded AOF.
pub(super) const REPAIR_GIVE_UP_AFTER: Duration = Duration::from_secs(40);
/// First and longest pause between two tries of a history read.
const RETRY_MIN: Duration = Duration::from_millis(200);
const RETRY_MAX: Duration = Duration::from_millis(1500);
/// Finished reads waiting for the subscriber's loop; at most one read per group is out, so
/// this is reached only with that many groups repairing at once, and then readers wait.
const RESULTS_CAPACITY: usize = 1024;

/// A future of a history read.
pub(super) type Reading = Pin<Box<dyn Future<Output = Result<History, BrokerError>> + Send>>;

/// Reads what this replica missed after its own cursor (a position it delivered).
pub(super) trait CursorReader: Send + Sync + 'static {
    /// `group`'s head and the publications after `cursor`; a cursor ahead of the head starts a
    /// new epoch, which only a replica's own cursor may do.
    fn read_after_cursor(&self, group: Group, cursor: Position) -> Reading;
}

/// Every subscribed group's delivery order on this replica.
pub(super) struct Cursors {
    sequencers: HashMap<Group, Sequencer>,
    fanout: Arc<dyn Fanout>,
    reader: Arc<dyn CursorReader>,
    results: mpsc::Sender<RepairResult>,
    tasks: TaskTracker,
    stop: CancellationToken,
}

/// Where finished history reads arrive, for the subscriber's loop.
#[derive(Debug)]
pub(super) struct RepairResults {
    rx: mpsc::Receiver<RepairResult>,
}

/// A history read for one group, finished (after its retries).
#[derive(Debug)]
pub(super) struct RepairResult {
    group: Group,
    /// The position it read after.
    after: Position,
    history: Result<History, BrokerError>,
}

impl std::fmt::Debug for Cursors {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cursors")
            .field("groups", &self.sequencers.len())
            .finish_non_exhaustive()
    }
}

impl Cursors {
    /// No group yet; delivers to `fanout`, reads through `reader`, runs reads as tasks of
    /// `shutdown`'s background tracker.
    pub(super) fn new(
        fanout: Arc<dyn Fanout>,
        reader: Arc<dyn CursorReader>,
        shutdown: &Shutdown,
    ) -> (Self, RepairResults) {
        let (results, rx) = mpsc::channel(RESULTS_CAPACITY);
        let cursors = Self {
            sequencers: HashMap::new(),
            fanout,
            reader,
            results,
            tasks: shutdown.background().clone(),
            stop: shutdown.background_token().clone(),
        };
        (cursors, RepairResults { rx })
    }

    /// A publication received live for a wanted group: delivered in order, once; a gap starts
    /// a history read, and what follows waits for it.
    pub(super) fn live(&mut self, publication: Publication) {
        // Looked up before inserting: no clone of the group on the per-message path.
        if !self.sequencers.contains_key(&publication.group) {
            self.sequencers
                .insert(publication.group.clone(), Sequencer::default());
        }
        let Some(sequencer) = self.sequencers.get_mut(&publication.group) else {
            return;
        };
        let fanout = &self.fanout;
        let Some(after) = sequencer.live(publication, &mut |p| fanout.fan_out(p)) else {
            return;
        };
        // A gap: the publication now waits in the sequencer, which names its group (cloned
        // only here, not per message).
        if let Some(group) = sequencer.held_group().cloned() {
            self.read(group, after);
        }
    }

    /// The subscriber connection is back: every group reads what was published meanwhile.
    pub(super) fn reconnected(&mut self) {
        let behind: Vec<(Group, Position)> = self
            .sequencers
            .iter_mut()
            .filter_map(|(group, sequencer)| Some((group.clone(), sequencer.reconnected()?)))
            .collect();
        for (group, after) in behind {
            self.read(group, after);
        }
    }

    /// `group`'s subscription was made again (its cluster slot moved): what was published
    /// meanwhile is only in the history, so its order reads it before delivering further.
    pub(super) fn resubscribed(&mut self, group: &Group) {
        let Some(after) = self
            .sequencers
            .get_mut(group)
            .and_then(Sequencer::reconnected)
        else {
            return;
        };
        self.read(group.clone(), after);
    }

    /// A read finished: its group's sequencer delivers what it filled and what waited.
    pub(super) fn finish(&mut self, result: RepairResult) {
        let RepairResult {
            group,
            after,
            history,
        } = result;
        let Some(sequencer) = self.sequencers.get_mut(&group) else {
            return;
        };
        let fanout = &self.fanout;
        let mut deliver = |p: &Publication| fanout.fan_out(p);
        let next = match history {
            Err(e) => {
                tracing::warn!(
                    %group,
                    error = %e,
                    "a gap in a group's events could not be filled from the history"
                );
                sequencer.read_failed(&mut deliver)
            }
            Ok(history) => {
                if history.head.epoch != after.epoch {
                    tracing::warn!(%group, "the group's history restarted under a new epoch");
                } else if history.recovered == Some(true) {
                    tracing::info!(
                        %group,
                        missed = history.missed.len(),
                        "filled a gap from the history"
                    );
                } else {
                    tracing::warn!(
                        %group,
                        "a gap in a group's events could not be filled from the history"
                    );
                }
                sequencer.history(&after, history, &mut deliver)
            }
        };
        if let Some(after) = next {
            self.read(group, after);
        }
    }

    /// The group's last local member left: its order starts afresh if it is wanted again.
    pub(super) fn forget(&mut self, group: &Group) {
        self.sequencers.remove(group);
    }

    /// Reads `group`'s history after `after` in a tracked task, retrying failures.
    fn read(&self, group: Group, after: Position) {
        let reader = Arc::clone(&self.reader);
        let results = self.results.clone();
        let stop = self.stop.clone();
        self.tasks.spawn(async move {
            let read = read_with_retries(reader.as_ref(), &group, &after);
            tokio::select! {
                () = stop.cancelled() => {}
                history = read => {
                    let result = RepairResult { group, after, history };
                    // Waits while the loop is behind (the channel is bounded); gone at shutdown.
                    tokio::select! {
                        () = stop.cancelled() => {}
                        _ = results.send(result) => {}
                    }
                }
            }
        });
    }
}

impl RepairResults {
    /// The next finished read; `None` once every sender is gone.
    ///
    /// # Cancel safety
    /// Cancel-safe.
    pub(super) async fn recv(&mut self) -> Option<RepairResult> {
        self.rx.recv().await
    }
}

/// Reads until a read succeeds or [`REPAIR_GIVE_UP_AFTER`] has passed.
async fn read_with_retries(
    reader: &dyn CursorReader,
    group: &Group,
    after: &Position,
) -> Result<History, BrokerError> {
    let give_up = Instant::now() + REPAIR_GIVE_UP_AFTER;
    let mut backoff = Backoff::new(RETRY_MIN, RETRY_MAX);
    loop {
        match reader.read_after_cursor(group.clone(), after.clone()).await {
            Ok(history) => return Ok(history),
            Err(e) if Instant::now() < give_up => {
                tracing::debug!(%group, error = %e, "history read failed; retrying");
                backoff.wait().await;
            }
            Err(e) => return Err(e),
        }
    }
}

#[cfg(test)]
mod tests;
