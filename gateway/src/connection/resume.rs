//! The stateful connections of this replica, by connection id, so a WebSocket upgrade carrying
//! one's connection token reaches its task instead of starting a new connection.
//!
//! A connection id is used once: while its connection lives, an upgrade with its token resumes
//! it; after the connection ended, the id stays remembered until its token would have expired,
//! so a late resume is refused (404, the client then reconnects from scratch) instead of
//! starting a connection the client would take for the old one.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use tokio::sync::mpsc;

use super::Socket;

/// A new transport for a stateful connection, from an upgrade.
#[derive(Debug)]
pub struct Resumed<S> {
    /// The new socket, past the upgrade (no handshake follows on it).
    pub socket: Socket<S>,
    /// Expiry of the user token presented with it (Unix seconds).
    pub valid_until: u64,
}

/// What a live stateful connection's task is handed through its slot.
#[derive(Debug)]
pub enum Transport<S> {
    /// Its client came back here on a new socket. Boxed: the slot's channel lays out room for
    /// a block of these whether or not one ever comes, on every stateful connection.
    Resumed(Box<Resumed<S>>),
    /// Its client came back on another replica, which asks for it: park it in Redis and end.
    HandOver,
}

/// What an upgrade with a stateful connection token finds.
#[derive(Debug)]
pub enum Claim<S> {
    /// The id is not in use here: a new (or carried) connection, which owns this slot.
    New(ResumeSlot<S>),
    /// Its connection is alive: hand it the new socket.
    Resume(mpsc::Sender<Transport<S>>),
    /// Its connection ended: refuse the upgrade.
    Ended,
}

/// Every stateful connection id this replica knows.
#[derive(Debug)]
pub struct Resumable<S> {
    inner: Mutex<Inner<S>>,
}

#[derive(Debug)]
struct Inner<S> {
    live: HashMap<String, mpsc::Sender<Transport<S>>>,
    /// Ended ids and when they may be forgotten (Unix seconds), oldest first.
    ended: VecDeque<(u64, String)>,
    ended_ids: HashMap<String, u64>,
}

/// A live connection's place in the registry; dropping it (the connection ended, however it
/// ended) leaves the id remembered as ended.
#[derive(Debug)]
pub struct ResumeSlot<S> {
    id: String,
    forget_at: u64,
    registry: Arc<Resumable<S>>,
    /// New transports for this connection, and requests to hand it over.
    pub transports: mpsc::Receiver<Transport<S>>,
}

impl<S> ResumeSlot<S> {
    /// The connection id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// When its token expires (Unix seconds): until then an upgrade with it must not start a
    /// new connection.
    pub fn token_expires(&self) -> u64 {
        self.forget_at
    }

    /// The connection went on to another replica: this one forgets it instead of remembering
    /// it as ended, so its client may be carried back here later.
    pub fn handed_off(mut self) {
        self.registry.lock().live.remove(&self.id);
        self.id.clear();
    }
}

impl<S> Default for Resumable<S> {
    fn default() -> Self {
        Self {
            inner: Mutex::new(Inner {
                live: HashMap::new(),
                ended: VecDeque::new(),
                ended_ids: HashMap::new(),
            }),
        }
    }
}

impl<S> Resumable<S> {
    /// Looks up connection `id` for an upgrade at `now`; a new id is registered as live, to be
    /// remembered until `forget_at` once it ends (both Unix seconds).
    pub fn claim(self: &Arc<Self>, id: &str, now: u64, forget_at: u64) -> Claim<S> {
        let mut inner = self.lock();
        inner.forget_expired(now);
        if let Some(sender) = inner.live.get(id) {
            return Claim::Resume(sender.clone());
        }
        if inner.ended_ids.contains_key(id) {
            return Claim::Ended;
        }
        // One pending transport at a time; a second upgrade racing the first is refused.
        let (sender, transports) = mpsc::channel(1);
        inner.live.insert(id.to_owned(), sender);
        Claim::New(ResumeSlot {
            id: id.to_owned(),
            forget_at,
            registry: Arc::clone(self),
            transports,
        })
    }

    /// Live stateful connections.
    pub fn live(&self) -> usize {
        self.lock().live.len()
    }

    fn lock(&self) -> MutexGuard<'_, Inner<S>> {
        // Every critical section leaves the maps consistent.
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl<S> Inner<S> {
    fn forget_expired(&mut self, now: u64) {
        while let Some((at, _)) = self.ended.front() {
            if *at > now {
                break;
            }
            if let Some((at, id)) = self.ended.pop_front()
                && self.ended_ids.get(&id) == Some(&at)
            {
                self.ended_ids.remove(&id);
            }
        }
    }
}

impl<S: Send + 'static> crate::broker::Handovers for Resumable<S> {
    fn hand_over(&self, connection_id: &str) {
        let sender = self.lock().live.get(connection_id).cloned();
        // A full slot holds a transport or a request already: the task sees that first.
        if let Some(sender) = sender
            && sender.try_send(Transport::HandOver).is_ok()
        {
            tracing::debug!(connection_id, "handover requested by another replica");
        }
    }
}

impl<S> Drop for ResumeSlot<S> {
    fn drop(&mut self) {
        if self.id.is_empty() {
            // Handed off.
            return;
        }
        let mut inner = self.registry.lock();
        inner.live.remove(&self.id);
        inner.ended_ids.insert(self.id.clone(), self.forget_at);
        inner
            .ended
            .push_back((self.forget_at, std::mem::take(&mut self.id)));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    type Registry = Arc<Resumable<tokio::io::Empty>>;

    #[test]
    fn what_the_slot_carries_is_a_pointer_or_two() {
        // The slot's channel reserves a block of 32 of these on every stateful connection,
        // resumed or not: with the socket inline that was 5-6 KiB per connection.
        let size = std::mem::size_of::<Transport<tokio::net::tcp::OwnedReadHalf>>();
        assert!(size <= 16, "a transport is {size} bytes");
    }

    #[test]
    fn an_id_is_new_once_then_resumed_then_ended_until_forgotten() {
        let registry: Registry = Arc::default();
        let Claim::New(slot) = registry.claim("a", 100, 400) else {
            panic!("a new id is a new connection");
        };
        assert!(matches!(registry.claim("a", 101, 401), Claim::Resume(_)));
        assert_eq!(registry.live(), 1);
        drop(slot);
        assert_eq!(registry.live(), 0);
        assert!(matches!(registry.claim("a", 399, 699), Claim::Ended));
        assert!(
            matches!(registry.claim("a", 400, 700), Claim::New(_)),
            "forgotten once its token expired (the upgrade refuses the expired token first)"
        );
    }

    #[test]
    fn a_connection_handed_off_may_come_back() {
        let registry: Registry = Arc::default();
        let Claim::New(slot) = registry.claim("a", 0, 400) else {
            panic!("new");
        };
        slot.handed_off();
        assert_eq!(registry.live(), 0);
        assert!(matches!(registry.claim("a", 1, 400), Claim::New(_)));
    }

    #[test]
    fn ended_ids_are_forgotten_oldest_first() {
        let registry: Registry = Arc::default();
        for (i, id) in ["a", "b", "c"].into_iter().enumerate() {
            let Claim::New(slot) = registry.claim(id, 0, 10 + i as u64) else {
                panic!("new");
            };
            drop(slot);
        }
        assert!(matches!(registry.claim("a", 10, 0), Claim::New(_)));
        assert!(matches!(registry.claim("b", 10, 0), Claim::Ended));
        assert!(matches!(registry.claim("c", 11, 0), Claim::Ended));
        assert!(matches!(registry.claim("b", 11, 0), Claim::New(_)));
    }
}
