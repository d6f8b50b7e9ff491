//! Hub invocations answered the way an ASP.NET Core hub answers them; the connection stays
//! usable after every error.

use e2e::{
    TestGateway, WsClient, contractor, gateway_with_dispatcher, joined, recommendation_ready,
};
use serde_json::json;

/// After an error, the same connection still joins and receives an event.
async fn assert_still_usable(gateway: &TestGateway, client: &mut WsClient) {
    client.join_dispatch("after", "west").await;
    gateway.publish_and_expect(client, "west").await;
}

/// The error text ASP.NET Core sends when arguments do not bind to `method`.
fn invalid_data(method: &str, detail: &str) -> String {
    format!(
        "Failed to invoke '{method}' due to an error on the server. InvalidDataException: {detail}"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_method_completes_with_method_does_not_exist() {
    let (gateway, mut client) = gateway_with_dispatcher(&[], &["west"]).await;
    let completion = client.invoke("1", "SendMessage", json!(["hello"])).await;
    assert_eq!(
        completion,
        json!({
            "type": 3,
            "invocationId": "1",
            "error": "Failed to invoke 'SendMessage' due to an error on the server. HubException: Method does not exist."
        })
    );
    assert_still_usable(&gateway, &mut client).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn method_names_match_regardless_of_case() {
    let (gateway, mut client) = gateway_with_dispatcher(&[], &["west"]).await;
    let completion = client
        .invoke("1", "joindispatchgroup", json!(["west"]))
        .await;
    joined(&completion, "/dispatch/west");
    gateway.publish_and_expect(&mut client, "west").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_argument_count_completes_with_an_error() {
    let (gateway, mut client) = gateway_with_dispatcher(&[], &["west"]).await;
    let cases = [
        (
            "JoinDispatchGroup",
            json!(["west", {"seq": 1}, "east"]),
            "Invocation provides 3 argument(s) but target expects 1 or 2.",
        ),
        (
            "JoinDispatchGroup",
            json!([]),
            "Invocation provides 0 argument(s) but target expects 1 or 2.",
        ),
        (
            "LeaveDispatchGroup",
            json!(["west", "east"]),
            "Invocation provides 2 argument(s) but target expects 1.",
        ),
        // A second argument to a join must be a position.
        (
            "JoinDispatchGroup",
            json!(["west", "east"]),
            "Error binding arguments. The position must be null or {\"epoch\": string, \"seq\": integer}.",
        ),
    ];
    for (n, (method, arguments, detail)) in cases.into_iter().enumerate() {
        let error = client.invoke_error(&n.to_string(), method, arguments).await;
        assert_eq!(error, invalid_data(method, detail));
    }
    assert_still_usable(&gateway, &mut client).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn argument_of_the_wrong_type_completes_with_an_error() {
    let (gateway, mut client) = gateway_with_dispatcher(&[], &["west"]).await;
    let error = client
        .invoke_error("1", "JoinDispatchGroup", json!([42]))
        .await;
    assert_eq!(
        error,
        invalid_data(
            "JoinDispatchGroup",
            "Error binding arguments. The argument must be a string."
        )
    );
    assert_still_usable(&gateway, &mut client).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn region_missing_from_the_token_is_refused_and_the_connection_stays_usable() {
    let (gateway, mut client) = gateway_with_dispatcher(&[], &["west"]).await;
    let error = client
        .invoke_error("1", "JoinDispatchGroup", json!(["east"]))
        .await;
    assert_eq!(
        error,
        "An unexpected error occurred invoking 'JoinDispatchGroup' on the server. HubException: region 'east' is not in your token"
    );
    // Nothing published to the refused region reaches the client: the next event it receives
    // is the west one `assert_still_usable` publishes.
    gateway
        .publish_accepted(&recommendation_ready("east", &[]))
        .await;
    assert_still_usable(&gateway, &mut client).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn non_blocking_join_sends_nothing_back_but_joins() {
    let (gateway, mut client) = gateway_with_dispatcher(&[], &["west"]).await;
    client
        .send_records(&[r#"{"type":1,"target":"JoinDispatchGroup","arguments":["west"]}"#])
        .await;
    // Records are handled in order: once this call completes, the join before it is done.
    // Its Completion being the next record proves the join sent nothing back.
    let barrier = client
        .invoke_error("barrier", "NoSuchMethod", json!([]))
        .await;
    assert_eq!(
        barrier,
        "Failed to invoke 'NoSuchMethod' due to an error on the server. HubException: Method does not exist."
    );
    gateway.publish_and_expect(&mut client, "west").await;
}

/// A dispatcher sends `record`; it completes as invocation `id` with `error`, and the
/// connection stays usable.
async fn check_refused_record(record: &str, id: &str, error: &str) {
    let (gateway, mut client) = gateway_with_dispatcher(&[], &["west"]).await;
    client.send_records(&[record]).await;
    let completion = client.next_message().await;
    assert_eq!(
        completion,
        json!({"type": 3, "invocationId": id, "error": error})
    );
    assert_still_usable(&gateway, &mut client).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_invocation_completes_with_an_error() {
    check_refused_record(
        r#"{"type":4,"invocationId":"s1","target":"JoinDispatchGroup","arguments":["west"]}"#,
        "s1",
        "The client attempted to invoke the non-streaming 'JoinDispatchGroup' method with a streaming invocation.",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invocation_with_client_streams_completes_with_an_error() {
    check_refused_record(
        r#"{"type":1,"invocationId":"1","target":"JoinDispatchGroup","arguments":["west"],"streamIds":["0"]}"#,
        "1",
        "Client sent 1 stream(s), Hub method expects 0.",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_the_hub_has_no_use_for_are_ignored() {
    let (gateway, mut client) = gateway_with_dispatcher(&[], &["west"]).await;
    // Ping, CancelInvocation, a Completion and a StreamItem for unknown ids, Ack and Sequence;
    // the official client's key order puts `type` last.
    client
        .send_records(&[
            r#"{"type":6}"#,
            r#"{"type":5,"invocationId":"9"}"#,
            r#"{"type":3,"invocationId":"9","result":1}"#,
            r#"{"type":2,"invocationId":"9","item":1}"#,
            r#"{"type":8,"sequenceId":1}"#,
            r#"{"type":9,"sequenceId":1}"#,
            r#"{"target":"JoinDispatchGroup","arguments":["west"],"invocationId":"1","type":1}"#,
        ])
        .await;
    let completion = client.next_message().await;
    assert_eq!(completion["invocationId"], "1");
    joined(&completion, "/dispatch/west");
    assert_still_usable(&gateway, &mut client).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leaving_a_group_stops_its_events() {
    let (gateway, mut client) = gateway_with_dispatcher(&[], &["west", "east"]).await;
    client.join_dispatch("1", "west").await;
    client.join_dispatch("2", "east").await;
    let completion = client
        .invoke("3", "LeaveDispatchGroup", json!(["west"]))
        .await;
    assert_eq!(completion, json!({"type": 3, "invocationId": "3"}));
    gateway
        .publish_accepted(&recommendation_ready("west", &[]))
        .await;
    // Publications are delivered in order, so the west event would have come first.
    gateway.publish_and_expect(&mut client, "east").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn contractor_cannot_join_another_contractors_group() {
    let gateway = e2e::start_gateway(&[]).await;
    let own = "5f0c7a0e-3a4b-4c5d-8e6f-0a1b2c3d4e5f";
    let other = "6f0c7a0e-3a4b-4c5d-8e6f-0a1b2c3d4e5f";
    let mut client = gateway.connect(&contractor("contractor-1", own)).await;
    let error = client
        .invoke_error("1", "JoinContractorGroup", json!([other]))
        .await;
    assert_eq!(
        error,
        "An unexpected error occurred invoking 'JoinContractorGroup' on the server. HubException: you may join only your own contractor group"
    );
    let completion = client
        .invoke("2", "JoinContractorGroup", json!([own]))
        .await;
    joined(&completion, &format!("/contractor/{own}"));
}
