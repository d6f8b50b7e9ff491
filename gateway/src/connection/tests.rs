//! The connection loop driven through in-memory channels with paused time: keep-alive, client
//! timeout, handshake timeout, token expiry and shutdown, without real sockets or real waiting.

use bytes::Bytes;
use publisher_lib::contract::EventKind;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

use super::*;
use crate::auth::Role;
use crate::broker::{self, Fanout};
use crate::shutdown::Shutdown;

/// The client's end of an in-memory WebSocket: masks what it sends, reads server frames.
struct Client {
    stream: UnixStream,
}

/// A frame the server sent.
#[derive(Debug, PartialEq)]
enum ServerFrame {
    Text(String),
    Close(u16),
}

impl Client {
    async fn send(&mut self, text: &str) {
        let mask = [1u8, 2, 3, 4];
        let payload = text.as_bytes();
        let mut frame = vec![0x81];
        match payload.len() {
            len @ 0..=125 => frame.push(0x80 | len as u8),
            len => {
                frame.push(0x80 | 126);
                frame.extend_from_slice(&(len as u16).to_be_bytes());
            }
        }
        frame.extend_from_slice(&mask);
        frame.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        self.stream
            .write_all(&frame)
            .await
            .expect("connection task alive");
    }

    async fn frame(&mut self) -> ServerFrame {
        let mut head = [0u8; 2];
        self.stream
            .read_exact(&mut head)
            .await
            .expect("gateway sent a frame");
        assert_eq!(head[1] & 0x80, 0, "server frames are not masked");
        let len = match head[1] & 0x7F {
            126 => usize::from(self.stream.read_u16().await.unwrap()),
            127 => usize::try_from(self.stream.read_u64().await.unwrap()).unwrap(),
            len => usize::from(len),
        };
        let mut payload = vec![0; len];
        self.stream.read_exact(&mut payload).await.unwrap();
        match head[0] {
            0x81 => ServerFrame::Text(String::from_utf8(payload).unwrap()),
            0x88 => ServerFrame::Close(u16::from_be_bytes([payload[0], payload[1]])),
            other => panic!("unexpected frame {other:#x}"),
        }
    }

    /// The next text message the gateway sent.
    async fn text(&mut self) -> String {
        match self.frame().await {
            ServerFrame::Text(text) => text,
            other => panic!("expected text, got {other:?}"),
        }
    }

    /// The close frame's code, after the messages before it.
    async fn close_code(&mut self) -> u16 {
        loop {
            if let ServerFrame::Close(code) = self.frame().await {
                return code;
            }
        }
    }

    async fn handshake(&mut self) {
        self.send("{\"protocol\":\"json\",\"version\":1}\u{1e}")
            .await;
        assert_eq!(self.text().await, "{}\u{1e}");
    }
}

struct Harness {
    client: Client,
    groups: Arc<Groups>,
    /// Keeps the broker task's tracker alive for the test's duration.
    _shutdown: Shutdown,
    task: tokio::task::JoinHandle<()>,
}

fn settings() -> Settings {
    Settings {
        keepalive_interval: Duration::from_secs(15),
        client_timeout: Duration::from_secs(30),
        handshake_timeout: Duration::from_secs(15),
        write_timeout: Duration::from_secs(10),
        max_message_bytes: 32 * 1024,
        outbound_queue: 16,
        max_groups: 2,
        direct_writes: true,
    }
}

fn dispatcher(expires_in: Duration) -> Principal {
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap();
    Principal {
        subject: "d-1".to_owned(),
        role: Role::Dispatcher {
            regions: vec!["west".to_owned(), "east".to_owned(), "north".to_owned()],
        },
        valid_until: (now + expires_in).as_secs(),
    }
}

fn start(principal: Principal) -> Harness {
    let shutdown = Shutdown::new();
    let (subscriptions, requests) = broker::subscriptions(16);
    let groups = Arc::new(Groups::new(subscriptions));
    let broker = broker::start_memory(
        groups.clone(),
        broker::HistorySettings::defaults(),
        requests,
        &shutdown,
    );
    let (client, server) = UnixStream::pair().unwrap();
    let connection = Connection {
        id: groups.next_conn_id(),
        principal,
        groups: groups.clone(),
        broker,
        settings: Arc::new(settings()),
        permit: crate::limits::ConnectionPermit::unlimited(),
    };
    let (reader, writer) = server.into_split();
    let socket = Socket::new(reader, Arc::new(writer), Bytes::new(), 32 * 1024);
    let task = tokio::spawn(connection.serve(socket));
    Harness {
        client: Client { stream: client },
        groups,
        _shutdown: shutdown,
        task,
    }
}

fn close_record(text: &str) -> serde_json::Value {
    let record = text.strip_suffix('\u{1e}').expect("record separator");
    let value: serde_json::Value = serde_json::from_str(record).unwrap();
    assert_eq!(value["type"], 7, "a Close message: {text}");
    value
}

#[tokio::test(start_paused = true)]
async fn a_quiet_server_pings_after_the_keepalive_interval() {
    let mut h = start(dispatcher(Duration::from_secs(3600)));
    h.client.handshake().await;
    let sent_at = tokio::time::Instant::now();
    assert_eq!(h.client.text().await, "{\"type\":6}\u{1e}");
    assert_eq!(sent_at.elapsed(), Duration::from_secs(15));
    // The client answers, so it stays connected past the client timeout.
    h.client.send("{\"type\":6}\u{1e}").await;
    assert_eq!(h.client.text().await, "{\"type\":6}\u{1e}");
    h.client.send("{\"type\":6}\u{1e}").await;
    assert_eq!(h.client.text().await, "{\"type\":6}\u{1e}");
    assert_eq!(sent_at.elapsed(), Duration::from_secs(45));
}

#[tokio::test(start_paused = true)]
async fn a_silent_client_is_closed_after_the_client_timeout_with_reconnect_allowed() {
    let mut h = start(dispatcher(Duration::from_secs(3600)));
    h.client.handshake().await;
    let started = tokio::time::Instant::now();
    assert_eq!(h.client.text().await, "{\"type\":6}\u{1e}");
    let close = close_record(&h.client.text().await);
    assert_eq!(started.elapsed(), Duration::from_secs(30));
    assert_eq!(close["allowReconnect"], true);
    assert_eq!(
        close["error"],
        "no message received from the client within the client timeout"
    );
    assert_eq!(h.client.close_code().await, 1000);
    h.task.await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn a_handshake_not_completed_in_time_is_canceled() {
    let mut h = start(dispatcher(Duration::from_secs(3600)));
    let started = tokio::time::Instant::now();
    assert_eq!(
        h.client.text().await,
        "{\"error\":\"Handshake was canceled.\"}\u{1e}"
    );
    assert_eq!(started.elapsed(), Duration::from_secs(15));
    assert_eq!(h.client.close_code().await, 1008);
}

#[tokio::test(start_paused = true)]
async fn an_expired_token_closes_the_connection_so_the_client_returns_with_a_fresh_one() {
    let mut h = start(dispatcher(Duration::from_secs(10)));
    h.client.handshake().await;
    let started = tokio::time::Instant::now();
    let close = loop {
        let text = h.client.text().await;
        if text != "{\"type\":6}\u{1e}" {
            break close_record(&text);
        }
        h.client.send("{\"type\":6}\u{1e}").await;
    };
    assert!(started.elapsed() >= Duration::from_secs(9));
    assert!(started.elapsed() <= Duration::from_secs(10));
    assert_eq!(close["allowReconnect"], true);
    assert_eq!(
        close["error"],
        "access token expired; reconnect with a fresh one"
    );
}

/// Checks a join's completion: the group and its head position (nothing published yet).
fn assert_joined(record: &str, id: &str, group: &str) {
    let completion: serde_json::Value =
        serde_json::from_str(record.trim_end_matches('\u{1e}')).unwrap();
    assert_eq!(completion["type"], 3, "{completion}");
    assert_eq!(completion["invocationId"], id, "{completion}");
    let result = &completion["result"];
    assert_eq!(result["group"], group, "{completion}");
    assert_eq!(result["seq"], 0, "{completion}");
    assert_eq!(
        result["epoch"].as_str().map(str::len),
        Some(32),
        "{completion}"
    );
    assert!(result.get("recovered").is_none(), "no position was given");
}

#[tokio::test(start_paused = true)]
async fn shutdown_closes_with_reconnect_allowed_and_leaves_the_groups() {
    let mut h = start(dispatcher(Duration::from_secs(3600)));
    h.client.handshake().await;
    h.client.send(
        "{\"type\":1,\"invocationId\":\"1\",\"target\":\"JoinDispatchGroup\",\"arguments\":[\"west\"]}\u{1e}",
    ).await;
    assert_joined(&h.client.text().await, "1", "/dispatch/west");
    assert_eq!(h.groups.group_count(), 1);
    assert_eq!(h.groups.close_all(crate::outbound::Closing::Shutdown), 1);
    let close = close_record(&h.client.text().await);
    assert_eq!(close["allowReconnect"], true);
    assert_eq!(h.client.close_code().await, 1001);
    h.task.await.unwrap();
    assert_eq!(h.groups.group_count(), 0);
}

#[tokio::test(start_paused = true)]
async fn joined_connections_receive_event_frames_and_the_group_limit_holds() {
    let mut h = start(dispatcher(Duration::from_secs(3600)));
    h.client.handshake().await;
    for (id, region) in [("1", "west"), ("2", "east")] {
        h.client.send(&format!(
            "{{\"type\":1,\"invocationId\":\"{id}\",\"target\":\"JoinDispatchGroup\",\"arguments\":[\"{region}\"]}}\u{1e}"
        )).await;
        assert_joined(&h.client.text().await, id, &format!("/dispatch/{region}"));
    }
    h.client.send(
        "{\"type\":1,\"invocationId\":\"3\",\"target\":\"JoinDispatchGroup\",\"arguments\":[\"north\"]}\u{1e}",
    ).await;
    let refused: serde_json::Value =
        serde_json::from_str(h.client.text().await.trim_end_matches('\u{1e}')).unwrap();
    assert!(
        refused["error"]
            .as_str()
            .unwrap()
            .contains("already in 2 groups"),
        "{refused}"
    );
    h.groups.fan_out(&crate::broker::Publication {
        group: publisher_lib::contract::Group::try_dispatch("east").unwrap(),
        kind: EventKind::RecommendationReady,
        payload: bytes::Bytes::from_static(b"{\"x\":1}"),
        published_at: SystemTime::now(),
        position: None,
    });
    assert_eq!(
        h.client.text().await,
        "{\"type\":1,\"target\":\"RecommendationReady\",\"arguments\":[{\"x\":1}]}\u{1e}"
    );
}

#[tokio::test]
async fn an_idle_connection_task_stays_small() {
    // The task's state is what an idle connection costs besides its socket buffers; the
    // handshake and invocation handling are boxed so they do not count.
    let (subscriptions, requests) = broker::subscriptions(16);
    let groups = Arc::new(Groups::new(subscriptions));
    let shutdown = Shutdown::new();
    let broker = broker::start_memory(
        groups.clone(),
        broker::HistorySettings::defaults(),
        requests,
        &shutdown,
    );
    let (_client, server) = UnixStream::pair().unwrap();
    let (reader, writer) = server.into_split();
    let connection = Connection {
        id: groups.next_conn_id(),
        principal: dispatcher(Duration::from_secs(10)),
        groups: groups.clone(),
        broker,
        settings: Arc::new(settings()),
        permit: crate::limits::ConnectionPermit::unlimited(),
    };
    let task = connection.serve(Socket::new(
        reader,
        Arc::new(writer),
        Bytes::new(),
        32 * 1024,
    ));
    let size = std::mem::size_of_val(&task);
    assert!(size <= 1536, "the connection future is {size} bytes");
}
