//! Authentication at the WebSocket upgrade: user tokens with a pinned algorithm, issuer and
//! audience, and negotiate's connection tokens.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use e2e::{
    GatewayBuilder, StatusCode, TEST_SECRET, TestGateway, WsClient, dispatcher, fixture, sign,
    start_gateway, unix_now,
};
use gateway::auth::dev::TokenClaims;
use jsonwebtoken::{Algorithm, EncodingKey};

/// Upgrades with `token` and completes the handshake.
async fn accepted(gateway: &TestGateway, token: &str) {
    let mut client = WsClient::connect(&gateway.hub_url(token)).await;
    client.handshake().await;
}

/// What a gateway pinned to one algorithm says to a token signed with another.
const WRONG_ALGORITHM: &str = "token signed with an algorithm other than the configured one";

/// The claims most tests present: a dispatcher of `west`.
fn west_dispatcher() -> TokenClaims {
    dispatcher("dispatcher-1", &["west"])
}

/// Checks that `gateway` refuses `west_dispatcher()` signed with `algorithm` and `key` as a
/// token of the wrong algorithm.
async fn assert_wrong_algorithm(gateway: &TestGateway, algorithm: Algorithm, key: &EncodingKey) {
    let token = sign(algorithm, key, &west_dispatcher());
    gateway
        .upgrade_refused(&token)
        .await
        .assert_unauthorized(WRONG_ALGORITHM);
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
    refusal.assert_unauthorized("no token");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_in_the_authorization_header_is_accepted() {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let gateway = start_gateway(&[]).await;
    let token = gateway.token(&west_dispatcher());
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
    let mut claims = west_dispatcher();
    // Well beyond the verifier's clock-skew leeway.
    claims.exp = unix_now() - 600;
    let refusal = gateway.upgrade_refused(&gateway.token(&claims)).await;
    refusal.assert_unauthorized("token expired");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_not_valid_yet_is_refused_with_401_and_one_whose_nbf_has_passed_is_accepted() {
    let gateway = start_gateway(&[]).await;
    let with_nbf = |nbf: u64| {
        let mut claims = serde_json::to_value(west_dispatcher()).unwrap();
        claims["nbf"] = nbf.into();
        jsonwebtoken::encode(
            &jsonwebtoken::Header::new(Algorithm::HS256),
            &claims,
            &EncodingKey::from_secret(TEST_SECRET.as_bytes()),
        )
        .unwrap()
    };
    // Well beyond the verifier's clock-skew leeway.
    let refusal = gateway.upgrade_refused(&with_nbf(unix_now() + 600)).await;
    refusal.assert_unauthorized("token not valid yet");
    accepted(&gateway, &with_nbf(unix_now() - 60)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_signed_with_another_secret_is_refused_with_401() {
    let gateway = start_gateway(&[]).await;
    let token = sign(
        Algorithm::HS256,
        &EncodingKey::from_secret(b"another-secret-of-at-least-32-bytes!!"),
        &west_dispatcher(),
    );
    gateway
        .upgrade_refused(&token)
        .await
        .assert_unauthorized("bad token signature");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_signed_with_hs512_and_the_same_secret_is_refused_because_the_algorithm_is_pinned() {
    let gateway = start_gateway(&[]).await;
    let key = EncodingKey::from_secret(TEST_SECRET.as_bytes());
    assert_wrong_algorithm(&gateway, Algorithm::HS512, &key).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unsigned_token_with_alg_none_is_refused_with_401() {
    let gateway = start_gateway(&[]).await;
    let header = URL_SAFE_NO_PAD.encode(br#"{"alg":"none","typ":"JWT"}"#);
    let claims = serde_json::to_vec(&west_dispatcher()).expect("claims");
    let token = format!("{header}.{}.", URL_SAFE_NO_PAD.encode(claims));
    gateway
        .upgrade_refused(&token)
        .await
        .assert_unauthorized("malformed token");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_that_is_not_a_jwt_is_refused_as_malformed() {
    let gateway = start_gateway(&[]).await;
    gateway
        .upgrade_refused("not-a-jwt")
        .await
        .assert_unauthorized("malformed token");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_with_an_unknown_role_is_refused_with_401() {
    let gateway = start_gateway(&[]).await;
    let mut claims = west_dispatcher();
    claims.role = "admin".to_owned();
    gateway
        .upgrade_refused(&gateway.token(&claims))
        .await
        .assert_unauthorized("token claims invalid: role must be dispatcher or contractor");
}

fn rsa_private_key() -> EncodingKey {
    EncodingKey::from_rsa_pem(&read_fixture("rs256-test-private.pem"))
        .expect("the RSA test key parses")
}

fn ec_private_key() -> EncodingKey {
    EncodingKey::from_ec_pem(&read_fixture("es256-test-private.pem"))
        .expect("the EC test key parses")
}

/// An HS256 key made of a public key file's bytes: the classic algorithm-confusion attack.
fn hmac_key_from(public_key: &str) -> EncodingKey {
    EncodingKey::from_secret(&read_fixture(public_key))
}

/// A gateway pinned to an asymmetric algorithm, and the key pair it is tested with.
struct Asymmetric {
    algorithm: Algorithm,
    flag: &'static str,
    public_key: &'static str,
    private_key: fn() -> EncodingKey,
}

const RS256: Asymmetric = Asymmetric {
    algorithm: Algorithm::RS256,
    flag: "RS256",
    public_key: "rs256-test-public.pem",
    private_key: rsa_private_key,
};

const ES256: Asymmetric = Asymmetric {
    algorithm: Algorithm::ES256,
    flag: "ES256",
    public_key: "es256-test-public.pem",
    private_key: ec_private_key,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rs256_and_es256_gateways_accept_tokens_signed_with_their_private_key() {
    for pinned in [&RS256, &ES256] {
        let gateway = asymmetric_gateway(pinned.flag, pinned.public_key).await;
        let token = sign(
            pinned.algorithm,
            &(pinned.private_key)(),
            &west_dispatcher(),
        );
        accepted(&gateway, &token).await;
    }
}

/// The classic algorithm-confusion attack: an HS256 token whose secret is the public key file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rs256_and_es256_gateways_refuse_hs256_tokens_signed_with_their_public_key() {
    for pinned in [&RS256, &ES256] {
        let gateway = asymmetric_gateway(pinned.flag, pinned.public_key).await;
        let key = hmac_key_from(pinned.public_key);
        assert_wrong_algorithm(&gateway, Algorithm::HS256, &key).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn es256_gateway_refuses_rs256_tokens() {
    let gateway = asymmetric_gateway(ES256.flag, ES256.public_key).await;
    assert_wrong_algorithm(&gateway, RS256.algorithm, &(RS256.private_key)()).await;
}

const ISSUER: &str = "https://login.example";
const AUDIENCE: &str = "smartscheduler-gateway";

async fn issuer_audience_gateway() -> TestGateway {
    start_gateway(&["--jwt-issuer", ISSUER, "--jwt-audience", AUDIENCE]).await
}

fn claims_from(iss: Option<&str>, aud: Option<&str>) -> TokenClaims {
    let mut claims = west_dispatcher();
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
    gateway
        .upgrade_refused(&token)
        .await
        .assert_unauthorized("token issuer not accepted");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_for_another_audience_is_refused_with_401() {
    let gateway = issuer_audience_gateway().await;
    let token = gateway.token(&claims_from(Some(ISSUER), Some("another-service")));
    gateway
        .upgrade_refused(&token)
        .await
        .assert_unauthorized("token audience not accepted");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_without_issuer_or_audience_is_refused_when_they_are_configured() {
    let gateway = issuer_audience_gateway().await;
    let refusal = gateway
        .upgrade_refused(&gateway.token(&claims_from(None, Some(AUDIENCE))))
        .await;
    refusal.assert_unauthorized("token claims invalid: missing claim `iss`");
    let refusal = gateway
        .upgrade_refused(&gateway.token(&claims_from(Some(ISSUER), None)))
        .await;
    refusal.assert_unauthorized("token claims invalid: missing claim `aud`");
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

/// The 404 body for a connection token the gateway did not issue to this user.
const UNKNOWN_CONNECTION_TOKEN: &str = "No Connection with that ID: unknown connection token";

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
    let token = gateway.token(&west_dispatcher());
    let id = connection_token(&gateway, &token).await;
    let mut client = WsClient::connect(&hub_url_with_id(&gateway, &id, &token)).await;
    client.handshake().await;
    client.join_dispatch("1", "west").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tampered_connection_token_is_refused_with_404() {
    let gateway = start_gateway(&[]).await;
    let token = gateway.token(&west_dispatcher());
    let id = connection_token(&gateway, &token).await;
    let mut tampered = id.into_bytes();
    let last = tampered.len() - 2;
    tampered[last] = if tampered[last] == b'A' { b'B' } else { b'A' };
    let tampered = String::from_utf8(tampered).expect("still ASCII");
    let refusal = WsClient::try_connect(hub_url_with_id(&gateway, &tampered, &token))
        .await
        .expect_err("a tampered connection token is refused");
    refusal.assert_is(StatusCode::NOT_FOUND, UNKNOWN_CONNECTION_TOKEN);
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
    refusal.assert_is(StatusCode::NOT_FOUND, UNKNOWN_CONNECTION_TOKEN);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_is_closed_with_reconnect_allowed_when_its_token_expires_and_the_token_is_then_refused()
 {
    let gateway = start_gateway(&["--jwt-leeway", "0s"]).await;
    let mut claims = west_dispatcher();
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
    gateway
        .upgrade_refused(&token)
        .await
        .assert_unauthorized("token expired");
}
