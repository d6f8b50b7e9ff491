//! How publications reach this replica.
//!
//! A [`Broker`] takes publications from the HTTP endpoint and delivers publications for the
//! groups this replica has subscribed to, by calling [`Fanout::fan_out`]. Subscriptions are
//! requested through a narrow [`Subscriptions`] handle, acknowledged once they are live. The
//! broker knows nothing of connections, sockets or SignalR framing: it moves contract bytes.
//!
//! Today the broker is the in-process loopback ([`memory`]); the Redis broker is the second
//! variant of the same enum.

mod health;
pub mod history;
mod link;
pub mod memory;
pub mod redis;
mod repair;
pub mod shards;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::SystemTime;

use bytes::Bytes;
use publisher_lib::contract::{EventKind, Group, Position};
use tokio::sync::{Notify, mpsc, oneshot};

/// Capacity of the subscription-control channel between groups and the broker.
pub const SUBSCRIPTION_QUEUE: usize = 1024;
/// Longest a join waits for the broker to confirm a subscription before it fails (and the
/// client may try again), so a stuck broker cannot hold a connection task forever.
pub const SUBSCRIBE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// One event for one group, as the broker hands it to fan-out.
#[derive(Debug, Clone)]
pub struct Publication {
    /// The group it is addressed to.
    pub group: Group,
    /// Which event it is; the SignalR target.
    pub kind: EventKind,
    /// The event's JSON exactly as it entered the system.
    pub payload: Bytes,
    /// When it was published (wall clock, comparable across replicas).
    pub published_at: SystemTime,
    /// Its place in the group's history; `None` for a message from an old publisher that
    /// PUBLISHed without the script (delivered, never recoverable).
    pub position: Option<Position>,
}

/// Bounds of every group's history.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HistorySettings {
    /// Events kept per group.
    pub size: usize,
    /// A group's history is forgotten this long after its last publish.
    pub ttl: std::time::Duration,
    /// An idempotency key seen again within this window is not published again.
    pub idempotency_window: std::time::Duration,
}

/// What publishing one event did in one group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Published {
    /// The group.
    pub group: Group,
    /// The event's position there (the first one, for a duplicate).
    pub position: Position,
    /// The idempotency key was seen within the window: nothing was published again.
    pub duplicate: bool,
}

/// A group's head and, for a reader with a position, the publications it missed.
#[derive(Debug, Clone)]
pub struct History {
    /// The newest position.
    pub head: Position,
    /// `None` without a position; `Some(false)` when the missed publications cannot be given
    /// (other epoch, history no longer reaches back, or a position ahead of the head).
    pub recovered: Option<bool>,
    /// The missed publications, in order.
    pub missed: Vec<Publication>,
}

/// What the broker calls for each publication; implemented by the group registry.
///
/// It is synchronous on purpose: fan-out must never wait, so a slow client cannot stall the
/// broker.
pub trait Fanout: Send + Sync + 'static {
    /// Delivers a publication to this replica's members of its group.
    fn fan_out(&self, publication: &Publication);
}

/// Why the broker could not do something. Never surfaced to clients as-is.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BrokerError {
    /// The broker is not connected.
    #[error("broker unavailable: {0}")]
    Unavailable(String),
    /// The broker has stopped (shutdown).
    #[error("broker stopped")]
    Stopped,
}

/// Where a Redis broker sends another replica's request for a stateful connection whose client
/// came back there: the replica's connection registry, which has the connection park itself.
pub trait Handovers: Send + Sync + 'static {
    /// Hands stateful connection `connection_id` over, if this replica holds it.
    fn hand_over(&self, connection_id: &str);
}

/// The closed set of brokers.
#[derive(Debug, Clone)]
pub enum Broker {
    /// In-process delivery: one replica, no Redis.
    Memory(memory::MemoryBroker),
    /// Redis pub/sub: every replica receives what any publisher sends (on one server, a
    /// cluster, or groups spread over several servers).
    Redis(shards::RedisShards),
}

impl Broker {
    /// Publishes an event's bytes to each of `groups`.
    ///
    /// # Errors
    /// [`BrokerError`] when the broker cannot take it.
    pub async fn publish(
        &self,
        kind: EventKind,
        payload: Bytes,
        groups: &[Group],
        key: &str,
    ) -> Result<Vec<Published>, BrokerError> {
        match self {
            Self::Memory(broker) => Ok(broker.publish(kind, payload, groups, key)),
            Self::Redis(broker) => broker.publish(kind, &payload, groups, key).await,
        }
    }

    /// Reads `group`'s head and, given `after`, what a reader at `after` missed.
    ///
    /// # Errors
    /// [`BrokerError::Unavailable`] when the history cannot be read.
    pub async fn read_history(
        &self,
        group: &Group,
        after: Option<&Position>,
    ) -> Result<History, BrokerError> {
        match self {
            Self::Memory(broker) => Ok(broker.read_history(group, after)),
            Self::Redis(broker) => broker.read_history(group, after).await,
        }
    }

    /// The Redis side of carrying stateful connections between replicas; `None` for the
    /// in-process broker, which has no other replica.
    pub fn connections(&self) -> Option<&redis::RedisBroker> {
        match self {
            Self::Memory(_) => None,
            Self::Redis(broker) => Some(broker.first()),
        }
    }

    /// Whether the broker can deliver right now (readiness).
    pub fn is_healthy(&self) -> bool {
        match self {
            Self::Memory(_) => true,
            Self::Redis(broker) => broker.is_healthy(),
        }
    }

    /// Low-cardinality name for logs.
    pub fn label(&self) -> &'static str {
        match self {
            Self::Memory(_) => "memory",
            Self::Redis(_) => "redis",
        }
    }
}

/// The group registry's handle for asking the broker to (un)subscribe.
#[derive(Debug, Clone)]
pub struct Subscriptions {
    tx: mpsc::Sender<SubscriptionRequest>,
    late: Arc<LateUnsubscribes>,
}

/// The broker's end of the subscription-control channel.
#[derive(Debug)]
pub struct SubscriptionRequests {
    rx: mpsc::Receiver<SubscriptionRequest>,
    late: Arc<LateUnsubscribes>,
}

/// Unsubscribes that found the channel full ([`Subscriptions::unsubscribe_now`]), one per
/// group (its latest generation), so waiting for room needs no task and no unbounded queue.
#[derive(Debug, Default)]
struct LateUnsubscribes {
    groups: Mutex<HashMap<Group, u64>>,
    added: Notify,
}

impl LateUnsubscribes {
    fn take_one(&self) -> Option<SubscriptionRequest> {
        let mut groups = self.groups.lock().unwrap_or_else(PoisonError::into_inner);
        let group = groups.keys().next()?.clone();
        let generation = groups.remove(&group)?;
        Some(SubscriptionRequest::Unsubscribe { group, generation })
    }
}

/// A request to start or stop receiving a group's publications.
///
/// `generation` orders requests for the same group: the registry gives each new local life of a
/// group a higher number, and an unsubscribe for an older generation than the one subscribed is
/// ignored, so a leave racing a re-join can never drop a wanted subscription.
#[derive(Debug)]
pub enum SubscriptionRequest {
    /// Start; answer on `ack` once publications for the group will arrive.
    Subscribe {
        /// The group.
        group: Group,
        /// Its local life.
        generation: u64,
        /// Where to acknowledge.
        ack: oneshot::Sender<Result<(), BrokerError>>,
    },
    /// Stop, unless a newer generation subscribed meanwhile.
    Unsubscribe {
        /// The group.
        group: Group,
        /// The local life that ended.
        generation: u64,
    },
}

/// The groups a broker delivers, each with the generation (local life) that asked for it.
#[derive(Debug, Default)]
pub(crate) struct Wanted {
    groups: HashMap<Group, u64>,
}

impl Wanted {
    /// `group` is wanted by its life `generation` (a newer life replaces an older one).
    pub(crate) fn want(&mut self, group: Group, generation: u64) {
        self.groups.insert(group, generation);
    }

    /// `group`'s life `generation` ended: returns whether it was the wanted one and so is no
    /// longer wanted (an older life's unsubscribe, racing a re-join, changes nothing).
    pub(crate) fn release(&mut self, group: &Group, generation: u64) -> bool {
        let current = self.groups.get(group) == Some(&generation);
        if current {
            self.groups.remove(group);
        }
        current
    }

    /// Applies `request` at once, answering a subscribe with `outcome`; returns the group an
    /// unsubscribe stopped wanting.
    pub(crate) fn apply(
        &mut self,
        request: SubscriptionRequest,
        outcome: Result<(), BrokerError>,
    ) -> Option<Group> {
        match request {
            SubscriptionRequest::Subscribe {
                group,
                generation,
                ack,
            } => {
                self.want(group, generation);
                // A join that gave up waiting has dropped its end: nothing to tell.
                let _ = ack.send(outcome);
                None
            }
            SubscriptionRequest::Unsubscribe { group, generation } => {
                self.release(&group, generation).then_some(group)
            }
        }
    }

    /// Whether `group` is wanted.
    pub(crate) fn contains(&self, group: &Group) -> bool {
        self.groups.contains_key(group)
    }

    /// How many groups are wanted.
    pub(crate) fn len(&self) -> usize {
        self.groups.len()
    }

    /// The wanted groups.
    pub(crate) fn groups(&self) -> impl Iterator<Item = &Group> {
        self.groups.keys()
    }
}

/// A bounded subscription-control channel.
pub fn subscriptions(capacity: usize) -> (Subscriptions, SubscriptionRequests) {
    let (tx, rx) = mpsc::channel(capacity);
    let late = Arc::new(LateUnsubscribes::default());
    (
        Subscriptions {
            tx,
            late: Arc::clone(&late),
        },
        SubscriptionRequests { rx, late },
    )
}

impl Subscriptions {
    /// Subscribes and waits until the subscription is live, at most [`SUBSCRIBE_TIMEOUT`].
    ///
    /// # Errors
    /// [`BrokerError`] when the broker refuses, has stopped, or does not confirm in time.
    pub async fn subscribe(&self, group: Group, generation: u64) -> Result<(), BrokerError> {
        let request = async {
            let (ack, answer) = oneshot::channel();
            self.tx
                .send(SubscriptionRequest::Subscribe {
                    group,
                    generation,
                    ack,
                })
                .await
                .map_err(|_| BrokerError::Stopped)?;
            answer.await.map_err(|_| BrokerError::Stopped)?
        };
        tokio::time::timeout(SUBSCRIBE_TIMEOUT, request)
            .await
            .map_err(|_| {
                BrokerError::Unavailable("subscription not confirmed in time".to_owned())
            })?
    }

    /// Asks the broker to unsubscribe; does not wait for it.
    pub async fn unsubscribe(&self, group: Group, generation: u64) {
        // A stopped broker has no subscriptions left to drop.
        let _ = self
            .tx
            .send(SubscriptionRequest::Unsubscribe { group, generation })
            .await;
    }

    /// Passes `request` on as it is, waiting for room: a router between the registry and the
    /// brokers of several servers. A stopped broker drops it (a subscribe then fails).
    pub async fn forward(&self, request: SubscriptionRequest) {
        let _ = self.tx.send(request).await;
    }

    /// Asks the broker to unsubscribe without awaiting (usable from `Drop`): when the channel
    /// is full the request waits beside it, merged with any other for the same group, and the
    /// broker takes it with its next requests.
    pub fn unsubscribe_now(&self, group: Group, generation: u64) {
        match self
            .tx
            .try_send(SubscriptionRequest::Unsubscribe { group, generation })
        {
            Ok(()) | Err(mpsc::error::TrySendError::Closed(_)) => {}
            Err(mpsc::error::TrySendError::Full(request)) => {
                if let SubscriptionRequest::Unsubscribe { group, generation } = request {
                    let mut late = self
                        .late
                        .groups
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner);
                    let latest = late.entry(group).or_insert(generation);
                    *latest = (*latest).max(generation);
                    drop(late);
                    self.late.added.notify_one();
                }
            }
        }
    }
}

impl SubscriptionRequests {
    /// A request already queued, if any (to batch many joins into one SUBSCRIBE).
    pub fn try_recv(&mut self) -> Option<SubscriptionRequest> {
        self.rx.try_recv().ok().or_else(|| self.late.take_one())
    }

    /// The next request; `None` once every handle is gone.
    ///
    /// # Cancel safety
    /// Cancel-safe.
    pub async fn recv(&mut self) -> Option<SubscriptionRequest> {
        loop {
            // The channel first: what waits beside it was sent after everything in it.
            match self.rx.try_recv() {
                Ok(request) => return Some(request),
                Err(mpsc::error::TryRecvError::Disconnected) => return self.late.take_one(),
                Err(mpsc::error::TryRecvError::Empty) => {}
            }
            if let Some(request) = self.late.take_one() {
                return Some(request);
            }
            tokio::select! {
                request = self.rx.recv() => return request,
                () = self.late.added.notified() => {}
            }
        }
    }
}

/// Starts the in-process broker, delivering to `fanout`.
pub fn start_memory(
    fanout: Arc<dyn Fanout>,
    settings: HistorySettings,
    requests: SubscriptionRequests,
    shutdown: &crate::shutdown::Shutdown,
) -> Broker {
    Broker::Memory(memory::MemoryBroker::start(
        fanout, settings, requests, shutdown,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn group(region: &str) -> Group {
        Group::try_dispatch(region).expect("valid region")
    }

    /// The request as (kind, region, generation), for comparing.
    fn seen(request: Option<SubscriptionRequest>) -> Option<(&'static str, String, u64)> {
        match request? {
            SubscriptionRequest::Subscribe {
                group, generation, ..
            } => Some(("subscribe", group.to_string(), generation)),
            SubscriptionRequest::Unsubscribe { group, generation } => {
                Some(("unsubscribe", group.to_string(), generation))
            }
        }
    }

    #[tokio::test]
    async fn unsubscribes_that_find_the_channel_full_wait_beside_it_merged_per_group_and_in_order()
    {
        let (subscriptions, mut requests) = subscriptions(1);
        let (ack, _answer) = oneshot::channel();
        subscriptions
            .tx
            .try_send(SubscriptionRequest::Subscribe {
                group: group("west"),
                generation: 1,
                ack,
            })
            .expect("room for one");
        subscriptions.unsubscribe_now(group("west"), 1);
        subscriptions.unsubscribe_now(group("east"), 2);
        subscriptions.unsubscribe_now(group("east"), 4);
        subscriptions.unsubscribe_now(group("east"), 3);

        let first = seen(requests.recv().await).expect("a request");
        assert_eq!(first.0, "subscribe", "what was in the channel comes first");
        let mut rest = vec![
            seen(requests.recv().await).expect("a request"),
            seen(requests.try_recv()).expect("a request"),
        ];
        rest.sort();
        assert_eq!(
            rest,
            vec![
                ("unsubscribe", "/dispatch/east".to_owned(), 4),
                ("unsubscribe", "/dispatch/west".to_owned(), 1),
            ]
        );
        assert!(requests.try_recv().is_none(), "each group once");
    }
}
