//! A local Redis Cluster for one test: 3 masters and 3 replicas of `redis-server` on free
//! loopback ports, and what the cluster tests do to it (kill a master, migrate a slot, add a
//! node). Every operation returns once the cluster has settled: every live node reports
//! `cluster_state:ok` with all slots served, they all agree on who serves which slots, and every
//! replica is connected to its master.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use crate::{DEADLINE, NotUp, START_ATTEMPTS, free_port, spawn_logged, until_it_answers, within};

/// How long a failover may take: failure detection after `cluster-node-timeout` (2 s), the
/// replica's election and the news reaching every node, on a loaded machine.
const FAILOVER_DEADLINE: Duration = Duration::from_secs(30);
/// `cluster-node-timeout` of every node, in milliseconds: small, so a failover is quick.
const NODE_TIMEOUT_MS: &str = "2000";
/// The number of hash slots of a Redis Cluster.
const SLOTS: usize = 16384;

/// A Redis Cluster of `redis-server` processes started for one test; every node is killed and
/// its folder removed when this is dropped.
#[derive(Debug)]
pub struct RedisCluster {
    /// Holds every node's `nodes.conf` and is named on every node's command line.
    dir: PathBuf,
    /// With TLS: the folder holding `ca.pem`, `server.pem` and `server.key`.
    tls: Option<PathBuf>,
    nodes: Vec<Node>,
}

#[derive(Debug)]
struct Node {
    port: u16,
    /// `None` once killed.
    child: Option<Child>,
}

impl Node {
    /// Kills the process (SIGKILL) and waits for it to exit; nothing if it was killed already.
    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// One node as the cluster describes it (`CLUSTER NODES`).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct ClusterNode {
    /// The node's client port.
    pub port: u16,
    /// The node's id.
    pub id: String,
    /// Whether it is a master (otherwise a replica).
    pub master: bool,
    /// For a replica, its master's id.
    pub master_id: Option<String>,
    /// Whether the cluster considers it failed (`fail` or `fail?`).
    pub failed: bool,
    /// The slot ranges it serves, as `CLUSTER NODES` writes them (`0-5460`, `42`).
    pub slots: Vec<String>,
}

impl ClusterNode {
    /// Whether this node serves `slot`.
    pub fn serves(&self, slot: u16) -> bool {
        self.slots.iter().any(|range| {
            let (low, high) = range.split_once('-').unwrap_or((range, range));
            match (low.parse::<u16>(), high.parse::<u16>()) {
                (Ok(low), Ok(high)) => (low..=high).contains(&slot),
                _ => false,
            }
        })
    }
}

impl RedisCluster {
    /// Starts 6 nodes and makes them a cluster of 3 masters, each with one replica
    /// (`redis-cli --cluster create ... --cluster-replicas 1`), then waits until it has settled.
    pub async fn start() -> Self {
        Self::start_with(None).await
    }

    /// As [`RedisCluster::start`], every node speaking only TLS (clients, replication and the
    /// cluster bus), with a certificate for 127.0.0.1 signed by a test authority generated in
    /// `dir` (`ca.pem` is what clients must trust).
    pub async fn start_tls(dir: &std::path::Path) -> Self {
        crate::server::make_certificates(dir);
        Self::start_with(Some(dir.to_owned())).await
    }

    async fn start_with(tls: Option<PathBuf>) -> Self {
        static CLUSTERS: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "redis-cluster-{}-{}",
            std::process::id(),
            CLUSTERS.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).expect("create the cluster's folder");
        let mut cluster = Self {
            dir,
            tls,
            nodes: Vec::new(),
        };
        for _ in 0..6 {
            cluster.spawn_node().await;
        }
        let addresses: Vec<String> = cluster.nodes.iter().map(|n| address(n.port)).collect();
        let output = Command::new("redis-cli")
            .args(tls_args(cluster.tls.as_deref()))
            .args(["--cluster", "create"])
            .args(&addresses)
            .args(["--cluster-replicas", "1", "--cluster-yes"])
            .stdin(Stdio::null())
            .output()
            .expect("redis-cli runs");
        assert!(
            output.status.success(),
            "redis-cli --cluster create failed: {}",
            String::from_utf8_lossy(&output.stdout)
        );
        cluster.settle(DEADLINE, "the new cluster to settle").await;
        cluster
    }

    /// The client port of every node started, live or killed, in the order they started.
    pub fn ports(&self) -> Vec<u16> {
        self.nodes.iter().map(|n| n.port).collect()
    }

    /// The client ports of the nodes still running.
    pub fn live_ports(&self) -> Vec<u16> {
        self.nodes
            .iter()
            .filter(|n| n.child.is_some())
            .map(|n| n.port)
            .collect()
    }

    /// `redis+cluster://127.0.0.1:<port>,...` (`rediss+cluster://` with TLS) naming every node
    /// started (the publisher's cluster URL; a killed seed is skipped by the client).
    pub fn url(&self) -> String {
        let seeds: Vec<String> = self.nodes.iter().map(|n| address(n.port)).collect();
        let scheme = if self.tls.is_some() {
            "rediss"
        } else {
            "redis"
        };
        format!("{scheme}+cluster://{}", seeds.join(","))
    }

    /// `redis://127.0.0.1:<port>` (`rediss://` with TLS) for every live node (seed nodes for a
    /// cluster client).
    pub fn node_urls(&self) -> Vec<String> {
        let scheme = if self.tls.is_some() {
            "rediss"
        } else {
            "redis"
        };
        self.live_ports()
            .into_iter()
            .map(|port| format!("{scheme}://{}", address(port)))
            .collect()
    }

    /// Runs `redis-cli` against the node on `port` and returns its standard output (raw: one
    /// reply element a line).
    pub async fn cli(&self, port: u16, args: &[&str]) -> String {
        cli(self.tls.as_deref(), port, args).await
    }

    /// The cluster as a live node sees it.
    pub async fn topology(&self) -> Vec<ClusterNode> {
        let port = *self.live_ports().first().expect("a live node");
        parse_nodes(&self.cli(port, &["CLUSTER", "NODES"]).await)
    }

    /// The client ports of the masters that serve slots.
    pub async fn masters(&self) -> Vec<u16> {
        self.topology()
            .await
            .into_iter()
            .filter(|n| n.master && !n.failed && !n.slots.is_empty())
            .map(|n| n.port)
            .collect()
    }

    /// The hash slot of `key` (its hash tag's, when it has one).
    pub async fn slot_of(&self, key: &str) -> u16 {
        let port = *self.live_ports().first().expect("a live node");
        self.cli(port, &["CLUSTER", "KEYSLOT", key])
            .await
            .trim()
            .parse()
            .expect("CLUSTER KEYSLOT answers a number")
    }

    /// The port of the master serving `slot`.
    pub async fn master_of_slot(&self, slot: u16) -> u16 {
        self.topology()
            .await
            .into_iter()
            .find(|n| n.master && !n.failed && n.serves(slot))
            .unwrap_or_else(|| panic!("no master serves slot {slot}"))
            .port
    }

    /// The port of the master serving `key`'s slot.
    pub async fn master_of_key(&self, key: &str) -> u16 {
        let slot = self.slot_of(key).await;
        self.master_of_slot(slot).await
    }

    /// The port of the (first) replica of the master on `master`.
    pub async fn replica_of(&self, master: u16) -> u16 {
        let nodes = self.topology().await;
        let id = &nodes
            .iter()
            .find(|n| n.port == master)
            .unwrap_or_else(|| panic!("no node on port {master}"))
            .id;
        nodes
            .iter()
            .find(|n| !n.master && !n.failed && n.master_id.as_ref() == Some(id))
            .unwrap_or_else(|| panic!("the master on {master} has no live replica"))
            .port
    }

    /// Kills the master on `port` with SIGKILL and waits until its replica has been promoted
    /// and the cluster has settled without it. Returns the promoted replica's port.
    pub async fn kill_master(&mut self, port: u16) -> u16 {
        let replica = self.replica_of(port).await;
        self.kill(port);
        let promoted = within(
            FAILOVER_DEADLINE,
            async {
                loop {
                    if self.cli(replica, &["ROLE"]).await.starts_with("master") {
                        return;
                    }
                    poll_interval().await;
                }
            },
            "the replica's promotion",
        );
        promoted.await;
        self.settle(
            FAILOVER_DEADLINE,
            "the cluster to settle after the failover",
        )
        .await;
        replica
    }

    /// Kills the node on `port` with SIGKILL and waits for it to exit; nothing else.
    pub fn kill(&mut self, port: u16) {
        let node = self
            .nodes
            .iter_mut()
            .find(|n| n.port == port)
            .unwrap_or_else(|| panic!("no node on port {port}"));
        node.kill();
    }

    /// Moves `slot`, keys and all, from the master serving it to the master on `to`, the way
    /// `redis-cli --cluster reshard` does (see [`RedisCluster::start_migration`]). Clients may
    /// keep writing meanwhile (they get `ASK` and `TRYAGAIN`). Waits until the cluster has
    /// settled.
    pub async fn migrate_slot(&self, slot: u16, to: u16) {
        let migration = self.start_migration(slot, to).await;
        migration.move_all_keys().await;
        migration.finish(self).await;
    }

    /// Starts moving `slot` from the master serving it to the master on `to`: `CLUSTER SETSLOT
    /// IMPORTING` on the target, then `MIGRATING` on the source. From here until
    /// [`SlotMigration::finish`], a command on the slot is served by the source while all its
    /// keys are there, redirected with `ASK` to the target when none is, and refused with
    /// `TRYAGAIN` when only some are.
    pub async fn start_migration(&self, slot: u16, to: u16) -> SlotMigration {
        let from = self.master_of_slot(slot).await;
        assert_ne!(from, to, "slot {slot} is already on {to}");
        let from_id = self.cli(from, &["CLUSTER", "MYID"]).await.trim().to_owned();
        let to_id = self.cli(to, &["CLUSTER", "MYID"]).await.trim().to_owned();
        let slot_text = slot.to_string();
        expect_ok(
            &self
                .cli(
                    to,
                    &["CLUSTER", "SETSLOT", &slot_text, "IMPORTING", &from_id],
                )
                .await,
            "SETSLOT IMPORTING",
        );
        expect_ok(
            &self
                .cli(
                    from,
                    &["CLUSTER", "SETSLOT", &slot_text, "MIGRATING", &to_id],
                )
                .await,
            "SETSLOT MIGRATING",
        );
        SlotMigration {
            slot,
            from,
            to,
            to_id,
            tls: self.tls.clone(),
        }
    }

    /// Starts a new node and adds it to the cluster as a master without slots
    /// (`redis-cli --cluster add-node`); waits until every node knows it. Returns its port.
    pub async fn add_node(&mut self) -> u16 {
        let existing = *self.live_ports().first().expect("a live node");
        let port = self.spawn_node().await;
        let output = tokio::process::Command::new("redis-cli")
            .args(tls_args(self.tls.as_deref()))
            .args(["--cluster", "add-node", &address(port), &address(existing)])
            .stdin(Stdio::null())
            .output()
            .await
            .expect("redis-cli runs");
        assert!(
            output.status.success(),
            "redis-cli --cluster add-node failed: {}",
            String::from_utf8_lossy(&output.stdout)
        );
        self.settle(DEADLINE, "the cluster to settle after adding a node")
            .await;
        port
    }

    /// Waits until the cluster has settled (see the module documentation).
    pub async fn settle(&self, deadline: Duration, what: &str) {
        within(
            deadline,
            async {
                while !self.settled().await {
                    poll_interval().await;
                }
            },
            what,
        )
        .await;
    }

    /// Whether every live node serves a complete, agreed slot map with every replica connected
    /// and every killed node marked failed.
    async fn settled(&self) -> bool {
        let live: BTreeSet<u16> = self.live_ports().into_iter().collect();
        let mut agreed: Option<Vec<ClusterNode>> = None;
        for &port in &live {
            let info = self.cli(port, &["CLUSTER", "INFO"]).await;
            if !info.contains("cluster_state:ok")
                || !info.contains(&format!("cluster_slots_ok:{SLOTS}"))
            {
                return false;
            }
            let text = self.cli(port, &["CLUSTER", "NODES"]).await;
            // Nodes still in their handshake are not known yet.
            if text.contains("handshake") || text.contains("noaddr") {
                return false;
            }
            let nodes = parse_nodes(&text);
            let listed: BTreeSet<u16> = nodes.iter().map(|n| n.port).collect();
            if !live.is_subset(&listed) {
                return false;
            }
            for node in &nodes {
                // Live nodes healthy; killed ones marked failed (not just suspected) and idle.
                let alive = live.contains(&node.port);
                if alive == node.failed || (!alive && !node.slots.is_empty()) {
                    return false;
                }
            }
            let mut view: Vec<ClusterNode> = nodes.into_iter().filter(|n| !n.failed).collect();
            view.sort();
            match &agreed {
                None => agreed = Some(view),
                Some(first) if *first == view => {}
                Some(_) => return false,
            }
            let role = self.cli(port, &["ROLE"]).await;
            if role.starts_with("slave") && !role.contains("connected") {
                return false;
            }
        }
        true
    }

    /// Starts one cluster-enabled node on free ports and waits until it answers PING; on other
    /// ports again if the process exits first (a port was taken in the meantime), up to
    /// [`START_ATTEMPTS`] times.
    async fn spawn_node(&mut self) -> u16 {
        for attempt in 1..=START_ATTEMPTS {
            let port = free_port();
            let bus_port = free_port();
            let log = self.dir.join(format!("node-{port}.log"));
            let mut node = Node {
                port,
                child: Some(spawn_logged(&mut self.node_command(port, bus_port), &log)),
            };
            let tls = self.tls.as_deref();
            let started = until_it_answers(
                node.child.as_mut().expect("just started"),
                &log,
                "a cluster node to answer PING",
                || async move { cli(tls, port, &["PING"]).await.starts_with("PONG") },
            )
            .await;
            match started {
                Ok(()) => {
                    self.nodes.push(node);
                    return port;
                }
                Err(NotUp::Exited(log)) if attempt == START_ATTEMPTS => panic!(
                    "a cluster node exited before it answered, {attempt} times on other \
                     ports; the last log ends with:\n{log}"
                ),
                Err(NotUp::Exited(_)) => node.kill(),
            }
        }
        unreachable!("the last attempt returns or fails the test")
    }

    /// The command line of a cluster-enabled node on `port`, its cluster bus on `bus_port`.
    fn node_command(&self, port: u16, bus_port: u16) -> Command {
        let mut command = Command::new("redis-server");
        match &self.tls {
            None => command.args(["--port", &port.to_string()]),
            Some(dir) => crate::tls_only(
                command.args(["--tls-port", &port.to_string()]).args([
                    "--tls-cluster",
                    "yes",
                    "--tls-replication",
                    "yes",
                ]),
                dir,
            ),
        };
        command
            .args(["--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .args(["--cluster-enabled", "yes"])
            // The bus port is chosen too: port + 10000 may be taken or past 65535.
            .args(["--cluster-port", &bus_port.to_string()])
            .args(["--cluster-node-timeout", NODE_TIMEOUT_MS])
            .arg("--cluster-config-file")
            .arg(self.dir.join(format!("nodes-{port}.conf")))
            // A replica may always take over, however long its link was down.
            .args(["--cluster-replica-validity-factor", "0"])
            // Replicas sync at once instead of after the default 5 s delay.
            .args([
                "--repl-diskless-sync",
                "yes",
                "--repl-diskless-sync-delay",
                "0",
            ])
            .arg("--dir")
            .arg(&self.dir)
            .args(["--dbfilename", &format!("dump-{port}.rdb")]);
        command
    }
}

/// A slot being moved between two masters ([`RedisCluster::start_migration`]).
#[derive(Debug)]
pub struct SlotMigration {
    slot: u16,
    from: u16,
    to: u16,
    to_id: String,
    tls: Option<PathBuf>,
}

impl SlotMigration {
    async fn cli(&self, port: u16, args: &[&str]) -> String {
        cli(self.tls.as_deref(), port, args).await
    }

    /// The port of the master the slot is leaving.
    pub fn from(&self) -> u16 {
        self.from
    }

    /// The port of the master the slot is moving to.
    pub fn to(&self) -> u16 {
        self.to
    }

    /// `MIGRATE`s `keys` (of the slot) from the source to the target at once; keys that are
    /// not on the source (any more) are skipped.
    pub async fn move_keys(&self, keys: &[&str]) {
        let to = self.to.to_string();
        let mut args = vec![
            "MIGRATE",
            "127.0.0.1",
            &to,
            "",
            "0",
            "5000",
            "REPLACE",
            "KEYS",
        ];
        args.extend(keys);
        let reply = self.cli(self.from, &args).await;
        // NOKEY: none of them was there (expired, or moved already).
        assert!(
            reply.starts_with("OK") || reply.starts_with("NOKEY"),
            "MIGRATE answered {reply}"
        );
    }

    /// Moves every key still in the slot on the source, 100 at a time.
    pub async fn move_all_keys(&self) {
        let slot = self.slot.to_string();
        within(
            DEADLINE,
            async {
                loop {
                    let keys = self
                        .cli(self.from, &["CLUSTER", "GETKEYSINSLOT", &slot, "100"])
                        .await;
                    let keys: Vec<&str> = keys.lines().filter(|k| !k.is_empty()).collect();
                    if keys.is_empty() {
                        return;
                    }
                    self.move_keys(&keys).await;
                }
            },
            "the slot's keys to move",
        )
        .await;
    }

    /// Moves the keys still on the source, then gives the slot to the target (`CLUSTER SETSLOT
    /// NODE` on the target, the source and every other master) and waits until the cluster has
    /// settled.
    pub async fn finish(self, cluster: &RedisCluster) {
        self.move_all_keys().await;
        let slot = self.slot.to_string();
        let node = ["CLUSTER", "SETSLOT", &slot, "NODE", &self.to_id];
        expect_ok(
            &self.cli(self.to, &node).await,
            "SETSLOT NODE on the target",
        );
        expect_ok(
            &self.cli(self.from, &node).await,
            "SETSLOT NODE on the source",
        );
        for master in cluster.masters().await {
            if master != self.from && master != self.to {
                expect_ok(
                    &self.cli(master, &node).await,
                    "SETSLOT NODE on another master",
                );
            }
        }
        cluster
            .settle(DEADLINE, "the cluster to settle after the migration")
            .await;
    }
}

impl Drop for RedisCluster {
    fn drop(&mut self) {
        for node in &mut self.nodes {
            node.kill();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn address(port: u16) -> String {
    format!("127.0.0.1:{port}")
}

/// `redis-cli -p <port> <args>`'s standard output (empty when the node does not answer).
async fn cli(tls: Option<&std::path::Path>, port: u16, args: &[&str]) -> String {
    let output = tokio::process::Command::new("redis-cli")
        .args(tls_args(tls))
        .args(["-h", "127.0.0.1", "-p", &port.to_string()])
        .args(args)
        .stdin(Stdio::null())
        .output()
        .await
        .expect("redis-cli runs");
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// What `redis-cli` needs to speak TLS to the nodes.
fn tls_args(tls: Option<&std::path::Path>) -> Vec<std::ffi::OsString> {
    match tls {
        None => Vec::new(),
        Some(dir) => vec!["--tls".into(), "--cacert".into(), dir.join("ca.pem").into()],
    }
}

fn expect_ok(reply: &str, what: &str) {
    assert!(reply.starts_with("OK"), "{what} answered {reply}");
}

/// The pause between two checks of a condition on the servers: polling, not synchronisation.
async fn poll_interval() {
    tokio::time::sleep(Duration::from_millis(50)).await;
}

/// Reads `CLUSTER NODES`: `<id> <ip:port@bus> <flags> <master> <ping> <pong> <epoch> <link>
/// <slot>...`. Slots being migrated (`[42->-id]`) are left out.
fn parse_nodes(text: &str) -> Vec<ClusterNode> {
    text.lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            if fields.len() < 8 {
                return None;
            }
            let address = fields[1].split(['@', ',']).next()?;
            let port = address.rsplit_once(':')?.1.parse().ok()?;
            let flags: Vec<&str> = fields[2].split(',').collect();
            Some(ClusterNode {
                port,
                id: fields[0].to_owned(),
                master: flags.contains(&"master"),
                master_id: (fields[3] != "-").then(|| fields[3].to_owned()),
                failed: flags.contains(&"fail") || flags.contains(&"fail?"),
                slots: fields[8..]
                    .iter()
                    .filter(|s| !s.starts_with('['))
                    .map(|s| (*s).to_owned())
                    .collect(),
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cluster_nodes_lines_are_read() {
        let text = "\
5aa8 127.0.0.1:23003@23103 master - 0 1796536960921 3 connected 10923-16383 [5->-ab]
2805 127.0.0.1:23001@23101 master,fail - 0 1796536960821 1 disconnected
dc3b 127.0.0.1:23002@23102 myself,slave 5aa8 0 0 2 connected
";
        let nodes = parse_nodes(text);
        assert_eq!(nodes.len(), 3);
        assert_eq!(nodes[0].port, 23003);
        assert_eq!(nodes[0].slots, vec!["10923-16383"]);
        assert!(nodes[0].serves(10923) && nodes[0].serves(16383) && !nodes[0].serves(5));
        assert!(nodes[1].failed && nodes[1].master);
        assert_eq!(nodes[2].master_id.as_deref(), Some("5aa8"));
        assert!(!nodes[2].master);
    }
}
