//! A position in a group's history: which history (`epoch`) and how far into it (`seq`).
//!
//! The publish script in Redis (or the gateway's in-process broker) assigns positions; this
//! module only names them. An epoch is opaque: two positions compare only when their epochs are
//! equal, and a new epoch means the group's history started again.

use serde::{Deserialize, Serialize};

/// Where an event stands in one group's history.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Position {
    /// The id of the group's history (a UUID v4 in simple form: 32 lowercase hex characters).
    pub epoch: String,
    /// The event's number in that history: the first event is 1, each next one adds 1.
    pub seq: u64,
}

impl Position {
    /// A position `seq` in history `epoch`.
    pub fn new(epoch: impl Into<String>, seq: u64) -> Self {
        Self {
            epoch: epoch.into(),
            seq,
        }
    }
}
