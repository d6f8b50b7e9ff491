//! Shutdown and drain: who is told to stop, who is waited for, and in which order.
//!
//! Connections and background tasks (the broker) are spawned through trackers so shutdown can
//! wait for them; the servers' and the drain's own tasks are held by their `JoinHandle`s and
//! awaited. Nothing is spawned untracked: even `Groups::leave_now`, which runs from a `Drop`,
//! asks for its unsubscribe without a task (`Subscriptions::unsubscribe_now`).
//! [`Shutdown::drain`] is the order, fixed: readiness turns false, the
//! listener stops accepting, every connection is told to close (reconnect allowed) through its
//! queue, spread over half the drain deadline, they are awaited under the deadline, and only
//! then does the broker stop, and the admin listener last.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::Context;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::outbound::{Closing, Outbound};

/// How long background tasks (the broker) get to stop after the connections are gone.
const BACKGROUND_STOP_TIMEOUT: Duration = Duration::from_secs(5);
/// Closing clients in batches: at most one batch this often.
const CLOSE_STEP: Duration = Duration::from_millis(20);

/// Shared shutdown state of one gateway.
#[derive(Debug, Clone, Default)]
pub struct Shutdown {
    draining: Arc<AtomicBool>,
    stop_background: CancellationToken,
    connections: TaskTracker,
    background: TaskTracker,
}

/// What [`Shutdown::drain`] stops, and its timings.
#[derive(Debug)]
pub struct Servers {
    /// `--shutdown-delay`: how long to report not ready while still serving.
    pub delay: Duration,
    /// `--drain-timeout`: how long closing the connections may take.
    pub timeout: Duration,
    /// Makes the public listener stop accepting.
    pub stop_accepting: CancellationToken,
    /// The public server; it ends once its HTTP requests in progress have finished.
    pub public: JoinHandle<()>,
    /// Stops the admin listener.
    pub stop_admin: CancellationToken,
    /// The admin server.
    pub admin: JoinHandle<std::io::Result<()>>,
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

    /// Shuts the gateway down in the order of the module documentation, logging each phase.
    /// `close_connections` is called once the listener has stopped accepting; it returns the
    /// queues of the open connections and makes those that register later close at once
    /// (`Groups::begin_close_all`).
    ///
    /// # Errors
    /// When the public or admin server panicked or the admin server failed.
    pub async fn drain(
        &self,
        servers: Servers,
        close_connections: impl FnOnce() -> Vec<Outbound>,
    ) -> anyhow::Result<()> {
        let started = tokio::time::Instant::now();
        self.begin_drain();
        if !servers.delay.is_zero() {
            tracing::info!(
                delay_ms = servers.delay.as_millis() as u64,
                "shutdown started: not ready, still serving until the load balancer notices"
            );
            tokio::time::sleep(servers.delay).await;
        }
        servers.stop_accepting.cancel();
        let queues = close_connections();
        let spread = servers.timeout / 2;
        tracing::info!(
            connections = queues.len(),
            spread_ms = spread.as_millis() as u64,
            "no new connections; closing clients with reconnect allowed"
        );
        // The listener has stopped accepting; plain HTTP requests still in flight finish on
        // their own, but none of them may hold the WebSocket drain back.
        let ((), public, drained) = tokio::join!(
            close_spread(queues, spread),
            tokio::time::timeout(servers.timeout, servers.public),
            self.drain_connections(servers.timeout)
        );
        match public {
            Ok(joined) => joined.context("public server panicked")?,
            Err(_) => tracing::warn!("HTTP requests still in flight at the drain deadline"),
        }
        match drained {
            Drained::Completely => tracing::info!(
                elapsed_ms = started.elapsed().as_millis() as u64,
                "connections drained"
            ),
            Drained::CutShort(left) => {
                tracing::warn!(left, "drain deadline reached with connections still open")
            }
        }
        self.stop_background(BACKGROUND_STOP_TIMEOUT).await;
        servers.stop_admin.cancel();
        servers
            .admin
            .await
            .context("admin server panicked")?
            .context("admin server failed")?;
        tracing::info!(
            elapsed_ms = started.elapsed().as_millis() as u64,
            "shutdown finished"
        );
        Ok(())
    }
}

/// Closes `queues` in even batches over `over` (at most one batch every [`CLOSE_STEP`]), so a
/// replica's clients reconnect to the others at a steady rate instead of all at once.
async fn close_spread(queues: Vec<Outbound>, over: Duration) {
    if queues.is_empty() {
        return;
    }
    let most_batches = (over.as_millis() / CLOSE_STEP.as_millis()).max(1) as usize;
    let batch = queues.len().div_ceil(queues.len().min(most_batches));
    let batches = queues.len().div_ceil(batch);
    let period = over / u32::try_from(batches).unwrap_or(u32::MAX);
    let mut tick = tokio::time::interval(period.max(Duration::from_millis(1)));
    for chunk in queues.chunks(batch) {
        tick.tick().await;
        for queue in chunk {
            queue.close(Closing::Shutdown);
        }
    }
}

#[cfg(test)]
#[path = "shutdown_tests.rs"]
mod tests;
