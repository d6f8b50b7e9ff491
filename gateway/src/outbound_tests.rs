//! The queue's direct writes and a stateful connection's numbering, with a socket the test
//! scripts: it takes so many bytes, then would block, or fails.

use super::*;

/// A write side that takes up to `room` bytes, then would block; or fails once `broken`.
#[derive(Debug, Default)]
struct TestWire {
    state: Mutex<TestWireState>,
}

#[derive(Debug, Default)]
struct TestWireState {
    room: usize,
    broken: bool,
    written: Vec<u8>,
}

impl TestWire {
    fn with_room(room: usize) -> Arc<Self> {
        let wire = Arc::new(Self::default());
        wire.set_room(room);
        wire
    }

    fn set_room(&self, room: usize) {
        self.state.lock().unwrap().room = room;
    }

    fn written(&self) -> Vec<u8> {
        self.state.lock().unwrap().written.clone()
    }
}

impl Wire for TestWire {
    fn try_write(&self, buf: &[u8]) -> io::Result<usize> {
        let mut state = self.state.lock().unwrap();
        if state.broken {
            return Err(io::ErrorKind::BrokenPipe.into());
        }
        if state.room == 0 {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        let n = buf.len().min(state.room);
        state.room -= n;
        state.written.extend_from_slice(&buf[..n]);
        Ok(n)
    }

    fn try_write_vectored(&self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        match bufs.first() {
            Some(buf) => self.try_write(buf),
            None => Ok(0),
        }
    }

    fn poll_write_ready(&self, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

fn frame(text: &'static str) -> Frame {
    Frame::new(Bytes::from_static(text.as_bytes()))
}

/// Pushes `text` as fan-out does, writing it directly if the connection is idle.
fn push(outbound: &Outbound, text: &'static str) {
    outbound
        .try_push(&frame(text), WriteMode::DirectIfIdle)
        .unwrap();
}

/// A queue with `wire` attached for direct writes.
fn attached(wire: &Arc<TestWire>) -> (Outbound, Inbox) {
    let (outbound, inbox) = channel(8);
    inbox.attach(Arc::clone(wire) as Arc<dyn Wire>);
    (outbound, inbox)
}

/// A stateful connection's queue (its ledger keeping `limit` bytes) on a socket that takes
/// `room` bytes.
fn stateful(room: usize, limit: usize) -> (Arc<TestWire>, Outbound, Inbox) {
    let wire = TestWire::with_room(room);
    let (outbound, inbox) = attached(&wire);
    inbox.track(Ledger::new(limit));
    (wire, outbound, inbox)
}

#[test]
fn an_idle_connection_gets_frames_written_directly_and_a_busy_one_queued() {
    let wire = TestWire::with_room(usize::MAX);
    let (outbound, mut inbox) = attached(&wire);
    push(&outbound, "a");
    assert_eq!(wire.written(), b"a");
    assert!(inbox.try_recv().is_none(), "nothing queued");

    inbox.begin_writing();
    push(&outbound, "b");
    outbound.try_push(&frame("c"), WriteMode::Queue).unwrap();
    assert_eq!(wire.written(), b"a", "the task is writing: queued");
    assert_eq!(inbox.try_recv().unwrap().bytes(), "b");
    assert_eq!(inbox.try_recv().unwrap().bytes(), "c");
    inbox.finish_writing();
    push(&outbound, "d");
    assert_eq!(wire.written(), b"ad");
}

#[test]
fn frames_pushed_while_the_task_acts_on_records_wait_in_the_queue() {
    let wire = TestWire::with_room(usize::MAX);
    let (outbound, mut inbox) = attached(&wire);
    inbox.hold();
    push(&outbound, "a");
    inbox.release();
    push(&outbound, "b");
    assert_eq!(
        wire.written(),
        b"",
        "queued behind the held frame, in order"
    );
    assert_eq!(inbox.try_recv().unwrap().bytes(), "a");
    assert_eq!(inbox.try_recv().unwrap().bytes(), "b");
}

#[test]
fn a_stateful_connection_numbers_what_is_written_directly_and_what_the_task_takes_in_order() {
    let (wire, outbound, mut inbox) = stateful(usize::MAX, 1_000);
    push(&outbound, "one");
    inbox.begin_writing();
    push(&outbound, "two");
    assert_eq!(inbox.ledger(|l| l.resume_from()), Some(1));
    assert_eq!(inbox.try_recv().unwrap().bytes(), "two");
    inbox.finish_writing();
    push(&outbound, "three");
    let kept = inbox
        .ledger(|l| {
            l.unacked_with_ids()
                .map(|(id, f)| (id, f.bytes()))
                .collect::<Vec<_>>()
        })
        .unwrap();
    assert_eq!(
        kept,
        [(1, "one".into()), (2, "two".into()), (3, "three".into())]
    );
    assert_eq!(wire.written(), b"onethree", "two is the task's to write");
}

#[test]
fn the_rest_of_a_frame_cut_short_is_not_numbered_again_and_is_dropped_with_its_socket() {
    let (wire, outbound, mut inbox) = stateful(2, 1_000);
    push(&outbound, "hello");
    assert_eq!(wire.written(), b"he");
    push(&outbound, "next");
    assert_eq!(
        inbox.ledger(|l| l.unacked().map(Frame::bytes).collect::<Vec<_>>()),
        Some(vec!["hello".into()]),
        "numbered whole when its first bytes went out; next is queued behind its rest"
    );
    // The socket is gone before the task wrote the rest: a new transport replays the whole
    // frame from the ledger, so the rest must not follow it there.
    inbox.detach();
    let taken = inbox.try_recv().unwrap();
    assert_eq!(taken.bytes(), "next");
    assert!(inbox.try_recv().is_none());
    let ids: Vec<u64> = inbox
        .ledger(|l| l.unacked_with_ids().map(|(id, _)| id).collect())
        .unwrap();
    assert_eq!(ids, [1, 2]);
}

#[test]
fn the_rest_of_a_frame_is_taken_and_not_numbered_while_the_socket_stays() {
    let (wire, outbound, mut inbox) = stateful(2, 1_000);
    push(&outbound, "hello");
    assert_eq!(wire.written(), b"he");
    let rest = inbox.try_recv().unwrap();
    assert_eq!(rest.bytes(), "llo");
    assert_eq!(inbox.ledger(|l| l.resume_from()), Some(1));
    assert_eq!(
        inbox.ledger(|l| l.unacked().count()),
        Some(1),
        "the rest is part of message 1"
    );
}

#[test]
fn a_full_ledger_stops_direct_writes_and_takes_until_an_ack_but_not_the_rest_of_a_frame() {
    let (wire, outbound, mut inbox) = stateful(3, 4);
    // Written in part: the ledger (4 bytes at most) is now full with its 5 bytes.
    push(&outbound, "hello");
    wire.set_room(usize::MAX);
    push(&outbound, "world");
    assert_eq!(wire.written(), b"hel", "queued behind the rest");
    assert_eq!(
        inbox.try_recv().unwrap().bytes(),
        "lo",
        "the rest goes out all the same"
    );
    assert!(inbox.try_recv().is_none(), "full: world waits for an Ack");
    inbox.ledger(|l| l.acked(1));
    assert_eq!(inbox.try_recv().unwrap().bytes(), "world");
    inbox.finish_writing();
    push(&outbound, "again");
    assert_eq!(wire.written(), b"hel", "full again: queued, not written");
    assert_eq!(inbox.closing(), None);
}

#[test]
fn a_failed_direct_write_queues_the_frame_unnumbered_for_the_task() {
    let (wire, outbound, mut inbox) = stateful(usize::MAX, 1_000);
    wire.state.lock().unwrap().broken = true;
    push(&outbound, "a");
    assert_eq!(inbox.ledger(|l| l.unacked().count()), Some(0));
    assert_eq!(inbox.try_recv().unwrap().bytes(), "a");
    assert_eq!(
        inbox.ledger(|l| l.unacked().count()),
        Some(1),
        "numbered when taken"
    );
}
