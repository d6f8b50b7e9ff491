use super::*;

const RECOMMENDATION: &str = r#"{"type":"RecommendationReady","jobId":"7d9f4f3e-1c2b-4d5e-8f60-123456789abc","requestId":"0b1c2d3e-4f50-4a6b-9c8d-0e1f2a3b4c5d","region":"west","configVersion":1,"generatedAt":"2025-11-08T12:34:56Z"}"#;
const ASSIGNMENT: &str = r#"{"type":"JobAssigned","jobId":"7d9f4f3e-1c2b-4d5e-8f60-123456789abc","contractorId":"11111111-2222-4333-8444-555555555555","assignmentId":"0b1c2d3e-4f50-4a6b-9c8d-0e1f2a3b4c5d","startUtc":"2025-11-08T15:00:00Z","endUtc":"2025-11-08T17:00:00Z","region":"west","source":"manual","auditId":"9e8d7c6b-5a49-4382-9170-fedcba987654"}"#;

/// Replaces `"field":<old value>` in `json` by `"field":<value>` (value is raw JSON).
fn with(json: &str, field: &str, value: &str) -> String {
    let mut v: serde_json::Value = serde_json::from_str(json).unwrap();
    v[field] = serde_json::from_str(value).unwrap();
    v.to_string()
}

fn without(json: &str, field: &str) -> String {
    let mut v: serde_json::Value = serde_json::from_str(json).unwrap();
    v.as_object_mut().unwrap().remove(field);
    v.to_string()
}

/// Reads `json` and compares the outcome with `expected` (`Ok` = the error message).
fn check(json: &str, expected: Result<EventKind, &str>) {
    let got = Event::from_json(json.as_bytes())
        .map(|e| e.kind())
        .map_err(|e| e.to_string());
    assert_eq!(got, expected.map_err(str::to_owned), "for {json}");
}

#[test]
fn both_contract_examples_are_accepted() {
    check(RECOMMENDATION, Ok(EventKind::RecommendationReady));
    check(ASSIGNMENT, Ok(EventKind::JobAssigned));
    check(
        &with(ASSIGNMENT, "source", r#""auto""#),
        Ok(EventKind::JobAssigned),
    );
    check(
        &with(
            RECOMMENDATION,
            "generatedAt",
            r#""2025-11-08T12:34:56.123Z""#,
        ),
        Ok(EventKind::RecommendationReady),
    );
    check(
        &with(
            ASSIGNMENT,
            "contractorId",
            r#""11111111-2222-4333-8444-55555555555A""#,
        ),
        Ok(EventKind::JobAssigned),
    );
}

#[test]
fn fields_a_newer_backend_adds_are_accepted() {
    check(
        &with(RECOMMENDATION, "schemaVersion", "2"),
        Ok(EventKind::RecommendationReady),
    );
    check(
        &with(ASSIGNMENT, "notes", r#"{"nested":[1,2]}"#),
        Ok(EventKind::JobAssigned),
    );
}

#[test]
fn each_broken_rule_is_named() {
    check(
        &with(RECOMMENDATION, "jobId", r#""not-a-uuid""#),
        Err("field `jobId`: `not-a-uuid` is not a UUID like 7d9f4f3e-1c2b-4d5e-8f60-123456789abc"),
    );
    check(
        &with(
            RECOMMENDATION,
            "jobId",
            r#""7d9f4f3e1c2b4d5e8f60123456789abc""#,
        ),
        Err(
            "field `jobId`: `7d9f4f3e1c2b4d5e8f60123456789abc` is not a UUID like 7d9f4f3e-1c2b-4d5e-8f60-123456789abc",
        ),
    );
    check(
        &without(ASSIGNMENT, "auditId"),
        Err("field `auditId`: is required"),
    );
    check(
        &with(ASSIGNMENT, "source", r#""robot""#),
        Err("field `source`: unknown variant `robot`, expected `auto` or `manual`"),
    );
    for (generated_at, rule) in [
        (
            "2025-11-08T12:34:56+02:00",
            "is not in UTC with a `Z` suffix",
        ),
        (
            "2025-11-08T12:34:56+00:00",
            "is not in UTC with a `Z` suffix",
        ),
        ("2025-11-08T12:34:56z", "is not in UTC with a `Z` suffix"),
        (
            "2025-11-08 12:34:56Z",
            "is not an ISO 8601 timestamp like 2025-11-08T12:34:56Z",
        ),
        (
            "yesterday",
            "is not an ISO 8601 timestamp like 2025-11-08T12:34:56Z",
        ),
    ] {
        check(
            &with(
                RECOMMENDATION,
                "generatedAt",
                &format!("\"{generated_at}\""),
            ),
            Err(&format!("field `generatedAt`: `{generated_at}` {rule}")),
        );
    }
    check(
        &with(ASSIGNMENT, "endUtc", r#""2025-11-08T14:00:00Z""#),
        Err("field `endUtc`: must be after startUtc"),
    );
    check(
        &with(RECOMMENDATION, "region", r#""west/east""#),
        Err("field `region`: may contain only letters, digits, '-', '_' and '.'"),
    );
    check(
        &with(RECOMMENDATION, "configVersion", "-1"),
        Err("field `configVersion`: invalid value: integer `-1`, expected u32"),
    );
}

#[test]
fn the_discriminator_is_required_and_closed() {
    check(
        &without(RECOMMENDATION, "type"),
        Err("field `type` is missing; expected RecommendationReady or JobAssigned"),
    );
    check(
        &with(RECOMMENDATION, "type", r#""JobCancelled""#),
        Err("unknown event type `JobCancelled`; expected RecommendationReady or JobAssigned"),
    );
    check(
        "[1,2]",
        Err("event is not a JSON object: invalid type: expected a JSON object"),
    );
}

#[test]
fn events_over_two_kilobytes_are_refused() {
    let padded = with(
        RECOMMENDATION,
        "padding",
        &format!("\"{}\"", "x".repeat(2048)),
    );
    let got = Event::from_json(padded.as_bytes()).unwrap_err();
    assert!(matches!(got, ValidationError::TooLarge { bytes } if bytes == padded.len()));
}

#[test]
fn recommendations_route_to_the_dispatch_group_of_their_region() {
    let event = Event::from_json(RECOMMENDATION.as_bytes()).unwrap();
    let names: Vec<_> = event.groups().iter().map(|g| g.name().to_owned()).collect();
    assert_eq!(names, ["/dispatch/west"]);
}

#[test]
fn assignments_route_to_the_region_and_the_contractor() {
    let event = Event::from_json(ASSIGNMENT.as_bytes()).unwrap();
    let names: Vec<_> = event.groups().iter().map(|g| g.name().to_owned()).collect();
    assert_eq!(
        names,
        [
            "/dispatch/west",
            "/contractor/11111111-2222-4333-8444-555555555555"
        ]
    );
}

#[test]
fn typed_events_encode_to_what_the_contract_shows() {
    let event = Event::from_json(ASSIGNMENT.as_bytes()).unwrap();
    let json = event.to_json().unwrap();
    assert_eq!(
        serde_json::from_slice::<serde_json::Value>(&json).unwrap(),
        serde_json::from_str::<serde_json::Value>(ASSIGNMENT).unwrap()
    );
    assert_eq!(Event::from_json(&json).unwrap(), event);
}

#[test]
fn group_names_are_validated() {
    fn check(name: &str, expected: Result<&str, InvalidGroup>) {
        let got = Group::try_from_name(name);
        assert_eq!(
            got.as_ref().map(Group::name).map_err(Clone::clone),
            expected,
            "for {name}"
        );
    }
    check("/dispatch/west", Ok("/dispatch/west"));
    check("/dispatch/north-east_2.a", Ok("/dispatch/north-east_2.a"));
    check(
        "/contractor/AAAAAAAA-2222-4333-8444-555555555555",
        Ok("/contractor/aaaaaaaa-2222-4333-8444-555555555555"),
    );
    check("/contractor/c-42", Ok("/contractor/c-42"));
    check("/dispatch/", Err(InvalidGroup::Empty));
    check("/dispatch/{west}", Err(InvalidGroup::BadCharacter));
    check("/dispatch/we st", Err(InvalidGroup::BadCharacter));
    check(
        &format!("/dispatch/{}", "a".repeat(65)),
        Err(InvalidGroup::TooLong(65)),
    );
    check("/admin/x", Err(InvalidGroup::UnknownPrefix));
}

#[test]
fn a_group_knows_its_kind_and_id() {
    let group = Group::try_contractor("c-42").unwrap();
    assert_eq!(group.kind(), GroupKind::Contractor);
    assert_eq!(group.id(), "c-42");
    assert_eq!(group.to_string(), "/contractor/c-42");
}

#[test]
fn an_envelope_round_trips_with_the_event_bytes_untouched() {
    let id = uuid::Uuid::parse_str("0b1c2d3e-4f50-4a6b-9c8d-0e1f2a3b4c5d").unwrap();
    let event = with(RECOMMENDATION, "extra", r#"{"a":[1,2]}"#);
    let bytes = Envelope::encode(
        id,
        EventKind::RecommendationReady,
        1_795_700_000_123_456,
        &event,
    );
    let decoded = Envelope::decode(&bytes).unwrap();
    assert_eq!(decoded.id, id);
    assert_eq!(decoded.kind, EventKind::RecommendationReady);
    assert_eq!(decoded.published_at_micros, 1_795_700_000_123_456);
    assert_eq!(decoded.event, event);
    assert_eq!(decoded.position, None);
}

#[test]
fn a_positioned_envelope_decodes_with_its_position() {
    let id = uuid::Uuid::parse_str("0b1c2d3e-4f50-4a6b-9c8d-0e1f2a3b4c5d").unwrap();
    let plain = Envelope::encode(id, EventKind::RecommendationReady, 7, RECOMMENDATION);
    // What the publish script does: two leading fields in front of the plain envelope.
    let plain = std::str::from_utf8(&plain).unwrap();
    let positioned = format!(
        r#"{{"epoch":"6f1c0a523b6d4c1e9a570b7a1c2d3e4f","seq":42,{}"#,
        &plain[1..]
    );
    let decoded = Envelope::decode(positioned.as_bytes()).unwrap();
    assert_eq!(
        decoded.position,
        Some(Position::new("6f1c0a523b6d4c1e9a570b7a1c2d3e4f", 42))
    );
    assert_eq!(decoded.id, id);
    assert_eq!(decoded.event, RECOMMENDATION);
}

#[test]
fn a_position_serializes_as_epoch_and_seq() {
    let position = Position::new("6f1c0a523b6d4c1e9a570b7a1c2d3e4f", 41);
    let json = serde_json::to_string(&position).unwrap();
    assert_eq!(
        json,
        r#"{"epoch":"6f1c0a523b6d4c1e9a570b7a1c2d3e4f","seq":41}"#
    );
    assert_eq!(serde_json::from_str::<Position>(&json).unwrap(), position);
}

#[test]
fn the_unique_id_is_the_request_or_assignment_id() {
    let check = |json: &str, expected: &str| {
        assert_eq!(
            Event::from_json(json.as_bytes()).unwrap().unique_id(),
            expected
        );
    };
    check(RECOMMENDATION, "0b1c2d3e-4f50-4a6b-9c8d-0e1f2a3b4c5d");
    check(
        &with(
            ASSIGNMENT,
            "assignmentId",
            r#""AAAAAAAA-2222-4333-8444-555555555555""#,
        ),
        "aaaaaaaa-2222-4333-8444-555555555555",
    );
}

#[test]
fn messages_that_are_not_envelopes_are_refused() {
    fn check(message: &str, expected: &str) {
        let got = Envelope::decode(message.as_bytes())
            .unwrap_err()
            .to_string();
        assert!(got.starts_with(expected), "{message}: {got}");
    }
    check("[1]", "malformed envelope: expected a JSON object");
    check(r#"{"v":1}"#, "malformed envelope: missing field");
    check(
        r#"{"v":2,"id":"0b1c2d3e-4f50-4a6b-9c8d-0e1f2a3b4c5d","type":"JobAssigned","publishedAt":1,"event":{}}"#,
        "unsupported envelope version 2",
    );
    check(
        r#"{"v":1,"id":"0b1c2d3e-4f50-4a6b-9c8d-0e1f2a3b4c5d","type":"JobCancelled","publishedAt":1,"event":{}}"#,
        "unknown event type `JobCancelled`",
    );
    check(
        r#"{"epoch":"e","v":1,"id":"0b1c2d3e-4f50-4a6b-9c8d-0e1f2a3b4c5d","type":"JobAssigned","publishedAt":1,"event":{}}"#,
        "malformed envelope: `epoch` and `seq` come together",
    );
    check(
        r#"{"seq":3,"v":1,"id":"0b1c2d3e-4f50-4a6b-9c8d-0e1f2a3b4c5d","type":"JobAssigned","publishedAt":1,"event":{}}"#,
        "malformed envelope: `epoch` and `seq` come together",
    );
    check(
        r#"{"epoch":"e","seq":-1,"v":1,"id":"0b1c2d3e-4f50-4a6b-9c8d-0e1f2a3b4c5d","type":"JobAssigned","publishedAt":1,"event":{}}"#,
        "malformed envelope",
    );
}

#[test]
fn a_groups_channel_is_a_cluster_hash_tag_and_reads_back() {
    let group = Group::try_dispatch("west").unwrap();
    assert_eq!(group.channel("rt:"), "rt:{/dispatch/west}");
    assert_eq!(
        Group::from_channel("rt:", "rt:{/dispatch/west}"),
        Some(group)
    );
    assert_eq!(Group::from_channel("rt:", "other:{/dispatch/west}"), None);
    assert_eq!(Group::from_channel("rt:", "rt:{/admin/x}"), None);
}

#[test]
fn idempotency_keys_are_short_printable_ascii_without_spaces() {
    let longest = "k".repeat(MAX_IDEMPOTENCY_KEY_LEN);
    let too_long = "k".repeat(MAX_IDEMPOTENCY_KEY_LEN + 1);
    for (key, expected) in [
        ("order-42:assigned", Ok(())),
        ("~!#$%", Ok(())),
        (longest.as_str(), Ok(())),
        ("", Err("the idempotency key is empty")),
        (
            too_long.as_str(),
            Err("the idempotency key is 201 bytes; at most 200 are allowed"),
        ),
        (
            "has space",
            Err("the idempotency key must be printable ASCII without spaces"),
        ),
        (
            "tab\there",
            Err("the idempotency key must be printable ASCII without spaces"),
        ),
        (
            "é",
            Err("the idempotency key must be printable ASCII without spaces"),
        ),
    ] {
        let got = check_idempotency_key(key).map_err(|e| e.to_string());
        let expected = expected.map_err(|reason| format!("field `idempotencyKey`: {reason}"));
        assert_eq!(got, expected, "for {key:?}");
    }
}

#[test]
fn a_prefix_may_not_contain_hash_tag_braces() {
    assert_eq!(check_prefix(DEFAULT_PREFIX), Ok(()));
    assert_eq!(check_prefix("staging:rt:"), Ok(()));
    for prefix in ["rt{", "}rt:", "{x}:"] {
        assert_eq!(
            check_prefix(prefix),
            Err("must not contain '{' or '}' (they delimit the hash tag)"),
            "for {prefix:?}"
        );
    }
}
