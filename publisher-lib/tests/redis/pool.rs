//! `Publisher::from_pool` (feature `deadpool`, enabled for these tests by the crate's
//! dev-dependency on itself): publishes, duplicates, history reads and a Redis outage through a
//! backend's `deadpool_redis::Pool`, with the same outcomes as the shared connection.

use std::time::Duration;

use tokio::time::Instant;

use deadpool_redis::{Config, PoolConfig, Runtime, Timeouts};
use publisher_lib::contract::{Envelope, EventKind, Group, Position};
use publisher_lib::{PublishError, Publisher, PublisherConfig};

use crate::harness::*;

/// A pool of at most `size` connections to `server`, with the timeouts a backend would set.
fn pool(server: &RedisServer, size: usize) -> deadpool_redis::Pool {
    let mut config = Config::from_url(server.url());
    config.pool = Some(PoolConfig {
        max_size: size,
        timeouts: Timeouts {
            wait: Some(Duration::from_secs(1)),
            create: Some(Duration::from_millis(500)),
            recycle: Some(Duration::from_millis(500)),
        },
        ..PoolConfig::default()
    });
    config.create_pool(Some(Runtime::Tokio1)).unwrap()
}

fn pooled_publisher(server: &RedisServer, timeout: Duration) -> Publisher {
    Publisher::from_pool(
        pool(server, 2),
        PublisherConfig::new(server.url()).with_publish_timeout(timeout),
    )
}

#[tokio::test]
async fn a_publish_through_the_pool_reaches_the_channel_with_its_position() {
    let server = RedisServer::start().await;
    let publisher = pooled_publisher(&server, Duration::from_secs(2));
    let event = event(JOB_ASSIGNED);
    let groups = event.groups();
    let mut stream = subscribe(&server, &groups).await;

    let receipt = within(DEADLINE, "publish", publisher.publish(&event))
        .await
        .unwrap();

    assert_eq!(receipt.kind, EventKind::JobAssigned);
    assert_eq!(receipt.deliveries.len(), 2);
    for delivery in &receipt.deliveries {
        assert_eq!(delivery.subscribers, 1);
        assert_eq!(delivery.position.seq, 1);
        assert!(!delivery.duplicate);
    }
    let received = receive(&mut stream, 2).await;
    for (channel, envelope) in &received {
        let delivery = receipt
            .deliveries
            .iter()
            .find(|d| &d.group.channel("rt:") == channel)
            .unwrap();
        assert_eq!(envelope.id, receipt.id);
        assert_eq!(envelope.event, event_text(&event));
        assert_eq!(envelope.position.as_ref(), Some(&delivery.position));
    }
}

#[tokio::test]
async fn the_same_key_twice_through_the_pool_is_delivered_once() {
    let server = RedisServer::start().await;
    let publisher = pooled_publisher(&server, Duration::from_secs(2));
    let west = Group::try_dispatch("west").unwrap();
    let mut stream = subscribe(&server, std::slice::from_ref(&west)).await;
    let event = recommendation("west");

    let first = publisher
        .publish_with_key(&event, "pool-retry")
        .await
        .unwrap();
    let second = publisher
        .publish_with_key(&event, "pool-retry")
        .await
        .unwrap();
    let third = publisher.publish(&event).await.unwrap();

    assert!(!first.deliveries[0].duplicate);
    assert!(second.deliveries[0].duplicate);
    assert_eq!(second.deliveries[0].subscribers, 0);
    assert_eq!(second.deliveries[0].position, first.deliveries[0].position);
    assert_eq!(third.deliveries[0].position.seq, 2);
    let received = receive(&mut stream, 2).await;
    assert_eq!(received[0].1.id, first.id);
    assert_eq!(received[1].1.id, third.id, "the duplicate was delivered");
    let mut admin = admin(&server).await;
    let length: u64 = command(&mut admin, &["XLEN", "rt:{/dispatch/west}:history"]).await;
    assert_eq!(length, 2);
}

#[tokio::test]
async fn the_history_reads_back_through_the_pool_and_matches_the_shared_connection() {
    let server = RedisServer::start().await;
    // A pool of one: every call waits for the one connection the previous call gave back.
    let publisher = Publisher::from_pool(
        pool(&server, 1),
        PublisherConfig::new(server.url()).with_history_size(5),
    );
    let west = Group::try_dispatch("west").unwrap();
    let mut sent = Vec::new();
    for _ in 0..8 {
        let event = recommendation("west");
        publisher.publish(&event).await.unwrap();
        sent.push(event_text(&event));
    }

    let head = publisher.read_history(&west, None).await.unwrap();
    assert_eq!(head.head.seq, 8);
    assert_eq!(head.recovered, None);
    let epoch = head.head.epoch.clone();
    let read = publisher
        .read_history(&west, Some(&Position::new(&epoch, 5)))
        .await
        .unwrap();
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
    // Past the kept history: not recovered, exactly as through the shared connection.
    let too_old = publisher
        .read_history(&west, Some(&Position::new(&epoch, 1)))
        .await
        .unwrap();
    assert_eq!(too_old.recovered, Some(false));

    // The shared connection reads the same group identically.
    let shared = crate::harness::publisher(&server);
    assert_eq!(
        shared
            .read_history(&west, Some(&Position::new(&epoch, 5)))
            .await
            .unwrap(),
        read
    );
}

#[tokio::test]
async fn many_concurrent_publishes_share_a_small_pool_without_loss() {
    let server = RedisServer::start().await;
    let publisher = pooled_publisher(&server, Duration::from_secs(5));
    let west = Group::try_dispatch("west").unwrap();

    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..32 {
        let publisher = publisher.clone();
        tasks.spawn(async move { publisher.publish(&recommendation("west")).await });
    }
    let mut seqs = Vec::new();
    within(DEADLINE, "32 publishes on a pool of 2", async {
        while let Some(joined) = tasks.join_next().await {
            seqs.push(joined.unwrap().unwrap().deliveries[0].position.seq);
        }
    })
    .await;

    seqs.sort_unstable();
    assert_eq!(seqs, (1..=32).collect::<Vec<u64>>());
    let head = publisher.read_history(&west, None).await.unwrap();
    assert_eq!(head.head.seq, 32);
}

#[tokio::test]
async fn a_stopped_redis_gives_a_transient_error_then_the_pool_recovers() {
    let mut server = RedisServer::start().await;
    let publisher = pooled_publisher(&server, Duration::from_secs(1));
    let event = recommendation("west");
    within(DEADLINE, "first publish", publisher.publish(&event))
        .await
        .unwrap();

    server.kill();
    let started = Instant::now();
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
    assert!(error.is_transient(), "{error:?}");
    assert!(
        started.elapsed() < Duration::from_millis(1500),
        "took {:?}",
        started.elapsed()
    );
    // The next one too: the pool threw the dead connections away and cannot open new ones.
    let error = publisher.publish(&event).await.unwrap_err();
    assert!(error.is_transient(), "{error:?}");
    assert!(matches!(error, PublishError::Unreachable(_)), "{error:?}");

    server.start_again().await;
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
    // The restarted server lost everything (no persistence): a new epoch, seq 1.
    assert_eq!(receipt.deliveries[0].position.seq, 1);
    let received = receive(&mut stream, 1).await;
    assert_eq!(received[0].1.id, receipt.id);
}

#[tokio::test]
async fn an_exhausted_pool_is_a_transient_pool_timeout() {
    let server = RedisServer::start().await;
    let pool = pool(&server, 1);
    let publisher = Publisher::from_pool(pool.clone(), PublisherConfig::new(server.url()));
    // The backend holds the pool's one connection elsewhere.
    let held = pool.get().await.unwrap();

    let error = within(
        Duration::from_secs(5),
        "publish on an exhausted pool",
        publisher.publish(&recommendation("west")),
    )
    .await
    .unwrap_err();

    assert!(matches!(error, PublishError::Pool(_)), "{error:?}");
    assert_eq!(error.label(), "pool");
    assert!(error.is_transient());
    drop(held);
    publisher.publish(&recommendation("west")).await.unwrap();
}
