//! Why the server ends a connection, and what it tells the client.

use super::codec::{ProtocolError, encode_close};
use super::handshake::HandshakeError;

/// Why a connection ended. Each reason has a metrics label, a message for the client, and a
/// decision on whether the client should reconnect.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CloseReason {
    /// The gateway is shutting down or draining; another replica will take the client.
    ServerShutdown,
    /// The client's outbound queue filled up or a write timed out.
    SlowConsumer,
    /// Nothing was received from the client within the client timeout.
    ClientTimeout,
    /// The client's token expired; it reconnects with a fresh one from its factory.
    TokenExpired,
    /// The client sent something that is not the JSON hub protocol.
    Protocol(ProtocolError),
    /// The handshake failed or did not finish in time.
    Handshake(HandshakeError),
    /// The client sent a Close message or a WebSocket close frame.
    ClientClosed,
    /// The client kept invoking far past its rate limit; reconnecting at once would not help.
    Flooding,
    /// The socket went away without a close from the client (reset, end of stream, a failed
    /// write): nothing more can be sent on it. A stateful connection waits to be resumed.
    TransportLost,
    /// A stateful connection was left in Redis for the replica its client comes back to.
    HandedOver,
    /// A stateful connection carried to this replica could not pick up every group where it
    /// stopped (the history moved on, or the broker failed): the client starts over.
    ResumeGap,
}

impl CloseReason {
    /// Low-cardinality label for metrics and logs.
    pub fn label(&self) -> &'static str {
        match self {
            Self::ServerShutdown => "server_shutdown",
            Self::SlowConsumer => "slow_consumer",
            Self::ClientTimeout => "client_timeout",
            Self::TokenExpired => "token_expired",
            Self::Protocol(e) => e.label(),
            Self::Handshake(_) => "handshake",
            Self::ClientClosed => "client_closed",
            Self::TransportLost => "transport_lost",
            Self::HandedOver => "handed_over",
            Self::ResumeGap => "resume_gap",
            Self::Flooding => "flooding",
        }
    }

    /// Whether the client should come back. Transient conditions allow it; a client that
    /// speaks the protocol wrongly would only fail again.
    pub fn allows_reconnect(&self) -> bool {
        matches!(
            self,
            Self::ServerShutdown
                | Self::SlowConsumer
                | Self::ClientTimeout
                | Self::TokenExpired
                | Self::ResumeGap
        )
    }

    /// The text the client sees as `Server returned an error on close: <text>`.
    pub fn message(&self) -> String {
        match self {
            Self::ServerShutdown => "server is shutting down; reconnect".to_owned(),
            Self::SlowConsumer => "client could not keep up with its messages".to_owned(),
            Self::ClientTimeout => {
                "no message received from the client within the client timeout".to_owned()
            }
            Self::TokenExpired => "access token expired; reconnect with a fresh one".to_owned(),
            Self::Protocol(e) => e.to_string(),
            Self::Handshake(e) => e.to_string(),
            Self::ClientClosed => "client closed the connection".to_owned(),
            Self::TransportLost => "the connection was lost".to_owned(),
            Self::HandedOver => "the connection moves to another replica".to_owned(),
            Self::ResumeGap => {
                "the connection could not be carried over without losing events; reconnect"
                    .to_owned()
            }
            Self::Flooding => "too many invocations, far past the limit; slow down".to_owned(),
        }
    }

    /// The Close record for this reason: `{"type":7,"error":…,"allowReconnect":…}` + RS.
    pub fn record(&self) -> String {
        encode_close(&self.message(), self.allows_reconnect())
    }

    /// The WebSocket close code sent after the Close record.
    pub fn ws_code(&self) -> u16 {
        match self {
            Self::ServerShutdown | Self::Handshake(HandshakeError::ShuttingDown) => 1001,
            Self::SlowConsumer | Self::ClientTimeout | Self::TokenExpired => 1000,
            Self::Protocol(ProtocolError::TooLarge { .. }) => 1009,
            Self::Protocol(ProtocolError::Binary) => 1003,
            Self::Protocol(ProtocolError::BadFrame(e)) => e.close_code(),
            Self::Protocol(_) | Self::Handshake(_) | Self::Flooding => 1008,
            Self::ClientClosed => 1000,
            // Only a best-effort close frame on a socket that is likely gone; a client still
            // there resumes on another replica.
            Self::TransportLost | Self::HandedOver => 1001,
            Self::ResumeGap => 1000,
        }
    }
}
