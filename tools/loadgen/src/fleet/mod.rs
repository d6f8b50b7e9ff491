//! A fleet of SignalR connections held by this process, and what they receive.
//!
//! Each connection is one task: it binds a loopback source address, upgrades, shakes hands,
//! joins its group, then reads frames, pings every 10 s (stateful connections also acknowledge
//! what arrived every second) and counts each stamped delivery in a
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
//!
//! `Fleet` (here) opens the connections and collects their tallies; `session` is one
//! connection's life (connect, handshake, join, hold); `wire` is its socket and the bytes it has
//! not used yet.

mod session;
mod wire;

#[cfg(test)]
mod tests;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use anyhow::Context as _;
use hdrhistogram::Histogram;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde::{Deserialize, Serialize};
use tokio::sync::{Semaphore, mpsc, watch};
use tokio::task::JoinSet;
use tokio::time::{Instant, MissedTickBehavior, interval, sleep_until, timeout};

use crate::cli::Endpoint;
use crate::tally::{self, Ledger, StepTally};

use self::session::Session;

/// Ledger shards; a connection always uses the same one.
const SHARDS: usize = 16;

/// How often each connection sends a ping (the server closes after 30 s of silence).
const PING_EVERY: Duration = Duration::from_secs(10);

/// How often a stateful connection acknowledges what it received, as the official client does.
const ACK_EVERY: Duration = Duration::from_secs(1);

/// Ping cohorts: connection i is in cohort i mod COHORTS, and one cohort pings every
/// PING_EVERY / COHORTS, so the pings of thousands of connections are spread out.
const COHORTS: usize = 100;

/// How long `Fleet::close` waits for all connection tasks to end.
const STOP_TIMEOUT: Duration = Duration::from_secs(15);

/// Period of the timer that measures this process's runtime lag.
const LAG_PROBE_EVERY: Duration = Duration::from_millis(5);

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
    /// Negotiate stateful reconnect and acknowledge deliveries (see `--stateful`).
    pub(crate) stateful: bool,
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
    /// The HTTP client stateful connections negotiate with.
    negotiate: Option<reqwest::Client>,
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
            negotiate: config.stateful.then(reqwest::Client::new),
        });
        let key = EncodingKey::from_secret(config.jwt_secret.as_bytes());
        let (stop, stopped) = watch::channel(false);
        let cohorts: Arc<[watch::Sender<bool>]> =
            (0..COHORTS).map(|_| watch::Sender::new(false)).collect();
        let permits = Arc::new(Semaphore::new(config.concurrency));
        let (ready_tx, mut ready_rx) = mpsc::channel(1024);
        let mut tasks = JoinSet::new();
        let signal_every = if config.stateful {
            ACK_EVERY
        } else {
            PING_EVERY
        };
        tasks.spawn(drive_cohorts(
            Arc::clone(&cohorts),
            signal_every,
            stopped.clone(),
        ));
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

/// Signals one cohort after another, so that each connection is signalled every `every`
/// (PING_EVERY, or ACK_EVERY for stateful connections, which then ping every tenth signal),
/// until stopped.
async fn drive_cohorts(
    cohorts: Arc<[watch::Sender<bool>]>,
    every: Duration,
    mut stopped: watch::Receiver<bool>,
) {
    let mut tick = interval(every / COHORTS as u32);
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
