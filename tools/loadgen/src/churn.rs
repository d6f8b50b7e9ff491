//! `loadgen churn`: the soak's load. A stable population that must lose nothing, a steady
//! publish stream, and hostile connection churn around them; bounded in count and time.
//!
//! Phases, each bounded: the stable population connects (spread over the `--urls`, each
//! connection in group `soak-(i mod G)`), then the publisher starts (`--publish-rate` events/s
//! into Redis through `publisher_lib::Publisher`, round-robin over the groups, each receipt's
//! position remembered), then after `--warmup-secs` the churn runs for `--secs`: every second
//! `--churn-rate` new connections, each joining a group and ending by one of the [`Kind`]s
//! (clean close, TCP reset, drop without a close frame, or one of the hostile inputs of issue
//! 11). Churn stops; the publisher and the stable population carry on through `--settle-secs`
//! and `--hold-secs` (a soak script samples the gateways then); then publishing stops, the
//! stable clients get `--drain-secs` to receive the rest, and each is checked against the
//! publisher's receipts: every event once and in order (positions `{group,epoch,seq}`, the
//! second argument of every event frame).
//!
//! With `--marker-dir`, empty files `ready`, `churn-started`, `churn-stopped` and `settled`
//! mark the phases for a driving script. The summary is one JSON object on stdout; progress goes
//! to stderr once a minute. The exit status is non-zero when a stable client lost, repeated or
//! reordered an event, saw a new epoch, or was disconnected. Loopback targets only.
//!
//! ```text
//! loadgen churn --urls http://127.0.0.1:8081,http://127.0.0.1:8082 --redis-url redis://127.0.0.1:6390 \
//!     --jwt-secret S --stable 300 --groups 10 --publish-rate 50 --churn-rate 200 --secs 60
//! ```

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use anyhow::{Context as _, bail, ensure};
use clap::Args;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use nix::sys::socket::{setsockopt, sockopt::IpBindAddressNoPort};
use publisher_lib::contract::{Event, RecommendationReady};
use publisher_lib::{Publisher, PublisherConfig};
use serde::de::IgnoredAny;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinSet;
use tokio::time::{Instant, MissedTickBehavior, interval, sleep, timeout};
use uuid::Uuid;

use crate::cli::Endpoint;
use crate::ws;

/// Longest churn phase accepted (`--secs`), so a typo cannot run for days.
const MAX_CHURN_SECS: u64 = 4 * 3600;

/// How long one stable connection may take to connect, shake hands and join.
const STABLE_CONNECT_TIMEOUT: Duration = Duration::from_secs(15);

/// Stable connections connecting at once.
const STABLE_CONNECT_CONCURRENCY: usize = 100;

/// Stable clients send a SignalR ping this often (the gateway's client timeout is 30 s).
const STABLE_PING_EVERY: Duration = Duration::from_secs(10);

/// Bound on one churn connection's whole life; past it the task is dropped and counted.
const CHURN_LIFETIME: Duration = Duration::from_secs(30);

/// How long a churn connection waits for the server's answer to what it sent.
const ANSWER_WAIT: Duration = Duration::from_secs(5);

/// Longest a joined churn connection stays before it ends (uniform from zero).
const MAX_DWELL_MS: u64 = 2000;

/// How long a half-sent upgrade or handshake is held before the client drops it: longer than
/// the gateway's default header-read (10 s) and handshake (15 s) timeouts, so the outcome
/// says whether the server bounds them.
const HALF_HOLD: Duration = Duration::from_secs(20);

/// WebSocket pings the `ping-flood` kind sends without reading anything.
const FLOOD_PINGS: usize = 2000;

/// Receive buffer of a `ping-flood` connection, so the server's pongs back up quickly.
const FLOOD_RECV_BUFFER: u32 = 4096;

/// How long `ping-flood` keeps sending and not reading before it resets the connection:
/// longer than the gateway's default write timeout (10 s), so the outcome says whether the
/// server closed it.
const FLOOD_HOLD: Duration = Duration::from_secs(15);

/// After the burst, `ping-flood` sends one more ping this often (a failed send shows that the
/// server closed the connection).
const FLOOD_TRICKLE: Duration = Duration::from_millis(200);

/// Size of the `oversized` kind's text message: above any sensible `--max-message-size`.
const OVERSIZED_BYTES: usize = 256 * 1024;

/// Largest frame payload the tool reads from the gateway (history backlogs arrive as many
/// frames, each one small).
const READ_RESERVE: usize = 4096;

/// Source addresses used to spread connections: 127.0.0.2 ..= 127.0.0.254.
const SOURCE_HOSTS: std::ops::RangeInclusive<u8> = 2..=254;

/// The overflow probe of issue 11: a text frame with FIN clear and one masked byte...
const OVERFLOW_FIRST: [u8; 7] = [0x01, 0x81, 0, 0, 0, 0, 0x78];

/// ...then a continuation frame whose 64-bit length is `u64::MAX`.
const OVERFLOW_SECOND: [u8; 14] = [
    0x80, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0, 0, 0, 0,
];

/// Stable clients, a publish stream and hostile churn against gateways (loopback only).
#[derive(Debug, Args)]
pub(crate) struct ChurnArgs {
    /// Public listeners to spread connections over (comma-separated http:// URLs).
    #[arg(long, value_delimiter = ',', default_value = "http://127.0.0.1:8080")]
    pub(crate) urls: Vec<String>,
    /// HS256 secret the gateways verify tokens with.
    #[arg(long, env = "LOADGEN_JWT_SECRET", hide_env_values = true)]
    pub(crate) jwt_secret: String,
    /// Redis the gateways subscribe to; the publisher writes there (loopback only).
    #[arg(long)]
    pub(crate) redis_url: String,
    /// Channel prefix (the gateways' GATEWAY_REDIS_PREFIX).
    #[arg(long, default_value = publisher_lib::DEFAULT_PREFIX)]
    pub(crate) prefix: String,
    /// Origin header to send on upgrades (none by default).
    #[arg(long)]
    pub(crate) origin: Option<String>,
    /// Stable connections: they stay from start to end and check every event.
    #[arg(long, default_value_t = 300)]
    pub(crate) stable: usize,
    /// Groups (regions soak-0, soak-1, ...); stable connection i joins group i mod G.
    #[arg(long, default_value_t = 10)]
    pub(crate) groups: usize,
    /// Events published per second over all groups.
    #[arg(long, default_value_t = 50)]
    pub(crate) publish_rate: u32,
    /// New churn connections per second.
    #[arg(long, default_value_t = 200)]
    pub(crate) churn_rate: u32,
    /// Share of churn connections that end abruptly (half TCP reset, half dropped without a
    /// close frame).
    #[arg(long, default_value_t = 0.3)]
    pub(crate) abrupt_share: f64,
    /// Share of churn connections that send one of the hostile inputs.
    #[arg(long, default_value_t = 0.2)]
    pub(crate) hostile_share: f64,
    /// Hostile kinds to use (comma-separated; default: all).
    #[arg(long, value_delimiter = ',')]
    pub(crate) hostile_kinds: Vec<String>,
    /// Re-joins with an old position in the one message of the `rejoin-old` kind.
    #[arg(long, default_value_t = 20)]
    pub(crate) rejoins: usize,
    /// Churn connections alive at once, at most; ticks past it are counted as skipped.
    #[arg(long, default_value_t = 2000)]
    pub(crate) max_inflight: usize,
    /// Seconds between the stable population being ready and the churn starting.
    #[arg(long, default_value_t = 10)]
    pub(crate) warmup_secs: u64,
    /// Seconds of churn.
    #[arg(long, default_value_t = 60)]
    pub(crate) secs: u64,
    /// Seconds after the churn (publishing goes on) before the `settled` marker.
    #[arg(long, default_value_t = 60)]
    pub(crate) settle_secs: u64,
    /// Seconds the stable population and the publisher stay after `settled`.
    #[arg(long, default_value_t = 15)]
    pub(crate) hold_secs: u64,
    /// Seconds the stable clients get to receive the last events after publishing stops.
    #[arg(long, default_value_t = 5)]
    pub(crate) drain_secs: u64,
    /// Directory for the phase marker files.
    #[arg(long)]
    pub(crate) marker_dir: Option<PathBuf>,
}

/// How a churn connection ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Kind {
    /// Joins, stays a moment, sends a close frame and waits for the server's.
    Clean,
    /// Joins, stays a moment, resets the TCP connection (linger 0).
    Reset,
    /// Joins, stays a moment, closes the socket without a close frame.
    Drop,
    /// Joins, then the frame-length overflow probe of issue 11.
    Overflow,
    /// Joins, then one text message far above the size limit.
    Oversized,
    /// Joins, then an unmasked client frame.
    Unmasked,
    /// Joins, then bytes that are no WebSocket frame.
    Garbage,
    /// Sends half the HTTP upgrade request, holds, drops.
    HalfUpgrade,
    /// Upgrades, sends half the SignalR handshake, holds, drops.
    HalfHandshake,
    /// Joins, then re-joins many times in one message with an old position.
    RejoinOld,
    /// Joins, then re-joins with a position far ahead of the group's head.
    ForgedPosition,
    /// Joins, then sends pings and never reads, then resets.
    PingFlood,
}

impl Kind {
    const HOSTILE: [Self; 9] = [
        Self::Overflow,
        Self::Oversized,
        Self::Unmasked,
        Self::Garbage,
        Self::HalfUpgrade,
        Self::HalfHandshake,
        Self::RejoinOld,
        Self::ForgedPosition,
        Self::PingFlood,
    ];

    fn label(self) -> &'static str {
        match self {
            Self::Clean => "clean",
            Self::Reset => "reset",
            Self::Drop => "drop",
            Self::Overflow => "overflow",
            Self::Oversized => "oversized",
            Self::Unmasked => "unmasked",
            Self::Garbage => "garbage",
            Self::HalfUpgrade => "half-upgrade",
            Self::HalfHandshake => "half-handshake",
            Self::RejoinOld => "rejoin-old",
            Self::ForgedPosition => "forged-position",
            Self::PingFlood => "ping-flood",
        }
    }

    fn from_label(label: &str) -> Option<Self> {
        Self::HOSTILE.into_iter().find(|k| k.label() == label)
    }
}

/// Runs `loadgen churn`.
pub(crate) async fn main(args: ChurnArgs) -> std::process::ExitCode {
    let limit = Duration::from_secs(
        args.warmup_secs
            .saturating_add(args.secs)
            .saturating_add(args.settle_secs)
            .saturating_add(args.hold_secs)
            .saturating_add(args.drain_secs)
            .saturating_add(180),
    );
    match timeout(limit, run(args)).await {
        Ok(Ok(true)) => std::process::ExitCode::SUCCESS,
        Ok(Ok(false)) => std::process::ExitCode::FAILURE,
        Ok(Err(e)) => {
            eprintln!("loadgen churn: {e:#}");
            std::process::ExitCode::FAILURE
        }
        Err(_) => {
            eprintln!("loadgen churn: hard deadline ({limit:?}) reached; giving up");
            std::process::ExitCode::FAILURE
        }
    }
}

/// Everything the run needs, validated.
struct Plan {
    targets: Vec<SocketAddr>,
    key: EncodingKey,
    origin: Option<String>,
    groups: usize,
    hostile: Vec<Kind>,
    rejoins: usize,
}

impl Plan {
    fn region(g: usize) -> String {
        format!("soak-{g}")
    }

    fn target(&self, n: usize) -> SocketAddr {
        self.targets[n % self.targets.len()]
    }

    fn token(&self, subject: &str, g: usize) -> Result<String, String> {
        #[derive(Serialize)]
        struct Claims<'a> {
            sub: &'a str,
            role: &'a str,
            regions: [String; 1],
            exp: i64,
        }
        let claims = Claims {
            sub: subject,
            role: "dispatcher",
            regions: [Self::region(g)],
            exp: chrono::Utc::now().timestamp() + 6 * 3600,
        };
        jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &self.key)
            .map_err(|e| format!("token: {e}"))
    }
}

fn validate(args: &ChurnArgs) -> anyhow::Result<Plan> {
    ensure!(!args.urls.is_empty(), "--urls is empty");
    let mut targets = Vec::new();
    for url in &args.urls {
        targets.push(Endpoint::try_loopback(url)?.addr);
    }
    let redis = reqwest::Url::parse(&args.redis_url).context("--redis-url is not a URL")?;
    match redis.host_str() {
        Some("127.0.0.1" | "localhost" | "[::1]" | "::1") => {}
        other => bail!("--redis-url must point to loopback, not {other:?}"),
    }
    ensure!(args.groups >= 1, "--groups must be at least 1");
    ensure!(args.publish_rate >= 1, "--publish-rate must be at least 1");
    ensure!(
        args.secs <= MAX_CHURN_SECS,
        "--secs must be at most {MAX_CHURN_SECS}"
    );
    ensure!(
        (0.0..=1.0).contains(&args.abrupt_share)
            && (0.0..=1.0).contains(&args.hostile_share)
            && args.abrupt_share + args.hostile_share <= 1.0,
        "--abrupt-share and --hostile-share must be within 0..=1 and add up to at most 1"
    );
    ensure!(args.max_inflight >= 1, "--max-inflight must be at least 1");
    let hostile = if args.hostile_kinds.is_empty() {
        Kind::HOSTILE.to_vec()
    } else {
        let mut kinds = Vec::new();
        for label in &args.hostile_kinds {
            kinds.push(Kind::from_label(label).with_context(|| {
                let known: Vec<_> = Kind::HOSTILE.iter().map(|k| k.label()).collect();
                format!(
                    "unknown hostile kind {label:?} (known: {})",
                    known.join(", ")
                )
            })?);
        }
        kinds
    };
    Ok(Plan {
        targets,
        key: EncodingKey::from_secret(args.jwt_secret.as_bytes()),
        origin: args.origin.clone(),
        groups: args.groups,
        hostile,
        rejoins: args.rejoins.max(1),
    })
}

async fn run(args: ChurnArgs) -> anyhow::Result<bool> {
    let plan = Arc::new(validate(&args)?);
    if let Err(e) = crate::host::raise_nofile_limit() {
        eprintln!("loadgen churn: could not raise the descriptor limit: {e:#}");
    }
    if let Some(dir) = &args.marker_dir {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let started = Instant::now();

    // The stable population.
    let (stop_stable, stable_stopped) = watch::channel(false);
    let permits = Arc::new(Semaphore::new(STABLE_CONNECT_CONCURRENCY));
    let mut stable_tasks = JoinSet::new();
    let (ready_tx, mut ready_rx) = tokio::sync::mpsc::channel(args.stable.max(1));
    for i in 0..args.stable {
        let plan = Arc::clone(&plan);
        let permits = Arc::clone(&permits);
        let ready = ready_tx.clone();
        let stopped = stable_stopped.clone();
        stable_tasks.spawn(async move { stable_client(plan, i, permits, ready, stopped).await });
    }
    drop(ready_tx);
    let mut connect_failures: BTreeMap<String, u64> = BTreeMap::new();
    let mut connected = 0_u64;
    while let Some(outcome) = ready_rx.recv().await {
        match outcome {
            Ok(()) => connected += 1,
            Err(reason) => *connect_failures.entry(reason).or_default() += 1,
        }
    }
    progress(&serde_json::json!({
        "phase": "ready", "stable": connected, "failed": connect_failures,
        "secs": started.elapsed().as_secs(),
    }));
    mark(&args, "ready");

    // The publisher.
    let publisher = Publisher::new(
        PublisherConfig::new(args.redis_url.clone()).with_prefix(args.prefix.clone()),
    )
    .context("creating the Redis publisher")?;
    let (stop_publishing, publishing_stopped) = watch::channel(false);
    let publisher_task = tokio::spawn(publish(
        publisher,
        args.groups,
        args.publish_rate,
        publishing_stopped,
    ));

    sleep(Duration::from_secs(args.warmup_secs)).await;

    // The churn.
    mark(&args, "churn-started");
    let tally = Arc::new(ChurnTally::default());
    churn(&args, &plan, &tally, started).await;
    mark(&args, "churn-stopped");
    progress(&serde_json::json!({
        "phase": "churn-stopped", "secs": started.elapsed().as_secs(), "churn": tally.snapshot(),
    }));

    sleep(Duration::from_secs(args.settle_secs)).await;
    mark(&args, "settled");
    progress(&serde_json::json!({ "phase": "settled", "secs": started.elapsed().as_secs() }));
    sleep(Duration::from_secs(args.hold_secs)).await;

    // Publishing stops; the stable clients receive the rest, then report.
    let _ = stop_publishing.send(true);
    let published = publisher_task.await.context("the publisher task failed")?;
    sleep(Duration::from_secs(args.drain_secs)).await;
    let _ = stop_stable.send(true);
    let mut reports = Vec::new();
    while let Some(joined) = stable_tasks.join_next().await {
        if let Ok(Some(report)) = joined {
            reports.push(report);
        }
    }

    let stable = StableSummary::from_reports(&reports, &published, connected, connect_failures);
    let ok = stable.is_clean(args.stable);
    let summary = serde_json::json!({
        "ok": ok,
        "secs": started.elapsed().as_secs(),
        "stable": stable,
        "publisher": published.summary(),
        "churn": tally.snapshot(),
        "setting": {
            "urls": args.urls, "stable": args.stable, "groups": args.groups,
            "publishRate": args.publish_rate, "churnRate": args.churn_rate,
            "abruptShare": args.abrupt_share, "hostileShare": args.hostile_share,
            "hostileKinds": plan.hostile.iter().map(|k| k.label()).collect::<Vec<_>>(),
            "churnSecs": args.secs,
        },
    });
    emit(&summary)?;
    Ok(ok)
}

/// Writes the empty marker file `name` in `--marker-dir`, if one was given.
fn mark(args: &ChurnArgs, name: &str) {
    if let Some(dir) = &args.marker_dir
        && let Err(e) = std::fs::write(dir.join(name), b"")
    {
        eprintln!("loadgen churn: marker {name}: {e}");
    }
}

fn progress(line: &serde_json::Value) {
    eprintln!("{}", serde_json::json!({ "progress": line }));
}

#[allow(clippy::print_stdout)] // The summary on stdout is the mode's output.
fn emit(summary: &serde_json::Value) -> anyhow::Result<()> {
    println!("{summary}");
    Ok(())
}

// === the publisher ===

/// What the publisher got back, per group.
#[derive(Debug, Default)]
struct Published {
    /// Accepted publishes (not duplicates) per group.
    accepted: Vec<u64>,
    /// Epochs seen in receipts per group, in order of first appearance.
    epochs: Vec<Vec<String>>,
    /// Failed publishes by error.
    failed: BTreeMap<String, u64>,
}

impl Published {
    fn summary(&self) -> serde_json::Value {
        serde_json::json!({
            "accepted": self.accepted.iter().sum::<u64>(),
            "perGroup": self.accepted,
            "epochChanges": self.epochs.iter().map(|e| e.len().saturating_sub(1)).sum::<usize>(),
            "failed": self.failed,
        })
    }
}

/// Publishes round-robin over the groups at `rate` per second until stopped.
async fn publish(
    publisher: Publisher,
    groups: usize,
    rate: u32,
    mut stopped: watch::Receiver<bool>,
) -> Published {
    let mut out = Published {
        accepted: vec![0; groups],
        epochs: vec![Vec::new(); groups],
        failed: BTreeMap::new(),
    };
    let mut tick = interval(Duration::from_secs_f64(1.0 / f64::from(rate)));
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    for n in 0_usize.. {
        tokio::select! {
            biased;
            _ = stopped.changed() => break,
            _ = tick.tick() => {}
        }
        let g = n % groups;
        let event = Event::RecommendationReady(RecommendationReady {
            job_id: Uuid::new_v4(),
            request_id: Uuid::new_v4(),
            region: Plan::region(g),
            config_version: 1,
            generated_at: chrono::Utc::now(),
        });
        match publisher.publish(&event).await {
            Ok(receipt) => {
                for delivery in receipt.deliveries.iter().filter(|d| !d.duplicate) {
                    out.accepted[g] += 1;
                    let epochs = &mut out.epochs[g];
                    if epochs.last() != Some(&delivery.position.epoch) {
                        epochs.push(delivery.position.epoch.clone());
                    }
                }
            }
            Err(e) => *out.failed.entry(e.to_string()).or_default() += 1,
        }
    }
    out
}

// === the stable population ===

/// What one stable client saw.
#[derive(Debug, Default)]
struct StableReport {
    group: usize,
    /// Distinct events received.
    unique: u64,
    duplicates: u64,
    reordered: u64,
    /// Epochs after the first.
    epoch_changes: u64,
    /// Why the server or network ended it early, if it did.
    ended: Option<String>,
}

/// Seen positions of one epoch: a bitmap from the first seq received.
#[derive(Debug, Default)]
struct Seen {
    first: u64,
    highest: u64,
    bits: Vec<u64>,
    /// Seqs received below `first`.
    below: BTreeSet<u64>,
}

impl Seen {
    /// Records `seq`; returns whether it was new, and whether it came after a higher one.
    fn observe(&mut self, seq: u64) -> (bool, bool) {
        if self.bits.is_empty() && self.below.is_empty() && self.highest == 0 {
            self.first = seq;
        }
        let late = seq < self.highest;
        self.highest = self.highest.max(seq);
        if seq < self.first {
            return (self.below.insert(seq), true);
        }
        let Ok(at) = usize::try_from(seq - self.first) else {
            return (false, late);
        };
        let (word, bit) = (at / 64, at % 64);
        if self.bits.len() <= word {
            self.bits.resize(word + 1, 0);
        }
        let new = self.bits[word] & (1 << bit) == 0;
        self.bits[word] |= 1 << bit;
        (new, late && new)
    }
}

/// Checks a stream of positions: each event once and in order.
#[derive(Debug, Default)]
struct Verifier {
    epochs: HashMap<String, Seen>,
    last_epoch: Option<String>,
    report: StableReport,
}

impl Verifier {
    fn observe(&mut self, epoch: &str, seq: u64) {
        if self.last_epoch.as_deref() != Some(epoch) {
            if self.last_epoch.is_some() {
                self.report.epoch_changes += 1;
            }
            self.last_epoch = Some(epoch.to_owned());
        }
        let seen = self.epochs.entry(epoch.to_owned()).or_default();
        let (new, reordered) = seen.observe(seq);
        if new {
            self.report.unique += 1;
        } else {
            self.report.duplicates += 1;
        }
        if reordered {
            self.report.reordered += 1;
        }
    }
}

/// One stable client: connects, joins, reports ready, then checks every event until stopped.
async fn stable_client(
    plan: Arc<Plan>,
    i: usize,
    permits: Arc<Semaphore>,
    ready: tokio::sync::mpsc::Sender<Result<(), String>>,
    mut stopped: watch::Receiver<bool>,
) -> Option<StableReport> {
    let group = i % plan.groups;
    let connecting = async {
        let _permit = permits.acquire().await.map_err(|_| "closed".to_owned())?;
        let token = plan.token(&format!("soak-stable-{i}"), group)?;
        let mut conn = Conn::open(&plan, plan.target(i), i, &token).await?;
        conn.join(group, None, "1").await?;
        Ok::<_, String>(conn)
    };
    let mut conn = match timeout(STABLE_CONNECT_TIMEOUT, connecting).await {
        Ok(Ok(conn)) => conn,
        Ok(Err(reason)) => {
            let _ = ready.send(Err(reason)).await;
            return None;
        }
        Err(_) => {
            let _ = ready.send(Err("connect timed out".to_owned())).await;
            return None;
        }
    };
    let _ = ready.send(Ok(())).await;
    drop(ready);
    let mut verifier = Verifier {
        report: StableReport {
            group,
            ..StableReport::default()
        },
        ..Verifier::default()
    };
    let mut ping = interval(STABLE_PING_EVERY);
    ping.set_missed_tick_behavior(MissedTickBehavior::Delay);
    ping.tick().await;
    loop {
        tokio::select! {
            _ = stopped.changed() => {
                let _ = timeout(Duration::from_secs(1), conn.send(ws::OPCODE_CLOSE, &[])).await;
                break;
            }
            _ = ping.tick() => {
                if let Err(e) = conn.send_text(PING).await {
                    verifier.report.ended = Some(format!("ping: io {:?}", e.kind()));
                    break;
                }
            }
            message = conn.receive() => match message {
                Ok(Message::Text(text)) => {
                    for record in records(&text) {
                        if let Ok(Record { arguments: Some((_, position)), .. }) =
                            serde_json::from_str::<Record>(record)
                        {
                            verifier.observe(&position.epoch, position.seq);
                        } else if record.contains("\"type\":7") {
                            verifier.report.ended = Some(format!("server close: {record}"));
                        }
                    }
                    if verifier.report.ended.is_some() {
                        break;
                    }
                }
                Ok(Message::Ping(payload)) => {
                    if let Err(e) = conn.send(ws::OPCODE_PONG, &payload).await {
                        verifier.report.ended = Some(format!("pong: io {:?}", e.kind()));
                        break;
                    }
                }
                Ok(Message::Close(code)) => {
                    verifier.report.ended = Some(format!("websocket close {code:?}"));
                    break;
                }
                Ok(Message::Other) => {}
                Err(reason) => {
                    verifier.report.ended = Some(reason);
                    break;
                }
            },
        }
    }
    Some(verifier.report)
}

/// The stable population's verdict.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct StableSummary {
    connected: u64,
    connect_failures: BTreeMap<String, u64>,
    /// Events the publisher had accepted for the stable clients' groups, times members.
    expected: u64,
    delivered: u64,
    lost: u64,
    duplicates: u64,
    reordered: u64,
    epoch_changes: u64,
    /// Clients the server or network disconnected, by reason.
    ended: BTreeMap<String, u64>,
}

impl StableSummary {
    fn from_reports(
        reports: &[StableReport],
        published: &Published,
        connected: u64,
        connect_failures: BTreeMap<String, u64>,
    ) -> Self {
        let mut summary = Self {
            connected,
            connect_failures,
            expected: 0,
            delivered: 0,
            lost: 0,
            duplicates: 0,
            reordered: 0,
            epoch_changes: 0,
            ended: BTreeMap::new(),
        };
        for report in reports {
            summary.duplicates += report.duplicates;
            summary.reordered += report.reordered;
            summary.epoch_changes += report.epoch_changes;
            if let Some(reason) = &report.ended {
                // A client cut off early is counted here, not as losing what came after.
                *summary.ended.entry(shorten(reason)).or_default() += 1;
                continue;
            }
            let expected = published.accepted.get(report.group).copied().unwrap_or(0);
            summary.expected += expected;
            summary.delivered += report.unique;
            summary.lost += expected.saturating_sub(report.unique);
        }
        summary
    }

    fn is_clean(&self, wanted: usize) -> bool {
        self.connected == wanted as u64
            && self.lost == 0
            && self.duplicates == 0
            && self.reordered == 0
            && self.epoch_changes == 0
            && self.ended.is_empty()
    }
}

fn shorten(reason: &str) -> String {
    reason.chars().take(120).collect()
}

// === the churn ===

/// Churn counts: per kind, started and each outcome.
#[derive(Debug, Default)]
struct ChurnTally {
    counts: Mutex<BTreeMap<&'static str, BTreeMap<String, u64>>>,
    skipped: AtomicU64,
}

impl ChurnTally {
    fn record(&self, kind: Kind, outcome: &str) {
        let mut counts = self.counts.lock().unwrap_or_else(PoisonError::into_inner);
        let per_kind = counts.entry(kind.label()).or_default();
        *per_kind.entry(shorten(outcome)).or_default() += 1;
    }

    fn snapshot(&self) -> serde_json::Value {
        let counts = self.counts.lock().unwrap_or_else(PoisonError::into_inner);
        let total: u64 = counts.values().flat_map(|m| m.values()).sum();
        serde_json::json!({
            "total": total,
            "skippedAtInflightBound": self.skipped.load(Ordering::Relaxed),
            "byKind": *counts,
        })
    }
}

/// Starts `--churn-rate` connections a second for `--secs`, then waits for them to end.
async fn churn(args: &ChurnArgs, plan: &Arc<Plan>, tally: &Arc<ChurnTally>, started: Instant) {
    let mut tasks = JoinSet::new();
    if args.churn_rate > 0 && args.secs > 0 {
        let end = Instant::now() + Duration::from_secs(args.secs);
        let mut tick = interval(Duration::from_secs_f64(1.0 / f64::from(args.churn_rate)));
        tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut report_at = Instant::now() + Duration::from_secs(60);
        let mut rng = Rng::new();
        let mut n = args.stable;
        while Instant::now() < end {
            tick.tick().await;
            while tasks.try_join_next().is_some() {}
            if tasks.len() >= args.max_inflight {
                tally.skipped.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            let kind = pick(&mut rng, args, &plan.hostile);
            let (task_plan, task_tally) = (Arc::clone(plan), Arc::clone(tally));
            let seed = rng.next();
            n += 1;
            tasks.spawn(async move {
                let (plan, tally) = (task_plan, task_tally);
                let outcome = match timeout(CHURN_LIFETIME, churn_one(&plan, n, kind, seed)).await {
                    Ok(Ok(outcome)) => outcome,
                    Ok(Err(reason)) => reason,
                    Err(_) => "lifetime exceeded".to_owned(),
                };
                tally.record(kind, &outcome);
            });
            if Instant::now() >= report_at {
                report_at += Duration::from_secs(60);
                progress(&serde_json::json!({
                    "phase": "churn", "secs": started.elapsed().as_secs(),
                    "inflight": tasks.len(), "churn": tally.snapshot(),
                }));
            }
        }
    }
    // Every task ends within CHURN_LIFETIME; the bound is a second line.
    let all = async { while tasks.join_next().await.is_some() {} };
    if timeout(CHURN_LIFETIME + Duration::from_secs(5), all)
        .await
        .is_err()
    {
        tasks.abort_all();
    }
}

fn pick(rng: &mut Rng, args: &ChurnArgs, hostile: &[Kind]) -> Kind {
    let roll = rng.unit();
    if roll < args.hostile_share && !hostile.is_empty() {
        hostile[rng.below(hostile.len())]
    } else if roll < args.hostile_share + args.abrupt_share {
        if rng.below(2) == 0 {
            Kind::Reset
        } else {
            Kind::Drop
        }
    } else {
        Kind::Clean
    }
}

/// One churn connection; `Ok` carries the outcome label, `Err` why it could not get as far as
/// its kind needs (also a label).
async fn churn_one(plan: &Plan, n: usize, kind: Kind, seed: u64) -> Result<String, String> {
    let mut rng = Rng::from_seed(seed);
    let group = rng.below(plan.groups);
    let token = plan.token(&format!("soak-churn-{n}"), group)?;
    let target = plan.target(n);
    match kind {
        Kind::HalfUpgrade => {
            let mut stream = connect_tcp(target, n, None).await?;
            let request = ws::upgrade_request(
                &target.to_string(),
                &format!("/hub/v1?access_token={token}"),
                &ws::client_key(*Uuid::new_v4().as_bytes()),
                plan.origin.as_deref(),
            )?;
            let half = &request.as_bytes()[..request.len() / 2];
            stream.write_all(half).await.map_err(io("send"))?;
            return Ok(hold_then_drop(stream, HALF_HOLD).await);
        }
        Kind::HalfHandshake => {
            let conn = Conn::upgrade(plan, target, n, &token).await?;
            let mut stream = conn.stream;
            let half = ws::client_frame(ws::OPCODE_TEXT, b"{\"protocol\":\"json\",", conn.mask);
            stream.write_all(&half).await.map_err(io("send"))?;
            return Ok(hold_then_drop(stream, HALF_HOLD).await);
        }
        _ => {}
    }
    let mut conn = Conn::open(plan, target, n, &token).await?;
    let joined = conn.join(group, None, "1").await?;
    match kind {
        Kind::Clean | Kind::Reset | Kind::Drop => {
            let dwell = Duration::from_millis(rng.below(MAX_DWELL_MS as usize + 1) as u64);
            let _ = timeout(dwell, conn.discard_until_closed()).await;
            match kind {
                Kind::Clean => {
                    conn.send(ws::OPCODE_CLOSE, &1000_u16.to_be_bytes())
                        .await
                        .map_err(io("close"))?;
                    Ok(conn.await_answer().await)
                }
                Kind::Reset => {
                    conn.stream.set_zero_linger().map_err(io("linger"))?;
                    Ok("reset".to_owned())
                }
                _ => Ok("dropped".to_owned()),
            }
        }
        Kind::Overflow => {
            conn.stream
                .write_all(&OVERFLOW_FIRST)
                .await
                .map_err(io("send"))?;
            let _ = conn.stream.write_all(&OVERFLOW_SECOND).await;
            Ok(conn.await_answer().await)
        }
        Kind::Oversized => {
            let mut message = vec![b' '; OVERSIZED_BYTES];
            message.push(0x1e);
            let _ = conn.send(ws::OPCODE_TEXT, &message).await;
            Ok(conn.await_answer().await)
        }
        Kind::Unmasked => {
            let ping = PING.as_bytes();
            let mut frame = vec![0x81, ping.len() as u8];
            frame.extend_from_slice(ping);
            conn.stream.write_all(&frame).await.map_err(io("send"))?;
            Ok(conn.await_answer().await)
        }
        Kind::Garbage => {
            let garbage: Vec<u8> = (0..256).map(|_| rng.next() as u8).collect();
            let _ = conn.stream.write_all(&garbage).await;
            Ok(conn.await_answer().await)
        }
        Kind::RejoinOld => {
            let region = Plan::region(group);
            let old = format!(
                "{{\"epoch\":\"{}\",\"seq\":1}}",
                joined.map(|p| p.epoch).unwrap_or_default()
            );
            let mut text = String::new();
            for i in 0..plan.rejoins {
                text.push_str(&join_record(&region, Some(&old), &format!("r{i}")));
            }
            conn.send_text(&text).await.map_err(io("send"))?;
            let _ = timeout(Duration::from_secs(2), conn.discard_until_closed()).await;
            let _ = conn.send(ws::OPCODE_CLOSE, &1000_u16.to_be_bytes()).await;
            Ok(conn.await_answer().await)
        }
        Kind::ForgedPosition => {
            let region = Plan::region(group);
            let forged = format!(
                "{{\"epoch\":\"{}\",\"seq\":999999999}}",
                joined.map(|p| p.epoch).unwrap_or_default()
            );
            let result = conn.join_raw(&region, Some(&forged), "2").await?;
            let recovered = result.and_then(|p| p.recovered);
            let _ = conn.send(ws::OPCODE_CLOSE, &1000_u16.to_be_bytes()).await;
            let answer = conn.await_answer().await;
            Ok(format!("recovered {recovered:?}, {answer}"))
        }
        Kind::PingFlood => {
            // A connection of its own with a small receive buffer, so that pongs back up.
            drop(conn);
            let mut conn =
                Conn::open_with(plan, target, n, &token, Some(FLOOD_RECV_BUFFER)).await?;
            conn.join(group, None, "1").await?;
            let outcome = match timeout(FLOOD_HOLD, flood_pings(&mut conn)).await {
                Err(_) => "held until the client reset it".to_owned(),
                Ok(e) => format!("server closed (send failed: {:?})", e.kind()),
            };
            conn.stream.set_zero_linger().map_err(io("linger"))?;
            Ok(outcome)
        }
        Kind::HalfUpgrade | Kind::HalfHandshake => Ok("unreachable".to_owned()),
    }
}

/// Sends `FLOOD_PINGS` pings at once, then one every `FLOOD_TRICKLE`, never reading; returns
/// the error that ended the sending (only the caller's timeout ends it otherwise).
async fn flood_pings(conn: &mut Conn) -> std::io::Error {
    let payload = [b'p'; 125];
    for _ in 0..FLOOD_PINGS {
        if let Err(e) = conn.send(ws::OPCODE_PING, &payload).await {
            return e;
        }
    }
    loop {
        sleep(FLOOD_TRICKLE).await;
        if let Err(e) = conn.send(ws::OPCODE_PING, &payload).await {
            return e;
        }
    }
}

/// Holds a socket for `hold` (noting whether the server closed it first), then drops it.
async fn hold_then_drop(mut stream: TcpStream, hold: Duration) -> String {
    let mut buf = [0_u8; 1024];
    let read_to_end = async {
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    };
    match timeout(hold, read_to_end).await {
        Ok(()) => "server closed".to_owned(),
        Err(_) => "held, client dropped".to_owned(),
    }
}

fn io(what: &'static str) -> impl Fn(std::io::Error) -> String {
    move |e| format!("{what}: io {:?}", e.kind())
}

// === one client connection ===

/// A client ping record.
const PING: &str = "{\"type\":6}\u{1e}";

/// The record separator.
const RS: char = '\u{1e}';

/// The records of one text frame (complete ones only).
fn records(text: &str) -> impl Iterator<Item = &str> {
    let complete = text.rfind(RS).map_or("", |end| &text[..end]);
    complete.split(RS).filter(|r| !r.is_empty())
}

/// A join invocation record.
fn join_record(region: &str, position: Option<&str>, id: &str) -> String {
    let position = position.map(|p| format!(",{p}")).unwrap_or_default();
    format!(
        "{{\"type\":1,\"invocationId\":\"{id}\",\"target\":\"JoinDispatchGroup\",\"arguments\":[\"{region}\"{position}]}}{RS}"
    )
}

/// A position as the gateway writes it in events and join results.
#[derive(Debug, Clone, Deserialize)]
struct Position {
    epoch: String,
    seq: u64,
    #[serde(default)]
    recovered: Option<bool>,
}

/// The parts of a server record the tool reads.
#[derive(Debug, Deserialize)]
struct Record {
    #[serde(rename = "type")]
    kind: Option<u8>,
    #[serde(rename = "invocationId", default)]
    invocation_id: Option<String>,
    #[serde(default)]
    arguments: Option<(IgnoredAny, Position)>,
    #[serde(default)]
    result: Option<Position>,
    #[serde(default)]
    error: Option<String>,
}

/// A message from the server.
enum Message {
    Text(String),
    Ping(Vec<u8>),
    Close(Option<u16>),
    Other,
}

/// A client WebSocket: the stream, unread bytes, the mask.
struct Conn {
    stream: TcpStream,
    buf: Vec<u8>,
    mask: [u8; 4],
}

/// Connects from a spread loopback source address (`n` picks it).
async fn connect_tcp(
    target: SocketAddr,
    n: usize,
    recv_buffer: Option<u32>,
) -> Result<TcpStream, String> {
    let socket = match target {
        SocketAddr::V4(_) => TcpSocket::new_v4(),
        SocketAddr::V6(_) => TcpSocket::new_v6(),
    }
    .map_err(io("socket"))?;
    if let Some(size) = recv_buffer {
        socket.set_recv_buffer_size(size).map_err(io("rcvbuf"))?;
    }
    if target.is_ipv4() {
        let hosts = usize::from(SOURCE_HOSTS.end() - SOURCE_HOSTS.start()) + 1;
        let host = SOURCE_HOSTS.start() + (n % hosts) as u8;
        setsockopt(&socket, IpBindAddressNoPort, &true)
            .map_err(|e| format!("IP_BIND_ADDRESS_NO_PORT: {e}"))?;
        socket
            .bind(SocketAddr::new(
                IpAddr::V4(Ipv4Addr::new(127, 0, 0, host)),
                0,
            ))
            .map_err(io("bind"))?;
    }
    let stream = socket.connect(target).await.map_err(io("connect"))?;
    stream.set_nodelay(true).map_err(io("nodelay"))?;
    Ok(stream)
}

impl Conn {
    /// TCP and the WebSocket upgrade.
    async fn upgrade(
        plan: &Plan,
        target: SocketAddr,
        n: usize,
        token: &str,
    ) -> Result<Self, String> {
        Self::upgrade_with(plan, target, n, token, None).await
    }

    async fn upgrade_with(
        plan: &Plan,
        target: SocketAddr,
        n: usize,
        token: &str,
        recv_buffer: Option<u32>,
    ) -> Result<Self, String> {
        let stream = connect_tcp(target, n, recv_buffer).await?;
        let [m0, m1, m2, m3, ..] = *Uuid::new_v4().as_bytes();
        let mut conn = Self {
            stream,
            buf: Vec::new(),
            mask: [m0, m1, m2, m3],
        };
        let key = ws::client_key(*Uuid::new_v4().as_bytes());
        let request = ws::upgrade_request(
            &target.to_string(),
            &format!("/hub/v1?access_token={token}"),
            &key,
            plan.origin.as_deref(),
        )?;
        conn.stream
            .write_all(request.as_bytes())
            .await
            .map_err(io("upgrade"))?;
        loop {
            match ws::upgrade_response(&conn.buf, &key) {
                Ok(Some(head)) => {
                    conn.buf.drain(..head);
                    return Ok(conn);
                }
                Ok(None) => {}
                Err(e) => return Err(format!("upgrade: {e}")),
            }
            if conn.fill().await.map_err(io("upgrade"))? == 0 {
                return Err("upgrade: eof".to_owned());
            }
        }
    }

    /// TCP, upgrade and SignalR handshake.
    async fn open(plan: &Plan, target: SocketAddr, n: usize, token: &str) -> Result<Self, String> {
        Self::open_with(plan, target, n, token, None).await
    }

    async fn open_with(
        plan: &Plan,
        target: SocketAddr,
        n: usize,
        token: &str,
        recv_buffer: Option<u32>,
    ) -> Result<Self, String> {
        let mut conn = Self::upgrade_with(plan, target, n, token, recv_buffer).await?;
        conn.send_text("{\"protocol\":\"json\",\"version\":1}\u{1e}")
            .await
            .map_err(io("handshake"))?;
        loop {
            match conn.receive().await? {
                Message::Text(text) => {
                    if let Some(record) = records(&text).next() {
                        return match serde_json::from_str::<Record>(record) {
                            Ok(Record {
                                kind: None,
                                error: None,
                                ..
                            }) => Ok(conn),
                            Ok(Record {
                                error: Some(error), ..
                            }) => Err(format!("handshake refused: {error}")),
                            _ => Err("handshake: unexpected answer".to_owned()),
                        };
                    }
                }
                Message::Close(code) => return Err(format!("handshake: close {code:?}")),
                Message::Ping(_) | Message::Other => {}
            }
        }
    }

    /// Joins `soak-<group>`, optionally from `position`; returns the join's position.
    async fn join(
        &mut self,
        group: usize,
        position: Option<&str>,
        id: &str,
    ) -> Result<Option<Position>, String> {
        self.join_raw(&Plan::region(group), position, id).await
    }

    async fn join_raw(
        &mut self,
        region: &str,
        position: Option<&str>,
        id: &str,
    ) -> Result<Option<Position>, String> {
        self.send_text(&join_record(region, position, id))
            .await
            .map_err(io("join"))?;
        loop {
            match self.receive().await? {
                Message::Text(text) => {
                    for record in records(&text) {
                        let Ok(parsed) = serde_json::from_str::<Record>(record) else {
                            continue;
                        };
                        match parsed.kind {
                            Some(3) if parsed.invocation_id.as_deref() == Some(id) => {
                                return match parsed.error {
                                    Some(error) => Err(format!("join refused: {error}")),
                                    None => Ok(parsed.result),
                                };
                            }
                            Some(7) => {
                                return Err(format!(
                                    "join: server close: {}",
                                    parsed.error.unwrap_or_default()
                                ));
                            }
                            _ => {}
                        }
                    }
                }
                Message::Ping(payload) => {
                    self.send(ws::OPCODE_PONG, &payload)
                        .await
                        .map_err(io("pong"))?;
                }
                Message::Close(code) => return Err(format!("join: close {code:?}")),
                Message::Other => {}
            }
        }
    }

    /// Reads and drops messages until the connection ends; returns how it ended.
    async fn discard_until_closed(&mut self) -> String {
        loop {
            match self.receive().await {
                Ok(Message::Close(code)) => return format!("server close frame {code:?}"),
                Ok(Message::Text(text)) if text.contains("\"type\":7") => {
                    return "server close record".to_owned();
                }
                Ok(_) => {}
                Err(reason) => return reason,
            }
        }
    }

    /// Waits (boundedly) for the server to react: a close frame, the end of the stream, or
    /// nothing within `ANSWER_WAIT`.
    async fn await_answer(&mut self) -> String {
        match timeout(ANSWER_WAIT, self.discard_until_closed()).await {
            Ok(outcome) => outcome,
            Err(_) => "no answer within 5 s".to_owned(),
        }
    }

    /// Reads what the socket has onto `buf`; `Ok(0)` at the end of the stream.
    async fn fill(&mut self) -> std::io::Result<usize> {
        self.buf.reserve(READ_RESERVE);
        self.stream.read_buf(&mut self.buf).await
    }

    /// The next whole message.
    async fn receive(&mut self) -> Result<Message, String> {
        loop {
            let parsed = match ws::next_frame(&self.buf) {
                Ok(Some(frame)) => Some((
                    frame.len,
                    match frame.opcode {
                        ws::OPCODE_TEXT => Message::Text(
                            String::from_utf8(frame.payload.to_vec())
                                .map_err(|_| "text frame not UTF-8".to_owned())?,
                        ),
                        ws::OPCODE_PING => Message::Ping(frame.payload.to_vec()),
                        ws::OPCODE_CLOSE => Message::Close(ws::close_code(frame.payload)),
                        _ => Message::Other,
                    },
                )),
                Ok(None) => None,
                Err(e) => return Err(format!("frame: {e}")),
            };
            if let Some((len, message)) = parsed {
                self.buf.drain(..len);
                return Ok(message);
            }
            match self.fill().await {
                Ok(0) => return Err("eof".to_owned()),
                Ok(_) => {}
                Err(e) => return Err(format!("read: io {:?}", e.kind())),
            }
        }
    }

    async fn send(&mut self, opcode: u8, payload: &[u8]) -> std::io::Result<()> {
        let frame = ws::client_frame(opcode, payload, self.mask);
        self.stream.write_all(&frame).await
    }

    async fn send_text(&mut self, text: &str) -> std::io::Result<()> {
        self.send(ws::OPCODE_TEXT, text.as_bytes()).await
    }
}

/// A small xorshift generator: the churn needs variety, not quality.
struct Rng(u64);

impl Rng {
    fn new() -> Self {
        Self::from_seed(Uuid::new_v4().as_u64_pair().0)
    }

    fn from_seed(seed: u64) -> Self {
        Self(seed | 1)
    }

    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }

    /// Uniform in `0..n` (n ≥ 1), near enough.
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }

    /// Uniform in `[0, 1)`.
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1_u64 << 53) as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_verifier_counts_duplicates_reordering_and_new_epochs() {
        let mut v = Verifier::default();
        for seq in [5, 6, 7, 7, 9, 8, 4] {
            v.observe("a", seq);
        }
        assert_eq!(v.report.unique, 6);
        assert_eq!(v.report.duplicates, 1);
        // 8 after 9, and 4 below the first seen.
        assert_eq!(v.report.reordered, 2);
        assert_eq!(v.report.epoch_changes, 0);
        v.observe("b", 1);
        v.observe("b", 2);
        assert_eq!(v.report.epoch_changes, 1);
        assert_eq!(v.report.unique, 8);
    }

    #[test]
    fn lost_is_what_was_published_and_not_received() {
        let published = Published {
            accepted: vec![10, 4],
            epochs: vec![vec!["e".to_owned()]; 2],
            failed: BTreeMap::new(),
        };
        let reports = [
            StableReport {
                group: 0,
                unique: 10,
                ..StableReport::default()
            },
            StableReport {
                group: 1,
                unique: 3,
                ..StableReport::default()
            },
            StableReport {
                group: 1,
                ended: Some("eof".to_owned()),
                ..StableReport::default()
            },
        ];
        let summary = StableSummary::from_reports(&reports, &published, 3, BTreeMap::new());
        assert_eq!(summary.expected, 14);
        assert_eq!(summary.lost, 1);
        assert_eq!(summary.ended.get("eof"), Some(&1));
        assert!(!summary.is_clean(3));
    }

    #[test]
    fn join_records_carry_the_position_as_second_argument() {
        assert_eq!(
            join_record("soak-1", Some("{\"epoch\":\"e\",\"seq\":1}"), "r0"),
            "{\"type\":1,\"invocationId\":\"r0\",\"target\":\"JoinDispatchGroup\",\"arguments\":[\"soak-1\",{\"epoch\":\"e\",\"seq\":1}]}\u{1e}"
        );
        assert!(join_record("soak-1", None, "1").contains("[\"soak-1\"]"));
    }

    #[test]
    fn event_records_yield_their_position() {
        let record = r#"{"type":1,"target":"RecommendationReady","arguments":[{"region":"soak-1"},{"group":"/dispatch/soak-1","epoch":"ab","seq":42}]}"#;
        let parsed: Record = serde_json::from_str(record).unwrap();
        let (_, position) = parsed.arguments.unwrap();
        assert_eq!((position.epoch.as_str(), position.seq), ("ab", 42));
    }

    #[test]
    fn hostile_kinds_are_named_on_the_command_line_by_label() {
        for kind in Kind::HOSTILE {
            assert_eq!(Kind::from_label(kind.label()), Some(kind));
        }
        assert_eq!(Kind::from_label("clean"), None);
    }
}
