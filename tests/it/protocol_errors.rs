//! What the gateway does with bytes that are not the JSON hub protocol, after the handshake:
//! a Close record saying why (no reconnect), a close frame with a specific code, and the
//! gateway goes on serving everyone else.

use e2e::{Closed, TestGateway, dispatcher, gateway_with_dispatcher, start_gateway};
use serde_json::json;

/// Connects a client, sends `garbage` after the handshake and returns how the socket ended.
async fn send_after_handshake(gateway: &TestGateway, garbage: &str) -> Closed {
    let mut client = gateway.connect_dispatcher(&["west"]).await;
    client.send_text(garbage).await;
    client.expect_close().await
}

/// Checks the Close record is exactly `error` without reconnect, and the close frame's code.
fn assert_protocol_close(closed: &Closed, error: &str, code: u16) {
    assert_eq!(
        *closed.close_record(),
        json!({"type": 7, "error": error, "allowReconnect": false})
    );
    assert_eq!(closed.code(), code, "close frame: {closed:?}");
}

/// A fresh client still joins and receives events on `gateway`.
async fn assert_gateway_still_serves(gateway: &TestGateway) {
    let mut client = gateway
        .connect(&dispatcher("dispatcher-2", &["west"]))
        .await;
    client.join_dispatch("0", "west").await;
    gateway.publish_and_expect(&mut client, "west").await;
}

/// On a fresh gateway, `garbage` after the handshake closes the connection with `error` and
/// `code`, and the gateway still serves others.
async fn check_closed_for(garbage: &str, error: &str, code: u16) {
    let gateway = start_gateway(&[]).await;
    let closed = send_after_handshake(&gateway, garbage).await;
    assert_protocol_close(&closed, error, code);
    assert_gateway_still_serves(&gateway).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn text_that_is_not_json_closes_the_connection_with_1008_and_no_reconnect() {
    check_closed_for(
        "not json\u{1e}",
        "malformed message: a message must be a JSON object",
        1008,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn message_with_a_string_type_closes_the_connection_with_1008_and_no_reconnect() {
    check_closed_for(
        "{\"type\":\"x\"}\u{1e}",
        "message has no numeric 'type'",
        1008,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn message_of_an_unknown_type_closes_the_connection_with_1008_and_no_reconnect() {
    check_closed_for("{\"type\":99}\u{1e}", "unknown message type 99", 1008).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invocation_without_arguments_closes_the_connection_with_1008() {
    check_closed_for(
        "{\"type\":1,\"invocationId\":\"0\",\"target\":\"JoinDispatchGroup\"}\u{1e}",
        "malformed message: 'arguments' must be an array",
        1008,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binary_frame_closes_the_connection_with_1003() {
    let (gateway, mut client) = gateway_with_dispatcher(&[], &["west"]).await;
    client.send_binary(&[0x91, 0x06]).await;
    let closed = client.expect_close().await;
    assert_protocol_close(
        &closed,
        "binary frames are not supported by the JSON hub protocol",
        1003,
    );
    assert_gateway_still_serves(&gateway).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn message_over_the_size_limit_closes_the_connection_with_1009() {
    let (gateway, mut client) =
        gateway_with_dispatcher(&["--max-message-size", "2KiB"], &["west"]).await;
    let padding = "x".repeat(4096);
    client
        .send_text(&format!(
            "{{\"type\":1,\"target\":\"JoinDispatchGroup\",\"arguments\":[\"{padding}\"]}}\u{1e}"
        ))
        .await;
    let closed = client.expect_close().await;
    assert_protocol_close(&closed, "message larger than the 2048-byte limit", 1009);
    assert_gateway_still_serves(&gateway).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_split_across_frames_over_the_size_limit_close_the_connection_with_1009() {
    let (_gateway, mut client) =
        gateway_with_dispatcher(&["--max-message-size", "2KiB"], &["west"]).await;
    // Each frame is under the limit, but the record they build never ends.
    let chunk = "x".repeat(1500);
    client
        .send_text(&format!(
            "{{\"type\":1,\"target\":\"JoinDispatchGroup\",\"arguments\":[\"{chunk}"
        ))
        .await;
    client.send_text(&chunk).await;
    let closed = client.expect_close().await;
    assert_protocol_close(&closed, "message larger than the 2048-byte limit", 1009);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn close_message_from_the_client_is_answered_with_a_close_frame_only() {
    let gateway = start_gateway(&[]).await;
    let closed = send_after_handshake(&gateway, "{\"type\":7}\u{1e}").await;
    assert_eq!(
        closed.close_record, None,
        "no Close record back: {closed:?}"
    );
    assert_eq!(closed.code(), 1000, "a normal closure: {closed:?}");
    assert_gateway_still_serves(&gateway).await;
}
