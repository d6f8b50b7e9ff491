//! Groups spread over several independent Redis servers (`--redis-url` with several URLs): each
//! group lives on the server `contract::shard_of` names, events reach clients from every
//! server, and adding a server tells the clients of the groups it takes to refetch while the
//! others resume as before.

use e2e::{
    DEADLINE, RedisServer, TestGateway, WsClient, dispatcher, joined, recommendation_ready, within,
};
use publisher_lib::contract::{Group, shard_of};
use serde_json::{Value, json};

/// Regions named `{prefix}-{i}` for which `keep(shard_of(group, 1..))` holds, `count` of them.
fn regions_where(prefix: &str, count: usize, keep: impl Fn(&Group) -> bool) -> Vec<String> {
    (0..)
        .map(|i| format!("{prefix}-{i}"))
        .filter(|region| keep(&Group::try_dispatch(region).expect("valid region")))
        .take(count)
        .collect()
}

/// Whether `server` holds `region`'s group position.
async fn holds(server: &RedisServer, region: &str) -> bool {
    server
        .cli(&["EXISTS", &format!("rt:{{/dispatch/{region}}}:pos")])
        .await
        .trim()
        == "1"
}

/// Joins `region` resuming after `after`.
async fn join_after(client: &mut WsClient, id: &str, region: &str, after: &Value) -> Value {
    let completion = client
        .invoke(id, "JoinDispatchGroup", json!([region, after]))
        .await;
    joined(&completion, &format!("/dispatch/{region}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn groups_on_two_servers_reach_their_clients_and_live_only_on_their_server() {
    let servers = [RedisServer::start().await, RedisServer::start().await];
    let urls = format!("{} {}", servers[0].url(), servers[1].url());
    let a = TestGateway::start_ready(&urls, &[]).await;
    let b = TestGateway::start_ready(&urls, &[]).await;
    let mut regions = regions_where("first", 2, |g| shard_of(g, 2) == 0);
    regions.extend(regions_where("second", 2, |g| shard_of(g, 2) == 1));
    let names: Vec<&str> = regions.iter().map(String::as_str).collect();
    let mut client = a.connect(&dispatcher("d-1", &names)).await;
    for (i, region) in regions.iter().enumerate() {
        client.join_dispatch(&i.to_string(), region).await;
    }

    for region in &regions {
        let event = recommendation_ready(region, &[]);
        b.publish_accepted(&event).await;
        let (_, payload) = within(DEADLINE, client.next_event(), "the event").await;
        assert_eq!(
            payload, event,
            "published on b, through {region}'s server, to a"
        );
    }
    for (i, region) in regions.iter().enumerate() {
        let home = usize::from(i >= 2);
        assert!(
            holds(&servers[home], region).await,
            "{region} on server {home}"
        );
        assert!(
            !holds(&servers[1 - home], region).await,
            "{region} only there"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn adding_a_server_makes_the_clients_of_the_groups_it_takes_refetch_and_no_others() {
    let servers = [RedisServer::start().await, RedisServer::start().await];
    // `moving` goes to the second server when it is added; `staying` does not.
    let moving = regions_where("moving", 1, |g| shard_of(g, 2) == 1).remove(0);
    let staying = regions_where("staying", 1, |g| shard_of(g, 2) == 0).remove(0);
    let claims = dispatcher("d-1", &[&moving, &staying]);

    let before = TestGateway::start_ready(&servers[0].url(), &[]).await;
    let mut client = before.connect(&claims).await;
    let mut last = Vec::new();
    for (i, region) in [&moving, &staying].into_iter().enumerate() {
        client.join_dispatch(&i.to_string(), region).await;
        before
            .publish_accepted(&recommendation_ready(region, &[]))
            .await;
        let (_, _, position) = within(DEADLINE, client.next_positioned_event(), "the event").await;
        last.push(json!({"epoch": position["epoch"], "seq": position["seq"]}));
    }
    drop(client);
    before.stop().await;

    let urls = format!("{} {}", servers[0].url(), servers[1].url());
    let after = TestGateway::start_ready(&urls, &[]).await;
    let mut back = after.connect(&claims).await;
    let moved = join_after(&mut back, "1", &moving, &last[0]).await;
    assert_eq!(
        moved["recovered"], false,
        "the new server has no history: {moved}"
    );
    assert_ne!(moved["epoch"], last[0]["epoch"], "a new epoch: {moved}");
    let kept = join_after(&mut back, "2", &staying, &last[1]).await;
    assert_eq!(kept["recovered"], true, "{kept}");
    assert_eq!(kept["epoch"], last[1]["epoch"]);
}
