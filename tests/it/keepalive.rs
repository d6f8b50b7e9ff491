//! Keep-alive pings and the client timeout.

use std::time::Duration;

use e2e::gateway_with_dispatcher;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_client_gets_pings_then_is_closed_with_reconnect_allowed() {
    let (_gateway, mut client) = gateway_with_dispatcher(
        &["--keepalive-interval", "1s", "--client-timeout", "3s"],
        &["west"],
    )
    .await;
    // From here on the client sends nothing at all.
    let ping = client.next_record().await;
    assert_eq!(ping, "{\"type\":6}");
    let closed = client.expect_close_within(Duration::from_secs(15)).await;
    let record = closed.close_record();
    assert_eq!(
        *record,
        serde_json::json!({
            "type": 7,
            "error": "no message received from the client within the client timeout",
            "allowReconnect": true
        })
    );
    assert_eq!(closed.code(), 1000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_that_pings_is_not_timed_out() {
    let (gateway, mut client) = gateway_with_dispatcher(
        &["--keepalive-interval", "1s", "--client-timeout", "3s"],
        &["west"],
    )
    .await;
    // Answer each server ping with a ping, as the official client does when it has sent
    // nothing for a while; after twice the client timeout the connection is still served.
    let started = tokio::time::Instant::now();
    while started.elapsed() < Duration::from_secs(6) {
        let record = client.next_record().await;
        assert_eq!(
            record, "{\"type\":6}",
            "only pings arrive on an idle connection"
        );
        client.send_records(&[r#"{"type":6}"#]).await;
    }
    client.join_dispatch("1", "west").await;
    gateway.publish_and_expect(&mut client, "west").await;
}
