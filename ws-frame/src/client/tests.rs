use super::*;
use crate::close;
use crate::server;

/// A server frame as a server writes it.
fn server_frame(first: u8, payload: &[u8]) -> Vec<u8> {
    let mut out = server::frame(first & 0x0F, payload).to_vec();
    out[0] = first;
    out
}

#[test]
fn the_key_and_accept_key_follow_the_rfc_example() {
    assert_eq!(key(*b"the sample nonce"), "dGhlIHNhbXBsZSBub25jZQ==");
    assert!(server::is_valid_key(&key([7; 16])));
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
    assert!(request.starts_with("GET /hub/v1?access_token=t HTTP/1.1\r\nHost: 127.0.0.1:80\r\n"));
    assert!(request.contains("\r\nSec-WebSocket-Key: k==\r\n"));
    assert!(request.contains("\r\nSec-WebSocket-Version: 13\r\n"));
    assert!(request.contains("\r\nOrigin: http://a\r\n"));
    assert!(request.ends_with("\r\n\r\n"));
    assert_eq!(
        upgrade_request("h", "/", "k", Some("a\r\nX: y")),
        Err("origin: invalid header value".to_owned())
    );
    assert!(
        !upgrade_request("h", "/", "k", None)
            .unwrap()
            .contains("Origin")
    );
}

#[test]
fn the_upgrade_answer_is_checked() {
    let key = "dGhlIHNhbXBsZSBub25jZQ==";
    let good = server::switching_protocols(key);
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
    assert_eq!(
        upgrade_response(wrong.as_bytes(), key),
        Err("wrong Sec-WebSocket-Accept".to_owned())
    );
    let plain = good.replace("Upgrade: websocket\r\n", "");
    assert_eq!(
        upgrade_response(plain.as_bytes(), key),
        Err("no Upgrade: websocket".to_owned())
    );
    assert_eq!(
        upgrade_response(&vec![b'x'; MAX_RESPONSE_HEAD + 1], key),
        Err("response head too large".to_owned())
    );
}

#[test]
fn client_frames_are_masked_and_decode_on_the_server_side() {
    let mask = [1, 2, 3, 4];
    let record = b"{\"type\":6}\x1e";
    let bytes = frame(OPCODE_TEXT, record, mask);
    assert_eq!(&bytes[..2], &[0x81, 0x80 | 11]);
    assert_eq!(&bytes[2..6], &mask);
    let unmasked: Vec<u8> = bytes[6..]
        .iter()
        .zip(mask.iter().cycle())
        .map(|(b, k)| b ^ k)
        .collect();
    assert_eq!(unmasked, record);

    let long = frame(OPCODE_TEXT, &[b'a'; 300], mask);
    assert_eq!(&long[..4], &[0x81, 0x80 | 126, 1, 44]);
    assert_eq!(long.len(), 4 + 4 + 300);
    let huge = frame(OPCODE_BINARY, &vec![0; 70_000], mask);
    assert_eq!(huge[1], 0x80 | 127);
    assert_eq!(&huge[2..10], &70_000u64.to_be_bytes());
    assert_eq!(frame(OPCODE_CLOSE, &[], mask), [0x88, 0x80, 1, 2, 3, 4]);

    let mut decoder = server::Decoder::new(1 << 20);
    let decoded = decoder.decode(&huge).unwrap().unwrap();
    assert_eq!(decoded.used, huge.len());
    assert_eq!(
        decoded.message,
        Some(server::Incoming::Binary(vec![0; 70_000]))
    );
}

#[test]
fn server_frame_headers_of_each_length_form_are_read() {
    for len in [0, 5, 125, 126, 300, 65_535, 65_536, 100_000] {
        let bytes = server_frame(0x81, &vec![b'x'; len]);
        let head = frame_head(&bytes).unwrap().unwrap();
        assert_eq!(head.opcode, OPCODE_TEXT);
        assert_eq!(head.payload_len, len);
        assert_eq!(head.total_len(), bytes.len());
        for cut in 0..head.header_len {
            assert_eq!(frame_head(&bytes[..cut]), Ok(None), "len {len} cut {cut}");
        }
        // A complete header is enough, whatever the payload has arrived.
        assert_eq!(frame_head(&bytes[..head.header_len]), Ok(Some(head)));
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
    let bytes = server::close_frame(1000, "bye");
    let head = frame_head(&bytes).unwrap().unwrap();
    assert_eq!(head.opcode, OPCODE_CLOSE);
    assert_eq!(close::code_of(&bytes[head.header_len..]), Some(1000));
    assert_eq!(frame_head(&[0x89, 0]).unwrap().unwrap().opcode, OPCODE_PING);
    assert_eq!(frame_head(&[0x8A, 0]).unwrap().unwrap().opcode, OPCODE_PONG);
}
