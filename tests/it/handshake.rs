//! The SignalR handshake as a raw client sends it: what is accepted, what is refused and how.

use e2e::{RS, WsClient, dispatcher, start_gateway};

/// Sends `request` as the first frame and returns the reply record and how the socket ended
/// (`None` when the handshake was accepted and the socket stays open).
async fn handshake_reply(request: &str) -> (String, Option<e2e::Closed>) {
    let gateway = start_gateway(&[]).await;
    let mut client =
        WsClient::connect(&gateway.hub_url(&gateway.token(&dispatcher("dispatcher-1", &["west"]))))
            .await;
    client.send_text(request).await;
    let reply = client.next_record().await;
    if reply == "{}" {
        return (reply, None);
    }
    let closed = client.expect_close().await;
    (reply, Some(closed))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_version_1_handshake_is_accepted_with_an_empty_object() {
    let (reply, closed) = handshake_reply("{\"protocol\":\"json\",\"version\":1}\u{1e}").await;
    assert_eq!(reply, "{}");
    assert!(closed.is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_version_2_handshake_is_accepted_with_an_empty_object() {
    let (reply, closed) = handshake_reply("{\"protocol\":\"json\",\"version\":2}\u{1e}").await;
    assert_eq!(reply, "{}");
    assert!(closed.is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messagepack_handshake_is_refused_as_unsupported_then_closed() {
    let (reply, closed) =
        handshake_reply("{\"protocol\":\"messagepack\",\"version\":1}\u{1e}").await;
    assert_eq!(
        reply,
        r#"{"error":"The protocol 'messagepack' is not supported."}"#
    );
    let closed = closed.expect("the socket closes after a refused handshake");
    assert_eq!(closed.code(), 1008);
    assert_eq!(
        closed.records,
        Vec::<String>::new(),
        "nothing after the reply"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_version_3_handshake_is_refused_as_unsupported_then_closed() {
    let (reply, closed) = handshake_reply("{\"protocol\":\"json\",\"version\":3}\u{1e}").await;
    assert_eq!(
        reply,
        r#"{"error":"The server does not support version 3 of the 'json' protocol."}"#
    );
    assert_eq!(closed.expect("socket closes").code(), 1008);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_handshake_json_is_refused_with_an_error_reply_then_closed() {
    let (reply, closed) = handshake_reply("{\"protocol\":\u{1e}").await;
    let reply: serde_json::Value = serde_json::from_str(&reply).expect("the reply is JSON");
    let error = reply["error"].as_str().expect("an error reply");
    assert!(
        error.starts_with("Handshake request is malformed"),
        "unexpected error: {error}"
    );
    assert_eq!(reply.as_object().map(|o| o.len()), Some(1), "no `type`");
    assert_eq!(closed.expect("socket closes").code(), 1008);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handshake_without_a_protocol_field_is_refused_with_an_error_reply() {
    let (reply, closed) = handshake_reply("{\"version\":1}\u{1e}").await;
    let reply: serde_json::Value = serde_json::from_str(&reply).expect("the reply is JSON");
    let error = reply["error"].as_str().expect("an error reply");
    assert!(
        error.starts_with("Handshake request is malformed") && error.contains("protocol"),
        "unexpected error: {error}"
    );
    assert_eq!(closed.expect("socket closes").code(), 1008);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handshake_not_completed_in_time_is_canceled_and_the_socket_closes() {
    let gateway = start_gateway(&["--handshake-timeout", "1s"]).await;
    let token = gateway.token(&dispatcher("dispatcher-1", &["west"]));
    let mut client = WsClient::connect(&gateway.hub_url(&token)).await;
    // Half a handshake, never finished: the record separator never comes.
    client.send_text("{\"protocol\":\"json\",").await;
    let closed = client.expect_close().await;
    assert_eq!(
        closed.records,
        vec![r#"{"error":"Handshake was canceled."}"#.to_owned()]
    );
    assert_eq!(closed.code(), 1008);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_client_gets_handshake_canceled_after_the_handshake_timeout() {
    let gateway = start_gateway(&["--handshake-timeout", "1s"]).await;
    let token = gateway.token(&dispatcher("dispatcher-1", &["west"]));
    let mut client = WsClient::connect(&gateway.hub_url(&token)).await;
    let closed = client.expect_close().await;
    assert_eq!(
        closed.records,
        vec![r#"{"error":"Handshake was canceled."}"#.to_owned()]
    );
    assert_eq!(closed.code(), 1008);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invocation_in_the_same_frame_as_the_handshake_is_answered() {
    let gateway = start_gateway(&[]).await;
    let token = gateway.token(&dispatcher("dispatcher-1", &["west"]));
    let mut client = WsClient::connect(&gateway.hub_url(&token)).await;
    client
        .send_text(&format!(
            "{{\"protocol\":\"json\",\"version\":1}}{RS}\
             {{\"type\":1,\"invocationId\":\"0\",\"target\":\"JoinDispatchGroup\",\"arguments\":[\"west\"]}}{RS}"
        ))
        .await;
    assert_eq!(client.next_record().await, "{}");
    let completion = client.next_message().await;
    assert_eq!(completion["invocationId"], "0");
    e2e::joined(&completion, "/dispatch/west");
    // The join took effect: an event for the region arrives.
    let event = e2e::recommendation_ready("west", &[]);
    gateway.publish_accepted(&event).await;
    let (target, payload) = client.next_event().await;
    assert_eq!(target, "RecommendationReady");
    assert_eq!(payload, event);
}
