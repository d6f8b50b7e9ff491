//! Turning measurements into report rows and markdown; pure.
//!
//! A `StepRow` is computed from what the publisher sent, what the connections received and the
//! CPU counters around the step. The markdown is meant to be pasted into docs/benchmarks.md;
//! the same rows serialize as JSON lines.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::Serialize;

use crate::fleet::ConnectReport;
use crate::host::CpuTicks;
use crate::publisher::PublishTally;
use crate::tally::StepTally;

/// The objective a step must meet: p99 under this many milliseconds, and nothing lost.
pub(crate) const OBJECTIVE_P99_MS: f64 = 50.0;

/// What one step measured.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct StepRow {
    /// Step index, from 0.
    pub(crate) step: u32,
    /// Publishes per second asked for.
    pub(crate) target_rate: f64,
    /// Publishes per second sent.
    pub(crate) attempted_per_sec: f64,
    /// Publishes per second accepted (202).
    pub(crate) accepted_per_sec: f64,
    /// Publishes not accepted (other status or no answer).
    pub(crate) publish_failed: u64,
    /// Why publishes were not accepted, by status or error.
    pub(crate) publish_failures: BTreeMap<String, u64>,
    /// 99th percentile of the publish round trip, in ms.
    pub(crate) publish_p99_ms: f64,
    /// Group members at the start of the step, over all groups.
    pub(crate) members: u64,
    /// Group members before the first step, over all groups.
    pub(crate) initial_members: u64,
    /// Deliveries owed: accepted publishes times their group's members.
    pub(crate) expected: u64,
    /// First copies received.
    pub(crate) delivered: u64,
    /// First copies per second of publishing.
    pub(crate) deliveries_per_sec: f64,
    /// `expected - delivered`; negative when more arrived than were owed.
    pub(crate) lost: i64,
    /// Copies of a counter already seen on the connection.
    pub(crate) duplicates: u64,
    /// First copies that arrived after a higher counter.
    pub(crate) reordered: u64,
    /// Deliveries of an earlier step that arrived after its drain.
    pub(crate) late: u64,
    /// Deliveries for a group the connection did not join.
    pub(crate) misrouted: u64,
    /// `RecommendationReady` invocations without a readable stamp.
    pub(crate) unstamped: u64,
    /// Connections the server or network ended during the step.
    pub(crate) ended: u64,
    /// Delivery latency, in ms.
    pub(crate) p50_ms: f64,
    /// Delivery latency, in ms.
    pub(crate) p99_ms: f64,
    /// Delivery latency, in ms.
    pub(crate) p999_ms: f64,
    /// Delivery latency, in ms.
    pub(crate) max_ms: f64,
    /// Gateway CPU over the publishing window, in % of one core.
    pub(crate) gateway_cpu_pct: Option<f64>,
    /// Gateway user time per delivered frame (first copies and duplicates), over publish and
    /// drain, in µs.
    pub(crate) user_us_per_delivery: Option<f64>,
    /// Gateway system time per delivered frame, in µs.
    pub(crate) system_us_per_delivery: Option<f64>,
    /// CPU of each load process over the publishing window, in % of one core (this one first).
    pub(crate) tool_cpu_pct: Vec<f64>,
    /// 99th percentile of the load processes' runtime lag (a 5 ms timer woken late), in ms.
    pub(crate) tool_lag_p99_ms: f64,
    /// Largest runtime lag of the load processes, in ms.
    pub(crate) tool_lag_max_ms: f64,
    /// CPU of every other process over the publishing window, in % of one core (a lower
    /// bound): high values mean a noisy machine, and the step should be rerun.
    pub(crate) other_pct: f64,
    /// p99 under the objective, nothing lost or failed, no connection lost before or during.
    pub(crate) meets_objective: bool,
}

/// What a step's row is computed from.
#[derive(Debug)]
pub(crate) struct StepInputs<'a> {
    /// Step index.
    pub(crate) step: u32,
    /// Publishes per second asked for.
    pub(crate) rate: f64,
    /// Length of the publishing window, in seconds.
    pub(crate) publish_secs: f64,
    /// What the publisher did.
    pub(crate) published: &'a PublishTally,
    /// Members per group at the start of the step.
    pub(crate) members: &'a [u32],
    /// Members over all groups once the connections were opened, before the first step.
    pub(crate) initial_members: u64,
    /// What the connections received.
    pub(crate) received: &'a StepTally,
    /// Gateway CPU over the publishing window.
    pub(crate) gateway_publish: Option<CpuTicks>,
    /// Gateway CPU over publishing and drain.
    pub(crate) gateway_step: Option<CpuTicks>,
    /// Each load process's CPU over the publishing window.
    pub(crate) tool: &'a [CpuTicks],
    /// Ticks of every other process over the publishing window.
    pub(crate) other: u64,
    /// Clock ticks per second.
    pub(crate) ticks_per_sec: u64,
    /// Connections ended during the step.
    pub(crate) ended: u64,
}

impl StepRow {
    /// Computes a row.
    pub(crate) fn new(i: &StepInputs<'_>) -> Self {
        let secs = i.publish_secs.max(f64::MIN_POSITIVE);
        let tick_us = 1e6 / i.ticks_per_sec.max(1) as f64;
        let cpu_pct = |ticks: CpuTicks| ticks.total() as f64 * tick_us / 1e6 / secs * 100.0;
        let expected = i.published.expected(i.members);
        let received = i.received;
        let lost = i64::try_from(expected).unwrap_or(i64::MAX)
            - i64::try_from(received.delivered).unwrap_or(i64::MAX);
        let frames = received.frames();
        let per_delivery =
            |ticks: u64| (frames > 0).then(|| ticks as f64 * tick_us / frames as f64);
        let p99_ms = received.latency_ms(0.99);
        let publish_failed = i.published.failed_total();
        let members: u64 = i.members.iter().map(|m| u64::from(*m)).sum();
        let gateway_cpu_pct = i.gateway_publish.map(cpu_pct);
        let tool_cpu_pct: Vec<f64> = i.tool.iter().map(|t| cpu_pct(*t)).collect();
        Self {
            step: i.step,
            target_rate: i.rate,
            attempted_per_sec: i.published.attempted as f64 / secs,
            accepted_per_sec: i.published.accepted_total() as f64 / secs,
            publish_failed,
            publish_failures: i
                .published
                .rejected
                .iter()
                .map(|(status, count)| (format!("HTTP {status}"), *count))
                .chain(i.published.errors.clone())
                .collect(),
            publish_p99_ms: i.published.round_trip.value_at_quantile(0.99) as f64 / 1000.0,
            members,
            initial_members: i.initial_members,
            expected,
            delivered: received.delivered,
            deliveries_per_sec: received.delivered as f64 / secs,
            lost,
            duplicates: received.duplicates,
            reordered: received.reordered,
            late: received.late,
            misrouted: received.misrouted,
            unstamped: received.unstamped,
            ended: i.ended,
            p50_ms: received.latency_ms(0.5),
            p99_ms,
            p999_ms: received.latency_ms(0.999),
            max_ms: received.max_latency_ms(),
            gateway_cpu_pct,
            user_us_per_delivery: i.gateway_step.and_then(|t| per_delivery(t.user)),
            system_us_per_delivery: i.gateway_step.and_then(|t| per_delivery(t.system)),
            tool_cpu_pct,
            tool_lag_p99_ms: received.tool_lag_ms(0.99),
            tool_lag_max_ms: received.tool_lag_ms(1.0),
            other_pct: cpu_pct(CpuTicks {
                user: i.other,
                system: 0,
            }),
            meets_objective: p99_ms < OBJECTIVE_P99_MS
                && lost <= 0
                && publish_failed == 0
                && received.delivered > 0
                && i.ended == 0
                && members == i.initial_members,
        }
    }
}

/// What `run` and `idle` both report: the connections asked for and how opening them went.
/// Flattened into their JSON, so its fields stand beside theirs.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Opened {
    /// Connections asked for.
    pub(crate) connections: usize,
    /// Groups joined (0: none).
    pub(crate) groups: usize,
    /// Load processes.
    pub(crate) processes: usize,
    /// How connecting went.
    pub(crate) connect: ConnectReport,
    /// Gateway RSS with no connections from this run, in KiB.
    pub(crate) rss_before_kib: Option<u64>,
    /// Connections the gateway had accepted before this run (from /metrics).
    pub(crate) prior_connections: Option<u64>,
}

impl Opened {
    /// The report's lines on connecting and on a gateway that served connections before.
    fn connect_lines(&self) -> String {
        let mut out = format!("- {}\n", connect_line(&self.connect, self.processes));
        if let Some(note) = reused_note(self.prior_connections) {
            let _ = writeln!(out, "- {note}");
        }
        out
    }
}

/// The setting of a `run`, for the report's heading.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct RunSetting {
    /// Connections, groups, processes, RSS before.
    #[serde(flatten)]
    pub(crate) opened: Opened,
    /// Event size, in bytes.
    pub(crate) payload_bytes: usize,
    /// Publishing per step, in seconds.
    pub(crate) step_secs: u64,
    /// Drain per step, in seconds.
    pub(crate) drain_secs: u64,
    /// Publisher lanes.
    pub(crate) lanes: usize,
    /// Gateway RSS with the connections held, before publishing, in KiB.
    pub(crate) rss_connected_kib: Option<u64>,
    /// Gateway RSS after the last step, in KiB.
    pub(crate) rss_after_kib: Option<u64>,
    /// Why the run stopped before its last step, if it did.
    pub(crate) cut_short: Option<String>,
}

/// What `idle` measured.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct IdleRow {
    /// Connections, groups, processes, RSS before.
    #[serde(flatten)]
    pub(crate) opened: Opened,
    /// Seconds of settling before the reading.
    pub(crate) settle_secs: u64,
    /// Gateway RSS with the connections held and settled, in KiB.
    pub(crate) rss_held_kib: Option<u64>,
    /// Gateway RSS after closing them, in KiB.
    pub(crate) rss_after_close_kib: Option<u64>,
    /// `(held - before) / connected`, in KiB.
    pub(crate) kib_per_connection: Option<f64>,
    /// Gateway CPU while the connections sat idle, in % of one core.
    pub(crate) gateway_idle_cpu_pct: Option<f64>,
    /// Connections ended while held, by reason.
    pub(crate) ended: BTreeMap<String, u64>,
}

/// RSS growth per connection, in KiB.
pub(crate) fn kib_per_connection(
    before: Option<u64>,
    after: Option<u64>,
    connections: u64,
) -> Option<f64> {
    match (before, after) {
        (Some(before), Some(after)) if connections > 0 => {
            Some((after as f64 - before as f64) / connections as f64)
        }
        _ => None,
    }
}

/// The markdown report of a `run`.
pub(crate) fn run_markdown(setting: &RunSetting, rows: &[StepRow]) -> String {
    let mut out = String::new();
    let s = setting;
    let o = &s.opened;
    let _ = writeln!(
        out,
        "## loadgen run: {} connections in {} groups, {}-byte events, {} s steps + {} s drain\n",
        o.connections, o.groups, s.payload_bytes, s.step_secs, s.drain_secs
    );
    out.push_str(&o.connect_lines());
    let held = o.connect.ok;
    let _ = writeln!(
        out,
        "- gateway RSS: {} before connecting, {} with {held} connections ({} KiB each), {} after the last step",
        kib(o.rss_before_kib),
        kib(s.rss_connected_kib),
        opt(
            kib_per_connection(o.rss_before_kib, s.rss_connected_kib, held),
            1
        ),
        kib(s.rss_after_kib),
    );
    let _ = writeln!(
        out,
        "- publisher: {} lanes (one request in flight per lane)",
        s.lanes
    );
    if let Some(reason) = &s.cut_short {
        let _ = writeln!(out, "- **cut short**: {reason}");
    }
    let _ = writeln!(out);
    let _ = writeln!(
        out,
        "| step | pub/s target | pub/s accepted | pub RTT p99 ms | deliveries/s | expected | lost | dup | reordered | p50 ms | p99 ms | p99.9 ms | max ms | gw CPU % | gw user µs/dlv | gw sys µs/dlv | tool CPU % | tool lag p99 ms | other procs CPU % | ok |"
    );
    let _ = writeln!(out, "|{}", "---|".repeat(20));
    for r in rows {
        let tool = joined(&r.tool_cpu_pct);
        let _ = writeln!(
            out,
            "| {} | {:.0} | {:.0} | {:.1} | {:.0} | {} | {} | {} | {} | {:.1} | {:.1} | {:.1} | {:.1} | {} | {} | {} | {} | {:.1} | {:.0} | {} |",
            r.step,
            r.target_rate,
            r.accepted_per_sec,
            r.publish_p99_ms,
            r.deliveries_per_sec,
            r.expected,
            r.lost,
            r.duplicates,
            r.reordered,
            r.p50_ms,
            r.p99_ms,
            r.p999_ms,
            r.max_ms,
            opt(r.gateway_cpu_pct, 0),
            opt(r.user_us_per_delivery, 2),
            opt(r.system_us_per_delivery, 2),
            tool,
            r.tool_lag_p99_ms,
            r.other_pct,
            if r.meets_objective { "yes" } else { "no" },
        );
    }
    let _ = writeln!(out);
    match rows.iter().rfind(|r| r.meets_objective) {
        Some(best) => {
            let _ = writeln!(
                out,
                "Best step with p99 < {OBJECTIVE_P99_MS} ms and nothing lost: step {} ({:.0} publishes/s, {:.0} deliveries/s, p99 {:.1} ms).",
                best.step, best.accepted_per_sec, best.deliveries_per_sec, best.p99_ms
            );
        }
        None => {
            let _ = writeln!(
                out,
                "No step met p99 < {OBJECTIVE_P99_MS} ms with nothing lost."
            );
        }
    }
    for r in rows {
        let mut notes = Vec::new();
        if r.publish_failed > 0 {
            notes.push(format!(
                "{} publishes not accepted ({})",
                r.publish_failed,
                reasons(&r.publish_failures)
            ));
        }
        for (count, what) in [
            (r.late, "late deliveries (after the drain)"),
            (r.misrouted, "deliveries to a group not joined"),
            (r.unstamped, "events without a stamp"),
            (r.ended, "connections ended by the server or network"),
        ] {
            if count > 0 {
                notes.push(format!("{count} {what}"));
            }
        }
        if r.members < r.initial_members {
            notes.push(format!(
                "only {} of {} group members left at the start",
                r.members, r.initial_members
            ));
        }
        if r.attempted_per_sec < r.target_rate * 0.97 {
            notes.push(format!(
                "the publisher fell behind ({:.0} of {:.0} publishes/s sent; one request in flight per lane, publish p99 {:.1} ms)",
                r.attempted_per_sec, r.target_rate, r.publish_p99_ms
            ));
        }
        if !notes.is_empty() {
            let _ = writeln!(out, "- step {}: {}", r.step, notes.join(", "));
        }
    }
    out
}

/// The markdown report of `idle`.
pub(crate) fn idle_markdown(row: &IdleRow) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "## loadgen idle: {} connections, {} groups, {} s settling\n",
        row.opened.connections, row.opened.groups, row.settle_secs
    );
    out.push_str(&row.opened.connect_lines());
    let _ = writeln!(out);
    let _ = writeln!(
        out,
        "| connections held | RSS before | RSS held | RSS after close | KiB per connection | gw CPU % idle |"
    );
    let _ = writeln!(out, "|---|---|---|---|---|---|");
    let _ = writeln!(
        out,
        "| {} | {} | {} | {} | {} | {} |",
        row.opened.connect.ok,
        kib(row.opened.rss_before_kib),
        kib(row.rss_held_kib),
        kib(row.rss_after_close_kib),
        opt(row.kib_per_connection, 1),
        opt(row.gateway_idle_cpu_pct, 1),
    );
    if !row.ended.is_empty() {
        let _ = writeln!(
            out,
            "\nConnections ended while held: {}",
            reasons(&row.ended)
        );
    }
    out
}

fn reused_note(prior_connections: Option<u64>) -> Option<String> {
    prior_connections.filter(|n| *n > 0).map(|n| {
        format!(
            "**note**: the gateway had served {n} connections before; memory it kept from them hides in \"RSS before\", so KiB per connection is only meaningful from a fresh gateway"
        )
    })
}

fn connect_line(connect: &ConnectReport, processes: usize) -> String {
    let mut line = format!(
        "connections: {} ready, {} failed, in {:.1} s over {} load process(es)",
        connect.ok,
        connect.failed_total(),
        connect.secs,
        processes
    );
    if !connect.failed.is_empty() {
        let _ = write!(line, " (failures: {})", reasons(&connect.failed));
    }
    line
}

/// `reason ×count` pairs, most frequent first, at most five.
pub(crate) fn reasons(by_reason: &BTreeMap<String, u64>) -> String {
    let mut pairs: Vec<_> = by_reason.iter().collect();
    pairs.sort_by(|a, b| b.1.cmp(a.1));
    pairs
        .iter()
        .take(5)
        .map(|(reason, count)| format!("{reason} ×{count}"))
        .collect::<Vec<_>>()
        .join("; ")
}

/// Percentages as `12+34`.
fn joined(percentages: &[f64]) -> String {
    percentages
        .iter()
        .map(|pct| format!("{pct:.0}"))
        .collect::<Vec<_>>()
        .join("+")
}

fn kib(value: Option<u64>) -> String {
    value.map_or_else(
        || "-".to_owned(),
        |kib| format!("{:.1} MiB", kib as f64 / 1024.0),
    )
}

fn opt(value: Option<f64>, decimals: usize) -> String {
    value.map_or_else(|| "-".to_owned(), |v| format!("{v:.decimals$}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tally::Verdict;

    fn published(accepted: Vec<u64>) -> PublishTally {
        let mut tally = PublishTally::new(accepted.len());
        tally.accepted = accepted;
        tally
    }

    #[test]
    fn a_step_row_counts_loss_and_cpu_per_delivery() {
        let published = published(vec![100, 100]);
        let mut received = StepTally::default();
        for _ in 0..1_990 {
            received.record(Verdict::InOrder, 2_000);
        }
        for _ in 0..10 {
            received.record(Verdict::Duplicate, 0);
        }
        let row = StepRow::new(&StepInputs {
            step: 1,
            rate: 20.0,
            publish_secs: 10.0,
            published: &published,
            members: &[10, 10],
            initial_members: 20,
            received: &received,
            gateway_publish: Some(CpuTicks {
                user: 50,
                system: 150,
            }),
            gateway_step: Some(CpuTicks {
                user: 100,
                system: 300,
            }),
            tool: &[CpuTicks {
                user: 400,
                system: 100,
            }],
            other: 250,
            ticks_per_sec: 100,
            ended: 0,
        });
        assert_eq!(
            (row.expected, row.delivered, row.lost, row.duplicates),
            (2000, 1990, 10, 10)
        );
        assert!((row.deliveries_per_sec - 199.0).abs() < 1e-9);
        // 1 s of user time over 2,000 frames.
        assert!((row.user_us_per_delivery.unwrap() - 500.0).abs() < 1e-9);
        assert!((row.system_us_per_delivery.unwrap() - 1500.0).abs() < 1e-9);
        assert!((row.gateway_cpu_pct.unwrap() - 20.0).abs() < 1e-9);
        assert!((row.tool_cpu_pct[0] - 50.0).abs() < 1e-9);
        assert!((row.other_pct - 25.0).abs() < 1e-9);
        assert!((row.p99_ms - 2.0).abs() < 0.01);
        assert!(!row.meets_objective, "10 deliveries were lost");
    }

    #[test]
    fn the_markdown_table_has_one_line_per_step() {
        let published = published(vec![10]);
        let mut received = StepTally::default();
        for _ in 0..10 {
            received.record(Verdict::InOrder, 1_000);
        }
        let row = StepRow::new(&StepInputs {
            step: 0,
            rate: 1.0,
            publish_secs: 10.0,
            published: &published,
            members: &[1],
            initial_members: 1,
            received: &received,
            gateway_publish: None,
            gateway_step: None,
            tool: &[CpuTicks::default()],
            other: 0,
            ticks_per_sec: 100,
            ended: 0,
        });
        assert!(row.meets_objective);
        let setting = RunSetting {
            opened: Opened {
                connections: 1,
                groups: 1,
                processes: 1,
                connect: ConnectReport::default(),
                rss_before_kib: None,
                prior_connections: Some(0),
            },
            payload_bytes: 300,
            step_secs: 10,
            drain_secs: 3,
            lanes: 1,
            rss_connected_kib: None,
            rss_after_kib: None,
            cut_short: None,
        };
        let text = run_markdown(&setting, &[row.clone(), row]);
        assert_eq!(text.lines().filter(|l| l.starts_with("| 0 |")).count(), 2);
        let cells = |line: &str| line.matches('|').count();
        let table: Vec<&str> = text.lines().filter(|l| l.starts_with('|')).collect();
        assert!(table.iter().all(|line| cells(line) == cells(table[0])));
        assert!(text.contains("Best step"));
    }
}
