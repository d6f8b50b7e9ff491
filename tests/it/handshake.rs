//! The SignalR handshake as a raw client sends it: what is accepted, what is refused and how.

use e2e::{TestGateway, WsClient, dispatcher, start_gateway};

/// Sends `request` as the first frame and returns the reply record and how the socket ended
/// (`None` when the handshake was accepted and the socket stays open).
async fn handshake_reply(request: &str) -> (String, Option<e2e::Closed>) {
    let gateway = start_gateway(&[]).await;
    let mut client = upgraded(&gateway).await;
    client.send_text(request).await;
    let reply = client.next_record().await;
    if reply == "{}" {
        return (reply, None);
    }
    let closed = client.expect_close().await;
    (reply, Some(closed))
}

/// A dispatcher's WebSocket, upgraded and not shaken hands yet.
async fn upgraded(gateway: &TestGateway) -> WsClient {
    let token = gateway.token(&dispatcher("dispatcher-1", &["west"]));
    WsClient::connect(&gateway.hub_url(&token)).await
}

/// Checks that the gateway cancels the handshake: the error record, then close code 1008.
async fn assert_handshake_canceled(client: &mut WsClient) {
    let closed = client.expect_close().await;
    assert_eq!(
        closed.records,
        vec![r#"{"error":"Handshake was canceled."}"#.to_owned()]
    );
    assert_eq!(closed.code(), 1008);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_version_1_handshake_is_accepted_with_an_empty_object() {
    let (reply, closed) = handshake_reply("{\"protocol\":\"json\",\"version\":1}\u{1e}").await;
    assert_eq!(reply, "{}");
    assert!(closed.is_none(), "the handshake was refused: {closed:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_version_2_handshake_is_accepted_with_an_empty_object() {
    let (reply, closed) = handshake_reply("{\"protocol\":\"json\",\"version\":2}\u{1e}").await;
    assert_eq!(reply, "{}");
    assert!(closed.is_none(), "the handshake was refused: {closed:?}");
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
    assert_eq!(
        reply,
        r#"{"error":"Handshake request is malformed: EOF while parsing a value"}"#
    );
    assert_eq!(closed.expect("socket closes").code(), 1008);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handshake_without_a_protocol_field_is_refused_with_an_error_reply() {
    let (reply, closed) = handshake_reply("{\"version\":1}\u{1e}").await;
    assert_eq!(
        reply,
        r#"{"error":"Handshake request is malformed: missing field `protocol`"}"#
    );
    assert_eq!(closed.expect("socket closes").code(), 1008);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handshake_not_completed_in_time_is_canceled_and_the_socket_closes() {
    let gateway = start_gateway(&["--handshake-timeout", "1s"]).await;
    let mut client = upgraded(&gateway).await;
    // Half a handshake, never finished: the record separator never comes.
    client.send_text("{\"protocol\":\"json\",").await;
    assert_handshake_canceled(&mut client).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_client_gets_handshake_canceled_after_the_handshake_timeout() {
    let gateway = start_gateway(&["--handshake-timeout", "1s"]).await;
    let mut client = upgraded(&gateway).await;
    assert_handshake_canceled(&mut client).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invocation_in_the_same_frame_as_the_handshake_is_answered() {
    let gateway = start_gateway(&[]).await;
    let mut client = upgraded(&gateway).await;
    client
        .send_records(&[
            r#"{"protocol":"json","version":1}"#,
            r#"{"type":1,"invocationId":"0","target":"JoinDispatchGroup","arguments":["west"]}"#,
        ])
        .await;
    assert_eq!(client.next_record().await, "{}");
    let completion = client.next_message().await;
    assert_eq!(completion["invocationId"], "0");
    e2e::joined(&completion, "/dispatch/west");
    // The join took effect: an event for the region arrives.
    gateway.publish_and_expect(&mut client, "west").await;
}
