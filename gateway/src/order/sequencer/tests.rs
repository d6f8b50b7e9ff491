use std::time::SystemTime;

use bytes::Bytes;
use publisher_lib::contract::{EventKind, Group};

use super::*;

fn west() -> Group {
    Group::try_dispatch("west").expect("valid region")
}

fn at(epoch: &str, seq: u64) -> Position {
    Position {
        epoch: epoch.to_owned(),
        seq,
    }
}

/// The publication of `(epoch, seq)`, its payload naming its position.
fn event(epoch: &str, seq: u64) -> Publication {
    Publication {
        group: west(),
        kind: EventKind::RecommendationReady,
        payload: Bytes::from(format!("{epoch}/{seq}")),
        published_at: SystemTime::UNIX_EPOCH,
        position: Some(at(epoch, seq)),
    }
}

fn recovered(head: Position, missed: Vec<Publication>) -> History {
    History {
        head,
        recovered: Some(true),
        missed,
    }
}

/// Runs `step` and returns what it delivered (as payloads) and the read it asked for.
fn check(
    sequencer: &mut Sequencer,
    step: impl FnOnce(&mut Sequencer, &mut dyn FnMut(&Publication)) -> Option<Position>,
) -> (Vec<String>, Option<Position>) {
    let mut delivered = Vec::new();
    let read = step(sequencer, &mut |p: &Publication| {
        delivered.push(String::from_utf8_lossy(&p.payload).into_owned());
    });
    (delivered, read)
}

fn live(sequencer: &mut Sequencer, publication: Publication) -> (Vec<String>, Option<Position>) {
    check(sequencer, |s, deliver| {
        s.live(publication, &mut |p: &Publication| deliver(p))
    })
}

#[test]
fn in_order_messages_pass_and_repeats_are_dropped() {
    let mut sequencer = Sequencer::default();
    assert_eq!(
        live(&mut sequencer, event("e", 3)),
        (vec!["e/3".into()], None)
    );
    assert_eq!(
        live(&mut sequencer, event("e", 4)),
        (vec!["e/4".into()], None)
    );
    assert_eq!(live(&mut sequencer, event("e", 4)), (vec![], None));
    assert_eq!(live(&mut sequencer, event("e", 2)), (vec![], None));
}

#[test]
fn a_gap_holds_deliveries_until_the_history_fills_it() {
    let mut sequencer = Sequencer::default();
    let _ = live(&mut sequencer, event("e", 1));
    assert_eq!(
        live(&mut sequencer, event("e", 4)),
        (vec![], Some(at("e", 1)))
    );
    assert_eq!(live(&mut sequencer, event("e", 5)), (vec![], None));
    assert_eq!(sequencer.held_group(), Some(&west()));
    let history = recovered(
        at("e", 4),
        vec![event("e", 2), event("e", 3), event("e", 4)],
    );
    let filled = check(&mut sequencer, |s, deliver| {
        s.history(&at("e", 1), history, &mut |p: &Publication| deliver(p))
    });
    assert_eq!(
        filled,
        (
            vec!["e/2".into(), "e/3".into(), "e/4".into(), "e/5".into()],
            None
        )
    );
}

#[test]
fn a_reconnect_during_a_read_reads_again_after_it() {
    let mut sequencer = Sequencer::default();
    let _ = live(&mut sequencer, event("e", 1));
    assert_eq!(sequencer.reconnected(), Some(at("e", 1)));
    assert_eq!(sequencer.reconnected(), None, "one read at a time");
    let history = recovered(at("e", 2), vec![event("e", 2)]);
    let filled = check(&mut sequencer, |s, deliver| {
        s.history(&at("e", 1), history, &mut |p: &Publication| deliver(p))
    });
    assert_eq!(filled, (vec!["e/2".into()], Some(at("e", 2))));
}

#[test]
fn a_new_epoch_in_the_history_is_read_from_its_beginning() {
    let mut sequencer = Sequencer::default();
    let _ = live(&mut sequencer, event("old", 3));
    assert_eq!(sequencer.reconnected(), Some(at("old", 3)));
    let _ = live(&mut sequencer, event("new", 2));
    let rewound = History {
        head: at("new", 2),
        recovered: Some(false),
        missed: Vec::new(),
    };
    let step = check(&mut sequencer, |s, deliver| {
        s.history(&at("old", 3), rewound, &mut |p: &Publication| deliver(p))
    });
    assert_eq!(step, (vec![], Some(at("new", 0))));
    let history = recovered(at("new", 2), vec![event("new", 1), event("new", 2)]);
    let filled = check(&mut sequencer, |s, deliver| {
        s.history(&at("new", 0), history, &mut |p: &Publication| deliver(p))
    });
    assert_eq!(filled, (vec!["new/1".into(), "new/2".into()], None));
}

#[test]
fn a_gap_that_cannot_be_filled_is_delivered_across_without_repeats() {
    let mut sequencer = Sequencer::default();
    let _ = live(&mut sequencer, event("e", 5));
    assert_eq!(
        live(&mut sequencer, event("e", 8)),
        (vec![], Some(at("e", 5)))
    );
    let _ = live(&mut sequencer, event("e", 4));
    let _ = live(&mut sequencer, event("e", 9));
    let step = check(&mut sequencer, |s, deliver| {
        s.read_failed(&mut |p: &Publication| deliver(p))
    });
    assert_eq!(step, (vec!["e/8".into(), "e/9".into()], None));
    assert_eq!(
        live(&mut sequencer, event("e", 7)),
        (vec![], None),
        "a late repeat"
    );
}

// Property tests: the sequencer against a model of one group's history in Redis and of the
// subscriber connection, under any interleaving of publishes, live deliveries, drops,
// duplicates, reconnects, lost histories and history reads that finish or fail.

use std::collections::VecDeque;

use proptest::prelude::*;

/// One thing that can happen to the group, its history or the replica's subscription.
#[derive(Debug, Clone)]
enum Op {
    /// A backend publishes: the event is appended and sent on the channel (if connected).
    Publish,
    /// The next message on the channel reaches the sequencer.
    Deliver,
    /// The next message on the channel is lost (the subscriber buffer was full).
    Drop,
    /// A copy of an earlier message of the current epoch arrives again, later.
    Duplicate(prop::sample::Index),
    /// The subscriber connection breaks: what is on the channel is lost, and publishes reach
    /// only the history until it reconnects.
    Disconnect,
    /// The subscriber connection is back.
    Reconnect,
    /// The outstanding history read runs now, against the history as it is.
    FinishRead,
    /// The outstanding history read failed through every retry.
    FailRead,
    /// Redis restarted empty: the group starts a new epoch, and the connection breaks.
    LoseHistory,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => Just(Op::Publish),
        6 => Just(Op::Deliver),
        2 => Just(Op::Drop),
        2 => any::<prop::sample::Index>().prop_map(Op::Duplicate),
        1 => Just(Op::Disconnect),
        2 => Just(Op::Reconnect),
        4 => Just(Op::FinishRead),
        1 => Just(Op::FailRead),
        1 => Just(Op::LoseHistory),
    ]
}

/// The group's history in Redis, the channel to one replica, and that replica's sequencer.
struct Model {
    history_size: usize,
    /// Every epoch so far, oldest first; the last is the current one.
    epochs: Vec<String>,
    /// The current epoch's events (seq `i + 1` at index `i`); the history keeps the last
    /// `history_size`.
    events: Vec<Publication>,
    channel: VecDeque<Publication>,
    connected: bool,
    /// The history read the sequencer asked for and that has not finished.
    read: Option<Position>,
    /// A read failed, or the history no longer reached back: gaps are allowed.
    lossy: bool,
    sequencer: Sequencer,
    delivered: Vec<Publication>,
}

impl Model {
    fn new(history_size: usize) -> Self {
        Self {
            history_size,
            epochs: vec!["epoch0".to_owned()],
            events: Vec::new(),
            channel: VecDeque::new(),
            connected: true,
            read: None,
            lossy: false,
            sequencer: Sequencer::default(),
            delivered: Vec::new(),
        }
    }

    fn epoch(&self) -> &str {
        self.epochs.last().map_or("", String::as_str)
    }

    fn head(&self) -> Position {
        at(self.epoch(), self.events.len() as u64)
    }

    /// Records a read the sequencer asked for; there is never more than one.
    fn asked(&mut self, read: Option<Position>) {
        if let Some(after) = read {
            assert!(
                self.read.is_none(),
                "a second read ({after:?}) while {:?} is out",
                self.read
            );
            self.read = Some(after);
        }
    }

    fn apply(&mut self, op: &Op) {
        let mut delivered = Vec::new();
        let mut deliver = |p: &Publication| delivered.push(p.clone());
        match op {
            Op::Publish => {
                let publication = event(self.epoch(), self.events.len() as u64 + 1);
                self.events.push(publication.clone());
                if self.connected {
                    self.channel.push_back(publication);
                }
            }
            Op::Deliver => {
                if let Some(publication) = self.channel.pop_front() {
                    let read = self.sequencer.live(publication, &mut deliver);
                    self.asked(read);
                }
            }
            Op::Drop => {
                self.channel.pop_front();
            }
            Op::Duplicate(index) => {
                if self.connected && !self.events.is_empty() {
                    let copy = self.events[index.index(self.events.len())].clone();
                    self.channel.push_back(copy);
                }
            }
            Op::Disconnect => {
                self.connected = false;
                self.channel.clear();
            }
            Op::Reconnect => {
                if !self.connected {
                    self.connected = true;
                    let read = self.sequencer.reconnected();
                    self.asked(read);
                }
            }
            Op::FinishRead => {
                if let Some(after) = self.read.take() {
                    let history = self.read_after(&after);
                    let read = self.sequencer.history(&after, history, &mut deliver);
                    self.asked(read);
                }
            }
            Op::FailRead => {
                if self.read.take().is_some() {
                    self.lossy = true;
                    let read = self.sequencer.read_failed(&mut deliver);
                    self.asked(read);
                }
            }
            Op::LoseHistory => {
                self.epochs.push(format!("epoch{}", self.epochs.len()));
                self.events.clear();
                self.connected = false;
                self.channel.clear();
            }
        }
        self.delivered.extend(delivered);
    }

    /// What the read script answers a replica's cursor read after `after`.
    fn read_after(&mut self, after: &Position) -> History {
        let head = self.head();
        let not_recovered = History {
            head: head.clone(),
            recovered: Some(false),
            missed: Vec::new(),
        };
        if after.epoch != head.epoch {
            return not_recovered;
        }
        assert!(
            after.seq <= head.seq,
            "a cursor ahead of a history never rewound"
        );
        let first_kept = head.seq.saturating_sub(self.history_size as u64) + 1;
        if after.seq < head.seq && after.seq + 1 < first_kept {
            self.lossy = true;
            return not_recovered;
        }
        let from = usize::try_from(after.seq).expect("small");
        recovered(head, self.events[from..].to_vec())
    }

    /// Lets everything in flight arrive: reconnects, delivers the channel, finishes reads.
    fn settle(&mut self) {
        self.apply(&Op::Reconnect);
        for _ in 0..1000 {
            if self.channel.is_empty() && self.read.is_none() {
                return;
            }
            self.apply(&Op::Deliver);
            self.apply(&Op::FinishRead);
        }
        panic!("the sequencer did not settle");
    }
}

/// Each epoch's index, by name.
fn epoch_index(model: &Model, position: &Position) -> usize {
    model
        .epochs
        .iter()
        .position(|e| *e == position.epoch)
        .expect("a known epoch")
}

/// Once, in order, genuine; and complete where nothing was lost.
fn check_delivered(model: &Model) {
    let positions: Vec<(usize, u64)> = model
        .delivered
        .iter()
        .map(|p| {
            let position = p.position.as_ref().expect("positioned");
            assert_eq!(
                p.payload,
                Bytes::from(format!("{}/{}", position.epoch, position.seq)),
                "the payload of {position:?}"
            );
            (epoch_index(model, position), position.seq)
        })
        .collect();
    for pair in positions.windows(2) {
        assert!(
            pair[0] < pair[1],
            "{:?} delivered after {:?}: {positions:?}",
            pair[1],
            pair[0]
        );
    }
    if model.lossy {
        return;
    }
    // Nothing was lost: the current epoch arrived whole, from its first event if an earlier
    // epoch was delivered before it (from the first delivered one otherwise), to its head.
    let last = model.epochs.len() - 1;
    let current: Vec<u64> = positions
        .iter()
        .filter(|(epoch, _)| *epoch == last)
        .map(|(_, seq)| *seq)
        .collect();
    let earlier = positions.iter().any(|(epoch, _)| *epoch < last);
    let first = if earlier {
        1
    } else {
        current.first().copied().unwrap_or(1)
    };
    let expected: Vec<u64> = (first..=model.events.len() as u64).collect();
    assert_eq!(current, expected, "the current epoch, in {positions:?}");
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn every_event_is_delivered_once_and_in_order(
        ops in prop::collection::vec(op(), 0..80),
        history_size in prop_oneof![Just(1000usize), 1usize..6],
    ) {
        let mut model = Model::new(history_size);
        for op in &ops {
            model.apply(op);
        }
        model.settle();
        // One more event once everything settled: it arrives, and after the whole gap.
        model.apply(&Op::Publish);
        model.settle();
        check_delivered(&model);
        let last = model.delivered.last().and_then(|p| p.position.clone());
        prop_assert_eq!(last, Some(model.head()));
    }
}
