//! A fleet of SignalR connections held by this process, and what they receive.
//!
//! Each connection is one task: it binds a loopback source address, upgrades, shakes hands,
//! joins its group, then reads frames, pings every 10 s and counts each stamped delivery in a
//! sharded `Ledger` until told to stop. The fleet knows nothing of publishing or of steps
//! beyond the step index carried in each stamp.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use anyhow::Context;
use futures_util::{SinkExt, StreamExt};
use hdrhistogram::Histogram;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use nix::sys::socket::{setsockopt, sockopt::IpBindAddressNoPort};
use serde::{Deserialize, Serialize};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::{Semaphore, mpsc, watch};
use tokio::task::JoinSet;
use tokio::time::{Instant, MissedTickBehavior, interval_at, sleep_until, timeout};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_tungstenite::{WebSocketStream, client_async_with_config};

use crate::cli::Endpoint;
use crate::host;
use crate::signalr::{self, Incoming};
use crate::tally::{self, Ledger, Order, StepTally};

/// Ledger shards; a connection always uses the same one.
const SHARDS: usize = 16;

/// How often each connection sends a ping (the server closes after 30 s of silence).
const PING_EVERY: Duration = Duration::from_secs(10);

/// Read buffer of each client socket: events are small, and a large buffer costs memory and
/// zero-filling on every read.
const READ_BUFFER_BYTES: usize = 2048;

/// How long a closing connection waits for its close frame to be written.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(1);

/// How long `Fleet::close` waits for all connection tasks to end.
const STOP_TIMEOUT: Duration = Duration::from_secs(15);

/// Period of the timer that measures this process's runtime lag.
const LAG_PROBE_EVERY: Duration = Duration::from_millis(5);

/// Source addresses used when spreading: 127.0.0.2 ..= 127.0.0.254.
const SOURCE_HOSTS: std::ops::RangeInclusive<u8> = 2..=254;

/// How to open this process's share of the connections.
#[derive(Debug, Clone)]
pub(crate) struct FleetConfig {
    /// The gateway's public listener.
    pub(crate) endpoint: Endpoint,
    /// HS256 secret to mint tokens with.
    pub(crate) jwt_secret: String,
    /// Origin header for the upgrade.
    pub(crate) origin: Option<String>,
    /// Spread source addresses over 127.0.0.2-254 (IPv4 targets only).
    pub(crate) spread: bool,
    /// Global index of the first connection.
    pub(crate) first: usize,
    /// Connections to open.
    pub(crate) count: usize,
    /// Groups over all processes; connection i joins group i mod G; 0 joins none.
    pub(crate) groups: usize,
    /// Connection attempts in flight at once.
    pub(crate) concurrency: usize,
    /// Time one connection may take to be ready.
    pub(crate) connect_timeout: Duration,
    /// Lifetime of the minted tokens.
    pub(crate) token_lifetime: Duration,
}

/// How opening the connections went.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub(crate) struct ConnectReport {
    /// Connections ready (joined, when joining).
    pub(crate) ok: u64,
    /// Failures by reason.
    pub(crate) failed: BTreeMap<String, u64>,
    /// Wall time of the whole connect phase, in seconds.
    pub(crate) secs: f64,
}

impl ConnectReport {
    /// Adds another process's report (connect phases run in parallel: the longest counts).
    pub(crate) fn merge(&mut self, other: &Self) {
        self.ok += other.ok;
        for (reason, count) in &other.failed {
            *self.failed.entry(reason.clone()).or_default() += count;
        }
        self.secs = self.secs.max(other.secs);
    }

    /// Failed connections over all reasons.
    pub(crate) fn failed_total(&self) -> u64 {
        self.failed.values().sum()
    }
}

/// The connections of this process.
#[derive(Debug)]
pub(crate) struct Fleet {
    shared: Arc<Shared>,
    stop: watch::Sender<bool>,
    tasks: JoinSet<()>,
}

#[derive(Debug)]
struct Shared {
    shards: Vec<Mutex<Ledger>>,
    /// Live members per group.
    members: Vec<AtomicU32>,
    /// Live connections.
    live: AtomicU64,
    /// Connections the server or the network ended, by reason.
    ends: Mutex<BTreeMap<String, u64>>,
    /// Runtime lag since the last collection, in microseconds.
    lag: Mutex<Histogram<u64>>,
}

#[derive(Debug, Serialize)]
struct Claims<'a> {
    sub: String,
    role: &'a str,
    regions: Vec<String>,
    exp: i64,
}

impl Fleet {
    /// Opens `config.count` connections, at most `config.concurrency` at a time, and returns
    /// once each is ready or has failed.
    ///
    /// # Errors
    /// Never for a connection that fails (those are counted); only for a broken setup.
    pub(crate) async fn open(config: FleetConfig) -> anyhow::Result<(Self, ConnectReport)> {
        let started = Instant::now();
        let shared = Arc::new(Shared {
            shards: (0..SHARDS).map(|_| Mutex::default()).collect(),
            members: (0..config.groups).map(|_| AtomicU32::new(0)).collect(),
            live: AtomicU64::new(0),
            ends: Mutex::default(),
            lag: Mutex::new(tally::new_histogram()),
        });
        let key = EncodingKey::from_secret(config.jwt_secret.as_bytes());
        let (stop, stopped) = watch::channel(false);
        let permits = Arc::new(Semaphore::new(config.concurrency));
        let (ready_tx, mut ready_rx) = mpsc::channel(1024);
        let mut tasks = JoinSet::new();
        let config = Arc::new(config);
        for index in config.first..config.first + config.count {
            let group = (config.groups > 0).then(|| index % config.groups);
            let token = mint(&key, index, group, config.token_lifetime)?;
            let session = Session {
                index,
                group,
                config: Arc::clone(&config),
                shared: Arc::clone(&shared),
            };
            let permits = Arc::clone(&permits);
            let ready = ready_tx.clone();
            let stopped = stopped.clone();
            tasks.spawn(async move {
                let Ok(permit) = permits.acquire_owned().await else {
                    return;
                };
                session.run(token, permit, ready, stopped).await;
            });
        }
        drop(ready_tx);
        let mut report = ConnectReport::default();
        while let Some(outcome) = ready_rx.recv().await {
            match outcome {
                Ok(()) => report.ok += 1,
                Err(reason) => *report.failed.entry(reason).or_default() += 1,
            }
        }
        report.secs = started.elapsed().as_secs_f64();
        tasks.spawn(probe_lag(Arc::clone(&shared), stopped));
        Ok((
            Self {
                shared,
                stop,
                tasks,
            },
            report,
        ))
    }

    /// Live members of each group on this process.
    pub(crate) fn members(&self) -> Vec<u32> {
        self.shared
            .members
            .iter()
            .map(|m| m.load(Ordering::Relaxed))
            .collect()
    }

    /// Live connections on this process.
    pub(crate) fn live(&self) -> u64 {
        self.shared.live.load(Ordering::Relaxed)
    }

    /// Connections ended by the server or the network since the last call, by reason.
    pub(crate) fn take_ends(&self) -> BTreeMap<String, u64> {
        std::mem::take(&mut *lock(&self.shared.ends))
    }

    /// Closes step `step` and returns what all connections received for it.
    pub(crate) fn collect(&self, step: u32) -> StepTally {
        let mut total = StepTally::default();
        for shard in &self.shared.shards {
            let tally = lock(shard).collect(step);
            total.merge(&tally);
        }
        total.tool_lag = std::mem::replace(&mut *lock(&self.shared.lag), tally::new_histogram());
        total
    }

    /// Closes every connection and waits (boundedly) for the tasks to end.
    pub(crate) async fn close(mut self) {
        let _ = self.stop.send(true);
        let all_done = async { while self.tasks.join_next().await.is_some() {} };
        if timeout(STOP_TIMEOUT, all_done).await.is_err() {
            self.tasks.abort_all();
        }
    }
}

/// One connection's identity and where it reports.
struct Session {
    index: usize,
    group: Option<usize>,
    config: Arc<FleetConfig>,
    shared: Arc<Shared>,
}

type Socket = WebSocketStream<TcpStream>;

impl Session {
    async fn run(
        self,
        token: String,
        permit: tokio::sync::OwnedSemaphorePermit,
        ready: mpsc::Sender<Result<(), String>>,
        stopped: watch::Receiver<bool>,
    ) {
        let established = timeout(self.config.connect_timeout, self.establish(&token)).await;
        drop(permit);
        let ws = match established {
            Ok(Ok(ws)) => ws,
            Ok(Err(reason)) => {
                let _ = ready.send(Err(reason)).await;
                return;
            }
            Err(_) => {
                let _ = ready.send(Err("timed out".to_owned())).await;
                return;
            }
        };
        self.shared.live.fetch_add(1, Ordering::Relaxed);
        if let Some(g) = self.group {
            self.shared.members[g].fetch_add(1, Ordering::Relaxed);
        }
        let _ = ready.send(Ok(())).await;
        drop(ready);

        let ended = self.hold(ws, stopped).await;

        if let Some(g) = self.group {
            self.shared.members[g].fetch_sub(1, Ordering::Relaxed);
        }
        self.shared.live.fetch_sub(1, Ordering::Relaxed);
        if let Some(reason) = ended {
            *lock(&self.shared.ends).entry(reason).or_default() += 1;
        }
    }

    /// TCP connect from a spread source address, upgrade, handshake and join.
    async fn establish(&self, token: &str) -> Result<Socket, String> {
        let target = self.config.endpoint.addr;
        let socket = match target {
            SocketAddr::V4(_) => TcpSocket::new_v4(),
            SocketAddr::V6(_) => TcpSocket::new_v6(),
        }
        .map_err(|e| format!("socket: {:?}", e.kind()))?;
        if let Some(source) = self.source_address() {
            setsockopt(&socket, IpBindAddressNoPort, &true)
                .map_err(|e| format!("IP_BIND_ADDRESS_NO_PORT: {e}"))?;
            socket
                .bind(source)
                .map_err(|e| format!("bind: {:?}", e.kind()))?;
        }
        let stream = socket
            .connect(target)
            .await
            .map_err(|e| format!("connect: {:?}", e.kind()))?;
        stream
            .set_nodelay(true)
            .map_err(|e| format!("nodelay: {:?}", e.kind()))?;

        let url = format!("ws://{target}/hub/v1?access_token={token}");
        let mut request = url
            .into_client_request()
            .map_err(|e| format!("request: {e}"))?;
        if let Some(origin) = &self.config.origin {
            let value = HeaderValue::from_str(origin).map_err(|e| format!("origin: {e}"))?;
            request.headers_mut().insert("origin", value);
        }
        let ws_config = WebSocketConfig::default()
            .read_buffer_size(READ_BUFFER_BYTES)
            .write_buffer_size(0);
        let (mut ws, _) = client_async_with_config(request, stream, Some(ws_config))
            .await
            .map_err(|e| format!("upgrade: {}", error_label(&e)))?;

        ws.send(Message::text(signalr::HANDSHAKE))
            .await
            .map_err(|e| format!("handshake: {}", error_label(&e)))?;
        let mut phase = Phase::Handshake;
        while phase != Phase::Ready {
            let text = match ws.next().await {
                Some(Ok(Message::Text(text))) => text,
                Some(Ok(Message::Close(_))) | None => {
                    return Err(format!("{}: closed by server", phase.name()));
                }
                Some(Ok(_)) => continue,
                Some(Err(e)) => return Err(format!("{}: {}", phase.name(), error_label(&e))),
            };
            for record in signalr::records(&text) {
                match (phase, Incoming::parse(record)) {
                    (Phase::Handshake, Incoming::Handshake(None)) => phase = Phase::Handshaken,
                    (Phase::Handshake, Incoming::Handshake(Some(error))) => {
                        return Err(format!("handshake refused: {error}"));
                    }
                    (
                        Phase::Joining,
                        Incoming::Completion {
                            id,
                            error: Some(error),
                        },
                    ) if id == signalr::JOIN_INVOCATION_ID => {
                        return Err(format!("join refused: {error}"));
                    }
                    (Phase::Joining, Incoming::Completion { id, error: None })
                        if id == signalr::JOIN_INVOCATION_ID =>
                    {
                        phase = Phase::Ready;
                    }
                    (_, Incoming::Close(error)) => {
                        return Err(format!(
                            "{}: server close: {}",
                            phase.name(),
                            error.unwrap_or_default()
                        ));
                    }
                    _ => {}
                }
            }
            if phase == Phase::Handshaken {
                match self.group {
                    Some(g) => {
                        ws.send(Message::text(signalr::join(&region(g))))
                            .await
                            .map_err(|e| format!("join: {}", error_label(&e)))?;
                        phase = Phase::Joining;
                    }
                    None => phase = Phase::Ready,
                }
            }
        }
        Ok(ws)
    }

    /// Reads until stopped or ended; returns why the server or network ended it, if it did.
    async fn hold(&self, mut ws: Socket, mut stopped: watch::Receiver<bool>) -> Option<String> {
        let shard = &self.shared.shards[self.index % SHARDS];
        let mut order = Order::default();
        // Stagger the pings of thousands of connections over the first 10 s.
        let offset = Duration::from_millis((self.index % 10_000) as u64);
        let mut ping = interval_at(Instant::now() + offset, PING_EVERY);
        ping.set_missed_tick_behavior(MissedTickBehavior::Delay);
        // Created once: a fresh `changed()` per frame would register a waiter every time.
        let stop = stopped.changed();
        tokio::pin!(stop);
        loop {
            tokio::select! {
                biased;
                _ = &mut stop => {
                    let _ = timeout(CLOSE_TIMEOUT, ws.close(None)).await;
                    return None;
                }
                _ = ping.tick() => {
                    if let Err(e) = ws.send(Message::text(signalr::PING)).await {
                        return Some(format!("ping: {}", error_label(&e)));
                    }
                }
                frame = ws.next() => match frame {
                    Some(Ok(Message::Text(text))) => {
                        if let Some(reason) = self.absorb(&text, &mut order, shard) {
                            return Some(reason);
                        }
                    }
                    Some(Ok(Message::Close(frame))) => {
                        let code = frame.map_or_else(|| "none".to_owned(), |f| u16::from(f.code).to_string());
                        return Some(format!("websocket close {code}"));
                    }
                    Some(Ok(_)) => {}
                    Some(Err(e)) => return Some(format!("read: {}", error_label(&e))),
                    None => return Some("eof".to_owned()),
                },
            }
        }
    }

    /// Counts the deliveries of one frame; returns a close reason if the server closes.
    fn absorb(&self, text: &str, order: &mut Order, shard: &Mutex<Ledger>) -> Option<String> {
        let now = host::now_micros();
        let mut ledger: Option<MutexGuard<'_, Ledger>> = None;
        for record in signalr::records(text) {
            match Incoming::parse(record) {
                Incoming::Delivery(stamp) => {
                    let ledger = ledger.get_or_insert_with(|| lock(shard));
                    match stamp {
                        Some(stamp) if Some(stamp.g as usize) == self.group => {
                            let verdict = order.observe(stamp.n);
                            ledger.record(stamp.s, verdict, now.saturating_sub(stamp.t));
                        }
                        Some(stamp) => ledger.record_misrouted(stamp.s),
                        None => ledger.record_unstamped(),
                    }
                }
                Incoming::Close(error) => {
                    return Some(format!("server close: {}", error.unwrap_or_default()));
                }
                _ => {}
            }
        }
        None
    }

    /// 127.0.0.2-254, round robin by connection index, when spreading an IPv4 target.
    fn source_address(&self) -> Option<SocketAddr> {
        let spread = self.config.spread && self.config.endpoint.addr.is_ipv4();
        spread.then(|| {
            let hosts = usize::from(SOURCE_HOSTS.end() - SOURCE_HOSTS.start()) + 1;
            let host = SOURCE_HOSTS.start() + (self.index % hosts) as u8;
            SocketAddr::new(IpAddr::V4(Ipv4Addr::new(127, 0, 0, host)), 0)
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Handshake,
    Handshaken,
    Joining,
    Ready,
}

impl Phase {
    fn name(self) -> &'static str {
        match self {
            Self::Handshake | Self::Handshaken => "handshake",
            Self::Joining => "join",
            Self::Ready => "ready",
        }
    }
}

/// Measures how late this process's runtime wakes a timer, until stopped.
async fn probe_lag(shared: Arc<Shared>, mut stopped: watch::Receiver<bool>) {
    loop {
        let due = Instant::now() + LAG_PROBE_EVERY;
        tokio::select! {
            biased;
            _ = stopped.changed() => return,
            () = sleep_until(due) => {}
        }
        let lag = Instant::now().saturating_duration_since(due);
        let micros = u64::try_from(lag.as_micros()).unwrap_or(u64::MAX).max(1);
        lock(&shared.lag).saturating_record(micros);
    }
}

/// The region of group `g`.
pub(crate) fn region(g: usize) -> String {
    format!("lg-{g}")
}

fn mint(
    key: &EncodingKey,
    index: usize,
    group: Option<usize>,
    lifetime: Duration,
) -> anyhow::Result<String> {
    let lifetime = i64::try_from(lifetime.as_secs()).unwrap_or(i64::MAX / 2);
    let claims = Claims {
        sub: format!("loadgen-{index}"),
        role: "dispatcher",
        regions: group.map(region).into_iter().collect(),
        exp: chrono::Utc::now().timestamp() + lifetime,
    };
    jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, key).context("minting a token")
}

/// A short label for grouping WebSocket errors.
fn error_label(error: &tungstenite::Error) -> String {
    match error {
        tungstenite::Error::Io(e) => format!("io {:?}", e.kind()),
        tungstenite::Error::Http(response) => format!("HTTP {}", response.status()),
        other => other.to_string(),
    }
}

/// Locks a std mutex; a panicked holder only leaves counters behind, which stay usable.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}
