//! Positions and history: `seq` per group, the bounded history read back in order, what a
//! resume can and cannot continue, new epochs, and idempotency keys.

use publisher_lib::contract::{Envelope, Group, Position};
use publisher_lib::{Publisher, PublisherConfig};

use crate::harness::*;

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
    let epoch = publish_west(&publisher, 8).await;

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
    let epoch = publish_west(&publisher, 3).await;
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
        .publish_with_key(&event, "retry-me")
        .await
        .unwrap();
    let second = publisher
        .publish_with_key(&event, "retry-me")
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
        assert_eq!(
            invalid_field(&error),
            "idempotencyKey",
            "{key:?}: {error:?}"
        );
    }
    let error = publisher.publish_with_key(&event, "").await.unwrap_err();
    assert_eq!(
        invalid_reason(&error),
        "field `idempotencyKey`: the idempotency key is empty"
    );
    let error = publisher
        .publish_with_key(&event, &"k".repeat(201))
        .await
        .unwrap_err();
    assert_eq!(
        invalid_reason(&error),
        "field `idempotencyKey`: the idempotency key is 201 bytes; at most 200 are allowed"
    );
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
