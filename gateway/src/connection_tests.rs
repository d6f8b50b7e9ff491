//! The connection loop driven through in-memory channels with paused time: keep-alive, client
//! timeout, handshake timeout, token expiry and shutdown, without real sockets or real waiting.

use std::pin::Pin;
use std::task::{Context, Poll};

use axum::extract::ws;
use publisher_lib::contract::EventKind;
use tokio::sync::mpsc;

use super::*;
use crate::auth::Role;
use crate::broker::{self, Fanout};
use crate::shutdown::Shutdown;

/// The gateway's end of an in-memory WebSocket.
struct FakeSocket {
    incoming: mpsc::UnboundedReceiver<Result<ws::Message, axum::Error>>,
    outgoing: mpsc::UnboundedSender<ws::Message>,
}

/// The test's end: what the client sends and what it receives.
struct Client {
    send: mpsc::UnboundedSender<Result<ws::Message, axum::Error>>,
    recv: mpsc::UnboundedReceiver<ws::Message>,
}

impl Stream for FakeSocket {
    type Item = Result<ws::Message, axum::Error>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.incoming.poll_recv(cx)
    }
}

impl Sink<ws::Message> for FakeSocket {
    type Error = axum::Error;

    fn poll_ready(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn start_send(self: Pin<&mut Self>, item: ws::Message) -> Result<(), Self::Error> {
        self.outgoing
            .send(item)
            .map_err(|_| axum::Error::new("client gone"))
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn poll_close(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }
}

impl Client {
    fn send(&self, text: &str) {
        self.send
            .send(Ok(ws::Message::Text(text.into())))
            .expect("connection task alive");
    }

    /// The next text message the gateway sent.
    async fn text(&mut self) -> String {
        match self.recv.recv().await.expect("gateway sent something") {
            ws::Message::Text(text) => text.as_str().to_owned(),
            other => panic!("expected text, got {other:?}"),
        }
    }

    /// The close frame's code, after the messages before it.
    async fn close_code(&mut self) -> u16 {
        loop {
            match self.recv.recv().await.expect("gateway sent a close frame") {
                ws::Message::Close(Some(frame)) => return frame.code,
                ws::Message::Close(None) => panic!("close frame without a code"),
                _ => {}
            }
        }
    }

    async fn handshake(&mut self) {
        self.send("{\"protocol\":\"json\",\"version\":1}\u{1e}");
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
    broker::start_memory(groups.clone(), requests, &shutdown);
    let (client_send, incoming) = mpsc::unbounded_channel();
    let (outgoing, client_recv) = mpsc::unbounded_channel();
    let connection = Connection {
        id: groups.next_conn_id(),
        principal,
        groups: groups.clone(),
        settings: Arc::new(settings()),
    };
    let task = tokio::spawn(connection.serve(FakeSocket { incoming, outgoing }));
    Harness {
        client: Client {
            send: client_send,
            recv: client_recv,
        },
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
    h.client.send("{\"type\":6}\u{1e}");
    assert_eq!(h.client.text().await, "{\"type\":6}\u{1e}");
    h.client.send("{\"type\":6}\u{1e}");
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
        h.client.send("{\"type\":6}\u{1e}");
    };
    assert!(started.elapsed() >= Duration::from_secs(9));
    assert!(started.elapsed() <= Duration::from_secs(10));
    assert_eq!(close["allowReconnect"], true);
    assert_eq!(
        close["error"],
        "access token expired; reconnect with a fresh one"
    );
}

#[tokio::test(start_paused = true)]
async fn shutdown_closes_with_reconnect_allowed_and_leaves_the_groups() {
    let mut h = start(dispatcher(Duration::from_secs(3600)));
    h.client.handshake().await;
    h.client.send(
        "{\"type\":1,\"invocationId\":\"1\",\"target\":\"JoinDispatchGroup\",\"arguments\":[\"west\"]}\u{1e}",
    );
    assert_eq!(
        h.client.text().await,
        "{\"invocationId\":\"1\",\"type\":3}\u{1e}"
    );
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
        ));
        assert_eq!(
            h.client.text().await,
            format!("{{\"invocationId\":\"{id}\",\"type\":3}}\u{1e}")
        );
    }
    h.client.send(
        "{\"type\":1,\"invocationId\":\"3\",\"target\":\"JoinDispatchGroup\",\"arguments\":[\"north\"]}\u{1e}",
    );
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
    });
    assert_eq!(
        h.client.text().await,
        "{\"type\":1,\"target\":\"RecommendationReady\",\"arguments\":[{\"x\":1}]}\u{1e}"
    );
}

#[test]
fn an_idle_connection_task_stays_small() {
    // The task's state is what an idle connection costs besides its socket buffers; the
    // handshake and invocation handling are boxed so they do not count.
    let (subscriptions, _requests) = broker::subscriptions(16);
    let groups = Arc::new(Groups::new(subscriptions));
    let (_client_send, incoming) = mpsc::unbounded_channel();
    let (outgoing, _client_recv) = mpsc::unbounded_channel();
    let connection = Connection {
        id: groups.next_conn_id(),
        principal: dispatcher(Duration::from_secs(10)),
        groups: groups.clone(),
        settings: Arc::new(settings()),
    };
    let task = connection.serve(FakeSocket { incoming, outgoing });
    let size = std::mem::size_of_val(&task);
    assert!(size <= 1024, "the connection future is {size} bytes");
}
