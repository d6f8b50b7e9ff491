//! RFC 6455 at the gateway's edge, spoken byte by byte over a raw TCP stream: the upgrade's
//! refusals, and frames a browser would never send. Each is failed with its close code, and the
//! connection is gone from `gateway_connections_active` afterwards.

use std::time::Duration;

use e2e::{HANDSHAKE, TestGateway, dispatcher, start_gateway, within};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use ws_frame::client;

const MASK: [u8; 4] = [0x37, 0xfa, 0x21, 0x3d];
const DEADLINE: Duration = Duration::from_secs(10);
const ACTIVE: &str = "gateway_connections_active";

/// Issue 11, defect 1: a text frame with FIN clear and one payload byte, then a continuation
/// whose 64-bit length is `u64::MAX`.
const OVERFLOWING_CONTINUATION: [u8; 21] = [
    0x01, 0x81, 0x00, 0x00, 0x00, 0x00, 0x78, // text, not final, one byte 'x' (zero mask)
    0x80, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, // continuation, length 2^64-1
    0x00, 0x00, 0x00, 0x00, // mask
];

/// A client on a raw TCP stream, upgraded, reading server frames itself.
struct RawClient {
    stream: TcpStream,
    buf: Vec<u8>,
}

impl RawClient {
    /// Connects and upgrades as a dispatcher, without the SignalR handshake.
    async fn upgrade(gateway: &TestGateway) -> Self {
        let token = gateway.token(&dispatcher("raw-1", &["west"]));
        let key = client::key(*b"raw client nonce");
        let request = client::upgrade_request(
            &gateway.public_addr().to_string(),
            &format!("/hub/v1?access_token={token}"),
            &key,
            None,
        )
        .expect("a valid upgrade request");
        let mut stream = send_request(gateway, &request).await;
        let mut buf = Vec::new();
        let head = loop {
            if let Some(head) = client::upgrade_response(&buf, &key).expect("a 101 answer") {
                break head;
            }
            let read = stream.read_buf(&mut buf).await.expect("read");
            assert!(read > 0, "connection closed during the upgrade");
        };
        buf.drain(..head);
        Self { stream, buf }
    }

    /// Upgrades and completes the SignalR handshake.
    async fn after_handshake(gateway: &TestGateway) -> Self {
        let mut raw = Self::upgrade(gateway).await;
        raw.send(&client::frame(
            ws_frame::OPCODE_TEXT,
            HANDSHAKE.as_bytes(),
            MASK,
        ))
        .await;
        let (opcode, payload) = raw.next_frame().await.expect("a handshake response");
        assert_eq!(opcode, ws_frame::OPCODE_TEXT);
        assert_eq!(payload, b"{}\x1e");
        raw
    }

    async fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).await.expect("send");
    }

    /// The next server frame; `None` when the stream ends.
    async fn next_frame(&mut self) -> Option<(u8, Vec<u8>)> {
        loop {
            if let Some(frame) = client::next_frame(&self.buf).expect("a valid server frame") {
                let taken = (frame.opcode, frame.payload.to_vec());
                self.buf.drain(..frame.len);
                return Some(taken);
            }
            match self.stream.read_buf(&mut self.buf).await {
                Ok(0) | Err(_) => return None,
                Ok(_) => {}
            }
        }
    }

    /// The code of the server's close frame, skipping what comes before it (the Close record).
    async fn close_code(&mut self) -> u16 {
        let closing = async {
            while let Some((opcode, payload)) = self.next_frame().await {
                if opcode == ws_frame::OPCODE_CLOSE {
                    return ws_frame::close::code_of(&payload).expect("a close code");
                }
            }
            panic!("the stream ended without a close frame");
        };
        within(DEADLINE, closing, "the close frame").await
    }
}

/// Waits until `gateway_connections_active` is back to `baseline`.
async fn assert_connections_back_to(gateway: &TestGateway, baseline: f64) {
    let settled = async {
        loop {
            if gateway.metric(ACTIVE).await == baseline {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    within(
        DEADLINE,
        settled,
        "gateway_connections_active back to its baseline",
    )
    .await;
}

/// Sends `bytes` after the upgrade (and the handshake if `handshake`), and checks the close
/// code and that the connection is gone.
async fn check_refused(bytes: &[u8], handshake: bool, expected_code: u16) {
    let gateway = start_gateway(&[]).await;
    let baseline = gateway.metric(ACTIVE).await;
    let mut raw = if handshake {
        RawClient::after_handshake(&gateway).await
    } else {
        RawClient::upgrade(&gateway).await
    };
    raw.send(bytes).await;
    assert_eq!(raw.close_code().await, expected_code);
    drop(raw);
    assert_connections_back_to(&gateway, baseline).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_continuation_of_maximal_length_before_the_handshake_closes_with_1009_and_leaks_nothing()
{
    check_refused(&OVERFLOWING_CONTINUATION, false, 1009).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_continuation_of_maximal_length_after_the_handshake_closes_with_1009_and_leaks_nothing() {
    check_refused(&OVERFLOWING_CONTINUATION, true, 1009).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_close_payload_of_one_byte_closes_with_1002() {
    check_refused(
        &client::frame(ws_frame::OPCODE_CLOSE, &[0x03], MASK),
        true,
        1002,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn close_codes_that_may_not_be_sent_close_with_1002() {
    for code in [999u16, 1005, 1006, 5000] {
        let frame = client::frame(ws_frame::OPCODE_CLOSE, &code.to_be_bytes(), MASK);
        check_refused(&frame, true, 1002).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_close_reason_that_is_not_utf8_closes_with_1007() {
    let frame = client::frame(ws_frame::OPCODE_CLOSE, b"\x03\xe8\xff\xfe", MASK);
    check_refused(&frame, true, 1007).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_text_message_that_is_not_utf8_closes_with_1007() {
    let frame = client::frame(ws_frame::OPCODE_TEXT, b"{\"type\":6}\xff\x1e", MASK);
    check_refused(&frame, true, 1007).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_opcode_closes_with_1002_from_its_header_alone() {
    // Opcode 3 announcing 100 bytes: only the two header bytes are sent, so the close proves
    // the gateway did not wait to buffer the payload.
    check_refused(&[0x83, 0x80 | 100], true, 1002).await;
}

/// Opens a TCP connection to the public listener and writes `request` on it.
async fn send_request(gateway: &TestGateway, request: &str) -> TcpStream {
    let mut stream = TcpStream::connect(gateway.public_addr())
        .await
        .expect("connect");
    stream
        .write_all(request.as_bytes())
        .await
        .expect("send the request");
    stream
}

/// The body of the gateway's answer to a request on the hub that is not an upgrade it serves.
fn not_an_upgrade(why: &str) -> String {
    format!("\r\n\r\n/hub/v1: only WebSocket upgrades are served here ({why})")
}

/// The status line, headers and body the gateway answers a raw upgrade request with.
async fn upgrade_answer(gateway: &TestGateway, key: Option<&str>, version: &str) -> String {
    let token = gateway.token(&dispatcher("raw-1", &["west"]));
    let mut request = format!(
        "GET /hub/v1?access_token={token} HTTP/1.1\r\nHost: {}\r\nUpgrade: websocket\r\n\
         Connection: Upgrade\r\nSec-WebSocket-Version: {version}\r\n",
        gateway.public_addr()
    );
    if let Some(key) = key {
        request.push_str(&format!("Sec-WebSocket-Key: {key}\r\n"));
    }
    request.push_str("\r\n");
    let mut stream = send_request(gateway, &request).await;
    let reading = async {
        let mut buf = Vec::new();
        loop {
            if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
                let body_len = head
                    .split("\r\n")
                    .find_map(|line| line.strip_prefix("content-length:"))
                    .map_or(0, |len| {
                        len.trim().parse::<usize>().expect("a content length")
                    });
                if buf.len() >= end + 4 + body_len {
                    return String::from_utf8(buf).expect("a UTF-8 answer");
                }
            }
            let read = stream.read_buf(&mut buf).await.expect("read");
            assert!(read > 0, "closed before answering");
        }
    };
    within(DEADLINE, reading, "the upgrade answer").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_empty_or_malformed_websocket_key_is_refused_with_400() {
    let gateway = start_gateway(&[]).await;
    for key in [
        None,
        Some(""),
        Some("not base64!"),
        Some("dGhlIHNhbXBsZSBub25jZSE="),
    ] {
        let answer = upgrade_answer(&gateway, key, "13").await;
        assert!(answer.starts_with("HTTP/1.1 400 "), "{key:?}: {answer}");
        assert!(
            answer.ends_with(&not_an_upgrade(
                "Sec-WebSocket-Key must be the base64 of 16 bytes"
            )),
            "{key:?}: {answer}"
        );
    }
    let good = upgrade_answer(&gateway, Some("dGhlIHNhbXBsZSBub25jZQ=="), "13").await;
    assert!(good.starts_with("HTTP/1.1 101 "), "{good}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_websocket_version_gets_426_naming_version_13() {
    let gateway = start_gateway(&[]).await;
    for version in ["8", "12", "14"] {
        let answer = upgrade_answer(&gateway, Some("dGhlIHNhbXBsZSBub25jZQ=="), version).await;
        assert!(
            answer.starts_with("HTTP/1.1 426 "),
            "version {version}: {answer}"
        );
        assert!(
            answer
                .to_ascii_lowercase()
                .contains("\r\nsec-websocket-version: 13\r\n"),
            "version {version}: {answer}"
        );
        assert!(
            answer.ends_with(&not_an_upgrade("WebSocket version 13 is required")),
            "version {version}: {answer}"
        );
    }
}
