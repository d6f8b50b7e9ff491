//! Hostile clients inside the protocol: what one client sends cannot make the gateway hold
//! more than its budget for it, nor change what another client of the same group receives.

use std::time::Duration;

use e2e::{
    DEADLINE, RS, TestGateway, WsClient, dispatcher, recommendation_ready, start_gateway, within,
};
use serde_json::{Value, json};
use tokio::sync::watch;

/// Padding per event, so each is close to the contract's 2 KB.
const PADDING: usize = 1750;
/// Events published before the hostile client joins: the whole history.
const HISTORY: u64 = 1000;
/// Re-joins from the start of the history in the hostile client's one message.
const REJOINS: usize = 240;
/// Events published after the hostile client is gone.
const AFTER: u64 = 20;
/// Most events published while waiting for the hostile client to be cut off (about 10 MB,
/// more than the socket buffers between it and the gateway hold).
const MAX_MORE: u64 = 5000;
/// How often the publisher looks at the metrics meanwhile.
const CHECK_EVERY: u64 = 50;
/// How far the publisher runs ahead of the reading client.
const IN_FLIGHT: u64 = 50;

fn joins(outcome: &str) -> String {
    format!("gateway_joins_total{{outcome=\"{outcome}\"}}")
}

const SLOW_CLOSES: &str = "gateway_connections_closed_total{reason=\"slow_consumer\"}";

/// Publishes event `n` to west (the last one says so), never more than `IN_FLIGHT` ahead of
/// the reader.
async fn publish(gateway: &TestGateway, n: u64, last: bool, reader_has: &mut watch::Receiver<u64>) {
    within(
        DEADLINE,
        reader_has.wait_for(|has| *has + IN_FLIGHT >= n),
        "the reading client to keep up",
    )
    .await
    .expect("the reading client stopped");
    let padding = json!("x".repeat(PADDING));
    let event = recommendation_ready(
        "west",
        &[("n", json!(n)), ("last", json!(last)), ("padding", padding)],
    );
    gateway.publish_accepted(&event).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_resuming_one_group_hundreds_of_times_in_one_message_is_bounded_and_closed_while_others_get_every_event()
 {
    let gateway = start_gateway(&[
        "--write-timeout",
        "2s",
        "--max-joins-per-second",
        "1000",
        "--max-invocations-per-second",
        "1000",
    ])
    .await;

    let mut reader = gateway.connect(&dispatcher("reader", &["west"])).await;
    let head = reader.join_dispatch("1", "west").await;
    let epoch = head["epoch"].as_str().expect("an epoch").to_owned();
    let (progress, mut reader_has) = watch::channel(0u64);
    let reading = tokio::spawn(async move {
        for expected in 0.. {
            let (_, payload, position) = reader.next_positioned_event().await;
            let event: Value = serde_json::from_str(&payload).expect("JSON payload");
            assert_eq!(event["n"], expected, "events arrive once and in order");
            assert_eq!(position["seq"], expected + 1);
            progress.send_replace(expected + 1);
            if event["last"] == true {
                return expected + 1;
            }
        }
        unreachable!("the loop ends at the last event")
    });
    for n in 0..HISTORY {
        publish(&gateway, n, false, &mut reader_has).await;
    }

    let recovered_before = gateway.metric(&joins("recovered")).await;
    let pending_before = gateway.metric(&joins("resume_pending")).await;
    let not_recovered_before = gateway.metric(&joins("not_recovered")).await;
    let slow_before = gateway.metric(SLOW_CLOSES).await;
    let token = gateway.token(&dispatcher("hostile", &["west"]));
    let mut hostile = WsClient::connect_with_receive_buffer(&gateway.hub_url(&token), 4096).await;
    hostile.handshake().await;
    let message: String = (0..REJOINS)
        .map(|id| {
            let join = json!({
                "type": 1,
                "invocationId": id.to_string(),
                "target": "JoinDispatchGroup",
                "arguments": ["west", {"epoch": epoch, "seq": 0}],
            });
            format!("{join}{RS}")
        })
        .collect();
    assert!(
        message.len() < 32 * 1024,
        "one message within the size limit"
    );
    hostile.send_text(&message).await;
    // Every join is answered before the group moves on (so the history still reaches back to
    // seq 0 for each of them); the hostile client reads none of the answers.
    let answered = async {
        loop {
            let mut total = 0.0;
            for outcome in ["recovered", "not_recovered", "resume_pending"] {
                total += gateway.metric(&joins(outcome)).await;
            }
            if total - recovered_before - pending_before - not_recovered_before >= REJOINS as f64 {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    within(DEADLINE, answered, "every join to be answered").await;
    // It reads nothing more; the group goes on until the gateway gives up on it.
    let mut published = HISTORY;
    loop {
        publish(&gateway, published, false, &mut reader_has).await;
        published += 1;
        if published.is_multiple_of(CHECK_EVERY) && gateway.metric(SLOW_CLOSES).await > slow_before
        {
            break;
        }
        assert!(
            published < HISTORY + MAX_MORE,
            "the hostile client was not cut off after {published} events"
        );
    }

    // One resume was read and queued; every other one was refused without reading the history.
    assert_eq!(
        gateway.metric(&joins("recovered")).await - recovered_before,
        1.0
    );
    assert_eq!(
        gateway.metric(&joins("resume_pending")).await - pending_before,
        (REJOINS - 1) as f64
    );
    let ended = hostile.expect_close_within(Duration::from_secs(30)).await;
    let refusal = ended
        .records
        .iter()
        .filter_map(|record| serde_json::from_str::<Value>(record).ok())
        .find(|message| message["type"] == 3 && message["invocationId"] == "1");
    if let Some(refusal) = refusal {
        assert_eq!(
            refusal["error"],
            "An unexpected error occurred invoking 'JoinDispatchGroup' on the server. HubException: a resume of this group is still being delivered; wait for its events before resuming again"
        );
    }
    if let Some(record) = &ended.close_record {
        assert_eq!(
            *record,
            json!({"type": 7, "error": "client could not keep up with its messages", "allowReconnect": true})
        );
    }

    for n in published..published + AFTER {
        publish(&gateway, n, n + 1 == published + AFTER, &mut reader_has).await;
    }
    let received = within(DEADLINE, reading, "the reading client to get every event")
        .await
        .expect("the reading client failed");
    assert_eq!(
        received,
        published + AFTER,
        "the reading client got every event"
    );
}
