//! Batched publish script calls: concurrent publishes share script calls without losing,
//! repeating or reordering a seq; the script's batch layout (duplicates inside one call) and its
//! one-event layout for other backends; NOSCRIPT and a stopped Redis under concurrency.

use std::collections::BTreeMap;
use std::time::Duration;

use publisher_lib::contract::{Envelope, Group};
use publisher_lib::{PUBLISH_SCRIPT, PublishError, Publisher, PublisherConfig};
use redis::Script;

use crate::harness::*;

const TASKS: usize = 64;
const EVENTS_PER_TASK: usize = 50;
const REGIONS: [&str; 4] = ["west", "east", "north", "south"];

/// `calls` of the `evalsha` line of `INFO commandstats` (0 when absent).
async fn evalsha_calls(admin: &mut redis::aio::MultiplexedConnection) -> u64 {
    let info: String = command(admin, &["INFO", "commandstats"]).await;
    info.lines()
        .find_map(|line| line.strip_prefix("cmdstat_evalsha:calls="))
        .and_then(|rest| rest.split(',').next())
        .map_or(0, |calls| calls.parse().unwrap())
}

/// `TASKS` tasks publishing `EVENTS_PER_TASK` fresh events each over `REGIONS`; the seqs each
/// group's receipts got, with their epochs, by group.
async fn publish_concurrently(publisher: &Publisher) -> BTreeMap<String, Vec<(String, u64)>> {
    let mut tasks = tokio::task::JoinSet::new();
    for task in 0..TASKS {
        let publisher = publisher.clone();
        tasks.spawn(async move {
            let mut receipts = Vec::with_capacity(EVENTS_PER_TASK);
            for i in 0..EVENTS_PER_TASK {
                let region = REGIONS[(task + i) % REGIONS.len()];
                receipts.push(publisher.publish(&recommendation(region)).await);
            }
            receipts
        });
    }
    let mut by_group: BTreeMap<String, Vec<(String, u64)>> = BTreeMap::new();
    within(DEADLINE, "every concurrent publish", async {
        while let Some(joined) = tasks.join_next().await {
            for receipt in joined.unwrap() {
                let delivery = receipt.unwrap().deliveries.pop().unwrap();
                assert!(!delivery.duplicate);
                by_group
                    .entry(delivery.group.to_string())
                    .or_default()
                    .push((delivery.position.epoch, delivery.position.seq));
            }
        }
    })
    .await;
    by_group
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_publishes_get_consecutive_seqs_per_group_in_fewer_script_calls() {
    let server = RedisServer::start().await;
    let publisher = publisher(&server);
    let mut admin = admin(&server).await;
    let before = evalsha_calls(&mut admin).await;

    let by_group = publish_concurrently(&publisher).await;

    let calls = evalsha_calls(&mut admin).await - before;
    let events = (TASKS * EVENTS_PER_TASK) as u64;
    assert!(calls >= 1);
    assert!(
        calls < events,
        "{calls} EVALSHA calls for {events} events: nothing was batched"
    );
    assert_eq!(by_group.len(), REGIONS.len());
    let per_group = TASKS * EVENTS_PER_TASK / REGIONS.len();
    for (group, mut positions) in by_group {
        positions.sort_unstable_by_key(|(_, seq)| *seq);
        let seqs: Vec<u64> = positions.iter().map(|(_, seq)| *seq).collect();
        assert_eq!(seqs, (1..=per_group as u64).collect::<Vec<_>>(), "{group}");
        assert!(positions.iter().all(|(epoch, _)| *epoch == positions[0].0));
        let group = Group::try_from_name(&group).unwrap();
        let head = publisher.read_history(&group, None).await.unwrap().head;
        assert_eq!(head.seq, per_group as u64, "{group}");
        assert_eq!(head.epoch, positions[0].0);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_publishes_of_one_key_are_appended_and_delivered_once() {
    let server = RedisServer::start().await;
    let publisher = publisher(&server);
    let west = Group::try_dispatch("west").unwrap();
    let mut stream = subscribe(&server, std::slice::from_ref(&west)).await;
    let event = recommendation("west");

    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..TASKS {
        let publisher = publisher.clone();
        let event = event.clone();
        tasks.spawn(async move { publisher.publish_with_key(&event, "once").await });
    }
    let mut deliveries = Vec::new();
    within(DEADLINE, "every publish of one key", async {
        while let Some(joined) = tasks.join_next().await {
            deliveries.push(joined.unwrap().unwrap().deliveries.pop().unwrap());
        }
    })
    .await;

    let (first, duplicates): (Vec<_>, Vec<_>) = deliveries.iter().partition(|d| !d.duplicate);
    assert_eq!(first.len(), 1);
    assert_eq!(first[0].position.seq, 1);
    assert!(duplicates.iter().all(|d| d.position == first[0].position));
    assert!(duplicates.iter().all(|d| d.subscribers == 0));
    let mut admin = admin(&server).await;
    let length: u64 = command(&mut admin, &["XLEN", "rt:{/dispatch/west}:history"]).await;
    assert_eq!(length, 1);
    // The next event is delivered right after the one copy of the first.
    let next = publisher.publish(&recommendation("west")).await.unwrap();
    assert_eq!(next.deliveries[0].position.seq, 2);
    let received = receive(&mut stream, 2).await;
    assert_eq!(received[1].1.id, next.id, "a duplicate was delivered");
}

/// The three keys of `group`'s event under `key`, as the contract names them.
fn keys(group: &str, key: &str) -> [String; 3] {
    let channel = format!("rt:{{{group}}}");
    [
        format!("{channel}:pos"),
        format!("{channel}:history"),
        format!("{channel}:id:{key}"),
    ]
}

/// A plain envelope, as a backend in another language would build it.
fn envelope(event: &str) -> Vec<u8> {
    Envelope::encode(uuid::Uuid::new_v4(), event_kind(event), 1, event)
}

fn event_kind(json: &str) -> publisher_lib::contract::EventKind {
    event(json).kind()
}

#[tokio::test]
async fn the_one_event_layout_of_the_script_still_works_for_other_backends() {
    let server = RedisServer::start().await;
    let mut admin = admin(&server).await;
    let west = Group::try_dispatch("west").unwrap();
    let mut stream = subscribe(&server, std::slice::from_ref(&west)).await;
    let script = Script::new(PUBLISH_SCRIPT);

    // ARGV[7] absent: PUBLISH, as documented before batches.
    let [pos, history, id] = keys("/dispatch/west", "a");
    let first: (String, u64, u8, u64) = script
        .key(&pos)
        .key(&history)
        .key(&id)
        .arg("rt:{/dispatch/west}")
        .arg("e0")
        .arg(envelope(RECOMMENDATION))
        .arg(100)
        .arg(60)
        .arg(60)
        .invoke_async(&mut admin)
        .await
        .unwrap();
    assert_eq!(first, ("e0".to_owned(), 1, 0, 1));
    let again: (String, u64, u8, u64) = script
        .key(&pos)
        .key(&history)
        .key(&id)
        .arg("rt:{/dispatch/west}")
        .arg("e1")
        .arg(envelope(RECOMMENDATION))
        .arg(100)
        .arg(60)
        .arg(60)
        .arg("PUBLISH")
        .invoke_async(&mut admin)
        .await
        .unwrap();
    assert_eq!(
        again,
        ("e0".to_owned(), 1, 1, 0),
        "the same key: a duplicate"
    );

    let received = receive(&mut stream, 1).await;
    let position = received[0].1.position.clone().unwrap();
    assert_eq!((position.epoch.as_str(), position.seq), ("e0", 1));
}

#[tokio::test]
async fn one_script_call_publishes_several_events_in_order_and_a_repeated_key_once() {
    let server = RedisServer::start().await;
    let mut admin = admin(&server).await;
    let west = Group::try_dispatch("west").unwrap();
    let east = Group::try_dispatch("east").unwrap();
    let mut stream = subscribe(&server, &[west, east]).await;
    let script = Script::new(PUBLISH_SCRIPT);

    let mut call = script.prepare_invoke();
    for (group, key) in [
        ("/dispatch/west", "a"),
        ("/dispatch/east", "a"),
        ("/dispatch/west", "b"),
        ("/dispatch/west", "a"),
    ] {
        let [pos, history, id] = keys(group, key);
        call.key(pos).key(history).key(id);
    }
    call.arg("rt:{/dispatch/west}")
        .arg("w")
        .arg(envelope(RECOMMENDATION))
        .arg(100)
        .arg(60)
        .arg(60)
        .arg("PUBLISH");
    for (channel, epoch) in [
        ("rt:{/dispatch/east}", "e"),
        ("rt:{/dispatch/west}", "w2"),
        ("rt:{/dispatch/west}", "w3"),
    ] {
        call.arg(channel).arg(epoch).arg(envelope(RECOMMENDATION));
    }
    let replies: Vec<(String, u64, u8, u64)> = call
        .invoke_async::<Vec<redis::Value>>(&mut admin)
        .await
        .unwrap()
        .chunks(4)
        .map(|reply| redis::from_redis_value(redis::Value::Array(reply.to_vec())).unwrap())
        .collect();

    assert_eq!(
        replies,
        [
            ("w".to_owned(), 1, 0, 1),
            ("e".to_owned(), 1, 0, 1),
            ("w".to_owned(), 2, 0, 1),
            ("w".to_owned(), 1, 1, 0),
        ]
    );
    let received: Vec<(String, u64)> = receive(&mut stream, 3)
        .await
        .into_iter()
        .map(|(channel, envelope)| (channel, envelope.position.unwrap().seq))
        .collect();
    assert_eq!(
        received,
        [
            ("rt:{/dispatch/west}".to_owned(), 1),
            ("rt:{/dispatch/east}".to_owned(), 1),
            ("rt:{/dispatch/west}".to_owned(), 2),
        ]
    );
    let length: u64 = command(&mut admin, &["XLEN", "rt:{/dispatch/west}:history"]).await;
    assert_eq!(length, 2);
}

#[tokio::test]
async fn a_batch_without_the_publish_command_is_refused_before_any_write() {
    let server = RedisServer::start().await;
    let mut admin = admin(&server).await;
    let script = Script::new(PUBLISH_SCRIPT);
    let mut call = script.prepare_invoke();
    for group in ["/dispatch/west", "/dispatch/east"] {
        let [pos, history, id] = keys(group, "a");
        call.key(pos).key(history).key(id);
    }
    call.arg("rt:{/dispatch/west}")
        .arg("w")
        .arg(envelope(RECOMMENDATION))
        .arg(100)
        .arg(60)
        .arg(60)
        .arg("rt:{/dispatch/east}")
        .arg("e")
        .arg(envelope(RECOMMENDATION));

    let error = call
        .invoke_async::<redis::Value>(&mut admin)
        .await
        .unwrap_err();

    assert!(error.to_string().contains("3 keys per event"), "{error}");
    let keys: Vec<String> = command(&mut admin, &["KEYS", "*"]).await;
    assert!(keys.is_empty(), "{keys:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_publishes_reload_the_script_after_script_flush() {
    let server = RedisServer::start().await;
    let publisher = publisher(&server);
    let mut admin = admin(&server).await;
    publisher.publish(&recommendation("west")).await.unwrap();

    let () = command(&mut admin, &["SCRIPT", "FLUSH"]).await;
    let by_group = publish_concurrently(&publisher).await;

    let west = &by_group["/dispatch/west"];
    let mut seqs: Vec<u64> = west.iter().map(|(_, seq)| *seq).collect();
    seqs.sort_unstable();
    let per_group = (TASKS * EVENTS_PER_TASK / REGIONS.len()) as u64;
    assert_eq!(seqs, (2..=per_group + 1).collect::<Vec<_>>());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_waiting_publish_gets_a_typed_error_when_redis_stops() {
    let mut server = RedisServer::start().await;
    let config = PublisherConfig::new(server.url()).with_publish_timeout(Duration::from_secs(1));
    let publisher = Publisher::new(config).unwrap();
    publisher.publish(&recommendation("west")).await.unwrap();

    server.kill();
    let mut tasks = tokio::task::JoinSet::new();
    for task in 0..TASKS {
        let publisher = publisher.clone();
        let region = REGIONS[task % REGIONS.len()];
        tasks.spawn(async move { publisher.publish(&recommendation(region)).await });
    }
    let mut errors = Vec::new();
    within(DEADLINE, "every publish to a stopped redis", async {
        while let Some(joined) = tasks.join_next().await {
            errors.push(joined.unwrap().unwrap_err());
        }
    })
    .await;

    assert_eq!(errors.len(), TASKS);
    for error in &errors {
        assert!(
            matches!(
                error,
                PublishError::Unreachable(_) | PublishError::Timeout(_)
            ),
            "{error:?}"
        );
        assert!(error.is_transient());
    }
}
