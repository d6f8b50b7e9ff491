//! In-process gateways on port 0 (`GatewayBuilder`, `TestGateway`) and their HTTP side:
//! publishing, negotiate, `/readyz` and `/metrics`.

use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::Duration;

use gateway::Gateway;
use gateway::auth::dev::TokenClaims;
use gateway::config::Config;
use reqwest::StatusCode;

use crate::client::{Refusal, WsClient};
use crate::events::recommendation_ready;
use crate::tokens::{dispatcher, hs256_token};
use crate::{DEADLINE, TEST_KEY, TEST_SECRET, within};

/// Serialises process-wide metrics installation: `gateway::metrics::install` is idempotent
/// but two first calls racing each other could both try to install a recorder.
static METRICS_INSTALL: Mutex<()> = Mutex::new(());

/// Which base arguments a test gateway gets besides its extras.
#[derive(Debug, Clone)]
pub struct GatewayBuilder {
    hs256_secret: bool,
    allow_missing_origin: bool,
    extra: Vec<String>,
}

impl Default for GatewayBuilder {
    fn default() -> Self {
        Self::new()
    }
}

impl GatewayBuilder {
    /// Loopback listeners on port 0, the HS256 [`TEST_SECRET`], the [`TEST_KEY`] service key,
    /// and clients without an Origin header allowed.
    pub fn new() -> Self {
        Self {
            hs256_secret: true,
            allow_missing_origin: true,
            extra: Vec::new(),
        }
    }

    /// Adds command-line words.
    pub fn args(mut self, args: &[&str]) -> Self {
        self.extra.extend(args.iter().map(|a| (*a).to_owned()));
        self
    }

    /// Leaves out `--jwt-secret` (for RS256 and ES256 gateways).
    pub fn without_hs256_secret(mut self) -> Self {
        self.hs256_secret = false;
        self
    }

    /// Leaves out `--allow-missing-origin`.
    pub fn without_missing_origin(mut self) -> Self {
        self.allow_missing_origin = false;
        self
    }

    /// The full command line.
    pub fn command_line(&self) -> Vec<String> {
        let mut args: Vec<String> = [
            "gateway",
            "--listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
            "--service-key",
            TEST_KEY,
        ]
        .iter()
        .map(|a| (*a).to_owned())
        .collect();
        if self.hs256_secret {
            args.extend(["--jwt-secret".to_owned(), TEST_SECRET.to_owned()]);
        }
        if self.allow_missing_origin {
            args.push("--allow-missing-origin".to_owned());
        }
        args.extend(self.extra.iter().cloned());
        args
    }

    /// Starts the gateway in this process.
    pub async fn start(self) -> TestGateway {
        let args = self.command_line();
        let config = Config::try_from_args(&args)
            .unwrap_or_else(|e| panic!("test gateway arguments {args:?} do not parse: {e}"));
        let metrics = {
            let _installing = METRICS_INSTALL
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            gateway::metrics::install().expect("installing the metrics recorder")
        };
        let gateway = within(
            DEADLINE,
            gateway::start(config, metrics),
            "the gateway to start",
        )
        .await
        .unwrap_or_else(|e| panic!("test gateway with {args:?} did not start: {e:#}"));
        TestGateway {
            public: gateway.public_addr(),
            admin: gateway.admin_addr(),
            gateway: Some(gateway),
            http: reqwest::Client::new(),
        }
    }
}

/// Starts an in-process gateway with the default test arguments plus `extra_args`.
pub async fn start_gateway(extra_args: &[&str]) -> TestGateway {
    GatewayBuilder::new().args(extra_args).start().await
}

/// Starts a gateway with `extra_args` and connects `dispatcher-1` of `regions` to it (handshake
/// done, no group joined): the opening of most single-client tests.
pub async fn gateway_with_dispatcher(
    extra_args: &[&str],
    regions: &[&str],
) -> (TestGateway, WsClient) {
    let gateway = start_gateway(extra_args).await;
    let client = gateway.connect_dispatcher(regions).await;
    (gateway, client)
}

/// A gateway running in the test's process; shut down when dropped.
#[derive(Debug)]
pub struct TestGateway {
    gateway: Option<Gateway>,
    public: SocketAddr,
    admin: SocketAddr,
    http: reqwest::Client,
}

impl TestGateway {
    /// Starts a gateway on the Redis at `redis_url` with `extra_args`, and waits until its
    /// `/readyz` says it is ready: the opening of every test with a real Redis.
    pub async fn start_ready(redis_url: &str, extra_args: &[&str]) -> Self {
        let mut args = vec!["--redis-url", redis_url];
        args.extend_from_slice(extra_args);
        let gateway = start_gateway(&args).await;
        gateway.wait_readyz(StatusCode::OK).await;
        gateway
    }

    /// Where the hub and the publish endpoint listen.
    pub fn public_addr(&self) -> SocketAddr {
        self.public
    }

    /// Where `/healthz`, `/readyz` and `/metrics` listen.
    pub fn admin_addr(&self) -> SocketAddr {
        self.admin
    }

    /// An HS256 token for `claims`, signed with [`TEST_SECRET`].
    pub fn token(&self, claims: &TokenClaims) -> String {
        hs256_token(claims)
    }

    /// The hub URL with a user token in `access_token`, as browsers send it.
    pub fn hub_url(&self, token: &str) -> String {
        format!("ws://{}/hub/v1?access_token={token}", self.public)
    }

    /// Negotiates a stateful connection (`useStatefulReconnect=true`) for `token` and returns
    /// the hub URL its client connects (and resumes) with, on any replica.
    pub async fn negotiate_stateful(&self, token: &str) -> String {
        let (status, body) = self
            .negotiate_with(token, "negotiateVersion=1&useStatefulReconnect=true")
            .await;
        assert_eq!(status, StatusCode::OK, "{body}");
        let body: serde_json::Value = serde_json::from_str(&body).expect("negotiate answers JSON");
        assert_eq!(body["useStatefulReconnect"], true, "{body}");
        let id = body["connectionToken"].as_str().expect("a connectionToken");
        format!("/hub/v1?id={id}&access_token={token}")
    }

    /// The hub URL without any token.
    pub fn hub_url_without_token(&self) -> String {
        format!("ws://{}/hub/v1", self.public)
    }

    /// Connects with a token for `claims` and completes the handshake.
    pub async fn connect(&self, claims: &TokenClaims) -> WsClient {
        let mut client = WsClient::connect(&self.hub_url(&self.token(claims))).await;
        client.handshake().await;
        client
    }

    /// Connects as `dispatcher-1` of `regions` and completes the handshake (joins nothing).
    pub async fn connect_dispatcher(&self, regions: &[&str]) -> WsClient {
        self.connect(&dispatcher("dispatcher-1", regions)).await
    }

    /// Tries to upgrade with `token` and returns the refusal, failing the test if the gateway
    /// accepted it.
    pub async fn upgrade_refused(&self, token: &str) -> Refusal {
        match WsClient::try_connect(self.hub_url(token)).await {
            Ok(_) => panic!("the upgrade with token {token} was accepted"),
            Err(refusal) => refusal,
        }
    }

    /// Publishes a fresh `RecommendationReady` for `region` and checks that `client` receives
    /// exactly it as its next event; returns the event.
    pub async fn publish_and_expect(&self, client: &mut WsClient, region: &str) -> String {
        let event = recommendation_ready(region, &[]);
        self.publish_accepted(&event).await;
        client.expect_event("RecommendationReady", &event).await;
        event
    }

    /// Publishes `body` over HTTP with the service key.
    pub async fn publish(&self, body: &str) -> (StatusCode, String) {
        self.publish_with_key(TEST_KEY, body).await
    }

    /// Publishes `body` over HTTP presenting `key`.
    pub async fn publish_with_key(&self, key: &str, body: &str) -> (StatusCode, String) {
        self.post_event("/api/v1/events", key, None, body).await
    }

    /// Publishes `body` with the service key and an `Idempotency-Key` header.
    pub async fn publish_with_idempotency_key(
        &self,
        idempotency_key: &str,
        body: &str,
    ) -> (StatusCode, String) {
        self.post_event("/api/v1/events", TEST_KEY, Some(idempotency_key), body)
            .await
    }

    /// Publishes `body` (a JSON array of events) to `POST /api/v1/events/batch` with the
    /// service key and, when given, an `Idempotency-Key` header.
    pub async fn publish_batch(
        &self,
        idempotency_key: Option<&str>,
        body: &str,
    ) -> (StatusCode, String) {
        self.post_event("/api/v1/events/batch", TEST_KEY, idempotency_key, body)
            .await
    }

    async fn post_event(
        &self,
        path: &str,
        key: &str,
        idempotency_key: Option<&str>,
        body: &str,
    ) -> (StatusCode, String) {
        let mut request = self
            .http
            .post(format!("http://{}{path}", self.public))
            .bearer_auth(key)
            .header("content-type", "application/json");
        if let Some(idempotency_key) = idempotency_key {
            request = request.header("idempotency-key", idempotency_key);
        }
        let request = request.body(body.to_owned()).send();
        let response = within(DEADLINE, request, "the publish response")
            .await
            .expect("publishing over HTTP");
        let status = response.status();
        let text = within(DEADLINE, response.text(), "the publish response body")
            .await
            .expect("reading the publish response");
        (status, text)
    }

    /// Publishes `body` and fails unless the gateway accepted it.
    pub async fn publish_accepted(&self, body: &str) {
        let (status, text) = self.publish(body).await;
        assert_eq!(status, StatusCode::ACCEPTED, "publish refused: {text}");
    }

    /// `POST /hub/v1/negotiate?negotiateVersion=1` with `token` as Bearer.
    pub async fn negotiate(&self, token: &str) -> (StatusCode, String) {
        self.negotiate_with(token, "negotiateVersion=1").await
    }

    /// `POST /hub/v1/negotiate?<query>` with `token` as Bearer.
    pub async fn negotiate_with(&self, token: &str, query: &str) -> (StatusCode, String) {
        let request = self
            .http
            .post(format!("http://{}/hub/v1/negotiate?{query}", self.public))
            .bearer_auth(token)
            .send();
        let response = within(DEADLINE, request, "the negotiate response")
            .await
            .expect("negotiating");
        let status = response.status();
        let text = within(DEADLINE, response.text(), "the negotiate body")
            .await
            .expect("reading the negotiate response");
        (status, text)
    }

    /// `GET /readyz` on the admin listener: its status and body.
    ///
    /// # Errors
    /// When the admin listener does not answer (it stops at the end of a shutdown).
    pub async fn readyz(&self) -> Result<(StatusCode, String), reqwest::Error> {
        let response = self
            .http
            .get(format!("http://{}/readyz", self.admin))
            .send()
            .await?;
        let status = response.status();
        Ok((status, response.text().await?))
    }

    /// Polls `/readyz` until it answers `status`, failing after a deadline (readiness follows
    /// the broker, so there is no event to await).
    pub async fn wait_readyz(&self, status: StatusCode) {
        within(
            Duration::from_secs(20),
            async {
                loop {
                    if let Ok((got, _)) = self.readyz().await
                        && got == status
                    {
                        return;
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            &format!("/readyz to answer {status}"),
        )
        .await;
    }

    /// The Prometheus text of the admin `/metrics`.
    pub async fn metrics_text(&self) -> String {
        let get = async {
            self.http
                .get(format!("http://{}/metrics", self.admin))
                .send()
                .await?
                .text()
                .await
        };
        within(DEADLINE, get, "/metrics")
            .await
            .expect("reading /metrics")
    }

    /// The value of the sample `name` (with its labels, exactly as rendered, e.g.
    /// `gateway_connections_closed_total{reason="slow_consumer"}`); 0 when absent.
    ///
    /// Metrics are process-wide, shared by every gateway of the test binary: compare before
    /// and after rather than expecting absolute values.
    pub async fn metric(&self, name: &str) -> f64 {
        let text = self.metrics_text().await;
        text.lines()
            .filter(|line| !line.starts_with('#'))
            .find_map(|line| {
                let (sample, value) = line.rsplit_once(' ')?;
                (sample == name).then(|| value.parse::<f64>().ok())?
            })
            .unwrap_or(0.0)
    }

    /// Starts the graceful shutdown without waiting for it.
    pub fn shutdown(&self) {
        if let Some(gateway) = &self.gateway {
            gateway.shutdown();
        }
    }

    /// Waits for a shutdown already started to finish, and checks it ended cleanly.
    pub async fn wait(mut self) {
        let gateway = self.gateway.take().expect("the gateway is still running");
        within(DEADLINE * 2, gateway.wait(), "the gateway to stop")
            .await
            .expect("the gateway stopped with an error");
    }

    /// Shuts down and waits for the gateway to stop.
    pub async fn stop(self) {
        self.shutdown();
        self.wait().await;
    }
}

impl Drop for TestGateway {
    fn drop(&mut self) {
        if let Some(gateway) = self.gateway.take() {
            gateway.shutdown();
        }
    }
}
