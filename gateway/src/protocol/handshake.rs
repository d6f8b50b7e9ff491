//! The first record of every connection: `{"protocol":"json","version":1}`.

use serde::Deserialize;

use super::codec::{record, without_position};

/// The highest protocol version accepted. Version 2 is what a client asking for stateful
/// reconnect sends; without a negotiated stateful reconnect it behaves exactly like version 1.
pub const MAX_VERSION: u64 = 2;

/// The reply to a handshake that succeeded: `{}` + RS. It never carries a `type`.
pub const ACCEPTED: &str = "{}\u{1e}";

/// Why a handshake was refused; the message is what the client shows, worded as ASP.NET does.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HandshakeError {
    /// Not a handshake request at all.
    #[error("Handshake request is malformed: {0}")]
    Malformed(String),
    /// Another protocol than `json` (MessagePack is not spoken).
    #[error("The protocol '{0}' is not supported.")]
    UnsupportedProtocol(String),
    /// A version above [`MAX_VERSION`].
    #[error("The server does not support version {0} of the 'json' protocol.")]
    UnsupportedVersion(u64),
    /// The client took too long, or sent too much before completing it.
    #[error("Handshake was canceled.")]
    Canceled,
    /// The server began shutting down before the handshake completed.
    #[error("The server is shutting down.")]
    ShuttingDown,
}

impl HandshakeError {
    /// Low-cardinality label for metrics and logs.
    pub fn label(&self) -> &'static str {
        match self {
            Self::Malformed(_) => "malformed",
            Self::UnsupportedProtocol(_) => "unsupported_protocol",
            Self::UnsupportedVersion(_) => "unsupported_version",
            Self::Canceled => "timeout",
            Self::ShuttingDown => "shutting_down",
        }
    }

    /// The reply record that tells the client why: `{"error":…}` + RS.
    pub fn reply(&self) -> String {
        record(&serde_json::json!({ "error": self.to_string() }))
    }
}

/// Checks a handshake request record (without its separator).
///
/// # Errors
/// [`HandshakeError`] when it is malformed or asks for something other than JSON version 1 or 2.
pub fn accept(record: &str) -> Result<(), HandshakeError> {
    #[derive(Deserialize)]
    struct Request {
        protocol: String,
        version: u64,
    }
    // serde would also read a struct from an array; a handshake is an object.
    if !record.trim_start().starts_with('{') {
        return Err(HandshakeError::Malformed(
            "expected a JSON object".to_owned(),
        ));
    }
    let request: Request = serde_json::from_str(record)
        .map_err(|e| HandshakeError::Malformed(without_position(&e)))?;
    if request.protocol != "json" {
        return Err(HandshakeError::UnsupportedProtocol(request.protocol));
    }
    if request.version > MAX_VERSION {
        return Err(HandshakeError::UnsupportedVersion(request.version));
    }
    Ok(())
}
