//! The Origin check on the WebSocket upgrade, which stops cross-site WebSocket hijacking.

use e2e::{GatewayBuilder, StatusCode, TestGateway, WsClient, dispatcher};

async fn browser_only_gateway() -> TestGateway {
    GatewayBuilder::new()
        .without_missing_origin()
        .args(&["--cors-origins", "http://app.example"])
        .start()
        .await
}

fn url(gateway: &TestGateway) -> String {
    gateway.hub_url(&gateway.token(&dispatcher("dispatcher-1", &["west"])))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upgrade_from_a_foreign_origin_is_refused_with_403() {
    let gateway = browser_only_gateway().await;
    let refusal = WsClient::try_connect_from(&url(&gateway), "http://evil.example")
        .await
        .expect_err("a foreign origin is refused");
    refusal.assert_is(StatusCode::FORBIDDEN, "origin not allowed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upgrade_from_the_allowed_origin_is_accepted() {
    let gateway = browser_only_gateway().await;
    let mut client = WsClient::try_connect_from(&url(&gateway), "http://app.example")
        .await
        .expect("the allowed origin upgrades with 101");
    client.handshake().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upgrade_without_an_origin_is_refused_unless_missing_origins_are_allowed() {
    let gateway = browser_only_gateway().await;
    let refusal = WsClient::try_connect(url(&gateway))
        .await
        .expect_err("no Origin is refused");
    refusal.assert_is(StatusCode::FORBIDDEN, "origin not allowed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn origin_is_checked_before_the_token() {
    let gateway = browser_only_gateway().await;
    let refusal =
        WsClient::try_connect_from(&gateway.hub_url_without_token(), "http://evil.example")
            .await
            .expect_err("a foreign origin is refused");
    refusal.assert_is(StatusCode::FORBIDDEN, "origin not allowed");
}
