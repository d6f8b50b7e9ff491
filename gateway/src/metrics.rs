//! Every metric the gateway exports: names, descriptions and typed helpers.
//!
//! Metric name strings appear nowhere else. Labels come from enums (`reason`, `outcome`,
//! `source`) and never carry user ids, group names or other unbounded values.

use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use metrics::{
    Unit, counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram,
};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

pub(crate) const CONNECTIONS_ACTIVE: &str = "gateway_connections_active";
const CONNECTIONS_TOTAL: &str = "gateway_connections_total";
pub(crate) const CONNECTIONS_CLOSED: &str = "gateway_connections_closed_total";
const HANDSHAKE_FAILURES: &str = "gateway_handshake_failures_total";
const STATEFUL_TRANSPORTS: &str = "gateway_stateful_transports_total";
const AUTH_FAILURES: &str = "gateway_auth_failures_total";
const ORIGIN_REFUSALS: &str = "gateway_origin_refusals_total";
const JOINS: &str = "gateway_joins_total";
const GROUPS_ACTIVE: &str = "gateway_groups_active";
const GROUP_MEMBERS: &str = "gateway_group_members";
const EVENTS_PUBLISHED: &str = "gateway_events_published_total";
const EVENTS_REJECTED: &str = "gateway_events_rejected_total";
const FRAMES_DELIVERED: &str = "gateway_frames_delivered_total";
const SLOW_CONSUMER_CLOSES: &str = "gateway_slow_consumer_closes_total";
const PUBLISH_TO_DELIVERY: &str = "gateway_publish_to_delivery_seconds";
const BROKER_UP: &str = "gateway_broker_up";
const BROKER_RECONNECT_ATTEMPTS: &str = "gateway_broker_reconnect_attempts_total";
const BROKER_RECONNECTS: &str = "gateway_broker_reconnects_total";
const BROKER_RESUBSCRIBES: &str = "gateway_broker_resubscribes_total";
const BROKER_OUTAGE: &str = "gateway_broker_outage_seconds";
const BROKER_MESSAGES_DROPPED: &str = "gateway_broker_messages_dropped_total";
const BROKER_DUPLICATES: &str = "gateway_broker_duplicates_dropped_total";
const BROKER_GAP_REPAIRS: &str = "gateway_broker_gap_repairs_total";
const BROKER_GAPS_UNRECOVERED: &str = "gateway_broker_gaps_unrecovered_total";
const EVENTS_RECEIVED: &str = "gateway_events_received_total";
const ENVELOPES_REJECTED: &str = "gateway_envelopes_rejected_total";
const RUNTIME_TASKS_ALIVE: &str = "gateway_runtime_tasks_alive";
pub(crate) const LIMIT_EXCEEDED: &str = "gateway_limit_exceeded_total";

/// Latency buckets, in seconds: sub-millisecond fan-out up to multi-second stalls.
const LATENCY_BUCKETS: [f64; 14] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// Outage buckets, in seconds: a blip up to a long Redis restart.
const OUTAGE_BUCKETS: [f64; 10] = [0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0];

/// Installs the process-wide Prometheus recorder once and returns its handle.
///
/// The `metrics` facade has one global recorder per process, so gateways started in the same
/// process (tests) share it; later calls return the first handle.
///
/// # Errors
/// When another recorder was installed by someone else first.
pub fn install() -> anyhow::Result<PrometheusHandle> {
    static HANDLE: Mutex<Option<PrometheusHandle>> = Mutex::new(None);
    let mut installed = HANDLE.lock().unwrap_or_else(PoisonError::into_inner);
    if let Some(handle) = installed.as_ref() {
        return Ok(handle.clone());
    }
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(
            metrics_exporter_prometheus::Matcher::Full(PUBLISH_TO_DELIVERY.to_owned()),
            &LATENCY_BUCKETS,
        )?
        .set_buckets_for_metric(
            metrics_exporter_prometheus::Matcher::Full(BROKER_OUTAGE.to_owned()),
            &OUTAGE_BUCKETS,
        )?
        .install_recorder()?;
    describe();
    // Gauges a scrape should see before anything joins.
    groups_active(0);
    group_members(0);
    *installed = Some(handle.clone());
    Ok(handle)
}

fn describe() {
    describe_gauge!(CONNECTIONS_ACTIVE, "WebSocket connections currently open");
    describe_counter!(
        CONNECTIONS_TOTAL,
        "WebSocket connections accepted since start"
    );
    describe_counter!(CONNECTIONS_CLOSED, "connections closed, by reason");
    describe_counter!(HANDSHAKE_FAILURES, "SignalR handshakes refused, by reason");
    describe_counter!(
        STATEFUL_TRANSPORTS,
        "stateful reconnect: transports lost, resumed, refused (the connection had ended) and grace periods expired"
    );
    describe_counter!(
        AUTH_FAILURES,
        "requests refused for their token or key, by reason and endpoint"
    );
    describe_counter!(
        ORIGIN_REFUSALS,
        "requests refused for their Origin header, by endpoint"
    );
    describe_counter!(
        JOINS,
        "group joins, by outcome (joined or the refusal reason)"
    );
    describe_gauge!(
        GROUPS_ACTIVE,
        "groups with at least one member on this replica"
    );
    describe_gauge!(
        GROUP_MEMBERS,
        "group memberships on this replica, summed over its groups"
    );
    describe_counter!(
        EVENTS_PUBLISHED,
        "events accepted for publishing, by source"
    );
    describe_counter!(
        EVENTS_REJECTED,
        "events refused at the HTTP endpoint, by reason"
    );
    describe_counter!(FRAMES_DELIVERED, "event frames queued to connections");
    describe_counter!(
        SLOW_CONSUMER_CLOSES,
        "connections closed because they could not keep up"
    );
    describe_histogram!(
        PUBLISH_TO_DELIVERY,
        Unit::Seconds,
        "time from publish to fan-out on this replica"
    );
    describe_gauge!(BROKER_UP, "1 when the broker is connected and healthy");
    describe_counter!(
        BROKER_RECONNECT_ATTEMPTS,
        "failed or lost broker connections followed by a retry"
    );
    describe_counter!(
        BROKER_RECONNECTS,
        "broker subscriber reconnections that succeeded"
    );
    describe_counter!(
        BROKER_RESUBSCRIBES,
        "cluster channels subscribed again after a node dropped them (their slot moved)"
    );
    describe_histogram!(
        BROKER_OUTAGE,
        Unit::Seconds,
        "how long each broker subscriber outage lasted, from loss to re-subscribed"
    );
    describe_counter!(
        BROKER_DUPLICATES,
        "broker messages dropped because their position was already delivered"
    );
    describe_counter!(
        BROKER_GAP_REPAIRS,
        "history reads started to fill a gap in a group's sequence or after a reconnect"
    );
    describe_counter!(
        BROKER_GAPS_UNRECOVERED,
        "gaps the history could not fill (clients see the jump and resync)"
    );
    describe_counter!(
        BROKER_MESSAGES_DROPPED,
        "broker messages dropped because fan-out fell behind and the subscriber buffer was full"
    );
    describe_counter!(
        EVENTS_RECEIVED,
        "publications received from the broker, by source"
    );
    describe_counter!(
        LIMIT_EXCEEDED,
        "requests, connections and invocations refused by a limit, by limit"
    );
    describe_counter!(
        ENVELOPES_REJECTED,
        "broker messages dropped because they were not envelopes, by reason"
    );
    describe_gauge!(
        RUNTIME_TASKS_ALIVE,
        "tokio tasks alive in the gateway's runtime, read at each scrape (a leak shows as growth)"
    );
}

/// A connection was accepted.
pub fn connection_opened() {
    counter!(CONNECTIONS_TOTAL).increment(1);
    gauge!(CONNECTIONS_ACTIVE).increment(1.0);
}

/// A connection ended for `reason`.
pub fn connection_closed(reason: &'static str) {
    gauge!(CONNECTIONS_ACTIVE).decrement(1.0);
    counter!(CONNECTIONS_CLOSED, "reason" => reason).increment(1);
}

/// Stateful reconnect: a transport was `lost`, `resumed`, `refused` or its grace `expired`.
pub fn stateful_transport(outcome: &'static str) {
    counter!(STATEFUL_TRANSPORTS, "outcome" => outcome).increment(1);
}

/// A handshake was refused.
pub fn handshake_failed(reason: &'static str) {
    counter!(HANDSHAKE_FAILURES, "reason" => reason).increment(1);
}

/// A token or service key was refused at `endpoint` (`negotiate`, `upgrade`, `publish`).
pub fn auth_failed(endpoint: &'static str, reason: &'static str) {
    counter!(AUTH_FAILURES, "endpoint" => endpoint, "reason" => reason).increment(1);
}

/// A request was refused for its Origin at `endpoint`.
pub fn origin_refused(endpoint: &'static str) {
    counter!(ORIGIN_REFUSALS, "endpoint" => endpoint).increment(1);
}

/// A join ended with `outcome`: `joined`, or the refusal label.
pub fn join(outcome: &'static str) {
    counter!(JOINS, "outcome" => outcome).increment(1);
}

/// The number of groups with local members changed.
pub fn groups_active(count: usize) {
    gauge!(GROUPS_ACTIVE).set(count as f64);
}

/// The number of memberships on this replica changed.
pub fn group_members(count: usize) {
    gauge!(GROUP_MEMBERS).set(count as f64);
}

/// An event was accepted from `source` (`http`, `redis`).
pub fn event_published(source: &'static str) {
    counter!(EVENTS_PUBLISHED, "source" => source).increment(1);
}

/// An event was refused at the HTTP endpoint.
pub fn event_rejected(reason: &'static str) {
    counter!(EVENTS_REJECTED, "reason" => reason).increment(1);
}

/// One publication was fanned out to `frames` connections, `latency` after it was published.
pub fn fanned_out(frames: usize, latency: Duration) {
    counter!(FRAMES_DELIVERED).increment(frames as u64);
    histogram!(PUBLISH_TO_DELIVERY).record(latency.as_secs_f64());
}

/// `count` connections were closed because their queue was full.
pub fn slow_consumers_closed(count: usize) {
    counter!(SLOW_CONSUMER_CLOSES).increment(count as u64);
}

/// The broker subscriber will try to connect again.
pub fn broker_reconnect_attempt() {
    counter!(BROKER_RECONNECT_ATTEMPTS).increment(1);
}

/// A cluster channel dropped by its node (slot moved) is subscribed again.
pub fn broker_resubscribed() {
    counter!(BROKER_RESUBSCRIBES).increment(1);
}

/// The broker subscriber is connected again after `down`.
pub fn broker_reconnected(down: Duration) {
    counter!(BROKER_RECONNECTS).increment(1);
    histogram!(BROKER_OUTAGE).record(down.as_secs_f64());
}

/// The subscriber's buffer was full and a message was dropped.
pub fn broker_message_dropped() {
    counter!(BROKER_MESSAGES_DROPPED).increment(1);
}

/// A message repeated a position already delivered and was dropped.
pub fn broker_duplicate_dropped() {
    counter!(BROKER_DUPLICATES).increment(1);
}

/// A gap in a group's sequence (or a reconnect) started a read of the history.
pub fn broker_gap_repair() {
    counter!(BROKER_GAP_REPAIRS).increment(1);
}

/// A gap could not be filled from the history.
pub fn broker_gap_unrecovered() {
    counter!(BROKER_GAPS_UNRECOVERED).increment(1);
}

/// A publication arrived from the broker (`redis`).
pub fn event_received(source: &'static str) {
    counter!(EVENTS_RECEIVED, "source" => source).increment(1);
}

/// A broker message was not an envelope.
pub fn envelope_rejected(reason: &'static str) {
    counter!(ENVELOPES_REJECTED, "reason" => reason).increment(1);
}

/// `count` tokio tasks are alive in the runtime (set when `/metrics` is scraped).
pub fn runtime_tasks_alive(count: usize) {
    gauge!(RUNTIME_TASKS_ALIVE).set(count as f64);
}

/// The broker's health changed.
pub fn broker_up(up: bool) {
    gauge!(BROKER_UP).set(if up { 1.0 } else { 0.0 });
}

/// Something was refused by `limit` (a fixed label such as `connections_per_user`).
pub fn limit_exceeded(limit: &'static str) {
    counter!(LIMIT_EXCEEDED, "limit" => limit).increment(1);
}
