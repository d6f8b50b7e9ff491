//! Harness for the system tests: in-process gateways on port 0, a raw SignalR client, tokens,
//! HTTP helpers and [`within`], which turns a hang into a failure that says what was awaited.
//!
//! Everything here panics on failure with a message naming what went wrong: it only ever runs
//! inside tests.

// The harness is its own crate, so clippy's exemption for code in tests does not reach it; a
// failed unwrap here is a failed test, which is what we want.
#![allow(clippy::unwrap_used)]

use std::collections::VecDeque;
use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures_util::{SinkExt, StreamExt};
use gateway::Gateway;
use gateway::auth::dev::{TokenClaims, mint};
use gateway::config::Config;
use serde_json::Value;
use serde_json::value::RawValue;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::{HeaderValue, Request};
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

pub use reqwest::StatusCode;

/// The HS256 secret every test gateway verifies user tokens with (test-only, 32+ bytes).
pub const TEST_SECRET: &str = "e2e-test-jwt-secret-never-use-in-production";
/// The service key test backends publish with (test-only).
pub const TEST_KEY: &str = "e2e-test-service-key-never-use-in-production";
/// How long a test waits for something the gateway should do promptly. Generous: the machine
/// is small and shared with other builds, and a deadline is a failure detector, not a benchmark.
pub const DEADLINE: Duration = Duration::from_secs(10);
/// The record separator that ends every SignalR JSON record.
pub const RS: char = '\u{1e}';
/// The handshake the official JavaScript client sends.
pub const HANDSHAKE: &str = "{\"protocol\":\"json\",\"version\":1}\u{1e}";

/// Awaits `future`, failing the test with `what` if it takes longer than `deadline`.
pub async fn within<T>(deadline: Duration, future: impl Future<Output = T>, what: &str) -> T {
    match tokio::time::timeout(deadline, future).await {
        Ok(value) => value,
        Err(_) => panic!("timed out after {deadline:?} waiting for {what}"),
    }
}

/// The workspace root (the parent of this package's folder).
pub fn workspace_root() -> PathBuf {
    let manifest = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    manifest
        .parent()
        .expect("the e2e package lives one level below the workspace root")
        .to_path_buf()
}

/// A file in `tests/fixtures/`.
pub fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures")
        .join(name)
}

/// Seconds since the Unix epoch.
pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("the clock is after 1970")
        .as_secs()
}

/// Claims of a dispatcher for `regions`, valid for an hour.
pub fn dispatcher(sub: &str, regions: &[&str]) -> TokenClaims {
    TokenClaims {
        sub: sub.to_owned(),
        role: "dispatcher".to_owned(),
        regions: regions.iter().map(|r| (*r).to_owned()).collect(),
        contractor_id: None,
        exp: unix_now() + 3600,
        iss: None,
        aud: None,
    }
}

/// Claims of a contractor whose id is `contractor_id`, valid for an hour.
pub fn contractor(sub: &str, contractor_id: &str) -> TokenClaims {
    TokenClaims {
        sub: sub.to_owned(),
        role: "contractor".to_owned(),
        regions: Vec::new(),
        contractor_id: Some(contractor_id.to_owned()),
        exp: unix_now() + 3600,
        iss: None,
        aud: None,
    }
}

/// An HS256 token signed with [`TEST_SECRET`].
pub fn hs256_token(claims: &TokenClaims) -> String {
    mint(TEST_SECRET.as_bytes(), claims).expect("test claims always encode")
}

/// Signs `claims` with `algorithm` and `key` (any algorithm, for tests of the refusals).
pub fn sign(
    algorithm: jsonwebtoken::Algorithm,
    key: &jsonwebtoken::EncodingKey,
    claims: &TokenClaims,
) -> String {
    jsonwebtoken::encode(&jsonwebtoken::Header::new(algorithm), claims, key)
        .expect("test claims always encode")
}

/// A `RecommendationReady` event for `region` as compact JSON, with `extra` fields appended
/// (fields the contract does not name travel through unchanged).
pub fn recommendation_ready(region: &str, extra: &[(&str, Value)]) -> String {
    let mut event = serde_json::json!({
        "type": "RecommendationReady",
        "jobId": uuid::Uuid::new_v4(),
        "requestId": uuid::Uuid::new_v4(),
        "region": region,
        "configVersion": 3,
        "generatedAt": "2025-11-08T12:34:56Z",
    });
    let object = event.as_object_mut().expect("the event is an object");
    for (name, value) in extra {
        object.insert((*name).to_owned(), value.clone());
    }
    event.to_string()
}

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

/// A gateway running in the test's process; shut down when dropped.
#[derive(Debug)]
pub struct TestGateway {
    gateway: Option<Gateway>,
    public: SocketAddr,
    admin: SocketAddr,
    http: reqwest::Client,
}

impl TestGateway {
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

    /// Publishes `body` over HTTP with the service key.
    pub async fn publish(&self, body: &str) -> (StatusCode, String) {
        self.publish_with_key(TEST_KEY, body).await
    }

    /// Publishes `body` over HTTP presenting `key`.
    pub async fn publish_with_key(&self, key: &str, body: &str) -> (StatusCode, String) {
        self.post_event(key, None, body).await
    }

    /// Publishes `body` with the service key and an `Idempotency-Key` header.
    pub async fn publish_with_idempotency_key(
        &self,
        idempotency_key: &str,
        body: &str,
    ) -> (StatusCode, String) {
        self.post_event(TEST_KEY, Some(idempotency_key), body).await
    }

    async fn post_event(
        &self,
        key: &str,
        idempotency_key: Option<&str>,
        body: &str,
    ) -> (StatusCode, String) {
        let mut request = self
            .http
            .post(format!("http://{}/api/v1/events", self.public))
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
        let request = self
            .http
            .post(format!(
                "http://{}/hub/v1/negotiate?negotiateVersion=1",
                self.public
            ))
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

/// An upgrade the gateway refused: its HTTP status and body.
#[derive(Debug, Clone)]
pub struct Refusal {
    /// The status instead of 101.
    pub status: StatusCode,
    /// The response body.
    pub body: String,
}

/// How a connection ended, as the client saw it.
#[derive(Debug, Clone, Default)]
pub struct Closed {
    /// Every record received before the end, pings left out.
    pub records: Vec<String>,
    /// The SignalR Close record (`type` 7), if one came.
    pub close_record: Option<Value>,
    /// The WebSocket close frame's code, if a close frame came.
    pub code: Option<u16>,
    /// The WebSocket close frame's reason.
    pub reason: Option<String>,
}

impl Closed {
    /// The Close record, failing the test if none came.
    pub fn close_record(&self) -> &Value {
        self.close_record
            .as_ref()
            .unwrap_or_else(|| panic!("no Close record before the end: {self:?}"))
    }

    /// The close frame's code, failing the test if no close frame came.
    pub fn code(&self) -> u16 {
        self.code
            .unwrap_or_else(|| panic!("no WebSocket close frame before the end: {self:?}"))
    }
}

type Socket = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// A raw SignalR JSON client over a WebSocket, for what the official client never sends.
/// Every read is bounded by [`DEADLINE`].
#[derive(Debug)]
pub struct WsClient {
    socket: Socket,
    pending: VecDeque<String>,
}

impl WsClient {
    /// Connects to `url`, failing the test if the upgrade is refused.
    pub async fn connect(url: &str) -> Self {
        match Self::try_connect(url).await {
            Ok(client) => client,
            Err(refusal) => panic!("upgrade refused with {}: {}", refusal.status, refusal.body),
        }
    }

    /// Connects with `request` (a URL or a request with extra headers).
    ///
    /// # Errors
    /// [`Refusal`] when the gateway answers the upgrade with another status than 101.
    pub async fn try_connect(request: impl IntoClientRequest + Unpin) -> Result<Self, Refusal> {
        let connecting = tokio_tungstenite::connect_async(request);
        match within(DEADLINE, connecting, "the WebSocket upgrade").await {
            Ok((socket, _)) => Ok(Self::new(socket)),
            Err(tungstenite::Error::Http(response)) => Err(Refusal {
                status: response.status(),
                body: response
                    .body()
                    .as_deref()
                    .map(|b| String::from_utf8_lossy(b).into_owned())
                    .unwrap_or_default(),
            }),
            Err(e) => panic!("WebSocket upgrade failed: {e}"),
        }
    }

    /// Connects with an `Origin` header.
    ///
    /// # Errors
    /// [`Refusal`] when the upgrade is refused.
    pub async fn try_connect_from(url: &str, origin: &str) -> Result<Self, Refusal> {
        let mut request: Request<()> = url.into_client_request().expect("a valid hub URL");
        request.headers_mut().insert(
            "origin",
            HeaderValue::from_str(origin).expect("a valid origin"),
        );
        Self::try_connect(request).await
    }

    /// Connects through a socket whose kernel receive buffer is `receive_buffer` bytes, so a
    /// client that stops reading pushes back on the gateway quickly.
    pub async fn connect_with_receive_buffer(url: &str, receive_buffer: u32) -> Self {
        let request = url.into_client_request().expect("a valid hub URL");
        let host = request.uri().authority().expect("URL with a host").as_str();
        let addr: SocketAddr = host.parse().expect("hub URL with an IP address");
        let socket = TcpSocket::new_v4().expect("a TCP socket");
        socket
            .set_recv_buffer_size(receive_buffer)
            .expect("setting SO_RCVBUF");
        let stream = within(DEADLINE, socket.connect(addr), "the TCP connection")
            .await
            .expect("connecting to the gateway");
        let upgrade = tokio_tungstenite::client_async(request, MaybeTlsStream::Plain(stream));
        let (socket, _) = within(DEADLINE, upgrade, "the WebSocket upgrade")
            .await
            .expect("upgrading to a WebSocket");
        Self::new(socket)
    }

    fn new(socket: Socket) -> Self {
        Self {
            socket,
            pending: VecDeque::new(),
        }
    }

    /// Sends one text frame exactly as given.
    pub async fn send_text(&mut self, text: &str) {
        within(DEADLINE, self.socket.send(Message::text(text)), "a send")
            .await
            .expect("sending a text frame");
    }

    /// Sends one binary frame.
    pub async fn send_binary(&mut self, bytes: &[u8]) {
        let message = Message::binary(bytes.to_vec());
        within(DEADLINE, self.socket.send(message), "a send")
            .await
            .expect("sending a binary frame");
    }

    /// Sends the JSON version 1 handshake and expects `{}`.
    pub async fn handshake(&mut self) {
        self.send_text(HANDSHAKE).await;
        let reply = self.next_record().await;
        assert_eq!(reply, "{}", "handshake refused");
    }

    /// Reads the next text frame and splits it into records (without their separators).
    /// Fails the test if the connection ends first or a record is unterminated.
    pub async fn next_records(&mut self) -> Vec<String> {
        loop {
            let message = within(DEADLINE, self.socket.next(), "a frame from the gateway").await;
            match message {
                Some(Ok(Message::Text(text))) => return split_records(&text),
                Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => {}
                Some(Ok(Message::Binary(bytes))) => {
                    panic!("unexpected binary frame of {} bytes", bytes.len())
                }
                Some(Ok(Message::Close(frame))) => {
                    panic!("connection closed while a record was expected: {frame:?}")
                }
                Some(Err(e)) => panic!("connection failed while a record was expected: {e}"),
                None => panic!("connection ended while a record was expected"),
            }
        }
    }

    /// The next record, whether or not it came in the same frame as the previous one.
    pub async fn next_record(&mut self) -> String {
        while self.pending.is_empty() {
            let records = self.next_records().await;
            self.pending.extend(records);
        }
        self.pending.pop_front().expect("a pending record")
    }

    /// The next record that is not a Ping, parsed.
    pub async fn next_message(&mut self) -> Value {
        loop {
            let record = self.next_record().await;
            let message: Value = serde_json::from_str(&record)
                .unwrap_or_else(|e| panic!("record `{record}` is not JSON: {e}"));
            if message["type"] != 6 {
                return message;
            }
        }
    }

    /// The next event (Invocation without id), as its target and the raw text of its single
    /// argument, skipping pings; fails on anything else.
    pub async fn next_event(&mut self) -> (String, String) {
        loop {
            let record = self.next_record().await;
            if record == "{\"type\":6}" {
                continue;
            }
            return parse_event(&record);
        }
    }

    /// Sends `{"type":1,"invocationId":id,"target":target,"arguments":arguments}` and returns
    /// the Completion for `id`.
    pub async fn invoke(&mut self, id: &str, target: &str, arguments: Value) -> Value {
        let invocation = serde_json::json!({
            "type": 1, "invocationId": id, "target": target, "arguments": arguments,
        });
        self.send_text(&format!("{invocation}{RS}")).await;
        let completion = self.next_message().await;
        assert_eq!(completion["type"], 3, "expected a Completion: {completion}");
        assert_eq!(
            completion["invocationId"], id,
            "Completion for another call"
        );
        completion
    }

    /// Joins `/dispatch/{region}`, failing the test if the hub refuses; returns the
    /// completion's result (the group's position).
    pub async fn join_dispatch(&mut self, id: &str, region: &str) -> Value {
        let completion = self
            .invoke(id, "JoinDispatchGroup", serde_json::json!([region]))
            .await;
        joined(&completion, &format!("/dispatch/{region}"))
    }

    /// The next event's target, payload and position, skipping pings.
    pub async fn next_positioned_event(&mut self) -> (String, String, Value) {
        loop {
            let record = self.next_record().await;
            if record != "{\"type\":6}" {
                return parse_positioned_event(&record);
            }
        }
    }

    /// Reads until the connection ends and reports how: the records received (pings left
    /// out), the Close record and the WebSocket close frame.
    pub async fn expect_close(&mut self) -> Closed {
        self.expect_close_within(DEADLINE).await
    }

    /// [`WsClient::expect_close`] with another deadline for the whole ending.
    pub async fn expect_close_within(&mut self, deadline: Duration) -> Closed {
        let mut closed = Closed::default();
        let pending: Vec<String> = self.pending.drain(..).collect();
        for record in pending {
            note_record(&mut closed, record);
        }
        let read = async {
            loop {
                match self.socket.next().await {
                    Some(Ok(Message::Text(text))) => {
                        for record in split_records(&text) {
                            note_record(&mut closed, record);
                        }
                    }
                    Some(Ok(Message::Close(frame))) => {
                        if let Some(frame) = frame {
                            closed.code = Some(u16::from(frame.code));
                            closed.reason = Some(frame.reason.to_string());
                        } else {
                            closed.code = Some(1005);
                        }
                        break;
                    }
                    Some(Ok(_)) => {}
                    Some(Err(_)) | None => break,
                }
            }
        };
        within(deadline, read, "the gateway to close the connection").await;
        closed
    }
}

fn note_record(closed: &mut Closed, record: String) {
    if record == "{\"type\":6}" {
        return;
    }
    if let Ok(value) = serde_json::from_str::<Value>(&record)
        && value["type"] == 7
    {
        closed.close_record = Some(value);
    }
    closed.records.push(record);
}

/// Splits the text of one frame into records; every record must end with the separator.
pub fn split_records(text: &str) -> Vec<String> {
    let Some(body) = text.strip_suffix(RS) else {
        panic!("frame does not end with the record separator: {text:?}");
    };
    body.split(RS).map(str::to_owned).collect()
}

/// Parses an event record `{"type":1,"target":…,"arguments":[payload]}` into its target and
/// the raw text of the payload, exactly as it was on the wire.
pub fn parse_event(record: &str) -> (String, String) {
    #[derive(serde::Deserialize)]
    struct Event<'a> {
        #[serde(rename = "type")]
        kind: u8,
        target: String,
        #[serde(rename = "invocationId")]
        invocation_id: Option<String>,
        #[serde(borrow)]
        arguments: Vec<&'a RawValue>,
    }
    let event: Event<'_> = serde_json::from_str(record)
        .unwrap_or_else(|e| panic!("record `{record}` is not an event: {e}"));
    assert_eq!(event.kind, 1, "not an Invocation: {record}");
    assert_eq!(event.invocation_id, None, "events carry no invocationId");
    (event.target, event_payload(&event.arguments, record))
}

/// The first argument of an event, after checking the second (its position) when present.
fn event_payload(arguments: &[&RawValue], record: &str) -> String {
    match arguments {
        [payload] => payload.get().to_owned(),
        [payload, position] => {
            let position: Value = serde_json::from_str(position.get())
                .unwrap_or_else(|e| panic!("position in `{record}` is not JSON: {e}"));
            assert!(
                position["group"].is_string()
                    && position["epoch"].is_string()
                    && position["seq"].is_u64(),
                "the second argument is a position: {record}"
            );
            payload.get().to_owned()
        }
        _ => panic!("an event has its payload and maybe a position: {record}"),
    }
}

/// An event's target, payload and position (`{"group","epoch","seq"}`).
pub fn parse_positioned_event(record: &str) -> (String, String, Value) {
    let (target, payload) = parse_event(record);
    let message: Value = serde_json::from_str(record).expect("an event is JSON");
    (target, payload, message["arguments"][1].clone())
}

/// Checks that `completion` answers a successful join of `group` and returns its result: the
/// group's head position (`{"group","epoch","seq"}`, plus `"recovered"` when one was given).
pub fn joined(completion: &Value, group: &str) -> Value {
    assert!(
        completion.get("error").is_none(),
        "join refused: {completion}"
    );
    let result = &completion["result"];
    assert_eq!(result["group"], group, "{completion}");
    assert!(
        result["epoch"].as_str().is_some_and(|e| e.len() == 32),
        "{completion}"
    );
    assert!(result["seq"].is_u64(), "{completion}");
    result.clone()
}

/// A raw HTTP/1.1 request held open mid-body: the server has started handling it (it answered
/// `100 Continue`) and waits for the rest.
#[derive(Debug)]
pub struct HeldRequest {
    stream: TcpStream,
    rest: Vec<u8>,
}

impl HeldRequest {
    /// Starts `POST {path}` with `body` and the service key, sending the headers with
    /// `Expect: 100-continue` and none of the body; returns once the handler waits for it.
    pub async fn start(addr: SocketAddr, path: &str, body: &str) -> Self {
        let mut stream = within(DEADLINE, TcpStream::connect(addr), "a TCP connection")
            .await
            .expect("connecting to the gateway");
        let head = format!(
            "POST {path} HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {TEST_KEY}\r\n\
             Content-Type: application/json\r\nContent-Length: {}\r\nExpect: 100-continue\r\n\r\n",
            body.len()
        );
        stream
            .write_all(head.as_bytes())
            .await
            .expect("sending the request head");
        let interim = read_head(&mut stream).await;
        assert!(
            interim.starts_with("HTTP/1.1 100"),
            "expected 100 Continue, got {interim:?}"
        );
        Self {
            stream,
            rest: body.as_bytes().to_vec(),
        }
    }

    /// Sends the body and returns the response's status line and headers.
    pub async fn finish(mut self) -> String {
        self.stream
            .write_all(&self.rest)
            .await
            .expect("sending the request body");
        read_head(&mut self.stream).await
    }
}

/// Reads an HTTP response head (up to the blank line).
async fn read_head(stream: &mut TcpStream) -> String {
    let read = async {
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            let n = stream.read(&mut byte).await.expect("reading a response");
            assert!(n == 1, "connection closed inside a response head: {head:?}");
            head.push(byte[0]);
        }
        String::from_utf8(head).expect("a response head is ASCII")
    };
    within(DEADLINE, read, "an HTTP response head").await
}

/// A `redis-server` started for one test on a free loopback port, killed when dropped. Never the
/// server on 6379.
#[derive(Debug)]
pub struct RedisServer {
    port: u16,
    child: Option<std::process::Child>,
    /// With TLS: the directory holding `ca.pem`, `server.pem` and `server.key`.
    tls: Option<PathBuf>,
    /// Arguments after the common ones (e.g. `--replicaof`).
    extra: Vec<String>,
    /// For a Sentinel: its configuration file (Sentinel rewrites it, so it is the test's own).
    sentinel_config: Option<PathBuf>,
}

impl RedisServer {
    /// Starts a server without persistence on a free port and waits until it answers.
    pub async fn start() -> Self {
        Self::start_with(&[]).await
    }

    /// Starts a server without persistence with `extra` arguments, e.g. `--replicaof`.
    pub async fn start_with(extra: &[&str]) -> Self {
        let mut server = Self {
            port: free_port(),
            child: None,
            tls: None,
            extra: extra.iter().map(|a| (*a).to_owned()).collect(),
            sentinel_config: None,
        };
        server.spawn().await;
        server
    }

    /// Starts a Sentinel that monitors the master at `master_port` as `primary` (quorum 1,
    /// down after 1 s), its configuration file in `dir`.
    pub async fn start_sentinel(dir: &std::path::Path, master_port: u16) -> Self {
        let port = free_port();
        let config = dir.join(format!("sentinel-{port}.conf"));
        std::fs::write(
            &config,
            format!(
                "port {port}\nbind 127.0.0.1\n\
                 sentinel monitor primary 127.0.0.1 {master_port} 1\n\
                 sentinel down-after-milliseconds primary 1000\n\
                 sentinel failover-timeout primary 5000\n"
            ),
        )
        .expect("write the sentinel configuration");
        let mut server = Self {
            port,
            child: None,
            tls: None,
            extra: Vec::new(),
            sentinel_config: Some(config),
        };
        server.spawn().await;
        server
    }

    /// Runs `redis-cli` against this server and returns its standard output.
    pub async fn cli(&self, args: &[&str]) -> String {
        let output = tokio::process::Command::new("redis-cli")
            .args(["-h", "127.0.0.1", "-p", &self.port.to_string()])
            .args(args)
            .output()
            .await
            .expect("redis-cli runs");
        String::from_utf8_lossy(&output.stdout).into_owned()
    }

    /// Starts a server that speaks only TLS, with a certificate for 127.0.0.1 signed by a test
    /// authority generated in `dir` (`ca.pem` is what clients must trust).
    pub async fn start_tls(dir: &std::path::Path) -> Self {
        let run = |args: &[&str]| {
            let status = std::process::Command::new("openssl")
                .args(args)
                .current_dir(dir)
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .status()
                .expect("openssl runs");
            assert!(status.success(), "openssl {args:?} failed");
        };
        std::fs::write(dir.join("san.ext"), "subjectAltName=IP:127.0.0.1\n")
            .expect("write san.ext");
        run(&[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
            "-days",
            "1",
            "-subj",
            "/CN=e2e-test-ca",
        ]);
        run(&[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "server.key",
            "-out",
            "server.csr",
            "-subj",
            "/CN=127.0.0.1",
        ]);
        run(&[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "server.pem",
            "-days",
            "1",
            "-extfile",
            "san.ext",
        ]);
        let mut server = Self {
            port: free_port(),
            child: None,
            tls: Some(dir.to_owned()),
            extra: Vec::new(),
            sentinel_config: None,
        };
        server.spawn().await;
        server
    }

    /// The server's port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `redis://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Kills the server (SIGKILL) and waits for it to exit.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            // A stopped process still dies of SIGKILL; CONT first keeps `wait` prompt.
            let _ = std::process::Command::new("kill")
                .args(["-CONT", &child.id().to_string()])
                .status();
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Sends a signal (`STOP`, `CONT`, ...) to the server process.
    pub fn signal(&self, signal: &str) {
        let child = self.child.as_ref().expect("the server is running");
        let status = std::process::Command::new("kill")
            .args([format!("-{signal}"), child.id().to_string()])
            .status()
            .expect("kill runs");
        assert!(status.success(), "kill -{signal} failed");
    }

    /// Starts the server again on the same port.
    pub async fn restart(&mut self) {
        self.kill();
        self.spawn().await;
    }

    /// Starts the server again on the same port after it was killed.
    pub async fn start_again(&mut self) {
        self.spawn().await;
    }

    async fn spawn(&mut self) {
        let port = self.port.to_string();
        let mut command = std::process::Command::new("redis-server");
        if let Some(config) = &self.sentinel_config {
            command.arg(config).arg("--sentinel");
        } else {
            command.args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]);
            // A replica's full sync writes an RDB file: keep it out of the working tree.
            command
                .arg("--dir")
                .arg(std::env::temp_dir())
                .args(["--dbfilename", &format!("e2e-redis-{port}.rdb")]);
        }
        command.args(&self.extra);
        match &self.tls {
            None if self.sentinel_config.is_some() => &mut command,
            None => command.args(["--port", &port]),
            Some(dir) => command
                .args([
                    "--port",
                    "0",
                    "--tls-port",
                    &port,
                    "--tls-auth-clients",
                    "no",
                ])
                .arg("--tls-cert-file")
                .arg(dir.join("server.pem"))
                .arg("--tls-key-file")
                .arg(dir.join("server.key"))
                .arg("--tls-ca-cert-file")
                .arg(dir.join("ca.pem")),
        };
        let child = command
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("redis-server is installed (.ci/run installs it)");
        self.child = Some(child);
        let tls = self.tls.clone();
        within(
            DEADLINE,
            async move {
                loop {
                    if answers_ping(&port, tls.as_deref()).await {
                        return;
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            },
            "redis-server to answer PING",
        )
        .await;
    }
}

/// A port that was free a moment ago on the loopback interface.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// Whether a redis-server on `port` answers PING (through redis-cli, which speaks TLS too).
async fn answers_ping(port: &str, tls: Option<&std::path::Path>) -> bool {
    let mut command = tokio::process::Command::new("redis-cli");
    command.args(["-h", "127.0.0.1", "-p", port]);
    if let Some(dir) = tls {
        command.arg("--tls").arg("--cacert").arg(dir.join("ca.pem"));
    }
    command
        .arg("PING")
        .output()
        .await
        .is_ok_and(|output| output.stdout.starts_with(b"PONG"))
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}
