//! Several gateways on one real redis-server: publications reach every replica, readiness is a
//! real round trip, and a restarted Redis is recovered without dropping clients.

use std::time::Duration;

use e2e::{
    DEADLINE, RedisServer, StatusCode, TestGateway, dispatcher, recommendation_ready,
    start_gateway, within,
};
use publisher_lib::contract::Event;
use publisher_lib::{Publisher, PublisherConfig};
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_published_on_one_replica_reaches_a_client_of_another() {
    let redis = RedisServer::start().await;
    let a = TestGateway::start_ready(&redis.url(), &[]).await;
    let b = TestGateway::start_ready(&redis.url(), &[]).await;
    let mut client = a.connect(&dispatcher("d-1", &["west"])).await;
    client.join_dispatch("1", "west").await;

    let event = recommendation_ready("west", &[("schemaVersion", json!(2))]);
    b.publish_accepted(&event).await;

    let (target, payload) = within(DEADLINE, client.next_event(), "the event").await;
    assert_eq!(target, "RecommendationReady");
    assert_eq!(
        payload, event,
        "the event's bytes travel untouched through Redis"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_published_with_publisher_lib_reaches_subscribed_clients() {
    let redis = RedisServer::start().await;
    let gateway = TestGateway::start_ready(&redis.url(), &[]).await;
    let mut client = gateway.connect(&dispatcher("d-1", &["west"])).await;
    client.join_dispatch("1", "west").await;

    let event = Event::from_json(recommendation_ready("west", &[]).as_bytes()).unwrap();
    let publisher = Publisher::new(PublisherConfig::new(redis.url())).unwrap();
    publisher.publish(&event).await.unwrap();

    let (_, payload) = within(DEADLINE, client.next_event(), "the event").await;
    assert_eq!(payload.as_bytes(), event.to_json().unwrap().as_slice());
}

/// Kills Redis under a gateway with a joined client, keeps it down for `outage` (the outage
/// itself is what is tested, not a way to synchronise), starts it again on the same port, and
/// checks that the gateway is ready again by itself and the same, still-connected client gets
/// an event published after that.
async fn recovers_after_an_outage(outage: Duration) {
    let mut redis = RedisServer::start().await;
    let gateway = TestGateway::start_ready(&redis.url(), &[]).await;
    let mut client = gateway.connect(&dispatcher("d-1", &["west"])).await;
    client.join_dispatch("1", "west").await;

    redis.kill();
    gateway.wait_readyz(StatusCode::SERVICE_UNAVAILABLE).await;
    let (status, _) = gateway.publish(&recommendation_ready("west", &[])).await;
    assert_eq!(
        status,
        StatusCode::SERVICE_UNAVAILABLE,
        "publishing fails while Redis is down"
    );
    tokio::time::sleep(outage).await;

    redis.start_again().await;
    let back = tokio::time::Instant::now();
    gateway.wait_readyz(StatusCode::OK).await;
    eprintln!(
        "ready again {:?} after Redis came back ({outage:?} outage)",
        back.elapsed()
    );
    let event = recommendation_ready("west", &[]);
    gateway.publish_accepted(&event).await;
    let (_, payload) = within(DEADLINE, client.next_event(), "the event after the outage").await;
    assert_eq!(
        payload, event,
        "the same, still-connected client receives it"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_short_redis_outage_the_gateway_is_ready_again_and_its_clients_get_events() {
    recovers_after_an_outage(Duration::from_secs(2)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_long_redis_outage_the_gateway_recovers_by_itself() {
    // Longer than the redis crate's own retry budget.
    recovers_after_an_outage(Duration::from_secs(15)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_redis_turns_readiness_false_and_publishes_fail_until_it_thaws() {
    let redis = RedisServer::start().await;
    let gateway = TestGateway::start_ready(&redis.url(), &[]).await;
    let mut client = gateway.connect(&dispatcher("d-1", &["west"])).await;
    client.join_dispatch("1", "west").await;

    redis.signal("STOP");
    gateway.wait_readyz(StatusCode::SERVICE_UNAVAILABLE).await;
    // Redis stays frozen until it is told to continue below: the publish is answered while it
    // is frozen (it fails rather than waiting for Redis), whatever the time that takes.
    let (status, body) = within(
        DEADLINE,
        gateway.publish(&recommendation_ready("west", &[])),
        "the publish to fail while Redis is frozen",
    )
    .await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");

    redis.signal("CONT");
    gateway.wait_readyz(StatusCode::OK).await;
    let event = recommendation_ready("west", &[]);
    gateway.publish_accepted(&event).await;
    // The publish that failed while frozen may still have been delivered when Redis thawed (it
    // was written to the socket); skip anything before the event published after the thaw.
    let payload = within(
        DEADLINE,
        async {
            loop {
                let (_, payload) = client.next_event().await;
                if payload == event {
                    return payload;
                }
            }
        },
        "the event after the thaw",
    )
    .await;
    assert_eq!(payload, event);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_clients_joining_at_once_each_get_their_own_groups_events() {
    let redis = RedisServer::start().await;
    let gateway = TestGateway::start_ready(&redis.url(), &[]).await;
    let regions: Vec<String> = (0..40).map(|i| format!("burst-{i}")).collect();
    let mut clients = Vec::new();
    // One user per client: a single user's connections are limited (--max-connections-per-user).
    for (i, region) in regions.iter().enumerate() {
        let user = format!("d-{i}");
        clients.push(gateway.connect(&dispatcher(&user, &[region])).await);
    }
    // All joins in flight together, so the broker receives them as one burst.
    let joins = clients
        .iter_mut()
        .zip(&regions)
        .map(|(client, region)| client.join_dispatch("1", region));
    futures_util::future::join_all(joins).await;

    let mut sent = Vec::new();
    for region in &regions {
        let event = recommendation_ready(region, &[]);
        gateway.publish_accepted(&event).await;
        sent.push(event);
    }
    for (client, event) in clients.iter_mut().zip(&sent) {
        let (_, payload) = within(DEADLINE, client.next_event(), "its region's event").await;
        assert_eq!(
            &payload, event,
            "each client gets exactly its own group's event"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls_redis_is_used_through_a_rediss_url_and_the_configured_authority() {
    let dir = std::env::temp_dir().join(format!("e2e-redis-tls-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let redis = RedisServer::start_tls(&dir).await;
    let url = format!("rediss://127.0.0.1:{}", redis.port());
    let ca = dir.join("ca.pem");
    let gateway = TestGateway::start_ready(&url, &["--redis-ca-file", ca.to_str().unwrap()]).await;
    let mut client = gateway.connect(&dispatcher("d-1", &["west"])).await;
    client.join_dispatch("1", "west").await;

    let event = recommendation_ready("west", &[]);
    gateway.publish_accepted(&event).await;
    let (_, payload) = within(DEADLINE, client.next_event(), "the event through TLS").await;
    assert_eq!(payload, event);

    // publisher-lib reaches the same TLS-only server with the same authority.
    let config =
        PublisherConfig::new(url.as_str()).with_ca_certificate(std::fs::read(&ca).unwrap());
    let published = Event::from_json(recommendation_ready("west", &[]).as_bytes()).unwrap();
    Publisher::new(config)
        .unwrap()
        .publish(&published)
        .await
        .unwrap();
    let (_, payload) = within(DEADLINE, client.next_event(), "publisher-lib's event").await;
    assert_eq!(payload.as_bytes(), published.to_json().unwrap().as_slice());
    drop(redis);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Polls `condition` every 50 ms until it holds, failing after `limit`.
async fn eventually<F, Fut>(limit: Duration, what: &str, mut condition: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    within(
        limit,
        async {
            while !condition().await {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        },
        what,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn behind_sentinel_the_gateway_and_publisher_follow_a_failover_to_the_promoted_replica() {
    let dir = std::env::temp_dir().join(format!("e2e-sentinel-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut master = RedisServer::start().await;
    let master_port = master.port().to_string();
    let replica_server = RedisServer::start_with(&["--replicaof", "127.0.0.1", &master_port]).await;
    let sentinel = RedisServer::start_sentinel(&dir, master.port()).await;
    // Sentinel must know the replica, and the replica must be in sync, before a failover works.
    eventually(
        Duration::from_secs(20),
        "the sentinel to see a synced replica",
        || async {
            sentinel
                .cli(&["SENTINEL", "replicas", "primary"])
                .await
                .contains(&replica_server.port().to_string())
                && replica_server
                    .cli(&["INFO", "replication"])
                    .await
                    .contains("master_link_status:up")
        },
    )
    .await;

    let url = format!("redis+sentinel://127.0.0.1:{}/primary", sentinel.port());
    let gateway = TestGateway::start_ready(&url, &[]).await;
    let mut client = gateway.connect(&dispatcher("d-1", &["west"])).await;
    client.join_dispatch("1", "west").await;
    let publisher = Publisher::new(PublisherConfig::new(url.as_str())).unwrap();
    let before = Event::from_json(recommendation_ready("west", &[]).as_bytes()).unwrap();
    publisher.publish(&before).await.unwrap();
    let (_, payload) = within(DEADLINE, client.next_event(), "the event before failover").await;
    assert_eq!(payload.as_bytes(), before.to_json().unwrap().as_slice());

    master.kill();
    let promoted = replica_server.port().to_string();
    eventually(
        Duration::from_secs(30),
        "the sentinel to promote the replica",
        || async {
            sentinel
                .cli(&["SENTINEL", "get-master-addr-by-name", "primary"])
                .await
                .contains(&promoted)
        },
    )
    .await;
    let failed_over = tokio::time::Instant::now();
    gateway.wait_readyz(StatusCode::OK).await;
    eprintln!(
        "ready on the promoted master {:?} after the promotion",
        failed_over.elapsed()
    );

    // The gateway's HTTP path and publisher-lib both find the new master by themselves.
    let event = recommendation_ready("west", &[]);
    gateway.publish_accepted(&event).await;
    let (_, payload) = within(
        DEADLINE,
        client.next_event(),
        "the gateway's event after failover",
    )
    .await;
    assert_eq!(payload, event);
    let after = Event::from_json(recommendation_ready("west", &[]).as_bytes()).unwrap();
    let receipt = within(
        DEADLINE,
        async {
            loop {
                // The first calls may still fail on the dead master; each failure re-resolves it.
                match publisher.publish(&after).await {
                    Ok(receipt) => return receipt,
                    Err(e) => assert!(e.is_transient(), "{e}"),
                }
            }
        },
        "publisher-lib to publish on the new master",
    )
    .await;
    assert_eq!(
        receipt.deliveries[0].subscribers, 1,
        "the gateway is subscribed on the new master"
    );
    let (_, payload) = within(
        DEADLINE,
        client.next_event(),
        "publisher-lib's event after failover",
    )
    .await;
    assert_eq!(payload.as_bytes(), after.to_json().unwrap().as_slice());
    drop(sentinel);
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_beyond_the_subscriber_buffer_is_dropped_and_counted_and_delivery_goes_on() {
    const FLOOD: usize = 20_000;
    let redis = RedisServer::start().await;
    let gateway = start_gateway(&[
        "--redis-url",
        &redis.url(),
        "--redis-subscriber-buffer",
        "1",
        "--outbound-queue",
        "100000",
    ])
    .await;
    gateway.wait_readyz(StatusCode::OK).await;
    let mut client = gateway.connect(&dispatcher("d-1", &["west"])).await;
    client.join_dispatch("1", "west").await;

    // One pipeline of envelopes, written to Redis faster than fan-out takes one at a time.
    let envelope = publisher_lib::contract::Envelope::encode(
        uuid::Uuid::new_v4(),
        publisher_lib::contract::EventKind::RecommendationReady,
        0,
        &recommendation_ready("west", &[]),
    );
    let mut pipe = redis::pipe();
    for _ in 0..FLOOD {
        pipe.cmd("PUBLISH")
            .arg("rt:{/dispatch/west}")
            .arg(&envelope)
            .ignore();
    }
    let mut connection = redis::Client::open(redis.url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    pipe.query_async::<()>(&mut connection).await.unwrap();

    // Every message is either delivered (counted as received) or dropped (counted as dropped).
    let received = "gateway_events_received_total{source=\"redis\"}";
    eventually(
        DEADLINE,
        "every flooded message to be received or dropped",
        || async {
            let total = gateway.metric(received).await
                + gateway
                    .metric("gateway_broker_messages_dropped_total")
                    .await;
            total >= FLOOD as f64
        },
    )
    .await;
    let dropped = gateway
        .metric("gateway_broker_messages_dropped_total")
        .await;
    assert!(
        dropped > 0.0,
        "a one-message buffer dropped nothing out of {FLOOD}"
    );
    // Health probes share the buffer, so one or two of them may be among the dropped.
    let accounted = gateway.metric(received).await + dropped;
    assert!(
        (FLOOD as f64..=FLOOD as f64 + 5.0).contains(&accounted),
        "{accounted} received or dropped for {FLOOD} published"
    );

    // Still ready, and the next event arrives after whatever of the flood got through.
    gateway.wait_readyz(StatusCode::OK).await;
    let last = recommendation_ready("west", &[("last", json!(true))]);
    gateway.publish_accepted(&last).await;
    within(
        DEADLINE,
        async { while client.next_event().await.1 != last {} },
        "the event after the flood",
    )
    .await;
}
