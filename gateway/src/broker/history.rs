//! Positions and bounded history per group, in memory: what the in-process broker keeps, with
//! the same rules as the Redis publish and read scripts (`docs/redis-contract.md`).
//!
//! A group's history has an epoch (a random id) and a sequence that grows by one per event. It
//! keeps the last `size` events and is forgotten after `ttl` without publishes; the next publish
//! or read then starts a new epoch. An idempotency key seen within `window` is acknowledged again
//! without appending.
//!
//! A read never changes what other readers see: whatever position a reader brings (positions
//! come from clients, who can send anything), it gets its own answer, and the epoch, the
//! entries and the idempotency keys stay as they were. In memory the history cannot be rewound
//! behind the process's back, so a position ahead of the head is simply not recovered.

use std::collections::{HashMap, VecDeque};
use std::time::Duration;

use publisher_lib::contract::{Group, Position};
use tokio::time::Instant;

use super::HistorySettings;

/// Every group's history.
#[derive(Debug)]
pub struct Histories<T> {
    settings: HistorySettings,
    groups: HashMap<Group, GroupHistory<T>>,
}

#[derive(Debug)]
struct GroupHistory<T> {
    epoch: String,
    seq: u64,
    /// `(seq, item)`, oldest first, at most `settings.size`.
    entries: VecDeque<(u64, T)>,
    /// Idempotency keys and the sequence they got, with when they are forgotten.
    keys: HashMap<String, (u64, Instant)>,
    /// The same keys in the order they are forgotten (every key gets the same window, so that
    /// is the order they came in): forgetting is popping the front, not a scan of every key.
    forgetting: VecDeque<(Instant, String)>,
    expires: Instant,
}

/// The outcome of appending one event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Appended {
    /// Its position (for a duplicate: the position it got the first time).
    pub position: Position,
    /// Whether the key was seen within the window: nothing was appended.
    pub duplicate: bool,
}

/// What a reader gets: the head, whether the gap after its position could be filled, and the
/// entries that fill it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Read<T> {
    /// The newest position (seq 0 before any event).
    pub head: Position,
    /// `None` without a position to recover from.
    pub recovered: Option<bool>,
    /// The entries after the reader's position, in order (empty unless recovered).
    pub entries: Vec<(u64, T)>,
}

impl<T: Clone> Histories<T> {
    /// Empty, with these bounds.
    pub fn new(settings: HistorySettings) -> Self {
        Self {
            settings,
            groups: HashMap::new(),
        }
    }

    /// Appends `item` to `group` under idempotency `key`, at `now`.
    pub fn append(&mut self, group: &Group, key: &str, item: T, now: Instant) -> Appended {
        let settings = self.settings.clone();
        let history = self.live(group, now);
        if let Some(&(seq, forget)) = history.keys.get(key)
            && forget > now
        {
            return Appended {
                position: Position {
                    epoch: history.epoch.clone(),
                    seq,
                },
                duplicate: true,
            };
        }
        history.seq += 1;
        let seq = history.seq;
        history.entries.push_back((seq, item));
        while history.entries.len() > settings.size {
            history.entries.pop_front();
        }
        history.forget_keys(now);
        let forget = now + settings.idempotency_window;
        history.keys.insert(key.to_owned(), (seq, forget));
        history.forgetting.push_back((forget, key.to_owned()));
        history.expires = now + settings.ttl;
        Appended {
            position: Position {
                epoch: history.epoch.clone(),
                seq,
            },
            duplicate: false,
        }
    }

    /// Reads `group`'s head and, given `after`, the entries after it. A position ahead of the
    /// head (a forged one: nothing else can be ahead here) is not recovered and changes nothing.
    pub fn read(&mut self, group: &Group, after: Option<&Position>, now: Instant) -> Read<T> {
        let history = self.live(group, now);
        let head = Position {
            epoch: history.epoch.clone(),
            seq: history.seq,
        };
        let Some(after) = after else {
            return Read {
                head,
                recovered: None,
                entries: Vec::new(),
            };
        };
        let first_kept = history.entries.front().map_or(history.seq + 1, |e| e.0);
        let reachable = after.epoch == history.epoch
            && after.seq <= history.seq
            && (after.seq == history.seq || after.seq + 1 >= first_kept);
        let entries = if reachable {
            history
                .entries
                .iter()
                .filter(|(seq, _)| *seq > after.seq)
                .cloned()
                .collect()
        } else {
            Vec::new()
        };
        Read {
            head,
            recovered: Some(reachable),
            entries,
        }
    }

    /// The group's history, started afresh (new epoch) when absent or expired.
    fn live(&mut self, group: &Group, now: Instant) -> &mut GroupHistory<T> {
        let ttl = self.settings.ttl;
        // Forget every expired group now and then, so idle groups do not accumulate.
        if self.groups.len() > 1024 && self.groups.len().is_power_of_two() {
            self.groups.retain(|_, h| h.expires > now);
        }
        let history = self
            .groups
            .entry(group.clone())
            .or_insert_with(|| GroupHistory::new(now + ttl));
        if history.expires <= now {
            *history = GroupHistory::new(now + ttl);
        }
        history
    }
}

impl<T> GroupHistory<T> {
    fn new(expires: Instant) -> Self {
        Self {
            epoch: new_epoch(),
            seq: 0,
            entries: VecDeque::new(),
            keys: HashMap::new(),
            forgetting: VecDeque::new(),
            expires,
        }
    }

    /// Forgets the keys whose window has passed at `now`.
    fn forget_keys(&mut self, now: Instant) {
        while let Some((forget, _)) = self.forgetting.front()
            && *forget <= now
        {
            if let Some((forget, key)) = self.forgetting.pop_front()
                && self.keys.get(&key).is_some_and(|(_, at)| *at == forget)
            {
                self.keys.remove(&key);
            }
        }
    }
}

/// A fresh epoch id: 32 lowercase hex digits.
pub fn new_epoch() -> String {
    uuid::Uuid::new_v4().simple().to_string()
}

impl HistorySettings {
    /// The defaults: 1,000 events, 10 minutes, 5 minutes.
    pub fn defaults() -> Self {
        Self {
            size: 1000,
            ttl: Duration::from_secs(600),
            idempotency_window: Duration::from_secs(300),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn small() -> Histories<&'static str> {
        Histories::new(HistorySettings {
            size: 3,
            ttl: Duration::from_secs(60),
            idempotency_window: Duration::from_secs(30),
        })
    }

    fn west() -> Group {
        Group::try_dispatch("west").expect("valid region")
    }

    #[test]
    fn sequence_grows_by_one_and_the_history_keeps_the_last_n() {
        let mut histories = small();
        let now = Instant::now();
        let first = histories.append(&west(), "a", "A", now);
        assert_eq!(first.position.seq, 1);
        for (key, item) in [("b", "B"), ("c", "C"), ("d", "D")] {
            histories.append(&west(), key, item, now);
        }
        let start = Position {
            epoch: first.position.epoch.clone(),
            seq: 1,
        };
        let read = histories.read(&west(), Some(&start), now);
        assert_eq!(read.head.seq, 4);
        assert_eq!(read.recovered, Some(true));
        assert_eq!(read.entries, vec![(2, "B"), (3, "C"), (4, "D")]);
        // Seq 1 is gone: a reader at 0 cannot be brought up to date.
        let from_zero = Position { seq: 0, ..start };
        let read = histories.read(&west(), Some(&from_zero), now);
        assert_eq!(read.recovered, Some(false));
        assert!(read.entries.is_empty());
    }

    #[test]
    fn a_key_seen_within_the_window_is_a_duplicate_and_appends_nothing() {
        let mut histories = small();
        let now = Instant::now();
        let first = histories.append(&west(), "k", "A", now);
        let again = histories.append(&west(), "k", "A", now + Duration::from_secs(10));
        assert!(again.duplicate);
        assert_eq!(again.position, first.position);
        let later = histories.append(&west(), "k", "A", now + Duration::from_secs(31));
        assert!(!later.duplicate, "the window is over");
        assert_eq!(later.position.seq, 2);
    }

    #[test]
    fn keys_past_their_window_are_forgotten_oldest_first_and_live_ones_kept() {
        let mut histories = small();
        let now = Instant::now();
        for i in 0..1000 {
            histories.append(&west(), &format!("early-{i}"), "A", now);
        }
        let later = now + Duration::from_secs(20);
        histories.append(&west(), "later", "B", later);
        let history = &histories.groups[&west()];
        assert_eq!((history.keys.len(), history.forgetting.len()), (1001, 1001));

        // 31 s: the early keys' window is over, the later one's is not.
        let after = now + Duration::from_secs(31);
        histories.append(&west(), "last", "C", after);
        let history = &histories.groups[&west()];
        let mut kept: Vec<&str> = history.keys.keys().map(String::as_str).collect();
        kept.sort_unstable();
        assert_eq!(kept, ["last", "later"]);
        assert_eq!(history.forgetting.len(), 2);
        assert!(histories.append(&west(), "later", "B", after).duplicate);
        assert!(!histories.append(&west(), "early-7", "A", after).duplicate);
    }

    #[test]
    fn other_epochs_are_not_recovered_and_the_head_is_recovered() {
        let mut histories = small();
        let now = Instant::now();
        let appended = histories.append(&west(), "a", "A", now);
        let other = Position {
            epoch: "other".to_owned(),
            seq: 1,
        };
        assert_eq!(
            histories.read(&west(), Some(&other), now).recovered,
            Some(false)
        );
        let at_head = histories.read(&west(), Some(&appended.position), now);
        assert_eq!(at_head.recovered, Some(true));
        assert!(at_head.entries.is_empty());
    }

    #[test]
    fn a_position_ahead_of_the_head_is_not_recovered_and_changes_nothing() {
        let mut histories = small();
        let now = Instant::now();
        let appended = histories.append(&west(), "a", "A", now);
        histories.append(&west(), "b", "B", now);
        for seq in [3, 999_999_999, u64::MAX] {
            let ahead = Position {
                seq,
                ..appended.position.clone()
            };
            let read = histories.read(&west(), Some(&ahead), now);
            assert_eq!(read.recovered, Some(false), "seq {seq}");
            assert!(read.entries.is_empty(), "seq {seq}");
            assert_eq!(read.head.epoch, appended.position.epoch, "seq {seq}");
            assert_eq!(read.head.seq, 2, "seq {seq}");
        }
        // The others still resume in the same epoch, from the same entries.
        let read = histories.read(&west(), Some(&appended.position), now);
        assert_eq!(read.recovered, Some(true));
        assert_eq!(read.entries, vec![(2, "B")]);
        // The idempotency keys are still there: a retry is a duplicate, not a second event.
        let retry = histories.append(&west(), "a", "A", now);
        assert!(retry.duplicate);
        assert_eq!(retry.position, appended.position);
        assert_eq!(histories.append(&west(), "c", "C", now).position.seq, 3);
    }

    #[test]
    fn an_idle_group_expires_and_starts_a_new_epoch() {
        let mut histories = small();
        let now = Instant::now();
        let before = histories.append(&west(), "a", "A", now).position;
        let read = histories.read(&west(), Some(&before), now + Duration::from_secs(61));
        assert_eq!(read.recovered, Some(false));
        assert_ne!(read.head.epoch, before.epoch);
        assert_eq!(read.head.seq, 0);
    }

    #[test]
    fn a_read_before_any_publish_gives_an_epoch_that_the_first_publish_keeps() {
        let mut histories = small();
        let now = Instant::now();
        let head = histories.read(&west(), None, now).head;
        assert_eq!(head.seq, 0);
        let appended = histories.append(&west(), "a", "A", now);
        assert_eq!(appended.position.epoch, head.epoch);
        let read = histories.read(&west(), Some(&head), now);
        assert_eq!(read.recovered, Some(true));
        assert_eq!(read.entries, vec![(1, "A")]);
    }

    /// Property tests: appends, reads after any position (genuine, stale, ahead of the head,
    /// another epoch) and idempotent repeats, against what the appends promised.
    mod properties {
        use std::collections::HashMap;

        use proptest::prelude::*;

        use super::*;

        const TTL: Duration = Duration::from_secs(60);
        const WINDOW: Duration = Duration::from_secs(30);

        /// Where a read starts from.
        #[derive(Debug, Clone)]
        enum After {
            /// No position: the head only.
            Nothing,
            /// A position an append returned, `back` events before the head.
            Behind(usize),
            /// The current epoch, `ahead` past the head (forged: nothing was ever there).
            Ahead(u64),
            /// The current epoch, seq `u64::MAX`.
            Farthest,
            /// An epoch this history never had.
            OtherEpoch(u64),
        }

        #[derive(Debug, Clone)]
        enum Op {
            /// Publishes a new item under idempotency key `key`.
            Append(u8),
            Read(After),
            /// Time passes.
            Wait(u64),
        }

        fn op() -> impl Strategy<Value = Op> {
            let after = prop_oneof![
                Just(After::Nothing),
                (0usize..10).prop_map(After::Behind),
                (1u64..5).prop_map(After::Ahead),
                (1u64..1_000_000_000).prop_map(After::Ahead),
                Just(After::Farthest),
                (0u64..10).prop_map(After::OtherEpoch),
            ];
            prop_oneof![
                5 => (0u8..6).prop_map(Op::Append),
                5 => after.prop_map(Op::Read),
                1 => (0u64..40).prop_map(Op::Wait),
            ]
        }

        /// What the appends promised: the current epoch, its items in order, the keys and
        /// when they are forgotten, and when the whole history is.
        #[derive(Default)]
        struct Promised {
            epoch: Option<String>,
            items: Vec<u32>,
            keys: HashMap<u8, (u64, Instant)>,
            expires: Option<Instant>,
        }

        impl Promised {
            fn head(&self) -> u64 {
                self.items.len() as u64
            }

            /// Before an operation at `now`: when the history is gone, the operation starts a
            /// new epoch, which must differ from the last one; it is learnt from `epoch`.
            fn follow(&mut self, now: Instant, epoch: &str) {
                if self.expires.is_none_or(|at| at <= now) {
                    assert_ne!(Some(epoch), self.epoch.as_deref(), "a new epoch");
                    *self = Self {
                        epoch: Some(epoch.to_owned()),
                        expires: Some(now + TTL),
                        ..Self::default()
                    };
                }
                assert_eq!(
                    Some(epoch),
                    self.epoch.as_deref(),
                    "the epoch does not change"
                );
            }
        }

        proptest! {
            #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

            #[test]
            fn reads_never_lose_repeat_reorder_or_change_anything(
                ops in prop::collection::vec(op(), 0..60),
                size in 1usize..6,
            ) {
                let mut histories = Histories::new(HistorySettings {
                    size,
                    ttl: TTL,
                    idempotency_window: WINDOW,
                });
                let mut promised = Promised::default();
                let mut now = Instant::now();
                let mut next_item = 0u32;
                for op in ops {
                    match op {
                        Op::Wait(seconds) => now += Duration::from_secs(seconds),
                        Op::Append(key) => {
                            next_item += 1;
                            let appended =
                                histories.append(&west(), &key.to_string(), next_item, now);
                            promised.follow(now, &appended.position.epoch);
                            match promised.keys.get(&key) {
                                Some(&(seq, forget)) if forget > now => {
                                    prop_assert!(appended.duplicate, "key {} again", key);
                                    prop_assert_eq!(appended.position.seq, seq);
                                }
                                _ => {
                                    prop_assert!(!appended.duplicate, "key {} is new", key);
                                    promised.items.push(next_item);
                                    prop_assert_eq!(appended.position.seq, promised.head());
                                    promised.keys.insert(key, (promised.head(), now + WINDOW));
                                    promised.expires = Some(now + TTL);
                                }
                            }
                        }
                        Op::Read(after) => {
                            // The epoch a position names is the one known before this read.
                            let epoch = promised
                                .epoch
                                .clone()
                                .filter(|_| promised.expires.is_some_and(|at| at > now))
                                .unwrap_or_else(|| "not yet".to_owned());
                            let head = promised.head();
                            let (position, genuine) = match after {
                                After::Nothing => (None, false),
                                After::Behind(back) => (
                                    Some(Position {
                                        epoch,
                                        seq: head.saturating_sub(back as u64),
                                    }),
                                    true,
                                ),
                                After::Ahead(ahead) => {
                                    (Some(Position { epoch, seq: head + ahead }), false)
                                }
                                After::Farthest => (Some(Position { epoch, seq: u64::MAX }), false),
                                After::OtherEpoch(seq) => (
                                    Some(Position {
                                        epoch: format!("other{seq}"),
                                        seq,
                                    }),
                                    false,
                                ),
                            };
                            let read = histories.read(&west(), position.as_ref(), now);
                            promised.follow(now, &read.head.epoch);
                            // The head is what the appends made it, whatever was asked.
                            prop_assert_eq!(read.head.seq, promised.head());
                            let Some(position) = position else {
                                prop_assert_eq!(read.recovered, None);
                                prop_assert!(read.entries.is_empty());
                                continue;
                            };
                            let same_epoch = promised.epoch.as_deref() == Some(&position.epoch);
                            let reachable = same_epoch
                                && position.seq <= promised.head()
                                && promised.head() - position.seq <= size as u64;
                            if genuine && reachable {
                                // Every item after the position, once, in order.
                                prop_assert_eq!(read.recovered, Some(true));
                                let from = usize::try_from(position.seq).unwrap_or(usize::MAX);
                                let expected: Vec<(u64, u32)> = promised.items[from..]
                                    .iter()
                                    .enumerate()
                                    .map(|(i, item)| (position.seq + 1 + i as u64, *item))
                                    .collect();
                                prop_assert_eq!(read.entries, expected);
                            } else {
                                prop_assert_eq!(read.recovered, Some(false));
                                prop_assert!(read.entries.is_empty());
                            }
                        }
                    }
                }
            }
        }
    }
}
