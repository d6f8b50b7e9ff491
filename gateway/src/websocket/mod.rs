//! The WebSocket wire format (RFC 6455), server side: the upgrade's accept key, frames out,
//! frames in.
//!
//! Pure: bytes in, bytes and messages out. The gateway frames its own WebSocket so that an
//! event's frame is built once and the same bytes go to every recipient: a server frame is
//! never masked, so it does not depend on the connection. Incoming frames are checked as the RFC
//! asks of a server (masked, no reserved bits, control frames short and unfragmented) and limited
//! in size before their payload is read. Extensions (compression) are not negotiated.

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use bytes::Bytes;
use sha1::{Digest, Sha1};

/// The GUID RFC 6455 appends to the client's key.
const ACCEPT_GUID: &str = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11";

const OPCODE_CONTINUATION: u8 = 0x0;
const OPCODE_TEXT: u8 = 0x1;
const OPCODE_BINARY: u8 = 0x2;
const OPCODE_CLOSE: u8 = 0x8;
const OPCODE_PING: u8 = 0x9;
const OPCODE_PONG: u8 = 0xA;
const FIN: u8 = 0x80;

/// The `Sec-WebSocket-Accept` value for a client's `Sec-WebSocket-Key`.
pub fn accept_key(key: &str) -> String {
    let mut sha = Sha1::new();
    sha.update(key.as_bytes());
    sha.update(ACCEPT_GUID.as_bytes());
    STANDARD.encode(sha.finalize())
}

/// A complete, unfragmented text frame carrying `payload`.
pub fn text_frame(payload: &[u8]) -> Bytes {
    frame(OPCODE_TEXT, payload)
}

/// A close frame with a status code and a short reason (cut to fit a control frame).
pub fn close_frame(code: u16, reason: &str) -> Bytes {
    let mut payload = code.to_be_bytes().to_vec();
    let mut end = reason.len().min(123);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    payload.extend_from_slice(&reason.as_bytes()[..end]);
    frame(OPCODE_CLOSE, &payload)
}

/// The answer to a client's ping.
pub fn pong_frame(payload: &[u8]) -> Bytes {
    frame(OPCODE_PONG, payload)
}

fn frame(opcode: u8, payload: &[u8]) -> Bytes {
    let mut out = Vec::with_capacity(payload.len() + 10);
    out.push(FIN | opcode);
    match payload.len() {
        len @ 0..=125 => out.push(len as u8),
        len @ 126..=0xFFFF => {
            out.push(126);
            out.extend_from_slice(&(len as u16).to_be_bytes());
        }
        len => {
            out.push(127);
            out.extend_from_slice(&(len as u64).to_be_bytes());
        }
    }
    out.extend_from_slice(payload);
    Bytes::from(out)
}

/// A message from the client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Incoming {
    /// A complete text message (fragments joined).
    Text(String),
    /// A binary message; the JSON hub protocol has none.
    Binary,
    /// A ping; answer with a pong carrying the same payload.
    Ping(Vec<u8>),
    /// A pong; nothing to do.
    Pong,
    /// The client closes, with its status code if it gave one.
    Close(Option<u16>),
}

/// Why the client's bytes are not acceptable WebSocket frames.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// A client frame without a mask.
    #[error("client frames must be masked")]
    Unmasked,
    /// Reserved bits set without a negotiated extension.
    #[error("reserved bits set")]
    ReservedBits,
    /// An opcode RFC 6455 does not define.
    #[error("unknown opcode {0}")]
    UnknownOpcode(u8),
    /// A control frame that is fragmented or longer than 125 bytes.
    #[error("malformed control frame")]
    BadControlFrame,
    /// A continuation without a message to continue, or a new message inside a fragmented one.
    #[error("unexpected fragment")]
    UnexpectedFragment,
    /// A message longer than the limit.
    #[error("message larger than the {limit}-byte limit")]
    TooLarge {
        /// The limit in bytes.
        limit: usize,
    },
    /// A text message that is not UTF-8.
    #[error("text message is not valid UTF-8")]
    InvalidUtf8,
}

/// Reads client frames from a byte buffer, joining fragments.
#[derive(Debug)]
pub struct Decoder {
    limit: usize,
    fragments: Option<(u8, Vec<u8>)>,
}

impl Decoder {
    /// A decoder refusing messages longer than `limit` bytes.
    pub fn new(limit: usize) -> Self {
        Self {
            limit,
            fragments: None,
        }
    }

    /// Decodes the frame at the start of `buf`: `Ok(None)` when `buf` does not yet hold a whole
    /// frame, otherwise the bytes the frame used and the message it completed (`None` for a
    /// fragment of a longer message). A frame whose header announces more than the limit is
    /// refused before its payload arrives.
    ///
    /// # Errors
    /// [`FrameError`] when the bytes break the protocol; the connection must then be closed.
    pub fn decode(&mut self, buf: &[u8]) -> Result<Option<(Option<Incoming>, usize)>, FrameError> {
        let Some((header, payload_len)) = header(buf)? else {
            return Ok(None);
        };
        let pending = self.fragments.as_ref().map_or(0, |(_, data)| data.len());
        if header.opcode & 0x8 != 0 && (payload_len > 125 || !header.fin) {
            return Err(FrameError::BadControlFrame);
        }
        if pending as u64 + payload_len > self.limit as u64 {
            return Err(FrameError::TooLarge { limit: self.limit });
        }
        let start = header.length;
        let end = start + payload_len as usize;
        if buf.len() < end {
            return Ok(None);
        }
        let mut payload = buf[start..end].to_vec();
        for (i, byte) in payload.iter_mut().enumerate() {
            *byte ^= header.mask[i % 4];
        }
        let message = self.assemble(header.fin, header.opcode, payload)?;
        Ok(Some((message, end)))
    }

    fn assemble(
        &mut self,
        fin: bool,
        opcode: u8,
        payload: Vec<u8>,
    ) -> Result<Option<Incoming>, FrameError> {
        match opcode {
            OPCODE_CLOSE | OPCODE_PING | OPCODE_PONG => {
                if !fin || payload.len() > 125 {
                    return Err(FrameError::BadControlFrame);
                }
                Ok(Some(match opcode {
                    OPCODE_CLOSE => Incoming::Close(
                        (payload.len() >= 2).then(|| u16::from_be_bytes([payload[0], payload[1]])),
                    ),
                    OPCODE_PING => Incoming::Ping(payload),
                    _ => Incoming::Pong,
                }))
            }
            OPCODE_TEXT | OPCODE_BINARY => {
                if self.fragments.is_some() {
                    return Err(FrameError::UnexpectedFragment);
                }
                if fin {
                    return complete(opcode, payload).map(Some);
                }
                self.fragments = Some((opcode, payload));
                Ok(None)
            }
            OPCODE_CONTINUATION => {
                let Some((first, mut data)) = self.fragments.take() else {
                    return Err(FrameError::UnexpectedFragment);
                };
                data.extend_from_slice(&payload);
                if fin {
                    return complete(first, data).map(Some);
                }
                self.fragments = Some((first, data));
                Ok(None)
            }
            other => Err(FrameError::UnknownOpcode(other)),
        }
    }
}

struct Header {
    fin: bool,
    opcode: u8,
    mask: [u8; 4],
    /// Header length in bytes, mask included.
    length: usize,
}

/// Parses a frame header; `Ok(None)` when `buf` is too short for it.
fn header(buf: &[u8]) -> Result<Option<(Header, u64)>, FrameError> {
    let [first, second, ..] = *buf else {
        return Ok(None);
    };
    if first & 0x70 != 0 {
        return Err(FrameError::ReservedBits);
    }
    if second & 0x80 == 0 {
        return Err(FrameError::Unmasked);
    }
    let (payload_len, mut length) = match second & 0x7F {
        126 => {
            let Some(bytes) = buf.get(2..4) else {
                return Ok(None);
            };
            (u64::from(u16::from_be_bytes([bytes[0], bytes[1]])), 4)
        }
        127 => {
            let Some(bytes) = buf.get(2..10) else {
                return Ok(None);
            };
            let mut wide = [0u8; 8];
            wide.copy_from_slice(bytes);
            (u64::from_be_bytes(wide), 10)
        }
        len => (u64::from(len), 2),
    };
    let Some(mask) = buf.get(length..length + 4) else {
        return Ok(None);
    };
    let mask = [mask[0], mask[1], mask[2], mask[3]];
    length += 4;
    Ok(Some((
        Header {
            fin: first & FIN != 0,
            opcode: first & 0x0F,
            mask,
            length,
        },
        payload_len,
    )))
}

fn complete(opcode: u8, payload: Vec<u8>) -> Result<Incoming, FrameError> {
    if opcode == OPCODE_BINARY {
        return Ok(Incoming::Binary);
    }
    String::from_utf8(payload)
        .map(Incoming::Text)
        .map_err(|_| FrameError::InvalidUtf8)
}

#[cfg(test)]
mod tests;
