//! A group's positions and history in Redis: the two Lua scripts and the calls that run them.
//!
//! Every event published to a group gets a [`Position`] there (an epoch naming the group's
//! history and a sequence number that grows by one per event). The publish script assigns it,
//! appends the positioned envelope to the group's bounded history stream and PUBLISHes it, in
//! one atomic script whose keys and channel share the group's cluster hash tag, so a subscriber
//! never sees a sequence number the history does not hold. The read script returns a group's
//! head and the history after a given position, for a client that resumes or a gateway replica
//! that fills a gap. One publish script call may carry several events (for several groups, or
//! the same group more than once): they run in order, exactly as so many calls in a row. Only a replica's own delivery cursor ([`AheadOfHead::NewEpoch`]) may start
//! a new epoch when it is ahead of the head (the history was rewound); a client's position ahead
//! of the head is answered "not recovered" and changes nothing, because a client can send any
//! position.
//!
//! Keys, for group `g` under prefix `p`: the channel `p{g}`, the position hash `p{g}:pos`
//! (`epoch`, `seq`), the history stream `p{g}:history` (entry `<seq>-1`, field `m`) and one
//! idempotency key per published key, `p{g}:id:<key>`. The script texts are also in
//! `docs/redis-contract.md`, verbatim (a test compares them).
//!
//! Scripts run through [`redis::Script::invoke_async`], which loads a script again after
//! NOSCRIPT (a restarted Redis has an empty script cache); never inside a pipeline, where a
//! NOSCRIPT would not be recovered from. This module knows nothing about retries or timeouts;
//! [`crate::Publisher`] bounds and classifies the calls.

use std::sync::LazyLock;
use std::time::Duration;

use redis::Script;
use uuid::Uuid;

use crate::contract::{Group, Position};

/// The publish script (Lua), as `docs/redis-contract.md` shows it.
///
/// One event: `KEYS`: position hash, history stream, idempotency key. `ARGV`: channel,
/// candidate epoch, envelope without position, history size, history TTL in seconds,
/// idempotency window in seconds, and optionally `SPUBLISH` (Redis Cluster; `PUBLISH`
/// otherwise). Returns `{epoch, seq, duplicate (0|1), subscribers}`. Several events in one
/// call: three more keys per event, `ARGV[7]` required, then channel, candidate epoch and
/// envelope per extra event; four values per event in the reply, in order.
pub const PUBLISH_SCRIPT: &str = include_str!("history/publish.lua");

/// The read script (Lua), as `docs/redis-contract.md` shows it.
///
/// `KEYS`: position hash, history stream. `ARGV`: candidate epoch, history TTL in seconds, epoch
/// to read after (`""` for none), seq to read after, `"cursor"` when that position is the
/// caller's own delivery cursor. Returns `{epoch, head, recovered (-1|0|1), messages}`.
pub const READ_SCRIPT: &str = include_str!("history/read.lua");

static PUBLISH: LazyLock<Script> = LazyLock::new(|| Script::new(PUBLISH_SCRIPT));
static READ: LazyLock<Script> = LazyLock::new(|| Script::new(READ_SCRIPT));

/// What [`crate::Publisher::read_history`] found in a group's history.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HistoryRead {
    /// The group's current head: its epoch and the seq of its last event (0 before any).
    pub head: Position,
    /// `None` when no position was given. `Some(true)`: `messages` are every event after the
    /// given position up to `head`, nothing missing. `Some(false)`: they cannot be given (other
    /// epoch, the history no longer reaches back, or the position is ahead of the head), and
    /// `messages` is empty; the client must refetch its state.
    pub recovered: Option<bool>,
    /// Positioned envelopes after the given position, in seq order.
    pub messages: Vec<Vec<u8>>,
}

/// What the read script makes of a position ahead of the group's head in the same epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum AheadOfHead {
    /// Not recovered, and nothing changes: the position came from a client, which can send any
    /// value, so it proves nothing about the history.
    Unrecovered,
    /// The history was rewound (a failover lost writes): the group starts a new epoch at once.
    /// Only for the caller's own delivery cursor, a position it got from Redis itself.
    NewEpoch,
}

/// The limits the publish and read scripts apply.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Limits {
    pub(crate) history_size: usize,
    pub(crate) history_ttl: Duration,
    pub(crate) idempotency_window: Duration,
}

/// Which publish command the publish script runs (its optional `ARGV[7]`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum PubSub {
    /// `PUBLISH`: one server (or Sentinel); every subscriber of the channel receives it.
    Classic,
    /// `SPUBLISH`: a Redis Cluster, where the channel is a sharded channel in the slot of the
    /// group's keys; `SSUBSCRIBE` subscribers of that slot's shard receive it.
    Sharded,
}

impl PubSub {
    /// The command's name, as the script expects it.
    pub(crate) fn command(self) -> &'static str {
        match self {
            Self::Classic => "PUBLISH",
            Self::Sharded => "SPUBLISH",
        }
    }
}

/// What the publish script did in one group.
#[derive(Debug, Clone)]
pub(crate) struct Appended {
    pub(crate) position: Position,
    pub(crate) duplicate: bool,
    pub(crate) subscribers: u64,
}

/// One event for the publish script: the group it goes to, its idempotency key and its plain
/// envelope (see [`crate::contract::Envelope::encode`]).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Append<'a> {
    pub(crate) group: &'a Group,
    pub(crate) key: &'a str,
    pub(crate) envelope: &'a [u8],
}

/// Runs the publish script for `group`: assigns a position to `envelope` (a plain envelope, see
/// [`crate::contract::Envelope::encode`]), appends and PUBLISHes it, unless `key` was already
/// published to this group within the idempotency window; `pubsub` names the publish command.
pub(crate) async fn append<C: redis::aio::ConnectionLike>(
    connection: &mut C,
    prefix: &str,
    group: &Group,
    key: &str,
    envelope: &[u8],
    limits: Limits,
    pubsub: PubSub,
) -> redis::RedisResult<Appended> {
    let events = [Append {
        group,
        key,
        envelope,
    }];
    let mut appended = append_all(connection, prefix, &events, limits, pubsub).await?;
    appended.pop().ok_or_else(|| unexpected_reply(0))
}

/// Runs the publish script once for all of `events` (at least one), in order, as [`append`]
/// would one after the other: an event repeating the key of an earlier one in the same group is
/// a duplicate. Returns one [`Appended`] per event, in order. On a Redis Cluster every event's
/// group must hash to the same slot.
pub(crate) async fn append_all<C: redis::aio::ConnectionLike>(
    connection: &mut C,
    prefix: &str,
    events: &[Append<'_>],
    limits: Limits,
    pubsub: PubSub,
) -> redis::RedisResult<Vec<Appended>> {
    let mut invocation = PUBLISH.prepare_invoke();
    for (i, event) in events.iter().enumerate() {
        let channel = event.group.channel(prefix);
        invocation
            .key(format!("{channel}:pos"))
            .key(format!("{channel}:history"))
            .key(format!("{channel}:id:{}", event.key))
            .arg(&channel)
            .arg(new_epoch())
            .arg(event.envelope);
        if i == 0 {
            // The shared arguments follow the first event's, as in the one-event layout.
            invocation
                .arg(limits.history_size)
                .arg(seconds(limits.history_ttl))
                .arg(seconds(limits.idempotency_window))
                .arg(pubsub.command());
        }
    }
    let replies: Vec<redis::Value> = invocation.invoke_async(connection).await?;
    if replies.len() != 4 * events.len() {
        return Err(unexpected_reply(replies.len()));
    }
    let mut appended = Vec::with_capacity(events.len());
    let mut replies = replies.into_iter();
    while let (Some(epoch), Some(seq), Some(duplicate), Some(subscribers)) = (
        replies.next(),
        replies.next(),
        replies.next(),
        replies.next(),
    ) {
        let epoch: String = redis::from_redis_value(epoch)?;
        let seq: u64 = redis::from_redis_value(seq)?;
        let duplicate: u8 = redis::from_redis_value(duplicate)?;
        let subscribers: u64 = redis::from_redis_value(subscribers)?;
        appended.push(Appended {
            position: Position { epoch, seq },
            duplicate: duplicate != 0,
            subscribers,
        });
    }
    Ok(appended)
}

/// Runs the read script for `group`: its head (creating an empty history with a new epoch when
/// the group has none) and, with `after`, the history after that position; `ahead` says what a
/// position ahead of the head does.
pub(crate) async fn read<C: redis::aio::ConnectionLike>(
    connection: &mut C,
    prefix: &str,
    group: &Group,
    after: Option<&Position>,
    ahead: AheadOfHead,
    limits: Limits,
) -> redis::RedisResult<HistoryRead> {
    let channel = group.channel(prefix);
    // An empty epoch would read as "no position"; "-" matches no epoch, so it reads as another.
    let (after_epoch, after_seq) = match after {
        None => ("", 0),
        Some(p) if p.epoch.is_empty() => ("-", p.seq),
        Some(p) => (p.epoch.as_str(), p.seq),
    };
    let (epoch, seq, recovered, messages): (String, u64, i64, Vec<Vec<u8>>) = READ
        .key(format!("{channel}:pos"))
        .key(format!("{channel}:history"))
        .arg(new_epoch())
        .arg(seconds(limits.history_ttl))
        .arg(after_epoch)
        .arg(after_seq)
        .arg(match ahead {
            AheadOfHead::Unrecovered => "client",
            AheadOfHead::NewEpoch => "cursor",
        })
        .invoke_async(connection)
        .await?;
    Ok(HistoryRead {
        head: Position { epoch, seq },
        recovered: match recovered {
            -1 => None,
            flag => Some(flag == 1),
        },
        messages,
    })
}

/// A candidate epoch: a UUID v4 in simple form (32 lowercase hex characters).
fn new_epoch() -> String {
    random_uuid().simple().to_string()
}

/// A UUID v4 from the thread's random generator (a CSPRNG seeded by the OS), not from
/// `Uuid::new_v4`, which makes a `getrandom` system call for every id: two per publish here.
pub(crate) fn random_uuid() -> Uuid {
    uuid::Builder::from_random_bytes(rand::random()).into_uuid()
}

/// The publish script answered `len` values, not four per event.
fn unexpected_reply(len: usize) -> redis::RedisError {
    redis::RedisError::from((
        redis::ErrorKind::UnexpectedReturnType,
        "publish script reply",
        format!("{len} values, expected 4 per event"),
    ))
}

/// Whole seconds for EXPIRE and SET EX, at least 1 (0 is an error there).
fn seconds(duration: Duration) -> u64 {
    duration.as_secs().max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_random_version_4_uuids() {
        let a = random_uuid();
        let b = random_uuid();
        assert_ne!(a, b);
        for id in [a, b] {
            assert_eq!(id.get_version(), Some(uuid::Version::Random));
            assert_eq!(id.get_variant(), uuid::Variant::RFC4122);
        }
        let epoch = new_epoch();
        assert_eq!(epoch.len(), 32);
        assert!(
            epoch
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        );
        assert_ne!(epoch, new_epoch());
    }
}
