//! WebSocket frame decoder, fed the same client bytes in arbitrary chunkings.
//!
//! Input: `[limit selector, count, count chunk lengths..., stream...]` (see `gateway_fuzz`).
//! Invariants: no panic; the messages (and the error that ends the stream, if any) do not depend
//! on how the bytes were cut; a text message framed again by the client encoder decodes to
//! itself; no message is longer than the limit; while a frame is incomplete
//! the decoder asks the caller to hold at most one header plus the limit.
#![no_main]

use gateway_fuzz::Chunked;
use libfuzzer_sys::fuzz_target;
use ws_frame::server::{Decoded, Decoder, FrameError, Incoming};

/// Largest frame header: 2 bytes, a 64-bit length and the mask.
const MAX_HEADER: usize = 14;
/// Largest control frame payload; control frames are not counted against the limit.
const MAX_CONTROL: usize = 125;

fuzz_target!(|data: &[u8]| {
    let Some(input) = Chunked::parse(data) else {
        return;
    };
    let whole = decode_all(input.limit, &[input.stream]);
    let chunked = decode_all(input.limit, &input.chunks());
    assert_eq!(whole, chunked, "messages depend on the chunking");
});

/// Feeds `chunks` one after the other to a decoder, the way the connection reads a socket, and
/// returns what it decoded until the first error.
fn decode_all(limit: usize, chunks: &[&[u8]]) -> Vec<Result<Incoming, FrameError>> {
    let mut decoder = Decoder::new(limit);
    let mut buffer = Vec::new();
    let mut out = Vec::new();
    for chunk in chunks {
        buffer.extend_from_slice(chunk);
        loop {
            match decoder.decode(&buffer) {
                Ok(Some(Decoded { message, used })) => {
                    assert!(
                        used > 0 && used <= buffer.len(),
                        "used {used} of {}",
                        buffer.len()
                    );
                    buffer.drain(..used);
                    if let Some(message) = message {
                        if let Incoming::Text(text) = &message {
                            assert!(text.len() <= limit, "{} bytes over {limit}", text.len());
                            round_trip(text);
                        }
                        out.push(Ok(message));
                    }
                }
                Ok(None) => {
                    assert!(
                        buffer.len() < MAX_HEADER + limit.max(MAX_CONTROL),
                        "holding {} bytes with a {limit}-byte limit",
                        buffer.len()
                    );
                    break;
                }
                Err(error) => {
                    out.push(Err(error));
                    return out;
                }
            }
        }
    }
    out
}

/// A text message framed by the client side of the crate decodes to the same message.
fn round_trip(text: &str) {
    let frame = ws_frame::client::frame(0x1, text.as_bytes(), [0x37, 0xFA, 0x21, 0x3D]);
    let mut decoder = Decoder::new(text.len());
    let decoded = decoder.decode(&frame).expect("an encoded frame decodes");
    assert_eq!(
        decoded,
        Some(Decoded {
            message: Some(Incoming::Text(text.to_owned())),
            used: frame.len()
        })
    );
}
