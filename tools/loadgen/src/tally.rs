//! Accounting of deliveries: first copies, duplicates, reordering and latency; pure.
//!
//! `Order` follows one connection's per-group counter and classifies each arrival. `StepTally`
//! sums a step's arrivals and latencies and merges across connections and processes, and
//! `Ledger` keeps one open tally per step so deliveries are counted against the step that
//! published them, however late they arrive. Nothing here reads a clock or a socket.

use std::collections::{BTreeMap, VecDeque};
use std::ops::Range;

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

/// Out-of-order gaps one connection remembers; past this the oldest is forgotten, and a
/// late first copy from it is counted as a duplicate.
const MAX_GAPS: usize = 256;

/// Highest latency the histograms hold, in microseconds; larger values are clamped.
const MAX_LATENCY_MICROS: u64 = 120_000_000;

/// How an arrival relates to what the connection already saw.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// A first copy, not lower than any counter seen before.
    InOrder,
    /// A first copy of a counter lower than the highest already seen.
    Reordered,
    /// A counter seen before on this connection.
    Duplicate,
}

/// One connection's view of its group's counter.
#[derive(Debug, Default)]
pub(crate) struct Order {
    /// One past the highest counter seen.
    next: u64,
    /// Counters below `next` not seen yet, as sorted, disjoint ranges.
    gaps: VecDeque<Range<u64>>,
}

impl Order {
    /// Classifies the arrival of counter `n`.
    pub(crate) fn observe(&mut self, n: u64) -> Verdict {
        if n >= self.next {
            if n > self.next {
                if self.gaps.len() == MAX_GAPS {
                    self.gaps.pop_front();
                }
                self.gaps.push_back(self.next..n);
            }
            self.next = n + 1;
            return Verdict::InOrder;
        }
        let Some(at) = self.gaps.iter().position(|gap| gap.contains(&n)) else {
            return Verdict::Duplicate;
        };
        let gap = self.gaps[at].clone();
        match (gap.start == n, gap.end == n + 1) {
            (true, true) => {
                self.gaps.remove(at);
            }
            (true, false) => self.gaps[at].start = n + 1,
            (false, true) => self.gaps[at].end = n,
            (false, false) => {
                self.gaps[at].end = n;
                self.gaps.insert(at + 1, n + 1..gap.end);
            }
        }
        Verdict::Reordered
    }
}

/// What one step's deliveries added up to, on some set of connections; it crosses the pipe
/// between load processes as JSON, each histogram as its recorded buckets.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct StepTally {
    /// First copies (in order or reordered).
    pub(crate) delivered: u64,
    /// Copies of a counter already seen.
    pub(crate) duplicates: u64,
    /// First copies that arrived after a higher counter.
    pub(crate) reordered: u64,
    /// Deliveries of earlier steps that arrived after those steps were collected.
    pub(crate) late: u64,
    /// Invocations without a readable stamp.
    pub(crate) unstamped: u64,
    /// Deliveries stamped for a group the connection did not join.
    pub(crate) misrouted: u64,
    /// Latency of first copies, in microseconds.
    #[serde(with = "buckets")]
    pub(crate) latency: Histogram<u64>,
    /// How late the load process's runtime woke a 5 ms timer, in microseconds: when this is
    /// near the latency, the tool and not the gateway made the deliveries late.
    #[serde(with = "buckets")]
    pub(crate) tool_lag: Histogram<u64>,
}

impl Default for StepTally {
    fn default() -> Self {
        Self {
            delivered: 0,
            duplicates: 0,
            reordered: 0,
            late: 0,
            unstamped: 0,
            misrouted: 0,
            latency: new_histogram(),
            tool_lag: new_histogram(),
        }
    }
}

impl StepTally {
    /// Counts one arrival, with its latency in microseconds.
    pub(crate) fn record(&mut self, verdict: Verdict, latency_micros: u64) {
        match verdict {
            Verdict::Duplicate => self.duplicates += 1,
            Verdict::InOrder | Verdict::Reordered => {
                self.delivered += 1;
                if verdict == Verdict::Reordered {
                    self.reordered += 1;
                }
                self.latency
                    .saturating_record(latency_micros.clamp(1, MAX_LATENCY_MICROS));
            }
        }
    }

    /// Adds another tally of the same step.
    pub(crate) fn merge(&mut self, other: &Self) {
        self.delivered += other.delivered;
        self.duplicates += other.duplicates;
        self.reordered += other.reordered;
        self.late += other.late;
        self.unstamped += other.unstamped;
        self.misrouted += other.misrouted;
        // Both histograms have the same bounds, so adding cannot fail.
        let _ = self.latency.add(&other.latency);
        let _ = self.tool_lag.add(&other.tool_lag);
    }

    /// Frames that carried an event: first copies and duplicates.
    pub(crate) fn frames(&self) -> u64 {
        self.delivered + self.duplicates
    }

    /// Latency at quantile `q`, in milliseconds (0 with no samples).
    pub(crate) fn latency_ms(&self, q: f64) -> f64 {
        if self.latency.is_empty() {
            return 0.0;
        }
        self.latency.value_at_quantile(q) as f64 / 1000.0
    }

    /// Largest latency, in milliseconds.
    pub(crate) fn max_latency_ms(&self) -> f64 {
        self.latency.max() as f64 / 1000.0
    }

    /// Runtime lag of the load processes at quantile `q`, in milliseconds.
    pub(crate) fn tool_lag_ms(&self, q: f64) -> f64 {
        if self.tool_lag.is_empty() {
            return 0.0;
        }
        self.tool_lag.value_at_quantile(q) as f64 / 1000.0
    }
}

/// Open tallies by step, for one shard of connections.
#[derive(Debug, Default)]
pub(crate) struct Ledger {
    open: BTreeMap<u32, StepTally>,
    /// Steps below this were collected; their stragglers count as `late`.
    collected_below: u32,
    late: u64,
    unstamped: u64,
}

impl Ledger {
    /// Counts one stamped arrival of step `step`.
    pub(crate) fn record(&mut self, step: u32, verdict: Verdict, latency_micros: u64) {
        if step < self.collected_below {
            self.late += 1;
        } else {
            self.open
                .entry(step)
                .or_default()
                .record(verdict, latency_micros);
        }
    }

    /// Counts an invocation without a stamp.
    pub(crate) fn record_unstamped(&mut self) {
        self.unstamped += 1;
    }

    /// Counts a delivery of step `step` stamped for another group than the connection's.
    pub(crate) fn record_misrouted(&mut self, step: u32) {
        if step < self.collected_below {
            self.late += 1;
        } else {
            self.open.entry(step).or_default().misrouted += 1;
        }
    }

    /// Closes step `step` (and any before it) and returns its tally, with the stragglers and
    /// unstamped invocations seen since the previous collection.
    pub(crate) fn collect(&mut self, step: u32) -> StepTally {
        let mut tally = self.open.remove(&step).unwrap_or_default();
        let older: Vec<u32> = self.open.range(..step).map(|(s, _)| *s).collect();
        for s in older {
            if let Some(stale) = self.open.remove(&s) {
                tally.late += stale.frames();
            }
        }
        self.collected_below = self.collected_below.max(step + 1);
        tally.late += std::mem::take(&mut self.late);
        tally.unstamped += std::mem::take(&mut self.unstamped);
        tally
    }
}

/// A histogram that clamps values into its bounds.
pub(crate) fn new_histogram() -> Histogram<u64> {
    // Constant, valid bounds: creation cannot fail.
    Histogram::new_with_bounds(1, MAX_LATENCY_MICROS, 3).unwrap_or_else(|_| unreachable!())
}

/// A histogram on the wire: its recorded buckets as (highest equivalent value, count).
mod buckets {
    use hdrhistogram::Histogram;
    use serde::{Deserialize, Deserializer, Serializer};

    use super::{MAX_LATENCY_MICROS, new_histogram};

    pub(super) fn serialize<S: Serializer>(
        histogram: &Histogram<u64>,
        serializer: S,
    ) -> Result<S::Ok, S::Error> {
        serializer.collect_seq(
            histogram
                .iter_recorded()
                .map(|v| (v.value_iterated_to(), v.count_at_value())),
        )
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(
        deserializer: D,
    ) -> Result<Histogram<u64>, D::Error> {
        let mut histogram = new_histogram();
        for (value, count) in Vec::<(u64, u64)>::deserialize(deserializer)? {
            histogram.saturating_record_n(value.clamp(1, MAX_LATENCY_MICROS), count);
        }
        Ok(histogram)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn verdicts(arrivals: &[u64]) -> Vec<Verdict> {
        let mut order = Order::default();
        arrivals.iter().map(|n| order.observe(*n)).collect()
    }

    use Verdict::{Duplicate as D, InOrder as I, Reordered as R};

    #[test]
    fn in_order_arrivals_are_first_copies() {
        assert_eq!(verdicts(&[0, 1, 2, 3]), [I, I, I, I]);
    }

    #[test]
    fn a_repeated_counter_is_a_duplicate() {
        assert_eq!(verdicts(&[0, 1, 1, 0, 2]), [I, I, D, D, I]);
    }

    #[test]
    fn a_lower_counter_filling_a_gap_is_reordered_once() {
        assert_eq!(verdicts(&[0, 3, 1, 2, 2, 4]), [I, I, R, R, D, I]);
        assert_eq!(verdicts(&[5, 2, 0, 4, 1, 3, 3]), [I, R, R, R, R, R, D]);
    }

    #[test]
    fn gaps_split_when_filled_in_the_middle() {
        let mut order = Order::default();
        assert_eq!(order.observe(10), I);
        assert_eq!(order.observe(5), R);
        assert_eq!(order.gaps, [0..5, 6..10]);
        assert_eq!(order.observe(0), R);
        assert_eq!(order.observe(9), R);
        assert_eq!(order.gaps, [1..5, 6..9]);
    }

    #[test]
    fn ledger_counts_by_step_and_stragglers_as_late() {
        let mut ledger = Ledger::default();
        ledger.record(0, I, 1_000);
        ledger.record(0, D, 0);
        ledger.record(1, I, 3_000);
        ledger.record(0, R, 2_000);
        ledger.record_unstamped();
        let first = ledger.collect(0);
        assert_eq!(
            (
                first.delivered,
                first.duplicates,
                first.reordered,
                first.unstamped
            ),
            (2, 1, 1, 1)
        );
        assert!((first.latency_ms(1.0) - 2.0).abs() < 0.01);
        ledger.record(0, I, 9_000);
        let second = ledger.collect(1);
        assert_eq!((second.delivered, second.late), (1, 1));
        assert!((second.max_latency_ms() - 3.0).abs() < 0.01);
    }

    #[test]
    fn tallies_survive_the_wire_and_merge() {
        let mut a = StepTally::default();
        for ms in 1..=100 {
            a.record(I, ms * 1000);
        }
        a.record(D, 0);
        let json = serde_json::to_string(&a).unwrap();
        let b: StepTally = serde_json::from_str(&json).unwrap();
        assert_eq!((b.delivered, b.duplicates), (100, 1));
        assert!((b.latency_ms(0.5) - a.latency_ms(0.5)).abs() < 0.1);
        let mut total = StepTally::default();
        total.merge(&a);
        total.merge(&b);
        assert_eq!((total.delivered, total.frames()), (200, 202));
        assert!((total.max_latency_ms() - 100.0).abs() < 0.1);
    }
}
