use super::*;

/// A client frame: masked with a fixed key, as a browser would send it.
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
    let mut decoder = Decoder::new(limit);
    let mut rest = bytes;
    let mut got = Vec::new();
    let outcome = loop {
        match decoder.decode(rest) {
            Ok(Some((message, used))) => {
                got.extend(message);
                rest = &rest[used..];
            }
            Ok(None) => break Ok(got),
            Err(e) => break Err(e),
        }
    };
    assert_eq!(outcome, expected);
}

#[test]
fn the_accept_key_is_the_one_rfc_6455_gives_for_its_sample() {
    assert_eq!(
        accept_key("dGhlIHNhbXBsZSBub25jZQ=="),
        "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
    );
}

#[test]
fn server_frames_are_unmasked_with_the_shortest_length_encoding() {
    assert_eq!(&text_frame(b"Hello")[..], b"\x81\x05Hello");
    let medium = text_frame(&[b'a'; 200]);
    assert_eq!(&medium[..4], &[0x81, 126, 0, 200]);
    assert_eq!(medium.len(), 204);
    let large = text_frame(&vec![b'a'; 70_000]);
    assert_eq!(&large[..2], &[0x81, 127]);
    assert_eq!(&large[2..10], &70_000u64.to_be_bytes());
    assert_eq!(&close_frame(1001, "bye")[..], b"\x88\x05\x03\xe9bye");
    assert_eq!(&pong_frame(b"p")[..], b"\x8a\x01p");
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
    bytes.extend(client_frame(0x82, b"\x00\x01"));
    bytes.extend(client_frame(0x8A, b""));
    bytes.extend(client_frame(0x88, b"\x03\xe8"));
    check(
        1024,
        &bytes,
        Ok(vec![
            Incoming::Ping(b"ping".to_vec()),
            Incoming::Text("Hello".to_owned()),
            Incoming::Text("x".repeat(300)),
            Incoming::Binary,
            Incoming::Pong,
            Incoming::Close(Some(1000)),
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
fn frames_that_break_the_rfc_are_refused() {
    check(1024, b"\x81\x05Hello", Err(FrameError::Unmasked));
    check(
        1024,
        &client_frame(0xC1, b"x"),
        Err(FrameError::ReservedBits),
    );
    check(
        1024,
        &client_frame(0x83, b"x"),
        Err(FrameError::UnknownOpcode(3)),
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
    check(
        1024,
        &client_frame(0x81, &[0xff, 0xfe]),
        Err(FrameError::InvalidUtf8),
    );
}

#[test]
fn a_message_over_the_limit_is_refused_from_its_header_alone() {
    let big = client_frame(0x81, &[b'x'; 2000]);
    check(1024, &big[..14], Err(FrameError::TooLarge { limit: 1024 }));
    let mut fragments = client_frame(0x01, &[b'x'; 600]);
    fragments.extend(client_frame(0x80, &[b'x'; 600]));
    check(1024, &fragments, Err(FrameError::TooLarge { limit: 1024 }));
    // A header announcing an absurd length is refused at once, not buffered.
    let mut absurd = vec![0x81, 0x80 | 127];
    absurd.extend_from_slice(&u64::MAX.to_be_bytes());
    absurd.extend_from_slice(&[1, 2, 3, 4]);
    check(1024, &absurd, Err(FrameError::TooLarge { limit: 1024 }));
}
