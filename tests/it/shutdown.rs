//! Graceful shutdown: readiness turns false, in-flight requests finish, and connected clients
//! are told to reconnect elsewhere.

use std::time::Duration;

use e2e::{
    DEADLINE, HeldRequest, StatusCode, TestGateway, dispatcher, recommendation_ready,
    start_gateway, within,
};

/// Polls `/readyz` until it answers 503, and returns its body.
async fn until_not_ready(gateway: &TestGateway) -> String {
    let poll = async {
        loop {
            match gateway.readyz().await {
                Ok((StatusCode::SERVICE_UNAVAILABLE, body)) => return body,
                Ok((StatusCode::OK, _)) => {}
                Ok((status, body)) => panic!("/readyz answered {status}: {body}"),
                Err(e) => panic!("/readyz stopped answering before it reported draining: {e}"),
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    within(DEADLINE, poll, "/readyz to report draining").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ready_gateway_answers_readyz_with_200() {
    let gateway = start_gateway(&[]).await;
    let (status, body) = gateway.readyz().await.expect("/readyz answers");
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body, "ready\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_closes_clients_with_reconnect_allowed_and_readyz_reports_draining() {
    let gateway = start_gateway(&[]).await;
    let mut client = gateway
        .connect(&dispatcher("dispatcher-1", &["west"]))
        .await;
    client.join_dispatch("1", "west").await;
    // A publish in flight when the shutdown begins holds the public listener open, so the
    // draining state can be observed before the gateway is gone.
    let event = recommendation_ready("west", &[]);
    let held = HeldRequest::start(gateway.public_addr(), "/api/v1/events", &event).await;

    gateway.shutdown();
    assert_eq!(until_not_ready(&gateway).await, "not ready: draining\n");

    // The in-flight publish completes during the drain.
    let response = held.finish().await;
    assert!(
        response.starts_with("HTTP/1.1 202"),
        "in-flight publish: {response}"
    );

    let closed = client.expect_close().await;
    assert_eq!(
        *closed.close_record(),
        serde_json::json!({
            "type": 7,
            "error": "server is shutting down; reconnect",
            "allowReconnect": true
        })
    );
    assert_eq!(closed.code(), 1001);
    gateway.wait().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_without_clients_finishes_cleanly() {
    let gateway = start_gateway(&[]).await;
    let admin = gateway.admin_addr();
    gateway.stop().await;
    // The admin listener is closed once the gateway has stopped.
    let refused = tokio::net::TcpStream::connect(admin)
        .await
        .expect_err("admin listener still open");
    assert_eq!(refused.kind(), std::io::ErrorKind::ConnectionRefused);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_in_the_middle_of_its_handshake_is_closed_by_shutdown() {
    let gateway = start_gateway(&[]).await;
    let token = gateway.token(&dispatcher("dispatcher-1", &["west"]));
    let mut client = e2e::WsClient::connect(&gateway.hub_url(&token)).await;
    gateway.shutdown();
    let closed = client.expect_close().await;
    // Before its handshake the client reads a handshake response, not a Close message.
    assert_eq!(
        closed.records,
        vec![r#"{"error":"The server is shutting down."}"#.to_owned()]
    );
    assert_eq!(closed.code(), 1001, "{closed:?}");
    gateway.wait().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn during_the_shutdown_delay_the_gateway_is_not_ready_but_still_serves_new_clients() {
    let gateway = start_gateway(&["--shutdown-delay", "1500ms"]).await;
    let mut client = gateway.connect(&dispatcher("d-1", &["west"])).await;
    client.join_dispatch("1", "west").await;

    gateway.shutdown();
    assert_eq!(until_not_ready(&gateway).await, "not ready: draining\n");
    // The load balancer has not noticed yet: a new client still gets in, and events flow.
    let mut late = gateway.connect(&dispatcher("d-2", &["west"])).await;
    late.join_dispatch("1", "west").await;
    let event = recommendation_ready("west", &[]);
    gateway.publish_accepted(&event).await;
    assert_eq!(
        within(DEADLINE, late.next_event(), "an event").await.1,
        event
    );
    assert_eq!(
        within(DEADLINE, client.next_event(), "an event").await.1,
        event
    );

    // Then both are told to reconnect elsewhere.
    for mut closing in [client, late] {
        assert_eq!(closing.expect_close().await.code(), 1001);
    }
    gateway.wait().await;
}

/// Many clients of a draining gateway are each told to reconnect elsewhere, and the gateway then
/// stops. How the closes are spread over the first half of the drain timeout is the drain
/// schedule's behaviour, tested with paused time next to it (`gateway/src/shutdown_tests.rs`):
/// here only what happens is checked, not how fast.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_client_of_a_draining_gateway_is_told_to_reconnect_then_it_stops() {
    const CLIENTS: usize = 40;
    let gateway = start_gateway(&["--drain-timeout", "2s"]).await;
    let mut clients = Vec::new();
    for i in 0..CLIENTS {
        let mut client = gateway
            .connect(&dispatcher(&format!("d-{i}"), &["west"]))
            .await;
        client.join_dispatch("1", "west").await;
        clients.push(client);
    }
    gateway.shutdown();
    let closes = clients.into_iter().map(|mut client| async move {
        let closed = client.expect_close().await;
        (closed.code(), closed.close_record().clone())
    });
    let closed = futures_util::future::join_all(closes).await;
    let told_to_reconnect = serde_json::json!({
        "type": 7,
        "error": "server is shutting down; reconnect",
        "allowReconnect": true
    });
    for (i, (code, record)) in closed.iter().enumerate() {
        assert_eq!(*code, 1001, "client {i}");
        assert_eq!(*record, told_to_reconnect, "client {i}");
    }
    gateway.wait().await;
}
