//! The client side: the upgrade request and the check of its answer, masked frames out, server
//! frames read in place.
//!
//! Server frames are read without copying: [`next_frame`] borrows the payload from the
//! caller's buffer, so a client holding thousands of connections pays no allocation per frame.
//! Fragmented server messages are reported as [`FrameError::Fragmented`] rather than joined:
//! the clients in this workspace talk to the gateway, which never fragments.

use crate::{
    FIN, MASKED, MAX_CONTROL_PAYLOAD, OPCODE_BINARY, OPCODE_CLOSE, OPCODE_CONTINUATION,
    OPCODE_PING, OPCODE_PONG, OPCODE_TEXT, RSV, handshake, mask,
};

/// Largest upgrade answer (status line and headers) [`upgrade_response`] waits for.
pub const MAX_RESPONSE_HEAD: usize = 8192;

/// Largest server frame payload accepted.
pub const MAX_FRAME_PAYLOAD: usize = 16 << 20;

/// The `Sec-WebSocket-Key` for 16 random bytes.
pub fn key(nonce: [u8; 16]) -> String {
    handshake::client_key(nonce)
}

/// The upgrade request for `path` (with its query) on `host`.
///
/// # Errors
/// When `origin` holds characters a header value cannot carry.
pub fn upgrade_request(
    host: &str,
    path: &str,
    key: &str,
    origin: Option<&str>,
) -> Result<String, String> {
    let mut request = format!(
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
    );
    if let Some(origin) = origin {
        if origin.bytes().any(|b| b.is_ascii_control()) {
            return Err("origin: invalid header value".to_owned());
        }
        request.push_str("Origin: ");
        request.push_str(origin);
        request.push_str("\r\n");
    }
    request.push_str("\r\n");
    Ok(request)
}

/// Checks the server's answer to the upgrade request sent with `key`.
///
/// Returns `Ok(None)` while the head is incomplete, `Ok(Some(len))` once a valid `101` head of
/// `len` bytes is in `buf` (what follows is frames).
///
/// # Errors
/// A short description when the answer is not a valid `101` (for another status:
/// `HTTP <status line>`).
pub fn upgrade_response(buf: &[u8], key: &str) -> Result<Option<usize>, String> {
    let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
        return if buf.len() > MAX_RESPONSE_HEAD {
            Err("response head too large".to_owned())
        } else {
            Ok(None)
        };
    };
    let head = std::str::from_utf8(&buf[..end]).map_err(|_| "response head not UTF-8")?;
    let mut lines = head.split("\r\n");
    let status = lines.next().unwrap_or_default();
    let Some(outcome) = status.strip_prefix("HTTP/1.1 ") else {
        return Err(format!("bad status line {status:?}"));
    };
    if outcome != "101" && !outcome.starts_with("101 ") {
        return Err(format!("HTTP {}", outcome.trim()));
    }
    let (mut upgrade, mut connection, mut accept) = (false, false, false);
    let expected = handshake::accept_key(key);
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        let value = value.trim();
        if name.eq_ignore_ascii_case("upgrade") {
            upgrade = value.eq_ignore_ascii_case("websocket");
        } else if name.eq_ignore_ascii_case("connection") {
            connection = value
                .split(',')
                .any(|token| token.trim().eq_ignore_ascii_case("upgrade"));
        } else if name.eq_ignore_ascii_case("sec-websocket-accept") {
            accept = value == expected;
        }
    }
    match (upgrade, connection, accept) {
        (true, true, true) => Ok(Some(end + 4)),
        (false, _, _) => Err("no Upgrade: websocket".to_owned()),
        (_, false, _) => Err("no Connection: upgrade".to_owned()),
        (_, _, false) => Err("wrong Sec-WebSocket-Accept".to_owned()),
    }
}

/// A complete client frame: FIN, `opcode`, `payload` masked with `mask`.
pub fn frame(opcode: u8, payload: &[u8], mask: [u8; 4]) -> Vec<u8> {
    let mut out = Vec::with_capacity(payload.len() + 14);
    crate::put_header(&mut out, opcode, payload.len(), MASKED);
    out.extend_from_slice(&mask);
    let start = out.len();
    out.extend_from_slice(payload);
    mask::apply(&mut out[start..], mask);
    out
}

/// A server frame whose header is complete.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHead {
    /// The frame's opcode.
    pub opcode: u8,
    /// Header bytes before the payload.
    pub header_len: usize,
    /// Payload bytes.
    pub payload_len: usize,
}

impl FrameHead {
    /// Header and payload bytes.
    pub fn total_len(self) -> usize {
        self.header_len + self.payload_len
    }
}

/// A server frame the client does not accept.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// RSV bits set: no extension was negotiated.
    #[error("reserved bits set")]
    Reserved,
    /// A masked server frame.
    #[error("masked server frame")]
    Masked,
    /// A fragment (FIN clear, or a continuation).
    #[error("fragmented message")]
    Fragmented,
    /// An opcode RFC 6455 does not define.
    #[error("unknown opcode {0:#x}")]
    UnknownOpcode(u8),
    /// A control frame longer than 125 bytes.
    #[error("control frame over 125 bytes")]
    LongControl,
    /// More than [`MAX_FRAME_PAYLOAD`] bytes.
    #[error("frame of {0} bytes")]
    TooLarge(u64),
}

/// Reads the header of the server frame at the start of `buf`: `Ok(None)` while the header is
/// incomplete (the payload may still be, too: compare `total_len` with what is buffered).
///
/// # Errors
/// [`FrameError`] when the frame is not one a server may send, or is over
/// [`MAX_FRAME_PAYLOAD`].
pub fn frame_head(buf: &[u8]) -> Result<Option<FrameHead>, FrameError> {
    let [first, second, ..] = *buf else {
        return Ok(None);
    };
    if first & RSV != 0 {
        return Err(FrameError::Reserved);
    }
    if second & MASKED != 0 {
        return Err(FrameError::Masked);
    }
    let opcode = first & 0x0F;
    match opcode {
        OPCODE_CONTINUATION => return Err(FrameError::Fragmented),
        OPCODE_TEXT | OPCODE_BINARY | OPCODE_CLOSE | OPCODE_PING | OPCODE_PONG => {}
        other => return Err(FrameError::UnknownOpcode(other)),
    }
    if first & FIN == 0 {
        return Err(FrameError::Fragmented);
    }
    let Some((payload_len, header_len)) = crate::payload_length(second, buf) else {
        return Ok(None);
    };
    if crate::is_control(opcode) && payload_len > MAX_CONTROL_PAYLOAD as u64 {
        return Err(FrameError::LongControl);
    }
    let payload_len = usize::try_from(payload_len)
        .ok()
        .filter(|&len| len <= MAX_FRAME_PAYLOAD)
        .ok_or(FrameError::TooLarge(payload_len))?;
    Ok(Some(FrameHead {
        opcode,
        header_len,
        payload_len,
    }))
}

/// A complete server frame in a buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Frame<'a> {
    /// The frame's opcode.
    pub opcode: u8,
    /// Its payload.
    pub payload: &'a [u8],
    /// Header and payload bytes.
    pub len: usize,
}

/// The complete server frame at the start of `buf`; `Ok(None)` while it is incomplete.
///
/// # Errors
/// As [`frame_head`].
pub fn next_frame(buf: &[u8]) -> Result<Option<Frame<'_>>, FrameError> {
    Ok(frame_head(buf)?
        .filter(|head| head.total_len() <= buf.len())
        .map(|head| Frame {
            opcode: head.opcode,
            payload: &buf[head.header_len..head.total_len()],
            len: head.total_len(),
        }))
}

#[cfg(test)]
mod tests;
