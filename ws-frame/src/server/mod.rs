//! The server side: the upgrade answer, unmasked frames out, masked client frames in.
//!
//! A server frame is never masked, so it does not depend on the connection: build an event's
//! frame once as [`Bytes`] and write the same bytes to every recipient. Incoming frames are
//! checked as RFC 6455 asks of a server (masked, no reserved bits, known opcodes, control frames
//! short and unfragmented, valid close payloads, UTF-8 text) and every check that the header
//! alone can decide is made before the payload is buffered, the size limit included.

use bytes::Bytes;

use crate::close;
use crate::handshake;
use crate::mask;
use crate::{
    FIN, MASKED, MAX_CONTROL_PAYLOAD, OPCODE_BINARY, OPCODE_CLOSE, OPCODE_CONTINUATION,
    OPCODE_PING, OPCODE_PONG, OPCODE_TEXT, RSV,
};

/// Whether a client's `Sec-WebSocket-Key` is valid: the base64 of 16 bytes.
pub fn is_valid_key(key: &str) -> bool {
    handshake::is_valid_client_key(key)
}

/// The complete `101 Switching Protocols` answer to an upgrade request carrying `key`, for a
/// server that writes its HTTP itself.
pub fn switching_protocols(key: &str) -> String {
    format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Accept: {}\r\n\r\n",
        handshake::accept_key(key)
    )
}

/// A complete, unfragmented server frame (FIN set, not masked).
pub fn frame(opcode: u8, payload: &[u8]) -> Bytes {
    let mut out = Vec::with_capacity(payload.len() + 10);
    crate::put_header(&mut out, opcode, payload.len(), 0);
    out.extend_from_slice(payload);
    Bytes::from(out)
}

/// A complete text frame carrying `payload`, which must be UTF-8.
pub fn text_frame(payload: &[u8]) -> Bytes {
    frame(OPCODE_TEXT, payload)
}

/// A complete binary frame carrying `payload`.
pub fn binary_frame(payload: &[u8]) -> Bytes {
    frame(OPCODE_BINARY, payload)
}

/// A close frame with a status code and a reason, cut on a character boundary to fit a
/// control frame.
pub fn close_frame(code: u16, reason: &str) -> Bytes {
    let mut end = reason.len().min(MAX_CONTROL_PAYLOAD - 2);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    let mut payload = Vec::with_capacity(2 + end);
    payload.extend_from_slice(&code.to_be_bytes());
    payload.extend_from_slice(&reason.as_bytes()[..end]);
    frame(OPCODE_CLOSE, &payload)
}

/// The answer to a client's ping, carrying the ping's payload.
pub fn pong_frame(payload: &[u8]) -> Bytes {
    frame(OPCODE_PONG, payload)
}

/// A message from the client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Incoming {
    /// A complete text message (fragments joined), valid UTF-8.
    Text(String),
    /// A complete binary message (fragments joined).
    Binary(Vec<u8>),
    /// A ping; answer with a pong carrying the same payload.
    Ping(Vec<u8>),
    /// A pong; nothing to do.
    Pong,
    /// The client closes, with its status code if it gave one (always a valid one).
    Close(Option<u16>),
}

/// Why the client's bytes are not acceptable WebSocket frames. The connection must be failed
/// with [`FrameError::close_code`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// A client frame without a mask.
    #[error("client frames must be masked")]
    Unmasked,
    /// Reserved bits set without a negotiated extension.
    #[error("reserved bits set")]
    ReservedBits,
    /// An opcode RFC 6455 does not define (3-7, 0xB-0xF).
    #[error("unknown opcode {0}")]
    UnknownOpcode(u8),
    /// A control frame that is fragmented or longer than 125 bytes.
    #[error("malformed control frame")]
    BadControlFrame,
    /// A continuation without a message to continue, or a new message inside a fragmented one.
    #[error("unexpected fragment")]
    UnexpectedFragment,
    /// A close frame whose payload is a single byte: half a status code.
    #[error("close payload of one byte")]
    BadClosePayload,
    /// A close frame with a code that may not be sent (see [`close::is_valid_on_wire`]).
    #[error("invalid close code {0}")]
    InvalidCloseCode(u16),
    /// A message longer than the limit.
    #[error("message larger than the {limit}-byte limit")]
    TooLarge {
        /// The limit in bytes.
        limit: usize,
    },
    /// A text message or a close reason that is not UTF-8.
    #[error("text is not valid UTF-8")]
    InvalidUtf8,
}

impl FrameError {
    /// The close code to fail the connection with: 1009 for a message over the limit, 1007 for
    /// text that is not UTF-8, 1002 for everything else.
    pub fn close_code(&self) -> u16 {
        match self {
            Self::TooLarge { .. } => close::MESSAGE_TOO_BIG,
            Self::InvalidUtf8 => close::INVALID_PAYLOAD,
            Self::Unmasked
            | Self::ReservedBits
            | Self::UnknownOpcode(_)
            | Self::BadControlFrame
            | Self::UnexpectedFragment
            | Self::BadClosePayload
            | Self::InvalidCloseCode(_) => close::PROTOCOL_ERROR,
        }
    }
}

/// What [`Decoder::decode`] found at the start of the buffer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decoded {
    /// The message the frame completed; `None` for a fragment of a longer message.
    pub message: Option<Incoming>,
    /// Bytes the frame used: drop them from the buffer.
    pub used: usize,
}

/// Reads client frames from a byte buffer, joining fragments.
///
/// The decoder keeps only the fragments of an unfinished message; the caller keeps the bytes
/// and drops [`Decoded::used`] of them after each frame.
#[derive(Debug)]
pub struct Decoder {
    limit: usize,
    /// Boxed: fragmented messages are rare, and an idle connection's decoder stays small.
    partial: Option<Box<Partial>>,
}

/// A fragmented message in progress.
#[derive(Debug)]
struct Partial {
    /// Text or binary.
    opcode: u8,
    /// The unmasked payload so far.
    data: Vec<u8>,
    /// For text, how many bytes of `data` are known to be valid UTF-8, so an invalid message
    /// is refused at the fragment that breaks it, not at its end.
    valid_utf8: usize,
}

/// A frame header that passed every check.
struct Header {
    fin: bool,
    opcode: u8,
    mask: [u8; 4],
    /// Header length in bytes, mask included.
    length: usize,
    /// Payload length in bytes, within the limit.
    payload_len: usize,
}

impl Decoder {
    /// A decoder refusing messages (all fragments together) longer than `limit` bytes.
    pub fn new(limit: usize) -> Self {
        Self {
            limit,
            partial: None,
        }
    }

    /// Decodes the frame at the start of `buf`: `Ok(None)` while `buf` does not yet hold a
    /// whole frame. A frame whose header breaks a rule (the size limit included) is refused as
    /// soon as the header is there, before its payload arrives.
    ///
    /// # Errors
    /// [`FrameError`] when the bytes break the protocol; the connection must then be failed.
    pub fn decode(&mut self, buf: &[u8]) -> Result<Option<Decoded>, FrameError> {
        let Some(header) = self.header(buf)? else {
            return Ok(None);
        };
        // Checked although the payload length is within the limit: no arithmetic on lengths
        // from the network is left unchecked.
        let Some(end) = header.length.checked_add(header.payload_len) else {
            return Err(FrameError::TooLarge { limit: self.limit });
        };
        let Some(payload) = buf.get(header.length..end) else {
            return Ok(None);
        };
        let message = self.assemble(&header, payload)?;
        Ok(Some(Decoded { message, used: end }))
    }

    /// Parses and checks the header at the start of `buf`; `Ok(None)` while it is incomplete.
    fn header(&self, buf: &[u8]) -> Result<Option<Header>, FrameError> {
        let [first, second, ..] = *buf else {
            return Ok(None);
        };
        if first & RSV != 0 {
            return Err(FrameError::ReservedBits);
        }
        let opcode = first & 0x0F;
        if !crate::is_known_opcode(opcode) {
            return Err(FrameError::UnknownOpcode(opcode));
        }
        if second & MASKED == 0 {
            return Err(FrameError::Unmasked);
        }
        let fin = first & FIN != 0;
        let Some((payload_len, length)) = crate::payload_length(second, buf) else {
            return Ok(None);
        };
        if crate::is_control(opcode) {
            if !fin || payload_len > MAX_CONTROL_PAYLOAD as u64 {
                return Err(FrameError::BadControlFrame);
            }
        } else {
            let pending = match (&self.partial, opcode) {
                (None, OPCODE_CONTINUATION) | (Some(_), OPCODE_TEXT | OPCODE_BINARY) => {
                    return Err(FrameError::UnexpectedFragment);
                }
                (Some(partial), _) => partial.data.len(),
                (None, _) => 0,
            };
            // Compare with what is left of the limit: `pending + payload_len` can wrap.
            let room = self.limit.saturating_sub(pending);
            if payload_len > room as u64 {
                return Err(FrameError::TooLarge { limit: self.limit });
            }
        }
        let Some(&[a, b, c, d]) = buf.get(length..length + 4) else {
            return Ok(None);
        };
        Ok(Some(Header {
            fin,
            opcode,
            mask: [a, b, c, d],
            length: length + 4,
            // Within the limit (a data frame) or 125 (a control frame), so it fits.
            payload_len: usize::try_from(payload_len)
                .map_err(|_| FrameError::TooLarge { limit: self.limit })?,
        }))
    }

    /// Unmasks the payload and completes a message with it, if it is the last frame of one.
    fn assemble(&mut self, header: &Header, masked: &[u8]) -> Result<Option<Incoming>, FrameError> {
        match header.opcode {
            OPCODE_TEXT | OPCODE_BINARY => {
                let mut data = masked.to_vec();
                mask::apply(&mut data, header.mask);
                if header.fin {
                    return complete(header.opcode, data).map(Some);
                }
                let valid_utf8 = if header.opcode == OPCODE_TEXT {
                    valid_utf8_prefix(&data, 0)?
                } else {
                    0
                };
                self.partial = Some(Box::new(Partial {
                    opcode: header.opcode,
                    data,
                    valid_utf8,
                }));
                Ok(None)
            }
            OPCODE_CONTINUATION => {
                // The header check made sure a message is in progress.
                let Some(mut partial) = self.partial.take() else {
                    return Err(FrameError::UnexpectedFragment);
                };
                let start = partial.data.len();
                partial.data.extend_from_slice(masked);
                mask::apply(&mut partial.data[start..], header.mask);
                if header.fin {
                    return complete(partial.opcode, partial.data).map(Some);
                }
                if partial.opcode == OPCODE_TEXT {
                    partial.valid_utf8 = valid_utf8_prefix(&partial.data, partial.valid_utf8)?;
                }
                self.partial = Some(partial);
                Ok(None)
            }
            OPCODE_CLOSE => {
                let mut payload = masked.to_vec();
                mask::apply(&mut payload, header.mask);
                close_message(&payload).map(Some)
            }
            OPCODE_PING => {
                let mut payload = masked.to_vec();
                mask::apply(&mut payload, header.mask);
                Ok(Some(Incoming::Ping(payload)))
            }
            OPCODE_PONG => Ok(Some(Incoming::Pong)),
            // The header check refused every other opcode.
            other => Err(FrameError::UnknownOpcode(other)),
        }
    }
}

/// A whole message from its opcode and unmasked payload.
fn complete(opcode: u8, payload: Vec<u8>) -> Result<Incoming, FrameError> {
    if opcode == OPCODE_BINARY {
        return Ok(Incoming::Binary(payload));
    }
    String::from_utf8(payload)
        .map(Incoming::Text)
        .map_err(|_| FrameError::InvalidUtf8)
}

/// How much of `data` is valid UTF-8, given that `data[..from]` is: an error only when a byte
/// sequence is invalid, not when the data ends inside a character (the next fragment may
/// finish it).
fn valid_utf8_prefix(data: &[u8], from: usize) -> Result<usize, FrameError> {
    match std::str::from_utf8(&data[from..]) {
        Ok(_) => Ok(data.len()),
        Err(e) if e.error_len().is_none() => Ok(from + e.valid_up_to()),
        Err(_) => Err(FrameError::InvalidUtf8),
    }
}

/// The client's close, checked: no payload, or a valid code and a UTF-8 reason.
fn close_message(payload: &[u8]) -> Result<Incoming, FrameError> {
    let Some(code) = close::code_of(payload) else {
        return if payload.is_empty() {
            Ok(Incoming::Close(None))
        } else {
            Err(FrameError::BadClosePayload)
        };
    };
    if !close::is_valid_on_wire(code) {
        return Err(FrameError::InvalidCloseCode(code));
    }
    if std::str::from_utf8(&payload[2..]).is_err() {
        return Err(FrameError::InvalidUtf8);
    }
    Ok(Incoming::Close(Some(code)))
}

#[cfg(test)]
mod tests;
