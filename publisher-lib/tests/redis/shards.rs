//! `Publisher` over several independent servers: each group is published on, and read from,
//! the server `contract::shard_of` names, and nowhere else.

use publisher_lib::contract::{Event, Group, shard_of};
use publisher_lib::{Publisher, PublisherConfig};

use crate::harness::*;

/// Whether `server` holds `group`'s position key.
async fn holds(server: &RedisServer, group: &Group) -> bool {
    let key = format!("rt:{{{}}}:pos", group.name());
    let exists: u64 = command(&mut admin(server).await, &["EXISTS", &key]).await;
    exists == 1
}

#[tokio::test]
async fn each_group_is_published_on_its_own_server_and_read_back_from_it() {
    let servers = [RedisServer::start().await, RedisServer::start().await];
    let urls = format!("{} {}", servers[0].url(), servers[1].url());
    let publisher = Publisher::new(PublisherConfig::new(urls)).unwrap();
    // Regions until both servers hold some, and a JobAssigned whose two groups may differ.
    let regions: Vec<String> = (0..12).map(|i| format!("shard-{i}")).collect();
    let groups: Vec<Group> = regions
        .iter()
        .map(|r| Group::try_dispatch(r).unwrap())
        .collect();
    assert!(
        (0..2).all(|shard| groups.iter().any(|g| shard_of(g, 2) == shard)),
        "the regions cover both servers"
    );
    for region in &regions {
        let receipt = within(
            DEADLINE,
            "publish",
            publisher.publish(&recommendation(region)),
        )
        .await
        .unwrap();
        assert_eq!(receipt.deliveries[0].position.seq, 1);
    }
    let assigned = event(JOB_ASSIGNED);
    let receipt = within(DEADLINE, "publish", publisher.publish(&assigned))
        .await
        .unwrap();
    assert_eq!(
        receipt
            .deliveries
            .iter()
            .map(|d| d.group.clone())
            .collect::<Vec<_>>(),
        Event::groups(&assigned),
        "one delivery per group, in routing order"
    );

    for group in groups.iter().chain(&Event::groups(&assigned)) {
        let home = shard_of(group, 2);
        assert!(
            holds(&servers[home], group).await,
            "{group} on server {home}"
        );
        assert!(
            !holds(&servers[1 - home], group).await,
            "{group} only on server {home}"
        );
        let read = within(DEADLINE, "read", publisher.read_history(group, None))
            .await
            .unwrap();
        assert!(
            read.head.seq >= 1,
            "{group}'s history is read from its server"
        );
    }
}
