//! `POST /api/v1/events`: the service key, validation with reasons, and delivery of the
//! posted bytes unchanged.

use e2e::{
    RedisServer, StatusCode, contractor, dispatcher, gateway_with_dispatcher, recommendation_ready,
    start_gateway,
};
use serde_json::{Value, json};

const CONTRACTOR: &str = "5f0c7a0e-3a4b-4c5d-8e6f-0a1b2c3d4e5f";

fn job_assigned() -> Value {
    json!({
        "type": "JobAssigned",
        "jobId": "7d9f4f3e-1c2b-4d5e-8f60-123456789abc",
        "contractorId": CONTRACTOR,
        "assignmentId": "0b1c2d3e-4f50-4a6b-9c8d-0e1f2a3b4c5d",
        "startUtc": "2025-11-10T08:00:00Z",
        "endUtc": "2025-11-10T10:00:00Z",
        "region": "west",
        "source": "auto",
        "auditId": "1a2b3c4d-5e6f-4a7b-8c9d-0e1f2a3b4c5d"
    })
}

fn error_of(body: &str) -> String {
    let body: Value = serde_json::from_str(body).expect("errors are JSON");
    body["error"]
        .as_str()
        .expect("an `error` string")
        .to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn valid_event_is_accepted_with_202_and_its_groups() {
    let gateway = start_gateway(&[]).await;
    let (status, body) = gateway.publish(&job_assigned().to_string()).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    // The answer's keys in the order the endpoint has always written them.
    assert!(
        body.starts_with(r#"{"duplicate":false,"groups":["/dispatch/west","#)
            && body.contains(r#"],"positions":[{"epoch":""#)
            && body.ends_with(r#"}],"type":"JobAssigned"}"#),
        "{body}"
    );
    let body: Value = serde_json::from_str(&body).expect("JSON");
    let contractor_group = format!("/contractor/{CONTRACTOR}");
    assert_eq!(body["type"], "JobAssigned");
    assert_eq!(body["groups"], json!(["/dispatch/west", contractor_group]));
    assert_eq!(body["duplicate"], false);
    // The first event of each group: seq 1, under each group's own epoch.
    let positions = body["positions"].as_array().expect("positions");
    assert_eq!(positions.len(), 2, "{body}");
    for (position, group) in positions.iter().zip(["/dispatch/west", &contractor_group]) {
        assert_eq!(position["group"], group);
        assert_eq!(position["seq"], 1);
        assert_eq!(position["epoch"].as_str().map(str::len), Some(32));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_idempotency_key_is_delivered_once_and_answered_as_a_duplicate() {
    let (gateway, mut client) = gateway_with_dispatcher(&[], &["west"]).await;
    client.join_dispatch("1", "west").await;
    let first = recommendation_ready("west", &[]);
    let second = recommendation_ready("west", &[]);
    let key = "retry-of-request-17";
    let (status, body) = gateway.publish_with_idempotency_key(key, &first).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    // A retry with the same key, even with another body, is acknowledged and not delivered.
    let (status, body) = gateway.publish_with_idempotency_key(key, &second).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    let body: Value = serde_json::from_str(&body).expect("JSON");
    assert_eq!(body["duplicate"], true, "{body}");
    assert_eq!(body["positions"][0]["seq"], 1, "{body}");
    // Without a header the event's own id is the key: the same event twice is one delivery.
    gateway.publish_accepted(&second).await;
    let (status, body) = gateway.publish(&second).await;
    assert_eq!(status, StatusCode::ACCEPTED);
    assert!(body.contains("\"duplicate\":true"), "{body}");
    let marker = recommendation_ready("west", &[]);
    gateway.publish_accepted(&marker).await;

    let (_, payload, position) = client.next_positioned_event().await;
    assert_eq!(
        (payload.as_str(), position["seq"].as_u64()),
        (first.as_str(), Some(1))
    );
    let (_, payload, position) = client.next_positioned_event().await;
    assert_eq!(
        (payload.as_str(), position["seq"].as_u64()),
        (second.as_str(), Some(2))
    );
    let (_, payload, position) = client.next_positioned_event().await;
    assert_eq!(
        (payload.as_str(), position["seq"].as_u64()),
        (marker.as_str(), Some(3))
    );

    let (status, body) = gateway
        .publish_with_idempotency_key("has space", &marker)
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert_eq!(
        error_of(&body),
        "Idempotency-Key must be 1 to 200 printable ASCII characters without spaces"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn event_missing_a_field_is_refused_with_400_naming_it() {
    let gateway = start_gateway(&[]).await;
    let mut event = job_assigned();
    event
        .as_object_mut()
        .expect("an object")
        .remove("assignmentId");
    let (status, body) = gateway.publish(&event.to_string()).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert_eq!(error_of(&body), "field `assignmentId`: is required");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn event_with_an_invalid_field_is_refused_with_400_naming_it() {
    let gateway = start_gateway(&[]).await;
    let mut event = job_assigned();
    event["region"] = json!("west coast");
    let (status, body) = gateway.publish(&event.to_string()).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert_eq!(
        error_of(&body),
        "field `region`: may contain only letters, digits, '-', '_' and '.'"
    );

    let mut event = job_assigned();
    event["endUtc"] = json!("2025-11-10T07:00:00Z");
    let (status, body) = gateway.publish(&event.to_string()).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert_eq!(error_of(&body), "field `endUtc`: must be after startUtc");

    let mut event = job_assigned();
    event["jobId"] = json!("not-a-uuid");
    let (status, body) = gateway.publish(&event.to_string()).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert_eq!(
        error_of(&body),
        "field `jobId`: `not-a-uuid` is not a UUID like 7d9f4f3e-1c2b-4d5e-8f60-123456789abc"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn event_of_an_unknown_type_is_refused_with_400() {
    let gateway = start_gateway(&[]).await;
    let (status, body) = gateway.publish(r#"{"type":"JobCancelled"}"#).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert_eq!(
        error_of(&body),
        "unknown event type `JobCancelled`; expected RecommendationReady or JobAssigned"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn event_over_two_kilobytes_is_refused_with_400() {
    let gateway = start_gateway(&[]).await;
    let event = recommendation_ready("west", &[("padding", json!("x".repeat(2048)))]);
    let (status, body) = gateway.publish(&event).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert_eq!(
        error_of(&body),
        format!(
            "event is {} bytes; the contract allows at most 2047",
            event.len()
        )
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_over_the_http_limit_is_refused_with_413_in_the_same_json_shape() {
    let gateway = start_gateway(&[]).await;
    let event = recommendation_ready("west", &[("padding", json!("x".repeat(70 * 1024)))]);
    let (status, body) = gateway.publish(&event).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "{body}");
    assert_eq!(
        error_of(&body),
        "Failed to buffer the request body: length limit exceeded"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_service_key_is_refused_with_401() {
    let gateway = start_gateway(&[]).await;
    let event = recommendation_ready("west", &[]);
    let (status, body) = gateway
        .publish_with_key("not-the-service-key-at-all", &event)
        .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
    assert_eq!(error_of(&body), "missing or invalid service key");
    let (status, body) = gateway.publish_with_key("", &event).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
    assert_eq!(error_of(&body), "missing or invalid service key");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn user_token_is_not_a_service_key() {
    let gateway = start_gateway(&[]).await;
    let token = gateway.token(&dispatcher("dispatcher-1", &["west"]));
    let (status, body) = gateway
        .publish_with_key(&token, &recommendation_ready("west", &[]))
        .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
    assert_eq!(error_of(&body), "missing or invalid service key");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn posted_bytes_arrive_unchanged_including_unknown_fields() {
    let (gateway, mut client) = gateway_with_dispatcher(&[], &["west"]).await;
    client.join_dispatch("1", "west").await;
    // Odd spacing, field order, escapes and a field the contract does not know: all of it
    // must reach the browser exactly as posted.
    let event = r#"{ "region" : "west", "type":"RecommendationReady",
        "jobId":"7d9f4f3e-1c2b-4d5e-8f60-123456789abc", "requestId":"0b1c2d3e-4f50-4a6b-9c8d-0e1f2a3b4c5d",
        "configVersion": 7, "generatedAt":"2025-11-08T12:34:56Z",
        "futureField": {"nested": [1, 2.50, "\u00e9\n"], "flag": true} }"#;
    gateway.publish_accepted(event).await;
    let (target, payload) = client.next_event().await;
    assert_eq!(target, "RecommendationReady");
    assert_eq!(payload, event);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn surrounding_whitespace_of_the_body_is_not_forwarded() {
    let (gateway, mut client) = gateway_with_dispatcher(&[], &["west"]).await;
    client.join_dispatch("1", "west").await;
    let event = recommendation_ready("west", &[]);
    gateway.publish_accepted(&format!("\n  {event}\r\n")).await;
    assert_eq!(client.next_event().await.1, event);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn job_assigned_reaches_the_region_and_the_contractor() {
    let (gateway, mut dispatcher_client) = gateway_with_dispatcher(&[], &["west"]).await;
    dispatcher_client.join_dispatch("1", "west").await;
    let mut contractor_client = gateway
        .connect(&contractor("contractor-1", CONTRACTOR))
        .await;
    let completion = contractor_client
        .invoke("1", "JoinContractorGroup", json!([CONTRACTOR]))
        .await;
    e2e::joined(&completion, &format!("/contractor/{CONTRACTOR}"));
    let event = job_assigned().to_string();
    gateway.publish_accepted(&event).await;
    assert_eq!(
        dispatcher_client.next_event().await,
        ("JobAssigned".to_owned(), event.clone())
    );
    assert_eq!(
        contractor_client.next_event().await,
        ("JobAssigned".to_owned(), event)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_failure_is_answered_503_unavailable_without_the_brokers_error_text() {
    let mut redis = RedisServer::start().await;
    let gateway = start_gateway(&["--redis-url", &redis.url()]).await;
    gateway.wait_readyz(StatusCode::OK).await;
    // The broker's error names the Redis connection (and, in a cluster or under memory
    // pressure, `MOVED host:port` or OOM text): none of a publisher's business.
    redis.kill();
    gateway.wait_readyz(StatusCode::SERVICE_UNAVAILABLE).await;
    let (status, body) = gateway.publish(&recommendation_ready("west", &[])).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert_eq!(
        serde_json::from_str::<Value>(&body).unwrap(),
        json!({"error": "unavailable"})
    );
}
