//! One group's delivery order on a replica, as a pure state machine.
//!
//! The Redis broker receives a group's positioned messages from pub/sub, which may drop some
//! (a cut connection, a full buffer) and, around a repair, deliver some again. A [`Sequencer`]
//! turns what arrives into what fan-out gets: each event once, in `seq` order. It drops
//! repeats, and on a gap (or after a reconnect) it holds the group's deliveries and asks for the
//! history after its cursor; the answer fills the gap before what waited is delivered. Its
//! inputs are a live message, the result of a history read, a read that failed for good, and a
//! reconnect; its outputs are the publications handed to `deliver` and, at most one at a time,
//! the history read to issue. It does no I/O and knows no clock: `broker/repair.rs` runs the
//! reads (and their retries) for both brokers, and the property tests run it against a model
//! history.

use publisher_lib::contract::{Group, Position};

use super::already_reached;
use crate::broker::{History, Publication};
use crate::metrics;

/// Where one group's delivery stands on this replica.
#[derive(Debug, Default)]
pub(crate) struct Sequencer {
    /// The last position delivered; `None` before the first positioned message.
    position: Option<Position>,
    /// While a history read is out: what arrived meanwhile, delivered after it.
    repair: Option<Repair>,
}

/// A history read in progress.
#[derive(Debug, Default)]
struct Repair {
    /// Publications received while the read is out, in arrival order.
    waiting: Vec<Publication>,
    /// A reconnect happened while the read was out: what was published during the outage may
    /// be newer than what the read returns, so read again after it.
    stale: bool,
}

impl Sequencer {
    /// A message received live. Returns the position to read the history after, when this
    /// message reveals a gap (a history read must then be issued).
    #[must_use]
    pub(crate) fn live(
        &mut self,
        publication: Publication,
        deliver: &mut impl FnMut(&Publication),
    ) -> Option<Position> {
        if let Some(repair) = &mut self.repair {
            repair.waiting.push(publication);
            return None;
        }
        let (Some(last), Some(next)) = (&mut self.position, &publication.position) else {
            // The first since subscribing, or one without a position (an old publisher).
            if let Some(next) = &publication.position {
                self.position = Some(next.clone());
            }
            deliver(&publication);
            return None;
        };
        if last.epoch == next.epoch {
            if next.seq <= last.seq {
                metrics::broker_duplicate_dropped();
                return None;
            }
            if next.seq > last.seq + 1 {
                let after = last.clone();
                return Some(self.hold(after, vec![publication]));
            }
            last.seq = next.seq;
            deliver(&publication);
            return None;
        }
        // A new epoch: the group's history started again (clients see it and refetch). Its
        // first event is seq 1; a later one means the first ones did not arrive here.
        if next.seq > 1 {
            let start = Position {
                epoch: next.epoch.clone(),
                seq: 0,
            };
            return Some(self.hold(start, vec![publication]));
        }
        *last = next.clone();
        deliver(&publication);
        None
    }

    /// The subscriber connection was re-established: what was published meanwhile is only in
    /// the history. Returns the position to read after, unless a read is already out (it is
    /// then read again once that one is done) or nothing was delivered yet.
    #[must_use]
    pub(crate) fn reconnected(&mut self) -> Option<Position> {
        if let Some(repair) = &mut self.repair {
            repair.stale = true;
            return None;
        }
        let after = self.position.clone()?;
        Some(self.hold(after, Vec::new()))
    }

    /// The history read after `after` (the position last returned) came back. Delivers what it
    /// filled and what waited; returns the next read to issue, if any.
    #[must_use]
    pub(crate) fn history(
        &mut self,
        after: &Position,
        history: History,
        deliver: &mut impl FnMut(&Publication),
    ) -> Option<Position> {
        let repair = self.repair.take()?;
        if history.recovered == Some(false) && history.head.epoch != after.epoch {
            // The history started again under a new epoch (Redis lost it, or it was rewound):
            // what already arrived of older epochs (the cursor's, and any that came and went
            // while the read was out) goes first, in arrival order, as far as it got; then
            // everything of the head's epoch is news, read from its beginning.
            let (new, old): (Vec<_>, Vec<_>) = repair.waiting.into_iter().partition(|p| {
                p.position
                    .as_ref()
                    .is_some_and(|position| position.epoch == history.head.epoch)
            });
            self.deliver_skipping_gaps(old, deliver);
            let start = Position {
                epoch: history.head.epoch,
                seq: 0,
            };
            self.position = Some(start.clone());
            self.repair = Some(Repair {
                waiting: new,
                stale: false,
            });
            return Some(start);
        }
        if history.recovered != Some(true) {
            return self.give_up(repair, deliver);
        }
        self.position = Some(after.clone());
        let mut next = None;
        for publication in history.missed.into_iter().chain(repair.waiting) {
            if let Some(read) = self.live(publication, deliver) {
                next = Some(read);
            }
        }
        next.or_else(|| self.reread_if_stale(repair.stale))
    }

    /// The history read could not be made (Redis unreachable through every retry). Delivers
    /// what waited, with the gap (clients see the jump in `seq` and refetch); returns the next
    /// read to issue, if any.
    #[must_use]
    pub(crate) fn read_failed(
        &mut self,
        deliver: &mut impl FnMut(&Publication),
    ) -> Option<Position> {
        let repair = self.repair.take()?;
        self.give_up(repair, deliver)
    }

    /// The group of the first publication held behind a read (the one that revealed a gap).
    pub(crate) fn held_group(&self) -> Option<&Group> {
        let repair = self.repair.as_ref()?;
        repair.waiting.first().map(|p| &p.group)
    }

    /// Holds deliveries (starting with `waiting`) for a read after `after`, which it returns.
    fn hold(&mut self, after: Position, waiting: Vec<Publication>) -> Position {
        metrics::broker_gap_repair();
        self.repair = Some(Repair {
            waiting,
            stale: false,
        });
        after
    }

    /// The gap cannot be filled: delivers on from the cursor, across the gap.
    fn give_up(
        &mut self,
        repair: Repair,
        deliver: &mut impl FnMut(&Publication),
    ) -> Option<Position> {
        metrics::broker_gap_unrecovered();
        self.deliver_skipping_gaps(repair.waiting, deliver);
        self.reread_if_stale(repair.stale)
    }

    /// Delivers `publications` in order from the cursor, accepting jumps in `seq` (and new
    /// epochs) but never a repeat.
    fn deliver_skipping_gaps(
        &mut self,
        publications: Vec<Publication>,
        deliver: &mut impl FnMut(&Publication),
    ) {
        for publication in publications {
            if let Some(last) = &self.position
                && already_reached(last, publication.position.as_ref())
            {
                metrics::broker_duplicate_dropped();
                continue;
            }
            if let Some(next) = &publication.position {
                self.position = Some(next.clone());
            }
            deliver(&publication);
        }
    }

    /// After a reconnect during a read: read again after where delivery now stands.
    fn reread_if_stale(&mut self, stale: bool) -> Option<Position> {
        if stale && self.repair.is_none() {
            self.reconnected()
        } else {
            None
        }
    }
}

#[cfg(test)]
mod tests;
