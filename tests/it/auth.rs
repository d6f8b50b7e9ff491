//! Authentication at the WebSocket upgrade: user tokens with a pinned algorithm, issuer and
//! audience, and negotiate's connection tokens.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use e2e::{
    GatewayBuilder, Refusal, StatusCode, TEST_SECRET, TestGateway, WsClient, dispatcher, fixture,
    sign, start_gateway, unix_now,
};
use jsonwebtoken::{Algorithm, EncodingKey};

/// Tries to upgrade with `token` and expects a refusal.
async fn refused(gateway: &TestGateway, token: &str) -> Refusal {
    match WsClient::try_connect(gateway.hub_url(token)).await {
        Ok(_) => panic!("the upgrade with token {token} was accepted"),
        Err(refusal) => refusal,
    }
}

/// Upgrades with `token` and completes the handshake.
async fn accepted(gateway: &TestGateway, token: &str) {
    let mut client = WsClient::connect(&gateway.hub_url(token)).await;
    client.handshake().await;
}

fn assert_unauthorized(refusal: &Refusal, reason: &str) {
    assert_eq!(refusal.status, StatusCode::UNAUTHORIZED, "{refusal:?}");
    assert_eq!(refusal.body, format!("unauthorized: {reason}"));
}

fn key_file(name: &str) -> String {
    fixture(name)
        .to_str()
        .expect("the fixture path is UTF-8")
        .to_owned()
}

fn read_fixture(name: &str) -> Vec<u8> {
    std::fs::read(fixture(name)).unwrap_or_else(|e| panic!("reading fixture {name}: {e}"))
}

async fn asymmetric_gateway(algorithm: &str, public_key: &str) -> TestGateway {
    GatewayBuilder::new()
        .without_hs256_secret()
        .args(&[
            "--jwt-algorithm",
            algorithm,
            "--jwt-public-key-file",
            &key_file(public_key),
        ])
        .start()
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upgrade_without_a_token_is_refused_with_401() {
    let gateway = start_gateway(&[]).await;
    let refusal = WsClient::try_connect(gateway.hub_url_without_token())
        .await
        .expect_err("an upgrade without a token is refused");
    assert_unauthorized(&refusal, "no token");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_in_the_authorization_header_is_accepted() {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let gateway = start_gateway(&[]).await;
    let token = gateway.token(&dispatcher("dispatcher-1", &["west"]));
    let mut request = gateway
        .hub_url_without_token()
        .into_client_request()
        .expect("a valid URL");
    request.headers_mut().insert(
        "authorization",
        format!("Bearer {token}").parse().expect("a header value"),
    );
    let mut client = WsClient::try_connect(request)
        .await
        .expect("a Bearer token is accepted");
    client.handshake().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_token_is_refused_with_401() {
    let gateway = start_gateway(&[]).await;
    let mut claims = dispatcher("dispatcher-1", &["west"]);
    // Well beyond the verifier's clock-skew leeway.
    claims.exp = unix_now() - 600;
    let refusal = refused(&gateway, &gateway.token(&claims)).await;
    assert_unauthorized(&refusal, "token expired");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_not_valid_yet_is_refused_with_401_and_one_whose_nbf_has_passed_is_accepted() {
    let gateway = start_gateway(&[]).await;
    let with_nbf = |nbf: u64| {
        let mut claims = serde_json::to_value(dispatcher("dispatcher-1", &["west"])).unwrap();
        claims["nbf"] = nbf.into();
        jsonwebtoken::encode(
            &jsonwebtoken::Header::new(Algorithm::HS256),
            &claims,
            &EncodingKey::from_secret(TEST_SECRET.as_bytes()),
        )
        .unwrap()
    };
    // Well beyond the verifier's clock-skew leeway.
    let refusal = refused(&gateway, &with_nbf(unix_now() + 600)).await;
    assert_unauthorized(&refusal, "token not valid yet");
    accepted(&gateway, &with_nbf(unix_now() - 60)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_signed_with_another_secret_is_refused_with_401() {
    let gateway = start_gateway(&[]).await;
    let token = sign(
        Algorithm::HS256,
        &EncodingKey::from_secret(b"another-secret-of-at-least-32-bytes!!"),
        &dispatcher("dispatcher-1", &["west"]),
    );
    assert_unauthorized(&refused(&gateway, &token).await, "bad token signature");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_signed_with_hs512_and_the_same_secret_is_refused_because_the_algorithm_is_pinned() {
    let gateway = start_gateway(&[]).await;
    let token = sign(
        Algorithm::HS512,
        &EncodingKey::from_secret(TEST_SECRET.as_bytes()),
        &dispatcher("dispatcher-1", &["west"]),
    );
    assert_unauthorized(
        &refused(&gateway, &token).await,
        "token signed with an algorithm other than the configured one",
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unsigned_token_with_alg_none_is_refused_with_401() {
    let gateway = start_gateway(&[]).await;
    let header = URL_SAFE_NO_PAD.encode(br#"{"alg":"none","typ":"JWT"}"#);
    let claims = serde_json::to_vec(&dispatcher("dispatcher-1", &["west"])).expect("claims");
    let token = format!("{header}.{}.", URL_SAFE_NO_PAD.encode(claims));
    assert_unauthorized(&refused(&gateway, &token).await, "malformed token");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_that_is_not_a_jwt_is_refused_as_malformed() {
    let gateway = start_gateway(&[]).await;
    assert_unauthorized(&refused(&gateway, "not-a-jwt").await, "malformed token");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_with_an_unknown_role_is_refused_with_401() {
    let gateway = start_gateway(&[]).await;
    let mut claims = dispatcher("dispatcher-1", &["west"]);
    claims.role = "admin".to_owned();
    assert_unauthorized(
        &refused(&gateway, &gateway.token(&claims)).await,
        "token claims invalid: role must be dispatcher or contractor",
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rs256_gateway_accepts_rs256_tokens() {
    let gateway = asymmetric_gateway("RS256", "rs256-test-public.pem").await;
    let key = EncodingKey::from_rsa_pem(&read_fixture("rs256-test-private.pem"))
        .expect("the RSA test key parses");
    let token = sign(
        Algorithm::RS256,
        &key,
        &dispatcher("dispatcher-1", &["west"]),
    );
    accepted(&gateway, &token).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rs256_gateway_refuses_hs256_token_signed_with_its_public_key() {
    let gateway = asymmetric_gateway("RS256", "rs256-test-public.pem").await;
    let token = sign(
        Algorithm::HS256,
        &EncodingKey::from_secret(&read_fixture("rs256-test-public.pem")),
        &dispatcher("dispatcher-1", &["west"]),
    );
    assert_unauthorized(
        &refused(&gateway, &token).await,
        "token signed with an algorithm other than the configured one",
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn es256_gateway_accepts_es256_tokens() {
    let gateway = asymmetric_gateway("ES256", "es256-test-public.pem").await;
    let key = EncodingKey::from_ec_pem(&read_fixture("es256-test-private.pem"))
        .expect("the EC test key parses");
    let token = sign(
        Algorithm::ES256,
        &key,
        &dispatcher("dispatcher-1", &["west"]),
    );
    accepted(&gateway, &token).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn es256_gateway_refuses_hs256_token_signed_with_its_public_key() {
    let gateway = asymmetric_gateway("ES256", "es256-test-public.pem").await;
    let token = sign(
        Algorithm::HS256,
        &EncodingKey::from_secret(&read_fixture("es256-test-public.pem")),
        &dispatcher("dispatcher-1", &["west"]),
    );
    assert_unauthorized(
        &refused(&gateway, &token).await,
        "token signed with an algorithm other than the configured one",
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn es256_gateway_refuses_rs256_tokens() {
    let gateway = asymmetric_gateway("ES256", "es256-test-public.pem").await;
    let key = EncodingKey::from_rsa_pem(&read_fixture("rs256-test-private.pem"))
        .expect("the RSA test key parses");
    let token = sign(
        Algorithm::RS256,
        &key,
        &dispatcher("dispatcher-1", &["west"]),
    );
    assert_unauthorized(
        &refused(&gateway, &token).await,
        "token signed with an algorithm other than the configured one",
    );
}

const ISSUER: &str = "https://login.example";
const AUDIENCE: &str = "smartscheduler-gateway";

async fn issuer_audience_gateway() -> TestGateway {
    start_gateway(&["--jwt-issuer", ISSUER, "--jwt-audience", AUDIENCE]).await
}

fn claims_from(iss: Option<&str>, aud: Option<&str>) -> gateway::auth::dev::TokenClaims {
    let mut claims = dispatcher("dispatcher-1", &["west"]);
    claims.iss = iss.map(str::to_owned);
    claims.aud = aud.map(str::to_owned);
    claims
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_with_the_configured_issuer_and_audience_is_accepted() {
    let gateway = issuer_audience_gateway().await;
    let token = gateway.token(&claims_from(Some(ISSUER), Some(AUDIENCE)));
    accepted(&gateway, &token).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_from_another_issuer_is_refused_with_401() {
    let gateway = issuer_audience_gateway().await;
    let token = gateway.token(&claims_from(Some("https://evil.example"), Some(AUDIENCE)));
    assert_unauthorized(
        &refused(&gateway, &token).await,
        "token issuer not accepted",
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_for_another_audience_is_refused_with_401() {
    let gateway = issuer_audience_gateway().await;
    let token = gateway.token(&claims_from(Some(ISSUER), Some("another-service")));
    assert_unauthorized(
        &refused(&gateway, &token).await,
        "token audience not accepted",
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_without_issuer_or_audience_is_refused_when_they_are_configured() {
    let gateway = issuer_audience_gateway().await;
    let refusal = refused(&gateway, &gateway.token(&claims_from(None, Some(AUDIENCE)))).await;
    assert_unauthorized(&refusal, "token claims invalid: missing claim `iss`");
    let refusal = refused(&gateway, &gateway.token(&claims_from(Some(ISSUER), None))).await;
    assert_unauthorized(&refusal, "token claims invalid: missing claim `aud`");
}

/// Negotiates with `token` and returns the connection token.
async fn connection_token(gateway: &TestGateway, token: &str) -> String {
    let (status, body) = gateway.negotiate(token).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let body: serde_json::Value = serde_json::from_str(&body).expect("negotiate answers JSON");
    assert_eq!(body["negotiateVersion"], 1);
    assert_eq!(
        body["availableTransports"],
        serde_json::json!([{"transport": "WebSockets", "transferFormats": ["Text"]}])
    );
    let id = body["connectionId"].as_str().expect("a connectionId");
    let connection_token = body["connectionToken"]
        .as_str()
        .expect("a connectionToken")
        .to_owned();
    assert_ne!(id, connection_token, "the id is public, the token is not");
    connection_token
}

fn hub_url_with_id(gateway: &TestGateway, id: &str, token: &str) -> String {
    format!(
        "ws://{}/hub/v1?id={id}&access_token={token}",
        gateway.public_addr()
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn negotiate_without_a_token_is_refused_with_401() {
    let gateway = start_gateway(&[]).await;
    let (status, body) = gateway.negotiate("").await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
    assert_eq!(body, "unauthorized: no token");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_token_from_negotiate_opens_the_connection() {
    let gateway = start_gateway(&[]).await;
    let token = gateway.token(&dispatcher("dispatcher-1", &["west"]));
    let id = connection_token(&gateway, &token).await;
    let mut client = WsClient::connect(&hub_url_with_id(&gateway, &id, &token)).await;
    client.handshake().await;
    client.join_dispatch("1", "west").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tampered_connection_token_is_refused_with_404() {
    let gateway = start_gateway(&[]).await;
    let token = gateway.token(&dispatcher("dispatcher-1", &["west"]));
    let id = connection_token(&gateway, &token).await;
    let mut tampered = id.into_bytes();
    let last = tampered.len() - 2;
    tampered[last] = if tampered[last] == b'A' { b'B' } else { b'A' };
    let tampered = String::from_utf8(tampered).expect("still ASCII");
    let refusal = WsClient::try_connect(hub_url_with_id(&gateway, &tampered, &token))
        .await
        .expect_err("a tampered connection token is refused");
    assert_eq!(refusal.status, StatusCode::NOT_FOUND, "{refusal:?}");
    assert_eq!(
        refusal.body,
        "No Connection with that ID: unknown connection token"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_token_presented_with_another_users_token_is_refused_with_404() {
    let gateway = start_gateway(&[]).await;
    let alice = gateway.token(&dispatcher("alice", &["west"]));
    let mallory = gateway.token(&dispatcher("mallory", &["west"]));
    let id = connection_token(&gateway, &alice).await;
    let refusal = WsClient::try_connect(hub_url_with_id(&gateway, &id, &mallory))
        .await
        .expect_err("another user's connection token is refused");
    assert_eq!(refusal.status, StatusCode::NOT_FOUND, "{refusal:?}");
    assert_eq!(
        refusal.body,
        "No Connection with that ID: unknown connection token"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_is_closed_with_reconnect_allowed_when_its_token_expires_and_the_token_is_then_refused()
 {
    let gateway = start_gateway(&["--jwt-leeway", "0s"]).await;
    let mut claims = dispatcher("dispatcher-1", &["west"]);
    claims.exp = unix_now() + 3;
    let token = gateway.token(&claims);
    let mut client = WsClient::connect(&gateway.hub_url(&token)).await;
    client.handshake().await;
    let closed = client.expect_close().await;
    assert_eq!(
        *closed.close_record(),
        serde_json::json!({
            "type": 7,
            "error": "access token expired; reconnect with a fresh one",
            "allowReconnect": true
        })
    );
    assert_eq!(closed.code(), 1000);
    // The client's reconnect with the same token is refused rather than let in again.
    assert_unauthorized(&refused(&gateway, &token).await, "token expired");
}
