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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_comes_back_with_its_position_gets_what_it_missed_then_live_events() {
    let gateway = start_gateway(&[]).await;
    let claims = dispatcher("d-1", &["west"]);
    let mut first = gateway.connect(&claims).await;
    let head = first.join_dispatch("1", "west").await;
    let epoch = head["epoch"].as_str().unwrap().to_owned();
    let seen = publish_many(&gateway, "west", 2).await;
    expect_in_order(&mut first, &seen, &epoch, 0).await;
    drop(first);

    let missed = publish_many(&gateway, "west", 3).await;
    let mut back = gateway.connect(&claims).await;
    let result = join_after(&mut back, "1", "west", &json!({"epoch": epoch, "seq": 2})).await;
    assert_eq!(result["recovered"], true, "{result}");
    assert_eq!(result["seq"], 5, "{result}");
    let live = publish_many(&gateway, "west", 1).await;
    expect_in_order(&mut back, &missed, &epoch, 2).await;
    expect_in_order(&mut back, &live, &epoch, 5).await;
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

    // A position ahead of the head means the history was rewound: a new epoch starts.
    let ahead = json!({"epoch": epoch, "seq": 9});
    let result = join_after(&mut other, "5", "west", &ahead).await;
    assert_eq!(result["recovered"], false, "{result}");
    assert_ne!(result["epoch"], epoch.as_str());
    assert_eq!(result["seq"], 0);
}

async fn replica(redis: &RedisServer) -> TestGateway {
    let gateway = start_gateway(&["--redis-url", &redis.url()]).await;
    gateway.wait_readyz(StatusCode::OK).await;
    gateway
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_resumes_on_another_replica_from_the_redis_history() {
    let redis = RedisServer::start().await;
    let a = replica(&redis).await;
    let b = replica(&redis).await;
    let claims = dispatcher("d-1", &["west"]);
    let mut client = a.connect(&claims).await;
    let head = client.join_dispatch("1", "west").await;
    let epoch = head["epoch"].as_str().unwrap().to_owned();
    let seen = publish_many(&a, "west", 2).await;
    expect_in_order(&mut client, &seen, &epoch, 0).await;
    drop(client);

    let missed = publish_many(&a, "west", 3).await;
    let mut back = b.connect(&claims).await;
    let result = join_after(&mut back, "1", "west", &json!({"epoch": epoch, "seq": 2})).await;
    assert_eq!(result["recovered"], true, "{result}");
    let live = publish_many(&a, "west", 2).await;
    expect_in_order(&mut back, &missed, &epoch, 2).await;
    expect_in_order(&mut back, &live, &epoch, 5).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_whose_subscription_was_cut_fills_the_gap_before_delivering_further() {
    let redis = RedisServer::start().await;
    let gateway = replica(&redis).await;
    let other = replica(&redis).await;
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
