//! The connection loop driven through in-memory channels with paused time: keep-alive, client
//! timeout, handshake timeout, token expiry and shutdown, without real sockets or real waiting.

use bytes::Bytes;
use publisher_lib::contract::EventKind;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

use super::*;
use crate::auth::Role;
use crate::broker::{self, Fanout, SubscriptionRequests};
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
        queue_budget: 16 + 1000,
        max_invocations_per_second: 5,
        max_joins_per_second: 3,
        direct_writes: true,
        stateful_grace: Duration::from_secs(15),
        stateful_buffer: 100_000,
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
    start_with(principal, settings(), |writer| Arc::new(writer))
}

/// Starts a connection task with `settings`, writing through the wire `wire` makes of the
/// socket's write half.
fn start_with(
    principal: Principal,
    settings: Settings,
    wire: impl FnOnce(tokio::net::unix::OwnedWriteHalf) -> Arc<dyn crate::outbound::Wire>,
) -> Harness {
    let (subscriptions, requests) = broker::subscriptions(16);
    spawn_connection(
        principal,
        settings,
        wire,
        subscriptions,
        Some(requests),
        None,
    )
}

/// Starts a connection task whose registry's subscription requests the test answers: they
/// are returned, and the memory broker (which serves the history) never sees them.
fn start_answering_subscriptions(principal: Principal) -> (Harness, SubscriptionRequests) {
    let (subscriptions, requests) = broker::subscriptions(16);
    let harness = spawn_connection(
        principal,
        settings(),
        |writer| Arc::new(writer),
        subscriptions,
        None,
        None,
    );
    (harness, requests)
}

/// A registry asking `subscriptions`, a memory broker answering `requests` (or nothing), and a
/// connection task on one end of a socket pair.
fn spawn_connection(
    principal: Principal,
    settings: Settings,
    wire: impl FnOnce(tokio::net::unix::OwnedWriteHalf) -> Arc<dyn crate::outbound::Wire>,
    subscriptions: broker::Subscriptions,
    requests: Option<SubscriptionRequests>,
    resume: Option<ResumeSlot<tokio::net::unix::OwnedReadHalf>>,
) -> Harness {
    let shutdown = Shutdown::new();
    let groups = Arc::new(Groups::new(subscriptions));
    let requests = requests.unwrap_or_else(|| broker::subscriptions(16).1);
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
        settings: Arc::new(settings),
        permit: crate::limits::ConnectionPermit::unlimited(),
        carried: None,
    };
    let (reader, writer) = server.into_split();
    let socket = Socket::new(reader, wire(writer), Bytes::new(), 32 * 1024);
    let task = tokio::spawn(connection.serve(socket, resume));
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
        carried: None,
    };
    let task = connection.serve(
        Socket::new(reader, Arc::new(writer), Bytes::new(), 32 * 1024),
        None,
    );
    let size = std::mem::size_of_val(&task);
    // 1536 before the admission permit (48 bytes) and the cleanup guard joined the task.
    assert!(size <= 1920, "the connection future is {size} bytes");
}

const HANDSHAKE: &str = "{\"protocol\":\"json\",\"version\":1}\u{1e}";
const JOIN_WEST: &str = "{\"type\":1,\"invocationId\":\"1\",\"target\":\"JoinDispatchGroup\",\"arguments\":[\"west\"]}\u{1e}";

impl Client {
    /// Sends a masked ping frame carrying `payload`.
    async fn ping(&mut self, payload: &[u8]) {
        let mask = [9u8, 8, 7, 6];
        let mut frame = vec![0x89, 0x80 | payload.len() as u8];
        frame.extend_from_slice(&mask);
        frame.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        self.stream.write_all(&frame).await.unwrap();
    }
}

/// A Prometheus recorder for one test. The runtime is current-thread, so once it is the
/// thread's default the connection task records into it too.
fn recorder() -> metrics_exporter_prometheus::PrometheusRecorder {
    metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder()
}

/// The value of the sample `series` (name and labels as rendered), if it was recorded.
fn sample(recorder: &metrics_exporter_prometheus::PrometheusRecorder, series: &str) -> Option<f64> {
    recorder.handle().render().lines().find_map(|line| {
        let value = line.strip_prefix(series)?.strip_prefix(' ')?;
        value.parse().ok()
    })
}

/// The close counter's series for `reason`.
fn closed(reason: &str) -> String {
    format!(
        "{}{{reason=\"{reason}\"}}",
        crate::metrics::CONNECTIONS_CLOSED
    )
}

/// The limit counter's series for `limit`.
fn limit_exceeded(limit: &str) -> String {
    format!("{}{{limit=\"{limit}\"}}", crate::metrics::LIMIT_EXCEEDED)
}

/// Asserts the connection left nothing behind: no registry entry, no group, gauge at zero,
/// and one close recorded for `reason`.
fn assert_cleaned_up(
    groups: &Groups,
    recorder: &metrics_exporter_prometheus::PrometheusRecorder,
    reason: &str,
) {
    assert_eq!(
        groups.connection_count(),
        0,
        "the registry forgot the connection"
    );
    assert_eq!(groups.group_count(), 0, "the connection left its group");
    assert_eq!(
        sample(recorder, crate::metrics::CONNECTIONS_ACTIVE),
        Some(0.0),
        "the gauge is back to zero"
    );
    assert_eq!(sample(recorder, &closed(reason)), Some(1.0));
}

/// Handshakes and joins `/dispatch/west`, checking the registry sees the member.
async fn handshake_and_join_west(h: &mut Harness) {
    h.client.handshake().await;
    h.client.send(JOIN_WEST).await;
    assert_joined(&h.client.text().await, "1", "/dispatch/west");
    assert_eq!(h.groups.connection_count(), 1);
    assert_eq!(
        h.groups
            .member_count(&publisher_lib::contract::Group::try_dispatch("west").unwrap()),
        1
    );
}

#[tokio::test(start_paused = true)]
async fn a_connection_task_dropped_mid_way_leaves_its_groups_unregisters_and_counts_the_close() {
    let recorder = recorder();
    let _local = ::metrics::set_default_local_recorder(&recorder);
    let mut h = start(dispatcher(Duration::from_secs(3600)));
    handshake_and_join_west(&mut h).await;
    assert_eq!(
        sample(&recorder, crate::metrics::CONNECTIONS_ACTIVE),
        Some(1.0)
    );

    // Dropping the serve future (what abort does) is the cancellation path.
    h.task.abort();
    let ended = h.task.await;
    assert!(ended.unwrap_err().is_cancelled());
    assert_cleaned_up(&h.groups, &recorder, "aborted");
}

/// A write side that panics when asked to write a SignalR ping, standing in for any bug
/// inside the connection task.
#[derive(Debug)]
struct PanicsOnPing(tokio::net::unix::OwnedWriteHalf);

impl crate::outbound::Wire for PanicsOnPing {
    fn try_write(&self, buf: &[u8]) -> std::io::Result<usize> {
        assert!(
            !buf.windows(codec::PING.len())
                .any(|w| w == codec::PING.as_bytes()),
            "test bug inside the connection task"
        );
        self.0.try_write(buf)
    }

    fn try_write_vectored(&self, bufs: &[std::io::IoSlice<'_>]) -> std::io::Result<usize> {
        self.0.try_write_vectored(bufs)
    }

    fn poll_write_ready(
        &self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        self.0.as_ref().poll_write_ready(cx)
    }
}

#[tokio::test(start_paused = true)]
async fn a_connection_task_that_panics_leaves_its_groups_unregisters_and_counts_the_close() {
    let recorder = recorder();
    let _local = ::metrics::set_default_local_recorder(&recorder);
    let mut h = start_with(
        dispatcher(Duration::from_secs(3600)),
        settings(),
        |writer| Arc::new(PanicsOnPing(writer)),
    );
    handshake_and_join_west(&mut h).await;

    // The keep-alive ping comes after 15 quiet seconds, and its write panics.
    let ended = h.task.await;
    assert!(ended.unwrap_err().is_panic());
    assert_cleaned_up(&h.groups, &recorder, "aborted");
}

/// What a [`ScriptedWire`] took, and how much more it takes before it would block.
#[derive(Debug)]
struct WireState {
    budget: usize,
    waker: Option<std::task::Waker>,
    /// Every write fails from now on, as on a socket whose peer is gone.
    broken: bool,
}

/// A socket write side the test controls: it takes at most its budget (then would block until
/// the test grants more) and keeps every byte it took.
#[derive(Debug)]
struct ScriptedWire {
    state: std::sync::Mutex<WireState>,
    taken: tokio::sync::watch::Sender<Vec<u8>>,
}

impl ScriptedWire {
    fn new() -> Arc<Self> {
        Arc::new(Self {
            state: std::sync::Mutex::new(WireState {
                budget: usize::MAX,
                waker: None,
                broken: false,
            }),
            taken: tokio::sync::watch::Sender::new(Vec::new()),
        })
    }

    /// From now on it takes `budget` more bytes, and wakes a writer waiting for room.
    fn set_budget(&self, budget: usize) {
        let mut state = self.state.lock().unwrap();
        state.budget = budget;
        if budget > 0
            && let Some(waker) = state.waker.take()
        {
            waker.wake();
        }
    }

    /// Every write fails from now on.
    fn break_pipe(&self) {
        self.state.lock().unwrap().broken = true;
    }

    /// Every byte taken so far.
    fn bytes(&self) -> Vec<u8> {
        self.taken.borrow().clone()
    }

    /// Waits until `enough` holds for the bytes taken.
    async fn wait_for(&self, enough: impl Fn(&[u8]) -> bool) {
        let mut taken = self.taken.subscribe();
        taken.wait_for(|bytes| enough(bytes)).await.unwrap();
    }
}

impl crate::outbound::Wire for ScriptedWire {
    fn try_write(&self, buf: &[u8]) -> std::io::Result<usize> {
        self.try_write_vectored(&[std::io::IoSlice::new(buf)])
    }

    fn try_write_vectored(&self, bufs: &[std::io::IoSlice<'_>]) -> std::io::Result<usize> {
        let mut state = self.state.lock().unwrap();
        if state.broken {
            return Err(std::io::ErrorKind::BrokenPipe.into());
        }
        if state.budget == 0 {
            return Err(std::io::ErrorKind::WouldBlock.into());
        }
        let mut took = 0;
        for buf in bufs {
            let n = buf.len().min(state.budget);
            self.taken
                .send_modify(|taken| taken.extend_from_slice(&buf[..n]));
            state.budget -= n;
            took += n;
            if state.budget == 0 {
                break;
            }
        }
        Ok(took)
    }

    fn poll_write_ready(
        &self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let mut state = self.state.lock().unwrap();
        if state.budget > 0 || state.broken {
            return std::task::Poll::Ready(Ok(()));
        }
        state.waker = Some(cx.waker().clone());
        std::task::Poll::Pending
    }
}

/// The handshake's accepted frame as the server writes it.
const ACCEPTED_FRAME: &[u8] = b"\x81\x03{}\x1e";

#[tokio::test(start_paused = true)]
async fn a_client_that_pings_and_never_reads_is_closed_as_a_slow_consumer_after_the_write_timeout()
{
    let recorder = recorder();
    let _local = ::metrics::set_default_local_recorder(&recorder);
    let wire = ScriptedWire::new();
    let server_side = Arc::clone(&wire);
    let mut h = start_with(dispatcher(Duration::from_secs(3600)), settings(), |_| {
        server_side
    });
    h.client.send(HANDSHAKE).await;
    wire.wait_for(|bytes| bytes == ACCEPTED_FRAME).await;

    // The client stops reading: the socket takes nothing more, and pings keep coming.
    wire.set_budget(0);
    let started = tokio::time::Instant::now();
    h.client.ping(b"are you there").await;
    // Well before the client timeout (30 s), which would otherwise end it.
    let ended = tokio::time::timeout(Duration::from_secs(20), h.task).await;
    assert!(ended.is_ok(), "the connection task is stuck writing a pong");
    // The write timeout (10 s), then the best-effort close (1 s).
    assert_eq!(started.elapsed(), Duration::from_secs(11));
    assert_eq!(sample(&recorder, &closed("slow_consumer")), Some(1.0));
}

/// The handshake and a join of west, answered through `wire`; returns how many bytes the wire
/// took by then.
async fn handshake_and_join_west_through(h: &mut Harness, wire: &ScriptedWire) -> usize {
    h.client.send(HANDSHAKE).await;
    wire.wait_for(|bytes| bytes == ACCEPTED_FRAME).await;
    h.client.send(JOIN_WEST).await;
    wire.wait_for(|bytes| bytes.ends_with(b"\x1e") && bytes.len() > ACCEPTED_FRAME.len())
        .await;
    wire.bytes().len()
}

#[tokio::test(start_paused = true)]
async fn a_direct_fan_out_write_never_lands_inside_a_half_written_pong() {
    let wire = ScriptedWire::new();
    let server_side = Arc::clone(&wire);
    let mut h = start_with(dispatcher(Duration::from_secs(3600)), settings(), |_| {
        server_side
    });
    let before = handshake_and_join_west_through(&mut h, &wire).await;

    // The socket takes three bytes of the pong, then is full.
    wire.set_budget(3);
    h.client.ping(b"hello").await;
    wire.wait_for(|bytes| bytes.len() == before + 3).await;
    // Room again; before the connection task runs, fan-out finds the queue empty.
    wire.set_budget(usize::MAX);
    h.groups.fan_out(&crate::broker::Publication {
        group: publisher_lib::contract::Group::try_dispatch("west").unwrap(),
        kind: EventKind::RecommendationReady,
        payload: bytes::Bytes::from_static(b"{\"x\":1}"),
        published_at: SystemTime::now(),
        position: None,
    });
    let event: &[u8] =
        b"{\"type\":1,\"target\":\"RecommendationReady\",\"arguments\":[{\"x\":1}]}\x1e";
    let pong: &[u8] = b"\x8a\x05hello";
    let whole = before + pong.len() + 2 + event.len();
    wire.wait_for(|bytes| bytes.len() >= whole).await;
    let bytes = wire.bytes();
    assert_eq!(
        &bytes[before..before + pong.len()],
        pong,
        "the pong is whole"
    );
    assert_eq!(&bytes[before + pong.len() + 2..], event, "then the event");
}

#[tokio::test(start_paused = true)]
async fn a_record_begun_in_the_handshake_message_is_completed_by_the_next_message() {
    let mut h = start(dispatcher(Duration::from_secs(3600)));
    let (first, rest) = JOIN_WEST.split_at(30);
    h.client.send(&format!("{HANDSHAKE}{first}")).await;
    assert_eq!(h.client.text().await, "{}\u{1e}");
    h.client.send(rest).await;
    assert_joined(&h.client.text().await, "1", "/dispatch/west");
}

#[tokio::test(start_paused = true)]
async fn a_join_the_broker_fails_says_unavailable_without_the_brokers_words() {
    // The test answers the registry's requests, as a Redis cluster that moved the slot would.
    let (mut h, mut requests) =
        start_answering_subscriptions(dispatcher(Duration::from_secs(3600)));
    tokio::spawn(async move {
        while let Some(request) = requests.recv().await {
            if let broker::SubscriptionRequest::Subscribe { ack, .. } = request {
                let _ = ack.send(Err(broker::BrokerError::Unavailable(
                    "MOVED 3999 10.0.0.7:6379".to_owned(),
                )));
            }
        }
    });
    h.client.handshake().await;
    h.client.send(JOIN_WEST).await;
    let completion: serde_json::Value =
        serde_json::from_str(h.client.text().await.trim_end_matches('\u{1e}')).unwrap();
    assert_eq!(
        completion,
        serde_json::json!({
            "type": 3,
            "invocationId": "1",
            "error": "An unexpected error occurred invoking 'JoinDispatchGroup' on the server. HubException: the group is unavailable; try again"
        })
    );
    assert_eq!(h.groups.group_count(), 0, "a failed join leaves no member");
}

#[test]
fn a_token_bucket_allows_a_burst_then_its_rate_and_calls_a_sustained_flood_flooding() {
    let start = tokio::time::Instant::now();
    let mut bucket = rate::TokenBucket::new(4, start);
    let verdicts: Vec<_> = (0..6).map(|_| bucket.take(start)).collect();
    assert_eq!(
        verdicts,
        [
            Verdict::Allowed,
            Verdict::Allowed,
            Verdict::Allowed,
            Verdict::Allowed,
            Verdict::Refused,
            Verdict::Refused
        ]
    );
    // A quarter of a second earns one token.
    let later = start + Duration::from_millis(250);
    assert_eq!(bucket.take(later), Verdict::Allowed);
    assert_eq!(bucket.take(later), Verdict::Refused);
    // Ten bursts' worth of refusals within a second is a flood (3 refused so far).
    for _ in 3..40 {
        assert_eq!(bucket.take(later), Verdict::Refused);
    }
    assert_eq!(bucket.take(later), Verdict::Flooding);
    // A full second later the bucket is full again and the count starts over.
    let rested = later + Duration::from_secs(1);
    assert_eq!(bucket.take(rested), Verdict::Allowed);
}

/// The completion for `id` in `records`, parsed.
fn completion(record: &str) -> serde_json::Value {
    serde_json::from_str(record.trim_end_matches('\u{1e}')).unwrap()
}

fn leave_west(id: usize) -> String {
    leave(&id.to_string(), "west")
}

#[tokio::test(start_paused = true)]
async fn invocations_past_the_rate_limit_fail_with_a_reason_until_tokens_come_back() {
    let recorder = recorder();
    let _local = ::metrics::set_default_local_recorder(&recorder);
    let mut h = start(dispatcher(Duration::from_secs(3600)));
    h.client.handshake().await;
    // The limit is 5 per second: five leaves pass, the sixth in the same instant does not.
    let burst: String = (1..=6).map(leave_west).collect();
    h.client.send(&burst).await;
    for id in 1..=5 {
        let done = completion(&h.client.text().await);
        assert_eq!(
            done,
            serde_json::json!({"type": 3, "invocationId": id.to_string()})
        );
    }
    assert_eq!(
        completion(&h.client.text().await),
        serde_json::json!({
            "type": 3,
            "invocationId": "6",
            "error": "An unexpected error occurred invoking 'LeaveDispatchGroup' on the server. HubException: too many invocations; slow down"
        })
    );
    assert_eq!(
        sample(&recorder, &limit_exceeded("invocations_per_connection")),
        Some(1.0)
    );
    // A fifth of a second earns one more.
    tokio::time::advance(Duration::from_millis(200)).await;
    h.client.send(&leave_west(7)).await;
    assert_eq!(
        completion(&h.client.text().await),
        serde_json::json!({"type": 3, "invocationId": "7"})
    );
}

#[tokio::test(start_paused = true)]
async fn joins_past_their_own_rate_limit_fail_with_a_reason() {
    let recorder = recorder();
    let _local = ::metrics::set_default_local_recorder(&recorder);
    let mut h = start(dispatcher(Duration::from_secs(3600)));
    h.client.handshake().await;
    // Three joins per second: the fourth (still within the invocation limit) is refused.
    let joins: String = (1..=4)
        .map(|id| {
            JOIN_WEST.replace(
                "\"invocationId\":\"1\"",
                &format!("\"invocationId\":\"{id}\""),
            )
        })
        .collect();
    h.client.send(&joins).await;
    for id in 1..=3 {
        assert_joined(&h.client.text().await, &id.to_string(), "/dispatch/west");
    }
    assert_eq!(
        completion(&h.client.text().await)["error"],
        "An unexpected error occurred invoking 'JoinDispatchGroup' on the server. HubException: too many joins; slow down"
    );
    assert_eq!(
        sample(&recorder, &limit_exceeded("joins_per_connection")),
        Some(1.0)
    );
}

#[tokio::test(start_paused = true)]
async fn a_client_flooding_far_past_the_limit_is_closed_without_reconnect() {
    let recorder = recorder();
    let _local = ::metrics::set_default_local_recorder(&recorder);
    let mut h = start(dispatcher(Duration::from_secs(3600)));
    h.client.handshake().await;
    // 5 allowed, then ten bursts (50) refused, and the next one is a flood.
    let flood: String = (1..=56).map(leave_west).collect();
    h.client.send(&flood).await;
    let close = loop {
        let text = h.client.text().await;
        if completion(&text)["type"] == 7 {
            break close_record(&text);
        }
    };
    assert_eq!(
        close,
        serde_json::json!({
            "type": 7,
            "error": "too many invocations, far past the limit; slow down",
            "allowReconnect": false
        })
    );
    assert_eq!(h.client.close_code().await, 1008);
    h.task.await.unwrap();
    assert_eq!(sample(&recorder, &closed("flooding")), Some(1.0));
}

#[tokio::test(start_paused = true)]
async fn a_connection_task_dropped_while_its_join_waits_for_the_broker_is_not_left_in_the_group() {
    // The registry's subscription requests go unanswered: the first join waits for its ack.
    let (mut h, _unanswered) = start_answering_subscriptions(dispatcher(Duration::from_secs(3600)));
    let groups = h.groups.clone();
    h.client.handshake().await;
    h.client.send(JOIN_WEST).await;
    let west = publisher_lib::contract::Group::try_dispatch("west").unwrap();
    // Paused time: the clock only moves once the task is parked on the broker's answer.
    tokio::time::sleep(Duration::from_millis(1)).await;
    assert_eq!(groups.member_count(&west), 1, "held while the join waits");

    h.task.abort();
    assert!(h.task.await.unwrap_err().is_cancelled());
    assert_eq!(groups.member_count(&west), 0);
    assert_eq!(groups.group_count(), 0);
    assert_eq!(groups.connection_count(), 0);
}

/// A stateful connection (its slot registered as `id` in `registry`) on a socket pair.
fn start_stateful(
    registry: &Arc<Resumable<tokio::net::unix::OwnedReadHalf>>,
    id: &str,
    settings: Settings,
) -> Harness {
    start_stateful_with(registry, id, settings, |writer| Arc::new(writer))
}

/// [`start_stateful`] writing through the wire `wire` makes of the socket's write half.
fn start_stateful_with(
    registry: &Arc<Resumable<tokio::net::unix::OwnedReadHalf>>,
    id: &str,
    settings: Settings,
    wire: impl FnOnce(tokio::net::unix::OwnedWriteHalf) -> Arc<dyn crate::outbound::Wire>,
) -> Harness {
    let Claim::New(slot) = registry.claim(id, 0, u64::MAX) else {
        panic!("a new connection id");
    };
    let (subscriptions, requests) = broker::subscriptions(16);
    spawn_connection(
        dispatcher(Duration::from_secs(3600)),
        settings,
        wire,
        subscriptions,
        Some(requests),
        Some(slot),
    )
}

/// Hands a new socket to the stateful connection `id`, as an upgrade with its token does, and
/// returns the client's end.
async fn resume(registry: &Arc<Resumable<tokio::net::unix::OwnedReadHalf>>, id: &str) -> Client {
    let Claim::Resume(transports) = registry.claim(id, 0, u64::MAX) else {
        panic!("the connection is alive");
    };
    let (client, server) = UnixStream::pair().unwrap();
    let (reader, writer) = server.into_split();
    let socket = Socket::new(reader, Arc::new(writer), Bytes::new(), 32 * 1024);
    let valid_until = dispatcher(Duration::from_secs(3600)).valid_until;
    transports
        .send(Transport::Resumed(Box::new(Resumed {
            socket,
            valid_until,
        })))
        .await
        .expect("the connection takes its new transport");
    Client { stream: client }
}

fn publish_west(groups: &Groups, payload: &'static [u8]) {
    groups.fan_out(&crate::broker::Publication {
        group: publisher_lib::contract::Group::try_dispatch("west").unwrap(),
        kind: EventKind::RecommendationReady,
        payload: bytes::Bytes::from_static(payload),
        published_at: SystemTime::now(),
        position: None,
    });
}

fn leave(id: &str, region: &str) -> String {
    format!(
        "{{\"type\":1,\"invocationId\":\"{id}\",\"target\":\"LeaveDispatchGroup\",\"arguments\":[\"{region}\"]}}\u{1e}"
    )
}

fn event(payload: &str) -> String {
    format!("{{\"type\":1,\"target\":\"RecommendationReady\",\"arguments\":[{payload}]}}\u{1e}")
}

#[tokio::test(start_paused = true)]
async fn a_stateful_connection_resumes_on_a_new_socket_with_sequence_replay_and_what_came_meanwhile()
 {
    let registry = Arc::default();
    let mut h = start_stateful(&registry, "c-1", settings());
    // Join: the client's message 1, answered by the server's message 1, acknowledged a second
    // later.
    handshake_and_join_west(&mut h).await;
    assert_eq!(h.client.text().await, "{\"type\":8,\"sequenceId\":1}\u{1e}");
    publish_west(&h.groups, b"{\"n\":1}");
    publish_west(&h.groups, b"{\"n\":2}");
    assert_eq!(h.client.text().await, event("{\"n\":1}"));
    assert_eq!(h.client.text().await, event("{\"n\":2}"));
    // The client acknowledges up to the first event and invokes once more (its message 2,
    // answered by the server's message 4: once that answer is read, the Ack was processed);
    // then its socket is cut before the server acknowledges message 2.
    h.client.send("{\"type\":8,\"sequenceId\":2}\u{1e}").await;
    h.client.send(&leave("2", "east")).await;
    assert_eq!(completion(&h.client.text().await)["invocationId"], "2");
    drop(h.client);
    publish_west(&h.groups, b"{\"n\":3}");

    let mut client = resume(&registry, "c-1").await;
    assert_eq!(
        client.text().await,
        "{\"type\":9,\"sequenceId\":3}\u{1e}",
        "the oldest unacknowledged message"
    );
    assert_eq!(client.text().await, event("{\"n\":2}"), "replayed");
    assert_eq!(
        completion(&client.text().await)["invocationId"],
        "2",
        "replayed"
    );
    assert_eq!(
        client.text().await,
        event("{\"n\":3}"),
        "published meanwhile"
    );
    // The client's side: its Sequence from its oldest unacknowledged message (2), that message
    // again, which is dropped, then a new invocation, which is answered and acknowledged.
    client.send("{\"type\":9,\"sequenceId\":2}\u{1e}").await;
    client.send(&leave("2", "east")).await;
    client.send(&leave("3", "west")).await;
    let answer = completion(&client.text().await);
    assert_eq!(
        answer["invocationId"], "3",
        "the repeat got no answer: {answer}"
    );
    assert_eq!(client.text().await, "{\"type\":8,\"sequenceId\":3}\u{1e}");
    assert_eq!(registry.live(), 1);
    assert!(!h.task.is_finished());
}

#[tokio::test(start_paused = true)]
async fn a_stateful_connection_not_resumed_within_the_grace_period_ends_and_its_id_is_refused() {
    let registry = Arc::default();
    let mut h = start_stateful(&registry, "c-2", settings());
    handshake_and_join_west(&mut h).await;
    drop(h.client);
    // Paused time runs ahead to the end of the grace period.
    h.task.await.unwrap();
    assert_eq!(h.groups.connection_count(), 0, "left its groups");
    assert!(matches!(registry.claim("c-2", 0, u64::MAX), Claim::Ended));
}

#[tokio::test(start_paused = true)]
async fn a_client_close_frame_ends_a_stateful_connection_at_once() {
    let registry = Arc::default();
    let mut h = start_stateful(&registry, "c-3", settings());
    handshake_and_join_west(&mut h).await;
    // A masked close frame, code 1000, as `connection.stop()` sends.
    h.client
        .stream
        .write_all(&[0x88, 0x82, 0, 0, 0, 0, 0x03, 0xE8])
        .await
        .unwrap();
    let before = tokio::time::Instant::now();
    h.task.await.unwrap();
    assert!(
        before.elapsed() < Duration::from_secs(1),
        "no grace period after a close"
    );
    assert!(matches!(registry.claim("c-3", 0, u64::MAX), Claim::Ended));
}

#[tokio::test(start_paused = true)]
async fn a_full_stateful_buffer_holds_events_back_until_the_client_acknowledges() {
    let registry = Arc::default();
    let mut h = start_stateful(
        &registry,
        "c-4",
        Settings {
            stateful_buffer: 1024,
            ..settings()
        },
    );
    handshake_and_join_west(&mut h).await;
    assert_eq!(h.client.text().await, "{\"type\":8,\"sequenceId\":1}\u{1e}");
    const BIG: &[u8] = b"{\"pad\":\"0123456789012345678901234567890123456789012345678901234567890123456789012345678901234567890123456789012345678901234567890123456789012345678901234567890123456789012345678901234567890123456789012345678901234567890123456789012345678901234567890123456789012345678901234567890123456789012345678901234567890123456789\"}";
    for _ in 0..8 {
        publish_west(&h.groups, BIG);
    }
    // About 1 KiB goes out (the completion plus three events of ~350 bytes), then nothing
    // until an Ack: the next frame the client sees is a ping, 15 s later.
    let mut events = 0;
    loop {
        let text = h.client.text().await;
        if text == codec::PING {
            break;
        }
        assert!(text.contains("RecommendationReady"), "{text}");
        events += 1;
    }
    assert!(
        (2..8).contains(&events),
        "{events} events before the buffer was full"
    );
    // Each Ack lets more out, until all eight arrived, in order, none lost.
    let mut seen = events;
    while seen < 8 {
        h.client
            .send(&format!("{{\"type\":8,\"sequenceId\":{}}}\u{1e}", 1 + seen))
            .await;
        let text = h.client.text().await;
        assert!(text.contains("RecommendationReady"), "{text}");
        seen += 1;
    }
}

#[tokio::test(start_paused = true)]
async fn an_event_written_directly_in_part_before_the_socket_broke_is_replayed_whole_once() {
    let registry = Arc::default();
    let wire = ScriptedWire::new();
    let server_side = Arc::clone(&wire);
    let mut h = start_stateful_with(&registry, "c-5", settings(), |_| server_side);
    let before = handshake_and_join_west_through(&mut h, &wire).await;

    // Fan-out writes the first 5 bytes of the event to the idle connection's socket, which
    // then breaks before the connection task can write the rest.
    wire.set_budget(5);
    publish_west(&h.groups, b"{\"n\":1}");
    assert_eq!(wire.bytes().len(), before + 5, "written directly, in part");
    wire.break_pipe();

    // The client comes back: the join's completion (message 1) and the event (message 2),
    // whole, then what is published next, written directly to the new socket.
    let mut client = resume(&registry, "c-5").await;
    assert_eq!(client.text().await, "{\"type\":9,\"sequenceId\":1}\u{1e}");
    assert_joined(&client.text().await, "1", "/dispatch/west");
    assert_eq!(client.text().await, event("{\"n\":1}"));
    publish_west(&h.groups, b"{\"n\":2}");
    assert_eq!(client.text().await, event("{\"n\":2}"));
    // The client acknowledges those three messages and invokes once more (answered by
    // message 4: once that answer is read, the Ack was processed). On the next resume only
    // that answer is replayed: the event was numbered once, not once more for its rest.
    client.send("{\"type\":8,\"sequenceId\":3}\u{1e}").await;
    client.send(&leave("2", "east")).await;
    assert_eq!(completion(&client.text().await)["invocationId"], "2");
    drop(client);
    let mut client = resume(&registry, "c-5").await;
    assert_eq!(client.text().await, "{\"type\":9,\"sequenceId\":4}\u{1e}");
    assert_eq!(completion(&client.text().await)["invocationId"], "2");
}

#[tokio::test(start_paused = true)]
async fn a_sequence_past_what_the_gateway_received_closes_the_stateful_connection() {
    let registry = Arc::default();
    let mut h = start_stateful(&registry, "c-6", settings());
    handshake_and_join_west(&mut h).await;
    // The client's join was its message 1: a Sequence naming 3 skips message 2.
    h.client.send("{\"type\":9,\"sequenceId\":3}\u{1e}").await;
    let text = loop {
        let text = h.client.text().await;
        if text.contains("\"type\":7") {
            break text;
        }
    };
    let record = close_record(&text);
    assert!(
        record["error"]
            .as_str()
            .is_some_and(|e| e.contains("Sequence ID greater")),
        "{record}"
    );
    h.task.await.unwrap();
}
