//! Per-connection bounded queue of frames, from fan-out to the socket.
//!
//! The push side ([`Outbound`]) never waits: a full queue marks the connection as overflowed
//! and wakes its task, which closes it as a slow consumer. The socket side ([`Inbox`]) belongs to
//! the connection task. A queue slot is one pointer, so an idle connection's queue is small.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use bytes::Bytes;
use tokio::sync::{Notify, mpsc};

/// One encoded SignalR record, shared by every recipient of a publication.
#[derive(Debug, Clone)]
pub struct Frame(Arc<Bytes>);

impl Frame {
    /// Wraps encoded record bytes.
    pub fn new(bytes: Bytes) -> Self {
        Self(Arc::new(bytes))
    }

    /// The record bytes (a cheap reference-counted clone).
    pub fn bytes(&self) -> Bytes {
        Bytes::clone(&self.0)
    }
}

/// The push side of a connection's queue; cloned into every group the connection joins.
#[derive(Debug, Clone)]
pub struct Outbound {
    tx: mpsc::Sender<Frame>,
    overflow: Arc<Overflow>,
}

/// The socket side of a connection's queue.
#[derive(Debug)]
pub struct Inbox {
    rx: mpsc::Receiver<Frame>,
    overflow: Arc<Overflow>,
}

#[derive(Debug, Default)]
struct Overflow {
    happened: AtomicBool,
    notify: Notify,
}

/// The frame was not queued: the connection is closing (full queue or gone).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rejected {
    /// This push found the queue full; the connection is now marked as a slow consumer.
    Overflowed,
    /// The connection was already overflowed or has ended.
    Closed,
}

/// A queue holding up to `capacity` frames.
pub fn channel(capacity: usize) -> (Outbound, Inbox) {
    let (tx, rx) = mpsc::channel(capacity);
    let overflow = Arc::new(Overflow::default());
    (
        Outbound {
            tx,
            overflow: Arc::clone(&overflow),
        },
        Inbox { rx, overflow },
    )
}

impl Outbound {
    /// Queues a frame without waiting.
    ///
    /// # Errors
    /// [`Rejected`] when the frame was dropped; `Overflowed` is returned once per connection,
    /// so the caller can count slow consumers exactly.
    pub fn try_push(&self, frame: &Frame) -> Result<(), Rejected> {
        if self.overflow.happened.load(Ordering::Relaxed) {
            return Err(Rejected::Closed);
        }
        match self.tx.try_send(frame.clone()) {
            Ok(()) => Ok(()),
            Err(mpsc::error::TrySendError::Closed(_)) => Err(Rejected::Closed),
            Err(mpsc::error::TrySendError::Full(_)) => {
                if self.overflow.happened.swap(true, Ordering::Relaxed) {
                    return Err(Rejected::Closed);
                }
                self.overflow.notify.notify_one();
                Err(Rejected::Overflowed)
            }
        }
    }

    /// Whether both ends belong to the same connection.
    pub fn same_queue(&self, other: &Outbound) -> bool {
        self.tx.same_channel(&other.tx)
    }
}

impl Inbox {
    /// The next frame.
    ///
    /// # Cancel safety
    /// Cancel-safe: a frame is either returned or stays queued.
    pub async fn recv(&mut self) -> Option<Frame> {
        self.rx.recv().await
    }

    /// A frame already queued, if any (to batch writes).
    pub fn try_recv(&mut self) -> Option<Frame> {
        self.rx.try_recv().ok()
    }

    /// A handle that resolves when the queue overflows, usable while frames are received.
    pub fn overflow_signal(&self) -> OverflowSignal {
        OverflowSignal(Arc::clone(&self.overflow))
    }
}

/// Resolves when a connection's queue has overflowed.
#[derive(Debug)]
pub struct OverflowSignal(Arc<Overflow>);

impl OverflowSignal {
    /// Resolves once the queue has overflowed.
    ///
    /// # Cancel safety
    /// Cancel-safe: the overflow is remembered, so a later call resolves at once.
    pub async fn wait(&self) {
        if self.0.happened.load(Ordering::Relaxed) {
            return;
        }
        self.0.notify.notified().await;
    }
}
