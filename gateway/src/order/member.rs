//! One client's resume in one group, as pure state: what its join holds back, what it is sent
//! when the history read returns, and what it must not be sent again afterwards.
//!
//! A member that joins with a position is held: every live frame fan-out delivers meanwhile is
//! kept ([`Holding::hold`]), bounded. When the history read returns the group's head and the
//! missed events, [`Holding::release`] keeps only the held frames after that head (the others
//! are among the missed events), in arrival order, and names the last position the member was
//! sent. That position becomes the member's floor ([`Floors`]): the replica's cursor may still
//! deliver older events late (it was filling a gap of its own), and those are skipped until the
//! first newer one arrives.

use std::collections::HashMap;
use std::hash::Hash;

use publisher_lib::contract::Position;

use super::already_reached;

/// Most live frames held for a member while its join reads the history; one more closes it as a
/// slow consumer (it may resume from its last position).
pub const MAX_HELD_FRAMES: usize = 10_000;

/// The live frames held for a member while its join reads the history.
#[derive(Debug)]
pub struct Holding<F> {
    /// `None` once it overflowed: nothing more is kept, the member is being closed.
    frames: Option<Vec<(Option<Position>, F)>>,
}

/// What [`Holding::hold`] did with a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hold {
    /// Kept for the release.
    Kept,
    /// It did not fit: everything held is dropped and the member must be closed as a slow
    /// consumer. Reported once.
    Overflowed,
    /// The member already overflowed; nothing is kept.
    Dropped,
}

/// What a member is sent after its history, from [`Holding::release`].
#[derive(Debug, PartialEq, Eq)]
pub struct Released<F> {
    /// The held frames after the head, in arrival order.
    pub live: Vec<F>,
    /// The last position the member is sent (the head, or the last live frame's), its floor.
    pub floor: Option<Position>,
}

impl<F> Default for Holding<F> {
    fn default() -> Self {
        Self {
            frames: Some(Vec::new()),
        }
    }
}

impl<F> Holding<F> {
    /// Keeps `frame` (at `position`) when `fits` accepts the number of frames that would then be
    /// held (the member's queue budget) and [`MAX_HELD_FRAMES`] is not passed.
    pub fn hold(
        &mut self,
        position: Option<&Position>,
        frame: F,
        fits: impl FnOnce(usize) -> bool,
    ) -> Hold {
        let Some(kept) = &mut self.frames else {
            return Hold::Dropped;
        };
        if kept.len() < MAX_HELD_FRAMES && fits(kept.len() + 1) {
            kept.push((position.cloned(), frame));
            Hold::Kept
        } else {
            self.frames = None;
            Hold::Overflowed
        }
    }

    /// How many frames are held.
    pub fn len(&self) -> usize {
        self.frames.as_ref().map_or(0, Vec::len)
    }

    /// Whether nothing is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Ends the hold once the history was read up to `head` (`None`: no head to cut at, every
    /// held frame is news).
    pub fn release(self, head: Option<&Position>) -> Released<F> {
        let mut floor = head.cloned();
        let mut live = Vec::new();
        for (position, frame) in self.frames.unwrap_or_default() {
            if head.is_some_and(|head| already_reached(head, position.as_ref())) {
                continue;
            }
            if position.is_some() {
                floor = position;
            }
            live.push(frame);
        }
        Released { live, floor }
    }
}

/// The floors of a group's just-released members, keyed by member.
#[derive(Debug)]
pub struct Floors<K> {
    floors: HashMap<K, Position>,
}

impl<K> Default for Floors<K> {
    fn default() -> Self {
        Self {
            floors: HashMap::new(),
        }
    }
}

impl<K: Hash + Eq> Floors<K> {
    /// Sets `member`'s floor (after its release).
    pub fn set(&mut self, member: K, floor: Position) {
        self.floors.insert(member, floor);
    }

    /// Forgets `member`'s floor (it left).
    pub fn remove(&mut self, member: &K) {
        self.floors.remove(member);
    }

    /// Whether a publication at `position` goes to `member`: not when its floor already
    /// reached it. The first one past the floor clears it.
    pub fn admits(&mut self, member: &K, position: Option<&Position>) -> bool {
        if self.floors.is_empty() {
            return true;
        }
        let Some(floor) = self.floors.get(member) else {
            return true;
        };
        if already_reached(floor, position) {
            return false;
        }
        self.floors.remove(member);
        true
    }
}

#[cfg(test)]
mod tests;
