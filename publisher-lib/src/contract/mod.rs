//! The real-time contract: events, their validation, groups and routing, and the names and
//! default bounds of a group's keys in Redis.
//!
//! Pure: it imports nothing but serde, uuid and chrono, does no I/O and knows nothing of
//! SignalR framing, sockets or Redis. Both the gateway and every publishing backend use it, so an
//! event is judged by the same rules wherever it enters.

mod envelope;
mod event;
mod group;
mod keys;
mod position;
mod shard;
mod validate;

pub use envelope::{ENVELOPE_VERSION, Envelope, EnvelopeError};
pub use event::{Event, EventKind, JobAssigned, RecommendationReady, Source};
pub use group::{Group, GroupKind, InvalidGroup, MAX_GROUP_ID_LEN};
pub use keys::{
    DEFAULT_HISTORY_SIZE, DEFAULT_HISTORY_TTL, DEFAULT_IDEMPOTENCY_WINDOW, DEFAULT_PREFIX,
    MAX_IDEMPOTENCY_KEY_LEN, check_idempotency_key, check_prefix,
};
pub use position::Position;
pub use shard::shard_of;
pub use validate::{MAX_EVENT_BYTES, ValidationError};

#[cfg(test)]
mod tests;
