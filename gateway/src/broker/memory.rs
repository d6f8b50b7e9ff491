//! The in-process broker: publications go straight to this replica's fan-out.
//!
//! The default when no Redis is configured, and what a newcomer gets from one command. It keeps
//! the same contract as a networked broker (subscriptions are acknowledged, publications carry
//! their publish time, positions come with a bounded history and idempotency keys) so the rest
//! of the gateway cannot tell the difference. Publications reach fan-out through the same
//! per-group cursors as the Redis broker's (`broker::repair::Cursors`); here they arrive in order, so the
//! cursors pass them on, and a gap would be filled from this broker's own history.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::SystemTime;

use bytes::Bytes;
use publisher_lib::contract::{EventKind, Group, Position};
use tokio::time::Instant;

use super::history::Histories;
use super::repair::{CursorReader, Cursors, Reading};
use super::{
    Fanout, History, HistorySettings, Publication, Published, SubscriptionRequests, Wanted,
};
use crate::shutdown::Shutdown;

/// Handle of the in-process broker.
#[derive(Clone)]
pub struct MemoryBroker {
    /// Held while a publication is appended and fanned out, so positions reach fan-out in order.
    histories: Arc<Mutex<Histories<Publication>>>,
    /// Locked after `histories`, never before.
    delivery: Arc<Mutex<Delivery>>,
}

/// Where publications go on this replica.
struct Delivery {
    /// Subscribed groups, so the memory broker follows the same rules as a networked one (a
    /// group nobody here joined is not delivered, nor remembered).
    subscribed: Wanted,
    /// Every subscribed group's delivery order.
    cursors: Cursors,
}

/// Reads this broker's own history for a cursor's gap.
struct OwnHistory(Arc<Mutex<Histories<Publication>>>);

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
        let histories = Arc::new(Mutex::new(Histories::new(settings)));
        let reader = Arc::new(OwnHistory(Arc::clone(&histories)));
        let (cursors, mut repairs) = Cursors::new(fanout, reader, shutdown);
        let delivery = Arc::new(Mutex::new(Delivery {
            subscribed: Wanted::default(),
            cursors,
        }));
        let stop = shutdown.background_token().clone();
        let task_delivery = Arc::clone(&delivery);
        shutdown.background().spawn(async move {
            loop {
                let request = tokio::select! {
                    biased;
                    () = stop.cancelled() => break,
                    Some(repair) = repairs.recv() => {
                        lock(&task_delivery).cursors.finish(repair);
                        continue;
                    }
                    request = requests.recv() => match request {
                        Some(request) => request,
                        None => break,
                    },
                };
                let mut delivery = lock(&task_delivery);
                if let Some(group) = delivery.subscribed.apply(request, Ok(())) {
                    delivery.cursors.forget(&group);
                }
            }
        });
        Self {
            histories,
            delivery,
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
        let mut histories = lock(&self.histories);
        let mut delivery = lock(&self.delivery);
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
                if !appended.duplicate && delivery.subscribed.contains(group) {
                    publication.position = Some(appended.position.clone());
                    delivery.cursors.live(publication);
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
        read(&mut lock(&self.histories), group, after)
    }
}

impl CursorReader for OwnHistory {
    fn read_after_cursor(&self, group: Group, cursor: Position) -> Reading {
        let history = read(&mut lock(&self.0), &group, Some(&cursor));
        Box::pin(std::future::ready(Ok(history)))
    }
}

/// `group`'s head in `histories` and what a reader at `after` missed.
fn read(
    histories: &mut Histories<Publication>,
    group: &Group,
    after: Option<&Position>,
) -> History {
    let read = histories.read(group, after, Instant::now());
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

/// Locks `mutex`; a panic elsewhere while it was held leaves nothing worse than losing it.
fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::broker::subscriptions;

    /// Records the payloads it is handed.
    #[derive(Default)]
    struct Recorder(Mutex<Vec<String>>);

    impl Fanout for Recorder {
        fn fan_out(&self, publication: &Publication) {
            lock(&self.0).push(String::from_utf8_lossy(&publication.payload).into_owned());
        }
    }

    #[tokio::test]
    async fn only_subscribed_groups_are_delivered_once_each_and_in_order() {
        let shutdown = Shutdown::new();
        let recorder = Arc::new(Recorder::default());
        let (subscriptions, requests) = subscriptions(8);
        let broker = MemoryBroker::start(
            recorder.clone(),
            HistorySettings::defaults(),
            requests,
            &shutdown,
        );
        let west = Group::try_dispatch("west").expect("valid region");
        let east = Group::try_dispatch("east").expect("valid region");
        subscriptions
            .subscribe(west.clone(), 1)
            .await
            .expect("subscribed");
        for (n, key) in ["a", "b", "a", "c"].into_iter().enumerate() {
            let payload = Bytes::from(format!("{n}"));
            broker.publish(
                EventKind::JobAssigned,
                payload,
                &[west.clone(), east.clone()],
                key,
            );
        }
        assert_eq!(*lock(&recorder.0), ["0", "1", "3"], "the repeated key once");
        let unsubscribed = lock(&broker.delivery);
        assert!(!unsubscribed.subscribed.contains(&east));
        assert_eq!(
            format!("{:?}", unsubscribed.cursors),
            "Cursors { groups: 1, .. }",
            "no order is kept for a group nobody here joined"
        );
    }
}
