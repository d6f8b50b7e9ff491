//! The HTTP publisher: paced `POST /api/v1/events` in lanes that keep each group in order.
//!
//! Each lane owns whole groups and sends their events one request at a time over a keep-alive
//! connection, so a group's events reach the gateway in counter order; lanes run in parallel,
//! phase-shifted so their requests do not arrive in bursts. Every event carries the tool's
//! stamp (`lg`: group, counter, send time, step) and padding to the requested size.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use hdrhistogram::Histogram;
use reqwest::StatusCode;
use tokio::task::JoinSet;
use tokio::time::{Instant, sleep_until};
use uuid::Uuid;

use crate::cli::Endpoint;
use crate::fleet::region;
use crate::host;

/// Most lanes by default; more groups than this share lanes.
const DEFAULT_MAX_LANES: usize = 256;

/// Time one publish may take before it counts as an error.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// How to publish.
#[derive(Debug, Clone)]
pub(crate) struct PublisherConfig {
    /// The gateway's public listener.
    pub(crate) endpoint: Endpoint,
    /// Service key for the bearer header.
    pub(crate) service_key: String,
    /// Groups (regions lg-0 ..).
    pub(crate) groups: usize,
    /// Lanes, or one per group up to 256.
    pub(crate) lanes: Option<usize>,
    /// Approximate size of an event body.
    pub(crate) payload_bytes: usize,
    /// Events per request: 1 posts to `/api/v1/events`, more post arrays to
    /// `/api/v1/events/batch`.
    pub(crate) batch: usize,
}

/// What one step's publishing did.
#[derive(Debug, Clone)]
pub(crate) struct PublishTally {
    /// Events sent.
    pub(crate) attempted: u64,
    /// Accepted (202) publishes per group.
    pub(crate) accepted: Vec<u64>,
    /// Other answers, by status.
    pub(crate) rejected: BTreeMap<u16, u64>,
    /// Requests that got no answer, by reason.
    pub(crate) errors: BTreeMap<String, u64>,
    /// Request round trip, in microseconds.
    pub(crate) round_trip: Histogram<u64>,
}

/// The publisher, with each group's counter carried from step to step.
#[derive(Debug)]
pub(crate) struct Publisher {
    client: reqwest::Client,
    url: Arc<str>,
    auth: Arc<str>,
    groups: usize,
    payload_bytes: usize,
    batch: usize,
    lanes: Vec<Lane>,
}

#[derive(Debug, Default)]
struct Lane {
    index: usize,
    /// Groups this lane owns, and the next counter of each.
    groups: Vec<(usize, u64)>,
    /// The group the lane's next event goes to (its groups in turn, from step to step).
    next_slot: usize,
}

impl Publisher {
    /// Builds the HTTP client and assigns groups to lanes.
    ///
    /// # Errors
    /// When the HTTP client cannot be built.
    pub(crate) fn new(config: &PublisherConfig) -> anyhow::Result<Self> {
        let lanes = config
            .lanes
            .unwrap_or(DEFAULT_MAX_LANES)
            .clamp(1, config.groups.max(1));
        let client = reqwest::Client::builder()
            .no_proxy()
            .pool_max_idle_per_host(lanes)
            .tcp_nodelay(true)
            .timeout(REQUEST_TIMEOUT)
            .build()?;
        let mut lane_list: Vec<Lane> = (0..lanes)
            .map(|index| Lane {
                index,
                groups: Vec::new(),
                next_slot: 0,
            })
            .collect();
        for g in 0..config.groups {
            lane_list[g % lanes].groups.push((g, 0));
        }
        let batch = config.batch.max(1);
        let path = if batch == 1 {
            "/api/v1/events"
        } else {
            "/api/v1/events/batch"
        };
        Ok(Self {
            client,
            url: config.endpoint.join(path).into(),
            auth: format!("Bearer {}", config.service_key).into(),
            groups: config.groups,
            payload_bytes: config.payload_bytes,
            batch,
            lanes: lane_list,
        })
    }

    /// Lanes in use.
    pub(crate) fn lanes(&self) -> usize {
        self.lanes.len()
    }

    /// Publishes step `step` at `rate` events per second over all groups for `duration`.
    pub(crate) async fn run_step(
        &mut self,
        step: u32,
        rate: f64,
        duration: Duration,
    ) -> PublishTally {
        let start = Instant::now();
        let end = start + duration;
        let lane_count = self.lanes.len();
        let mut running = JoinSet::new();
        for lane in std::mem::take(&mut self.lanes) {
            let lane_rate = rate * lane.groups.len() as f64 / self.groups as f64;
            let phase = lane.index as f64 / lane_count as f64;
            let job = LaneJob {
                client: self.client.clone(),
                url: Arc::clone(&self.url),
                auth: Arc::clone(&self.auth),
                groups: self.groups,
                payload_bytes: self.payload_bytes,
                batch: self.batch,
                step,
                lane_rate,
                phase,
                start,
                end,
            };
            running.spawn(job.run(lane));
        }
        let mut total = PublishTally::new(self.groups);
        while let Some(joined) = running.join_next().await {
            // A lane task only ends by returning: it does not panic on network input.
            if let Ok((lane, tally)) = joined {
                total.merge(&tally);
                self.lanes.push(lane);
            }
        }
        self.lanes.sort_by_key(|lane| lane.index);
        // Lanes stop after their last send; the step lasts its full length all the same.
        sleep_until(end).await;
        total
    }
}

struct LaneJob {
    client: reqwest::Client,
    url: Arc<str>,
    auth: Arc<str>,
    groups: usize,
    payload_bytes: usize,
    batch: usize,
    step: u32,
    lane_rate: f64,
    phase: f64,
    start: Instant,
    end: Instant,
}

impl LaneJob {
    async fn run(self, mut lane: Lane) -> (Lane, PublishTally) {
        let mut tally = PublishTally::new(self.groups);
        if lane.groups.is_empty() || self.lane_rate <= 0.0 {
            return (lane, tally);
        }
        // One request per `batch` events.
        let period = self.batch as f64 / self.lane_rate;
        let mut i: u64 = 0;
        loop {
            let due = self.start + Duration::from_secs_f64((i as f64 + self.phase) * period);
            // A lane that fell behind skips what it could not send in time rather than
            // publishing past the end of the step.
            if due >= self.end || Instant::now() >= self.end {
                break;
            }
            sleep_until(due).await;
            i += 1;

            let generated_at = chrono::Utc::now().format("%Y-%m-%dT%H:%M:%SZ").to_string();
            let sent = host::now_micros();
            // The lane's groups in turn, so a group's events stay in counter order.
            let mut sent_to = Vec::with_capacity(self.batch);
            let mut bodies = Vec::with_capacity(self.batch);
            for _ in 0..self.batch {
                let slot = lane.next_slot;
                lane.next_slot = (slot + 1) % lane.groups.len();
                let (g, n) = lane.groups[slot];
                lane.groups[slot].1 += 1;
                sent_to.push(g);
                bodies.push(event_body(&Stamped {
                    g,
                    n,
                    t: sent,
                    s: self.step,
                    job: Uuid::new_v4(),
                    request: Uuid::new_v4(),
                    generated_at: &generated_at,
                    payload_bytes: self.payload_bytes,
                }));
            }
            let body = if self.batch == 1 {
                bodies.remove(0)
            } else {
                format!("[{}]", bodies.join(","))
            };
            tally.attempted += self.batch as u64;
            let answer = self
                .client
                .post(&*self.url)
                .header("authorization", &*self.auth)
                .header("content-type", "application/json")
                .body(body)
                .send()
                .await;
            match answer {
                Ok(response) => {
                    let status = response.status();
                    // Read the body so the connection can be reused.
                    let _ = response.bytes().await;
                    if status == StatusCode::ACCEPTED {
                        for g in &sent_to {
                            tally.accepted[*g] += 1;
                        }
                    } else {
                        *tally.rejected.entry(status.as_u16()).or_default() += self.batch as u64;
                    }
                }
                Err(e) => {
                    let reason = if e.is_timeout() {
                        "timeout"
                    } else if e.is_connect() {
                        "connect"
                    } else {
                        "request"
                    };
                    *tally.errors.entry(reason.to_owned()).or_default() += self.batch as u64;
                }
            }
            let round_trip = host::now_micros().saturating_sub(sent);
            tally.round_trip.saturating_record(round_trip.max(1));
        }
        (lane, tally)
    }
}

impl PublishTally {
    /// Nothing published yet, over `groups` groups.
    pub(crate) fn new(groups: usize) -> Self {
        Self {
            attempted: 0,
            accepted: vec![0; groups],
            rejected: BTreeMap::new(),
            errors: BTreeMap::new(),
            // Constant, valid bounds: creation cannot fail.
            round_trip: Histogram::new_with_bounds(1, 60_000_000, 3)
                .unwrap_or_else(|_| unreachable!()),
        }
    }

    fn merge(&mut self, other: &Self) {
        self.attempted += other.attempted;
        for (mine, theirs) in self.accepted.iter_mut().zip(&other.accepted) {
            *mine += theirs;
        }
        for (status, count) in &other.rejected {
            *self.rejected.entry(*status).or_default() += count;
        }
        for (reason, count) in &other.errors {
            *self.errors.entry(reason.clone()).or_default() += count;
        }
        let _ = self.round_trip.add(&other.round_trip);
    }

    /// Accepted publishes over all groups.
    pub(crate) fn accepted_total(&self) -> u64 {
        self.accepted.iter().sum()
    }

    /// Deliveries owed: each accepted publish times its group's members.
    pub(crate) fn expected(&self, members: &[u32]) -> u64 {
        self.accepted
            .iter()
            .zip(members)
            .map(|(accepted, members)| accepted * u64::from(*members))
            .sum()
    }

    /// Publishes that were not accepted.
    pub(crate) fn failed_total(&self) -> u64 {
        self.rejected.values().sum::<u64>() + self.errors.values().sum::<u64>()
    }
}

/// What goes into one event.
#[derive(Debug)]
pub(crate) struct Stamped<'a> {
    pub(crate) g: usize,
    pub(crate) n: u64,
    pub(crate) t: u64,
    pub(crate) s: u32,
    pub(crate) job: Uuid,
    pub(crate) request: Uuid,
    pub(crate) generated_at: &'a str,
    pub(crate) payload_bytes: usize,
}

/// The JSON body of one `RecommendationReady` event, padded to about `payload_bytes`.
pub(crate) fn event_body(e: &Stamped<'_>) -> String {
    const PAD_OVERHEAD: usize = ",\"pad\":\"\"}".len();
    let mut body = format!(
        "{{\"type\":\"RecommendationReady\",\"jobId\":\"{job}\",\"requestId\":\"{request}\",\"region\":\"{region}\",\"configVersion\":1,\"generatedAt\":\"{at}\",\"lg\":{{\"g\":{g},\"n\":{n},\"t\":{t},\"s\":{s}}}",
        job = e.job,
        request = e.request,
        region = region(e.g),
        at = e.generated_at,
        g = e.g,
        n = e.n,
        t = e.t,
        s = e.s,
    );
    let pad = e.payload_bytes.saturating_sub(body.len() + PAD_OVERHEAD);
    if pad > 0 {
        body.push_str(",\"pad\":\"");
        body.extend(std::iter::repeat_n('x', pad));
        body.push('"');
    }
    body.push('}');
    body
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::signalr::{Incoming, Stamp};

    fn stamped(payload_bytes: usize) -> Stamped<'static> {
        Stamped {
            g: 7,
            n: 123,
            t: 456_789,
            s: 2,
            job: Uuid::nil(),
            request: Uuid::nil(),
            generated_at: "2025-11-08T12:34:56Z",
            payload_bytes,
        }
    }

    #[test]
    fn events_are_padded_to_the_requested_size() {
        for size in [300, 512, 1900] {
            let body = event_body(&stamped(size));
            assert_eq!(body.len(), size);
            let json: serde_json::Value = serde_json::from_str(&body).unwrap();
            assert_eq!(json["region"], "lg-7");
            assert_eq!(json["type"], "RecommendationReady");
        }
        let small = event_body(&stamped(10));
        assert!(!small.contains("pad"));
        serde_json::from_str::<serde_json::Value>(&small).unwrap();
    }

    #[test]
    fn the_stamp_reads_back_from_a_delivery() {
        let body = event_body(&stamped(300));
        let record =
            format!("{{\"type\":1,\"target\":\"RecommendationReady\",\"arguments\":[{body}]}}");
        assert_eq!(
            Incoming::parse(&record),
            Incoming::Delivery(Some(Stamp {
                g: 7,
                n: 123,
                t: 456_789,
                s: 2
            }))
        );
    }

    #[test]
    fn expected_multiplies_accepted_by_members() {
        let mut tally = PublishTally::new(3);
        tally.accepted = vec![10, 0, 5];
        assert_eq!(tally.expected(&[100, 100, 2]), 1010);
        assert_eq!(tally.accepted_total(), 15);
    }
}
