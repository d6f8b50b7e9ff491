//! The gateway on a Redis Cluster as an operator runs one: TLS to every node and the ACL user
//! `docs/redis-contract.md` documents. (Slot moves, failovers and added nodes under load are in
//! `tests/node/cluster.test.mjs`, with the official client.)

use std::collections::{BTreeMap, BTreeSet};

use e2e::{
    DEADLINE, RedisCluster, StatusCode, TestGateway, dispatcher, recommendation_ready,
    start_gateway, within,
};

use crate::contract_doc::documented_acl;

/// What a gateway needs on a cluster beyond the documented gateway user, as the contract's
/// cluster section lists it: sharded pub/sub and the slot map.
const CLUSTER_GATEWAY_EXTRA: [&str; 4] = [
    "+spublish",
    "+ssubscribe",
    "+sunsubscribe",
    "+cluster|slots",
];

/// One region whose group lives on each master of `cluster`.
async fn one_region_per_master(cluster: &RedisCluster) -> Vec<String> {
    let masters: BTreeSet<u16> = cluster.masters().await.into_iter().collect();
    let mut chosen: BTreeMap<u16, String> = BTreeMap::new();
    for i in 0..1000 {
        let region = format!("m-{i}");
        let master = cluster
            .master_of_key(&format!("rt:{{/dispatch/{region}}}"))
            .await;
        chosen.entry(master).or_insert(region);
        if chosen.len() == masters.len() {
            return chosen.into_values().collect();
        }
    }
    panic!("no region for every master of {masters:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_on_a_tls_cluster_as_the_documented_acl_user_delivers_from_every_master_in_order()
{
    let dir = std::env::temp_dir().join(format!("e2e-cluster-tls-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("a folder for the certificates");
    let cluster = RedisCluster::start_tls(&dir).await;
    let mut acl = documented_acl("realtime-gateway", ">GATEWAY_PASSWORD", ">gw-pass");
    acl.extend(CLUSTER_GATEWAY_EXTRA.map(str::to_owned));
    let acl: Vec<&str> = acl.iter().map(String::as_str).collect();
    // ACL users are per node: an operator creates them on every node, replicas included.
    for port in cluster.live_ports() {
        let answer = cluster.cli(port, &acl).await;
        assert_eq!(answer.trim(), "OK", "ACL SETUSER on {port}");
    }
    let url = cluster.url().replace(
        "rediss+cluster://",
        "rediss+cluster://realtime-gateway:gw-pass@",
    );
    let ca = dir.join("ca.pem");
    let ca = ca.to_str().expect("a UTF-8 path");
    let gateway = TestGateway::start_ready(&url, &["--redis-ca-file", ca]).await;

    let regions = one_region_per_master(&cluster).await;
    assert_eq!(regions.len(), 3, "the cluster has three masters");
    let names: Vec<&str> = regions.iter().map(String::as_str).collect();
    let mut client = gateway.connect(&dispatcher("d-1", &names)).await;
    for (i, region) in regions.iter().enumerate() {
        client.join_dispatch(&i.to_string(), region).await;
    }
    // Three rounds over the three groups, each published over HTTP, so through the publish
    // script on the group's master, then SPUBLISHed to this gateway's sharded subscription.
    let mut published: BTreeMap<&str, Vec<String>> = BTreeMap::new();
    for _ in 0..3 {
        for region in &regions {
            let event = recommendation_ready(region, &[]);
            gateway.publish_accepted(&event).await;
            published.entry(region).or_default().push(event);
        }
    }
    let mut received: BTreeMap<&str, Vec<String>> = BTreeMap::new();
    for _ in 0..9 {
        let (_, payload) = within(
            DEADLINE,
            client.next_event(),
            "an event through the cluster",
        )
        .await;
        let region = regions
            .iter()
            .find(|region| payload.contains(&format!("\"region\":\"{region}\"")))
            .unwrap_or_else(|| panic!("an event of a joined region: {payload}"));
        received.entry(region).or_default().push(payload);
    }
    assert_eq!(received, published, "every event once, in order, per group");

    // Readiness is a round trip through every master the replica subscribes on.
    let (status, body) = gateway.readyz().await.expect("/readyz answers");
    assert_eq!(status, StatusCode::OK, "{body}");
    drop(cluster);
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_cluster_password_keeps_the_gateway_unready_and_refuses_publishes() {
    let cluster = RedisCluster::start().await;
    let mut acl = documented_acl("realtime-gateway", ">GATEWAY_PASSWORD", ">gw-pass");
    acl.extend(CLUSTER_GATEWAY_EXTRA.map(str::to_owned));
    let acl: Vec<&str> = acl.iter().map(String::as_str).collect();
    for port in cluster.live_ports() {
        assert_eq!(cluster.cli(port, &acl).await.trim(), "OK");
    }
    let url = cluster.url().replace(
        "redis+cluster://",
        "redis+cluster://realtime-gateway:wrong@",
    );
    let gateway = start_gateway(&["--redis-url", &url]).await;
    gateway.wait_readyz(StatusCode::SERVICE_UNAVAILABLE).await;
    let (status, body) = gateway.publish(&recommendation_ready("west", &[])).await;
    eprintln!(
        "readyz {:?}; publish {status} {body}",
        gateway.readyz().await
    );
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
}
