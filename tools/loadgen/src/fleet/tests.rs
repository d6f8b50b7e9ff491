//! The connection's receive path against a local server end: stamps counted, frames split
//! anywhere, pings answered, closes and ends reported.

use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

use crate::cli::Endpoint;
use crate::tally::StepTally;
use crate::{host, signalr, ws};

use super::session::{SCRATCH_BYTES, Session};
use super::wire::Wire;
use super::*;

const MASK: [u8; 4] = [0x11, 0x22, 0x33, 0x44];

/// A server frame as the gateway writes it.
fn server_frame(opcode: u8, payload: &[u8]) -> Vec<u8> {
    ws_frame::server::frame(opcode, payload).to_vec()
}

/// An event record as the gateway writes it, stamped for group `g`, counter `n`, step 0.
fn event(g: u32, n: u64, t: u64) -> Vec<u8> {
    padded_event(g, n, t, 30)
}

/// An event with `pad` bytes of padding.
fn padded_event(g: u32, n: u64, t: u64, pad: usize) -> Vec<u8> {
    let pad = "x".repeat(pad);
    let record = format!(
        "{{\"type\":1,\"target\":\"RecommendationReady\",\"arguments\":[{{\"region\":\"lg-{g}\",\"lg\":{{\"g\":{g},\"n\":{n},\"t\":{t},\"s\":0}},\"pad\":\"{pad}\"}}]}}\u{1e}"
    );
    server_frame(ws::OPCODE_TEXT, record.as_bytes())
}

/// A session of group 1 (of 2) and a connected pair: its wire and the server's end.
async fn connected() -> (Session, Wire, TcpStream) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let client = TcpStream::connect(listener.local_addr().unwrap())
        .await
        .unwrap();
    let (server, _) = listener.accept().await.unwrap();
    let config = FleetConfig {
        endpoint: Endpoint::try_loopback("http://127.0.0.1:1").unwrap(),
        jwt_secret: String::new(),
        origin: None,
        spread: false,
        first: 0,
        count: 1,
        groups: 2,
        concurrency: 1,
        connect_timeout: Duration::from_secs(1),
        token_lifetime: Duration::from_secs(60),
        stateful: false,
    };
    let shared = Arc::new(Shared {
        shards: (0..SHARDS).map(|_| Mutex::default()).collect(),
        members: (0..2).map(|_| AtomicU32::new(0)).collect(),
        live: AtomicU64::new(0),
        ends: Mutex::default(),
        negotiate: None,
        lag: Mutex::new(tally::new_histogram()),
    });
    let session = Session {
        index: 1,
        group: Some(1),
        config: Arc::new(config),
        shared,
    };
    (session, Wire::new(client, MASK), server)
}

/// Step 0 over all shards.
fn step_zero(session: &Session) -> StepTally {
    let mut total = StepTally::default();
    for shard in &session.shared.shards {
        total.merge(&lock(shard).collect(0));
    }
    total
}

/// Reads one masked client frame: opcode and unmasked payload.
async fn client_frame(server: &mut TcpStream) -> (u8, Vec<u8>) {
    let mut head = [0; 2];
    server.read_exact(&mut head).await.unwrap();
    assert_eq!(head[0] & 0x80, 0x80, "FIN");
    assert_eq!(head[1] & 0x80, 0x80, "masked");
    let len = usize::from(head[1] & 0x7F);
    assert!(len < 126);
    let mut mask = [0; 4];
    server.read_exact(&mut mask).await.unwrap();
    assert_eq!(mask, MASK);
    let mut payload = vec![0; len];
    server.read_exact(&mut payload).await.unwrap();
    for (byte, key) in payload.iter_mut().zip(mask.iter().cycle()) {
        *byte ^= key;
    }
    (head[0] & 0x0F, payload)
}

#[tokio::test]
async fn frames_cut_anywhere_are_counted_and_a_close_frame_ends_the_connection() {
    let (session, wire, mut server) = connected().await;
    let now = host::now_micros();
    let mut bytes = Vec::new();
    for n in [0, 1, 2, 5, 3, 4, 4, 6] {
        bytes.extend(event(1, n, now));
    }
    bytes.extend(event(0, 7, now)); // Another group's event.
    bytes.extend(server_frame(
        ws::OPCODE_TEXT,
        b"{\"type\":1,\"target\":\"RecommendationReady\",\"arguments\":[{}]}\x1e{\"type\":6}\x1e",
    ));
    bytes.extend(server_frame(ws::OPCODE_CLOSE, &1001_u16.to_be_bytes()));
    let writer = tokio::spawn(async move {
        let mut rest = &bytes[..];
        for size in [1, 2, 3, 7, 40, 150, 333].iter().cycle() {
            if rest.is_empty() {
                break;
            }
            let (chunk, tail) = rest.split_at((*size).min(rest.len()));
            server.write_all(chunk).await.unwrap();
            rest = tail;
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        server
    });
    let (_control, watched) = watch::channel(false);
    let ended = session.hold(wire, watched).await;
    assert_eq!(ended.as_deref(), Some("websocket close 1001"));
    drop(writer.await.unwrap());
    let tally = step_zero(&session);
    assert_eq!(tally.delivered, 7);
    assert_eq!(tally.reordered, 2);
    assert_eq!(tally.duplicates, 1);
    assert_eq!(tally.misrouted, 1);
    assert_eq!(tally.unstamped, 1);
    assert_eq!(tally.latency.len(), 7);
}

#[tokio::test]
async fn a_frame_larger_than_the_scratch_buffer_is_read_whole() {
    let (session, wire, mut server) = connected().await;
    let now = host::now_micros();
    let mut bytes = event(1, 0, now);
    bytes.extend(padded_event(1, 1, now, SCRATCH_BYTES + 5_000));
    bytes.extend(event(1, 2, now));
    bytes.extend(server_frame(ws::OPCODE_CLOSE, &[]));
    let writer = tokio::spawn(async move {
        for chunk in bytes.chunks(10_000) {
            server.write_all(chunk).await.unwrap();
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        server
    });
    let (_control, watched) = watch::channel(false);
    let ended = session.hold(wire, watched).await;
    assert_eq!(ended.as_deref(), Some("websocket close none"));
    drop(writer.await.unwrap());
    let tally = step_zero(&session);
    assert_eq!(
        (tally.delivered, tally.reordered, tally.duplicates),
        (3, 0, 0)
    );
}

#[tokio::test]
async fn pings_are_answered_and_a_signalr_close_ends_the_connection() {
    let (session, wire, mut server) = connected().await;
    let (_control, watched) = watch::channel(false);
    let held = tokio::spawn(async move { session.hold(wire, watched).await });
    server
        .write_all(&server_frame(ws::OPCODE_PING, b"hi"))
        .await
        .unwrap();
    assert_eq!(
        client_frame(&mut server).await,
        (ws::OPCODE_PONG, b"hi".to_vec())
    );
    let close = b"{\"type\":7,\"error\":\"bye\",\"allowReconnect\":true}\x1e";
    server
        .write_all(&server_frame(ws::OPCODE_TEXT, close))
        .await
        .unwrap();
    assert_eq!(held.await.unwrap().as_deref(), Some("server close: bye"));
}

#[tokio::test]
async fn the_cohort_signal_pings_then_stops() {
    let (session, wire, mut server) = connected().await;
    let (control, watched) = watch::channel(false);
    let held = tokio::spawn(async move { session.hold(wire, watched).await });
    control.send_modify(|_| {});
    assert_eq!(
        client_frame(&mut server).await,
        (ws::OPCODE_TEXT, signalr::PING.as_bytes().to_vec())
    );
    control.send_replace(true);
    assert_eq!(client_frame(&mut server).await, (ws::OPCODE_CLOSE, vec![]));
    assert_eq!(held.await.unwrap(), None);
    let mut rest = Vec::new();
    server.read_to_end(&mut rest).await.unwrap();
    assert!(rest.is_empty());
}

#[tokio::test]
async fn end_of_stream_is_reported() {
    let (session, wire, server) = connected().await;
    drop(server);
    let (_control, watched) = watch::channel(false);
    assert_eq!(session.hold(wire, watched).await.as_deref(), Some("eof"));
}
