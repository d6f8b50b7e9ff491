//! `loadgen publish-stream`: a steady stream of `RecommendationReady` events published into
//! Redis through `publisher_lib::BackgroundPublisher`, for the chaos tests (tests/node).
//!
//! Events go round-robin to the dispatch groups of `--groups` at `--rate` events/s for `--secs`
//! seconds (exactly `rate * secs` events). Each has a fresh `requestId` (a UUID), which is also
//! its idempotency key. The background publisher is configured to ride out a Redis outage: a
//! large queue and (practically) unlimited attempts with short capped backoff. At the end it
//! flushes (bounded by `--flush-secs`) and prints one JSON summary on stdout: per region the
//! `requestId`s in publish order, and the counts of events dropped before queueing and given up
//! after queueing (read from `publisher_events_dropped_total`). Progress goes to stderr as JSON
//! lines (`{"progress":{"queued":N,...}}`), about ten a second, so a driver can act mid-stream.
//!
//! ```text
//! loadgen publish-stream --redis-url redis://127.0.0.1:6390 --groups west,east --rate 200 --secs 20
//! ```
//!
//! Loopback only, like the rest of the tool: the Redis host must be 127.0.0.1, ::1 or localhost.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use anyhow::{Context, bail, ensure};
use clap::Args;
use publisher_lib::contract::{Event, RecommendationReady};
use publisher_lib::{BackgroundConfig, BackgroundPublisher, Publisher, PublisherConfig};
use tokio::time::Instant;
use uuid::Uuid;

/// Publish a steady stream of RecommendationReady events into Redis (loopback only).
#[derive(Debug, Args)]
pub(crate) struct StreamArgs {
    /// Redis URL (host 127.0.0.1, ::1 or localhost).
    #[arg(long)]
    pub(crate) redis_url: String,
    /// Regions whose dispatch groups receive the events, round-robin (comma-separated).
    #[arg(long, value_delimiter = ',', required = true)]
    pub(crate) groups: Vec<String>,
    /// Events per second, over all groups.
    #[arg(long, default_value_t = 200)]
    pub(crate) rate: u32,
    /// Seconds of publishing.
    #[arg(long, default_value_t = 20)]
    pub(crate) secs: u64,
    /// Channel prefix (the gateway's GATEWAY_REDIS_PREFIX).
    #[arg(long, default_value = publisher_lib::DEFAULT_PREFIX)]
    pub(crate) prefix: String,
    /// Bound on the final flush, in seconds.
    #[arg(long, default_value_t = 60)]
    pub(crate) flush_secs: u64,
    /// Bound on one publish call (a retry follows a timeout), in milliseconds.
    #[arg(long, default_value_t = 1000)]
    pub(crate) publish_timeout_ms: u64,
}

/// Runs `loadgen publish-stream`.
pub(crate) async fn main(args: StreamArgs) -> std::process::ExitCode {
    match run(args).await {
        Ok(true) => std::process::ExitCode::SUCCESS,
        Ok(false) => std::process::ExitCode::FAILURE,
        Err(e) => {
            eprintln!("loadgen publish-stream: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// Publishes the stream and prints the summary; `Ok(false)` when the flush did not finish.
async fn run(args: StreamArgs) -> anyhow::Result<bool> {
    check_loopback(&args.redis_url)?;
    ensure!(args.rate >= 1, "--rate must be at least 1");
    ensure!(
        args.secs >= 1 && args.secs <= 600,
        "--secs must be within 1..=600"
    );
    ensure!(!args.groups.is_empty(), "--groups is empty");
    let drops = DropCounter::install();

    let config = PublisherConfig::new(args.redis_url.clone())
        .with_prefix(args.prefix.clone())
        .with_publish_timeout(Duration::from_millis(args.publish_timeout_ms.max(50)));
    let publisher = Publisher::new(config).context("creating the Redis publisher")?;
    let mut background = BackgroundConfig::default()
        .with_capacity(1_000_000)
        .with_max_attempts(u32::MAX);
    background.initial_backoff = Duration::from_millis(50);
    background.max_backoff = Duration::from_millis(250);
    let handle = BackgroundPublisher::spawn(publisher, background);

    let total = u64::from(args.rate) * args.secs;
    let mut per_group: BTreeMap<String, Vec<String>> = args
        .groups
        .iter()
        .map(|g| (g.clone(), Vec::new()))
        .collect();
    let mut queued = 0_u64;
    let mut dropped = 0_u64;
    let mut dropped_reasons: BTreeMap<&'static str, u64> = BTreeMap::new();

    let period = Duration::from_secs_f64(1.0 / f64::from(args.rate));
    let mut ticker = tokio::time::interval(period);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let started = Instant::now();
    let mut last_progress = Instant::now();
    progress(&serde_json::json!({ "started": true, "total": total }));
    for n in 0..total {
        ticker.tick().await;
        let region = &args.groups[usize::try_from(n).unwrap_or(0) % args.groups.len()];
        let request_id = Uuid::new_v4();
        let event = Event::RecommendationReady(RecommendationReady {
            job_id: Uuid::new_v4(),
            request_id,
            region: region.clone(),
            config_version: 1,
            generated_at: chrono::Utc::now(),
        });
        match handle.try_publish(event) {
            Ok(_) => {
                queued += 1;
                if let Some(ids) = per_group.get_mut(region) {
                    ids.push(request_id.to_string());
                }
            }
            Err(reason) => {
                dropped += 1;
                *dropped_reasons.entry(reason.label()).or_default() += 1;
            }
        }
        if last_progress.elapsed() >= Duration::from_millis(100) {
            last_progress = Instant::now();
            progress(&serde_json::json!({
                "queued": queued, "dropped": dropped, "total": total,
                "elapsedMs": started.elapsed().as_millis(),
            }));
        }
    }
    let publishing_ms = started.elapsed().as_millis();
    progress(
        &serde_json::json!({ "queued": queued, "dropped": dropped, "total": total, "flushing": true }),
    );

    let flushed = tokio::time::timeout(Duration::from_secs(args.flush_secs), handle.flush())
        .await
        .is_ok();
    let summary = serde_json::json!({
        "prefix": args.prefix,
        "rate": args.rate,
        "secs": args.secs,
        "total": total,
        "queued": queued,
        "dropped": dropped,
        "droppedReasons": dropped_reasons,
        "failed": drops.get("gave_up"),
        "publisherDrops": drops.snapshot(),
        "flushed": flushed,
        "publishingMs": publishing_ms,
        "elapsedMs": started.elapsed().as_millis(),
        "groups": per_group,
    });
    let mut stdout = std::io::stdout().lock();
    writeln!(stdout, "{summary}").context("writing the summary")?;
    stdout.flush().context("writing the summary")?;
    Ok(flushed)
}

fn progress(line: &serde_json::Value) {
    eprintln!("{}", serde_json::json!({ "progress": line }));
}

/// Accepts `redis://`, `rediss://`, `redis+cluster://` and `rediss+cluster://` URLs (several,
/// separated by spaces, for independent servers) whose every host is loopback.
pub(crate) fn check_loopback(urls: &str) -> anyhow::Result<()> {
    ensure!(
        urls.split_whitespace().next().is_some(),
        "--redis-url is empty"
    );
    for url in urls.split_whitespace() {
        let (scheme, rest) = url
            .split_once("://")
            .with_context(|| format!("not a URL: {url}"))?;
        ensure!(
            matches!(
                scheme,
                "redis" | "rediss" | "redis+cluster" | "rediss+cluster"
            ),
            "--redis-url must be redis://, rediss://, redis+cluster:// or rediss+cluster://"
        );
        let hosts = rest.rsplit_once('@').map_or(rest, |(_, hosts)| hosts);
        let hosts = hosts.split(['/', '?']).next().unwrap_or_default();
        for host in hosts.split(',') {
            let parsed = reqwest::Url::parse(&format!("redis://{host}"))
                .with_context(|| format!("not a host:port: {host}"))?;
            match parsed.host_str() {
                Some("127.0.0.1" | "localhost" | "[::1]" | "::1") => {}
                other => bail!("--redis-url must point to loopback, not {other:?}"),
            }
        }
    }
    Ok(())
}

/// Counts `publisher_events_dropped_total` by its `reason` label (the only counter read here).
#[derive(Debug, Clone, Default)]
struct DropCounter {
    by_reason: Arc<Mutex<BTreeMap<String, Arc<AtomicU64>>>>,
}

impl DropCounter {
    /// Installs a recorder that keeps the drop counter; the returned handle reads it.
    fn install() -> Self {
        let counter = Self::default();
        if metrics::set_global_recorder(counter.clone()).is_err() {
            eprintln!("loadgen publish-stream: a metrics recorder was already installed");
        }
        counter
    }

    fn cell(&self, reason: &str) -> Arc<AtomicU64> {
        let mut map = self
            .by_reason
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        map.entry(reason.to_owned()).or_default().clone()
    }

    fn get(&self, reason: &str) -> u64 {
        self.cell(reason).load(Ordering::Relaxed)
    }

    fn snapshot(&self) -> BTreeMap<String, u64> {
        let map = self
            .by_reason
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        map.iter()
            .map(|(k, v)| (k.clone(), v.load(Ordering::Relaxed)))
            .collect()
    }
}

#[derive(Debug)]
struct Cell(Arc<AtomicU64>);

impl metrics::CounterFn for Cell {
    fn increment(&self, value: u64) {
        self.0.fetch_add(value, Ordering::Relaxed);
    }
    fn absolute(&self, value: u64) {
        self.0.fetch_max(value, Ordering::Relaxed);
    }
}

impl metrics::Recorder for DropCounter {
    fn describe_counter(
        &self,
        _: metrics::KeyName,
        _: Option<metrics::Unit>,
        _: metrics::SharedString,
    ) {
    }
    fn describe_gauge(
        &self,
        _: metrics::KeyName,
        _: Option<metrics::Unit>,
        _: metrics::SharedString,
    ) {
    }
    fn describe_histogram(
        &self,
        _: metrics::KeyName,
        _: Option<metrics::Unit>,
        _: metrics::SharedString,
    ) {
    }

    fn register_counter(&self, key: &metrics::Key, _: &metrics::Metadata<'_>) -> metrics::Counter {
        if key.name() != "publisher_events_dropped_total" {
            return metrics::Counter::noop();
        }
        let reason = key
            .labels()
            .find(|label| label.key() == "reason")
            .map_or("unknown", |label| label.value());
        metrics::Counter::from_arc(Arc::new(Cell(self.cell(reason))))
    }

    fn register_gauge(&self, _: &metrics::Key, _: &metrics::Metadata<'_>) -> metrics::Gauge {
        metrics::Gauge::noop()
    }

    fn register_histogram(
        &self,
        _: &metrics::Key,
        _: &metrics::Metadata<'_>,
    ) -> metrics::Histogram {
        metrics::Histogram::noop()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_loopback_redis_urls_are_accepted() {
        for url in [
            "redis://127.0.0.1:6390",
            "rediss://user:pw@localhost:6390/0",
            "redis+cluster://127.0.0.1:7000,127.0.0.1:7001",
            "redis://127.0.0.1:1 redis://[::1]:2",
        ] {
            assert!(check_loopback(url).is_ok(), "{url}");
        }
        for (url, why) in [
            ("redis://10.0.0.1:6390", "loopback"),
            ("redis+cluster://127.0.0.1:7000,10.0.0.2:7001", "loopback"),
            ("http://127.0.0.1:6390", "must be redis://"),
            ("127.0.0.1:6390", "not a URL"),
            (" ", "empty"),
        ] {
            let error = check_loopback(url).expect_err(url).to_string();
            assert!(error.contains(why), "{url}: {error}");
        }
    }
}
