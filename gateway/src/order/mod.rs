//! Ordering and resume: the pure decisions that make each client get each event once and in
//! order. Nothing here does I/O, awaits or reads a clock; the runtime shells around it are
//! `broker/repair.rs` (issues the history reads) and `groups` (locks, queues, fan-out).
//!
//! Two positions matter per group, and each has its state machine here:
//! - `sequencer::Sequencer`, the replica's own cursor: what the broker received becomes what
//!   fan-out gets, each publication once in `seq` order, gaps filled from the history. Both
//!   brokers drive it (the in-process one never has a gap, so it passes everything on).
//! - [`member`], each joining client's resume: the live frames held while its history is read,
//!   the cut at the head that read returned, and the floor that keeps a late delivery of the
//!   cursor from reaching the client twice.
//!
//! Both rest on one rule, [`already_reached`]: within an epoch a position at or before another
//! is old news; across epochs nothing is.

pub mod member;
pub(crate) mod sequencer;

use publisher_lib::contract::Position;

/// Whether `position` was already reached by someone standing at `at`: same epoch, `seq` at or
/// before. A publication without a position (an old publisher) or of another epoch never was.
pub fn already_reached(at: &Position, position: Option<&Position>) -> bool {
    position.is_some_and(|p| p.epoch == at.epoch && p.seq <= at.seq)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_position_is_reached_only_within_its_epoch_at_or_before_the_mark() {
        let at = Position::new("e1", 5);
        assert!(already_reached(&at, Some(&Position::new("e1", 5))));
        assert!(already_reached(&at, Some(&Position::new("e1", 1))));
        assert!(!already_reached(&at, Some(&Position::new("e1", 6))));
        assert!(!already_reached(&at, Some(&Position::new("e2", 1))));
        assert!(!already_reached(&at, None));
    }
}
