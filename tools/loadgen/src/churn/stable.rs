//! The stable population: connections that stay from start to end, check every event by its
//! position (once, in order, no new epoch), and the verdict over all of them.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use tokio::sync::{Semaphore, mpsc, watch};
use tokio::time::{MissedTickBehavior, interval, timeout};

use super::client::{Conn, Message, PING, Record, code_label, records};
use super::{Plan, Published, shorten};
use crate::ws;

/// How long one stable connection may take to connect, shake hands and join.
const STABLE_CONNECT_TIMEOUT: Duration = Duration::from_secs(15);

/// Stable clients send a SignalR ping this often (the gateway's client timeout is 30 s).
const STABLE_PING_EVERY: Duration = Duration::from_secs(10);

/// What one stable client saw.
#[derive(Debug, Default)]
pub(super) struct StableReport {
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
    pub(super) fn observe(&mut self, seq: u64) -> (bool, bool) {
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
    pub(super) fn observe(&mut self, epoch: &str, seq: u64) {
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
pub(super) async fn stable_client(
    plan: Arc<Plan>,
    i: usize,
    permits: Arc<Semaphore>,
    ready: mpsc::Sender<Result<(), String>>,
    mut stopped: watch::Receiver<bool>,
) -> Option<StableReport> {
    let group = i % plan.groups;
    let connecting = async {
        let _permit = permits.acquire().await.map_err(|_| "closed".to_owned())?;
        let token = plan.token(&format!("soak-stable-{i}"), group)?;
        let mut conn = Conn::upgrade(&plan, plan.target(i), i, &token, None)
            .await?
            .handshake()
            .await?;
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
                    verifier.report.ended = Some(format!("websocket close {}", code_label(code)));
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
pub(super) struct StableSummary {
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
    pub(super) fn from_reports(
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

    pub(super) fn is_clean(&self, wanted: usize) -> bool {
        self.connected == wanted as u64
            && self.lost == 0
            && self.duplicates == 0
            && self.reordered == 0
            && self.epoch_changes == 0
            && self.ended.is_empty()
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
}
