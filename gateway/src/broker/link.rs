//! The Redis broker's subscriber connection: one server's (pub/sub, `SUBSCRIBE`) or a Redis
//! Cluster's (sharded pub/sub, `SSUBSCRIBE`), behind one small interface for `redis.rs`.
//!
//! Every push the connection reads is sorted by a closure that never blocks: messages go to a
//! bounded buffer (full: dropped and counted), and what the subscriber loop must act on goes to
//! a control channel: a cluster node that unsubscribed a channel by itself (its slot moved; the
//! redis crate would forget the channel for good) and a lost connection (on a cluster, any
//! node's). A cluster channel is subscribed alone in its `SSUBSCRIBE` (a call may name one slot
//! only), many calls in flight. The health channels are one per master on a cluster, each with
//! a hash tag on that master, so the round trip covers every node this replica subscribes on.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use futures_util::StreamExt;
use publisher_lib::target::RedisTarget;
use redis::aio::MultiplexedConnection;
use redis::cluster_async::ClusterConnection;
use redis::{AsyncConnectionConfig, PushInfo, PushKind, Value};
use tokio::sync::mpsc;
use tokio::time::timeout;

use super::BrokerError;
use crate::metrics;

/// Bound on connecting.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// Bound on one (UN)SUBSCRIBE: on RESP3 its reply queues behind the messages already in flight,
/// which took over a second under a flood here.
pub(super) const SUBSCRIBE_COMMAND_TIMEOUT: Duration = Duration::from_secs(5);
/// Sharded subscribes in flight at once on a cluster.
const CLUSTER_SUBSCRIBES_IN_FLIGHT: usize = 256;
/// Control pushes (slot moves, disconnections) waiting for the subscriber loop; past it the
/// session is rebuilt, which re-subscribes everything.
const CONTROL_CAPACITY: usize = 16_384;
/// Redis Cluster's slot count.
const SLOTS: u16 = 16_384;

/// The subscriber's connection.
pub(super) enum Link {
    /// One server (or a Sentinel's master).
    Server(MultiplexedConnection),
    /// A Redis Cluster.
    Cluster(ClusterConnection),
}

/// What the subscriber loop must act on, besides messages.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Control {
    /// A cluster node unsubscribed this channel by itself (its slot moved).
    Unsubscribed(Vec<u8>),
    /// The connection (on a cluster: one node's) was lost.
    Disconnected,
}

/// Where the connection's pushes arrive.
pub(super) struct Pushes {
    /// Messages, bounded; the buffer closes when the connection ends.
    pub(super) messages: mpsc::Receiver<PushInfo>,
    /// Slot moves and disconnections.
    pub(super) control: mpsc::Receiver<Control>,
    /// Set when a control push found no room: the session must be rebuilt.
    pub(super) overflowed: Arc<AtomicBool>,
}

impl Link {
    /// Connects to `target` (a cluster or one server); messages land in a buffer of `buffer`,
    /// and those dropped for want of room are counted in `dropped`.
    pub(super) async fn open(
        target: &RedisTarget,
        buffer: usize,
        dropped: Arc<AtomicU64>,
    ) -> Result<(Self, Pushes), String> {
        let (messages_tx, messages) = mpsc::channel(buffer);
        let (control_tx, control) = mpsc::channel(CONTROL_CAPACITY);
        let overflowed = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&overflowed);
        // Called by the connection's reader for every push; it must never block. When the
        // connection ends the reader drops it, closing the buffer.
        let sender = move |push: PushInfo| -> Result<(), std::convert::Infallible> {
            let control = match push.kind {
                PushKind::Message | PushKind::SMessage => {
                    if let Err(mpsc::error::TrySendError::Full(_)) = messages_tx.try_send(push) {
                        dropped.fetch_add(1, Ordering::Relaxed);
                        metrics::broker_message_dropped();
                    }
                    return Ok(());
                }
                PushKind::SUnsubscribe => match push.data.first() {
                    Some(Value::BulkString(channel)) => Control::Unsubscribed(channel.clone()),
                    _ => return Ok(()),
                },
                PushKind::Disconnection => Control::Disconnected,
                // Subscribe confirmations are answered through the commands themselves.
                _ => return Ok(()),
            };
            if control_tx.try_send(control).is_err() {
                flag.store(true, Ordering::Relaxed);
            }
            Ok(())
        };
        let connect = async {
            match target.cluster_client() {
                Some(cluster) => {
                    let config = redis::cluster::ClusterConfig::new()
                        .set_push_sender(sender)
                        .set_connection_timeout(CONNECT_TIMEOUT)
                        .set_response_timeout(SUBSCRIBE_COMMAND_TIMEOUT);
                    cluster
                        .get_async_connection_with_config(config)
                        .await
                        .map(Link::Cluster)
                }
                None => {
                    let config = AsyncConnectionConfig::new()
                        .set_push_sender(sender)
                        .set_connection_timeout(Some(CONNECT_TIMEOUT))
                        .set_response_timeout(None);
                    let client = target.client().await?;
                    client
                        .get_multiplexed_async_connection_with_config(&config)
                        .await
                        .map(Link::Server)
                }
            }
        };
        match timeout(CONNECT_TIMEOUT * 2, connect).await {
            Ok(Ok(link)) => Ok((
                link,
                Pushes {
                    messages,
                    control,
                    overflowed,
                },
            )),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err("connecting timed out".to_owned()),
        }
    }

    /// Whether this is a cluster connection.
    pub(super) fn is_cluster(&self) -> bool {
        matches!(self, Self::Cluster(_))
    }

    /// Subscribes `channels`: in one SUBSCRIBE on a server, one SSUBSCRIBE each on a cluster.
    pub(super) async fn subscribe(&mut self, channels: Vec<String>) -> Result<(), BrokerError> {
        match self {
            Self::Server(connection) => {
                bounded(
                    "subscribe",
                    SUBSCRIBE_COMMAND_TIMEOUT,
                    connection.subscribe(channels),
                )
                .await
            }
            Self::Cluster(connection) => {
                let mut outcomes = futures_util::stream::iter(channels)
                    .map(|channel| {
                        let mut connection = connection.clone();
                        async move {
                            bounded(
                                "ssubscribe",
                                SUBSCRIBE_COMMAND_TIMEOUT,
                                connection.ssubscribe(channel),
                            )
                            .await
                        }
                    })
                    .buffer_unordered(CLUSTER_SUBSCRIBES_IN_FLIGHT);
                let mut failed = None;
                while let Some(outcome) = outcomes.next().await {
                    if let Err(e) = outcome {
                        failed.get_or_insert(e);
                    }
                }
                failed.map_or(Ok(()), Err)
            }
        }
    }

    /// Unsubscribes `channel`, best effort (a failure leaves a channel nobody reads).
    pub(super) async fn unsubscribe(&mut self, channel: String) {
        let _ = match self {
            Self::Server(connection) => {
                timeout(SUBSCRIBE_COMMAND_TIMEOUT, connection.unsubscribe(channel)).await
            }
            Self::Cluster(connection) => {
                timeout(SUBSCRIBE_COMMAND_TIMEOUT, connection.sunsubscribe(channel)).await
            }
        };
    }

    /// The channels of the health round trip, named from `base` (unique to this replica): `base`
    /// itself on a server; on a cluster one per master, each hash-tagged into a slot that master
    /// serves (from `CLUSTER SLOTS` now).
    pub(super) async fn health_channels(&mut self, base: &str) -> Result<Vec<String>, BrokerError> {
        let Self::Cluster(connection) = self else {
            return Ok(vec![base.to_owned()]);
        };
        let slots: Value = bounded(
            "cluster slots",
            CONNECT_TIMEOUT,
            redis::cmd("CLUSTER").arg("SLOTS").query_async(connection),
        )
        .await?;
        let ranges = master_ranges(&slots);
        if ranges.is_empty() {
            return Err(BrokerError::Unavailable(
                "the cluster serves no slots".to_owned(),
            ));
        }
        Ok(ranges
            .values()
            .filter_map(|&(start, end)| tag_in(start, end))
            .map(|tag| format!("{base}{{{tag}}}"))
            .collect())
    }

    /// On a cluster, a handle to send health probes with ([`sharded_probe`]); a server's are
    /// published through the broker's publisher.
    pub(super) fn probe_connection(&self) -> Option<ClusterConnection> {
        match self {
            Self::Server(_) => None,
            Self::Cluster(connection) => Some(connection.clone()),
        }
    }
}

/// SPUBLISHes a probe on `channel`; a probe that fails simply never comes back.
pub(super) async fn sharded_probe(mut connection: ClusterConnection, channel: String) {
    let _ = timeout(
        CONNECT_TIMEOUT,
        redis::cmd("SPUBLISH")
            .arg(channel)
            .arg("probe")
            .query_async::<i64>(&mut connection),
    )
    .await;
}

/// Runs `command` under `limit`, its failure described.
async fn bounded<T>(
    what: &str,
    limit: Duration,
    command: impl Future<Output = redis::RedisResult<T>>,
) -> Result<T, BrokerError> {
    match timeout(limit, command).await {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(e)) => Err(BrokerError::Unavailable(format!("{what}: {e}"))),
        Err(_) => Err(BrokerError::Unavailable(format!("{what} timed out"))),
    }
}

/// Each master's lowest slot range in a `CLUSTER SLOTS` reply, by address (the same range
/// while the master keeps it, whatever order the reply lists ranges in).
fn master_ranges(reply: &Value) -> HashMap<(String, i64), (u16, u16)> {
    let mut ranges = HashMap::new();
    let Value::Array(entries) = reply else {
        return ranges;
    };
    for entry in entries {
        let Value::Array(fields) = entry else {
            continue;
        };
        let (Some(Value::Int(start)), Some(Value::Int(end)), Some(Value::Array(master))) =
            (fields.first(), fields.get(1), fields.get(2))
        else {
            continue;
        };
        let host = match master.first() {
            Some(Value::BulkString(host)) => String::from_utf8_lossy(host).into_owned(),
            Some(Value::SimpleString(host)) => host.clone(),
            _ => continue,
        };
        let Some(Value::Int(port)) = master.get(1) else {
            continue;
        };
        let (Ok(start), Ok(end)) = (u16::try_from(*start), u16::try_from(*end)) else {
            continue;
        };
        let lowest = ranges.entry((host, *port)).or_insert((start, end));
        if start < lowest.0 {
            *lowest = (start, end);
        }
    }
    ranges
}

/// A short hash tag whose slot lies in `start..=end`, if one is found among the first million
/// numbers (a range of one slot needs about 16,384 tries on average).
fn tag_in(start: u16, end: u16) -> Option<String> {
    (0u32..1_000_000)
        .map(|n| n.to_string())
        .find(|tag| (start..=end).contains(&key_slot(tag.as_bytes())))
}

/// The Redis Cluster slot of `key`: CRC16 (XMODEM) of its hash tag (the part between the first
/// `{` and the next `}`, when not empty) or of the whole key, modulo 16,384.
pub(super) fn key_slot(key: &[u8]) -> u16 {
    let hashed = key
        .iter()
        .position(|&b| b == b'{')
        .and_then(|open| {
            let rest = &key[open + 1..];
            let close = rest.iter().position(|&b| b == b'}')?;
            (close > 0).then(|| &rest[..close])
        })
        .unwrap_or(key);
    crc16_xmodem(hashed) % SLOTS
}

/// CRC-16/XMODEM (polynomial 0x1021, initial value 0), the checksum Redis Cluster hashes with.
fn crc16_xmodem(bytes: &[u8]) -> u16 {
    let mut crc: u16 = 0;
    for &byte in bytes {
        crc ^= u16::from(byte) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
    }
    crc
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_match_the_values_redis_documents() {
        // CRC16/XMODEM's check value, and slots Redis Cluster's specification and
        // `CLUSTER KEYSLOT` give for these keys.
        assert_eq!(crc16_xmodem(b"123456789"), 0x31C3);
        assert_eq!(key_slot(b"123456789"), 0x31C3 % SLOTS);
        assert_eq!(key_slot(b"foo"), 12182);
        assert_eq!(key_slot(b"{user1000}.following"), key_slot(b"user1000"));
        assert_eq!(key_slot(b"{user1000}.followers"), key_slot(b"user1000"));
        assert_ne!(
            key_slot(b"foo{}{bar}"),
            key_slot(b"bar"),
            "an empty tag hashes the whole key"
        );
        assert_eq!(key_slot(b"foo{{bar}}zap"), key_slot(b"{bar"));
        assert_eq!(key_slot(b"foo{bar}{zap}"), key_slot(b"bar"));
    }

    #[test]
    fn a_tag_is_found_for_any_range_even_one_slot() {
        for (start, end) in [(0, 5460), (5461, 10922), (10923, 16383), (777, 777)] {
            let tag = tag_in(start, end).expect("a tag");
            assert!((start..=end).contains(&key_slot(tag.as_bytes())));
        }
    }

    #[test]
    fn each_master_is_named_once_with_its_lowest_range() {
        let node = |port: i64| {
            Value::Array(vec![
                Value::BulkString(b"127.0.0.1".to_vec()),
                Value::Int(port),
                Value::BulkString(b"id".to_vec()),
            ])
        };
        let reply = Value::Array(vec![
            Value::Array(vec![Value::Int(5000), Value::Int(5000), node(7000)]),
            Value::Array(vec![Value::Int(0), Value::Int(99), node(7000), node(7003)]),
            Value::Array(vec![Value::Int(100), Value::Int(16383), node(7001)]),
            Value::Int(3),
        ]);
        let ranges = master_ranges(&reply);
        assert_eq!(ranges.len(), 2);
        assert_eq!(ranges[&("127.0.0.1".to_owned(), 7000)], (0, 99));
        assert_eq!(ranges[&("127.0.0.1".to_owned(), 7001)], (100, 16383));
    }
}
