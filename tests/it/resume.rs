//! Positions and resume: every event carries its place in its group, a client that comes back
//! with its last position gets what it missed, once and in order, from any replica, and a
//! replica whose Redis subscription broke fills the gap from the history.

use e2e::{
    DEADLINE, RedisServer, StatusCode, TestGateway, WsClient, dispatcher, joined,
    recommendation_ready, start_gateway, within,
};
use serde_json::{Value, json};

/// Joins `/dispatch/{region}` with `after` as the position to resume from.
async fn join_after(client: &mut WsClient, id: &str, region: &str, after: &Value) -> Value {
    let completion = client
        .invoke(id, "JoinDispatchGroup", json!([region, after]))
        .await;
    joined(&completion, &format!("/dispatch/{region}"))
}

/// Publishes `count` events to `region` and returns them in order.
async fn publish_many(gateway: &TestGateway, region: &str, count: usize) -> Vec<String> {
    let mut sent = Vec::new();
    for _ in 0..count {
        let event = recommendation_ready(region, &[]);
        gateway.publish_accepted(&event).await;
        sent.push(event);
    }
    sent
}

/// Receives `count` events and checks they are `expected` with consecutive positions after
/// `after_seq` in `epoch`.
async fn expect_in_order(client: &mut WsClient, expected: &[String], epoch: &str, after_seq: u64) {
    for (offset, event) in expected.iter().enumerate() {
        let (_, payload, position) =
            within(DEADLINE, client.next_positioned_event(), "the next event").await;
        assert_eq!(&payload, event, "event {offset} after seq {after_seq}");
        assert_eq!(position["epoch"], epoch);
        assert_eq!(position["seq"], after_seq + 1 + offset as u64);
    }
}

/// `d-1` joins `/dispatch/west` on `first`, sees two events and goes; three more are published
/// on `first`; it comes back on `back_on` with its position, is told `recovered` with the head,
/// and receives the three it missed, then live ones, in order.
async fn check_comes_back(first: &TestGateway, back_on: &TestGateway) {
    let claims = dispatcher("d-1", &["west"]);
    let mut client = first.connect(&claims).await;
    let head = client.join_dispatch("1", "west").await;
    let epoch = head["epoch"]
        .as_str()
        .expect("the join names its epoch")
        .to_owned();
    let seen = publish_many(first, "west", 2).await;
    expect_in_order(&mut client, &seen, &epoch, 0).await;
    drop(client);

    let missed = publish_many(first, "west", 3).await;
    let mut back = back_on.connect(&claims).await;
    let result = join_after(&mut back, "1", "west", &json!({"epoch": epoch, "seq": 2})).await;
    assert_eq!(result["recovered"], true, "{result}");
    assert_eq!(result["seq"], 5, "{result}");
    let live = publish_many(first, "west", 2).await;
    expect_in_order(&mut back, &missed, &epoch, 2).await;
    expect_in_order(&mut back, &live, &epoch, 5).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_comes_back_with_its_position_gets_what_it_missed_then_live_events() {
    let gateway = start_gateway(&[]).await;
    check_comes_back(&gateway, &gateway).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_position_the_history_cannot_answer_is_reported_as_not_recovered() {
    let gateway = start_gateway(&["--history-size", "2"]).await;
    let mut client = gateway.connect(&dispatcher("d-1", &["west"])).await;
    let head = client.join_dispatch("1", "west").await;
    let epoch = head["epoch"].as_str().unwrap().to_owned();
    publish_many(&gateway, "west", 4).await;
    let mut other = gateway.connect(&dispatcher("d-2", &["west"])).await;

    for (id, after) in [
        (
            "1",
            json!({"epoch": "0123456789abcdef0123456789abcdef", "seq": 3}),
        ),
        ("2", json!({"epoch": epoch, "seq": 1})),
    ] {
        let result = join_after(&mut other, id, "west", &after).await;
        assert_eq!(result["recovered"], false, "{after} -> {result}");
        assert_eq!(result["seq"], 4);
    }
    // Within the last two, recovery is complete.
    let result = join_after(&mut other, "4", "west", &json!({"epoch": epoch, "seq": 2})).await;
    assert_eq!(result["recovered"], true, "{result}");
    // Nothing but what the join sent: the two kept events, once, in order.
    let kept: Vec<u64> = {
        let mut seqs = Vec::new();
        for _ in 0..2 {
            let (_, _, position) = other.next_positioned_event().await;
            seqs.push(position["seq"].as_u64().unwrap());
        }
        seqs
    };
    assert_eq!(kept, vec![3, 4]);

    // A position ahead of the head proves nothing (a client can send any): not recovered,
    // and the group keeps its epoch and head.
    let ahead = json!({"epoch": epoch, "seq": 9});
    let result = join_after(&mut other, "5", "west", &ahead).await;
    assert_eq!(result["recovered"], false, "{result}");
    assert_eq!(result["epoch"], epoch.as_str());
    assert_eq!(result["seq"], 4);
}

/// A forged position from one client leaves every other client's resume, the epoch and (in
/// memory) the idempotency keys as they were: A recovers what it missed in the same epoch, and
/// a publisher's retry is still a duplicate.
async fn a_forged_position_changes_nothing_for_the_others(gateway: &TestGateway) {
    let claims = dispatcher("d-1", &["west"]);
    let mut a = gateway.connect(&claims).await;
    let head = a.join_dispatch("1", "west").await;
    let epoch = head["epoch"]
        .as_str()
        .expect("the join names an epoch")
        .to_owned();
    let start = head["seq"].as_u64().expect("the join names a seq");
    let seen = publish_many(gateway, "west", 2).await;
    expect_in_order(&mut a, &seen, &epoch, start).await;
    drop(a);

    // B, allowed in west, claims to be far ahead of the group in its current epoch.
    let mut b = gateway.connect(&dispatcher("d-2", &["west"])).await;
    let forged = json!({"epoch": epoch, "seq": 999_999_999});
    let result = join_after(&mut b, "1", "west", &forged).await;
    assert_eq!(result["recovered"], false, "{result}");
    assert_eq!(result["epoch"], epoch.as_str(), "the group keeps its epoch");
    assert_eq!(result["seq"], start + 2, "the group keeps its head");

    // Events published meanwhile keep the epoch; B gets them live.
    let missed = publish_many(gateway, "west", 3).await;
    expect_in_order(&mut b, &missed, &epoch, start + 2).await;

    // A publisher retries the first event (same requestId): still a duplicate, delivered to
    // nobody. The next event B receives is the one after it.
    let (status, body) = gateway.publish(&seen[0]).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    let body: Value = serde_json::from_str(&body).expect("the publish answer is JSON");
    assert_eq!(body["duplicate"], true, "{body}");
    let next = publish_many(gateway, "west", 1).await;
    expect_in_order(&mut b, &next, &epoch, start + 5).await;

    // A comes back with its real last position: everything it missed, in the same epoch.
    let mut back = gateway.connect(&claims).await;
    let last = json!({"epoch": epoch, "seq": start + 2});
    let result = join_after(&mut back, "1", "west", &last).await;
    assert_eq!(result["recovered"], true, "{result}");
    assert_eq!(result["epoch"], epoch.as_str());
    assert_eq!(result["seq"], start + 6, "{result}");
    expect_in_order(&mut back, &[missed, next].concat(), &epoch, start + 2).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forged_position_ahead_of_the_head_cannot_reset_the_group_in_memory() {
    let gateway = start_gateway(&[]).await;
    a_forged_position_changes_nothing_for_the_others(&gateway).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forged_position_ahead_of_the_head_cannot_reset_the_group_in_redis() {
    let redis = RedisServer::start().await;
    let gateway = TestGateway::start_ready(&redis.url(), &[]).await;
    a_forged_position_changes_nothing_for_the_others(&gateway).await;
    let stored = redis.cli(&["HGET", "rt:{/dispatch/west}:pos", "seq"]).await;
    assert_eq!(stored.trim(), "6", "the stored head");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_resumes_on_another_replica_from_the_redis_history() {
    let redis = RedisServer::start().await;
    let a = TestGateway::start_ready(&redis.url(), &[]).await;
    let b = TestGateway::start_ready(&redis.url(), &[]).await;
    check_comes_back(&a, &b).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_whose_subscription_was_cut_fills_the_gap_before_delivering_further() {
    let redis = RedisServer::start().await;
    let gateway = TestGateway::start_ready(&redis.url(), &[]).await;
    let other = TestGateway::start_ready(&redis.url(), &[]).await;
    let mut client = gateway.connect(&dispatcher("d-1", &["west"])).await;
    let head = client.join_dispatch("1", "west").await;
    let epoch = head["epoch"].as_str().unwrap().to_owned();
    let before = publish_many(&other, "west", 1).await;
    expect_in_order(&mut client, &before, &epoch, 0).await;

    // Cut both replicas' subscriber connections and publish at once, while they reconnect.
    let killed = redis.cli(&["CLIENT", "KILL", "TYPE", "pubsub"]).await;
    assert!(
        killed.trim().parse::<u32>().is_ok_and(|n| n >= 2),
        "{killed}"
    );
    let during = publish_many(&other, "west", 5).await;
    let after = publish_many(&other, "west", 2).await;

    // Every event exactly once and in order: the gap was filled from the history.
    expect_in_order(&mut client, &during, &epoch, 1).await;
    expect_in_order(&mut client, &after, &epoch, 6).await;
    assert!(gateway.metric("gateway_broker_gap_repairs_total").await >= 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_whose_cursor_is_ahead_of_a_rewound_history_starts_a_new_epoch() {
    let redis = RedisServer::start().await;
    let gateway = TestGateway::start_ready(&redis.url(), &[]).await;
    let claims = dispatcher("d-1", &["west"]);
    let mut client = gateway.connect(&claims).await;
    let head = client.join_dispatch("1", "west").await;
    let epoch = head["epoch"].as_str().unwrap().to_owned();
    let seen = publish_many(&gateway, "west", 3).await;
    expect_in_order(&mut client, &seen, &epoch, 0).await;

    // A failover that lost the last two writes: the promoted history ends at seq 1, while the
    // replica delivered up to 3. Its subscriber connection breaks, as in a failover.
    redis
        .cli(&["HSET", "rt:{/dispatch/west}:pos", "seq", "1"])
        .await;
    redis
        .cli(&["XTRIM", "rt:{/dispatch/west}:history", "MAXLEN", "1"])
        .await;
    let killed = redis.cli(&["CLIENT", "KILL", "TYPE", "pubsub"]).await;
    assert!(
        killed.trim().parse::<u32>().is_ok_and(|n| n >= 1),
        "{killed}"
    );

    // After reconnecting, the replica reads after its own cursor, finds it ahead of the head and
    // starts a new epoch for the group.
    let renewed = within(
        DEADLINE,
        async {
            loop {
                let stored = redis
                    .cli(&["HGET", "rt:{/dispatch/west}:pos", "epoch"])
                    .await;
                let stored = stored.trim().to_owned();
                if !stored.is_empty() && stored != epoch {
                    return stored;
                }
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
        },
        "the replica to start a new epoch",
    )
    .await;

    // The connected client sees the new epoch from its first event; nobody resumes across it.
    let next = publish_many(&gateway, "west", 1).await;
    expect_in_order(&mut client, &next, &renewed, 0).await;
    let mut back = gateway.connect(&claims).await;
    let result = join_after(&mut back, "1", "west", &json!({"epoch": epoch, "seq": 1})).await;
    assert_eq!(result["recovered"], false, "{result}");
    assert_eq!(result["epoch"], renewed.as_str());
    assert_eq!(result["seq"], 1);
}
