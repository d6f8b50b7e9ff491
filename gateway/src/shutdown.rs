//! Shutdown and drain: who is told to stop, and who is waited for.
//!
//! Connections and background tasks (the broker) are spawned through trackers so shutdown can
//! wait for them; nothing long-lived is detached. The order is fixed: readiness turns false,
//! the listener stops accepting, connections are told to close (with reconnect allowed, through
//! their queues, by [`crate::groups::Groups::close_all`]), they are awaited under the drain
//! deadline, and only then does the broker stop.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Shared shutdown state of one gateway.
#[derive(Debug, Clone, Default)]
pub struct Shutdown {
    draining: Arc<AtomicBool>,
    stop_background: CancellationToken,
    connections: TaskTracker,
    background: TaskTracker,
}

/// How the drain ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Drained {
    /// Every connection closed in time.
    Completely,
    /// The deadline passed with connections still open; this many were cut.
    CutShort(usize),
}

impl Shutdown {
    /// A fresh, running state.
    pub fn new() -> Self {
        Self::default()
    }

    /// Whether draining has begun (readiness is false from then on).
    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }

    /// Marks the start of the drain.
    pub fn begin_drain(&self) {
        self.draining.store(true, Ordering::Relaxed);
    }

    /// The token background tasks watch; cancelled after the connections are gone.
    pub fn background_token(&self) -> &CancellationToken {
        &self.stop_background
    }

    /// Tracker for connection tasks.
    pub fn connections(&self) -> &TaskTracker {
        &self.connections
    }

    /// Tracker for background tasks (the broker).
    pub fn background(&self) -> &TaskTracker {
        &self.background
    }

    /// Waits for every connection task to end, at most `deadline`. The caller has told them to
    /// close (through their queues).
    pub async fn drain_connections(&self, deadline: Duration) -> Drained {
        self.begin_drain();
        self.connections.close();
        match tokio::time::timeout(deadline, self.connections.wait()).await {
            Ok(()) => Drained::Completely,
            Err(_) => Drained::CutShort(self.connections.len()),
        }
    }

    /// Stops background tasks and waits for them.
    pub async fn stop_background(&self, deadline: Duration) {
        self.stop_background.cancel();
        self.background.close();
        let _ = tokio::time::timeout(deadline, self.background.wait()).await;
    }
}
