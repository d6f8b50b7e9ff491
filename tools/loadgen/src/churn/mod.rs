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
//!
//! Modules: `stable` (the clients that must lose nothing and their verdict), `hostile` (the
//! churn and its kinds), `client` (one client WebSocket: TCP from a spread source address,
//! upgrade, handshake, joins, messages).

mod client;
mod hostile;
mod stable;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, bail, ensure};
use clap::Args;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use publisher_lib::contract::{Event, RecommendationReady};
use publisher_lib::{Publisher, PublisherConfig};
use serde::Serialize;
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinSet;
use tokio::time::{Instant, MissedTickBehavior, interval, sleep, timeout};
use uuid::Uuid;

use crate::cli::Endpoint;
use hostile::{ChurnTally, Kind, churn};
use stable::{StableSummary, stable_client};

/// Longest churn phase accepted (`--secs`), so a typo cannot run for days.
const MAX_CHURN_SECS: u64 = 4 * 3600;

/// Stable connections connecting at once.
const STABLE_CONNECT_CONCURRENCY: usize = 100;

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

/// A reason cut to 120 characters, for a count's key.
pub(super) fn shorten(reason: &str) -> String {
    reason.chars().take(120).collect()
}
