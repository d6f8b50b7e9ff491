//! The WebSocket wire format (RFC 6455) without I/O: bytes in, bytes and messages out.
//!
//! One implementation for every part of the workspace that speaks WebSocket itself:
//!
//! - [`server`]: what a server needs. The upgrade's accept key and key check, unmasked frames
//!   out (built once as [`bytes::Bytes`], so one event frame can go to many sockets), and a
//!   [`server::Decoder`] for masked client frames that joins fragments, checks UTF-8 and close
//!   payloads, and refuses a message over its size limit from the frame header alone.
//! - [`client`]: what a client needs. The upgrade request and the check of its `101` answer,
//!   masked frames out, and the reading of server frames in place, without copying.
//! - [`close`]: close codes: which ones may travel on the wire.
//!
//! Nothing here reads or writes a socket, spawns a task or knows about tokio: the caller owns
//! the buffers and the I/O. Extensions (permessage-deflate) are not negotiated, so reserved bits
//! are always an error.

pub mod client;
pub mod close;
pub mod server;

mod handshake;
mod mask;

pub use handshake::accept_key;

/// A continuation frame: the next part of a fragmented message.
pub const OPCODE_CONTINUATION: u8 = 0x0;
/// A text frame (UTF-8).
pub const OPCODE_TEXT: u8 = 0x1;
/// A binary frame.
pub const OPCODE_BINARY: u8 = 0x2;
/// A close frame.
pub const OPCODE_CLOSE: u8 = 0x8;
/// A ping frame.
pub const OPCODE_PING: u8 = 0x9;
/// A pong frame.
pub const OPCODE_PONG: u8 = 0xA;

/// Largest payload of a control frame (close, ping, pong).
pub const MAX_CONTROL_PAYLOAD: usize = 125;

/// The FIN bit of a frame's first byte: the last frame of a message.
const FIN: u8 = 0x80;
/// The three reserved bits of a frame's first byte, for extensions.
const RSV: u8 = 0x70;
/// The MASK bit of a frame's second byte.
const MASKED: u8 = 0x80;

/// Whether `opcode` is one RFC 6455 defines.
fn is_known_opcode(opcode: u8) -> bool {
    matches!(
        opcode,
        OPCODE_CONTINUATION
            | OPCODE_TEXT
            | OPCODE_BINARY
            | OPCODE_CLOSE
            | OPCODE_PING
            | OPCODE_PONG
    )
}

/// Whether `opcode` is a control frame's (close, ping, pong and the reserved 0xB-0xF).
fn is_control(opcode: u8) -> bool {
    opcode & 0x08 != 0
}

/// Writes a frame header (FIN set) for `opcode` and a payload of `len` bytes, with the shortest
/// length encoding; `mask_bit` is [`MASKED`] for a client frame, 0 for a server frame.
fn put_header(out: &mut Vec<u8>, opcode: u8, len: usize, mask_bit: u8) {
    out.push(FIN | opcode);
    match len {
        0..=125 => out.push(mask_bit | len as u8),
        126..=0xFFFF => {
            out.push(mask_bit | 126);
            out.extend_from_slice(&(len as u16).to_be_bytes());
        }
        _ => {
            out.push(mask_bit | 127);
            out.extend_from_slice(&(len as u64).to_be_bytes());
        }
    }
}

/// The payload length field of a header whose first two bytes are `second` and the rest `buf`:
/// `(payload length, header length without mask)`, or `None` while `buf` is too short.
fn payload_length(second: u8, buf: &[u8]) -> Option<(u64, usize)> {
    match second & 0x7F {
        126 => {
            let bytes = buf.get(2..4)?;
            Some((u64::from(u16::from_be_bytes([bytes[0], bytes[1]])), 4))
        }
        127 => {
            let bytes: [u8; 8] = buf.get(2..10)?.try_into().ok()?;
            Some((u64::from_be_bytes(bytes), 10))
        }
        len => Some((u64::from(len), 2)),
    }
}
