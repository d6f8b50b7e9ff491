//! `loadgen publish-bench`: the publish path of `publisher_lib::Publisher` alone, no gateway.
//!
//! `--events` `RecommendationReady` events go to `--groups` dispatch groups (regions
//! `lgb-0`, `lgb-1`, ...) from `--concurrency` tasks. Each group belongs to one task, which
//! publishes that group's events one after the other, so a group's order is the caller's order;
//! the tasks run side by side on the one shared `Publisher`. Without `--rate` every task
//! publishes as fast as its calls return (the throughput the publisher sustains with that many
//! calls in flight); with `--rate` the tasks are paced to that many publishes per second in all.
//!
//! Nothing lost is checked, not assumed: every group's receipts must carry seq 1, 2, 3, ... in
//! the order the task published them (no gap, no repeat, no reordering), and afterwards each
//! group's head in Redis (`read_history`) must equal the number of publishes it accepted. The
//! run uses a fresh channel prefix, so each group starts at seq 0. It prints one markdown line
//! with publishes/s, latency p50/p99/max and those checks, and fails when a check does.
//!
//! ```text
//! taskset -c 1 loadgen publish-bench --redis-url redis://127.0.0.1:6393 \
//!     --events 300000 --concurrency 256 --groups 2500
//! ```
//!
//! With `--pool N` the publisher is `Publisher::from_pool` over a deadpool-redis pool of N
//! connections (one per call in flight, each recycled with a `PING` on every checkout) instead
//! of the one shared multiplexed connection: the A/B behind the `Publisher` docs' reason for
//! keeping the shared connection as the default.
//!
//! Loopback only, like the rest of the tool; bounded by `--max-secs`.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail, ensure};
use clap::Args;
use hdrhistogram::Histogram;
use publisher_lib::contract::{Event, Group, RecommendationReady};
use publisher_lib::{Publisher, PublisherConfig};
use tokio::task::JoinSet;
use tokio::time::{Instant, sleep_until};
use uuid::Uuid;

use crate::stream::check_loopback;

/// Publish N events straight into Redis through publisher-lib and report publishes/s.
#[derive(Debug, Args)]
pub(crate) struct BenchArgs {
    /// Redis URL (host 127.0.0.1, ::1 or localhost).
    #[arg(long)]
    pub(crate) redis_url: String,
    /// Events to publish in all.
    #[arg(long, default_value_t = 100_000)]
    pub(crate) events: u64,
    /// Tasks publishing side by side (each owns whole groups, one call in flight each).
    #[arg(long, default_value_t = 256)]
    pub(crate) concurrency: usize,
    /// Dispatch groups the events are spread over (at least `--concurrency`).
    #[arg(long, default_value_t = 2500)]
    pub(crate) groups: usize,
    /// Publishes per second over all tasks; as fast as possible without it.
    #[arg(long)]
    pub(crate) rate: Option<u32>,
    /// Bound on one publish call, in milliseconds.
    #[arg(long, default_value_t = 2000)]
    pub(crate) publish_timeout_ms: u64,
    /// Publish through a deadpool-redis pool of this many connections
    /// (`Publisher::from_pool`) instead of the one shared connection.
    #[arg(long)]
    pub(crate) pool: Option<usize>,
    /// Hard deadline for the run, in seconds.
    #[arg(long, default_value_t = 120)]
    pub(crate) max_secs: u64,
}

/// What one task did.
struct TaskTally {
    accepted: u64,
    errors: u64,
    /// Receipts whose seq was not the group's previous seq + 1.
    out_of_order: u64,
    /// Accepted publishes per owned group, as (group index, count).
    per_group: Vec<(usize, u64)>,
    latency: Histogram<u64>,
}

/// Runs `loadgen publish-bench`.
pub(crate) async fn main(args: BenchArgs) -> std::process::ExitCode {
    let limit = Duration::from_secs(args.max_secs.max(1));
    match tokio::time::timeout(limit, run(args)).await {
        Ok(Ok(())) => std::process::ExitCode::SUCCESS,
        Ok(Err(e)) => {
            eprintln!("loadgen publish-bench: {e:#}");
            std::process::ExitCode::FAILURE
        }
        Err(_) => {
            eprintln!("loadgen publish-bench: --max-secs ({limit:?}) reached; giving up");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(args: BenchArgs) -> anyhow::Result<()> {
    check_loopback(&args.redis_url)?;
    ensure!(args.concurrency >= 1, "--concurrency must be at least 1");
    ensure!(
        args.groups >= args.concurrency,
        "--groups must be at least --concurrency (each task owns whole groups)"
    );
    ensure!(args.events >= 1, "--events must be at least 1");
    let prefix = format!("lgbench:{}:", Uuid::new_v4().simple());
    let publish_timeout = Duration::from_millis(args.publish_timeout_ms.max(50));
    let publisher = match args.pool {
        None => {
            let config = PublisherConfig::new(args.redis_url.clone())
                .with_prefix(prefix.clone())
                .with_publish_timeout(publish_timeout);
            Publisher::new(config).context("creating the Redis publisher")?
        }
        Some(size) => {
            ensure!(size >= 1, "--pool must be at least 1");
            // The pool's own timeouts stay unset, as deadpool's defaults: the publish timeout
            // bounds each call, the wait for a connection included.
            let mut config = deadpool_redis::Config::from_url(args.redis_url.clone());
            config.pool = Some(deadpool_redis::PoolConfig::new(size));
            let pool = config
                .create_pool(Some(deadpool_redis::Runtime::Tokio1))
                .context("creating the deadpool-redis pool")?;
            let settings = PublisherConfig::new(args.redis_url.clone())
                .with_prefix(prefix.clone())
                .with_publish_timeout(publish_timeout);
            Publisher::from_pool(pool, settings)
        }
    };
    // One call first, so the connection and the script cache are warm before the clock starts.
    publisher
        .publish(&event("lgb-warmup"))
        .await
        .context("the warm-up publish failed")?;

    let regions: Arc<[String]> = (0..args.groups).map(|g| format!("lgb-{g}")).collect();
    let started = Instant::now();
    let mut tasks = JoinSet::new();
    for task in 0..args.concurrency {
        // Task t owns groups t, t + C, t + 2C, ... and publishes its share of the events.
        let owned: Vec<usize> = (task..args.groups).step_by(args.concurrency).collect();
        let share = args.events / args.concurrency as u64
            + u64::from((task as u64) < args.events % args.concurrency as u64);
        let period = args
            .rate
            .map(|rate| Duration::from_secs_f64(args.concurrency as f64 / f64::from(rate.max(1))));
        let phase = period.map(|p| p.mul_f64(task as f64 / args.concurrency as f64));
        let publisher = publisher.clone();
        let regions = Arc::clone(&regions);
        tasks.spawn(async move {
            let mut tally = TaskTally {
                accepted: 0,
                errors: 0,
                out_of_order: 0,
                per_group: owned.iter().map(|&g| (g, 0)).collect(),
                latency: histogram(),
            };
            for k in 0..share {
                if let (Some(period), Some(phase)) = (period, phase) {
                    sleep_until(started + phase + period.mul_f64(k as f64)).await;
                }
                let slot = usize::try_from(k).unwrap_or(0) % owned.len();
                let sent = Instant::now();
                let outcome = publisher.publish(&event(&regions[owned[slot]])).await;
                let micros = u64::try_from(sent.elapsed().as_micros()).unwrap_or(u64::MAX);
                tally.latency.saturating_record(micros.max(1));
                match outcome {
                    Ok(receipt) => {
                        let expected = tally.per_group[slot].1 + 1;
                        let in_order = receipt
                            .deliveries
                            .iter()
                            .all(|d| !d.duplicate && d.position.seq == expected);
                        if !in_order {
                            tally.out_of_order += 1;
                        }
                        tally.accepted += 1;
                        tally.per_group[slot].1 += 1;
                    }
                    Err(_) => tally.errors += 1,
                }
            }
            tally
        });
    }
    let mut accepted = 0;
    let mut errors = 0;
    let mut out_of_order = 0;
    let mut per_group = vec![0_u64; args.groups];
    let mut latency = histogram();
    while let Some(joined) = tasks.join_next().await {
        let tally = joined.context("a publishing task panicked")?;
        accepted += tally.accepted;
        errors += tally.errors;
        out_of_order += tally.out_of_order;
        for (g, n) in tally.per_group {
            per_group[g] = n;
        }
        let _ = latency.add(&tally.latency);
    }
    let elapsed = started.elapsed();

    // Every group's head in Redis must be exactly what it accepted.
    let mut lost = 0_u64;
    let mut extra = 0_u64;
    for (g, &count) in per_group.iter().enumerate() {
        let group = Group::try_dispatch(&regions[g]).context("a bench region is invalid")?;
        let read = publisher
            .read_history(&group, None)
            .await
            .with_context(|| format!("reading the head of {}", regions[g]))?;
        lost += count.saturating_sub(read.head.seq);
        extra += read.head.seq.saturating_sub(count);
    }
    let rate = accepted as f64 / elapsed.as_secs_f64();
    let ms = |q: f64| latency.value_at_quantile(q) as f64 / 1000.0;
    let line = format!(
        "| {path} | {events} | {c} | {groups} | {target} | {rate:.0} | {p50:.2} | {p99:.2} | {max:.2} | {errors} | {out_of_order} | {lost} | {extra} |",
        path = args
            .pool
            .map_or_else(|| "shared".to_owned(), |n| format!("pool({n})")),
        events = args.events,
        c = args.concurrency,
        groups = args.groups,
        target = args
            .rate
            .map_or_else(|| "max".to_owned(), |r| r.to_string()),
        p50 = ms(0.5),
        p99 = ms(0.99),
        max = latency.max() as f64 / 1000.0,
    );
    report(&line);
    if errors > 0 || out_of_order > 0 || lost > 0 || extra > 0 {
        bail!(
            "{errors} errors, {out_of_order} receipts out of order, {lost} lost, {extra} unexpected"
        );
    }
    Ok(())
}

#[allow(clippy::print_stdout)] // The report on stdout is the tool's output.
fn report(line: &str) {
    println!(
        "| connection | events | concurrency | groups | target/s | publishes/s | p50 ms | p99 ms | max ms | errors | out of order | lost | unexpected |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|---|");
    println!("{line}");
}

fn histogram() -> Histogram<u64> {
    // Constant, valid bounds: creation cannot fail.
    Histogram::new_with_bounds(1, 60_000_000, 3).unwrap_or_else(|_| unreachable!())
}

/// A `RecommendationReady` for `region` with fresh ids (its `requestId` is its idempotency key).
fn event(region: &str) -> Event {
    Event::RecommendationReady(RecommendationReady {
        job_id: Uuid::new_v4(),
        request_id: Uuid::new_v4(),
        region: region.to_owned(),
        config_version: 1,
        generated_at: chrono::Utc::now(),
    })
}
