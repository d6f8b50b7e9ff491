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
