//! A stateful connection carried from one replica to another: what the replica that holds it
//! leaves in Redis (on drain, or when another replica asks), and what the replica its client
//! came back to reads to go on where it stopped.
//!
//! It is everything the client cannot tell a new connection: who it is, its groups and how far
//! each was sent, the sequence counters both ways and the messages not acknowledged yet (whole
//! WebSocket frames, which do not depend on the connection). Events queued but not yet sent are
//! not carried: the next replica reads them from each group's history after the carried
//! position.

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use bytes::Bytes;
use publisher_lib::contract::{Group, Position};
use serde::{Deserialize, Serialize};

use super::ledger::{Counters, Ledger};
use crate::outbound::Frame;

/// The layout version; a replica refuses a record of another version (the client then
/// reconnects from scratch).
const VERSION: u8 = 1;
/// Largest record read back: the unacknowledged bound (at most a few MiB) with room for the
/// base64 and the groups; anything larger is not ours.
const MAX_RECORD_BYTES: usize = 16 * 1024 * 1024;

/// A stateful connection on its way to another replica.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Carried {
    v: u8,
    /// The user (`sub`) it belongs to.
    pub subject: String,
    groups: Vec<CarriedGroup>,
    counters: Counters,
    unacked: Vec<CarriedFrame>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct CarriedGroup {
    group: String,
    /// Sent up to here; absent when the join had not finished.
    position: Option<Position>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct CarriedFrame {
    id: u64,
    /// The WebSocket frame, base64.
    frame: String,
}

/// A record that is not a carried connection this replica can take.
#[derive(Debug, thiserror::Error)]
pub enum CarryError {
    /// Too large, not JSON of this layout, or another version.
    #[error("not a carried connection: {0}")]
    Invalid(String),
}

impl Carried {
    /// What `subject`'s connection, in `groups`, with `ledger`, carries.
    pub(super) fn new<'a>(
        subject: &str,
        groups: impl Iterator<Item = &'a Group>,
        ledger: &Ledger,
    ) -> Self {
        Self {
            v: VERSION,
            subject: subject.to_owned(),
            groups: groups
                .map(|group| CarriedGroup {
                    group: group.to_string(),
                    position: ledger.position(group).cloned(),
                })
                .collect(),
            counters: ledger.counters(),
            unacked: ledger
                .unacked_with_ids()
                .map(|(id, frame)| CarriedFrame {
                    id,
                    frame: STANDARD.encode(frame.bytes()),
                })
                .collect(),
        }
    }

    /// The record as stored in Redis.
    pub fn to_bytes(&self) -> Vec<u8> {
        // A struct of strings and numbers always serializes.
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// Reads a record stored by [`Carried::to_bytes`].
    ///
    /// # Errors
    /// [`CarryError::Invalid`] when it is too large, malformed, of another version, or names
    /// an invalid group or frame.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, CarryError> {
        if bytes.len() > MAX_RECORD_BYTES {
            return Err(CarryError::Invalid(format!("{} bytes", bytes.len())));
        }
        let carried: Self =
            serde_json::from_slice(bytes).map_err(|e| CarryError::Invalid(e.to_string()))?;
        if carried.v != VERSION {
            return Err(CarryError::Invalid(format!("version {}", carried.v)));
        }
        for group in &carried.groups {
            Group::try_from_name(&group.group).map_err(|e| CarryError::Invalid(e.to_string()))?;
        }
        for frame in &carried.unacked {
            STANDARD
                .decode(&frame.frame)
                .map_err(|e| CarryError::Invalid(e.to_string()))?;
        }
        Ok(carried)
    }

    /// The groups and how far each was sent, and the ledger to go on with (within `limit`
    /// unacknowledged bytes; what was kept is kept, even past it).
    pub(super) fn into_parts(self, limit: usize) -> (Vec<(Group, Option<Position>)>, Ledger) {
        let groups = self
            .groups
            .into_iter()
            .filter_map(|g| Some((Group::try_from_name(&g.group).ok()?, g.position)))
            .collect();
        let unacked = self
            .unacked
            .into_iter()
            .filter_map(|f| {
                let bytes = STANDARD.decode(f.frame).ok()?;
                Some((f.id, Frame::new(Bytes::from(bytes))))
            })
            .collect();
        (groups, Ledger::carried(limit, &self.counters, unacked))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_connection_goes_through_its_record_unchanged() {
        let west = Group::try_dispatch("west").unwrap();
        let east = Group::try_dispatch("east").unwrap();
        let mut ledger = Ledger::new(1_000);
        ledger.joined(&west, Position::new("a".repeat(32), 7));
        ledger.sent(&Frame::new(Bytes::from_static(b"\x81\x02{}")));
        ledger.sent(&Frame::new(Bytes::from_static(b"\x81\x03[1]")));
        ledger.acked(1);
        ledger.received();
        let carried = Carried::new("d-1", [&west, &east].into_iter(), &ledger);
        let read = Carried::from_bytes(&carried.to_bytes()).unwrap();
        assert_eq!(read, carried);
        assert_eq!(read.subject, "d-1");
        let (groups, carried_ledger) = read.into_parts(1_000);
        assert_eq!(
            groups,
            vec![(west, Some(Position::new("a".repeat(32), 7))), (east, None)]
        );
        assert_eq!(carried_ledger.counters(), ledger.counters());
        assert_eq!(carried_ledger.resume_from(), 2);
        let frames: Vec<Bytes> = carried_ledger.unacked().map(Frame::bytes).collect();
        assert_eq!(frames, [Bytes::from_static(b"\x81\x03[1]")]);
    }

    #[test]
    fn records_that_are_not_ours_are_refused() {
        let good = Carried::new("u", std::iter::empty(), &Ledger::new(10)).to_bytes();
        let text = String::from_utf8(good).unwrap();
        for bad in [
            "".to_owned(),
            "{}".to_owned(),
            text.replace("\"v\":1", "\"v\":2"),
            text.replace(
                "\"groups\":[]",
                "\"groups\":[{\"group\":\"/nope\",\"position\":null}]",
            ),
            text.replace(
                "\"unacked\":[]",
                "\"unacked\":[{\"id\":1,\"frame\":\"not base64!\"}]",
            ),
        ] {
            assert!(Carried::from_bytes(bad.as_bytes()).is_err(), "{bad}");
        }
        assert!(Carried::from_bytes(&vec![b' '; MAX_RECORD_BYTES + 1]).is_err());
    }
}
