//! Stateful reconnect carried across replicas on a real redis-server: the client of a
//! stateful connection comes back on another replica and goes on where it stopped (the Sequence,
//! the messages it had not acknowledged, then what was published meanwhile, once each), whether
//! the first replica still holds the connection (it is asked to hand it over) or drained; and
//! a connection that nobody can hand over is refused so the client starts over.

use e2e::{RedisServer, StatusCode, TestGateway, WsClient, dispatcher, recommendation_ready};
use serde_json::{Value, json};

const SECRET: &[&str] = &[
    "--connection-token-secret",
    "stateful-test-connection-secret-0123456789",
];

/// Two replicas sharing one Redis and the connection token secret.
async fn two_replicas(redis: &RedisServer, extra: &[&str]) -> (TestGateway, TestGateway) {
    two_replicas_at(&redis.url(), extra).await
}

/// Two replicas on the Redis at `url`, sharing the connection token secret.
async fn two_replicas_at(url: &str, extra: &[&str]) -> (TestGateway, TestGateway) {
    let args: Vec<&str> = SECRET.iter().chain(extra).copied().collect();
    let a = TestGateway::start_ready(url, &args).await;
    let b = TestGateway::start_ready(url, &args).await;
    (a, b)
}

/// The next record that is neither a Ping nor an Ack, parsed.
async fn next_tracked(client: &mut WsClient) -> Value {
    loop {
        let message = client.next_message().await;
        if message["type"] != 8 {
            return message;
        }
    }
}

/// Publishes events stamped `from` to `to` (their `n`) to `west` through `gateway`.
async fn publish(gateway: &TestGateway, from: u64, to: u64) {
    for n in from..=to {
        gateway
            .publish_accepted(&recommendation_ready("west", &[("n", json!(n))]))
            .await;
    }
}

/// The `n` stamp of an event record.
fn stamp(message: &Value) -> u64 {
    assert_eq!(message["type"], 1, "an event: {message}");
    message["arguments"][0]["n"]
        .as_u64()
        .expect("a stamped event")
}

/// A stateful client of `gateway` in `/dispatch/west` that received events 1 and 2: the server
/// sent it messages 1 (the join's completion), 2 and 3, none acknowledged.
async fn stateful_client_with_two_events(gateway: &TestGateway) -> (WsClient, String) {
    let token = gateway.token(&dispatcher("d-1", &["west"]));
    let path = gateway.negotiate_stateful(&token).await;
    let mut client = WsClient::connect(&format!("ws://{}{path}", gateway.public_addr())).await;
    client.handshake().await;
    client.join_dispatch("1", "west").await;
    publish(gateway, 1, 2).await;
    for n in 1..=2 {
        assert_eq!(stamp(&next_tracked(&mut client).await), n);
    }
    (client, path)
}

/// Resumes on `gateway` with `path` as the official client does (no negotiate, no handshake)
/// and checks the Sequence and the replay of the three unacknowledged messages.
async fn resume_and_expect_replay(gateway: &TestGateway, path: &str) -> WsClient {
    let mut client = WsClient::connect(&format!("ws://{}{path}", gateway.public_addr())).await;
    assert_eq!(
        next_tracked(&mut client).await,
        json!({"type": 9, "sequenceId": 1}),
        "the Sequence first: nothing was acknowledged"
    );
    let completion = next_tracked(&mut client).await;
    assert_eq!(
        completion["type"], 3,
        "the join's completion again: {completion}"
    );
    assert_eq!(completion["invocationId"], "1");
    for n in 1..=2 {
        assert_eq!(stamp(&next_tracked(&mut client).await), n, "replayed");
    }
    client
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_back_on_another_replica_gets_its_connection_handed_over() {
    let redis = RedisServer::start().await;
    let (a, b) = two_replicas(&redis, &[]).await;
    handed_over(&a, &b).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_documented_gateway_acl_user_is_enough_to_carry_a_connection() {
    let redis = RedisServer::start().await;
    let acl =
        crate::contract_doc::documented_acl("realtime-gateway", ">GATEWAY_PASSWORD", ">gw-pass");
    let args: Vec<&str> = acl.iter().map(String::as_str).collect();
    assert_eq!(redis.cli(&args).await.trim(), "OK");
    let url = format!(
        "redis://realtime-gateway:gw-pass@127.0.0.1:{}",
        redis.port()
    );
    let (a, b) = two_replicas_at(&url, &[]).await;
    handed_over(&a, &b).await;
}

/// A stateful client of replica `a` loses its socket and comes back on replica `b`, which
/// has `a` hand the connection over: it goes on where it stopped.
async fn handed_over(a: &TestGateway, b: &TestGateway) {
    let (client, path) = stateful_client_with_two_events(a).await;
    // The socket goes away without a close; replica a keeps the connection for its client.
    drop(client);
    publish(b, 3, 4).await;

    let mut client = resume_and_expect_replay(b, &path).await;
    for n in 3..=4 {
        assert_eq!(
            stamp(&next_tracked(&mut client).await),
            n,
            "published meanwhile"
        );
    }
    publish(a, 5, 5).await;
    assert_eq!(
        stamp(&next_tracked(&mut client).await),
        5,
        "live on replica b"
    );
    // Replica a let it go: it counted the handover and holds no member any more.
    let metrics = a.metrics_text().await;
    assert!(
        metrics.contains("gateway_stateful_transports_total{outcome=\"handed_over\"} 1"),
        "{metrics}"
    );
    let metrics = b.metrics_text().await;
    assert!(
        metrics.contains("gateway_stateful_transports_total{outcome=\"adopted\"} 1"),
        "{metrics}"
    );
}

/// A stateful client of replica `a` (with two events) whose replica drained and exited: the
/// replica left, the client's hub path, and how its socket was closed.
async fn drained_away(redis: &RedisServer) -> (TestGateway, String, e2e::Closed) {
    let (a, b) = two_replicas(redis, &["--shutdown-delay", "0s"]).await;
    let (mut client, path) = stateful_client_with_two_events(&a).await;
    a.shutdown();
    let closed = client.expect_close().await;
    a.wait().await;
    (b, path, closed)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_draining_replica_parks_its_connections_for_the_replica_their_clients_come_back_to() {
    let redis = RedisServer::start().await;
    let (b, path, closed) = drained_away(&redis).await;
    // No Close message (the client would stop): the socket just closes.
    assert_eq!(closed.close_record, None, "{closed:?}");
    assert_eq!(closed.code(), 1001);
    publish(&b, 3, 3).await;

    let mut client = resume_and_expect_replay(&b, &path).await;
    assert_eq!(
        stamp(&next_tracked(&mut client).await),
        3,
        "published meanwhile"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_nobody_hands_over_is_refused_so_the_client_starts_over() {
    let redis = RedisServer::start().await;
    let (b, path, _) = drained_away(&redis).await;
    // As if replica a had died without a word: what it parked is gone, its marker stays.
    let parked = redis.cli(&["--scan", "--pattern", "rt:carried:*"]).await;
    assert_eq!(parked.lines().count(), 1, "one connection parked: {parked}");
    for key in parked.lines().filter(|line| !line.is_empty()) {
        redis.cli(&["del", key]).await;
    }

    let refusal = WsClient::try_connect(format!("ws://{}{path}", b.public_addr()))
        .await
        .expect_err("no replica can hand the connection over");
    refusal.assert_is(
        StatusCode::NOT_FOUND,
        "No Connection with that ID: the replica holding the connection did not hand it over",
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_carried_away_and_back_again_goes_on_each_time() {
    let redis = RedisServer::start().await;
    let (a, b) = two_replicas(&redis, &[]).await;
    let (client, path) = stateful_client_with_two_events(&a).await;
    drop(client);
    let mut client = resume_and_expect_replay(&b, &path).await;
    publish(&b, 3, 3).await;
    assert_eq!(stamp(&next_tracked(&mut client).await), 3, "message 4");
    // The client acknowledges all it has, then invokes (message 5 answers it: by then the Ack
    // was processed), then comes back to replica a.
    client.send_records(&[r#"{"type":8,"sequenceId":4}"#]).await;
    let left = client
        .invoke("2", "LeaveDispatchGroup", json!(["east"]))
        .await;
    assert_eq!(left["invocationId"], "2");
    drop(client);
    publish(&a, 4, 4).await;

    let mut client = WsClient::connect(&format!("ws://{}{path}", a.public_addr())).await;
    assert_eq!(
        next_tracked(&mut client).await,
        json!({"type": 9, "sequenceId": 5})
    );
    let completion = next_tracked(&mut client).await;
    assert_eq!(completion["invocationId"], "2", "replayed: {completion}");
    assert_eq!(
        stamp(&next_tracked(&mut client).await),
        4,
        "once, after the replay"
    );
    publish(&b, 5, 5).await;
    assert_eq!(
        stamp(&next_tracked(&mut client).await),
        5,
        "live on replica a again"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_carried_connection_whose_new_token_no_longer_allows_a_group_is_closed_to_start_over() {
    let redis = RedisServer::start().await;
    let (a, b) = two_replicas(&redis, &[]).await;
    let (client, path) = stateful_client_with_two_events(&a).await;
    drop(client);
    // Same user, but the token it comes back with allows only another region.
    let east_only = b.token(&dispatcher("d-1", &["east"]));
    let id = path.split('&').next().expect("the path starts with the id");
    let mut client = WsClient::connect(&format!(
        "ws://{}{id}&access_token={east_only}",
        b.public_addr()
    ))
    .await;
    let closed = client.expect_close().await;
    let close = closed.close_record();
    assert_eq!(
        close["error"],
        "the connection could not be carried over without losing events; reconnect"
    );
    assert_eq!(close["allowReconnect"], true);
}
