//! The SignalR JSON hub protocol, as far as this gateway speaks it.
//!
//! Pure: turns text into [`Message`]s and messages into bytes, and knows the handshake and the
//! close reasons. It does no I/O and never sees tokio, axum or Redis. Only this module defines
//! what travels on the WebSocket; MessagePack and stateful reconnect are not spoken (negotiate
//! never offers them).

pub mod close;
pub mod codec;
pub mod frames;
pub mod handshake;

pub use close::CloseReason;
pub use codec::{Message, ProtocolError, RecordBuffer};
pub use frames::{GroupPosition, JoinResult};

/// The byte that ends every record of the JSON hub protocol.
pub const RECORD_SEPARATOR: char = '\u{1e}';

#[cfg(test)]
mod tests;
