//! The two measuring modes, `run` and `idle`, as sequences of bounded phases.
//!
//! `run`: wait for /readyz, read the gateway's RSS, open the connections, then for each rate
//! publish for `--step-secs`, drain for `--drain-secs`, and turn the counters into a row.
//! `idle`: read RSS with none of our connections, open them, let them settle, read it again.
//! Each phase is bounded in time, and steps that would overrun `--max-secs` are skipped.

use std::time::Duration;

use anyhow::{Context, bail};
use tokio::time::{Instant, sleep};

use crate::cli::{Endpoint, IdleArgs, Observe, RunArgs, Target};
use crate::crew::Crew;
use crate::host::{self, CpuTicks};
use crate::publisher::{Publisher, PublisherConfig};
use crate::report::{self, IdleRow, Opened, RunSetting, StepInputs, StepRow};

/// How long to wait for the gateway's /readyz.
const READY_TIMEOUT: Duration = Duration::from_secs(15);

/// Settling after connecting, before the first step.
const SETTLE_BEFORE_STEPS: Duration = Duration::from_secs(2);

/// Settling after closing, before the last RSS reading of `idle`.
const SETTLE_AFTER_CLOSE: Duration = Duration::from_secs(2);

/// Room kept before the hard deadline for closing and reporting.
const CLOSING_ROOM: Duration = Duration::from_secs(20);

/// What a mode measured.
#[derive(Debug)]
pub(crate) enum Report {
    /// A `run`: its setting and one row per step.
    Run {
        /// Setting and connection figures.
        setting: RunSetting,
        /// One row per completed step.
        steps: Vec<StepRow>,
    },
    /// An `idle` measurement.
    Idle(IdleRow),
}

/// The gateway process as seen from /proc.
#[derive(Debug)]
struct Gateway {
    pid: Option<u32>,
}

impl Gateway {
    fn cpu(&self) -> Option<CpuTicks> {
        let pid = self.pid?;
        host::cpu_ticks(Some(pid))
            .map_err(|e| eprintln!("loadgen: gateway CPU: {e:#}"))
            .ok()
    }

    fn rss(&self) -> Option<u64> {
        let pid = self.pid?;
        host::rss_kib(pid)
            .map_err(|e| eprintln!("loadgen: gateway RSS: {e:#}"))
            .ok()
    }
}

/// What both modes start with: a ready gateway, its RSS before, and the connections opened.
///
/// # Errors
/// When the gateway is not ready, a load process fails to start, or not one connection opens.
async fn open(
    target: &Target,
    observe: &Observe,
    connections: usize,
    groups: usize,
) -> anyhow::Result<(Crew, Gateway, Opened)> {
    let admin = Endpoint::try_loopback(&observe.admin_url)?;
    wait_ready(&admin).await?;
    let prior_connections = prior_connections(&admin).await;
    let gateway = Gateway {
        pid: observe.gateway_pid,
    };
    if gateway.pid.is_none() {
        eprintln!("loadgen: without --gateway-pid there is no RSS to report");
    }
    let rss_before = gateway.rss();
    eprintln!("loadgen: opening {connections} connections over {groups} groups");
    let (crew, connect) =
        Crew::open(target, connections, groups, observe.conns_per_process).await?;
    eprintln!(
        "loadgen: {} ready, {} failed in {:.1} s",
        connect.ok,
        connect.failed_total(),
        connect.secs
    );
    if connect.ok == 0 {
        crew.close().await;
        bail!(
            "no connection could be opened: {}",
            report::reasons(&connect.failed)
        );
    }
    let opened = Opened {
        connections,
        groups,
        processes: crew.processes(),
        connect,
        rss_before_kib: rss_before,
        prior_connections,
    };
    Ok((crew, gateway, opened))
}

/// `loadgen run`.
///
/// # Errors
/// When the gateway is not ready, no connection opens, or a load process fails before the
/// first step; later failures cut the run short and are reported with the rows so far.
pub(crate) async fn run(args: RunArgs) -> anyhow::Result<Report> {
    args.validate()?;
    let deadline = Instant::now() + Duration::from_secs(args.target.max_secs);
    let endpoint = Endpoint::try_loopback(&args.target.url)?;
    let (mut crew, gateway, opened) =
        open(&args.target, &args.observe, args.connections, args.groups).await?;
    sleep(SETTLE_BEFORE_STEPS).await;
    let rss_connected = gateway.rss();
    let initial_members: u64 = crew
        .snapshot()
        .await?
        .members
        .iter()
        .map(|m| u64::from(*m))
        .sum();

    let mut publisher = Publisher::new(&PublisherConfig {
        endpoint,
        service_key: args.service_key.clone(),
        groups: args.groups,
        lanes: args.lanes,
        payload_bytes: args.payload_bytes,
        batch: usize::from(args.batch),
    })?;
    let ticks_per_sec = host::clock_ticks_per_second();
    let step_length = Duration::from_secs(args.step_secs + args.drain_secs);
    let mut steps = Vec::new();
    let mut cut_short = None;
    for (index, rate) in args.rates.iter().enumerate() {
        let step = u32::try_from(index).unwrap_or(u32::MAX);
        if Instant::now() + step_length + CLOSING_ROOM > deadline {
            cut_short = Some(format!(
                "--max-secs {} would be overrun by step {step}",
                args.target.max_secs
            ));
            break;
        }
        let measured = run_step(
            &mut crew,
            &mut publisher,
            &gateway,
            &args,
            step,
            *rate,
            Baseline {
                ticks_per_sec,
                initial_members,
            },
        )
        .await;
        match measured {
            Ok(row) => {
                eprintln!(
                    "loadgen: step {step}: {:.0} pub/s, {:.0} deliveries/s, lost {}, p99 {:.1} ms",
                    row.accepted_per_sec, row.deliveries_per_sec, row.lost, row.p99_ms
                );
                steps.push(row);
            }
            Err(e) => {
                cut_short = Some(format!("step {step} failed: {e:#}"));
                break;
            }
        }
        if gateway.pid.is_some() && gateway.cpu().is_none() {
            cut_short = Some("the gateway process is gone".to_owned());
            break;
        }
    }
    let rss_after = gateway.rss();
    crew.close().await;
    Ok(Report::Run {
        setting: RunSetting {
            opened,
            payload_bytes: args.payload_bytes,
            step_secs: args.step_secs,
            drain_secs: args.drain_secs,
            lanes: publisher.lanes(),
            rss_connected_kib: rss_connected,
            rss_after_kib: rss_after,
            cut_short,
        },
        steps,
    })
}

/// Figures that stay the same over the steps of a run.
#[derive(Debug, Clone, Copy)]
struct Baseline {
    ticks_per_sec: u64,
    initial_members: u64,
}

async fn run_step(
    crew: &mut Crew,
    publisher: &mut Publisher,
    gateway: &Gateway,
    args: &RunArgs,
    step: u32,
    rate: f64,
    baseline: Baseline,
) -> anyhow::Result<StepRow> {
    let before = crew.snapshot().await?;
    let others_start = host::process_ticks();
    let gateway_start = gateway.cpu();
    let started = Instant::now();
    let published = publisher
        .run_step(step, rate, Duration::from_secs(args.step_secs))
        .await;
    let publish_secs = started.elapsed().as_secs_f64();
    let gateway_published = gateway.cpu();
    let others_end = host::process_ticks();
    let published_end = crew.snapshot().await?;
    sleep(Duration::from_secs(args.drain_secs)).await;
    let gateway_end = gateway.cpu();
    let received = crew.collect(step).await?;
    let after = crew.snapshot().await?;

    let tool: Vec<CpuTicks> = published_end
        .cpu
        .iter()
        .zip(&before.cpu)
        .map(|(end, start)| end.since(*start))
        .collect();
    let mut measured = crew.pids();
    measured.extend(gateway.pid);
    let other = host::other_ticks(&others_start, &others_end, &measured);
    let ended = published_end.ends.values().sum::<u64>() + after.ends.values().sum::<u64>();
    Ok(StepRow::new(&StepInputs {
        step,
        rate,
        publish_secs,
        published: &published,
        members: &before.members,
        initial_members: baseline.initial_members,
        received: &received,
        gateway_publish: since(gateway_published, gateway_start),
        gateway_step: since(gateway_end, gateway_start),
        tool: &tool,
        other,
        ticks_per_sec: baseline.ticks_per_sec,
        ended,
    }))
}

/// `loadgen idle`.
///
/// # Errors
/// When the gateway is not ready or a load process fails.
pub(crate) async fn idle(args: IdleArgs) -> anyhow::Result<Report> {
    args.validate()?;
    let (mut crew, gateway, opened) =
        open(&args.target, &args.observe, args.connections, args.groups).await?;
    eprintln!("loadgen: settling {} s", args.settle_secs);
    let cpu_start = gateway.cpu();
    let settle = Duration::from_secs(args.settle_secs);
    sleep(settle).await;
    let cpu_end = gateway.cpu();
    let rss_held = gateway.rss();
    let snapshot = crew.snapshot().await;
    crew.close().await;
    sleep(SETTLE_AFTER_CLOSE).await;
    let rss_after_close = gateway.rss();
    let snapshot = snapshot.context("reading the load processes")?;
    let ticks_per_sec = host::clock_ticks_per_second() as f64;
    Ok(Report::Idle(IdleRow {
        kib_per_connection: report::kib_per_connection(
            opened.rss_before_kib,
            rss_held,
            snapshot.live,
        ),
        opened,
        settle_secs: args.settle_secs,
        rss_held_kib: rss_held,
        rss_after_close_kib: rss_after_close,
        gateway_idle_cpu_pct: since(cpu_end, cpu_start).map(|ticks| {
            ticks.total() as f64 / ticks_per_sec / settle.as_secs_f64().max(1.0) * 100.0
        }),
        ended: snapshot.ends,
    }))
}

fn since(end: Option<CpuTicks>, start: Option<CpuTicks>) -> Option<CpuTicks> {
    Some(end?.since(start?))
}

/// Connections the gateway has accepted so far, from its /metrics (`None` when it does not say).
/// Memory a gateway has used once is not all returned, so RSS per connection is only
/// meaningful from a gateway that has served none.
async fn prior_connections(admin: &Endpoint) -> Option<u64> {
    let client = reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(2))
        .build()
        .ok()?;
    let text = client
        .get(admin.join("/metrics"))
        .send()
        .await
        .ok()?
        .text()
        .await
        .ok()?;
    metric_value(&text, "gateway_connections_total").map(|v| v as u64)
}

/// The value of an unlabelled metric in Prometheus text.
fn metric_value(text: &str, name: &str) -> Option<f64> {
    text.lines().find_map(|line| {
        let rest = line.strip_prefix(name)?.strip_prefix(' ')?;
        rest.split_whitespace().next()?.parse().ok()
    })
}

/// Polls the admin listener's /readyz until it answers 200.
async fn wait_ready(admin: &Endpoint) -> anyhow::Result<()> {
    let url = admin.join("/readyz");
    let client = reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(2))
        .build()?;
    let give_up = Instant::now() + READY_TIMEOUT;
    let mut last = String::new();
    while Instant::now() < give_up {
        match client.get(&url).send().await {
            Ok(response) if response.status().is_success() => return Ok(()),
            Ok(response) => last = format!("status {}", response.status()),
            Err(e) => last = format!("{e}"),
        }
        sleep(Duration::from_millis(250)).await;
    }
    bail!("{url} not ready after {READY_TIMEOUT:?}: {last}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unlabelled_metrics_are_read_from_prometheus_text() {
        let text = "# HELP x\ngateway_connections_total_x 9\ngateway_connections_total 20000\n\ngateway_connections_active 3\n";
        assert_eq!(
            metric_value(text, "gateway_connections_total"),
            Some(20000.0)
        );
        assert_eq!(metric_value(text, "gateway_connections_active"), Some(3.0));
        assert_eq!(metric_value(text, "missing"), None);
    }
}
