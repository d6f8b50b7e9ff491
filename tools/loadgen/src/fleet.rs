//! A fleet of SignalR connections held by this process, and what they receive.
//!
//! Each connection is one task: it binds a loopback source address, upgrades, shakes hands,
//! joins its group, then reads frames, pings every 10 s and counts each stamped delivery in a
//! sharded `Ledger` until told to stop. The fleet knows nothing of publishing or of steps
//! beyond the step index carried in each stamp.
//!
//! The receive path is what limits the tool (thousands of connections, one core), so it is
//! kept short per frame: each connection speaks WebSocket itself (`ws`), reads into one scratch
//! buffer shared by all connections of its thread (so it stays in cache), decodes the frames in
//! place and reads stamps with a byte scan (`signalr`), without allocating. A connection keeps
//! only the tail of a frame not yet complete. Pings and the order to stop reach a connection
//! through one watch channel of its cohort, not a timer of its own: a wake-up for data then
//! polls one future besides the socket.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::future::{Future, poll_fn};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use anyhow::Context as _;
use hdrhistogram::Histogram;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use nix::sys::socket::{setsockopt, sockopt::IpBindAddressNoPort};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::{Semaphore, mpsc, watch};
use tokio::task::JoinSet;
use tokio::time::{Instant, MissedTickBehavior, interval, sleep_until, timeout};

use crate::cli::Endpoint;
use crate::host;
use crate::signalr::{self, Incoming};
use crate::tally::{self, Ledger, Order, StepTally};
use crate::ws;

/// Ledger shards; a connection always uses the same one.
const SHARDS: usize = 16;

/// How often each connection sends a ping (the server closes after 30 s of silence).
const PING_EVERY: Duration = Duration::from_secs(10);

/// Ping cohorts: connection i is in cohort i mod COHORTS, and one cohort pings every
/// PING_EVERY / COHORTS, so the pings of thousands of connections are spread out.
const COHORTS: usize = 100;

/// Size of the scratch buffer every connection of a thread reads into: room for many events
/// when the tool falls behind, small enough to stay in cache.
const SCRATCH_BYTES: usize = 64 * 1024;

/// Least free space a read is offered after the carried tail of a frame.
const MIN_READ_BYTES: usize = 4096;

/// What a connection reads into while it connects (it then keeps only partial frames).
const CONNECT_READ_BYTES: usize = 2048;

thread_local! {
    /// The read buffer of the connections polled on this thread. Borrowed only inside one
    /// poll, never across an await.
    static SCRATCH: RefCell<Vec<u8>> = RefCell::new(vec![0; SCRATCH_BYTES]);
}

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
    /// One channel per ping cohort: a new version means "ping", or "stop" once it holds true.
    cohorts: Arc<[watch::Sender<bool>]>,
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
        let cohorts: Arc<[watch::Sender<bool>]> =
            (0..COHORTS).map(|_| watch::Sender::new(false)).collect();
        let permits = Arc::new(Semaphore::new(config.concurrency));
        let (ready_tx, mut ready_rx) = mpsc::channel(1024);
        let mut tasks = JoinSet::new();
        tasks.spawn(drive_pings(Arc::clone(&cohorts), stopped.clone()));
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
            let control = cohorts[index % COHORTS].subscribe();
            tasks.spawn(async move {
                let Ok(permit) = permits.acquire_owned().await else {
                    return;
                };
                session.run(token, permit, ready, control).await;
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
                cohorts,
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
        for cohort in self.cohorts.iter() {
            cohort.send_replace(true);
        }
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

impl Session {
    async fn run(
        self,
        token: String,
        permit: tokio::sync::OwnedSemaphorePermit,
        ready: mpsc::Sender<Result<(), String>>,
        control: watch::Receiver<bool>,
    ) {
        let established = timeout(self.config.connect_timeout, self.establish(&token)).await;
        drop(permit);
        let wire = match established {
            Ok(Ok(wire)) => wire,
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

        let ended = self.hold(wire, control).await;

        if let Some(g) = self.group {
            self.shared.members[g].fetch_sub(1, Ordering::Relaxed);
        }
        self.shared.live.fetch_sub(1, Ordering::Relaxed);
        if let Some(reason) = ended {
            *lock(&self.shared.ends).entry(reason).or_default() += 1;
        }
    }

    /// TCP connect from a spread source address, upgrade, handshake and join.
    async fn establish(&self, token: &str) -> Result<Wire, String> {
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

        let nonce = *uuid::Uuid::new_v4().as_bytes();
        let [m0, m1, m2, m3, ..] = *uuid::Uuid::new_v4().as_bytes();
        let mut wire = Wire::new(stream, [m0, m1, m2, m3]);
        let key = ws::client_key(nonce);
        let request = ws::upgrade_request(
            &target.to_string(),
            &format!("/hub/v1?access_token={token}"),
            &key,
            self.config.origin.as_deref(),
        )?;
        wire.stream
            .write_all(request.as_bytes())
            .await
            .map_err(|e| format!("upgrade: io {:?}", e.kind()))?;
        loop {
            match ws::upgrade_response(&wire.pending, &key) {
                Ok(Some(head)) => {
                    wire.pending.drain(..head);
                    break;
                }
                Ok(None) => {}
                Err(e) => return Err(format!("upgrade: {e}")),
            }
            match wire.fill().await {
                Ok(0) => return Err("upgrade: eof".to_owned()),
                Ok(_) => {}
                Err(e) => return Err(format!("upgrade: io {:?}", e.kind())),
            }
        }

        wire.send_text(signalr::HANDSHAKE)
            .await
            .map_err(|e| format!("handshake: io {:?}", e.kind()))?;
        let mut phase = Phase::Handshake;
        while phase != Phase::Ready {
            let text = match wire.receive().await {
                Ok(Received::Text(text)) => text,
                Ok(Received::Close) | Err(ReceiveError::Eof) => {
                    return Err(format!("{}: closed by server", phase.name()));
                }
                Ok(Received::Ping(payload)) => {
                    wire.send(ws::OPCODE_PONG, &payload)
                        .await
                        .map_err(|e| format!("{}: io {:?}", phase.name(), e.kind()))?;
                    continue;
                }
                Ok(Received::Other) => continue,
                Err(e) => return Err(format!("{}: {e}", phase.name())),
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
                        wire.send_text(&signalr::join(&region(g)))
                            .await
                            .map_err(|e| format!("join: io {:?}", e.kind()))?;
                        phase = Phase::Joining;
                    }
                    None => phase = Phase::Ready,
                }
            }
        }
        Ok(wire)
    }

    /// Reads until stopped or ended; returns why the server or network ended it, if it did.
    async fn hold(&self, mut wire: Wire, mut control: watch::Receiver<bool>) -> Option<String> {
        let shard = &self.shared.shards[self.index % SHARDS];
        let mut order = Order::default();
        wire.pending.shrink_to_fit();
        loop {
            let event = {
                // Lives until the cohort signals: polling it again costs less than a new one.
                let signal = control.changed();
                tokio::pin!(signal);
                poll_fn(|cx| {
                    // The socket first: a wake-up is nearly always for data.
                    if let Poll::Ready(event) = self.poll_socket(cx, &mut wire, &mut order, shard) {
                        return Poll::Ready(event);
                    }
                    signal.as_mut().poll(cx).map(|changed| match changed {
                        Ok(()) => Event::Signal,
                        Err(_) => Event::Stop,
                    })
                })
                .await
            };
            let stop = match event {
                Event::Signal => *control.borrow_and_update(),
                Event::Stop => true,
                Event::Pong(payload) => {
                    if let Err(e) = wire.send(ws::OPCODE_PONG, &payload).await {
                        return Some(format!("pong: io {:?}", e.kind()));
                    }
                    continue;
                }
                Event::Ended(reason) => return Some(reason),
            };
            if stop {
                let _ = timeout(CLOSE_TIMEOUT, wire.send(ws::OPCODE_CLOSE, &[])).await;
                return None;
            }
            if let Err(e) = wire.send_text(signalr::PING).await {
                return Some(format!("ping: io {:?}", e.kind()));
            }
        }
    }

    /// Reads and counts what the socket has, until it has no more (`Pending`, with the task's
    /// waker registered) or something needs the connection's attention.
    fn poll_socket(
        &self,
        cx: &mut Context<'_>,
        wire: &mut Wire,
        order: &mut Order,
        shard: &Mutex<Ledger>,
    ) -> Poll<Event> {
        SCRATCH.with_borrow_mut(|scratch| {
            loop {
                let carried = wire.pending.len();
                let size = (carried + MIN_READ_BYTES).max(wire.want);
                if scratch.len() < size {
                    scratch.resize(size, 0);
                }
                scratch[..carried].copy_from_slice(&wire.pending);
                let mut read = ReadBuf::new(&mut scratch[carried..]);
                match Pin::new(&mut wire.stream).poll_read(cx, &mut read) {
                    Poll::Pending => return Poll::Pending,
                    Poll::Ready(Err(e)) => {
                        return Poll::Ready(Event::Ended(format!("read: io {:?}", e.kind())));
                    }
                    Poll::Ready(Ok(())) => {}
                }
                let got = read.filled().len();
                if got == 0 {
                    return Poll::Ready(Event::Ended("eof".to_owned()));
                }
                let data = &scratch[..carried + got];
                let (used, outcome) = self.absorb(data, order, shard);
                wire.keep(&data[used..]);
                match outcome {
                    Ok(None) => {}
                    Ok(Some(ping)) => return Poll::Ready(Event::Pong(ping)),
                    Err(reason) => return Poll::Ready(Event::Ended(reason)),
                }
            }
        })
    }

    /// Counts the deliveries of the complete frames at the start of `data`. Returns how many
    /// bytes they took, and the payload of a WebSocket ping to answer, if one came, or why the
    /// server ended the connection.
    fn absorb(
        &self,
        data: &[u8],
        order: &mut Order,
        shard: &Mutex<Ledger>,
    ) -> (usize, Result<Option<Vec<u8>>, String>) {
        let now = host::now_micros();
        let mut ledger: Option<MutexGuard<'_, Ledger>> = None;
        let mut ping = None;
        let mut at = 0;
        while let Some(frame) = ws::next_frame(&data[at..]).transpose() {
            let ws::Frame {
                opcode,
                payload,
                len,
            } = match frame {
                Ok(frame) => frame,
                Err(e) => return (at, Err(format!("read: {e}"))),
            };
            at += len;
            match opcode {
                ws::OPCODE_TEXT => {
                    let Ok(text) = std::str::from_utf8(payload) else {
                        return (at, Err("read: text frame not UTF-8".to_owned()));
                    };
                    for record in signalr::records(text) {
                        match Incoming::parse(record) {
                            Incoming::Delivery(stamp) => {
                                let ledger = ledger.get_or_insert_with(|| lock(shard));
                                match stamp {
                                    Some(stamp) if Some(stamp.g as usize) == self.group => {
                                        let verdict = order.observe(stamp.n);
                                        ledger.record(
                                            stamp.s,
                                            verdict,
                                            now.saturating_sub(stamp.t),
                                        );
                                    }
                                    Some(stamp) => ledger.record_misrouted(stamp.s),
                                    None => ledger.record_unstamped(),
                                }
                            }
                            Incoming::Close(error) => {
                                let reason = format!("server close: {}", error.unwrap_or_default());
                                return (at, Err(reason));
                            }
                            _ => {}
                        }
                    }
                }
                ws::OPCODE_CLOSE => {
                    let code = ws::close_code(payload)
                        .map_or_else(|| "none".to_owned(), |c| c.to_string());
                    return (at, Err(format!("websocket close {code}")));
                }
                ws::OPCODE_PING => ping = Some(payload.to_vec()),
                _ => {}
            }
        }
        (at, Ok(ping))
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

/// What needs a holding connection's attention.
enum Event {
    /// Its cohort's channel changed: ping, or stop if it now holds true.
    Signal,
    /// The fleet is gone.
    Stop,
    /// Answer a WebSocket ping with this payload.
    Pong(Vec<u8>),
    /// The server or the network ended the connection, for this reason.
    Ended(String),
}

/// One connection's socket and the received bytes it has not used yet.
struct Wire {
    stream: TcpStream,
    /// Received and not consumed: while connecting, whatever came; once holding, the start of
    /// a frame that is not complete yet (usually nothing).
    pending: Vec<u8>,
    /// Bytes the incomplete frame in `pending` needs in all, once its header is known.
    want: usize,
    /// The mask of every frame this client sends.
    mask: [u8; 4],
}

/// A message read while connecting.
enum Received {
    Text(String),
    Close,
    Ping(Vec<u8>),
    Other,
}

/// Why a message could not be read while connecting.
enum ReceiveError {
    Eof,
    Io(std::io::ErrorKind),
    Frame(ws::FrameError),
    Utf8,
}

impl std::fmt::Display for ReceiveError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Eof => f.write_str("eof"),
            Self::Io(kind) => write!(f, "io {kind:?}"),
            Self::Frame(e) => e.fmt(f),
            Self::Utf8 => f.write_str("text frame not UTF-8"),
        }
    }
}

impl Wire {
    fn new(stream: TcpStream, mask: [u8; 4]) -> Self {
        Self {
            stream,
            pending: Vec::new(),
            want: 0,
            mask,
        }
    }

    /// Reads what the socket has onto the end of `pending`; `Ok(0)` at the end of the stream.
    async fn fill(&mut self) -> std::io::Result<usize> {
        self.pending.reserve(CONNECT_READ_BYTES);
        self.stream.read_buf(&mut self.pending).await
    }

    /// Keeps `tail` (the start of an incomplete frame) as what is pending.
    fn keep(&mut self, tail: &[u8]) {
        self.pending.clear();
        self.pending.extend_from_slice(tail);
        self.want = match ws::frame_head(tail) {
            Ok(Some(head)) => head.total_len(),
            _ => 0,
        };
    }

    /// Reads the next message (whole frames only), waiting for it.
    async fn receive(&mut self) -> Result<Received, ReceiveError> {
        loop {
            if let Some(ws::Frame {
                opcode,
                payload,
                len,
            }) = ws::next_frame(&self.pending).map_err(ReceiveError::Frame)?
            {
                let message = match opcode {
                    ws::OPCODE_TEXT => Received::Text(
                        String::from_utf8(payload.to_vec()).map_err(|_| ReceiveError::Utf8)?,
                    ),
                    ws::OPCODE_CLOSE => Received::Close,
                    ws::OPCODE_PING => Received::Ping(payload.to_vec()),
                    _ => Received::Other,
                };
                self.pending.drain(..len);
                return Ok(message);
            }
            match self.fill().await {
                Ok(0) => return Err(ReceiveError::Eof),
                Ok(_) => {}
                Err(e) => return Err(ReceiveError::Io(e.kind())),
            }
        }
    }

    /// Sends one masked frame.
    async fn send(&mut self, opcode: u8, payload: &[u8]) -> std::io::Result<()> {
        let frame = ws::client_frame(opcode, payload, self.mask);
        self.stream.write_all(&frame).await
    }

    /// Sends one text frame.
    async fn send_text(&mut self, text: &str) -> std::io::Result<()> {
        self.send(ws::OPCODE_TEXT, text.as_bytes()).await
    }
}

/// Signals one ping cohort after another, so that each connection pings every PING_EVERY,
/// until stopped.
async fn drive_pings(cohorts: Arc<[watch::Sender<bool>]>, mut stopped: watch::Receiver<bool>) {
    let mut tick = interval(PING_EVERY / COHORTS as u32);
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    tick.tick().await;
    for cohort in cohorts.iter().cycle() {
        tokio::select! {
            biased;
            _ = stopped.changed() => return,
            _ = tick.tick() => {}
        }
        cohort.send_modify(|_| {});
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

/// Locks a std mutex; a panicked holder only leaves counters behind, which stay usable.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::TcpListener;

    const MASK: [u8; 4] = [0x11, 0x22, 0x33, 0x44];

    /// A server frame as the gateway writes it.
    fn server_frame(opcode: u8, payload: &[u8]) -> Vec<u8> {
        ws_frame::server::frame(opcode, payload).to_vec()
    }

    /// An event record as the gateway writes it, stamped for group `g`, counter `n`, step 0.
    fn event(g: u32, n: u64, t: u64) -> Vec<u8> {
        padded_event(g, n, t, 30)
    }

    /// An event with `pad` bytes of padding.
    fn padded_event(g: u32, n: u64, t: u64, pad: usize) -> Vec<u8> {
        let pad = "x".repeat(pad);
        let record = format!(
            "{{\"type\":1,\"target\":\"RecommendationReady\",\"arguments\":[{{\"region\":\"lg-{g}\",\"lg\":{{\"g\":{g},\"n\":{n},\"t\":{t},\"s\":0}},\"pad\":\"{pad}\"}}]}}\u{1e}"
        );
        server_frame(ws::OPCODE_TEXT, record.as_bytes())
    }

    /// A session of group 1 (of 2) and a connected pair: its wire and the server's end.
    async fn connected() -> (Session, Wire, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (server, _) = listener.accept().await.unwrap();
        let config = FleetConfig {
            endpoint: Endpoint::try_loopback("http://127.0.0.1:1").unwrap(),
            jwt_secret: String::new(),
            origin: None,
            spread: false,
            first: 0,
            count: 1,
            groups: 2,
            concurrency: 1,
            connect_timeout: Duration::from_secs(1),
            token_lifetime: Duration::from_secs(60),
        };
        let shared = Arc::new(Shared {
            shards: (0..SHARDS).map(|_| Mutex::default()).collect(),
            members: (0..2).map(|_| AtomicU32::new(0)).collect(),
            live: AtomicU64::new(0),
            ends: Mutex::default(),
            lag: Mutex::new(tally::new_histogram()),
        });
        let session = Session {
            index: 1,
            group: Some(1),
            config: Arc::new(config),
            shared,
        };
        (session, Wire::new(client, MASK), server)
    }

    /// Step 0 over all shards.
    fn step_zero(session: &Session) -> StepTally {
        let mut total = StepTally::default();
        for shard in &session.shared.shards {
            total.merge(&lock(shard).collect(0));
        }
        total
    }

    /// Reads one masked client frame: opcode and unmasked payload.
    async fn client_frame(server: &mut TcpStream) -> (u8, Vec<u8>) {
        let mut head = [0; 2];
        server.read_exact(&mut head).await.unwrap();
        assert_eq!(head[0] & 0x80, 0x80, "FIN");
        assert_eq!(head[1] & 0x80, 0x80, "masked");
        let len = usize::from(head[1] & 0x7F);
        assert!(len < 126);
        let mut mask = [0; 4];
        server.read_exact(&mut mask).await.unwrap();
        assert_eq!(mask, MASK);
        let mut payload = vec![0; len];
        server.read_exact(&mut payload).await.unwrap();
        for (byte, key) in payload.iter_mut().zip(mask.iter().cycle()) {
            *byte ^= key;
        }
        (head[0] & 0x0F, payload)
    }

    #[tokio::test]
    async fn frames_cut_anywhere_are_counted_and_a_close_frame_ends_the_connection() {
        let (session, wire, mut server) = connected().await;
        let now = host::now_micros();
        let mut bytes = Vec::new();
        for n in [0, 1, 2, 5, 3, 4, 4, 6] {
            bytes.extend(event(1, n, now));
        }
        bytes.extend(event(0, 7, now)); // Another group's event.
        bytes.extend(server_frame(
            ws::OPCODE_TEXT,
            b"{\"type\":1,\"target\":\"RecommendationReady\",\"arguments\":[{}]}\x1e{\"type\":6}\x1e",
        ));
        bytes.extend(server_frame(ws::OPCODE_CLOSE, &1001_u16.to_be_bytes()));
        let writer = tokio::spawn(async move {
            let mut rest = &bytes[..];
            for size in [1, 2, 3, 7, 40, 150, 333].iter().cycle() {
                if rest.is_empty() {
                    break;
                }
                let (chunk, tail) = rest.split_at((*size).min(rest.len()));
                server.write_all(chunk).await.unwrap();
                rest = tail;
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            server
        });
        let (_control, watched) = watch::channel(false);
        let ended = session.hold(wire, watched).await;
        assert_eq!(ended.as_deref(), Some("websocket close 1001"));
        drop(writer.await.unwrap());
        let tally = step_zero(&session);
        assert_eq!(tally.delivered, 7);
        assert_eq!(tally.reordered, 2);
        assert_eq!(tally.duplicates, 1);
        assert_eq!(tally.misrouted, 1);
        assert_eq!(tally.unstamped, 1);
        assert_eq!(tally.latency.len(), 7);
    }

    #[tokio::test]
    async fn a_frame_larger_than_the_scratch_buffer_is_read_whole() {
        let (session, wire, mut server) = connected().await;
        let now = host::now_micros();
        let mut bytes = event(1, 0, now);
        bytes.extend(padded_event(1, 1, now, SCRATCH_BYTES + 5_000));
        bytes.extend(event(1, 2, now));
        bytes.extend(server_frame(ws::OPCODE_CLOSE, &[]));
        let writer = tokio::spawn(async move {
            for chunk in bytes.chunks(10_000) {
                server.write_all(chunk).await.unwrap();
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            server
        });
        let (_control, watched) = watch::channel(false);
        let ended = session.hold(wire, watched).await;
        assert_eq!(ended.as_deref(), Some("websocket close none"));
        drop(writer.await.unwrap());
        let tally = step_zero(&session);
        assert_eq!(
            (tally.delivered, tally.reordered, tally.duplicates),
            (3, 0, 0)
        );
    }

    #[tokio::test]
    async fn pings_are_answered_and_a_signalr_close_ends_the_connection() {
        let (session, wire, mut server) = connected().await;
        let (_control, watched) = watch::channel(false);
        let held = tokio::spawn(async move { session.hold(wire, watched).await });
        server
            .write_all(&server_frame(ws::OPCODE_PING, b"hi"))
            .await
            .unwrap();
        assert_eq!(
            client_frame(&mut server).await,
            (ws::OPCODE_PONG, b"hi".to_vec())
        );
        let close = b"{\"type\":7,\"error\":\"bye\",\"allowReconnect\":true}\x1e";
        server
            .write_all(&server_frame(ws::OPCODE_TEXT, close))
            .await
            .unwrap();
        assert_eq!(held.await.unwrap().as_deref(), Some("server close: bye"));
    }

    #[tokio::test]
    async fn the_cohort_signal_pings_then_stops() {
        let (session, wire, mut server) = connected().await;
        let (control, watched) = watch::channel(false);
        let held = tokio::spawn(async move { session.hold(wire, watched).await });
        control.send_modify(|_| {});
        assert_eq!(
            client_frame(&mut server).await,
            (ws::OPCODE_TEXT, signalr::PING.as_bytes().to_vec())
        );
        control.send_replace(true);
        assert_eq!(client_frame(&mut server).await, (ws::OPCODE_CLOSE, vec![]));
        assert_eq!(held.await.unwrap(), None);
        let mut rest = Vec::new();
        server.read_to_end(&mut rest).await.unwrap();
        assert!(rest.is_empty());
    }

    #[tokio::test]
    async fn end_of_stream_is_reported() {
        let (session, wire, server) = connected().await;
        drop(server);
        let (_control, watched) = watch::channel(false);
        assert_eq!(session.hold(wire, watched).await.as_deref(), Some("eof"));
    }
}
