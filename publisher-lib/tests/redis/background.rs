//! `BackgroundPublisher`: everything delivered after a flush, retries across a Redis restart,
//! and what it drops when full or shut down.

use std::collections::HashSet;
use std::time::Duration;

use publisher_lib::contract::ValidationError;
use publisher_lib::{BackgroundConfig, BackgroundPublisher, Dropped, Publisher, PublisherConfig};

use crate::harness::*;

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

    server.kill();
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
    match background.try_publish_with_key(event.clone(), "bad\nkey") {
        Err(Dropped::Invalid(ValidationError::Field { field, .. })) => {
            assert_eq!(field, "idempotencyKey");
        }
        other => panic!("a bad key is refused as invalid: {other:?}"),
    }

    within(DEADLINE, "shutdown", background.shutdown()).await;
    assert_eq!(background.try_publish(event), Err(Dropped::Closed));
}
