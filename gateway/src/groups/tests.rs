//! Memberships, broker subscriptions and fan-out, with the test playing the broker.
//!
//! Time is paused, so "nothing arrived within a millisecond" means "nothing was sent": the clock
//! only moves when every task is idle.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use publisher_lib::contract::{EventKind, Group, Position};
use tokio::time::timeout;

use super::Admission;
use super::{ConnId, Groups};
use crate::broker::{
    self, BrokerError, Fanout, Publication, SubscriptionRequest, SubscriptionRequests,
};
use crate::outbound::{self, Closing, Delivery, Frame, Inbox, Outbound, Rejected};
use crate::shutdown::Shutdown;

const PAYLOAD: &str = r#"{"type":"JobAssigned","jobId":"7d9f4f3e-1c2b-4d5e-8f60-123456789abc","contractorId":"11111111-2222-4333-8444-555555555555","region":"west"}"#;

/// What the broker was asked, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Asked {
    Subscribe(&'static str, u64),
    Unsubscribe(&'static str, u64),
}

/// One replica's registry, with the test answering its subscription requests.
struct Replica {
    groups: Groups,
    requests: SubscriptionRequests,
    answer: Result<(), BrokerError>,
    asked: Vec<Asked>,
}

impl Replica {
    fn new() -> Self {
        let (subscriptions, requests) = broker::subscriptions(8);
        Self {
            groups: Groups::new(subscriptions),
            requests,
            answer: Ok(()),
            asked: Vec::new(),
        }
    }

    /// A replica whose broker refuses every subscription.
    fn unavailable() -> Self {
        Self {
            answer: Err(BrokerError::Unavailable("redis is down".to_owned())),
            ..Self::new()
        }
    }

    /// A member: a new connection id and its queue.
    fn connect(&self, capacity: usize) -> (ConnId, Outbound, Inbox) {
        let (outbound, inbox) = outbound::channel(capacity);
        (self.groups.next_conn_id(), outbound, inbox)
    }

    /// Joins, answering whatever the registry asks the broker meanwhile.
    async fn join(
        &mut self,
        conn: ConnId,
        group: &Group,
        outbound: &Outbound,
    ) -> Result<(), BrokerError> {
        self.join_as(conn, group, outbound, Admission::Live).await
    }

    /// A new member of `group` (joined live) with a queue of `capacity`.
    async fn member(&mut self, group: &Group, capacity: usize) -> (ConnId, Outbound, Inbox) {
        let (conn, outbound, inbox) = self.connect(capacity);
        self.join(conn, group, &outbound)
            .await
            .expect("the join succeeds");
        (conn, outbound, inbox)
    }

    /// Joins with `admission`, answering whatever the registry asks the broker meanwhile.
    async fn join_as(
        &mut self,
        conn: ConnId,
        group: &Group,
        outbound: &Outbound,
        admission: Admission,
    ) -> Result<(), BrokerError> {
        let Self {
            groups,
            requests,
            answer,
            asked,
        } = self;
        let join = groups.join(conn, group, outbound, admission);
        tokio::pin!(join);
        loop {
            tokio::select! {
                outcome = &mut join => return outcome,
                Some(request) = requests.recv() => respond(request, answer, asked),
            }
        }
    }

    /// A member joined held, with a queue of `capacity` live frames and `budget` in all.
    async fn join_held(&mut self, capacity: usize, budget: usize) -> (ConnId, Outbound, Inbox) {
        let (outbound, inbox) = outbound::channel_within(capacity, budget);
        let conn = self.groups.next_conn_id();
        self.join_as(conn, &west(), &outbound, Admission::Held)
            .await
            .unwrap();
        (conn, outbound, inbox)
    }

    /// Leaves, then collects what the broker was told.
    async fn leave(&mut self, conn: ConnId, group: &Group) {
        self.groups.leave(conn, group).await;
        self.settle().await;
    }

    /// Answers every request already sent.
    async fn settle(&mut self) {
        while let Ok(Some(request)) = timeout(Duration::from_millis(1), self.requests.recv()).await
        {
            respond(request, &self.answer, &mut self.asked);
        }
    }

    /// What the broker was asked since the last call.
    fn asked(&mut self) -> Vec<Asked> {
        std::mem::take(&mut self.asked)
    }

    fn publish(&self, group: &Group) {
        self.groups.fan_out(&publication(group));
    }
}

fn respond(request: SubscriptionRequest, answer: &Result<(), BrokerError>, asked: &mut Vec<Asked>) {
    match request {
        SubscriptionRequest::Subscribe {
            group,
            generation,
            ack,
        } => {
            asked.push(Asked::Subscribe(leak(group.name()), generation));
            let _ = ack.send(answer.clone());
        }
        SubscriptionRequest::Unsubscribe { group, generation } => {
            asked.push(Asked::Unsubscribe(leak(group.name()), generation));
        }
    }
}

/// Two members join one group while its first subscription is pending: the second waits for
/// it too, the broker answers `answer`, and both joins end with that answer. Returns the
/// registry and its request channel, for what the test checks next.
async fn two_members_join_on_one_subscribe(
    answer: Result<(), BrokerError>,
) -> (Groups, SubscriptionRequests) {
    let (subscriptions, mut requests) = broker::subscriptions(8);
    let groups = Groups::new(subscriptions);
    let (out_a, _inbox_a) = outbound::channel(8);
    let (out_b, _inbox_b) = outbound::channel(8);
    let (a, b) = (groups.next_conn_id(), groups.next_conn_id());
    let group = west();
    {
        let join_a = groups.join(a, &group, &out_a, Admission::Live);
        let join_b = groups.join(b, &group, &out_b, Admission::Live);
        tokio::pin!(join_a, join_b);
        let request = tokio::select! {
            request = requests.recv() => request.unwrap(),
            outcome = &mut join_a => panic!("first join ended early: {outcome:?}"),
        };
        assert!(
            timeout(Duration::from_secs(60), &mut join_b).await.is_err(),
            "the second join waits for the first one's subscription"
        );
        let SubscriptionRequest::Subscribe { ack, .. } = request else {
            panic!("expected a subscribe, got {request:?}");
        };
        ack.send(answer.clone()).unwrap();
        assert_eq!(tokio::join!(join_a, join_b), (answer.clone(), answer));
    }
    (groups, requests)
}

/// Group names in `Asked` are compared with literals; the few leaked bytes end with the test.
fn leak(name: &str) -> &'static str {
    Box::leak(name.to_owned().into_boxed_str())
}

fn west() -> Group {
    Group::try_dispatch("west").unwrap()
}

fn east() -> Group {
    Group::try_dispatch("east").unwrap()
}

/// A publication at `seq` in epoch `e1`, its payload naming the seq.
fn positioned(group: &Group, seq: u64) -> Publication {
    Publication {
        position: Some(Position {
            epoch: "e1".to_owned(),
            seq,
        }),
        payload: Bytes::from(format!("{{\"n\":{seq}}}")),
        ..publication(group)
    }
}

/// What a history read returns for a member that missed `seqs` of `/dispatch/west` (epoch
/// `e1`): the missed publications and the head, the last of them.
fn missed_through(seqs: std::ops::RangeInclusive<u64>) -> (Vec<Publication>, Position) {
    let head = Position {
        epoch: "e1".to_owned(),
        seq: *seqs.end(),
    };
    (seqs.map(|seq| positioned(&west(), seq)).collect(), head)
}

/// The seqs of the frames queued in `inbox`, read back from their payload.
fn seqs(inbox: &mut Inbox) -> Vec<u64> {
    let mut got = Vec::new();
    while let Some(frame) = inbox.try_recv() {
        let record = record_of(&frame.bytes());
        let message: serde_json::Value =
            serde_json::from_str(record.trim_end_matches('\u{1e}')).unwrap();
        assert_eq!(message["arguments"][0]["n"], message["arguments"][1]["seq"]);
        got.push(message["arguments"][1]["seq"].as_u64().unwrap());
    }
    got
}

#[tokio::test]
async fn a_held_member_gets_the_missed_events_then_the_live_ones_after_the_head_once() {
    let mut replica = Replica::new();
    let (conn, outbound, mut inbox) = replica.connect(64);
    replica
        .join_as(conn, &west(), &outbound, Admission::Held)
        .await
        .unwrap();
    // Live while the join reads the history: 4 and 5 are in the history it reads, 6 is not.
    for seq in [4, 5, 6] {
        replica.groups.fan_out(&positioned(&west(), seq));
    }
    assert_eq!(
        seqs(&mut inbox),
        Vec::<u64>::new(),
        "nothing before release"
    );
    let (missed, head) = missed_through(3..=5);
    replica.groups.release(conn, &west(), &missed, Some(&head));
    assert_eq!(seqs(&mut inbox), vec![3, 4, 5, 6]);
    // A late delivery of something the join already sent is not sent again; newer ones are.
    replica.groups.fan_out(&positioned(&west(), 6));
    replica.groups.fan_out(&positioned(&west(), 7));
    assert_eq!(seqs(&mut inbox), vec![7]);
}

#[tokio::test]
async fn a_resume_backlog_longer_than_the_queue_is_delivered_and_live_frames_get_the_usual_room() {
    let mut replica = Replica::new();
    let (conn, outbound, mut inbox) = replica.connect(2);
    replica
        .join_as(conn, &west(), &outbound, Admission::Held)
        .await
        .unwrap();
    let (missed, head) = missed_through(1..=10);
    replica.groups.release(conn, &west(), &missed, Some(&head));
    // Room for two live frames on top of the backlog; a third is an overflow.
    replica.groups.fan_out(&positioned(&west(), 11));
    replica.groups.fan_out(&positioned(&west(), 12));
    assert_eq!(seqs(&mut inbox), (1..=12).collect::<Vec<u64>>());
    for seq in 13..=15 {
        replica.groups.fan_out(&positioned(&west(), seq));
    }
    assert_eq!(
        outbound.try_push(&Frame::new(Bytes::new()), crate::outbound::WriteMode::Queue),
        Err(Rejected::Closed),
        "closed as a slow consumer"
    );
}

#[tokio::test]
async fn a_held_member_past_the_hold_limit_is_closed_once_and_its_release_sends_nothing() {
    let mut replica = Replica::new();
    let (conn, outbound, mut inbox) = replica.connect(8);
    replica
        .join_as(conn, &west(), &outbound, Admission::Held)
        .await
        .unwrap();
    for seq in 1..=(super::MAX_HELD_FRAMES as u64 + 5) {
        replica.groups.fan_out(&positioned(&west(), seq));
    }
    assert_eq!(
        outbound.try_push(&Frame::new(Bytes::new()), crate::outbound::WriteMode::Queue),
        Err(Rejected::Closed),
        "closed as a slow consumer"
    );
    let head = Position {
        epoch: "e1".to_owned(),
        seq: 0,
    };
    replica.groups.release(conn, &west(), &[], Some(&head));
    assert_eq!(seqs(&mut inbox), Vec::<u64>::new());
}

#[tokio::test]
async fn a_held_member_that_leaves_is_forgotten_and_a_release_for_it_does_nothing() {
    let mut replica = Replica::new();
    let (conn, outbound, mut inbox) = replica.connect(8);
    replica
        .join_as(conn, &west(), &outbound, Admission::Held)
        .await
        .unwrap();
    assert_eq!(replica.groups.member_count(&west()), 1);
    replica.leave(conn, &west()).await;
    assert_eq!(replica.groups.member_count(&west()), 0);
    let head = Position {
        epoch: "e1".to_owned(),
        seq: 0,
    };
    replica
        .groups
        .release(conn, &west(), &[positioned(&west(), 1)], Some(&head));
    assert_eq!(seqs(&mut inbox), Vec::<u64>::new());
}

fn publication(group: &Group) -> Publication {
    Publication {
        position: None,
        group: group.clone(),
        kind: EventKind::JobAssigned,
        payload: Bytes::from_static(PAYLOAD.as_bytes()),
        published_at: SystemTime::now(),
    }
}

/// The SignalR record inside a server WebSocket frame (unmasked, one text frame).
fn record_of(frame: &[u8]) -> String {
    assert_eq!(frame[0], 0x81, "a final text frame");
    let start = match frame[1] {
        126 => 4,
        127 => 10,
        _ => 2,
    };
    String::from_utf8(frame[start..].to_vec()).unwrap()
}

fn job_assigned_frame() -> String {
    format!("{{\"type\":1,\"target\":\"JobAssigned\",\"arguments\":[{PAYLOAD}]}}\u{1e}")
}

/// Takes every frame queued in `inbox` and compares their text with `expected`.
fn check(inbox: &mut Inbox, expected: &[&str]) {
    let mut got = Vec::new();
    while let Some(frame) = inbox.try_recv() {
        got.push(record_of(&frame.bytes()));
    }
    assert_eq!(got, expected);
}

#[tokio::test(start_paused = true)]
async fn the_first_member_subscribes_and_the_second_does_not() {
    let mut replica = Replica::new();
    let (a, out_a, _inbox_a) = replica.connect(8);
    let (b, out_b, _inbox_b) = replica.connect(8);

    replica.join(a, &west(), &out_a).await.unwrap();
    replica.settle().await;
    let asked = replica.asked();
    let [Asked::Subscribe("/dispatch/west", _)] = asked.as_slice() else {
        panic!("expected one subscribe of /dispatch/west, got {asked:?}");
    };

    replica.join(b, &west(), &out_b).await.unwrap();
    replica.settle().await;
    assert_eq!(replica.asked(), []);
    assert_eq!(replica.groups.member_count(&west()), 2);
    assert_eq!(replica.groups.group_count(), 1);
}

#[tokio::test(start_paused = true)]
async fn joining_twice_is_harmless() {
    let mut replica = Replica::new();
    let (a, out_a, mut inbox_a) = replica.member(&west(), 8).await;
    replica.join(a, &west(), &out_a).await.unwrap();
    replica.settle().await;

    assert_eq!(replica.asked().len(), 1);
    assert_eq!(replica.groups.member_count(&west()), 1);
    replica.publish(&west());
    check(&mut inbox_a, &[&job_assigned_frame()]);
}

#[tokio::test(start_paused = true)]
async fn a_join_completes_only_once_the_subscription_is_live() {
    let (subscriptions, mut requests) = broker::subscriptions(8);
    let groups = Groups::new(subscriptions);
    let (outbound, _inbox) = outbound::channel(8);
    let conn = groups.next_conn_id();

    let group = west();
    let join = groups.join(conn, &group, &outbound, Admission::Live);
    tokio::pin!(join);
    let request = tokio::select! {
        request = requests.recv() => request.unwrap(),
        outcome = &mut join => panic!("join ended before the broker answered: {outcome:?}"),
    };
    let SubscriptionRequest::Subscribe {
        group: asked, ack, ..
    } = request
    else {
        panic!("expected a subscribe, got {request:?}");
    };
    assert_eq!(asked, group);
    assert!(
        timeout(broker::SUBSCRIBE_TIMEOUT / 2, &mut join)
            .await
            .is_err(),
        "join completed without an acknowledgement"
    );

    ack.send(Ok(())).unwrap();
    assert_eq!(join.await, Ok(()));
    assert_eq!(groups.member_count(&west()), 1);
}

#[tokio::test(start_paused = true)]
async fn a_second_member_waits_for_the_pending_subscription_of_the_first() {
    let (groups, mut requests) = two_members_join_on_one_subscribe(Ok(())).await;
    assert!(
        timeout(Duration::from_millis(1), requests.recv())
            .await
            .is_err()
    );
    assert_eq!(groups.member_count(&west()), 2);
}

#[tokio::test(start_paused = true)]
async fn fan_out_delivers_one_shared_frame_to_each_member() {
    let mut replica = Replica::new();
    let (_a, _out_a, mut inbox_a) = replica.member(&west(), 8).await;
    let (_b, _out_b, mut inbox_b) = replica.member(&west(), 8).await;

    replica.publish(&west());

    let frame_a = inbox_a.try_recv().unwrap().bytes();
    let frame_b = inbox_b.try_recv().unwrap().bytes();
    let expected = ws_frame::server::text_frame(job_assigned_frame().as_bytes());
    assert_eq!(frame_a, expected);
    assert_eq!(frame_b, expected);
    assert_eq!(
        frame_a.as_ptr(),
        frame_b.as_ptr(),
        "the event was encoded once per member instead of once per publication"
    );
    check(&mut inbox_a, &[]);
    check(&mut inbox_b, &[]);
}

#[tokio::test(start_paused = true)]
async fn fan_out_reaches_only_the_members_of_the_addressed_group() {
    let mut replica = Replica::new();
    let (a, out_a, mut inbox_a) = replica.member(&west(), 8).await;
    let (_b, _out_b, mut inbox_b) = replica.member(&east(), 8).await;
    replica.join(a, &east(), &out_a).await.unwrap();

    replica.publish(&west());
    replica.publish(&Group::try_dispatch("north").unwrap());

    check(&mut inbox_a, &[&job_assigned_frame()]);
    check(&mut inbox_b, &[]);
}

#[tokio::test(start_paused = true)]
async fn the_last_member_out_unsubscribes_with_the_groups_generation() {
    let mut replica = Replica::new();
    let (a, _out_a, _inbox_a) = replica.member(&west(), 8).await;
    let (b, _out_b, mut inbox_b) = replica.member(&west(), 8).await;
    replica.settle().await;
    let asked = replica.asked();
    let [Asked::Subscribe("/dispatch/west", generation)] = asked.as_slice() else {
        panic!("expected one subscribe, got {asked:?}");
    };

    replica.leave(a, &west()).await;
    assert_eq!(replica.asked(), []);
    assert_eq!(replica.groups.member_count(&west()), 1);

    replica.leave(b, &west()).await;
    assert_eq!(
        replica.asked(),
        [Asked::Unsubscribe("/dispatch/west", *generation)]
    );
    assert_eq!(replica.groups.member_count(&west()), 0);
    assert_eq!(replica.groups.group_count(), 0);

    replica.publish(&west());
    check(&mut inbox_b, &[]);
}

#[tokio::test(start_paused = true)]
async fn a_group_joined_again_after_emptying_gets_a_newer_generation() {
    let mut replica = Replica::new();
    let (a, out_a, _inbox_a) = replica.member(&west(), 8).await;
    replica.leave(a, &west()).await;
    replica.join(a, &west(), &out_a).await.unwrap();
    replica.settle().await;

    let asked = replica.asked();
    let [
        Asked::Subscribe("/dispatch/west", first),
        Asked::Unsubscribe("/dispatch/west", left),
        Asked::Subscribe("/dispatch/west", second),
    ] = asked.as_slice()
    else {
        panic!("expected subscribe, unsubscribe, subscribe; got {asked:?}");
    };
    assert_eq!(left, first);
    assert!(second > first, "{asked:?}");
}

#[tokio::test(start_paused = true)]
async fn leaving_a_group_one_is_not_in_changes_nothing() {
    let mut replica = Replica::new();
    let (a, _out_a, mut inbox_a) = replica.member(&west(), 8).await;
    let (b, _out_b, _inbox_b) = replica.connect(8);
    replica.settle().await;
    replica.asked();

    replica.leave(b, &west()).await;
    replica.leave(a, &east()).await;

    assert_eq!(replica.asked(), []);
    assert_eq!(replica.groups.member_count(&west()), 1);
    replica.publish(&west());
    check(&mut inbox_a, &[&job_assigned_frame()]);
}

#[tokio::test(start_paused = true)]
async fn a_failed_subscribe_leaves_no_member_behind() {
    let mut replica = Replica::unavailable();
    let (a, out_a, mut inbox_a) = replica.connect(8);

    assert_eq!(
        replica.join(a, &west(), &out_a).await,
        Err(BrokerError::Unavailable("redis is down".to_owned()))
    );
    replica.settle().await;

    let asked = replica.asked();
    assert!(
        matches!(asked.as_slice(), [Asked::Subscribe("/dispatch/west", _)]),
        "a failed subscription must not be unsubscribed: {asked:?}"
    );
    assert_eq!(replica.groups.member_count(&west()), 0);
    assert_eq!(replica.groups.group_count(), 0);
    replica.publish(&west());
    check(&mut inbox_a, &[]);
}

#[tokio::test(start_paused = true)]
async fn members_waiting_on_a_failed_subscribe_all_fail() {
    let refusal = BrokerError::Unavailable("redis is down".to_owned());
    let (groups, _requests) = two_members_join_on_one_subscribe(Err(refusal)).await;
    assert_eq!(groups.member_count(&west()), 0);
    assert_eq!(groups.group_count(), 0);
}

#[tokio::test(start_paused = true)]
async fn a_stopped_broker_fails_the_join() {
    let (subscriptions, requests) = broker::subscriptions(8);
    let groups = Groups::new(subscriptions);
    drop(requests);
    let (outbound, _inbox) = outbound::channel(8);

    assert_eq!(
        groups
            .join(groups.next_conn_id(), &west(), &outbound, Admission::Live)
            .await,
        Err(BrokerError::Stopped)
    );
    assert_eq!(groups.group_count(), 0);
}

#[tokio::test(start_paused = true)]
async fn a_broker_that_never_confirms_fails_the_join_after_the_timeout() {
    let (subscriptions, _requests) = broker::subscriptions(8);
    let groups = Groups::new(subscriptions);
    let (outbound, _inbox) = outbound::channel(8);
    let started = tokio::time::Instant::now();

    let outcome = groups
        .join(groups.next_conn_id(), &west(), &outbound, Admission::Live)
        .await;

    assert_eq!(
        outcome,
        Err(BrokerError::Unavailable(
            "subscription not confirmed in time".to_owned()
        ))
    );
    assert_eq!(started.elapsed(), broker::SUBSCRIBE_TIMEOUT);
    assert_eq!(
        groups.group_count(),
        0,
        "a failed join leaves no member behind"
    );
}

#[tokio::test(start_paused = true)]
async fn a_full_queue_overflows_once_and_other_members_still_get_frames() {
    let mut replica = Replica::new();
    let (_slow, out_slow, mut inbox_slow) = replica.member(&west(), 1).await;
    let (_fast, _out_fast, mut inbox_fast) = replica.member(&west(), 8).await;
    replica.publish(&west());
    assert_eq!(inbox_slow.closing(), None, "a queue with room overflowed");
    replica.publish(&west());
    replica.publish(&west());

    assert_eq!(inbox_slow.closing(), Some(Closing::SlowConsumer));
    let frame = job_assigned_frame();
    // A closing connection gets no more frames, only the order to close.
    check(&mut inbox_slow, &[]);
    assert!(matches!(
        inbox_slow.recv().await,
        Delivery::Close(Closing::SlowConsumer)
    ));
    check(&mut inbox_fast, &[&frame, &frame, &frame]);
    // The overflow was marked by the fan-out already, so no later push counts it again.
    let probe = Frame::new(Bytes::from_static(b"{}\x1e"));
    assert_eq!(
        out_slow.try_push(&probe, crate::outbound::WriteMode::Queue),
        Err(Rejected::Closed)
    );
}

#[tokio::test(start_paused = true)]
async fn a_closed_connection_does_not_stop_the_others_getting_frames() {
    let mut replica = Replica::new();
    let (_gone, _out_gone, inbox_gone) = replica.member(&west(), 8).await;
    let (_here, _out_here, mut inbox_here) = replica.member(&west(), 8).await;
    drop(inbox_gone);

    replica.publish(&west());

    check(&mut inbox_here, &[&job_assigned_frame()]);
}

#[tokio::test(start_paused = true)]
async fn counts_follow_joins_and_leaves() {
    let mut replica = Replica::new();
    let contractor = Group::try_contractor("11111111-2222-4333-8444-555555555555").unwrap();
    let (a, out_a, _inbox_a) = replica.connect(8);
    let (b, out_b, _inbox_b) = replica.connect(8);
    assert_eq!(replica.groups.group_count(), 0);
    assert_eq!(replica.groups.member_count(&west()), 0);

    replica.join(a, &west(), &out_a).await.unwrap();
    replica.join(a, &east(), &out_a).await.unwrap();
    replica.join(b, &west(), &out_b).await.unwrap();
    replica.join(b, &contractor, &out_b).await.unwrap();
    let counts = |groups: &Groups| {
        (
            groups.group_count(),
            groups.member_count(&west()),
            groups.member_count(&east()),
            groups.member_count(&contractor),
        )
    };
    assert_eq!(counts(&replica.groups), (3, 2, 1, 1));

    replica.leave(a, &west()).await;
    replica.leave(a, &east()).await;
    assert_eq!(counts(&replica.groups), (2, 1, 0, 1));

    replica.leave(b, &west()).await;
    replica.leave(b, &contractor).await;
    assert_eq!(counts(&replica.groups), (0, 0, 0, 0));
}

#[tokio::test(start_paused = true)]
async fn connection_ids_are_unique() {
    let replica = Replica::new();
    let ids: Vec<ConnId> = (0..100).map(|_| replica.groups.next_conn_id()).collect();
    let mut unique = ids.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(unique.len(), ids.len());
}

#[tokio::test(start_paused = true)]
async fn the_memory_broker_delivers_a_publication_to_joined_members() {
    let shutdown = Shutdown::new();
    let (subscriptions, requests) = broker::subscriptions(8);
    let groups = Arc::new(Groups::new(subscriptions));
    let broker = broker::start_memory(
        groups.clone(),
        broker::HistorySettings::defaults(),
        requests,
        &shutdown,
    );
    let (outbound, mut inbox) = outbound::channel(8);
    let conn = groups.next_conn_id();

    groups
        .join(conn, &west(), &outbound, Admission::Live)
        .await
        .unwrap();
    let published = broker
        .publish(
            EventKind::JobAssigned,
            Bytes::from_static(PAYLOAD.as_bytes()),
            &[west(), east()],
            "key-1",
        )
        .await
        .unwrap();
    assert_eq!(published.len(), 2, "one position per group");
    assert!(
        published
            .iter()
            .all(|p| p.position.seq == 1 && !p.duplicate)
    );

    // The event untouched, then its position in the member's group.
    let epoch = &published[0].position.epoch;
    check(
        &mut inbox,
        &[&format!(
            "{{\"type\":1,\"target\":\"JobAssigned\",\"arguments\":[{PAYLOAD},{{\"epoch\":\"{epoch}\",\"group\":\"/dispatch/west\",\"seq\":1}}]}}\u{1e}"
        )],
    );

    // The same key again is acknowledged as a duplicate and not delivered.
    let again = broker
        .publish(
            EventKind::JobAssigned,
            Bytes::from_static(PAYLOAD.as_bytes()),
            &[west(), east()],
            "key-1",
        )
        .await
        .unwrap();
    assert!(again.iter().all(|p| p.duplicate && p.position.seq == 1));
    check(&mut inbox, &[]);
    groups.leave(conn, &west()).await;
    shutdown.stop_background(Duration::from_secs(1)).await;
}

#[tokio::test]
async fn a_resume_that_does_not_fit_the_budget_is_dropped_and_only_the_live_frames_are_queued() {
    let mut replica = Replica::new();
    // A queue of 2 live frames and a budget of 6 frames in all.
    let (conn, _outbound, mut inbox) = replica.join_held(2, 6).await;
    replica.groups.fan_out(&positioned(&west(), 11));
    let (missed, head) = missed_through(1..=10);
    assert_eq!(
        replica.groups.release(conn, &west(), &missed, Some(&head)),
        None,
        "ten missed frames do not fit a budget of six"
    );
    assert_eq!(seqs(&mut inbox), vec![11], "the live frame still goes out");
}

#[tokio::test]
async fn a_resume_that_fits_says_when_it_has_all_been_taken() {
    let mut replica = Replica::new();
    let (conn, outbound, mut inbox) = replica.join_held(2, 6).await;
    let (missed, head) = missed_through(1..=4);
    let through = replica.groups.release(conn, &west(), &missed, Some(&head));
    assert_eq!(through, Some(4));
    assert_eq!(outbound.taken(), 0);
    assert_eq!(seqs(&mut inbox), vec![1, 2, 3, 4]);
    assert_eq!(outbound.taken(), 4, "the resume is all written");
}

#[tokio::test]
async fn frames_held_during_a_join_count_against_the_budget() {
    let mut replica = Replica::new();
    let (outbound, _inbox) = outbound::channel_within(2, 6);
    let conn = replica.groups.next_conn_id();
    replica
        .join_as(conn, &west(), &outbound, Admission::Held)
        .await
        .unwrap();
    for seq in 1..=6 {
        replica.groups.fan_out(&positioned(&west(), seq));
    }
    assert!(
        outbound
            .try_push(&Frame::new(Bytes::new()), crate::outbound::WriteMode::Queue)
            .is_ok(),
        "six held frames fit"
    );
    replica.groups.fan_out(&positioned(&west(), 7));
    assert_eq!(
        outbound.try_push(&Frame::new(Bytes::new()), crate::outbound::WriteMode::Queue),
        Err(Rejected::Closed),
        "the seventh (with one frame queued) closed it as a slow consumer"
    );
}

#[tokio::test(start_paused = true)]
async fn the_membership_count_follows_joins_repeats_releases_and_leaves() {
    let mut replica = Replica::new();
    let (a, out_a, _inbox_a) = replica.member(&west(), 8).await;
    let (b, out_b, _inbox_b) = replica.connect(8);
    replica.join(a, &west(), &out_a).await.unwrap();
    replica.join(a, &east(), &out_a).await.unwrap();
    replica
        .join_as(b, &west(), &out_b, Admission::Held)
        .await
        .unwrap();
    replica
        .join_as(b, &west(), &out_b, Admission::Held)
        .await
        .unwrap();
    assert_eq!(replica.groups.membership_count(), 3);

    let head = Position {
        epoch: "e1".to_owned(),
        seq: 0,
    };
    replica.groups.release(b, &west(), &[], Some(&head));
    assert_eq!(replica.groups.membership_count(), 3);

    replica.leave(b, &east()).await;
    assert_eq!(replica.groups.membership_count(), 3);
    replica.leave(a, &west()).await;
    replica.leave(a, &west()).await;
    assert_eq!(replica.groups.membership_count(), 2);
    replica.groups.leave_now(b, &west());
    replica.leave(a, &east()).await;
    assert_eq!(replica.groups.membership_count(), 0);
    assert_eq!(replica.groups.group_count(), 0);
}

#[tokio::test(start_paused = true)]
async fn a_failed_subscribe_is_not_counted_as_a_membership() {
    let mut replica = Replica::unavailable();
    let (a, out_a, _inbox_a) = replica.connect(8);
    assert!(matches!(
        replica.join(a, &west(), &out_a).await,
        Err(BrokerError::Unavailable(_))
    ));
    assert_eq!(replica.groups.membership_count(), 0);
}

/// [`Groups::join_resuming`] over the memory broker, with joins, publishes, repeated keys and
/// reconnects interleaved in any order: the client gets each event once and in order.
mod resume_properties {
    use proptest::prelude::*;
    use tokio::task::JoinHandle;

    use super::*;
    use crate::broker::Broker;
    use crate::groups::Resumed;

    #[derive(Debug, Clone)]
    enum Step {
        /// A new event (a new idempotency key).
        Publish,
        /// The last event again, with its key: a publisher's retry.
        Republish,
        /// Lets the join task (and the broker's task) run a little.
        Yield,
        /// The broker confirms the subscriptions asked for: a join that waited on one reads
        /// the history next. Until then the member is held.
        Confirm,
        /// The client drops and joins again with the last position it saw.
        Reconnect,
    }

    fn step() -> impl Strategy<Value = Step> {
        prop_oneof![
            4 => Just(Step::Publish),
            1 => Just(Step::Republish),
            3 => Just(Step::Yield),
            1 => Just(Step::Confirm),
            1 => Just(Step::Reconnect),
        ]
    }

    /// The position of each event frame queued in `inbox`, in order.
    fn received(inbox: &mut Inbox) -> Vec<Position> {
        let mut got = Vec::new();
        while let Some(frame) = inbox.try_recv() {
            let record = record_of(&frame.bytes());
            let message: serde_json::Value =
                serde_json::from_str(record.trim_end_matches('\u{1e}')).unwrap();
            let position = &message["arguments"][1];
            got.push(Position {
                epoch: position["epoch"].as_str().unwrap().to_owned(),
                seq: position["seq"].as_u64().unwrap(),
            });
        }
        got
    }

    fn spawn_join(
        groups: &Arc<Groups>,
        broker: &Broker,
        conn: ConnId,
        outbound: &Outbound,
        after: Option<Position>,
    ) -> JoinHandle<Result<Resumed, BrokerError>> {
        let (groups, broker, outbound) = (groups.clone(), broker.clone(), outbound.clone());
        tokio::spawn(async move {
            groups
                .join_resuming(conn, &west(), &outbound, after.as_ref(), &broker)
                .await
        })
    }

    async fn publish(broker: &Broker, key: u64) {
        broker
            .publish(
                EventKind::JobAssigned,
                Bytes::from_static(b"{}"),
                &[west()],
                &format!("key-{key}"),
            )
            .await
            .unwrap();
    }

    /// Confirms every subscription asked for so far.
    fn confirm(requests: &mut SubscriptionRequests) {
        while let Some(request) = requests.try_recv() {
            if let SubscriptionRequest::Subscribe { ack, .. } = request {
                let _ = ack.send(Ok(()));
            }
        }
    }

    /// Waits for a join, confirming its subscription.
    async fn finish(
        join: JoinHandle<Result<Resumed, BrokerError>>,
        requests: &mut SubscriptionRequests,
    ) -> Resumed {
        while !join.is_finished() {
            confirm(requests);
            tokio::task::yield_now().await;
        }
        join.await.unwrap().unwrap()
    }

    async fn run(steps: Vec<Step>) {
        let shutdown = Shutdown::new();
        // The test confirms subscriptions (so a join can be held while events arrive); the
        // memory broker keeps the history and delivers.
        let (subscriptions, mut requests) = broker::subscriptions(64);
        let (_idle, idle_requests) = broker::subscriptions(8);
        let groups = Arc::new(Groups::new(subscriptions));
        let broker = broker::start_memory(
            groups.clone(),
            broker::HistorySettings::defaults(),
            idle_requests,
            &shutdown,
        );
        let (outbound, mut inbox) = outbound::channel_within(64, 64 + 1000);
        let conn = groups.next_conn_id();
        let mut seen: Vec<Position> = Vec::new();
        let mut join = spawn_join(&groups, &broker, conn, &outbound, None);
        let mut resumed_with_position = false;
        let mut keys = 0;
        for step in steps {
            match step {
                Step::Publish => {
                    keys += 1;
                    publish(&broker, keys).await;
                }
                Step::Republish if keys > 0 => publish(&broker, keys).await,
                Step::Republish | Step::Yield => tokio::task::yield_now().await,
                Step::Confirm => confirm(&mut requests),
                Step::Reconnect => {
                    let resumed = finish(join, &mut requests).await;
                    if resumed_with_position {
                        assert_eq!(resumed.recovered, Some(true), "the history reaches back");
                    }
                    seen.extend(received(&mut inbox));
                    groups.leave(conn, &west()).await;
                    resumed_with_position = !seen.is_empty();
                    join = spawn_join(&groups, &broker, conn, &outbound, seen.last().cloned());
                }
            }
            seen.extend(received(&mut inbox));
        }
        finish(join, &mut requests).await;
        seen.extend(received(&mut inbox));

        let seqs: Vec<u64> = seen.iter().map(|p| p.seq).collect();
        assert!(
            seqs.windows(2).all(|w| w[1] == w[0] + 1),
            "each event once and in order: {seqs:?}"
        );
        let head = broker.read_history(&west(), None).await.unwrap().head;
        if let Some(last) = seen.last() {
            assert_eq!(last, &head, "a client that saw events ends at the head");
        }
        shutdown.stop_background(Duration::from_secs(1)).await;
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

        #[test]
        fn a_resuming_client_gets_each_event_once_and_in_order(
            steps in proptest::collection::vec(step(), 0..80),
        ) {
            tokio::runtime::Builder::new_current_thread()
                .enable_time()
                .build()
                .unwrap()
                .block_on(run(steps));
        }
    }
}
