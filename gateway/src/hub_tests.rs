//! Hub invocations, written as the raw records a client sends.

use publisher_lib::contract::{Group, InvalidGroup, Position};

use super::{HubAction, HubError, Method, Outcome, handle};
use crate::auth::policy::JoinRefused;
use crate::auth::{Principal, Role};
use crate::protocol::Message;
use crate::protocol::codec::decode;

const CONTRACTOR_ID: &str = "11111111-2222-4333-8444-555555555555";

fn dispatcher() -> Principal {
    Principal {
        subject: "dispatcher-1".to_owned(),
        role: Role::Dispatcher {
            regions: vec!["west".to_owned(), "east".to_owned()],
        },
        valid_until: u64::MAX,
    }
}

fn contractor() -> Principal {
    Principal {
        subject: "contractor-1".to_owned(),
        role: Role::Contractor {
            group: Group::try_contractor(CONTRACTOR_ID).unwrap(),
        },
        valid_until: u64::MAX,
    }
}

/// Decodes `record`, hands it to the hub as `principal`, and compares the action.
fn check(principal: &Principal, record: &str, expected: HubAction) {
    let Ok(Message::Invocation(invocation)) = decode(record) else {
        panic!("{record} is not an invocation");
    };
    assert_eq!(handle(principal, &invocation), expected, "for {record}");
}

fn completed(id: &str, outcome: Outcome) -> HubAction {
    HubAction {
        invocation_id: Some(id.to_owned()),
        outcome,
    }
}

/// A join without a position, completed.
fn joined(id: &str, group: Group) -> HubAction {
    completed(id, Outcome::Join { group, after: None })
}

fn dispatch(region: &str) -> Group {
    Group::try_dispatch(region).unwrap()
}

fn own_group() -> Group {
    Group::try_contractor(CONTRACTOR_ID).unwrap()
}

fn error(id: &str, error: HubError) -> HubAction {
    completed(id, Outcome::Error(error))
}

#[test]
fn a_dispatcher_joins_and_leaves_a_region_in_its_token() {
    check(
        &dispatcher(),
        r#"{"type":1,"invocationId":"1","target":"JoinDispatchGroup","arguments":["west"]}"#,
        joined("1", dispatch("west")),
    );
    check(
        &dispatcher(),
        r#"{"type":1,"invocationId":"2","target":"LeaveDispatchGroup","arguments":["west"]}"#,
        completed("2", Outcome::Leave(dispatch("west"))),
    );
}

/// Joins and leaves the contractor's own group, naming it by `contractor_id`.
fn check_join_and_leave_own_group(contractor_id: &str) {
    check(
        &contractor(),
        &format!(
            r#"{{"type":1,"invocationId":"1","target":"JoinContractorGroup","arguments":["{contractor_id}"]}}"#
        ),
        joined("1", own_group()),
    );
    check(
        &contractor(),
        &format!(
            r#"{{"target":"LeaveContractorGroup","arguments":["{contractor_id}"],"invocationId":"2","type":1}}"#
        ),
        completed("2", Outcome::Leave(own_group())),
    );
}

#[test]
fn a_contractor_joins_and_leaves_its_own_group() {
    check_join_and_leave_own_group(CONTRACTOR_ID);
}

#[test]
fn a_contractor_id_in_upper_case_names_the_same_group() {
    check_join_and_leave_own_group(&CONTRACTOR_ID.to_uppercase());
}

#[test]
fn method_names_match_in_any_case() {
    for target in [
        "joindispatchgroup",
        "JOINDISPATCHGROUP",
        "joinDispatchGroup",
    ] {
        check(
            &dispatcher(),
            &format!(r#"{{"type":1,"invocationId":"1","target":"{target}","arguments":["east"]}}"#),
            joined("1", dispatch("east")),
        );
    }
    check(
        &contractor(),
        &format!(
            r#"{{"type":1,"invocationId":"1","target":"leavecontractorgroup","arguments":["{CONTRACTOR_ID}"]}}"#
        ),
        completed("1", Outcome::Leave(own_group())),
    );
}

#[test]
fn a_non_blocking_invocation_keeps_no_invocation_id() {
    check(
        &dispatcher(),
        r#"{"type":1,"target":"JoinDispatchGroup","arguments":["west"]}"#,
        HubAction {
            invocation_id: None,
            outcome: Outcome::Join {
                group: dispatch("west"),
                after: None,
            },
        },
    );
    check(
        &dispatcher(),
        r#"{"type":1,"target":"JoinDispatchGroup","arguments":["north"]}"#,
        HubAction {
            invocation_id: None,
            outcome: Outcome::Error(HubError::Refused {
                method: "JoinDispatchGroup",
                reason: JoinRefused::RegionNotAllowed("north".to_owned()),
            }),
        },
    );
}

#[test]
fn an_unknown_method_is_refused_by_the_name_the_client_used() {
    check(
        &dispatcher(),
        r#"{"type":1,"invocationId":"5","target":"Echo","arguments":["hi"]}"#,
        error("5", HubError::UnknownMethod("Echo".to_owned())),
    );
    check(
        &dispatcher(),
        r#"{"type":1,"invocationId":"6","target":"JoinDispatchGroups","arguments":["west"]}"#,
        error(
            "6",
            HubError::UnknownMethod("JoinDispatchGroups".to_owned()),
        ),
    );
}

#[test]
fn a_wrong_argument_count_is_refused_with_the_canonical_method_name() {
    check(
        &dispatcher(),
        r#"{"type":1,"invocationId":"1","target":"joindispatchgroup","arguments":[]}"#,
        error(
            "1",
            HubError::ArgumentCount {
                method: "JoinDispatchGroup",
                got: 0,
                expected: "1 or 2",
            },
        ),
    );
    check(
        &dispatcher(),
        r#"{"type":1,"invocationId":"2","target":"LeaveDispatchGroup","arguments":["west","east"]}"#,
        error(
            "2",
            HubError::ArgumentCount {
                method: "LeaveDispatchGroup",
                got: 2,
                expected: "1",
            },
        ),
    );
}

#[test]
fn a_join_takes_an_optional_position_to_resume_from() {
    let after = Position {
        epoch: "0123456789abcdef0123456789abcdef".to_owned(),
        seq: 41,
    };
    check(
        &dispatcher(),
        r#"{"type":1,"invocationId":"1","target":"JoinDispatchGroup","arguments":["west",{"group":"/dispatch/west","epoch":"0123456789abcdef0123456789abcdef","seq":41}]}"#,
        completed(
            "1",
            Outcome::Join {
                group: dispatch("west"),
                after: Some(after),
            },
        ),
    );
    check(
        &dispatcher(),
        r#"{"type":1,"invocationId":"2","target":"JoinDispatchGroup","arguments":["west",null]}"#,
        joined("2", dispatch("west")),
    );
    check(
        &dispatcher(),
        r#"{"type":1,"invocationId":"3","target":"JoinDispatchGroup","arguments":["west",{"seq":"x"}]}"#,
        error("3", HubError::PositionType("JoinDispatchGroup")),
    );
}

#[test]
fn an_argument_that_is_not_a_string_is_refused() {
    for argument in ["7", "null", "true", r#"["west"]"#, r#"{"region":"west"}"#] {
        check(
            &contractor(),
            &format!(
                r#"{{"type":1,"invocationId":"1","target":"JoinContractorGroup","arguments":[{argument}]}}"#
            ),
            error("1", HubError::ArgumentType("JoinContractorGroup")),
        );
    }
}

#[test]
fn a_streaming_invocation_is_refused() {
    check(
        &dispatcher(),
        r#"{"type":4,"invocationId":"1","target":"JoinDispatchGroup","arguments":["west"]}"#,
        error("1", HubError::NotStreaming("JoinDispatchGroup")),
    );
}

#[test]
fn client_streams_are_refused() {
    check(
        &dispatcher(),
        r#"{"type":1,"invocationId":"1","target":"JoinDispatchGroup","arguments":[],"streamIds":["0","1"]}"#,
        error("1", HubError::UnexpectedStreams { got: 2 }),
    );
}

#[test]
fn an_unknown_method_is_reported_before_any_other_problem() {
    check(
        &dispatcher(),
        r#"{"type":4,"invocationId":"1","target":"Stream","arguments":[1,2],"streamIds":["0"]}"#,
        error("1", HubError::UnknownMethod("Stream".to_owned())),
    );
}

#[test]
fn joins_the_rules_forbid_are_refused_with_the_reason() {
    check(
        &dispatcher(),
        r#"{"type":1,"invocationId":"1","target":"JoinDispatchGroup","arguments":["north"]}"#,
        error(
            "1",
            HubError::Refused {
                method: "JoinDispatchGroup",
                reason: JoinRefused::RegionNotAllowed("north".to_owned()),
            },
        ),
    );
    check(
        &contractor(),
        r#"{"type":1,"invocationId":"2","target":"JoinContractorGroup","arguments":["22222222-2222-4333-8444-555555555555"]}"#,
        error(
            "2",
            HubError::Refused {
                method: "JoinContractorGroup",
                reason: JoinRefused::NotYourGroup,
            },
        ),
    );
    check(
        &dispatcher(),
        &format!(
            r#"{{"type":1,"invocationId":"3","target":"JoinContractorGroup","arguments":["{CONTRACTOR_ID}"]}}"#
        ),
        error(
            "3",
            HubError::Refused {
                method: "JoinContractorGroup",
                reason: JoinRefused::WrongRole {
                    role: "dispatcher",
                    family: "contractor",
                },
            },
        ),
    );
    check(
        &contractor(),
        r#"{"type":1,"invocationId":"4","target":"JoinDispatchGroup","arguments":["west"]}"#,
        error(
            "4",
            HubError::Refused {
                method: "JoinDispatchGroup",
                reason: JoinRefused::WrongRole {
                    role: "contractor",
                    family: "dispatch",
                },
            },
        ),
    );
}

#[test]
fn leaving_needs_only_a_valid_group_name() {
    // Leaving a group the connection is not in changes nothing, so no permission is checked.
    check(
        &contractor(),
        r#"{"type":1,"invocationId":"1","target":"LeaveDispatchGroup","arguments":["north"]}"#,
        completed("1", Outcome::Leave(dispatch("north"))),
    );
    check(
        &dispatcher(),
        r#"{"type":1,"invocationId":"2","target":"LeaveDispatchGroup","arguments":["no/rth"]}"#,
        error(
            "2",
            HubError::Refused {
                method: "LeaveDispatchGroup",
                reason: JoinRefused::InvalidName {
                    what: "region",
                    reason: InvalidGroup::BadCharacter,
                },
            },
        ),
    );
    check(
        &contractor(),
        r#"{"type":1,"invocationId":"3","target":"LeaveContractorGroup","arguments":[""]}"#,
        error(
            "3",
            HubError::Refused {
                method: "LeaveContractorGroup",
                reason: JoinRefused::InvalidName {
                    what: "contractor id",
                    reason: InvalidGroup::Empty,
                },
            },
        ),
    );
}

#[test]
fn refusal_messages_are_worded_as_aspnet_words_them() {
    let cases = [
        (
            HubError::UnknownMethod("Echo".to_owned()),
            "Failed to invoke 'Echo' due to an error on the server. HubException: Method does not exist.",
            "unknown_method",
        ),
        (
            HubError::ArgumentCount {
                method: "JoinDispatchGroup",
                got: 3,
                expected: "1 or 2",
            },
            "Failed to invoke 'JoinDispatchGroup' due to an error on the server. InvalidDataException: Invocation provides 3 argument(s) but target expects 1 or 2.",
            "bad_arguments",
        ),
        (
            HubError::ArgumentType("JoinDispatchGroup"),
            "Failed to invoke 'JoinDispatchGroup' due to an error on the server. InvalidDataException: Error binding arguments. The argument must be a string.",
            "bad_arguments",
        ),
        (
            HubError::NotStreaming("JoinDispatchGroup"),
            "The client attempted to invoke the non-streaming 'JoinDispatchGroup' method with a streaming invocation.",
            "streaming",
        ),
        (
            HubError::UnexpectedStreams { got: 1 },
            "Client sent 1 stream(s), Hub method expects 0.",
            "streaming",
        ),
        (
            HubError::Refused {
                method: "JoinDispatchGroup",
                reason: JoinRefused::RegionNotAllowed("north".to_owned()),
            },
            "An unexpected error occurred invoking 'JoinDispatchGroup' on the server. HubException: region 'north' is not in your token",
            "region_not_allowed",
        ),
        (
            HubError::Refused {
                method: "JoinContractorGroup",
                reason: JoinRefused::NotYourGroup,
            },
            "An unexpected error occurred invoking 'JoinContractorGroup' on the server. HubException: you may join only your own contractor group",
            "not_your_group",
        ),
    ];
    for (error, message, label) in cases {
        assert_eq!(
            (error.to_string().as_str(), error.label()),
            (message, label),
            "for {error:?}"
        );
    }
}

#[test]
fn each_method_is_found_by_its_canonical_name() {
    for method in [
        Method::JoinDispatchGroup,
        Method::LeaveDispatchGroup,
        Method::JoinContractorGroup,
        Method::LeaveContractorGroup,
    ] {
        assert_eq!(Method::from_target(method.name()), Some(method));
        assert_eq!(
            Method::from_target(&method.name().to_lowercase()),
            Some(method)
        );
    }
    assert_eq!(Method::from_target("JoinGroup"), None);
    assert_eq!(Method::from_target(""), None);
}
