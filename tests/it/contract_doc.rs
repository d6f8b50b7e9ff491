//! docs/redis-contract.md checked against the code: its redis-cli example and ACL lines run as
//! written against a real redis-server and gateway, and its scripts are the ones the code runs.

use e2e::{DEADLINE, RedisServer, StatusCode, dispatcher, start_gateway, within, workspace_root};
use publisher_lib::{PUBLISH_SCRIPT, READ_SCRIPT};

/// The `redis-cli ...` line of the tested example.
fn documented_command() -> String {
    let doc = std::fs::read_to_string(workspace_root().join("docs/redis-contract.md"))
        .expect("docs/redis-contract.md is readable");
    let after_marker = doc
        .split("<!-- The line below is run by tests/it/contract_doc.rs")
        .nth(1)
        .expect("the tested example is marked");
    after_marker
        .lines()
        .find(|line| line.starts_with("redis-cli "))
        .expect("a redis-cli line follows the marker")
        .to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_documented_redis_cli_publish_reaches_a_subscribed_client() {
    let redis = RedisServer::start().await;
    let gateway = start_gateway(&["--redis-url", &redis.url()]).await;
    gateway.wait_readyz(StatusCode::OK).await;
    let mut client = gateway.connect(&dispatcher("d-1", &["west"])).await;
    client.join_dispatch("1", "west").await;

    let command = documented_command().replace("-p 6379", &format!("-p {}", redis.port()));
    // The example names the script by its path in the repository.
    let run = || {
        let output = std::process::Command::new("sh")
            .args(["-c", &command])
            .current_dir(workspace_root())
            .output()
            .expect("redis-cli runs");
        assert!(output.status.success(), "{output:?}");
        String::from_utf8_lossy(&output.stdout)
            .lines()
            .map(str::to_owned)
            .collect::<Vec<_>>()
    };
    let reply = run();
    // epoch, seq, duplicate, subscribers
    assert_eq!(reply.len(), 4, "{reply:?}");
    assert_eq!(reply[0].len(), 32, "an epoch: {reply:?}");
    assert_eq!(reply[1], "1", "the group's first event: {reply:?}");
    assert_eq!(reply[2], "0", "not a duplicate: {reply:?}");
    assert_eq!(reply[3], "1", "one replica subscribed: {reply:?}");

    let (target, payload) = within(DEADLINE, client.next_event(), "the event").await;
    assert_eq!(target, "RecommendationReady");
    let sent = command
        .split("\"event\":")
        .nth(1)
        .and_then(|rest| rest.split("}'").next())
        .unwrap();
    assert_eq!(payload, sent, "the documented event arrives byte for byte");

    // Run again, as the doc says: the same idempotency key is a duplicate, delivered nowhere.
    let again = run();
    assert_eq!(again, [reply[0].as_str(), "1", "1", "0"], "{again:?}");
}

#[test]
fn the_doc_shows_the_scripts_the_publisher_runs_verbatim() {
    let doc = std::fs::read_to_string(workspace_root().join("docs/redis-contract.md"))
        .expect("docs/redis-contract.md is readable");
    for (name, script) in [("publish", PUBLISH_SCRIPT), ("read", READ_SCRIPT)] {
        assert!(
            doc.contains(&format!("```lua\n{script}```")),
            "docs/redis-contract.md must show the {name} script exactly as publisher-lib runs it"
        );
    }
}

/// The `ACL SETUSER <user> ...` line of the permissions section, with its password placeholder
/// replaced.
pub(crate) fn documented_acl(user: &str, placeholder: &str, password: &str) -> Vec<String> {
    let doc = std::fs::read_to_string(workspace_root().join("docs/redis-contract.md"))
        .expect("docs/redis-contract.md is readable");
    let line = doc
        .lines()
        .find(|line| line.starts_with(&format!("ACL SETUSER {user} ")))
        .unwrap_or_else(|| panic!("the doc has an ACL line for {user}"));
    line.replace(placeholder, password)
        .split_whitespace()
        .map(str::to_owned)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_documented_acl_users_are_enough_for_the_gateway_and_a_publisher() {
    let redis = RedisServer::start().await;
    for (user, placeholder, password) in [
        ("realtime-gateway", ">GATEWAY_PASSWORD", ">gw-pass"),
        ("realtime-publisher", ">PUBLISHER_PASSWORD", ">pub-pass"),
    ] {
        let output = std::process::Command::new("redis-cli")
            .args(["-p", &redis.port().to_string()])
            .args(documented_acl(user, placeholder, password))
            .output()
            .expect("redis-cli runs");
        assert_eq!(
            String::from_utf8_lossy(&output.stdout).trim(),
            "OK",
            "{output:?}"
        );
    }
    let url = format!(
        "redis://realtime-gateway:gw-pass@127.0.0.1:{}",
        redis.port()
    );
    let gateway = start_gateway(&["--redis-url", &url]).await;
    gateway.wait_readyz(StatusCode::OK).await;
    let mut client = gateway.connect(&dispatcher("d-1", &["west"])).await;
    client.join_dispatch("1", "west").await;

    // The gateway's own HTTP publish needs only its permissions...
    let over_http = e2e::recommendation_ready("west", &[]);
    gateway.publish_accepted(&over_http).await;
    let (_, payload) = within(DEADLINE, client.next_event(), "the HTTP event").await;
    assert_eq!(payload, over_http);

    // The HTTP publish ran the publish script; the gateway's user may also run the read script.
    let as_gateway =
        publisher_lib::Publisher::new(publisher_lib::PublisherConfig::new(url.clone())).unwrap();
    let west = publisher_lib::contract::Group::try_dispatch("west").unwrap();
    let head = as_gateway.read_history(&west, None).await.unwrap().head;
    let read = as_gateway
        .read_history(
            &west,
            Some(&publisher_lib::contract::Position::new(&head.epoch, 0)),
        )
        .await
        .unwrap();
    assert_eq!(read.messages.len(), usize::try_from(head.seq).unwrap());

    // ...and a backend publishes with only the publisher's.
    let publisher_url = format!(
        "redis://realtime-publisher:pub-pass@127.0.0.1:{}",
        redis.port()
    );
    let publisher =
        publisher_lib::Publisher::new(publisher_lib::PublisherConfig::new(publisher_url)).unwrap();
    let event = publisher_lib::contract::Event::from_json(
        e2e::recommendation_ready("west", &[]).as_bytes(),
    )
    .unwrap();
    publisher.publish(&event).await.unwrap();
    let (_, payload) = within(DEADLINE, client.next_event(), "the published event").await;
    assert_eq!(payload.as_bytes(), event.to_json().unwrap().as_slice());
}
