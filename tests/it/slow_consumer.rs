//! A client that stops reading is cut off without holding back anyone else.

use std::time::Duration;

use e2e::{DEADLINE, WsClient, dispatcher, recommendation_ready, start_gateway, within};
use serde_json::{Value, json};
use tokio::sync::watch;

/// Padding per event, so the socket buffers between the gateway and a client that does not
/// read fill after a bounded number of events (the contract allows up to 2 KB per event).
const PADDING: usize = 1750;
/// The most events published before the test gives up waiting for the cut (about 10 MB).
const MAX_EVENTS: u64 = 6000;
/// How often the publisher looks at the metrics while publishing.
const CHECK_EVERY: u64 = 100;
/// Events published after the cut, which the reading client must still receive.
const AFTER_THE_CUT: u64 = 20;
/// How far the publisher may run ahead of the reading client, so that even with the rest of
/// the machine busy its queue of 4 never holds more than 4 frames (and it is never slow).
const IN_FLIGHT: u64 = 3;
const SLOW_CLOSES: &str = "gateway_slow_consumer_closes_total";

fn sequence_of(payload: &str) -> (u64, bool) {
    let event: Value = serde_json::from_str(payload).expect("the payload is JSON");
    let seq = event["seq"].as_u64().expect("a sequence number");
    (seq, event["last"] == true)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_that_stops_reading_is_closed_while_others_in_its_group_receive_every_event() {
    let gateway = start_gateway(&["--outbound-queue", "4", "--write-timeout", "2s"]).await;
    let slow_closes_before = gateway.metric(SLOW_CLOSES).await;

    let token = gateway.token(&dispatcher("slow-dispatcher", &["west"]));
    let mut slow = WsClient::connect_with_receive_buffer(&gateway.hub_url(&token), 4096).await;
    slow.handshake().await;
    slow.join_dispatch("1", "west").await;
    // From here on the slow client reads nothing until the publishing is over.

    let mut fast = gateway
        .connect(&dispatcher("fast-dispatcher", &["west"]))
        .await;
    fast.join_dispatch("1", "west").await;
    // The reader reports how many events it has; the publisher never runs more than
    // `IN_FLIGHT` events ahead of it, as a publisher no faster than a healthy client would.
    let (progress, mut fast_has) = watch::channel(0u64);
    let reader = tokio::spawn(async move {
        let mut received = Vec::new();
        loop {
            let (target, payload) = fast.next_event().await;
            assert_eq!(target, "RecommendationReady");
            let (seq, last) = sequence_of(&payload);
            received.push(seq);
            progress.send_replace(received.len() as u64);
            if last {
                return received;
            }
        }
    });

    let padding = json!("x".repeat(PADDING));
    let event = |seq: u64, last: bool| {
        recommendation_ready(
            "west",
            &[
                ("seq", json!(seq)),
                ("last", json!(last)),
                ("padding", padding.clone()),
            ],
        )
    };
    let mut published: u64 = 0;
    let mut cut_at = None;
    loop {
        let target = published.saturating_sub(IN_FLIGHT);
        within(
            DEADLINE,
            fast_has.wait_for(|has| *has >= target),
            "the reading client to keep up",
        )
        .await
        .expect("the reading client stopped");
        let last = cut_at.is_some_and(|at| published == at + AFTER_THE_CUT);
        gateway.publish_accepted(&event(published, last)).await;
        published += 1;
        if last {
            break;
        }
        if cut_at.is_none()
            && published.is_multiple_of(CHECK_EVERY)
            && gateway.metric(SLOW_CLOSES).await > slow_closes_before
        {
            cut_at = Some(published);
        }
        assert!(
            published < MAX_EVENTS,
            "no slow consumer was cut off after {published} events"
        );
    }

    let received = within(DEADLINE, reader, "the reading client to get every event")
        .await
        .expect("the reading client failed");
    assert_eq!(
        received,
        (0..published).collect::<Vec<_>>(),
        "the reading client got every event, in order"
    );

    // The slow client's socket ends; what it still finds buffered is a gap-free prefix.
    let closed = slow.expect_close_within(Duration::from_secs(30)).await;
    let mut seen = 0;
    for record in &closed.records {
        // Only whole WebSocket messages are delivered, so a write the gateway gave up on
        // half-way never shows up as a record.
        if record.starts_with("{\"type\":1,") {
            let (_, payload) = e2e::parse_event(record);
            assert_eq!(sequence_of(&payload).0, seen, "events arrive in order");
            seen += 1;
        }
    }
    assert!(
        seen < published,
        "the slow client was cut off before the end ({seen} of {published} events)"
    );
    if let Some(record) = &closed.close_record {
        assert_eq!(
            *record,
            json!({
                "type": 7,
                "error": "client could not keep up with its messages",
                "allowReconnect": true
            })
        );
    }
    assert!(gateway.metric(SLOW_CLOSES).await > slow_closes_before);
}
