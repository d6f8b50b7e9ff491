//! What every test here shares: a `redis-server` per test (the workspace's `redis-harness`:
//! a free loopback port, never 6379, killed on drop), a subscriber like one gateway replica, the
//! event fixtures and small Redis command helpers. Every wait is bounded by [`DEADLINE`].

use std::future::Future;
use std::time::Duration;

use futures_util::StreamExt;
use publisher_lib::contract::{Envelope, Event, Group, Position, ValidationError};
use publisher_lib::{PublishError, Publisher, PublisherConfig};
pub(crate) use redis_harness::RedisServer;
use uuid::Uuid;

pub(crate) const DEADLINE: Duration = Duration::from_secs(10);

pub(crate) const RECOMMENDATION: &str = r#"{"type":"RecommendationReady","jobId":"7d9f4f3e-1c2b-4d5e-8f60-123456789abc","requestId":"0b1c2d3e-4f50-4a6b-9c8d-0e1f2a3b4c5d","region":"west","configVersion":3,"generatedAt":"2025-11-08T12:34:56Z"}"#;

pub(crate) const JOB_ASSIGNED: &str = r#"{"type":"JobAssigned","jobId":"7d9f4f3e-1c2b-4d5e-8f60-123456789abc","contractorId":"a1b2c3d4-e5f6-4a7b-8c9d-0e1f2a3b4c5d","assignmentId":"11111111-2222-4333-8444-555555555555","startUtc":"2025-11-09T08:00:00Z","endUtc":"2025-11-09T10:00:00Z","region":"west","source":"manual","auditId":"99999999-8888-4777-8666-555555555555"}"#;

/// Awaits `future`, failing the test if it takes longer than `limit`.
pub(crate) async fn within<T>(limit: Duration, what: &str, future: impl Future<Output = T>) -> T {
    tokio::time::timeout(limit, future)
        .await
        .unwrap_or_else(|_| panic!("{what} did not happen within {limit:?}"))
}

/// A subscriber on the channels of `groups`, like one gateway replica.
pub(crate) async fn subscribe(server: &RedisServer, groups: &[Group]) -> redis::aio::PubSubStream {
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
pub(crate) async fn receive(
    stream: &mut redis::aio::PubSubStream,
    count: usize,
) -> Vec<(String, Envelope)> {
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

pub(crate) fn event(json: &str) -> Event {
    Event::from_json(json.as_bytes()).unwrap()
}

pub(crate) fn event_text(event: &Event) -> String {
    String::from_utf8(event.to_json().unwrap()).unwrap()
}

pub(crate) fn publisher(server: &RedisServer) -> Publisher {
    Publisher::new(PublisherConfig::new(server.url())).unwrap()
}

/// A new `RecommendationReady` for `region`, with a fresh `requestId` (its idempotency key).
pub(crate) fn recommendation(region: &str) -> Event {
    let Event::RecommendationReady(mut payload) = event(RECOMMENDATION) else {
        unreachable!("the fixture is a RecommendationReady");
    };
    payload.request_id = Uuid::new_v4();
    payload.region = region.to_owned();
    Event::RecommendationReady(payload)
}

/// Publishes `count` fresh recommendations to `/dispatch/west` and returns the group's epoch.
pub(crate) async fn publish_west(publisher: &Publisher, count: usize) -> String {
    for _ in 0..count {
        publisher.publish(&recommendation("west")).await.unwrap();
    }
    let west = Group::try_dispatch("west").unwrap();
    publisher
        .read_history(&west, None)
        .await
        .unwrap()
        .head
        .epoch
}

/// The idempotency key `BackgroundPublisher::try_publish` uses for the event an envelope carries.
pub(crate) fn key_of(envelope: &Envelope) -> String {
    event(&envelope.event).unique_id()
}

/// Why `error` refused the event, as the contract words it; fails the test for any other error.
pub(crate) fn invalid_reason(error: &PublishError) -> String {
    match error {
        PublishError::Invalid(invalid) => invalid.to_string(),
        other => panic!("expected an invalid event, got {other:?}"),
    }
}

/// The field `error` names; fails the test unless it refused one field of the event.
pub(crate) fn invalid_field(error: &PublishError) -> String {
    match error {
        PublishError::Invalid(ValidationError::Field { field, .. }) => field.clone(),
        other => panic!("expected an invalid field, got {other:?}"),
    }
}

/// A plain connection for inspecting keys.
pub(crate) async fn admin(server: &RedisServer) -> redis::aio::MultiplexedConnection {
    redis::Client::open(server.url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap()
}

/// Runs the command `args` on `connection` and reads its reply as `T`.
pub(crate) async fn command<T: redis::FromRedisValue>(
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
pub(crate) type StreamEntry = (String, Vec<(String, Vec<u8>)>);

/// The position each positioned envelope in `messages` carries.
pub(crate) fn positions(messages: &[Vec<u8>]) -> Vec<Position> {
    messages
        .iter()
        .map(|m| Envelope::decode(m).unwrap().position.unwrap())
        .collect()
}
