//! A member's hold, release and floor, on plain values.

use proptest::prelude::*;

use super::*;

fn at(seq: u64) -> Position {
    Position::new("e1", seq)
}

/// Holds `seqs` (in that order, all fitting) and releases at `head`.
fn hold_then_release(seqs: &[u64], head: Option<u64>) -> Released<u64> {
    let mut holding = Holding::default();
    for &seq in seqs {
        assert_eq!(holding.hold(Some(&at(seq)), seq, |_| true), Hold::Kept);
    }
    holding.release(head.map(at).as_ref())
}

#[test]
fn the_release_keeps_only_what_came_after_the_head_in_arrival_order() {
    let released = hold_then_release(&[3, 4, 5, 6], Some(4));
    assert_eq!(released.live, vec![5, 6]);
    assert_eq!(released.floor, Some(at(6)));
}

#[test]
fn without_a_head_everything_held_is_news() {
    let released = hold_then_release(&[3, 4], None);
    assert_eq!(released.live, vec![3, 4]);
    assert_eq!(released.floor, Some(at(4)));
}

#[test]
fn with_nothing_after_the_head_the_floor_is_the_head() {
    let released = hold_then_release(&[1, 2], Some(7));
    assert_eq!(released.live, Vec::<u64>::new());
    assert_eq!(released.floor, Some(at(7)));
}

#[test]
fn frames_of_another_epoch_or_without_position_are_news() {
    let mut holding = Holding::default();
    holding.hold(Some(&Position::new("e2", 1)), "new epoch", |_| true);
    holding.hold(None, "old publisher", |_| true);
    let released = holding.release(Some(&at(9)));
    assert_eq!(released.live, vec!["new epoch", "old publisher"]);
    assert_eq!(released.floor, Some(Position::new("e2", 1)));
}

#[test]
fn a_frame_past_the_budget_overflows_once_then_nothing_is_kept() {
    let mut holding = Holding::default();
    assert_eq!(holding.hold(Some(&at(1)), 1, |n| n <= 2), Hold::Kept);
    assert_eq!(holding.hold(Some(&at(2)), 2, |n| n <= 2), Hold::Kept);
    assert_eq!(holding.len(), 2);
    assert_eq!(holding.hold(Some(&at(3)), 3, |n| n <= 2), Hold::Overflowed);
    assert_eq!(holding.hold(Some(&at(4)), 4, |_| true), Hold::Dropped);
    assert!(holding.is_empty());
    assert_eq!(holding.release(Some(&at(0))).live, Vec::<u64>::new());
}

#[test]
fn the_hold_is_capped_even_when_the_queue_would_take_more() {
    let mut holding = Holding::default();
    for seq in 1..=MAX_HELD_FRAMES as u64 {
        assert_eq!(holding.hold(Some(&at(seq)), (), |_| true), Hold::Kept);
    }
    assert_eq!(holding.hold(Some(&at(0)), (), |_| true), Hold::Overflowed);
}

#[test]
fn a_floor_skips_what_it_reached_and_clears_at_the_first_newer_publication() {
    let mut floors = Floors::default();
    floors.set("a", at(5));
    assert!(!floors.admits(&"a", Some(&at(4))));
    assert!(!floors.admits(&"a", Some(&at(5))));
    assert!(
        floors.admits(&"b", Some(&at(5))),
        "another member has no floor"
    );
    assert!(floors.admits(&"a", Some(&at(6))));
    assert!(
        floors.admits(&"a", Some(&at(3))),
        "cleared: the cursor's order is trusted again"
    );
}

#[test]
fn a_removed_member_has_no_floor() {
    let mut floors = Floors::default();
    floors.set(1, at(5));
    floors.remove(&1);
    assert!(floors.admits(&1, Some(&at(2))));
}

proptest! {
    /// Whatever arrives while a member is held, the release followed by the floor gives the
    /// member, on top of the history up to the head, each later event once and in order.
    #[test]
    fn the_history_then_the_release_then_the_floor_give_each_event_once_in_order(
        head in 0u64..20,
        held in proptest::collection::vec(0u64..40, 0..30),
        late in proptest::collection::vec(0u64..40, 0..30),
    ) {
        // What the cursor delivers is increasing: live frames held, then late ones after the
        // release (which may repeat the held ones, as a cursor filling a gap does).
        let mut held = held;
        held.sort_unstable();
        held.dedup();
        let mut late = late;
        late.sort_unstable();
        late.dedup();

        let mut holding = Holding::default();
        for &seq in &held {
            holding.hold(Some(&at(seq)), seq, |_| true);
        }
        let released = holding.release(Some(&at(head)));
        let mut sent: Vec<u64> = (1..=head).collect();
        sent.extend(&released.live);
        let mut floors = Floors::default();
        if let Some(floor) = released.floor {
            floors.set((), floor);
        }
        let start = late.partition_point(|&seq| seq <= *held.last().unwrap_or(&0));
        for &seq in &late[start..] {
            if floors.admits(&(), Some(&at(seq))) {
                sent.push(seq);
            }
        }
        for &seq in &late[start..] {
            prop_assert!(seq <= head || sent.contains(&seq), "{} was not sent", seq);
        }
        let mut once_in_order = sent.clone();
        once_in_order.sort_unstable();
        once_in_order.dedup();
        prop_assert_eq!(sent, once_in_order);
    }
}
