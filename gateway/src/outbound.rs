//! Per-connection bounded queue of frames, from fan-out to the socket.
//!
//! The push side ([`Outbound`]) never waits: a full queue marks the connection as a slow
//! consumer and wakes its task, which closes it. The same handle tells a connection to close for
//! shutdown, so the connection task has one thing to wait on for everything the gateway sends it.
//! The socket side ([`Inbox`]) belongs to the connection task.
//!
//! It is a mutex around a `VecDeque` rather than a channel: an idle connection's queue is one
//! small allocation with no buffer until a frame arrives, the consumer is woken only when the
//! queue goes from empty to non-empty, and the lock is held for a push or a pop, never across an
//! await.
//!
//! Direct writes: once the connection has attached a writer handle ([`Wire`]), a push
//! that finds nothing queued and the connection task neither writing nor holding direct writes
//! off writes the frame to the socket at once, without waking the task. Only what the socket
//! does not take (it would block, or took part) is queued for the task. The decision is made
//! under the queue's lock, so frames never interleave and keep their order.
//!
//! A stateful connection's ledger (`connection::Ledger`) lives here, under the same lock: every
//! frame is numbered and kept at the moment its first byte is written, whether a push writes it
//! directly or the connection task takes it from the queue, so the ids the client counts and the
//! ledger's always agree. While the ledger is full, nothing more goes out (or is taken) until an
//! Ack.

use std::collections::VecDeque;
use std::future::poll_fn;
use std::io::{self, IoSlice};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll, Waker};

use bytes::Bytes;
use publisher_lib::contract::{Group, Position};

use crate::connection::Ledger;

/// Queue capacity kept after a burst drains; larger buffers are released.
const RETAINED_CAPACITY: usize = 16;

/// Bytes ready for the socket (a whole WebSocket frame, or what is left of one), shared by
/// every recipient of a publication, and for an event the group and position it carries (a
/// stateful connection remembers what it sent). The queue never looks inside.
#[derive(Debug, Clone)]
pub struct Frame(Arc<FrameData>);

#[derive(Debug)]
struct FrameData {
    bytes: Bytes,
    tag: Option<Tag>,
    /// The rest of a frame whose start was written directly: the ledger counted it already.
    rest: bool,
}

/// The group and position of the event a frame carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tag {
    /// The event's group.
    pub group: Group,
    /// Its position in the group.
    pub position: Position,
}

impl Frame {
    /// Wraps bytes to write as they are.
    pub fn new(bytes: Bytes) -> Self {
        Self(Arc::new(FrameData {
            bytes,
            tag: None,
            rest: false,
        }))
    }

    /// Wraps an event's frame with the group and position it carries.
    pub fn tagged(bytes: Bytes, tag: Tag) -> Self {
        Self(Arc::new(FrameData {
            bytes,
            tag: Some(tag),
            rest: false,
        }))
    }

    /// The bytes (a cheap reference-counted clone).
    pub fn bytes(&self) -> Bytes {
        Bytes::clone(&self.0.bytes)
    }

    /// The event's group and position, for an event frame that has one.
    pub fn tag(&self) -> Option<&Tag> {
        self.0.tag.as_ref()
    }

    /// Its length in bytes.
    pub fn len(&self) -> usize {
        self.0.bytes.len()
    }

    /// Whether it has no bytes.
    pub fn is_empty(&self) -> bool {
        self.0.bytes.is_empty()
    }

    /// What is left to write after the first `written` bytes went out.
    fn tail(&self, written: usize) -> Frame {
        Frame(Arc::new(FrameData {
            bytes: self.0.bytes.slice(written..),
            tag: None,
            rest: true,
        }))
    }

    /// Whether this is the rest of a frame already begun (and counted).
    fn is_rest(&self) -> bool {
        self.0.rest
    }
}

/// A writer handle the connection injects so fan-out can write to its socket without waiting
/// (the direct-write path); the queue knows no socket type. `connection::socket` implements it
/// for TCP and Unix streams, tests for scripted writers.
pub trait Wire: Send + Sync + std::fmt::Debug + 'static {
    /// Writes what the socket takes now; `WouldBlock` when it takes nothing.
    ///
    /// # Errors
    /// `WouldBlock`, or the socket's error.
    fn try_write(&self, buf: &[u8]) -> io::Result<usize>;

    /// [`Wire::try_write`] for several buffers at once.
    ///
    /// # Errors
    /// `WouldBlock`, or the socket's error.
    fn try_write_vectored(&self, bufs: &[IoSlice<'_>]) -> io::Result<usize>;

    /// Ready once the socket may take more bytes.
    fn poll_write_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>>;
}

/// Why the gateway wants a connection closed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Closing {
    /// Its queue overflowed: the client cannot keep up.
    SlowConsumer,
    /// The gateway is shutting down or draining.
    Shutdown,
}

/// What the connection task receives.
#[derive(Debug, Clone)]
pub enum Delivery {
    /// A frame to write.
    Frame(Frame),
    /// Close now; frames still queued are dropped.
    Close(Closing),
}

/// The push side of a connection's queue; cloned into every group the connection joins.
#[derive(Debug, Clone)]
pub struct Outbound {
    shared: Arc<Mutex<State>>,
}

/// The socket side of a connection's queue.
#[derive(Debug)]
pub struct Inbox {
    shared: Arc<Mutex<State>>,
}

#[derive(Debug)]
struct State {
    frames: VecDeque<Frame>,
    capacity: usize,
    /// Frames of a resume backlog queued beyond `capacity`; shrinks as frames are taken.
    backlog: usize,
    /// Most frames the connection may hold in all (queued live frames, resume backlogs and
    /// frames held for it during a join); a backlog that does not fit is refused.
    budget: usize,
    /// Frames taken by the connection task so far, to tell when a backlog has gone out.
    taken: u64,
    closing: Option<Closing>,
    receiver_gone: bool,
    waker: Option<Waker>,
    /// The socket, once the connection allows direct writes.
    wire: Option<Arc<dyn Wire>>,
    /// The connection task is writing (or about to): no direct writes meanwhile.
    writing: bool,
    /// The connection task is acting on its client's records (a join, a leave, a
    /// completion): no direct writes meanwhile, so its ledger sees them in order.
    held: bool,
    /// A stateful connection's ledger: what was sent and not acknowledged. Boxed: most
    /// connections are not stateful, and an idle one should stay small.
    ledger: Option<Box<Ledger>>,
}

impl State {
    /// Whether the task may take the next queued frame: always the rest of a frame begun,
    /// otherwise only while the ledger (if any) has room.
    fn may_take(&self) -> bool {
        match (&self.ledger, self.frames.front()) {
            (Some(ledger), Some(front)) => front.is_rest() || ledger.has_room(),
            _ => true,
        }
    }

    /// Takes the next queued frame, numbering it in the ledger.
    fn take(&mut self) -> Option<Frame> {
        if !self.may_take() {
            return None;
        }
        let frame = self.frames.pop_front()?;
        self.backlog = self.backlog.saturating_sub(1);
        self.taken += 1;
        if let Some(ledger) = &mut self.ledger
            && !frame.is_rest()
        {
            ledger.sent(&frame);
        }
        Some(frame)
    }
}

/// How a frame reaches the socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteMode {
    /// Written by the pusher when the connection is idle (attached wire, nothing queued, task
    /// not writing); queued otherwise.
    DirectIfIdle,
    /// Always queued for the connection task, which batches whatever accumulated.
    Queue,
}

/// The frame was not queued.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rejected {
    /// This push found the queue full; the connection is now closing as a slow consumer.
    Overflowed,
    /// The connection is already closing or has ended.
    Closed,
}

/// A resume backlog was not queued: with it the connection would hold more than its budget.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OverBudget;

/// A queue holding up to `capacity` live frames, with no budget for resume backlogs.
pub fn channel(capacity: usize) -> (Outbound, Inbox) {
    channel_within(capacity, usize::MAX)
}

/// A queue holding up to `capacity` live frames and at most `budget` frames in all, resume
/// backlogs and held frames included.
pub fn channel_within(capacity: usize, budget: usize) -> (Outbound, Inbox) {
    let shared = Arc::new(Mutex::new(State {
        frames: VecDeque::new(),
        capacity,
        backlog: 0,
        budget,
        taken: 0,
        closing: None,
        receiver_gone: false,
        waker: None,
        wire: None,
        writing: false,
        held: false,
        ledger: None,
    }));
    (
        Outbound {
            shared: Arc::clone(&shared),
        },
        Inbox { shared },
    )
}

impl Outbound {
    /// Queues a frame without waiting, or with [`WriteMode::DirectIfIdle`] writes it to the
    /// socket at once when nothing is queued and the connection task is not writing.
    ///
    /// # Errors
    /// [`Rejected`] when the frame was dropped; `Overflowed` is returned once per connection,
    /// so the caller can count slow consumers exactly.
    pub fn try_push(&self, frame: &Frame, mode: WriteMode) -> Result<(), Rejected> {
        let mut state = lock(&self.shared);
        if state.closing.is_some() || state.receiver_gone {
            return Err(Rejected::Closed);
        }
        if mode == WriteMode::DirectIfIdle
            && state.frames.is_empty()
            && !state.writing
            && !state.held
            && state.ledger.as_deref().is_none_or(Ledger::has_room)
            && let Some(wire) = &state.wire
        {
            let bytes: &[u8] = &frame.0.bytes;
            match wire.try_write(bytes) {
                // Would block, or the socket failed: the task writes it, or finds the error.
                Ok(0) | Err(_) => {}
                Ok(written) => {
                    if let Some(ledger) = &mut state.ledger {
                        ledger.sent(frame);
                    }
                    if written == bytes.len() {
                        return Ok(());
                    }
                    let rest = frame.tail(written);
                    state.frames.push_back(rest);
                    wake(state);
                    return Ok(());
                }
            }
        }
        if state.frames.len() >= state.capacity + state.backlog {
            state.closing = Some(Closing::SlowConsumer);
            state.frames.clear();
            wake(state);
            return Err(Rejected::Overflowed);
        }
        state.frames.push_back(frame.clone());
        // The consumer takes everything queued whenever it runs, so only the first frame of a
        // batch needs to wake it.
        if state.frames.len() == 1 {
            wake(state);
        }
        Ok(())
    }

    /// Queues a resume backlog (the events a joining client missed) in order, beyond the
    /// capacity: a client must be able to catch up from further back than its live queue
    /// holds. Live frames then get the usual capacity on top. Returns the count of frames taken
    /// (see [`Outbound::taken`]) at which the whole backlog has been taken.
    ///
    /// # Errors
    /// [`OverBudget`] when the queue would then hold more than the budget; nothing is queued.
    pub fn push_backlog(&self, frames: Vec<Frame>) -> Result<u64, OverBudget> {
        let mut state = lock(&self.shared);
        if state.closing.is_some() || state.receiver_gone {
            return Ok(state.taken);
        }
        let before = state.frames.len();
        if before.saturating_add(frames.len()) > state.budget {
            return Err(OverBudget);
        }
        let added = frames.len();
        state.frames.extend(frames);
        state.backlog += added;
        let through = state.taken + state.frames.len() as u64;
        if before == 0 && added > 0 {
            wake(state);
        }
        Ok(through)
    }

    /// Whether `held` more frames, on top of what is queued, stay within the budget.
    pub fn fits(&self, held: usize) -> bool {
        let state = lock(&self.shared);
        state.frames.len().saturating_add(held) <= state.budget
    }

    /// How many frames the connection task has taken so far.
    pub fn taken(&self) -> u64 {
        lock(&self.shared).taken
    }

    /// Tells the connection to close; the first reason given wins.
    pub fn close(&self, closing: Closing) {
        let mut state = lock(&self.shared);
        if state.closing.is_none() {
            state.closing = Some(closing);
            state.frames.clear();
            wake(state);
        }
    }
}

impl Inbox {
    /// The next frame (numbered in the ledger, if any), or the order to close. While the
    /// ledger is full only the order to close comes.
    ///
    /// # Cancel safety
    /// Cancel-safe: nothing is taken from the queue unless it is returned.
    pub async fn recv(&mut self) -> Delivery {
        poll_fn(|cx| {
            let mut state = lock(&self.shared);
            if let Some(closing) = state.closing {
                return Poll::Ready(Delivery::Close(closing));
            }
            match state.take() {
                Some(frame) => {
                    state.writing = true;
                    Poll::Ready(Delivery::Frame(frame))
                }
                // Nothing queued, or the ledger is full: the task acts on the client's Ack
                // itself and looks again.
                None => {
                    if !state
                        .waker
                        .as_ref()
                        .is_some_and(|w| w.will_wake(cx.waker()))
                    {
                        state.waker = Some(cx.waker().clone());
                    }
                    Poll::Pending
                }
            }
        })
        .await
    }

    /// A frame already queued (numbered in the ledger, if any), if the connection is not
    /// closing and the ledger has room (to batch writes).
    pub fn try_recv(&mut self) -> Option<Frame> {
        let mut state = lock(&self.shared);
        if state.closing.is_some() {
            return None;
        }
        let frame = state.take();
        if state.frames.is_empty() && state.frames.capacity() > RETAINED_CAPACITY {
            state.frames.shrink_to(RETAINED_CAPACITY);
        }
        frame
    }

    /// Waits for the order to close, leaving queued frames where they are (a stateful
    /// connection waiting for its client to come back).
    ///
    /// # Cancel safety
    /// Cancel-safe: it takes nothing.
    pub async fn closed(&self) -> Closing {
        poll_fn(|cx| {
            let mut state = lock(&self.shared);
            if let Some(closing) = state.closing {
                return Poll::Ready(closing);
            }
            // A push wakes this too (the queue went non-empty); it just looks again.
            state.waker = Some(cx.waker().clone());
            Poll::Pending
        })
        .await
    }

    /// Why the connection must close, if it must.
    pub fn closing(&self) -> Option<Closing> {
        lock(&self.shared).closing
    }

    /// Lets pushes write straight to `wire` while the task is not writing.
    pub fn attach(&self, wire: Arc<dyn Wire>) {
        lock(&self.shared).wire = Some(wire);
    }

    /// Stops direct writes to the socket attached (a stateful connection's transport ended),
    /// and drops the rest of a frame begun on it: the ledger sends the whole frame again on
    /// the next transport.
    pub fn detach(&self) {
        let mut state = lock(&self.shared);
        state.wire = None;
        if state.frames.front().is_some_and(Frame::is_rest) {
            state.frames.pop_front();
        }
    }

    /// Makes this a stateful connection's queue: `ledger` numbers and keeps every frame from
    /// now on.
    pub(crate) fn track(&self, ledger: Ledger) {
        lock(&self.shared).ledger = Some(Box::new(ledger));
    }

    /// Runs `f` on the ledger, for a stateful connection.
    pub(crate) fn ledger<R>(&self, f: impl FnOnce(&mut Ledger) -> R) -> Option<R> {
        lock(&self.shared).ledger.as_deref_mut().map(f)
    }

    /// Numbers `frame` (a completion the task writes itself) in the ledger, if any, and marks
    /// the task as writing: no direct write comes between its number and its bytes.
    pub fn begin_writing_counted(&self, frame: &Frame) {
        let mut state = lock(&self.shared);
        state.writing = true;
        if let Some(ledger) = &mut state.ledger {
            ledger.sent(frame);
        }
    }

    /// The task acts on its client's records until [`Inbox::release`]: pushes queue meanwhile.
    pub fn hold(&self) {
        lock(&self.shared).held = true;
    }

    /// Ends [`Inbox::hold`]; direct writes resume once nothing is queued.
    pub fn release(&self) {
        lock(&self.shared).held = false;
    }

    /// The task is about to write: pushes queue instead of writing directly.
    pub fn begin_writing(&self) {
        lock(&self.shared).writing = true;
    }

    /// The task finished a write; direct writes resume once nothing is queued. (A frame
    /// [`Inbox::recv`] returned counts as the task writing until this is called.)
    pub fn finish_writing(&self) {
        let mut state = lock(&self.shared);
        if state.frames.is_empty() {
            state.writing = false;
        }
    }
}

impl Drop for Inbox {
    fn drop(&mut self) {
        let mut state = lock(&self.shared);
        state.receiver_gone = true;
        state.frames = VecDeque::new();
        state.waker = None;
        // Releases the socket's write side as soon as the connection ends, whoever still holds
        // an Outbound.
        state.wire = None;
    }
}

fn lock(shared: &Mutex<State>) -> MutexGuard<'_, State> {
    // Every critical section leaves the state consistent, so a poisoned lock is still usable.
    shared.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Wakes the consumer after releasing the lock.
fn wake(mut state: MutexGuard<'_, State>) {
    let waker = state.waker.take();
    drop(state);
    if let Some(waker) = waker {
        waker.wake();
    }
}

#[cfg(test)]
#[path = "outbound_tests.rs"]
mod tests;
