//! `POST /api/v1/events/batch`: an array of events, all validated before any is published,
//! then published in array order within each group, each under its own id, with one answer
//! per event.

use e2e::{RedisServer, StatusCode, gateway_with_dispatcher, recommendation_ready, start_gateway};
use serde_json::{Value, json};

fn json_of(body: &str) -> Value {
    serde_json::from_str(body).unwrap_or_else(|e| panic!("a JSON answer ({e}): {body}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_is_published_in_group_order_with_one_answer_per_event_and_its_bytes_unchanged() {
    published_in_group_order(&[]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_through_redis_is_published_in_group_order_with_one_answer_per_event() {
    let redis = RedisServer::start().await;
    published_in_group_order(&["--redis-url", &redis.url()]).await;
}

/// Publishes a batch over two groups to a gateway started with `extra_args`, and checks the
/// answers and what a member of both groups receives.
async fn published_in_group_order(extra_args: &[&str]) {
    let (gateway, mut client) = gateway_with_dispatcher(extra_args, &["west", "east"]).await;
    gateway.wait_readyz(StatusCode::OK).await;
    client.join_dispatch("1", "west").await;
    client.join_dispatch("2", "east").await;
    let mut events: Vec<String> = (0..5)
        .map(|i| recommendation_ready(if i % 2 == 0 { "west" } else { "east" }, &[]))
        .collect();
    // Odd spacing and a field the contract does not know travel as posted.
    events[2] = r#"{ "region" : "west", "type":"RecommendationReady",
        "jobId":"7d9f4f3e-1c2b-4d5e-8f60-123456789abc", "requestId":"0b1c2d3e-4f50-4a6b-9c8d-0e1f2a3b4c5d",
        "configVersion": 7, "generatedAt":"2025-11-08T12:34:56Z", "futureField": [1, "\u00e9"] }"#
        .to_owned();
    let body = format!(
        "\n [ {} ,\n{} ]\n",
        events[..2].join(","),
        events[2..].join(" , ")
    );

    let (status, answer) = gateway.publish_batch(None, &body).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{answer}");
    let answer = json_of(&answer);
    let results = answer["results"].as_array().expect("a `results` array");
    assert_eq!(results.len(), 5, "{answer}");
    // Positions follow array order within each group: west got 1, 2, 3 and east 1, 2.
    let seqs: Vec<(Value, Value)> = results
        .iter()
        .map(|r| (r["groups"][0].clone(), r["positions"][0]["seq"].clone()))
        .collect();
    assert_eq!(
        seqs,
        [
            (json!("/dispatch/west"), json!(1)),
            (json!("/dispatch/east"), json!(1)),
            (json!("/dispatch/west"), json!(2)),
            (json!("/dispatch/east"), json!(2)),
            (json!("/dispatch/west"), json!(3)),
        ]
    );
    assert!(results.iter().all(|r| r["duplicate"] == false));
    // Each group's events arrive in array order (the two groups side by side).
    let mut received: Vec<String> = Vec::new();
    for _ in &events {
        let (target, payload) = client.next_event().await;
        assert_eq!(target, "RecommendationReady");
        received.push(payload);
    }
    for region in ["west", "east"] {
        let of = |list: &[String]| -> Vec<String> {
            list.iter()
                .filter(|e| e.contains(&format!("\"{region}\"")))
                .cloned()
                .collect()
        };
        assert_eq!(of(&received), of(&events), "{region}, in order");
    }
    assert_eq!(received.len(), events.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalid_event_anywhere_in_a_batch_publishes_none_and_is_named_by_its_index() {
    let (gateway, mut client) = gateway_with_dispatcher(&[], &["west"]).await;
    client.join_dispatch("1", "west").await;
    let valid = recommendation_ready("west", &[]);
    let invalid = r#"{"type":"RecommendationReady","region":"west","requestId":"0b1c2d3e-4f50-4a6b-9c8d-0e1f2a3b4c5d","configVersion":1,"generatedAt":"2025-11-08T12:34:56Z"}"#;
    let (status, answer) = gateway
        .publish_batch(None, &format!("[{valid},{invalid},{valid}]"))
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{answer}");
    let answer = json_of(&answer);
    assert_eq!(answer["index"], 1);
    assert_eq!(answer["error"], "event 1: field `jobId`: is required");

    // Nothing of the batch was delivered: the next event is one published after it.
    let after = gateway.publish_and_expect(&mut client, "west").await;
    assert_ne!(after, valid);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_that_is_not_an_array_of_1_to_100_events_or_carries_an_idempotency_key_is_refused()
{
    let gateway = start_gateway(&[]).await;
    let event = recommendation_ready("west", &[]);
    let hundred_and_one = format!("[{}]", vec![event.as_str(); 101].join(","));
    for (body, key, expected) in [
        (
            event.as_str(),
            None,
            "a batch is a JSON array of events: invalid type: map, expected a sequence at line 1 column 0",
        ),
        ("[]", None, "a batch holds 1 to 100 events, not 0"),
        (
            hundred_and_one.as_str(),
            None,
            "a batch holds 1 to 100 events, not 101",
        ),
        (
            "[1]",
            None,
            "event 0: event is not a JSON object: invalid type: expected a JSON object",
        ),
        (
            &format!("[{event}]"),
            Some("k-1"),
            "Idempotency-Key applies to single events; each event of a batch is keyed by its own id",
        ),
    ] {
        let (status, answer) = gateway.publish_batch(key, body).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{answer}");
        assert_eq!(json_of(&answer)["error"], expected, "{body:.60}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_repeated_in_a_batch_is_delivered_once_and_answered_as_a_duplicate() {
    let (gateway, mut client) = gateway_with_dispatcher(&[], &["west"]).await;
    client.join_dispatch("1", "west").await;
    let event = recommendation_ready("west", &[]);
    let (status, answer) = gateway
        .publish_batch(None, &format!("[{event},{event}]"))
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{answer}");
    let answer = json_of(&answer);
    assert_eq!(answer["results"][0]["duplicate"], false);
    assert_eq!(answer["results"][1]["duplicate"], true);
    assert_eq!(
        answer["results"][1]["positions"],
        answer["results"][0]["positions"]
    );
    assert_eq!(client.next_event().await.1, event);
    // The repeat was not delivered: the next event is one published after the batch.
    let after = gateway.publish_and_expect(&mut client, "west").await;
    assert_ne!(after, event);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_spends_one_publish_token_per_event() {
    let gateway = start_gateway(&["--max-publishes-per-second", "5"]).await;
    let batch = |n: usize| {
        let events: Vec<String> = (0..n).map(|_| recommendation_ready("west", &[])).collect();
        format!("[{}]", events.join(","))
    };
    let (status, answer) = gateway.publish_batch(None, &batch(6)).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{answer}");
    assert_eq!(
        json_of(&answer)["error"],
        "a batch of 6 events is more than the 5 publishes a second allowed"
    );
    let (status, answer) = gateway.publish_batch(None, &batch(4)).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{answer}");
    // One token left: a batch of two takes none, a single publish takes it.
    let (status, answer) = gateway.publish_batch(None, &batch(2)).await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS, "{answer}");
    assert_eq!(json_of(&answer)["limit"], "publish_rate");
    let (status, answer) = gateway.publish(&recommendation_ready("west", &[])).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{answer}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_failure_answers_503_and_which_events_were_published() {
    let mut redis = RedisServer::start().await;
    let gateway = start_gateway(&["--redis-url", &redis.url()]).await;
    gateway.wait_readyz(StatusCode::OK).await;
    redis.kill();
    gateway.wait_readyz(StatusCode::SERVICE_UNAVAILABLE).await;
    let event = recommendation_ready("west", &[]);
    let (status, answer) = gateway.publish_batch(None, &format!("[{event}]")).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{answer}");
    assert_eq!(
        json_of(&answer),
        json!({"error": "unavailable", "published": []})
    );
}
