//! The `realtime-publish` command line against Redis: the receipt it prints and the exit code
//! of a refused event.

use crate::harness::*;

#[tokio::test]
async fn cli_publishes_via_redis_and_prints_the_receipt() {
    let server = RedisServer::start().await;
    let event = event(JOB_ASSIGNED);
    let mut stream = subscribe(&server, &event.groups()).await;

    let output = within(
        DEADLINE,
        "realtime-publish",
        tokio::process::Command::new(env!("CARGO_BIN_EXE_realtime-publish"))
            .args(["--redis-url", &server.url(), JOB_ASSIGNED])
            .kill_on_drop(true)
            .output(),
    )
    .await
    .unwrap();

    assert!(output.status.success(), "{output:?}");
    let receipt: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(receipt["type"], "JobAssigned");
    assert_eq!(receipt["idempotencyKey"], event.unique_id());
    for group in 0..2 {
        assert_eq!(receipt["groups"][group]["subscribers"], 1);
        assert_eq!(receipt["groups"][group]["seq"], 1);
        assert_eq!(receipt["groups"][group]["duplicate"], false);
        assert_eq!(
            receipt["groups"][group]["epoch"].as_str().unwrap().len(),
            32
        );
    }
    let received = receive(&mut stream, 2).await;
    for (channel, envelope) in received {
        assert_eq!(receipt["id"], envelope.id.to_string());
        assert_eq!(envelope.event, event_text(&event));
        let group = receipt["groups"]
            .as_array()
            .unwrap()
            .iter()
            .find(|g| g["channel"] == channel.as_str())
            .unwrap();
        let position = envelope.position.unwrap();
        assert_eq!(group["epoch"], position.epoch);
        assert_eq!(group["seq"], position.seq);
    }

    // The same key again: acknowledged as a duplicate, delivered nowhere.
    let again = within(
        DEADLINE,
        "realtime-publish again",
        tokio::process::Command::new(env!("CARGO_BIN_EXE_realtime-publish"))
            .args(["--redis-url", &server.url(), "--idempotency-key"])
            .arg(event.unique_id())
            .arg(JOB_ASSIGNED)
            .kill_on_drop(true)
            .output(),
    )
    .await
    .unwrap();
    assert!(again.status.success(), "{again:?}");
    let again: serde_json::Value = serde_json::from_slice(&again.stdout).unwrap();
    for group in 0..2 {
        assert_eq!(again["groups"][group]["duplicate"], true);
        assert_eq!(again["groups"][group]["seq"], 1);
        assert_eq!(again["groups"][group]["subscribers"], 0);
    }
}

#[tokio::test]
async fn cli_rejects_an_invalid_event_with_exit_code_64() {
    let output = within(
        DEADLINE,
        "realtime-publish",
        tokio::process::Command::new(env!("CARGO_BIN_EXE_realtime-publish"))
            .args(["--redis-url", "redis://127.0.0.1:1", r#"{"type":"Nope"}"#])
            .kill_on_drop(true)
            .output(),
    )
    .await
    .unwrap();

    assert_eq!(output.status.code(), Some(64), "{output:?}");
    assert!(String::from_utf8_lossy(&output.stderr).contains("unknown event type"));
}
