//! `Publisher` and `realtime-publish` on a local Redis Cluster (3 masters, 3 replicas; the
//! workspace's `redis-harness`): sharded publishes reach `SSUBSCRIBE` subscribers on every
//! master, and a busy group's publishes stay whole and in order while its slot is migrated and
//! while its master is killed and its replica promoted.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use publisher_lib::contract::{Envelope, Group, Position};
use publisher_lib::{PublishError, Publisher, PublisherConfig};
use redis::cluster::{ClusterClientBuilder, ClusterConfig};
use redis::{ProtocolVersion, PushKind, Value};
use redis_harness::RedisCluster;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

use crate::harness::*;

/// Long enough for a failover: failure detection (2 s node timeout), election, slot map refresh.
const FAILOVER_DEADLINE: Duration = Duration::from_secs(60);

/// A publisher on `cluster` whose histories hold everything these tests publish.
fn cluster_publisher(cluster: &RedisCluster) -> Publisher {
    Publisher::new(PublisherConfig::new(cluster.url()).with_history_size(1_000_000)).unwrap()
}

/// A sharded subscriber like a gateway replica on a cluster: RESP3, one `SSUBSCRIBE` per
/// channel (a call must name channels of one slot). Returns the pushes it receives.
async fn ssubscribe(
    cluster: &RedisCluster,
    groups: &[Group],
) -> (
    redis::cluster_async::ClusterConnection,
    mpsc::UnboundedReceiver<redis::PushInfo>,
) {
    let (tx, rx) = mpsc::unbounded_channel();
    let client = ClusterClientBuilder::new(cluster.node_urls())
        .use_protocol(ProtocolVersion::RESP3)
        .build()
        .unwrap();
    let mut connection = client
        .get_async_connection_with_config(ClusterConfig::new().set_push_sender(tx))
        .await
        .unwrap();
    for group in groups {
        connection
            .ssubscribe(group.channel(publisher_lib::DEFAULT_PREFIX))
            .await
            .unwrap();
    }
    (connection, rx)
}

/// The next `count` sharded messages as (channel, envelope), skipping other pushes
/// (subscription confirmations).
async fn receive_sharded(
    pushes: &mut mpsc::UnboundedReceiver<redis::PushInfo>,
    count: usize,
) -> Vec<(String, Envelope)> {
    within(DEADLINE, "sharded messages", async {
        let mut out = Vec::with_capacity(count);
        while out.len() < count {
            let push = pushes.recv().await.expect("the push channel is open");
            if push.kind != PushKind::SMessage {
                continue;
            }
            let [Value::BulkString(channel), Value::BulkString(payload)] = &push.data[..] else {
                panic!("unexpected smessage {push:?}");
            };
            out.push((
                String::from_utf8(channel.clone()).unwrap(),
                Envelope::decode(payload).unwrap(),
            ));
        }
        out
    })
    .await
}

#[tokio::test]
async fn publishes_reach_sharded_subscribers_on_every_master_in_order() {
    let cluster = RedisCluster::start().await;
    let groups: Vec<Group> = (0..24)
        .map(|i| Group::try_dispatch(&format!("region{i}")).unwrap())
        .collect();
    let mut masters = BTreeSet::new();
    for group in &groups {
        masters.insert(
            cluster
                .master_of_key(&group.channel(publisher_lib::DEFAULT_PREFIX))
                .await,
        );
    }
    assert_eq!(masters.len(), 3, "the groups are spread over every master");
    let (_subscriber, mut pushes) = ssubscribe(&cluster, &groups).await;
    let publisher = cluster_publisher(&cluster);

    let mut receipts: BTreeMap<String, Vec<Position>> = BTreeMap::new();
    for _ in 0..4 {
        for i in 0..groups.len() {
            let receipt = publisher
                .publish(&recommendation(&format!("region{i}")))
                .await
                .unwrap();
            let delivery = &receipt.deliveries[0];
            assert_eq!(delivery.subscribers, 1, "one sharded subscriber got it");
            assert!(!delivery.duplicate);
            receipts
                .entry(delivery.group.channel(publisher_lib::DEFAULT_PREFIX))
                .or_default()
                .push(delivery.position.clone());
        }
    }

    let mut received: BTreeMap<String, Vec<Position>> = BTreeMap::new();
    for (channel, envelope) in receive_sharded(&mut pushes, 4 * groups.len()).await {
        received
            .entry(channel)
            .or_default()
            .push(envelope.position.unwrap());
    }
    assert_eq!(received, receipts, "each group's events once, in order");
    for positions in received.values() {
        let seqs: Vec<u64> = positions.iter().map(|p| p.seq).collect();
        assert_eq!(seqs, [1, 2, 3, 4]);
    }

    // The read script runs on the cluster too, and a repeated key is a duplicate there.
    let first = &groups[0];
    let head = publisher.read_history(first, None).await.unwrap().head;
    let read = publisher
        .read_history(first, Some(&Position::new(head.epoch.clone(), 1)))
        .await
        .unwrap();
    assert_eq!(read.recovered, Some(true));
    assert_eq!(
        positions(&read.messages),
        receipts[&first.channel(publisher_lib::DEFAULT_PREFIX)][1..]
    );
    let event = recommendation("region0");
    let once = publisher.publish(&event).await.unwrap();
    let again = publisher.publish(&event).await.unwrap();
    assert!(again.deliveries[0].duplicate);
    assert_eq!(again.deliveries[0].position, once.deliveries[0].position);
    // The raw health publish is sharded too.
    let channel = "rt:health:test";
    assert_eq!(publisher.publish_raw(channel, b"ping").await.unwrap(), 0);
}

#[tokio::test]
async fn cli_publishes_to_a_cluster_url() {
    let cluster = RedisCluster::start().await;
    let event = event(JOB_ASSIGNED);
    let (_subscriber, mut pushes) = ssubscribe(&cluster, &event.groups()).await;

    let output = within(
        DEADLINE,
        "realtime-publish",
        tokio::process::Command::new(env!("CARGO_BIN_EXE_realtime-publish"))
            .args(["--redis-url", &cluster.url(), JOB_ASSIGNED])
            .kill_on_drop(true)
            .output(),
    )
    .await
    .unwrap();

    assert!(output.status.success(), "{output:?}");
    let receipt: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    for group in 0..2 {
        assert_eq!(receipt["groups"][group]["subscribers"], 1);
        assert_eq!(receipt["groups"][group]["seq"], 1);
    }
    let received = receive_sharded(&mut pushes, 2).await;
    let channels: BTreeSet<String> = received.iter().map(|(c, _)| c.clone()).collect();
    let expected: BTreeSet<String> = event
        .groups()
        .iter()
        .map(|g| g.channel(publisher_lib::DEFAULT_PREFIX))
        .collect();
    assert_eq!(channels, expected);
}

/// What a publishing loop saw: the acknowledged publishes in order, and the failed calls.
#[derive(Debug, Default)]
struct Traffic {
    /// (idempotency key, position) of each acknowledged publish, in order.
    acked: Vec<(String, Position)>,
    /// When each failed call returned, and its label.
    failures: Vec<(Instant, &'static str)>,
    /// The first failure of each label, in full.
    first_errors: BTreeMap<&'static str, String>,
    /// For each run of failures: from the first failed call's start to the next success.
    outages: Vec<Duration>,
    /// Acknowledged publishes that were duplicates (a retry after a call that had in fact
    /// published).
    duplicates: usize,
}

/// Publishes fresh events to `/dispatch/<region>` one at a time until `stop`, retrying each
/// under its own key until acknowledged; `progress` counts the acknowledged ones and `failed`
/// the failed calls.
async fn publish_until_stopped(
    publisher: Publisher,
    region: String,
    stop: Arc<AtomicBool>,
    progress: watch::Sender<usize>,
    failed: watch::Sender<usize>,
) -> Traffic {
    let mut traffic = Traffic::default();
    while !stop.load(Ordering::Relaxed) {
        let event = recommendation(&region);
        let mut outage_started: Option<Instant> = None;
        loop {
            let started = Instant::now();
            match publisher.publish(&event).await {
                Ok(receipt) => {
                    if let Some(from) = outage_started {
                        traffic.outages.push(from.elapsed());
                    }
                    let delivery = &receipt.deliveries[0];
                    traffic.duplicates += usize::from(delivery.duplicate);
                    traffic
                        .acked
                        .push((event.unique_id(), delivery.position.clone()));
                    progress.send_replace(traffic.acked.len());
                    break;
                }
                Err(error) => {
                    assert!(error.is_transient(), "not retryable: {error:?}");
                    assert!(
                        matches!(
                            error,
                            PublishError::Timeout(_)
                                | PublishError::Unreachable(_)
                                | PublishError::Redis(_)
                        ),
                        "{error:?}"
                    );
                    outage_started.get_or_insert(started);
                    traffic.failures.push((Instant::now(), error.label()));
                    failed.send_replace(traffic.failures.len());
                    traffic
                        .first_errors
                        .entry(error.label())
                        .or_insert_with(|| {
                            eprintln!("{region}: first {} error: {error:?}", error.label());
                            format!("{error:?}")
                        });
                    // Retry pacing while the cluster recovers, not synchronisation.
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        }
    }
    traffic
}

/// A publishing loop running on one region (see [`publish_until_stopped`]).
struct Running {
    stop: Arc<AtomicBool>,
    acked: watch::Receiver<usize>,
    failed: watch::Receiver<usize>,
    task: tokio::task::JoinHandle<Traffic>,
}

impl Running {
    fn start(publisher: &Publisher, region: &str) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let (progress, acked) = watch::channel(0);
        let (failures, failed) = watch::channel(0);
        let task = tokio::spawn(publish_until_stopped(
            publisher.clone(),
            region.to_owned(),
            stop.clone(),
            progress,
            failures,
        ));
        Self {
            stop,
            acked,
            failed,
            task,
        }
    }

    /// Waits until a call has failed.
    async fn a_call_failed(&mut self, what: &str) {
        within(FAILOVER_DEADLINE, what, async {
            self.failed.wait_for(|n| *n >= 1).await.unwrap();
        })
        .await;
    }

    /// Waits until `more` publishes have been acknowledged after those acknowledged so far.
    async fn acknowledged(&mut self, more: usize, what: &str) {
        let done = *self.acked.borrow();
        within(FAILOVER_DEADLINE, what, async {
            self.acked.wait_for(|n| *n >= done + more).await.unwrap();
        })
        .await;
    }

    async fn stop(self) -> Traffic {
        self.stop.store(true, Ordering::Relaxed);
        within(FAILOVER_DEADLINE, "the publishing loop to stop", self.task)
            .await
            .unwrap()
    }
}

/// Every acknowledged publish is in the group's history once, in the order acknowledged, with
/// the position its receipt named, and nothing else is.
async fn assert_history_holds_exactly(publisher: &Publisher, region: &str, traffic: &Traffic) {
    let group = Group::try_dispatch(region).unwrap();
    let epoch = traffic.acked[0].1.epoch.clone();
    let read = publisher
        .read_history(&group, Some(&Position::new(epoch.clone(), 0)))
        .await
        .unwrap();
    assert_eq!(
        read.recovered,
        Some(true),
        "the history reaches back to seq 1"
    );
    let history: Vec<(String, Position)> = read
        .messages
        .iter()
        .map(|m| {
            let envelope = Envelope::decode(m).unwrap();
            (key_of(&envelope), envelope.position.unwrap())
        })
        .collect();
    let seqs: Vec<u64> = history.iter().map(|(_, p)| p.seq).collect();
    let expected: Vec<u64> = (1..=history.len() as u64).collect();
    assert_eq!(seqs, expected, "seqs continuous from 1");
    assert_eq!(
        history, traffic.acked,
        "the history is the acknowledged publishes, each once, in order"
    );
    assert_eq!(read.head, Position::new(epoch, traffic.acked.len() as u64));
}

fn report(what: &str, traffic: &Traffic) {
    let mut labels: BTreeMap<&str, usize> = BTreeMap::new();
    for (_, label) in &traffic.failures {
        *labels.entry(label).or_default() += 1;
    }
    eprintln!(
        "{what}: {} publishes acknowledged, {} failed calls {labels:?}, outages {:?}, \
         {} acknowledged as duplicates of a call that had failed; first errors {:?}",
        traffic.acked.len(),
        traffic.failures.len(),
        traffic.outages,
        traffic.duplicates,
        traffic.first_errors,
    );
}

/// A region whose group's slot is served by a master other than `master`.
async fn region_not_on(cluster: &RedisCluster, master: u16) -> String {
    for i in 0.. {
        let region = format!("calm{i}");
        let channel = Group::try_dispatch(&region)
            .unwrap()
            .channel(publisher_lib::DEFAULT_PREFIX);
        if cluster.master_of_key(&channel).await != master {
            return region;
        }
    }
    unreachable!("some region hashes to another master")
}

#[tokio::test]
async fn a_busy_groups_slot_migrated_mid_stream_loses_and_repeats_nothing() {
    let cluster = RedisCluster::start().await;
    let publisher = cluster_publisher(&cluster);
    let channel = Group::try_dispatch("busy")
        .unwrap()
        .channel(publisher_lib::DEFAULT_PREFIX);
    let slot = cluster.slot_of(&channel).await;
    let from = cluster.master_of_slot(slot).await;
    let to = *cluster
        .masters()
        .await
        .iter()
        .find(|m| **m != from)
        .unwrap();

    let mut busy = Running::start(&publisher, "busy");
    busy.acknowledged(50, "publishes before the migration")
        .await;
    let migration = cluster.start_migration(slot, to).await;
    // While the slot migrates, the publish script cannot run on either node: its new
    // idempotency key exists nowhere, and a multi-key command whose keys are only partly on a
    // node is refused with TRYAGAIN there, on the source (MIGRATING) and, after ASK, on the
    // target (IMPORTING) alike. The cluster client retries TRYAGAIN; the call then times out.
    busy.a_call_failed("a publish refused while the slot migrates")
        .await;
    let position = format!("{channel}:pos");
    let history = format!("{channel}:history");
    migration.move_keys(&[&position, &history]).await;
    migration.finish(&cluster).await;
    busy.acknowledged(20, "publishes after the migration").await;
    let traffic = busy.stop().await;

    report("slot migration", &traffic);
    assert_eq!(cluster.master_of_slot(slot).await, to);
    assert_history_holds_exactly(&publisher, "busy", &traffic).await;
}

#[tokio::test]
async fn a_busy_groups_master_killed_and_replaced_loses_and_repeats_nothing() {
    let mut cluster = RedisCluster::start().await;
    let publisher = cluster_publisher(&cluster);
    let channel = Group::try_dispatch("busy")
        .unwrap()
        .channel(publisher_lib::DEFAULT_PREFIX);
    let master = cluster.master_of_key(&channel).await;
    let replica = cluster.replica_of(master).await;
    // A group on another master, published to through the same publisher meanwhile.
    let calm_region = region_not_on(&cluster, master).await;

    let mut busy = Running::start(&publisher, "busy");
    let mut calm = Running::start(&publisher, &calm_region);
    busy.acknowledged(50, "publishes before the kill").await;
    calm.acknowledged(50, "publishes elsewhere before the kill")
        .await;
    let killed_at = Instant::now();
    let promoted = cluster.kill_master(master).await;
    eprintln!(
        "failover: replica promoted and cluster settled {:?} after the kill",
        killed_at.elapsed()
    );
    assert_eq!(promoted, replica);
    busy.acknowledged(50, "publishes after the failover").await;
    calm.acknowledged(50, "publishes elsewhere after the failover")
        .await;
    let traffic = busy.stop().await;
    let calm_traffic = calm.stop().await;

    report("failover, the killed master's group", &traffic);
    report("failover, a group on another master", &calm_traffic);
    if let Some((last, _)) = traffic.failures.last() {
        eprintln!(
            "failover: publishes to the killed master's group failed until {:?} after the kill",
            last.duration_since(killed_at)
        );
    }
    assert_eq!(cluster.master_of_key(&channel).await, replica);
    assert_history_holds_exactly(&publisher, "busy", &traffic).await;
    assert_history_holds_exactly(&publisher, &calm_region, &calm_traffic).await;
}

#[tokio::test]
async fn a_busy_groups_slot_moved_to_a_node_added_mid_stream_loses_and_repeats_nothing() {
    let mut cluster = RedisCluster::start().await;
    let publisher = cluster_publisher(&cluster);
    let channel = Group::try_dispatch("busy")
        .unwrap()
        .channel(publisher_lib::DEFAULT_PREFIX);
    let slot = cluster.slot_of(&channel).await;

    let mut busy = Running::start(&publisher, "busy");
    busy.acknowledged(30, "publishes before the new node").await;
    let added = cluster.add_node().await;
    busy.acknowledged(30, "publishes after the new node joined")
        .await;
    cluster.migrate_slot(slot, added).await;
    busy.acknowledged(30, "publishes after the move to the new node")
        .await;
    let traffic = busy.stop().await;

    report("slot moved to a new node", &traffic);
    assert_eq!(cluster.master_of_slot(slot).await, added);
    assert_eq!(cluster.masters().await.len(), 4);
    assert_history_holds_exactly(&publisher, "busy", &traffic).await;
}

/// The publisher's permissions on a cluster: `docs/redis-contract.md`'s publisher user plus
/// `+spublish` and `+cluster|slots` (the client reads the slot map with it).
const CLUSTER_PUBLISHER_ACL: &[&str] = &[
    "ACL",
    "SETUSER",
    "realtime-publisher",
    "on",
    ">publisher-secret",
    "resetkeys",
    "resetchannels",
    "~rt:*",
    "&rt:*",
    "-@all",
    "+spublish",
    "+ping",
    "+hello",
    "+evalsha",
    "+eval",
    "+script|load",
    "+get",
    "+set",
    "+del",
    "+hget",
    "+hset",
    "+hincrby",
    "+xadd",
    "+xrange",
    "+expire",
    "+cluster|slots",
];

#[tokio::test]
async fn an_acl_user_in_the_cluster_url_publishes_with_the_documented_permissions() {
    let cluster = RedisCluster::start().await;
    // ACL users are per node: a cluster operator creates them on every node.
    for port in cluster.live_ports() {
        assert!(
            cluster
                .cli(port, CLUSTER_PUBLISHER_ACL)
                .await
                .starts_with("OK")
        );
    }
    let event = event(JOB_ASSIGNED);
    let (_subscriber, mut pushes) = ssubscribe(&cluster, &event.groups()).await;
    let url = cluster.url().replace(
        "redis+cluster://",
        "redis+cluster://realtime-publisher:publisher-secret@",
    );
    let publisher = Publisher::new(PublisherConfig::new(url.clone())).unwrap();

    let receipt = within(
        DEADLINE,
        "a publish as the ACL user",
        publisher.publish(&event),
    )
    .await
    .unwrap();
    assert_eq!(receipt.deliveries.len(), 2);
    assert_eq!(
        receipt_ids(&receive_sharded(&mut pushes, 2).await),
        [receipt.id; 2]
    );
    let head = publisher
        .read_history(&event.groups()[0], None)
        .await
        .unwrap()
        .head;
    assert_eq!(head.seq, 1);

    let wrong = Publisher::new(PublisherConfig::new(
        url.replace("publisher-secret", "nope"),
    ))
    .unwrap();
    let error = within(
        DEADLINE,
        "a publish with a wrong password",
        wrong.publish(&event),
    )
    .await
    .unwrap_err();
    assert!(
        format!("{error:?}").contains("WRONGPASS")
            || format!("{error:?}").contains("AuthenticationFailed"),
        "{error:?}"
    );
}

fn receipt_ids(received: &[(String, Envelope)]) -> Vec<uuid::Uuid> {
    received.iter().map(|(_, envelope)| envelope.id).collect()
}

#[tokio::test]
async fn a_tls_cluster_url_publishes_over_tls_to_every_node() {
    let dir = std::env::temp_dir().join(format!("cluster-tls-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir).unwrap();
    let cluster = RedisCluster::start_tls(&dir).await;
    let url = cluster.url();
    assert!(url.starts_with("rediss+cluster://"), "{url}");
    let ca = std::fs::read(dir.join("ca.pem")).unwrap();
    let publisher =
        Publisher::new(PublisherConfig::new(url.clone()).with_ca_certificate(ca)).unwrap();

    // Groups on every master: each publish reaches the master of its slot over TLS.
    let mut masters = BTreeSet::new();
    for i in 0..12 {
        let region = format!("region{i}");
        let receipt = within(
            DEADLINE,
            "a publish over TLS",
            publisher.publish(&recommendation(&region)),
        )
        .await
        .unwrap();
        assert_eq!(receipt.deliveries[0].position.seq, 1);
        masters.insert(
            cluster
                .master_of_key(
                    &receipt.deliveries[0]
                        .group
                        .channel(publisher_lib::DEFAULT_PREFIX),
                )
                .await,
        );
    }
    assert_eq!(masters.len(), 3, "the groups are spread over every master");

    // Without the test authority the nodes' certificates are not trusted.
    let untrusting = Publisher::new(PublisherConfig::new(url)).unwrap();
    assert!(
        untrusting
            .publish(&recommendation("region0"))
            .await
            .is_err()
    );
    drop(cluster);
    let _ = std::fs::remove_dir_all(&dir);
}
