//! The key exchange of the opening handshake, shared by both sides.

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use sha1::{Digest, Sha1};

/// The GUID RFC 6455 appends to the client's key.
const ACCEPT_GUID: &str = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11";

/// The `Sec-WebSocket-Accept` value that answers a client's `Sec-WebSocket-Key`.
pub fn accept_key(key: &str) -> String {
    let mut sha = Sha1::new();
    sha.update(key.as_bytes());
    sha.update(ACCEPT_GUID.as_bytes());
    STANDARD.encode(sha.finalize())
}

/// Whether `key` is a valid `Sec-WebSocket-Key`: the base64 of 16 bytes (RFC 6455 §4.1).
pub(crate) fn is_valid_client_key(key: &str) -> bool {
    // 16 bytes encode to 24 characters; decoding anything longer is wasted work.
    key.len() == 24 && STANDARD.decode(key).is_ok_and(|nonce| nonce.len() == 16)
}

/// The `Sec-WebSocket-Key` for a client's 16 random bytes.
pub(crate) fn client_key(nonce: [u8; 16]) -> String {
    STANDARD.encode(nonce)
}
