//! Admission limits and HTTP timeouts, seen from a client: past each limit the upgrade (or the
//! publish) gets the documented status, `Retry-After` and a body naming the limit, the refusal
//! is counted in `gateway_limit_exceeded_total`, and once the connections holding the slots
//! close, new ones are accepted again. Also: a half-sent request head is closed after
//! `--header-read-timeout`, and connections past `--max-pending-requests` are closed at once.

use std::time::Duration;

use e2e::{
    DEADLINE, StatusCode, TEST_KEY, TestGateway, WsClient, dispatcher, recommendation_ready,
    start_gateway, within,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;

/// An upgrade refused by a limit, as a plain HTTP client sees it.
#[derive(Debug)]
struct Refused {
    status: StatusCode,
    retry_after: Option<String>,
    body: String,
}

/// Sends a WebSocket upgrade for `user` (with `forwarded_for` as `X-Forwarded-For`) over plain
/// HTTP, expecting a refusal.
async fn refused_upgrade(
    gateway: &TestGateway,
    user: &str,
    forwarded_for: Option<&str>,
) -> Refused {
    let token = gateway.token(&dispatcher(user, &["west"]));
    let mut request = reqwest::Client::new()
        .get(format!(
            "http://{}/hub/v1?access_token={token}",
            gateway.public_addr()
        ))
        .header("connection", "Upgrade")
        .header("upgrade", "websocket")
        .header("sec-websocket-version", "13")
        .header("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ==");
    if let Some(forwarded_for) = forwarded_for {
        request = request.header("x-forwarded-for", forwarded_for);
    }
    let response = within(DEADLINE, request.send(), "the refused upgrade")
        .await
        .expect("an HTTP answer");
    assert_ne!(
        response.status(),
        StatusCode::SWITCHING_PROTOCOLS,
        "the upgrade for {user} was accepted"
    );
    Refused {
        status: response.status(),
        retry_after: response
            .headers()
            .get("retry-after")
            .map(|v| v.to_str().expect("Retry-After is ASCII").to_owned()),
        body: response.text().await.expect("the refusal's body"),
    }
}

/// Opens a WebSocket for `user`, optionally with `X-Forwarded-For`, without the handshake.
async fn upgrade(
    gateway: &TestGateway,
    user: &str,
    forwarded_for: Option<&str>,
) -> Result<WsClient, e2e::Refusal> {
    let token = gateway.token(&dispatcher(user, &["west"]));
    let mut request = gateway
        .hub_url(&token)
        .into_client_request()
        .expect("a valid hub URL");
    if let Some(forwarded_for) = forwarded_for {
        request.headers_mut().insert(
            "x-forwarded-for",
            HeaderValue::from_str(forwarded_for).expect("a valid X-Forwarded-For"),
        );
    }
    WsClient::try_connect(request).await
}

/// Connects `user` and completes the handshake, failing the test on a refusal.
async fn connected(gateway: &TestGateway, user: &str) -> WsClient {
    let mut client = upgrade(gateway, user, None)
        .await
        .unwrap_or_else(|r| panic!("{user} refused: {r:?}"));
    client.handshake().await;
    client
}

/// Retries the upgrade of `user` until it is accepted: the slots are given back when the
/// server's connection task has ended, a moment after the client closed.
async fn accepted_again(gateway: &TestGateway, user: &str) -> WsClient {
    let retry = async {
        loop {
            if let Ok(mut client) = upgrade(gateway, user, None).await {
                client.handshake().await;
                return client;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    within(DEADLINE, retry, "an upgrade to be accepted again").await
}

fn limit_metric(limit: &str) -> String {
    format!("gateway_limit_exceeded_total{{limit=\"{limit}\"}}")
}

/// The sentence a refusal's body starts with for each limit (its label in metrics).
fn reason_of(limit: &str) -> &'static str {
    match limit {
        "connections" => "too many connections on this server",
        "pending_handshakes" => "too many connections waiting for their handshake",
        "connections_per_user" => "too many connections for this user",
        "connections_per_address" => "too many connections from this address",
        "connect_rate" => "too many new connections from this address",
        other => panic!("no refusal reason known for limit {other}"),
    }
}

/// Checks a refusal: `status`, a `Retry-After`, and the body naming `limit`, exactly.
fn assert_refused(refused: &Refused, status: StatusCode, limit: &str) {
    assert_eq!(refused.status, status, "{refused:?}");
    assert_eq!(
        refused.body,
        format!("{} (limit: {limit})", reason_of(limit)),
        "{refused:?}"
    );
    let retry_after: u64 = refused
        .retry_after
        .as_deref()
        .unwrap_or_else(|| panic!("no Retry-After: {refused:?}"))
        .parse()
        .expect("Retry-After in whole seconds");
    assert!(retry_after >= 1, "{refused:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_past_its_connection_limit_gets_429_until_one_of_its_connections_closes() {
    let gateway = start_gateway(&["--max-connections-per-user", "2"]).await;
    let before = gateway.metric(&limit_metric("connections_per_user")).await;
    let first = connected(&gateway, "alice").await;
    let _second = connected(&gateway, "alice").await;

    let refused = refused_upgrade(&gateway, "alice", None).await;
    assert_refused(
        &refused,
        StatusCode::TOO_MANY_REQUESTS,
        "connections_per_user",
    );
    assert_eq!(
        gateway.metric(&limit_metric("connections_per_user")).await,
        before + 1.0
    );
    let _bob = connected(&gateway, "bob").await; // other users are not affected

    drop(first);
    let _third = accepted_again(&gateway, "alice").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_the_replicas_connection_limit_upgrades_get_503_until_a_connection_closes() {
    let gateway = start_gateway(&["--max-connections", "1"]).await;
    let before = gateway.metric(&limit_metric("connections")).await;
    let first = connected(&gateway, "u-1").await;

    let refused = refused_upgrade(&gateway, "u-2", None).await;
    assert_refused(&refused, StatusCode::SERVICE_UNAVAILABLE, "connections");
    assert_eq!(
        gateway.metric(&limit_metric("connections")).await,
        before + 1.0
    );

    drop(first);
    let _second = accepted_again(&gateway, "u-2").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upgrades_waiting_for_their_handshake_are_capped_and_the_slot_is_freed_by_the_handshake() {
    let gateway = start_gateway(&["--max-pending-handshakes", "1"]).await;
    let before = gateway.metric(&limit_metric("pending_handshakes")).await;
    // Upgraded, but no handshake yet: it holds the only slot.
    let mut silent = upgrade(&gateway, "u-1", None).await.unwrap();

    let refused = refused_upgrade(&gateway, "u-2", None).await;
    assert_refused(
        &refused,
        StatusCode::SERVICE_UNAVAILABLE,
        "pending_handshakes",
    );
    assert_eq!(refused.retry_after.as_deref(), Some("1"));
    assert_eq!(
        gateway.metric(&limit_metric("pending_handshakes")).await,
        before + 1.0
    );

    silent.handshake().await;
    let _second = accepted_again(&gateway, "u-2").await;
    // The first connection still works after its handshake.
    let joined = silent.join_dispatch("1", "west").await;
    assert_eq!(joined["group"], "/dispatch/west", "{joined}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_address_past_its_connect_rate_gets_429_with_the_seconds_to_wait() {
    let gateway = start_gateway(&["--max-connects-per-second-per-address", "2"]).await;
    let before = gateway.metric(&limit_metric("connect_rate")).await;
    let _a = connected(&gateway, "u-1").await;
    let _b = connected(&gateway, "u-2").await;

    let refused = refused_upgrade(&gateway, "u-3", None).await;
    assert_refused(&refused, StatusCode::TOO_MANY_REQUESTS, "connect_rate");
    assert_eq!(refused.retry_after.as_deref(), Some("1"));
    assert_eq!(
        gateway.metric(&limit_metric("connect_rate")).await,
        before + 1.0
    );
    // The bucket refills (at 2 per second); no client is slowed down meanwhile.
    let _c = accepted_again(&gateway, "u-3").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_address_past_its_connection_limit_gets_429_and_an_untrusted_forwarded_for_does_not_help()
 {
    let gateway = start_gateway(&["--max-connections-per-address", "1"]).await;
    let before = gateway
        .metric(&limit_metric("connections_per_address"))
        .await;
    let first = connected(&gateway, "u-1").await;

    // Loopback is not a trusted proxy: the header is ignored.
    let refused = refused_upgrade(&gateway, "u-2", Some("198.51.100.7")).await;
    assert_refused(
        &refused,
        StatusCode::TOO_MANY_REQUESTS,
        "connections_per_address",
    );
    assert_eq!(
        gateway
            .metric(&limit_metric("connections_per_address"))
            .await,
        before + 1.0
    );

    drop(first);
    let _second = accepted_again(&gateway, "u-2").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn behind_a_trusted_proxy_the_forwarded_client_address_is_what_is_counted() {
    let gateway = start_gateway(&[
        "--max-connections-per-address",
        "1",
        "--trusted-proxies",
        "127.0.0.0/8",
    ])
    .await;
    let mut first = upgrade(&gateway, "u-1", Some("198.51.100.1"))
        .await
        .unwrap();
    first.handshake().await;
    let mut other = upgrade(&gateway, "u-2", Some("198.51.100.2"))
        .await
        .unwrap();
    other.handshake().await;

    let refused = refused_upgrade(&gateway, "u-3", Some("198.51.100.1")).await;
    assert_refused(
        &refused,
        StatusCode::TOO_MANY_REQUESTS,
        "connections_per_address",
    );
    // A client cannot escape by prepending an address: the proxy's entry is the right-most.
    let refused = refused_upgrade(&gateway, "u-3", Some("203.0.113.9, 198.51.100.1")).await;
    assert_refused(
        &refused,
        StatusCode::TOO_MANY_REQUESTS,
        "connections_per_address",
    );
}

/// Publishes with the service key and returns status, `Retry-After` and the JSON body.
async fn publish(
    gateway: &TestGateway,
    body: &str,
) -> (StatusCode, Option<String>, serde_json::Value) {
    let response = reqwest::Client::new()
        .post(format!("http://{}/api/v1/events", gateway.public_addr()))
        .bearer_auth(TEST_KEY)
        .header("content-type", "application/json")
        .body(body.to_owned())
        .send();
    let response = within(DEADLINE, response, "the publish")
        .await
        .expect("an HTTP answer to the publish");
    let status = response.status();
    let retry_after = response
        .headers()
        .get("retry-after")
        .map(|v| v.to_str().expect("Retry-After is ASCII").to_owned());
    (
        status,
        retry_after,
        response.json().await.expect("the publish answers JSON"),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publishes_past_the_service_keys_rate_get_429_with_retry_after() {
    let gateway = start_gateway(&["--max-publishes-per-second", "1"]).await;
    let before = gateway.metric(&limit_metric("publish_rate")).await;
    let event = recommendation_ready("west", &[]);
    let (status, _, body) = publish(&gateway, &event).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");

    let (status, retry_after, body) = publish(&gateway, &event).await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS, "{body}");
    assert_eq!(retry_after.as_deref(), Some("1"));
    assert_eq!(body["limit"], "publish_rate");
    assert_eq!(body["error"], "too many publishes for this service key");
    assert_eq!(
        gateway.metric(&limit_metric("publish_rate")).await,
        before + 1.0
    );
    // A wrong key is refused for the key, and spends nothing.
    let (status, _) = gateway.publish_with_key("wrong-key", &event).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
}

/// Reads from `stream` until the gateway closes it (EOF or reset); returns what it sent.
async fn until_closed(stream: &mut TcpStream, what: &str) -> Vec<u8> {
    let mut received = Vec::new();
    let read = async {
        let mut chunk = [0u8; 1024];
        loop {
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => received.extend_from_slice(&chunk[..n]),
            }
        }
    };
    within(DEADLINE, read, what).await;
    received
}

/// Checks `answer` is the 400 the hub gives a plain GET: not an upgrade, and why.
fn assert_not_an_upgrade(answer: &[u8]) {
    let answer = String::from_utf8_lossy(answer);
    assert!(answer.starts_with("HTTP/1.1 400 "), "{answer}");
    assert!(
        answer.ends_with(
            "\r\n\r\n/hub/v1: only WebSocket upgrades are served here \
             (not a WebSocket upgrade request)"
        ),
        "{answer}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_sends_half_a_request_head_is_closed_after_the_header_read_timeout() {
    let gateway = start_gateway(&["--header-read-timeout", "1s"]).await;
    let mut half = TcpStream::connect(gateway.public_addr()).await.unwrap();
    half.write_all(b"GET /hub/v1 HTTP/1.1\r\nHost: gateway\r\n")
        .await
        .unwrap();
    let received = until_closed(&mut half, "the half-sent request to be closed").await;
    assert!(
        received.is_empty() || received.starts_with(b"HTTP/1.1 408"),
        "{}",
        String::from_utf8_lossy(&received)
    );

    // A client that sends nothing at all (not even enough to tell HTTP/1 from HTTP/2).
    let mut silent = TcpStream::connect(gateway.public_addr()).await.unwrap();
    until_closed(&mut silent, "the silent connection to be closed").await;

    // A kept-alive connection is answered, then closed when no next request head follows.
    let mut idle = TcpStream::connect(gateway.public_addr()).await.unwrap();
    idle.write_all(b"GET /hub/v1 HTTP/1.1\r\nHost: gateway\r\n\r\n")
        .await
        .unwrap();
    let answered = until_closed(&mut idle, "the idle kept-alive connection to be closed").await;
    assert_not_an_upgrade(&answered);

    // A complete request is still answered.
    let (status, _) = gateway.publish(&recommendation_ready("west", &[])).await;
    assert_eq!(status, StatusCode::ACCEPTED);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_past_the_unfinished_request_cap_are_closed_at_once() {
    let gateway = start_gateway(&["--max-pending-requests", "1"]).await;
    let before = gateway.metric(&limit_metric("pending_requests")).await;
    let mut holding = TcpStream::connect(gateway.public_addr()).await.unwrap();

    let mut refused = TcpStream::connect(gateway.public_addr()).await.unwrap();
    let received = until_closed(&mut refused, "the connection past the cap to be closed").await;
    assert!(
        received.is_empty(),
        "{}",
        String::from_utf8_lossy(&received)
    );
    assert_eq!(
        gateway.metric(&limit_metric("pending_requests")).await,
        before + 1.0
    );

    // Once the first connection sends its request head, its slot is free again.
    holding
        .write_all(b"GET /hub/v1 HTTP/1.1\r\nHost: gateway\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let answer = until_closed(&mut holding, "the answer to the held connection").await;
    assert_not_an_upgrade(&answer);
    let publish = async {
        loop {
            if let Ok(response) = reqwest::Client::new()
                .post(format!("http://{}/api/v1/events", gateway.public_addr()))
                .bearer_auth(TEST_KEY)
                .body(recommendation_ready("west", &[]))
                .send()
                .await
            {
                return response.status();
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    assert_eq!(
        within(DEADLINE, publish, "a request after the slot is freed").await,
        StatusCode::ACCEPTED
    );
}
