//! The client side of the WebSocket wire format (RFC 6455), as much as the load tool needs; pure.
//!
//! The upgrade request and the check of its `101` answer, masked client frames, and the
//! decoding of server frames from a byte buffer. The tool frames its own WebSocket so that the
//! receive path of thousands of connections on one core costs little per frame: no per-message
//! allocation, no zero-filled read buffer. Server frames are expected as the gateway writes
//! them: unmasked, unfragmented, without extensions; anything else is reported as an error,
//! not guessed at. Nothing here does I/O.

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use sha1::{Digest, Sha1};

/// The GUID RFC 6455 appends to the client's key.
const ACCEPT_GUID: &str = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11";

/// Largest upgrade answer (status line and headers) the client reads.
pub(crate) const MAX_RESPONSE_HEAD: usize = 8192;

/// Largest server frame payload accepted; events are under 2 KiB.
pub(crate) const MAX_FRAME_PAYLOAD: usize = 16 << 20;

pub(crate) const OPCODE_CONTINUATION: u8 = 0x0;
pub(crate) const OPCODE_TEXT: u8 = 0x1;
pub(crate) const OPCODE_BINARY: u8 = 0x2;
pub(crate) const OPCODE_CLOSE: u8 = 0x8;
pub(crate) const OPCODE_PING: u8 = 0x9;
pub(crate) const OPCODE_PONG: u8 = 0xA;
const FIN: u8 = 0x80;
const RSV: u8 = 0x70;
const MASKED: u8 = 0x80;

/// The `Sec-WebSocket-Key` for 16 random bytes.
pub(crate) fn client_key(nonce: [u8; 16]) -> String {
    STANDARD.encode(nonce)
}

/// The `Sec-WebSocket-Accept` value a server must answer `key` with.
pub(crate) fn accept_key(key: &str) -> String {
    let mut sha = Sha1::new();
    sha.update(key.as_bytes());
    sha.update(ACCEPT_GUID.as_bytes());
    STANDARD.encode(sha.finalize())
}

/// The upgrade request for `path` (with its query) on `host`.
///
/// # Errors
/// When `origin` holds characters a header value cannot carry.
pub(crate) fn upgrade_request(
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
/// `len` bytes is in `buf` (what follows is frames), and an error label otherwise.
pub(crate) fn upgrade_response(buf: &[u8], key: &str) -> Result<Option<usize>, String> {
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
    let expected = accept_key(key);
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
pub(crate) fn client_frame(opcode: u8, payload: &[u8], mask: [u8; 4]) -> Vec<u8> {
    let mut out = Vec::with_capacity(payload.len() + 14);
    out.push(FIN | opcode);
    match payload.len() {
        len @ 0..=125 => out.push(MASKED | len as u8),
        len @ 126..=0xFFFF => {
            out.push(MASKED | 126);
            out.extend_from_slice(&(len as u16).to_be_bytes());
        }
        len => {
            out.push(MASKED | 127);
            out.extend_from_slice(&(len as u64).to_be_bytes());
        }
    }
    out.extend_from_slice(&mask);
    out.extend(
        payload
            .iter()
            .zip(mask.iter().cycle())
            .map(|(byte, key)| byte ^ key),
    );
    out
}

/// A server frame whose header is complete.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct FrameHead {
    /// The frame's opcode.
    pub(crate) opcode: u8,
    /// Header bytes before the payload.
    pub(crate) header_len: usize,
    /// Payload bytes.
    pub(crate) payload_len: usize,
}

impl FrameHead {
    /// Header and payload bytes.
    pub(crate) fn total_len(self) -> usize {
        self.header_len + self.payload_len
    }
}

/// A server frame the client does not accept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum FrameError {
    /// RSV bits set: no extension was negotiated.
    Reserved,
    /// A masked server frame.
    Masked,
    /// A fragment (FIN clear, or a continuation): the gateway never fragments.
    Fragmented,
    /// An opcode RFC 6455 does not define.
    UnknownOpcode(u8),
    /// A control frame longer than 125 bytes.
    LongControl,
    /// More than `MAX_FRAME_PAYLOAD` bytes.
    TooLarge(u64),
}

impl std::fmt::Display for FrameError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Reserved => f.write_str("reserved bits set"),
            Self::Masked => f.write_str("masked server frame"),
            Self::Fragmented => f.write_str("fragmented message"),
            Self::UnknownOpcode(op) => write!(f, "unknown opcode {op:#x}"),
            Self::LongControl => f.write_str("control frame over 125 bytes"),
            Self::TooLarge(len) => write!(f, "frame of {len} bytes"),
        }
    }
}

/// Reads the header of the server frame at the start of `buf`: `Ok(None)` while the header is
/// incomplete (the payload may still be, too: compare `total_len` with what is buffered).
pub(crate) fn frame_head(buf: &[u8]) -> Result<Option<FrameHead>, FrameError> {
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
    let control = opcode & 0x08 != 0;
    match opcode {
        OPCODE_CONTINUATION => return Err(FrameError::Fragmented),
        OPCODE_TEXT | OPCODE_BINARY | OPCODE_CLOSE | OPCODE_PING | OPCODE_PONG => {}
        other => return Err(FrameError::UnknownOpcode(other)),
    }
    if first & FIN == 0 {
        return Err(FrameError::Fragmented);
    }
    let (header_len, payload_len) = match second & 0x7F {
        len @ 0..=125 => (2, u64::from(len)),
        126 => match buf.get(2..4) {
            Some(&[a, b]) => (4, u64::from(u16::from_be_bytes([a, b]))),
            _ => return Ok(None),
        },
        _ => match buf.get(2..10).and_then(|b| <[u8; 8]>::try_from(b).ok()) {
            Some(bytes) => (10, u64::from_be_bytes(bytes)),
            None => return Ok(None),
        },
    };
    if control && payload_len > 125 {
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
pub(crate) struct Frame<'a> {
    /// The frame's opcode.
    pub(crate) opcode: u8,
    /// Its payload.
    pub(crate) payload: &'a [u8],
    /// Header and payload bytes.
    pub(crate) len: usize,
}

/// The complete server frame at the start of `buf`; `Ok(None)` while it is incomplete.
pub(crate) fn next_frame(buf: &[u8]) -> Result<Option<Frame<'_>>, FrameError> {
    Ok(frame_head(buf)?
        .filter(|head| head.total_len() <= buf.len())
        .map(|head| Frame {
            opcode: head.opcode,
            payload: &buf[head.header_len..head.total_len()],
            len: head.total_len(),
        }))
}

/// The status code of a close frame's payload, if it carries one.
pub(crate) fn close_code(payload: &[u8]) -> Option<u16> {
    match payload {
        [a, b, ..] => Some(u16::from_be_bytes([*a, *b])),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A server frame as the gateway writes it.
    fn server_frame(first: u8, payload: &[u8]) -> Vec<u8> {
        let mut out = vec![first];
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
        out
    }

    #[test]
    fn the_accept_key_follows_the_rfc_example() {
        assert_eq!(
            accept_key("dGhlIHNhbXBsZSBub25jZQ=="),
            "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
        );
        assert_eq!(client_key(*b"the sample nonce"), "dGhlIHNhbXBsZSBub25jZQ==");
    }

    #[test]
    fn the_upgrade_request_carries_key_version_and_origin() {
        let request = upgrade_request(
            "127.0.0.1:80",
            "/hub/v1?access_token=t",
            "k==",
            Some("http://a"),
        )
        .unwrap();
        assert!(
            request.starts_with("GET /hub/v1?access_token=t HTTP/1.1\r\nHost: 127.0.0.1:80\r\n")
        );
        assert!(request.contains("\r\nSec-WebSocket-Key: k==\r\n"));
        assert!(request.contains("\r\nSec-WebSocket-Version: 13\r\n"));
        assert!(request.contains("\r\nOrigin: http://a\r\n"));
        assert!(request.ends_with("\r\n\r\n"));
        assert!(upgrade_request("h", "/", "k", Some("a\r\nX: y")).is_err());
        assert!(
            !upgrade_request("h", "/", "k", None)
                .unwrap()
                .contains("Origin")
        );
    }

    #[test]
    fn the_upgrade_answer_is_checked() {
        let key = "dGhlIHNhbXBsZSBub25jZQ==";
        let good = "HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\n\
                    connection: Upgrade\r\nsec-websocket-accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n";
        let mut buf = good.as_bytes().to_vec();
        buf.extend_from_slice(&[0x81, 0x00]);
        assert_eq!(upgrade_response(&buf, key), Ok(Some(good.len())));
        assert_eq!(upgrade_response(&buf[..good.len() - 1], key), Ok(None));
        assert_eq!(
            upgrade_response(
                b"HTTP/1.1 401 Unauthorized\r\ncontent-length: 0\r\n\r\n",
                key
            ),
            Err("HTTP 401 Unauthorized".to_owned())
        );
        let wrong = good.replace("s3pP", "AAAA");
        assert!(upgrade_response(wrong.as_bytes(), key).is_err());
        let plain = good.replace("upgrade: websocket\r\n", "");
        assert!(upgrade_response(plain.as_bytes(), key).is_err());
        assert!(upgrade_response(&vec![b'x'; MAX_RESPONSE_HEAD + 1], key).is_err());
    }

    #[test]
    fn client_frames_are_masked() {
        let mask = [1, 2, 3, 4];
        let frame = client_frame(OPCODE_TEXT, b"{\"type\":6}\x1e", mask);
        assert_eq!(&frame[..2], &[0x81, 0x80 | 11]);
        assert_eq!(&frame[2..6], &mask);
        let unmasked: Vec<u8> = frame[6..]
            .iter()
            .zip(mask.iter().cycle())
            .map(|(b, k)| b ^ k)
            .collect();
        assert_eq!(unmasked, b"{\"type\":6}\x1e");

        let long = client_frame(OPCODE_TEXT, &[b'a'; 300], mask);
        assert_eq!(&long[..4], &[0x81, 0x80 | 126, 1, 44]);
        assert_eq!(long.len(), 4 + 4 + 300);
        let huge = client_frame(OPCODE_BINARY, &vec![0; 70_000], mask);
        assert_eq!(huge[1], 0x80 | 127);
        assert_eq!(&huge[2..10], &70_000u64.to_be_bytes());
        assert_eq!(
            client_frame(OPCODE_CLOSE, &[], mask),
            [0x88, 0x80, 1, 2, 3, 4]
        );
    }

    #[test]
    fn server_frame_headers_of_each_length_form_are_read() {
        for len in [0, 5, 125, 126, 300, 65_535, 65_536, 100_000] {
            let frame = server_frame(0x81, &vec![b'x'; len]);
            let head = frame_head(&frame).unwrap().unwrap();
            assert_eq!(head.opcode, OPCODE_TEXT);
            assert_eq!(head.payload_len, len);
            assert_eq!(head.total_len(), frame.len());
            for cut in 0..head.header_len {
                assert_eq!(frame_head(&frame[..cut]), Ok(None), "len {len} cut {cut}");
            }
            // A complete header is enough, whatever the payload has arrived.
            assert_eq!(frame_head(&frame[..head.header_len]), Ok(Some(head)));
        }
    }

    #[test]
    fn server_frames_outside_what_the_gateway_writes_are_refused() {
        assert_eq!(frame_head(&[0xC1, 0]), Err(FrameError::Reserved));
        assert_eq!(
            frame_head(&[0x81, 0x81, 0, 0, 0, 0, b'x']),
            Err(FrameError::Masked)
        );
        assert_eq!(frame_head(&[0x01, 1, b'x']), Err(FrameError::Fragmented));
        assert_eq!(frame_head(&[0x80, 1, b'x']), Err(FrameError::Fragmented));
        assert_eq!(frame_head(&[0x83, 0]), Err(FrameError::UnknownOpcode(3)));
        assert_eq!(
            frame_head(&[0x89, 126, 0, 200]),
            Err(FrameError::LongControl)
        );
        let mut huge = vec![0x82, 127];
        huge.extend_from_slice(&(u64::MAX).to_be_bytes());
        assert_eq!(frame_head(&huge), Err(FrameError::TooLarge(u64::MAX)));
    }

    #[test]
    fn complete_frames_are_taken_one_after_another() {
        let mut stream = server_frame(0x81, b"{\"type\":6}\x1e");
        stream.extend(server_frame(0x81, &[b'x'; 300]));
        stream.extend(server_frame(0x88, &[0x03, 0xE9]));
        let mut at = 0;
        let mut seen = Vec::new();
        while let Some(frame) = next_frame(&stream[at..]).unwrap() {
            seen.push((frame.opcode, frame.payload.len()));
            at += frame.len;
        }
        assert_eq!(at, stream.len());
        assert_eq!(
            seen,
            [(OPCODE_TEXT, 11), (OPCODE_TEXT, 300), (OPCODE_CLOSE, 2)]
        );
        // Every cut short of a whole frame waits for more.
        let first = server_frame(0x81, &[b'y'; 300]);
        for cut in 0..first.len() {
            assert_eq!(next_frame(&first[..cut]), Ok(None), "cut {cut}");
        }
        assert_eq!(
            next_frame(&first),
            Ok(Some(Frame {
                opcode: OPCODE_TEXT,
                payload: &first[4..],
                len: 304
            }))
        );
    }

    #[test]
    fn control_frames_are_recognised() {
        let close = server_frame(0x88, &[0x03, 0xE8, b'b', b'y', b'e']);
        let head = frame_head(&close).unwrap().unwrap();
        assert_eq!(head.opcode, OPCODE_CLOSE);
        assert_eq!(close_code(&close[head.header_len..]), Some(1000));
        assert_eq!(close_code(&[]), None);
        assert_eq!(frame_head(&[0x89, 0]).unwrap().unwrap().opcode, OPCODE_PING);
        assert_eq!(frame_head(&[0x8A, 0]).unwrap().unwrap().opcode, OPCODE_PONG);
    }
}
