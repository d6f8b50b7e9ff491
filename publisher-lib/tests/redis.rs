//! `Publisher`, `BackgroundPublisher` and `realtime-publish` against a real `redis-server`.
//!
//! Each test spawns its own `redis-server` on a free loopback port (never 6379), killed when the
//! test ends, and subscribes with the redis crate's async pub/sub like a gateway replica would.
//! Every wait is bounded by a deadline; nothing sleeps to synchronise.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashSet;
use std::future::Future;
use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use futures_util::StreamExt;
use publisher_lib::contract::{Envelope, Event, EventKind, Group, Position};
use publisher_lib::{
    BackgroundConfig, BackgroundPublisher, Dropped, PublishError, Publisher, PublisherConfig,
};
use uuid::Uuid;

const DEADLINE: Duration = Duration::from_secs(10);

const RECOMMENDATION: &str = r#"{"type":"RecommendationReady","jobId":"7d9f4f3e-1c2b-4d5e-8f60-123456789abc","requestId":"0b1c2d3e-4f50-4a6b-9c8d-0e1f2a3b4c5d","region":"west","configVersion":3,"generatedAt":"2025-11-08T12:34:56Z"}"#;

const JOB_ASSIGNED: &str = r#"{"type":"JobAssigned","jobId":"7d9f4f3e-1c2b-4d5e-8f60-123456789abc","contractorId":"a1b2c3d4-e5f6-4a7b-8c9d-0e1f2a3b4c5d","assignmentId":"11111111-2222-4333-8444-555555555555","startUtc":"2025-11-09T08:00:00Z","endUtc":"2025-11-09T10:00:00Z","region":"west","source":"manual","auditId":"99999999-8888-4777-8666-555555555555"}"#;

/// A `redis-server` child process on a free port; killed on drop.
struct RedisServer {
    child: Child,
    port: u16,
}

impl RedisServer {
    async fn start() -> Self {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        assert_ne!(port, 6379, "tests must never touch the default redis");
        let mut server = Self {
            child: spawn_redis_server(port, &[]),
            port,
        };
        server.wait_until_ready().await;
        server
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    async fn wait_until_ready(&mut self) {
        let client = redis::Client::open(self.url()).unwrap();
        let started = tokio::time::Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!("redis-server exited early: {status}");
            }
            if let Ok(mut connection) = client.get_multiplexed_async_connection().await {
                let pong: redis::RedisResult<String> =
                    redis::cmd("PING").query_async(&mut connection).await;
                if pong.as_deref() == Ok("PONG") {
                    return;
                }
            }
            assert!(
                started.elapsed() < DEADLINE,
                "redis-server on port {} did not answer PING within {DEADLINE:?}",
                self.port
            );
            // Polling interval while waiting for the server to accept connections, not a
            // synchronisation sleep: readiness is decided by PING answering.
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Starts a new `redis-server` on the same port after [`RedisServer::stop`].
    async fn restart(&mut self) {
        self.restart_with(&[]).await;
    }

    /// Like [`RedisServer::restart`], with extra `redis-server` arguments.
    async fn restart_with(&mut self, extra: &[&str]) {
        self.stop();
        self.child = spawn_redis_server(self.port, extra);
        self.wait_until_ready().await;
    }

    fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A `redis-server` child on `port`, without persistence, with `extra` arguments.
fn spawn_redis_server(port: u16, extra: &[&str]) -> Child {
    Command::new("redis-server")
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
        .args(["--save", "", "--appendonly", "no"])
        .args(extra)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("redis-server must be installed")
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Awaits `future`, failing the test if it takes longer than `limit`.
async fn within<T>(limit: Duration, what: &str, future: impl Future<Output = T>) -> T {
    tokio::time::timeout(limit, future)
        .await
        .unwrap_or_else(|_| panic!("{what} did not happen within {limit:?}"))
}

/// A subscriber on the channels of `groups`, like one gateway replica.
async fn subscribe(server: &RedisServer, groups: &[Group]) -> redis::aio::PubSubStream {
    let client = redis::Client::open(server.url()).unwrap();
    let mut pubsub = client.get_async_pubsub().await.unwrap();
    for group in groups {
        pubsub
            .subscribe(group.channel(publisher_lib::DEFAULT_PREFIX))
            .await
            .unwrap();
    }
    pubsub.into_on_message()
}

/// The next `count` messages as (channel, envelope).
async fn receive(stream: &mut redis::aio::PubSubStream, count: usize) -> Vec<(String, Envelope)> {
    within(DEADLINE, "receiving published messages", async {
        let mut out = Vec::with_capacity(count);
        while out.len() < count {
            let message = stream.next().await.expect("subscription ended");
            let envelope = Envelope::decode(message.get_payload_bytes()).unwrap();
            out.push((message.get_channel_name().to_owned(), envelope));
        }
        out
    })
    .await
}

fn event(json: &str) -> Event {
    Event::from_json(json.as_bytes()).unwrap()
}

fn event_text(event: &Event) -> String {
    String::from_utf8(event.to_json().unwrap()).unwrap()
}

fn publisher(server: &RedisServer) -> Publisher {
    Publisher::new(PublisherConfig::new(server.url())).unwrap()
}

/// A new `RecommendationReady` for `region`, with a fresh `requestId` (its idempotency key).
fn recommendation(region: &str) -> Event {
    let Event::RecommendationReady(mut payload) = event(RECOMMENDATION) else {
        unreachable!("the fixture is a RecommendationReady");
    };
    payload.request_id = Uuid::new_v4();
    payload.region = region.to_owned();
    Event::RecommendationReady(payload)
}

/// The idempotency key `BackgroundPublisher::try_publish` uses for the event an envelope carries.
fn key_of(envelope: &Envelope) -> String {
    event(&envelope.event).unique_id()
}

/// A plain connection for inspecting keys.
async fn admin(server: &RedisServer) -> redis::aio::MultiplexedConnection {
    redis::Client::open(server.url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap()
}

#[tokio::test]
async fn recommendation_reaches_the_dispatch_channel_as_an_envelope() {
    let server = RedisServer::start().await;
    let event = event(RECOMMENDATION);
    let west = Group::try_dispatch("west").unwrap();
    let mut stream = subscribe(&server, std::slice::from_ref(&west)).await;

    let receipt = within(DEADLINE, "publish", publisher(&server).publish(&event))
        .await
        .unwrap();

    assert_eq!(receipt.kind, EventKind::RecommendationReady);
    assert_eq!(receipt.deliveries.len(), 1);
    assert_eq!(receipt.deliveries[0].group, west);
    assert_eq!(receipt.deliveries[0].subscribers, 1);
    let received = receive(&mut stream, 1).await;
    let (channel, envelope) = &received[0];
    assert_eq!(channel, "rt:{/dispatch/west}");
    assert_eq!(envelope.id, receipt.id);
    assert_eq!(envelope.kind, EventKind::RecommendationReady);
    assert_eq!(envelope.event, event_text(&event));
    assert!(envelope.published_at_micros > 0);
    assert_eq!(receipt.deliveries[0].position.seq, 1);
    assert!(!receipt.deliveries[0].duplicate);
    assert_eq!(
        envelope.position.as_ref(),
        Some(&receipt.deliveries[0].position)
    );
}

#[tokio::test]
async fn job_assigned_reaches_the_dispatch_and_contractor_channels() {
    let server = RedisServer::start().await;
    let event = event(JOB_ASSIGNED);
    let groups = event.groups();
    assert_eq!(groups.len(), 2);
    let mut stream = subscribe(&server, &groups).await;

    let receipt = within(
        DEADLINE,
        "publish",
        publisher(&server).publish_with_key(&event, "assignment-1"),
    )
    .await
    .unwrap();

    let id = receipt.id;
    let counts: Vec<_> = receipt.deliveries.iter().map(|d| d.subscribers).collect();
    assert_eq!(counts, [1, 1]);
    let received = receive(&mut stream, 2).await;
    let channels: HashSet<_> = received.iter().map(|(c, _)| c.as_str()).collect();
    let expected: HashSet<_> = groups.iter().map(|g| g.channel("rt:")).collect();
    assert_eq!(
        channels,
        expected.iter().map(String::as_str).collect::<HashSet<_>>()
    );
    for (channel, envelope) in &received {
        assert_eq!(envelope.id, id);
        assert_eq!(envelope.kind, EventKind::JobAssigned);
        assert_eq!(envelope.event, event_text(&event));
        // Each group has its own history: the event is the first of both, under two epochs.
        let delivery = receipt
            .deliveries
            .iter()
            .find(|d| &d.group.channel("rt:") == channel)
            .unwrap();
        assert_eq!(delivery.position.seq, 1);
        assert_eq!(envelope.position.as_ref(), Some(&delivery.position));
    }
    assert_ne!(
        receipt.deliveries[0].position.epoch,
        receipt.deliveries[1].position.epoch
    );
}

#[tokio::test]
async fn invalid_event_is_refused_without_touching_redis() {
    // Nothing listens on this port: reaching for Redis would give Unreachable or Timeout.
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let publisher =
        Publisher::new(PublisherConfig::new(format!("redis://127.0.0.1:{port}"))).unwrap();
    let Event::RecommendationReady(mut payload) = event(RECOMMENDATION) else {
        unreachable!("the fixture is a RecommendationReady");
    };
    payload.region = "no spaces allowed".to_owned();

    let error = within(
        DEADLINE,
        "publish",
        publisher.publish(&Event::RecommendationReady(payload)),
    )
    .await
    .unwrap_err();

    assert!(matches!(error, PublishError::Invalid(_)), "{error:?}");
}

#[tokio::test]
async fn stopped_redis_fails_fast_with_a_typed_error() {
    let mut server = RedisServer::start().await;
    let config = PublisherConfig::new(server.url()).with_publish_timeout(Duration::from_secs(1));
    let publisher = Publisher::new(config).unwrap();
    let event = event(RECOMMENDATION);
    within(DEADLINE, "first publish", publisher.publish(&event))
        .await
        .unwrap();

    server.stop();
    let error = within(
        Duration::from_secs(5),
        "publish to a stopped redis",
        publisher.publish(&event),
    )
    .await
    .unwrap_err();

    assert!(
        matches!(
            error,
            PublishError::Unreachable(_) | PublishError::Timeout(_)
        ),
        "{error:?}"
    );
}

#[tokio::test]
async fn publisher_recovers_when_redis_comes_back() {
    let mut server = RedisServer::start().await;
    let config =
        PublisherConfig::new(server.url()).with_publish_timeout(Duration::from_millis(500));
    let publisher = Publisher::new(config).unwrap();
    let event = event(RECOMMENDATION);
    within(DEADLINE, "first publish", publisher.publish(&event))
        .await
        .unwrap();
    server.stop();
    assert!(publisher.publish(&event).await.is_err());

    server.restart().await;
    let mut stream = subscribe(&server, &event.groups()).await;
    // Each attempt is bounded by the publish timeout; the whole wait by the deadline.
    let receipt = within(DEADLINE, "a publish after the restart", async {
        loop {
            if let Ok(receipt) = publisher.publish(&event).await {
                return receipt;
            }
        }
    })
    .await;

    let received = receive(&mut stream, 1).await;
    assert_eq!(received[0].1.id, receipt.id);
}

#[tokio::test]
async fn background_publisher_delivers_everything_after_flush() {
    let server = RedisServer::start().await;
    let event = event(RECOMMENDATION);
    let mut stream = subscribe(&server, &event.groups()).await;
    let background = BackgroundPublisher::spawn(publisher(&server), BackgroundConfig::default());

    let mut keys = HashSet::new();
    for _ in 0..50 {
        keys.insert(background.try_publish(recommendation("west")).unwrap());
    }
    within(DEADLINE, "flush", background.flush()).await;

    let received: HashSet<_> = receive(&mut stream, 50)
        .await
        .iter()
        .map(|(_, envelope)| key_of(envelope))
        .collect();
    assert_eq!(received, keys);
    within(DEADLINE, "shutdown", background.shutdown()).await;
}

/// `INFO errorstats` count of `error` replies (NOPERM, ...) since the server started.
async fn error_replies(server: &RedisServer, error: &str) -> u64 {
    let client = redis::Client::open(server.url()).unwrap();
    let mut connection = client.get_multiplexed_async_connection().await.unwrap();
    let info: String = redis::cmd("INFO")
        .arg("errorstats")
        .query_async(&mut connection)
        .await
        .unwrap();
    let prefix = format!("errorstat_{error}:count=");
    info.lines()
        .find_map(|line| line.strip_prefix(&prefix))
        .map_or(0, |count| count.trim().parse().unwrap())
}

#[tokio::test]
async fn background_publisher_retries_across_a_redis_restart() {
    const EVENTS: usize = 20;
    let mut server = RedisServer::start().await;
    let event = event(RECOMMENDATION);
    let config =
        PublisherConfig::new(server.url()).with_publish_timeout(Duration::from_millis(500));
    // Never give up, and retry often: the events must survive however long Redis is away.
    let mut retries = BackgroundConfig::default()
        .with_capacity(EVENTS + 8)
        .with_max_attempts(u32::MAX);
    retries.initial_backoff = Duration::from_millis(10);
    retries.max_backoff = Duration::from_millis(50);
    let background = BackgroundPublisher::spawn(Publisher::new(config).unwrap(), retries);

    // The publisher is connected and delivering before Redis goes away.
    let mut stream = subscribe(&server, &event.groups()).await;
    let before = background.try_publish(recommendation("west")).unwrap();
    within(DEADLINE, "flush before the stop", background.flush()).await;
    assert_eq!(key_of(&receive(&mut stream, 1).await[0].1), before);
    drop(stream);

    server.stop();
    let keys: Vec<String> = (0..EVENTS)
        .map(|_| background.try_publish(recommendation("west")).unwrap())
        .collect();
    // While Redis is down the task keeps retrying the first event instead of giving up, so a
    // flush cannot complete; waiting for it lets the task fail against the stopped server.
    assert!(
        tokio::time::timeout(Duration::from_millis(300), background.flush())
            .await
            .is_err(),
        "flush completed while redis was down: events were given up"
    );

    // Pub/sub keeps nothing for later subscribers, so the new server must have its subscriber
    // before any retry can get through. It comes back refusing the publish script (NOPERM on
    // EVALSHA, a transient failure the task retries) until the subscriber is in place. Its
    // script cache is empty, so the first allowed attempt also loads the script again.
    server
        .restart_with(&[
            "--user", "default", "on", "nopass", "~*", "&*", "+@all", "-evalsha",
        ])
        .await;
    let mut stream = subscribe(&server, &event.groups()).await;
    // The task is retrying against the new server: its attempts are refused there.
    within(
        DEADLINE,
        "publish attempts refused by the new server",
        async {
            // Polling interval of a condition checked on the server, not a synchronisation sleep.
            while error_replies(&server, "NOPERM").await < 3 {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        },
    )
    .await;
    let client = redis::Client::open(server.url()).unwrap();
    let mut admin = client.get_multiplexed_async_connection().await.unwrap();
    let () = redis::cmd("ACL")
        .arg("SETUSER")
        .arg("default")
        .arg("+evalsha")
        .query_async(&mut admin)
        .await
        .unwrap();

    // Every event queued during the outage is published now.
    within(DEADLINE, "flush after the restart", background.flush()).await;
    let received = receive(&mut stream, EVENTS).await;
    let received_keys: Vec<String> = received.iter().map(|(_, e)| key_of(e)).collect();
    assert_eq!(received_keys, keys, "each event once, in the order queued");
    // The restarted server has no persistence: a new history, numbered from 1.
    let seqs: Vec<u64> = received
        .iter()
        .map(|(_, e)| e.position.as_ref().unwrap().seq)
        .collect();
    assert_eq!(seqs, (1..=EVENTS as u64).collect::<Vec<_>>());

    // A duplicate of any of them would arrive before an event published after them all.
    let after = background.try_publish(recommendation("west")).unwrap();
    within(DEADLINE, "flush of the last event", background.flush()).await;
    assert_eq!(
        key_of(&receive(&mut stream, 1).await[0].1),
        after,
        "an event was delivered twice"
    );
    within(DEADLINE, "shutdown", background.shutdown()).await;
}

#[tokio::test]
async fn background_publisher_drops_when_full_and_after_shutdown() {
    let server = RedisServer::start().await;
    let event = event(RECOMMENDATION);
    let background = BackgroundPublisher::spawn(
        publisher(&server),
        BackgroundConfig::default().with_capacity(1),
    );

    // The test runtime is single-threaded, so the task cannot drain between these two calls.
    background.try_publish(event.clone()).unwrap();
    assert_eq!(
        background.try_publish(recommendation("west")),
        Err(Dropped::QueueFull)
    );
    assert!(matches!(
        background.try_publish_with_key(event.clone(), "bad\nkey"),
        Err(Dropped::Invalid(_))
    ));

    within(DEADLINE, "shutdown", background.shutdown()).await;
    assert_eq!(background.try_publish(event), Err(Dropped::Closed));
}

#[tokio::test]
async fn cli_publishes_via_redis_and_prints_the_receipt() {
    let server = RedisServer::start().await;
    let event = event(JOB_ASSIGNED);
    let mut stream = subscribe(&server, &event.groups()).await;

    let output = within(
        DEADLINE,
        "realtime-publish",
        tokio::process::Command::new(env!("CARGO_BIN_EXE_realtime-publish"))
            .args(["--redis-url", &server.url(), JOB_ASSIGNED])
            .kill_on_drop(true)
            .output(),
    )
    .await
    .unwrap();

    assert!(output.status.success(), "{output:?}");
    let receipt: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(receipt["type"], "JobAssigned");
    assert_eq!(receipt["idempotencyKey"], event.unique_id());
    for group in 0..2 {
        assert_eq!(receipt["groups"][group]["subscribers"], 1);
        assert_eq!(receipt["groups"][group]["seq"], 1);
        assert_eq!(receipt["groups"][group]["duplicate"], false);
        assert_eq!(
            receipt["groups"][group]["epoch"].as_str().unwrap().len(),
            32
        );
    }
    let received = receive(&mut stream, 2).await;
    for (channel, envelope) in received {
        assert_eq!(receipt["id"], envelope.id.to_string());
        assert_eq!(envelope.event, event_text(&event));
        let group = receipt["groups"]
            .as_array()
            .unwrap()
            .iter()
            .find(|g| g["channel"] == channel.as_str())
            .unwrap();
        let position = envelope.position.unwrap();
        assert_eq!(group["epoch"], position.epoch);
        assert_eq!(group["seq"], position.seq);
    }

    // The same key again: acknowledged as a duplicate, delivered nowhere.
    let again = within(
        DEADLINE,
        "realtime-publish again",
        tokio::process::Command::new(env!("CARGO_BIN_EXE_realtime-publish"))
            .args(["--redis-url", &server.url(), "--idempotency-key"])
            .arg(event.unique_id())
            .arg(JOB_ASSIGNED)
            .kill_on_drop(true)
            .output(),
    )
    .await
    .unwrap();
    assert!(again.status.success(), "{again:?}");
    let again: serde_json::Value = serde_json::from_slice(&again.stdout).unwrap();
    for group in 0..2 {
        assert_eq!(again["groups"][group]["duplicate"], true);
        assert_eq!(again["groups"][group]["seq"], 1);
        assert_eq!(again["groups"][group]["subscribers"], 0);
    }
}

#[tokio::test]
async fn cli_rejects_an_invalid_event_with_exit_code_64() {
    let output = within(
        DEADLINE,
        "realtime-publish",
        tokio::process::Command::new(env!("CARGO_BIN_EXE_realtime-publish"))
            .args(["--redis-url", "redis://127.0.0.1:1", r#"{"type":"Nope"}"#])
            .kill_on_drop(true)
            .output(),
    )
    .await
    .unwrap();

    assert_eq!(output.status.code(), Some(64), "{output:?}");
    assert!(String::from_utf8_lossy(&output.stderr).contains("unknown event type"));
}

/// Runs the command `args` on `connection` and reads its reply as `T`.
async fn command<T: redis::FromRedisValue>(
    connection: &mut redis::aio::MultiplexedConnection,
    args: &[&str],
) -> T {
    let mut cmd = redis::cmd(args[0]);
    for arg in &args[1..] {
        cmd.arg(*arg);
    }
    cmd.query_async(connection).await.unwrap()
}

/// One XRANGE entry: its id and its field/value pairs.
type StreamEntry = (String, Vec<(String, Vec<u8>)>);

/// The position each positioned envelope in `messages` carries.
fn positions(messages: &[Vec<u8>]) -> Vec<Position> {
    messages
        .iter()
        .map(|m| Envelope::decode(m).unwrap().position.unwrap())
        .collect()
}

#[tokio::test]
async fn seq_grows_by_one_per_event_in_each_group() {
    let server = RedisServer::start().await;
    let publisher = publisher(&server);
    let west = Group::try_dispatch("west").unwrap();
    let mut stream = subscribe(&server, std::slice::from_ref(&west)).await;

    let mut west_positions = Vec::new();
    let mut east_positions = Vec::new();
    for _ in 0..3 {
        let receipt = publisher.publish(&recommendation("west")).await.unwrap();
        west_positions.push(receipt.deliveries[0].position.clone());
        let receipt = publisher.publish(&recommendation("east")).await.unwrap();
        east_positions.push(receipt.deliveries[0].position.clone());
    }

    let seqs = |p: &[Position]| p.iter().map(|p| p.seq).collect::<Vec<_>>();
    assert_eq!(seqs(&west_positions), [1, 2, 3]);
    assert_eq!(seqs(&east_positions), [1, 2, 3]);
    assert!(
        west_positions
            .iter()
            .all(|p| p.epoch == west_positions[0].epoch)
    );
    assert_eq!(west_positions[0].epoch.len(), 32);
    assert!(
        west_positions[0]
            .epoch
            .bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
    );
    assert_ne!(west_positions[0].epoch, east_positions[0].epoch);
    let live: Vec<Position> = receive(&mut stream, 3)
        .await
        .into_iter()
        .map(|(_, e)| e.position.unwrap())
        .collect();
    assert_eq!(
        live, west_positions,
        "subscribers see the positions of the receipts"
    );
}

#[tokio::test]
async fn the_history_keeps_the_last_n_events_and_reads_back_in_order() {
    let server = RedisServer::start().await;
    let publisher =
        Publisher::new(PublisherConfig::new(server.url()).with_history_size(5)).unwrap();
    let west = Group::try_dispatch("west").unwrap();
    let mut sent = Vec::new();
    for _ in 0..8 {
        let event = recommendation("west");
        publisher.publish(&event).await.unwrap();
        sent.push(event_text(&event));
    }
    let mut admin = admin(&server).await;
    let length: u64 = command(&mut admin, &["XLEN", "rt:{/dispatch/west}:history"]).await;
    assert_eq!(length, 5);

    let head = publisher.read_history(&west, None).await.unwrap();
    assert_eq!(head.head.seq, 8);
    assert_eq!(head.recovered, None);
    assert!(head.messages.is_empty());
    let epoch = head.head.epoch.clone();

    let read = publisher
        .read_history(&west, Some(&Position::new(&epoch, 5)))
        .await
        .unwrap();
    assert_eq!(read.head, Position::new(&epoch, 8));
    assert_eq!(read.recovered, Some(true));
    assert_eq!(
        positions(&read.messages),
        [6, 7, 8].map(|seq| Position::new(&epoch, seq))
    );
    let events: Vec<String> = read
        .messages
        .iter()
        .map(|m| Envelope::decode(m).unwrap().event)
        .collect();
    assert_eq!(events, sent[5..]);

    // The oldest position the history still continues: seq 3 (entries 4..=8 are kept).
    let read = publisher
        .read_history(&west, Some(&Position::new(&epoch, 3)))
        .await
        .unwrap();
    assert_eq!(read.recovered, Some(true));
    assert_eq!(read.messages.len(), 5);
}

#[tokio::test]
async fn a_position_the_history_cannot_continue_is_not_recovered() {
    let server = RedisServer::start().await;
    let publisher =
        Publisher::new(PublisherConfig::new(server.url()).with_history_size(5)).unwrap();
    let west = Group::try_dispatch("west").unwrap();
    for _ in 0..8 {
        publisher.publish(&recommendation("west")).await.unwrap();
    }
    let epoch = publisher
        .read_history(&west, None)
        .await
        .unwrap()
        .head
        .epoch;

    let check = |after: Position, expected: Option<bool>| {
        let publisher = publisher.clone();
        let west = west.clone();
        let epoch = epoch.clone();
        async move {
            let read = publisher.read_history(&west, Some(&after)).await.unwrap();
            assert_eq!(read.recovered, expected, "after {after:?}");
            assert_eq!(read.head, Position::new(epoch, 8), "after {after:?}");
            assert!(read.messages.is_empty(), "after {after:?}");
        }
    };
    // Another epoch, even an empty one.
    check(
        Position::new("0123456789abcdef0123456789abcdef", 7),
        Some(false),
    )
    .await;
    check(Position::new("", 7), Some(false)).await;
    // Older than the history: seq 3 is the oldest it continues.
    check(Position::new(&epoch, 2), Some(false)).await;
    check(Position::new(&epoch, 0), Some(false)).await;
    // At the head: nothing missed.
    check(Position::new(&epoch, 8), Some(true)).await;

    // Ahead of the head, from a client: anyone can send that, so it is not recovered and the
    // group is left as it was.
    check(Position::new(&epoch, 9), Some(false)).await;
    check(Position::new(&epoch, u64::MAX), Some(false)).await;
    check(Position::new(&epoch, 8), Some(true)).await;
}

#[tokio::test]
async fn a_client_position_ahead_of_the_head_changes_nothing_in_redis() {
    let server = RedisServer::start().await;
    let publisher = publisher(&server);
    let west = Group::try_dispatch("west").unwrap();
    let mut last = None;
    for _ in 0..3 {
        let receipt = publisher.publish(&recommendation("west")).await.unwrap();
        last = Some(receipt.deliveries[0].position.clone());
    }
    let head = last.unwrap();
    let mut admin = admin(&server).await;
    let before = stored_west(&mut admin).await;

    let forged = publisher
        .read_history(&west, Some(&Position::new(&head.epoch, 999_999_999)))
        .await
        .unwrap();
    assert_eq!(forged.recovered, Some(false));
    assert_eq!(forged.head, head, "the head is the group's, unchanged");
    assert!(forged.messages.is_empty());
    assert_eq!(stored_west(&mut admin).await, before);

    // Everyone else still resumes in the same epoch, and publishing continues it.
    let read = publisher
        .read_history(&west, Some(&Position::new(&head.epoch, 1)))
        .await
        .unwrap();
    assert_eq!(read.recovered, Some(true));
    assert_eq!(
        positions(&read.messages),
        [2, 3].map(|seq| Position::new(&head.epoch, seq))
    );
    let receipt = publisher.publish(&recommendation("west")).await.unwrap();
    assert_eq!(
        receipt.deliveries[0].position,
        Position::new(&head.epoch, 4)
    );
}

/// `/dispatch/west`'s stored epoch and seq, and the length of its history.
async fn stored_west(admin: &mut redis::aio::MultiplexedConnection) -> (Vec<String>, u64) {
    let position: Vec<String> =
        command(admin, &["HMGET", "rt:{/dispatch/west}:pos", "epoch", "seq"]).await;
    let length: u64 = command(admin, &["XLEN", "rt:{/dispatch/west}:history"]).await;
    (position, length)
}

#[tokio::test]
async fn a_replica_cursor_ahead_of_the_head_means_a_rewind_and_starts_a_new_epoch() {
    let server = RedisServer::start().await;
    let publisher = publisher(&server);
    let west = Group::try_dispatch("west").unwrap();
    for _ in 0..3 {
        publisher.publish(&recommendation("west")).await.unwrap();
    }
    let epoch = publisher
        .read_history(&west, None)
        .await
        .unwrap()
        .head
        .epoch;
    // A failover that lost the last write: the promoted history ends at 2, a replica saw 3.
    let mut admin = admin(&server).await;
    let () = command(&mut admin, &["HSET", "rt:{/dispatch/west}:pos", "seq", "2"]).await;

    let read = publisher
        .read_history_after_cursor(&west, &Position::new(&epoch, 3))
        .await
        .unwrap();
    assert_eq!(read.recovered, Some(false));
    assert_ne!(read.head.epoch, epoch);
    assert_eq!(read.head.seq, 0);
    assert!(read.messages.is_empty());
    // Nobody resumes across it, not even from a position the old epoch held.
    let old = publisher
        .read_history(&west, Some(&Position::new(&epoch, 2)))
        .await
        .unwrap();
    assert_eq!(old.recovered, Some(false), "the old epoch is gone");
    assert_eq!(old.head, read.head);
    let receipt = publisher.publish(&recommendation("west")).await.unwrap();
    assert_eq!(
        receipt.deliveries[0].position,
        Position::new(read.head.epoch, 1)
    );
}

#[tokio::test]
async fn reading_a_group_without_history_gives_it_an_epoch_that_publishes_continue() {
    let server = RedisServer::start().await;
    let publisher = publisher(&server);
    let west = Group::try_dispatch("west").unwrap();

    let read = publisher.read_history(&west, None).await.unwrap();
    assert_eq!(read.head.seq, 0);
    assert_eq!(read.head.epoch.len(), 32);
    let mut admin = admin(&server).await;
    let ttl: i64 = command(&mut admin, &["TTL", "rt:{/dispatch/west}:pos"]).await;
    assert!((590..=600).contains(&ttl), "ttl {ttl}");

    let receipt = publisher.publish(&recommendation("west")).await.unwrap();
    assert_eq!(
        receipt.deliveries[0].position,
        Position::new(read.head.epoch.clone(), 1)
    );
    let read = publisher
        .read_history(&west, Some(&read.head))
        .await
        .unwrap();
    assert_eq!(read.recovered, Some(true));
    assert_eq!(
        positions(&read.messages),
        [receipt.deliveries[0].position.clone()]
    );
}

#[tokio::test]
async fn the_same_key_twice_is_appended_and_delivered_once() {
    let server = RedisServer::start().await;
    let publisher = publisher(&server);
    let west = Group::try_dispatch("west").unwrap();
    let mut stream = subscribe(&server, std::slice::from_ref(&west)).await;
    let event = recommendation("west");

    let first = publisher
        .publish_with_key(&event, "retry me")
        .await
        .unwrap();
    let second = publisher
        .publish_with_key(&event, "retry me")
        .await
        .unwrap();

    assert!(!first.deliveries[0].duplicate);
    assert!(second.deliveries[0].duplicate);
    assert_eq!(second.deliveries[0].subscribers, 0);
    assert_eq!(second.deliveries[0].position, first.deliveries[0].position);
    // publish() keys on the event's own id, a different key: a new event.
    let third = publisher.publish(&event).await.unwrap();
    assert_eq!(third.deliveries[0].position.seq, 2);
    let again = publisher.publish(&event).await.unwrap();
    assert!(again.deliveries[0].duplicate);

    let received = receive(&mut stream, 2).await;
    assert_eq!(received[0].1.id, first.id);
    assert_eq!(received[1].1.id, third.id, "the duplicate was delivered");
    let mut admin = admin(&server).await;
    let length: u64 = command(&mut admin, &["XLEN", "rt:{/dispatch/west}:history"]).await;
    assert_eq!(length, 2);
}

#[tokio::test]
async fn a_bad_idempotency_key_is_refused_before_any_io() {
    let server = RedisServer::start().await;
    let publisher = publisher(&server);
    let event = recommendation("west");
    for key in ["", "tab\there", "é", &"k".repeat(201)] {
        let error = publisher.publish_with_key(&event, key).await.unwrap_err();
        assert!(
            matches!(error, PublishError::Invalid(_)),
            "{key:?}: {error:?}"
        );
    }
    let longest = "k".repeat(publisher_lib::MAX_IDEMPOTENCY_KEY_LEN);
    publisher.publish_with_key(&event, &longest).await.unwrap();
}

#[tokio::test]
async fn a_lost_history_starts_a_new_epoch() {
    let server = RedisServer::start().await;
    let publisher = publisher(&server);
    let west = Group::try_dispatch("west").unwrap();
    let before = publisher.publish(&recommendation("west")).await.unwrap();
    let before = before.deliveries[0].position.clone();

    let mut admin = admin(&server).await;
    let () = command(&mut admin, &["FLUSHALL"]).await;
    let after = publisher.publish(&recommendation("west")).await.unwrap();
    let after = after.deliveries[0].position.clone();

    assert_ne!(after.epoch, before.epoch);
    assert_eq!(after.seq, 1);
    let read = publisher.read_history(&west, Some(&before)).await.unwrap();
    assert_eq!(read.recovered, Some(false));
    assert_eq!(read.head, after);
}

#[tokio::test]
async fn publishing_reloads_the_script_after_script_flush() {
    let server = RedisServer::start().await;
    let publisher = publisher(&server);
    let west = Group::try_dispatch("west").unwrap();
    publisher.publish(&recommendation("west")).await.unwrap();
    publisher.read_history(&west, None).await.unwrap();

    let mut admin = admin(&server).await;
    let () = command(&mut admin, &["SCRIPT", "FLUSH"]).await;
    let receipt = publisher.publish(&recommendation("west")).await.unwrap();
    assert_eq!(receipt.deliveries[0].position.seq, 2);
    let () = command(&mut admin, &["SCRIPT", "FLUSH"]).await;
    let read = publisher.read_history(&west, None).await.unwrap();
    assert_eq!(read.head, receipt.deliveries[0].position);
}

#[tokio::test]
async fn keys_and_ttls_follow_the_contract() {
    let server = RedisServer::start().await;
    let config = PublisherConfig::new(server.url())
        .with_history_ttl(Duration::from_secs(120))
        .with_idempotency_window(Duration::from_secs(60));
    let publisher = Publisher::new(config).unwrap();
    let receipt = publisher
        .publish_with_key(&recommendation("west"), "key-1")
        .await
        .unwrap();
    let position = receipt.deliveries[0].position.clone();
    let mut admin = admin(&server).await;

    let mut keys: Vec<String> = command(&mut admin, &["KEYS", "*"]).await;
    keys.sort();
    assert_eq!(
        keys,
        [
            "rt:{/dispatch/west}:history",
            "rt:{/dispatch/west}:id:key-1",
            "rt:{/dispatch/west}:pos",
        ]
    );
    let pos: Vec<(String, String)> =
        command(&mut admin, &["HGETALL", "rt:{/dispatch/west}:pos"]).await;
    assert_eq!(
        pos.into_iter().collect::<std::collections::HashMap<_, _>>(),
        [
            ("epoch".to_owned(), position.epoch.clone()),
            ("seq".to_owned(), "1".to_owned())
        ]
        .into()
    );
    let seen: String = command(&mut admin, &["GET", "rt:{/dispatch/west}:id:key-1"]).await;
    assert_eq!(seen, "1");
    let entries: Vec<StreamEntry> = command(
        &mut admin,
        &["XRANGE", "rt:{/dispatch/west}:history", "-", "+"],
    )
    .await;
    assert_eq!(entries.len(), 1);
    assert_eq!(entries[0].0, "1-1");
    assert_eq!(entries[0].1[0].0, "m");
    let message = &entries[0].1[0].1;
    assert!(
        message.starts_with(
            format!(r#"{{"epoch":"{}","seq":1,"v":1,"id":""#, position.epoch).as_bytes()
        )
    );
    assert_eq!(Envelope::decode(message).unwrap().position, Some(position));

    for (key, expected) in [
        ("rt:{/dispatch/west}:pos", 120),
        ("rt:{/dispatch/west}:history", 120),
        ("rt:{/dispatch/west}:id:key-1", 60),
    ] {
        let ttl: i64 = command(&mut admin, &["TTL", key]).await;
        assert!((expected - 5..=expected).contains(&ttl), "{key}: ttl {ttl}");
    }
}

#[test]
fn defaults_are_those_of_the_contract() {
    let config = PublisherConfig::new("redis://127.0.0.1:1");
    assert_eq!(config.history_size, 1000);
    assert_eq!(config.history_ttl, Duration::from_secs(600));
    assert_eq!(config.idempotency_window, Duration::from_secs(300));
}
