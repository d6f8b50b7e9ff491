//! `Publisher` to the channels: envelopes on the right channels, refusals before any I/O,
//! typed errors while Redis is away and recovery when it returns.

use std::collections::HashSet;
use std::net::TcpListener;
use std::time::Duration;

use publisher_lib::contract::{Event, EventKind, Group};
use publisher_lib::{PublishError, Publisher, PublisherConfig};

use crate::harness::*;

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

    assert_eq!(
        invalid_reason(&error),
        "field `region`: may contain only letters, digits, '-', '_' and '.'"
    );
}

/// Checks `error` says Redis is away: unreachable, or silent past the publish timeout (which of
/// the two depends on whether the stop was noticed before the publish).
fn assert_redis_away(error: &PublishError) {
    assert!(
        matches!(
            error,
            PublishError::Unreachable(_) | PublishError::Timeout(_)
        ),
        "{error:?}"
    );
}

/// A publisher whose publishes time out after `timeout`, once it has published the fixture
/// event to `server`; and that event.
async fn published_once(server: &RedisServer, timeout: Duration) -> (Publisher, Event) {
    let config = PublisherConfig::new(server.url()).with_publish_timeout(timeout);
    let publisher = Publisher::new(config).unwrap();
    let event = event(RECOMMENDATION);
    within(DEADLINE, "first publish", publisher.publish(&event))
        .await
        .unwrap();
    (publisher, event)
}

#[tokio::test]
async fn stopped_redis_fails_fast_with_a_typed_error() {
    let mut server = RedisServer::start().await;
    let (publisher, event) = published_once(&server, Duration::from_secs(1)).await;

    server.kill();
    let error = within(
        Duration::from_secs(5),
        "publish to a stopped redis",
        publisher.publish(&event),
    )
    .await
    .unwrap_err();

    assert_redis_away(&error);
}

#[tokio::test]
async fn publisher_recovers_when_redis_comes_back() {
    let mut server = RedisServer::start().await;
    let (publisher, event) = published_once(&server, Duration::from_millis(500)).await;
    server.kill();
    let error = publisher.publish(&event).await.unwrap_err();
    assert_redis_away(&error);

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
