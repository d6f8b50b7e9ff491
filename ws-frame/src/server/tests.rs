use super::*;

/// A client frame with its first byte given as-is: masked with a fixed key, as a browser would
/// send it.
fn client_frame(first: u8, payload: &[u8]) -> Vec<u8> {
    let mask = [0x37, 0xfa, 0x21, 0x3d];
    let mut out = vec![first];
    match payload.len() {
        len @ 0..=125 => out.push(0x80 | len as u8),
        len @ 126..=0xFFFF => {
            out.push(0x80 | 126);
            out.extend_from_slice(&(len as u16).to_be_bytes());
        }
        len => {
            out.push(0x80 | 127);
            out.extend_from_slice(&(len as u64).to_be_bytes());
        }
    }
    out.extend_from_slice(&mask);
    out.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    out
}

/// Decodes every frame in `bytes` and compares the messages (or the error) with `expected`.
fn check(limit: usize, bytes: &[u8], expected: Result<Vec<Incoming>, FrameError>) {
    assert_eq!(decode_all(limit, bytes), expected);
}

fn decode_all(limit: usize, bytes: &[u8]) -> Result<Vec<Incoming>, FrameError> {
    let mut decoder = Decoder::new(limit);
    let mut rest = bytes;
    let mut got = Vec::new();
    loop {
        match decoder.decode(rest)? {
            Some(Decoded { message, used }) => {
                got.extend(message);
                rest = &rest[used..];
            }
            None => return Ok(got),
        }
    }
}

#[test]
fn the_accept_key_is_the_one_rfc_6455_gives_for_its_sample() {
    assert_eq!(
        crate::accept_key("dGhlIHNhbXBsZSBub25jZQ=="),
        "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
    );
    assert!(
        switching_protocols("dGhlIHNhbXBsZSBub25jZQ==")
            .contains("\r\nSec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n")
    );
}

#[test]
fn only_the_base64_of_sixteen_bytes_is_a_valid_key() {
    assert!(is_valid_key("dGhlIHNhbXBsZSBub25jZQ=="));
    for invalid in [
        "",
        "x",
        "dGhlIHNhbXBsZSBub25jZQ",     // padding missing
        "dGhlIHNhbXBsZSBub25jZSE=",   // 17 bytes
        "dGhlIHNhbXBsZSBub25j",       // 15 bytes
        "dGhlIHNhbXBsZSBub25jZQ==\r", // trailing garbage
        "!!!!!!!!!!!!!!!!!!!!!!==",   // not base64
    ] {
        assert!(!is_valid_key(invalid), "{invalid:?} is refused");
    }
}

#[test]
fn server_frames_are_unmasked_with_the_shortest_length_encoding() {
    assert_eq!(&text_frame(b"Hello")[..], b"\x81\x05Hello");
    let medium = text_frame(&[b'a'; 200]);
    assert_eq!(&medium[..4], &[0x81, 126, 0, 200]);
    assert_eq!(medium.len(), 204);
    let large = binary_frame(&vec![b'a'; 70_000]);
    assert_eq!(&large[..2], &[0x82, 127]);
    assert_eq!(&large[2..10], &70_000u64.to_be_bytes());
    assert_eq!(&close_frame(1001, "bye")[..], b"\x88\x05\x03\xe9bye");
    assert_eq!(&pong_frame(b"p")[..], b"\x8a\x01p");
}

#[test]
fn a_long_close_reason_is_cut_on_a_character_boundary_to_fit_a_control_frame() {
    let reason = "é".repeat(100); // 200 bytes
    let frame = close_frame(1000, &reason);
    assert_eq!(frame[1] as usize, frame.len() - 2);
    assert!(frame.len() - 2 <= MAX_CONTROL_PAYLOAD);
    assert!(std::str::from_utf8(&frame[4..]).is_ok());
}

#[test]
fn the_rfc_sample_masked_text_frame_decodes() {
    check(
        1024,
        &[
            0x81, 0x85, 0x37, 0xfa, 0x21, 0x3d, 0x7f, 0x9f, 0x4d, 0x51, 0x58,
        ],
        Ok(vec![Incoming::Text("Hello".to_owned())]),
    );
}

#[test]
fn several_frames_and_fragments_decode_in_order() {
    let mut bytes = client_frame(0x01, b"Hel"); // text, not final
    bytes.extend(client_frame(0x89, b"ping")); // a ping between fragments
    bytes.extend(client_frame(0x80, b"lo")); // final continuation
    bytes.extend(client_frame(0x81, &[b'x'; 300]));
    bytes.extend(client_frame(0x02, b"\x00")); // binary, not final
    bytes.extend(client_frame(0x80, b"\x01"));
    bytes.extend(client_frame(0x8A, b""));
    bytes.extend(client_frame(0x88, b"\x03\xe8"));
    bytes.extend(client_frame(0x88, b""));
    check(
        1024,
        &bytes,
        Ok(vec![
            Incoming::Ping(b"ping".to_vec()),
            Incoming::Text("Hello".to_owned()),
            Incoming::Text("x".repeat(300)),
            Incoming::Binary(vec![0, 1]),
            Incoming::Pong,
            Incoming::Close(Some(1000)),
            Incoming::Close(None),
        ]),
    );
}

#[test]
fn an_incomplete_frame_waits_for_more_bytes() {
    let whole = client_frame(0x81, b"Hello");
    for cut in 0..whole.len() {
        check(1024, &whole[..cut], Ok(vec![]));
    }
}

#[test]
fn a_message_decodes_the_same_whatever_the_chunking() {
    let mut bytes = client_frame(0x01, "héllo ".as_bytes());
    bytes.extend(client_frame(0x00, &[0xE2, 0x82])); // a character cut across fragments
    bytes.extend(client_frame(0x80, &[0xAC, b'!']));
    let expected = vec![Incoming::Text("héllo €!".to_owned())];
    for chunk in 1..bytes.len() {
        let mut decoder = Decoder::new(1024);
        let mut buffer = Vec::new();
        let mut got = Vec::new();
        for piece in bytes.chunks(chunk) {
            buffer.extend_from_slice(piece);
            while let Some(Decoded { message, used }) = decoder.decode(&buffer).unwrap() {
                got.extend(message);
                buffer.drain(..used);
            }
        }
        assert_eq!(got, expected, "chunks of {chunk}");
    }
}

#[test]
fn frames_that_break_the_rfc_are_refused() {
    check(1024, b"\x81\x05Hello", Err(FrameError::Unmasked));
    check(
        1024,
        &client_frame(0xC1, b"x"),
        Err(FrameError::ReservedBits),
    );
    check(
        1024,
        &client_frame(0x09, b"x"),
        Err(FrameError::BadControlFrame),
    );
    check(
        1024,
        &client_frame(0x89, &[0; 126]),
        Err(FrameError::BadControlFrame),
    );
    check(
        1024,
        &client_frame(0x80, b"x"),
        Err(FrameError::UnexpectedFragment),
    );
    let mut nested = client_frame(0x01, b"a");
    nested.extend(client_frame(0x81, b"b"));
    check(1024, &nested, Err(FrameError::UnexpectedFragment));
}

#[test]
fn unknown_opcodes_are_refused_from_the_first_two_bytes() {
    for opcode in (0x3..=0x7).chain(0xB..=0xF) {
        // Only the first two bytes: the (long) payload never has to arrive.
        let frame = client_frame(0x80 | opcode, &[0; 300]);
        check(1024, &frame[..2], Err(FrameError::UnknownOpcode(opcode)));
    }
}

#[test]
fn close_frames_must_carry_nothing_or_a_valid_code_and_a_utf8_reason() {
    check(
        1024,
        &client_frame(0x88, b"\x03"),
        Err(FrameError::BadClosePayload),
    );
    for code in [0u16, 999, 1004, 1005, 1006, 1015, 1016, 2999, 5000, 65535] {
        check(
            1024,
            &client_frame(0x88, &code.to_be_bytes()),
            Err(FrameError::InvalidCloseCode(code)),
        );
    }
    for code in [1000u16, 1001, 1003, 1007, 1011, 1014, 3000, 4999] {
        check(
            1024,
            &client_frame(0x88, &code.to_be_bytes()),
            Ok(vec![Incoming::Close(Some(code))]),
        );
    }
    check(
        1024,
        &client_frame(0x88, b"\x03\xe8\xff\xfe"),
        Err(FrameError::InvalidUtf8),
    );
}

#[test]
fn text_that_is_not_utf8_is_refused_at_the_fragment_that_breaks_it() {
    check(
        1024,
        &client_frame(0x81, &[0xff, 0xfe]),
        Err(FrameError::InvalidUtf8),
    );
    // The first fragment is already invalid: refused without waiting for the rest.
    check(
        1024,
        &client_frame(0x01, &[b'a', 0xC0, 0xAF]),
        Err(FrameError::InvalidUtf8),
    );
    let mut broken = client_frame(0x01, &[0xE2, 0x82]);
    broken.extend(client_frame(0x00, &[0x28]));
    check(1024, &broken, Err(FrameError::InvalidUtf8));
    // Binary messages are not text: any byte is fine.
    check(
        1024,
        &client_frame(0x82, &[0xff, 0xfe]),
        Ok(vec![Incoming::Binary(vec![0xff, 0xfe])]),
    );
}

#[test]
fn each_error_fails_the_connection_with_its_close_code() {
    assert_eq!(FrameError::TooLarge { limit: 1 }.close_code(), 1009);
    assert_eq!(FrameError::InvalidUtf8.close_code(), 1007);
    for protocol_error in [
        FrameError::Unmasked,
        FrameError::ReservedBits,
        FrameError::UnknownOpcode(3),
        FrameError::BadControlFrame,
        FrameError::UnexpectedFragment,
        FrameError::BadClosePayload,
        FrameError::InvalidCloseCode(1005),
    ] {
        assert_eq!(protocol_error.close_code(), 1002, "{protocol_error:?}");
    }
}

#[test]
fn a_message_over_the_limit_is_refused_from_its_header_alone() {
    let big = client_frame(0x81, &[b'x'; 2000]);
    check(1024, &big[..4], Err(FrameError::TooLarge { limit: 1024 }));
    let mut fragments = client_frame(0x01, &[b'x'; 600]);
    fragments.extend(client_frame(0x80, &[b'x'; 600]));
    check(1024, &fragments, Err(FrameError::TooLarge { limit: 1024 }));
    // A header announcing an absurd length is refused at once, not buffered.
    let mut absurd = vec![0x81, 0x80 | 127];
    absurd.extend_from_slice(&u64::MAX.to_be_bytes());
    check(1024, &absurd, Err(FrameError::TooLarge { limit: 1024 }));
    // Exactly the limit is fine, and control frames do not count against it.
    let mut at_limit = client_frame(0x01, &[b'x'; 1000]);
    at_limit.extend(client_frame(0x89, &[0; 125]));
    at_limit.extend(client_frame(0x80, &[b'x'; 24]));
    check(
        1024,
        &at_limit,
        Ok(vec![
            Incoming::Ping(vec![0; 125]),
            Incoming::Text("x".repeat(1024)),
        ]),
    );
}

/// Issue 11, defect 1: a continuation whose 64-bit length is `u64::MAX` after one pending byte
/// made `pending + length` wrap, and the slice that followed panicked.
#[test]
fn a_continuation_of_maximal_length_after_a_pending_fragment_is_too_large_not_a_panic() {
    let mut bytes = vec![0x01, 0x81, 0x00, 0x00, 0x00, 0x00, 0x78];
    bytes.extend_from_slice(&[
        0x80, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0x00, 0x00, 0x00, 0x00,
    ]);
    for limit in [1, 2, 32 * 1024, usize::MAX - 1, usize::MAX] {
        assert_eq!(
            decode_all(limit, &bytes),
            Err(FrameError::TooLarge { limit }),
            "limit {limit}"
        );
    }
}
