//! The Redis keys the script writes: reloading after SCRIPT FLUSH, key names and TTLs as the
//! contract says, and the publisher's defaults.

use std::time::Duration;

use publisher_lib::contract::{Envelope, Group};
use publisher_lib::{Publisher, PublisherConfig};

use crate::harness::*;

#[tokio::test]
async fn publishing_reloads_the_script_after_script_flush() {
    let server = RedisServer::start().await;
    let publisher = publisher(&server);
    let west = Group::try_dispatch("west").unwrap();
    publisher.publish(&recommendation("west")).await.unwrap();
    publisher.read_history(&west, None).await.unwrap();

    let mut admin = admin(&server).await;
    let () = command(&mut admin, &["SCRIPT", "FLUSH"]).await;
    let receipt = publisher.publish(&recommendation("west")).await.unwrap();
    assert_eq!(receipt.deliveries[0].position.seq, 2);
    let () = command(&mut admin, &["SCRIPT", "FLUSH"]).await;
    let read = publisher.read_history(&west, None).await.unwrap();
    assert_eq!(read.head, receipt.deliveries[0].position);
}

#[tokio::test]
async fn keys_and_ttls_follow_the_contract() {
    let server = RedisServer::start().await;
    let config = PublisherConfig::new(server.url())
        .with_history_ttl(Duration::from_secs(120))
        .with_idempotency_window(Duration::from_secs(60));
    let publisher = Publisher::new(config).unwrap();
    let receipt = publisher
        .publish_with_key(&recommendation("west"), "key-1")
        .await
        .unwrap();
    let position = receipt.deliveries[0].position.clone();
    let mut admin = admin(&server).await;

    let mut keys: Vec<String> = command(&mut admin, &["KEYS", "*"]).await;
    keys.sort();
    assert_eq!(
        keys,
        [
            "rt:{/dispatch/west}:history",
            "rt:{/dispatch/west}:id:key-1",
            "rt:{/dispatch/west}:pos",
        ]
    );
    let pos: Vec<(String, String)> =
        command(&mut admin, &["HGETALL", "rt:{/dispatch/west}:pos"]).await;
    assert_eq!(
        pos.into_iter().collect::<std::collections::HashMap<_, _>>(),
        [
            ("epoch".to_owned(), position.epoch.clone()),
            ("seq".to_owned(), "1".to_owned())
        ]
        .into()
    );
    let seen: String = command(&mut admin, &["GET", "rt:{/dispatch/west}:id:key-1"]).await;
    assert_eq!(seen, "1");
    let entries: Vec<StreamEntry> = command(
        &mut admin,
        &["XRANGE", "rt:{/dispatch/west}:history", "-", "+"],
    )
    .await;
    assert_eq!(entries.len(), 1);
    assert_eq!(entries[0].0, "1-1");
    assert_eq!(entries[0].1[0].0, "m");
    let message = &entries[0].1[0].1;
    assert!(
        message.starts_with(
            format!(r#"{{"epoch":"{}","seq":1,"v":1,"id":""#, position.epoch).as_bytes()
        )
    );
    assert_eq!(Envelope::decode(message).unwrap().position, Some(position));

    for (key, expected) in [
        ("rt:{/dispatch/west}:pos", 120),
        ("rt:{/dispatch/west}:history", 120),
        ("rt:{/dispatch/west}:id:key-1", 60),
    ] {
        let ttl: i64 = command(&mut admin, &["TTL", key]).await;
        assert!((expected - 5..=expected).contains(&ttl), "{key}: ttl {ttl}");
    }
}

#[test]
fn defaults_are_those_of_the_contract() {
    let config = PublisherConfig::new("redis://127.0.0.1:1");
    assert_eq!(config.history_size, 1000);
    assert_eq!(config.history_ttl, Duration::from_secs(600));
    assert_eq!(config.idempotency_window, Duration::from_secs(300));
}
