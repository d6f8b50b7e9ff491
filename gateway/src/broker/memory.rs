//! The in-process broker: publications go straight to this replica's fan-out.
//!
//! The default when no Redis is configured, and what a newcomer gets from one command. It keeps
//! the same contract as a networked broker (subscriptions are acknowledged, publications carry
//! their publish time, positions come with a bounded history and idempotency keys) so the rest
//! of the gateway cannot tell the difference.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::SystemTime;

use bytes::Bytes;
use publisher_lib::contract::{EventKind, Group, Position};
use tokio::time::Instant;

use super::history::Histories;
use super::{
    Fanout, History, HistorySettings, Publication, Published, SubscriptionRequest,
    SubscriptionRequests,
};
use crate::shutdown::Shutdown;

/// Handle of the in-process broker.
#[derive(Clone)]
pub struct MemoryBroker {
    fanout: Arc<dyn Fanout>,
    /// Held while a publication is appended and fanned out, so positions reach fan-out in order.
    histories: Arc<Mutex<Histories<Publication>>>,
}

impl std::fmt::Debug for MemoryBroker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MemoryBroker")
    }
}

impl MemoryBroker {
    /// Starts the task that acknowledges subscriptions.
    pub fn start(
        fanout: Arc<dyn Fanout>,
        settings: HistorySettings,
        mut requests: SubscriptionRequests,
        shutdown: &Shutdown,
    ) -> Self {
        let stop = shutdown.background_token().clone();
        shutdown.background().spawn(async move {
            // Subscribed groups and their generation; kept so the memory broker follows the
            // same rules as a networked one (and so its behaviour can be tested).
            let mut subscribed: HashMap<Group, u64> = HashMap::new();
            loop {
                let request = tokio::select! {
                    biased;
                    () = stop.cancelled() => break,
                    request = requests.recv() => match request {
                        Some(request) => request,
                        None => break,
                    },
                };
                match request {
                    SubscriptionRequest::Subscribe {
                        group,
                        generation,
                        ack,
                    } => {
                        subscribed.insert(group, generation);
                        let _ = ack.send(Ok(()));
                    }
                    SubscriptionRequest::Unsubscribe { group, generation } => {
                        if subscribed.get(&group) == Some(&generation) {
                            subscribed.remove(&group);
                        }
                    }
                }
            }
        });
        Self {
            fanout,
            histories: Arc::new(Mutex::new(Histories::new(settings))),
        }
    }

    /// Appends an event to each group's history and delivers it to the group's local members;
    /// a `key` seen within the idempotency window is acknowledged without either.
    pub fn publish(
        &self,
        kind: EventKind,
        payload: Bytes,
        groups: &[Group],
        key: &str,
    ) -> Vec<Published> {
        let published_at = SystemTime::now();
        let now = Instant::now();
        let mut histories = self.histories();
        groups
            .iter()
            .map(|group| {
                let mut publication = Publication {
                    group: group.clone(),
                    kind,
                    payload: payload.clone(),
                    published_at,
                    position: None,
                };
                let appended = histories.append(group, key, publication.clone(), now);
                if !appended.duplicate {
                    publication.position = Some(appended.position.clone());
                    self.fanout.fan_out(&publication);
                }
                Published {
                    group: group.clone(),
                    position: appended.position,
                    duplicate: appended.duplicate,
                }
            })
            .collect()
    }

    /// `group`'s head and what a reader at `after` missed.
    pub fn read_history(&self, group: &Group, after: Option<&Position>) -> History {
        let read = self.histories().read(group, after, Instant::now());
        let epoch = read.head.epoch.clone();
        History {
            head: read.head,
            recovered: read.recovered,
            missed: read
                .entries
                .into_iter()
                .map(|(seq, mut publication)| {
                    publication.position = Some(Position {
                        epoch: epoch.clone(),
                        seq,
                    });
                    publication
                })
                .collect(),
        }
    }

    fn histories(&self) -> std::sync::MutexGuard<'_, Histories<Publication>> {
        self.histories
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }
}
