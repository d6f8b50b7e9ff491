//! This replica's group memberships and fan-out.
//!
//! `Groups` maps each group to the outbound queues of local connections that joined it and
//! tells the broker when a group gains its first member or loses its last. It knows nothing
//! about sockets or Redis: publications arrive through [`Fanout`], and frames leave through
//! [`Outbound`] queues without ever awaiting; `protocol::frames` builds each publication's frame.
//! A join, resume included, is one call ([`Groups::join_resuming`]): the member is held while
//! the history is read, then released with the missed events first, cut at the head the read
//! returned. What is held, cut and skipped is decided by `order::member`; this module holds the
//! locks and the queues. A connection's own list of groups lives in its task, so closing a
//! connection needs no second shared map.

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Mutex, PoisonError, RwLock};
use std::time::SystemTime;

use publisher_lib::contract::{Group, Position};
use tokio::sync::watch;

use crate::broker::{Broker, BrokerError, Fanout, Publication, Subscriptions};
use crate::metrics;
use crate::order::member::{Floors, Hold, Holding};
use crate::outbound::{Closing, Frame, Outbound, OverBudget, Rejected, Tag, WriteMode};
use crate::protocol::frames;

/// Largest group whose publications are written straight to idle members' sockets.
pub const MAX_DIRECT_WRITE_MEMBERS: usize = 256;
pub use crate::order::member::MAX_HELD_FRAMES;

/// Identifies a connection inside this process.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConnId(u64);

/// The registry of local memberships, and of every local connection's queue.
#[derive(Debug)]
pub struct Groups {
    groups: RwLock<HashMap<Group, Members>>,
    connections: Mutex<Connections>,
    subscriptions: Subscriptions,
    next_conn: AtomicU64,
    next_generation: AtomicU64,
    /// Memberships summed over every group (live and held); changed under the `groups` lock.
    memberships: AtomicUsize,
}

/// Every open connection's queue, so the gateway can tell them all to close.
#[derive(Debug, Default)]
struct Connections {
    queues: HashMap<ConnId, Outbound>,
    /// Set once shutdown began: connections registering later are closed at once.
    closing: Option<Closing>,
}

/// The local members of one group, and whether its broker subscription is live.
#[derive(Debug)]
struct Members {
    queues: HashMap<ConnId, Outbound>,
    /// Members whose join is reading the history: fan-out keeps their frames here until
    /// [`Groups::release`] puts the missed ones first.
    held: HashMap<ConnId, Held>,
    /// For members just released: the last position their join sent, so a publication the
    /// broker delivers late (it was still filling a gap) is not sent to them twice.
    floors: Mutex<Floors<ConnId>>,
    generation: u64,
    subscription: watch::Sender<Subscription>,
}

/// A member whose live frames wait for its history.
#[derive(Debug)]
struct Held {
    outbound: Outbound,
    /// Behind its own lock so fan-out keeps the registry's read lock.
    frames: Mutex<Holding<Frame>>,
}

/// What a join tells its client, from [`Groups::join_resuming`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resumed {
    /// The head of the group's history when the join read it.
    pub head: Position,
    /// `None` without a position; `Some(false)` when the client must refetch (the history no
    /// longer reaches back, another epoch, or the missed events did not fit its budget).
    pub recovered: Option<bool>,
    /// How many missed events the history returned.
    pub missed: usize,
    /// The queue's count of frames taken at which the resume is all written; `None` when no
    /// backlog was queued for it.
    pub through: Option<u64>,
}

/// How a joining member starts receiving.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// Live publications go to it at once.
    Live,
    /// Live publications wait until [`Groups::release`].
    Held,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Subscription {
    Pending,
    Live,
    Failed(BrokerError),
}

impl Groups {
    /// An empty registry that asks `subscriptions` for broker subscriptions.
    pub fn new(subscriptions: Subscriptions) -> Self {
        Self {
            groups: RwLock::new(HashMap::new()),
            connections: Mutex::new(Connections::default()),
            subscriptions,
            next_conn: AtomicU64::new(1),
            next_generation: AtomicU64::new(1),
            memberships: AtomicUsize::new(0),
        }
    }

    /// A new connection id, unique in this process.
    pub fn next_conn_id(&self) -> ConnId {
        ConnId(self.next_conn.fetch_add(1, Ordering::Relaxed))
    }

    /// Records a connection's queue, so [`Groups::close_all`] reaches it. A connection that
    /// registers after `close_all` is told to close at once.
    pub fn register(&self, conn: ConnId, outbound: &Outbound) {
        let mut connections = self.connections();
        match connections.closing {
            Some(closing) => outbound.close(closing),
            None => {
                connections.queues.insert(conn, outbound.clone());
            }
        }
    }

    /// Forgets a connection's queue.
    pub fn unregister(&self, conn: ConnId) {
        self.connections().queues.remove(&conn);
    }

    /// Tells every connection, present and future, to close; returns how many were open.
    pub fn close_all(&self, closing: Closing) -> usize {
        let queues = self.begin_close_all(closing);
        for queue in &queues {
            queue.close(closing);
        }
        queues.len()
    }

    /// Like [`Groups::close_all`] for connections that register from now on, and returns the
    /// open connections' queues so the caller closes them at its own pace (a drain spread
    /// over time, so the other replicas see no reconnect storm).
    pub fn begin_close_all(&self, closing: Closing) -> Vec<Outbound> {
        let mut connections = self.connections();
        connections.closing = Some(closing);
        connections.queues.values().cloned().collect()
    }

    /// Adds `conn` to `group` and returns once the broker delivers the group's publications, so
    /// an event published after a join completes is never missed. Joining twice is harmless.
    ///
    /// # Errors
    /// [`BrokerError`] when the broker could not subscribe; the connection is then not a member.
    pub async fn join(
        &self,
        conn: ConnId,
        group: &Group,
        outbound: &Outbound,
        admission: Admission,
    ) -> Result<(), BrokerError> {
        let (first, generation, mut subscription) = {
            let mut groups = self.write();
            let active = groups.len();
            let members = match groups.entry(group.clone()) {
                Entry::Occupied(entry) => entry.into_mut(),
                Entry::Vacant(entry) => {
                    let generation = self.next_generation.fetch_add(1, Ordering::Relaxed);
                    let (subscription, _) = watch::channel(Subscription::Pending);
                    metrics::groups_active(active + 1);
                    entry.insert(Members {
                        queues: HashMap::new(),
                        held: HashMap::new(),
                        floors: Mutex::new(Floors::default()),
                        generation,
                        subscription,
                    })
                }
            };
            let first = members.queues.is_empty() && members.held.is_empty();
            let known = members.queues.contains_key(&conn) || members.held.contains_key(&conn);
            match admission {
                Admission::Live if !members.held.contains_key(&conn) => {
                    members.queues.insert(conn, outbound.clone());
                }
                // Already held (a repeated join): it stays held until its release.
                Admission::Live => {}
                Admission::Held => {
                    members.queues.remove(&conn);
                    members.held.entry(conn).or_insert_with(|| Held {
                        outbound: outbound.clone(),
                        frames: Mutex::new(Holding::default()),
                    });
                }
            }
            if !known {
                self.count_memberships(1, 0);
            }
            (first, members.generation, members.subscription.subscribe())
        };
        let outcome = self
            .await_subscription(group, first, generation, &mut subscription)
            .await;
        if outcome.is_err() {
            self.remove(conn, group, Some(generation));
        }
        outcome
    }

    /// Joins `conn` to `group` and resumes it after `after` (a position the client sent, or
    /// none): the member is held while `history` reads the head and what it missed, then the
    /// missed events are queued before the live ones held meanwhile, cut at that head, so the
    /// client gets each event once and in order. The whole join, in one call.
    ///
    /// # Errors
    /// [`BrokerError`] when the broker could not subscribe or the history could not be read. A
    /// connection that was not a member is then not one; one that was a member stays live.
    pub async fn join_resuming(
        &self,
        conn: ConnId,
        group: &Group,
        outbound: &Outbound,
        after: Option<&Position>,
        history: &Broker,
    ) -> Result<Resumed, BrokerError> {
        let already = self.is_member(conn, group);
        self.join(conn, group, outbound, Admission::Held).await?;
        let mut history = match history.read_history(group, after).await {
            Ok(history) => history,
            Err(e) => {
                if already {
                    // Still a member: live again, with whatever was held (no head to cut at).
                    self.release(conn, group, &[], None);
                } else {
                    self.leave(conn, group).await;
                }
                return Err(e);
            }
        };
        let through = self.release(conn, group, &history.missed, Some(&history.head));
        if through.is_none() && !history.missed.is_empty() {
            // The missed events did not fit the connection's budget: the client refetches
            // instead, as when the history no longer reaches back.
            metrics::limit_exceeded("backlog_per_connection");
            history.recovered = Some(false);
        }
        Ok(Resumed {
            head: history.head,
            recovered: history.recovered,
            missed: history.missed.len(),
            through,
        })
    }

    /// Puts `missed` (the history after the member's position), then the live publications held
    /// since it joined that come after `head` (all of them without a head), into a held
    /// member's queue, and makes it live.
    ///
    /// Returns the queue's count of frames taken at which they are all written, or `None` when
    /// the missed publications did not fit the connection's budget and were dropped (only the
    /// live ones are queued, and the client is told it did not recover).
    pub fn release(
        &self,
        conn: ConnId,
        group: &Group,
        missed: &[Publication],
        head: Option<&Position>,
    ) -> Option<u64> {
        let mut groups = self.write();
        let members = groups.get_mut(group)?;
        let held = members.held.remove(&conn)?;
        let released = held
            .frames
            .into_inner()
            .unwrap_or_else(PoisonError::into_inner)
            .release(head);
        let live = released.live;
        let mut backlog: Vec<Frame> = Vec::with_capacity(missed.len() + live.len());
        backlog.extend(missed.iter().map(event_frame));
        backlog.extend(live.iter().cloned());
        let through = match held.outbound.push_backlog(backlog) {
            Ok(through) => Some(through),
            Err(OverBudget) => {
                if held.outbound.push_backlog(live).is_err() {
                    held.outbound.close(Closing::SlowConsumer);
                    metrics::slow_consumers_closed(1);
                }
                None
            }
        };
        members.queues.insert(conn, held.outbound);
        if let Some(floor) = released.floor {
            members
                .floors
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .set(conn, floor);
        }
        through
    }

    /// Waits until the group's subscription is live (asking the broker when `first`).
    async fn await_subscription(
        &self,
        group: &Group,
        first: bool,
        generation: u64,
        subscription: &mut watch::Receiver<Subscription>,
    ) -> Result<(), BrokerError> {
        if first {
            let outcome = self
                .subscriptions
                .subscribe(group.clone(), generation)
                .await;
            let state = match &outcome {
                Ok(()) => Subscription::Live,
                Err(e) => Subscription::Failed(e.clone()),
            };
            if let Some(members) = self.read().get(group)
                && members.generation == generation
            {
                members.subscription.send_replace(state);
            }
            return outcome;
        }
        match subscription
            .wait_for(|s| *s != Subscription::Pending)
            .await
            .map(|s| s.clone())
        {
            Ok(Subscription::Failed(e)) => Err(e),
            Ok(_) => Ok(()),
            // The group was dropped while pending: its subscription failed.
            Err(_) => Err(BrokerError::Unavailable(
                "subscription abandoned".to_owned(),
            )),
        }
    }

    /// Removes `conn` from `group`; the last member out unsubscribes the broker.
    pub async fn leave(&self, conn: ConnId, group: &Group) {
        if let Some(generation) = self.remove(conn, group, None) {
            self.subscriptions
                .unsubscribe(group.clone(), generation)
                .await;
        }
    }

    /// Removes `conn` from `group` at once, without awaiting: usable from `Drop`, so a
    /// connection that panics or is cancelled still leaves. When it was the last member, the
    /// broker is asked to unsubscribe without waiting for room in the control channel
    /// ([`Subscriptions::unsubscribe_now`]; the generation makes it harmless if the group is
    /// joined again meanwhile).
    pub fn leave_now(&self, conn: ConnId, group: &Group) {
        if let Some(generation) = self.remove(conn, group, None) {
            self.subscriptions
                .unsubscribe_now(group.clone(), generation);
        }
    }

    /// Whether `conn` is a member of `group` (live or held).
    pub fn is_member(&self, conn: ConnId, group: &Group) -> bool {
        self.read()
            .get(group)
            .is_some_and(|m| m.queues.contains_key(&conn) || m.held.contains_key(&conn))
    }

    /// How many connections are registered (open and not yet cleaned up).
    pub fn connection_count(&self) -> usize {
        self.connections().queues.len()
    }

    /// How many local members `group` has.
    pub fn member_count(&self, group: &Group) -> usize {
        self.read()
            .get(group)
            .map_or(0, |m| m.queues.len() + m.held.len())
    }

    /// How many groups have local members.
    pub fn group_count(&self) -> usize {
        self.read().len()
    }

    /// How many memberships this replica holds, summed over every group.
    pub fn membership_count(&self) -> usize {
        self.memberships.load(Ordering::Relaxed)
    }

    /// Adds `joined` and takes `left` from the membership count, and publishes it. Called with
    /// the `groups` write lock held, so the gauge follows the map.
    fn count_memberships(&self, joined: usize, left: usize) {
        let count = self.memberships.load(Ordering::Relaxed) + joined - left;
        self.memberships.store(count, Ordering::Relaxed);
        metrics::group_members(count);
    }

    /// Removes a member; returns the generation to unsubscribe when the group became empty.
    /// With `only_generation`, a newer life of the group is left alone.
    fn remove(&self, conn: ConnId, group: &Group, only_generation: Option<u64>) -> Option<u64> {
        let mut groups = self.write();
        let members = groups.get_mut(group)?;
        if only_generation.is_some_and(|g| g != members.generation) {
            return None;
        }
        let was_live = members.queues.remove(&conn).is_some();
        let was_held = members.held.remove(&conn).is_some();
        if was_live || was_held {
            self.count_memberships(0, 1);
        }
        members
            .floors
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&conn);
        if !members.queues.is_empty() || !members.held.is_empty() {
            return None;
        }
        let generation = members.generation;
        groups.remove(group);
        metrics::groups_active(groups.len());
        Some(generation)
    }

    fn connections(&self) -> std::sync::MutexGuard<'_, Connections> {
        self.connections
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, HashMap<Group, Members>> {
        // A panic while holding the lock cannot leave the map half-updated in a way that
        // matters more than losing the whole replica, so poisoning is ignored.
        self.groups.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, HashMap<Group, Members>> {
        self.groups.write().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Fanout for Groups {
    fn fan_out(&self, publication: &Publication) {
        let (queued, slow) = {
            let groups = self.read();
            let Some(members) = groups.get(&publication.group) else {
                return;
            };
            // One WebSocket frame per publication: server frames are unmasked, so the same
            // bytes are right for every recipient.
            let frame = event_frame(publication);
            // A small group is written to directly (no wake-up of the connection task); a large
            // one is queued, so the publisher is not held up by thousands of writes and each
            // connection task writes whatever accumulated in one system call.
            let mode = if members.queues.len() <= MAX_DIRECT_WRITE_MEMBERS {
                WriteMode::DirectIfIdle
            } else {
                WriteMode::Queue
            };
            let mut queued = 0;
            let mut slow = 0;
            let mut floors = members
                .floors
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            for (conn, queue) in &members.queues {
                if !floors.admits(conn, publication.position.as_ref()) {
                    continue;
                }
                match queue.try_push(&frame, mode) {
                    Ok(()) => queued += 1,
                    Err(Rejected::Overflowed) => slow += 1,
                    Err(Rejected::Closed) => {}
                }
            }
            for held in members.held.values() {
                let mut frames = held.frames.lock().unwrap_or_else(PoisonError::into_inner);
                let hold = frames.hold(publication.position.as_ref(), frame.clone(), |n| {
                    held.outbound.fits(n)
                });
                if hold == Hold::Overflowed {
                    held.outbound.close(Closing::SlowConsumer);
                    slow += 1;
                }
            }
            (queued, slow)
        };
        let latency = SystemTime::now()
            .duration_since(publication.published_at)
            .unwrap_or_default();
        metrics::fanned_out(queued, latency);
        if slow > 0 {
            metrics::slow_consumers_closed(slow);
        }
    }
}

/// A publication's WebSocket frame: the event untouched, then its position when it has one
/// (the frame is then tagged with it).
fn event_frame(publication: &Publication) -> Frame {
    let bytes = frames::event_frame(
        &publication.group,
        publication.kind,
        &publication.payload,
        publication.position.as_ref(),
    );
    match &publication.position {
        Some(position) => Frame::tagged(
            bytes,
            Tag {
                group: publication.group.clone(),
                position: position.clone(),
            },
        ),
        None => Frame::new(bytes),
    }
}

#[cfg(test)]
mod tests;
