//! Stateful reconnect's bookkeeping for one connection, both directions; pure.
//!
//! Out: every trackable message the server sends gets the next sequence id (from 1) and is
//! kept until the client acknowledges it, within a bound in bytes; a resumed transport starts
//! with a Sequence naming the oldest kept id, then the kept messages again. In: the client's
//! trackable messages are counted the same way, so messages it replays after a resume are
//! recognised and dropped, and the server acknowledges what it processed.

use std::collections::{HashMap, VecDeque};

use publisher_lib::contract::{Group, Position};

use crate::outbound::Frame;

/// What the client did not acknowledge yet, and what the server received.
#[derive(Debug)]
pub(crate) struct Ledger {
    /// Sent and not acknowledged: (sequence id, frame), oldest first.
    unacked: VecDeque<(u64, Frame)>,
    /// Bytes of `unacked`.
    unacked_bytes: usize,
    /// Above this many unacknowledged bytes nothing more is sent until an Ack.
    limit: usize,
    /// The id the next trackable message sent gets.
    next_out: u64,
    /// The id the client's next trackable message has.
    next_in: u64,
    /// The highest id of the client's processed so far.
    processed: u64,
    /// The highest id the server has acknowledged to the client.
    acked_in: u64,
    /// Per group, the position the client has been sent up to: the last event frame written,
    /// or where its join started. A replica carrying the connection on resumes the group after
    /// it.
    positions: HashMap<Group, Position>,
}

/// A ledger's counters and kept messages, to carry a connection to another replica.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct Counters {
    pub(crate) next_out: u64,
    pub(crate) next_in: u64,
    pub(crate) processed: u64,
    pub(crate) acked_in: u64,
}

/// What to do with a trackable message from the client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Incoming {
    /// New: process it.
    Process,
    /// Already processed before the resume: drop it silently.
    Repeat,
}

/// The client's Sequence named an id past what the server received.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("Sequence ID greater than amount of messages we've received.")]
pub(crate) struct SequenceTooFar;

impl Ledger {
    /// An empty ledger keeping at most about `limit` bytes of unacknowledged messages.
    pub(crate) fn new(limit: usize) -> Self {
        Self {
            unacked: VecDeque::new(),
            unacked_bytes: 0,
            limit,
            next_out: 1,
            next_in: 1,
            processed: 0,
            acked_in: 0,
            positions: HashMap::new(),
        }
    }

    /// A ledger continuing `counters`, keeping `unacked` (id, frame), within `limit` bytes.
    pub(crate) fn carried(limit: usize, counters: &Counters, unacked: Vec<(u64, Frame)>) -> Self {
        let unacked_bytes = unacked.iter().map(|(_, frame)| frame.len()).sum();
        Self {
            unacked: unacked.into(),
            unacked_bytes,
            limit,
            next_out: counters.next_out,
            next_in: counters.next_in,
            processed: counters.processed,
            acked_in: counters.acked_in,
            positions: HashMap::new(),
        }
    }

    /// The counters, to carry the connection elsewhere.
    pub(crate) fn counters(&self) -> Counters {
        Counters {
            next_out: self.next_out,
            next_in: self.next_in,
            processed: self.processed,
            acked_in: self.acked_in,
        }
    }

    /// The kept messages with their ids, oldest first.
    pub(crate) fn unacked_with_ids(&self) -> impl Iterator<Item = (u64, &Frame)> {
        self.unacked.iter().map(|(id, frame)| (*id, frame))
    }

    /// `group` was joined: the client has everything up to `position`.
    pub(crate) fn joined(&mut self, group: &Group, position: Position) {
        self.positions.insert(group.clone(), position);
    }

    /// `group` was left.
    pub(crate) fn left(&mut self, group: &Group) {
        self.positions.remove(group);
    }

    /// How far `group` has been sent.
    pub(crate) fn position(&self, group: &Group) -> Option<&Position> {
        self.positions.get(group)
    }

    /// Whether another message may be sent now: below the bound, or nothing kept at all (one
    /// message larger than the bound still goes out, alone).
    pub(crate) fn has_room(&self) -> bool {
        self.unacked.is_empty() || self.unacked_bytes < self.limit
    }

    /// Records a trackable message being sent; returns its sequence id.
    pub(crate) fn sent(&mut self, frame: &Frame) -> u64 {
        let id = self.next_out;
        self.next_out += 1;
        if let Some(tag) = frame.tag()
            && let Some(position) = self.positions.get_mut(&tag.group)
        {
            // Only groups the connection is in; a frame of a group left meanwhile moves nothing.
            *position = tag.position.clone();
        }
        self.unacked_bytes += frame.len();
        self.unacked.push_back((id, frame.clone()));
        id
    }

    /// The client processed everything up to `id`: forget it.
    pub(crate) fn acked(&mut self, id: u64) {
        while let Some((first, frame)) = self.unacked.front() {
            if *first > id {
                break;
            }
            self.unacked_bytes -= frame.len();
            self.unacked.pop_front();
        }
    }

    /// The Sequence id a resumed transport starts with: the oldest kept message, or the next
    /// id when nothing is kept.
    pub(crate) fn resume_from(&self) -> u64 {
        self.unacked.front().map_or(self.next_out, |(id, _)| *id)
    }

    /// The kept messages, oldest first, to send again after the Sequence.
    pub(crate) fn unacked(&self) -> impl Iterator<Item = &Frame> {
        self.unacked.iter().map(|(_, frame)| frame)
    }

    /// Counts a trackable message from the client.
    pub(crate) fn received(&mut self) -> Incoming {
        let id = self.next_in;
        self.next_in += 1;
        if id <= self.processed {
            Incoming::Repeat
        } else {
            self.processed = id;
            Incoming::Process
        }
    }

    /// The client's Sequence on a resumed transport: its next message has id `id`.
    ///
    /// # Errors
    /// [`SequenceTooFar`] when `id` skips messages the server never received.
    pub(crate) fn client_sequence(&mut self, id: u64) -> Result<(), SequenceTooFar> {
        if id > self.processed + 1 {
            return Err(SequenceTooFar);
        }
        self.next_in = id.max(1);
        Ok(())
    }

    /// The id to acknowledge to the client, when it processed something not yet acknowledged.
    pub(crate) fn ack_due(&self) -> Option<u64> {
        (self.processed > self.acked_in).then_some(self.processed)
    }

    /// The Ack for `id` went out.
    pub(crate) fn ack_sent(&mut self, id: u64) {
        self.acked_in = self.acked_in.max(id);
    }

    /// Bytes kept for the client.
    pub(crate) fn unacked_bytes(&self) -> usize {
        self.unacked_bytes
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::*;

    fn frame(n: usize) -> Frame {
        Frame::new(Bytes::from(vec![b'x'; n]))
    }

    #[test]
    fn ids_start_at_one_and_acks_release_in_order() {
        let mut ledger = Ledger::new(1_000);
        assert_eq!(ledger.resume_from(), 1);
        assert_eq!(ledger.sent(&frame(10)), 1);
        assert_eq!(ledger.sent(&frame(20)), 2);
        assert_eq!(ledger.sent(&frame(30)), 3);
        assert_eq!(ledger.unacked_bytes(), 60);
        ledger.acked(2);
        assert_eq!(ledger.resume_from(), 3);
        assert_eq!(ledger.unacked().map(Frame::len).collect::<Vec<_>>(), [30]);
        // An old or repeated Ack changes nothing.
        ledger.acked(1);
        assert_eq!(ledger.unacked_bytes(), 30);
        ledger.acked(3);
        assert_eq!(ledger.unacked_bytes(), 0);
        assert_eq!(ledger.resume_from(), 4, "nothing kept: the next id");
    }

    #[test]
    fn the_bound_stops_sending_until_an_ack() {
        let mut ledger = Ledger::new(25);
        assert!(ledger.has_room());
        ledger.sent(&frame(100));
        assert!(!ledger.has_room(), "over the bound after one large message");
        ledger.acked(1);
        assert!(ledger.has_room());
        ledger.sent(&frame(10));
        ledger.sent(&frame(10));
        assert!(ledger.has_room());
        ledger.sent(&frame(10));
        assert!(!ledger.has_room());
    }

    #[test]
    fn repeats_after_a_client_sequence_are_dropped() {
        let mut ledger = Ledger::new(100);
        assert_eq!(ledger.received(), Incoming::Process);
        assert_eq!(ledger.received(), Incoming::Process);
        assert_eq!(ledger.ack_due(), Some(2));
        ledger.ack_sent(2);
        assert_eq!(ledger.ack_due(), None);
        assert_eq!(ledger.received(), Incoming::Process);
        // The client resumes from 2: it did not see our Ack for 3 and replays 2 and 3.
        assert_eq!(ledger.client_sequence(2), Ok(()));
        assert_eq!(ledger.received(), Incoming::Repeat);
        assert_eq!(ledger.received(), Incoming::Repeat);
        assert_eq!(ledger.received(), Incoming::Process);
        assert_eq!(ledger.ack_due(), Some(4));
    }

    #[test]
    fn positions_follow_the_event_frames_sent_of_joined_groups() {
        let west = Group::try_dispatch("west").unwrap();
        let east = Group::try_dispatch("east").unwrap();
        let at = |seq| Position::new("e".repeat(32), seq);
        let event = |group: &Group, seq| {
            Frame::tagged(
                Bytes::from_static(b"x"),
                crate::outbound::Tag {
                    group: group.clone(),
                    position: at(seq),
                },
            )
        };
        let mut ledger = Ledger::new(100);
        ledger.joined(&west, at(3));
        assert_eq!(ledger.position(&west), Some(&at(3)));
        ledger.sent(&event(&west, 4));
        ledger.sent(&event(&east, 9));
        ledger.sent(&frame(5));
        assert_eq!(ledger.position(&west), Some(&at(4)));
        assert_eq!(ledger.position(&east), None, "not joined");
        ledger.left(&west);
        assert_eq!(ledger.position(&west), None);
    }

    #[test]
    fn a_carried_ledger_continues_the_counters_and_kept_messages() {
        let mut ledger = Ledger::new(1_000);
        ledger.sent(&frame(10));
        ledger.sent(&frame(20));
        ledger.acked(1);
        ledger.received();
        let kept: Vec<(u64, Frame)> = ledger
            .unacked_with_ids()
            .map(|(id, frame)| (id, frame.clone()))
            .collect();
        let mut carried = Ledger::carried(1_000, &ledger.counters(), kept);
        assert_eq!(carried.counters(), ledger.counters());
        assert_eq!(carried.resume_from(), 2);
        assert_eq!(carried.unacked_bytes(), 20);
        assert_eq!(carried.sent(&frame(1)), 3);
        assert_eq!(carried.received(), Incoming::Process);
    }

    #[test]
    fn a_sequence_past_what_was_received_is_refused() {
        let mut ledger = Ledger::new(100);
        assert_eq!(ledger.client_sequence(1), Ok(()), "nothing sent yet");
        ledger.received();
        assert_eq!(ledger.client_sequence(2), Ok(()));
        assert_eq!(ledger.client_sequence(3), Err(SequenceTooFar));
    }
}
