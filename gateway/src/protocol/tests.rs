//! Records, messages, the handshake and close reasons, checked against literal SignalR records.

use serde_json::Value;

/// Strips the record separator off an encoded record and parses the JSON before it.
fn parse_record(record: &str) -> Value {
    let json = record
        .strip_suffix(super::RECORD_SEPARATOR)
        .unwrap_or_else(|| panic!("{record:?} does not end with the record separator"));
    serde_json::from_str(json).unwrap()
}

mod record_buffer {
    use crate::protocol::{ProtocolError, RecordBuffer};

    /// Feeds `messages` one by one into a buffer of `limit` bytes and compares what each feed
    /// returns with `expected`, in order.
    fn check(limit: usize, messages: &[&str], expected: &[Result<&[&str], ProtocolError>]) {
        let mut buffer = RecordBuffer::new(limit);
        let got: Vec<Result<Vec<String>, ProtocolError>> =
            messages.iter().map(|text| buffer.feed(text)).collect();
        let expected: Vec<Result<Vec<String>, ProtocolError>> = expected
            .iter()
            .map(|e| {
                e.clone()
                    .map(|records| records.iter().map(|r| (*r).to_owned()).collect())
            })
            .collect();
        assert_eq!(got, expected, "for {messages:?} with limit {limit}");
    }

    #[test]
    fn one_record_in_one_message_comes_out_without_its_separator() {
        check(1024, &["{\"type\":6}\u{1e}"], &[Ok(&["{\"type\":6}"])]);
    }

    #[test]
    fn several_records_in_one_message_come_out_in_order() {
        check(
            1024,
            &["{\"protocol\":\"json\",\"version\":1}\u{1e}{\"type\":6}\u{1e}{\"type\":7}\u{1e}"],
            &[Ok(&[
                "{\"protocol\":\"json\",\"version\":1}",
                "{\"type\":6}",
                "{\"type\":7}",
            ])],
        );
    }

    #[test]
    fn a_record_split_across_two_messages_comes_out_once_complete() {
        check(
            1024,
            &["{\"type\":1,\"target\":\"Join", "DispatchGroup\"}\u{1e}"],
            &[
                Ok(&[]),
                Ok(&["{\"type\":1,\"target\":\"JoinDispatchGroup\"}"]),
            ],
        );
    }

    #[test]
    fn a_message_completing_one_record_and_starting_another_keeps_the_tail() {
        check(
            1024,
            &[
                "{\"type\"",
                ":6}\u{1e}{\"ty",
                "pe\":7}\u{1e}",
                "{\"type\":6}\u{1e}",
            ],
            &[
                Ok(&[]),
                Ok(&["{\"type\":6}"]),
                Ok(&["{\"type\":7}"]),
                Ok(&["{\"type\":6}"]),
            ],
        );
    }

    #[test]
    fn empty_messages_and_empty_records_are_passed_through_as_they_are() {
        check(
            1024,
            &["", "\u{1e}", "{}\u{1e}\u{1e}"],
            &[Ok(&[]), Ok(&[""]), Ok(&["{}", ""])],
        );
    }

    #[test]
    fn non_ascii_text_is_split_only_at_separators() {
        check(
            1024,
            &["{\"target\":\"Zürich\"}\u{1e}{\"x\":\"é", "😀\"}\u{1e}"],
            &[Ok(&["{\"target\":\"Zürich\"}"]), Ok(&["{\"x\":\"é😀\"}"])],
        );
    }

    #[test]
    fn a_record_of_exactly_the_limit_is_accepted() {
        let record = "x".repeat(16);
        check(
            16,
            &[&record[..10], &format!("{}\u{1e}", &record[10..])],
            &[Ok(&[]), Ok(&[record.as_str()])],
        );
    }

    #[test]
    fn a_message_larger_than_the_limit_is_refused() {
        check(
            16,
            &["{\"type\":6}\u{1e}{\"type\":6}\u{1e}"],
            &[Err(ProtocolError::TooLarge { limit: 16 })],
        );
    }

    #[test]
    fn a_record_growing_past_the_limit_across_messages_is_refused() {
        check(
            16,
            &["0123456789", "0123456789\u{1e}"],
            &[Ok(&[]), Err(ProtocolError::TooLarge { limit: 16 })],
        );
    }

    #[test]
    fn an_unfinished_tail_longer_than_the_limit_is_refused_before_its_end_arrives() {
        check(
            16,
            &["0123456789", "0123456789"],
            &[Ok(&[]), Err(ProtocolError::TooLarge { limit: 16 })],
        );
    }

    #[test]
    fn the_largest_configurable_limit_does_not_overflow() {
        check(
            usize::MAX,
            &["{\"type\"", ":6}\u{1e}"],
            &[Ok(&[]), Ok(&["{\"type\":6}"])],
        );
    }
}

mod decode {
    use serde_json::json;

    use crate::protocol::codec::{self, Invocation, decode};
    use crate::protocol::{Message, ProtocolError};

    /// Decodes `record` and compares the outcome with `expected`.
    fn check(record: &str, expected: Result<Message, ProtocolError>) {
        assert_eq!(decode(record), expected, "for {record}");
    }

    fn invocation(id: Option<&str>, target: &str, arguments: serde_json::Value) -> Invocation {
        let serde_json::Value::Array(arguments) = arguments else {
            panic!("arguments must be a JSON array");
        };
        Invocation {
            invocation_id: id.map(str::to_owned),
            target: target.to_owned(),
            arguments,
            streaming: false,
            stream_ids: Vec::new(),
        }
    }

    fn malformed(what: &str) -> Result<Message, ProtocolError> {
        Err(ProtocolError::Malformed(what.to_owned()))
    }

    #[test]
    fn the_official_clients_invocation_with_type_last_is_understood() {
        check(
            r#"{"target":"Echo","arguments":[1,"two"],"invocationId":"0","type":1}"#,
            Ok(Message::Invocation(invocation(
                Some("0"),
                "Echo",
                json!([1, "two"]),
            ))),
        );
    }

    #[test]
    fn an_invocation_without_an_id_is_non_blocking() {
        check(
            r#"{"type":1,"target":"JoinDispatchGroup","arguments":["west"]}"#,
            Ok(Message::Invocation(invocation(
                None,
                "JoinDispatchGroup",
                json!(["west"]),
            ))),
        );
        check(
            r#"{"type":1,"invocationId":null,"target":"JoinDispatchGroup","arguments":["west"]}"#,
            Ok(Message::Invocation(invocation(
                None,
                "JoinDispatchGroup",
                json!(["west"]),
            ))),
        );
    }

    #[test]
    fn headers_and_unknown_properties_are_ignored() {
        check(
            r#"{"type":1,"headers":{"a":"b"},"invocationId":"9","target":"T","arguments":[],"extra":true}"#,
            Ok(Message::Invocation(invocation(Some("9"), "T", json!([])))),
        );
    }

    #[test]
    fn a_stream_invocation_is_marked_as_streaming() {
        check(
            r#"{"type":4,"invocationId":"3","target":"JoinDispatchGroup","arguments":["west"]}"#,
            Ok(Message::Invocation(Invocation {
                streaming: true,
                ..invocation(Some("3"), "JoinDispatchGroup", json!(["west"]))
            })),
        );
    }

    #[test]
    fn client_stream_ids_are_read() {
        check(
            r#"{"type":1,"invocationId":"4","target":"Upload","arguments":[],"streamIds":["1","2"]}"#,
            Ok(Message::Invocation(Invocation {
                stream_ids: vec!["1".to_owned(), "2".to_owned()],
                ..invocation(Some("4"), "Upload", json!([]))
            })),
        );
        check(
            r#"{"type":1,"target":"T","arguments":[],"streamIds":null}"#,
            Ok(Message::Invocation(invocation(None, "T", json!([])))),
        );
    }

    #[test]
    fn ping_and_close_are_recognised() {
        check(r#"{"type":6}"#, Ok(Message::Ping));
        check(r#"{"type":7}"#, Ok(Message::Close));
        check(
            r#"{"type":7,"error":"bye","allowReconnect":false}"#,
            Ok(Message::Close),
        );
    }

    #[test]
    fn valid_messages_the_hub_has_no_use_for_are_ignored() {
        check(
            r#"{"type":2,"invocationId":"1","item":5}"#,
            Ok(Message::Ignored(2)),
        );
        check(
            r#"{"type":3,"invocationId":"1","result":5}"#,
            Ok(Message::Ignored(3)),
        );
        check(r#"{"type":5,"invocationId":"1"}"#, Ok(Message::Ignored(5)));
    }

    #[test]
    fn acks_and_sequences_carry_their_id() {
        check(r#"{"type":8,"sequenceId":1}"#, Ok(Message::Ack(1)));
        check(r#"{"sequenceId":42,"type":9}"#, Ok(Message::Sequence(42)));
        for bad in [
            r#"{"type":8}"#,
            r#"{"type":8,"sequenceId":-1}"#,
            r#"{"type":9,"sequenceId":"3"}"#,
            r#"{"type":9,"sequenceId":1.5}"#,
        ] {
            assert!(
                matches!(codec::decode(bad), Err(ProtocolError::Malformed(_))),
                "{bad}"
            );
        }
        assert_eq!(codec::encode_ack(7), "{\"type\":8,\"sequenceId\":7}\u{1e}");
        assert_eq!(
            codec::encode_sequence(1),
            "{\"type\":9,\"sequenceId\":1}\u{1e}"
        );
    }

    #[test]
    fn only_types_one_to_five_are_trackable() {
        let trackable = |record: &str| codec::decode(record).map(|m| m.is_trackable());
        assert_eq!(
            trackable(r#"{"type":1,"target":"T","arguments":[]}"#),
            Ok(true)
        );
        assert_eq!(
            trackable(r#"{"type":4,"invocationId":"1","target":"T","arguments":[]}"#),
            Ok(true)
        );
        for kind in [2, 3, 5] {
            assert_eq!(
                trackable(&format!(r#"{{"type":{kind},"invocationId":"1"}}"#)),
                Ok(true)
            );
        }
        assert_eq!(trackable(r#"{"type":6}"#), Ok(false));
        assert_eq!(trackable(r#"{"type":7}"#), Ok(false));
        assert_eq!(trackable(r#"{"type":8,"sequenceId":1}"#), Ok(false));
        assert_eq!(trackable(r#"{"type":9,"sequenceId":1}"#), Ok(false));
    }

    #[test]
    fn a_record_without_a_numeric_type_is_refused() {
        check(
            r#"{"target":"T","arguments":[]}"#,
            Err(ProtocolError::MissingType),
        );
        check(r#"{"type":null}"#, Err(ProtocolError::MissingType));
        check(r#"{"type":"1"}"#, Err(ProtocolError::MissingType));
        check(r#"{"type":-1}"#, Err(ProtocolError::MissingType));
        check(r#"{"type":1.5}"#, Err(ProtocolError::MissingType));
        check("{}", Err(ProtocolError::MissingType));
    }

    #[test]
    fn an_unknown_type_is_refused_with_its_number() {
        check(r#"{"type":0}"#, Err(ProtocolError::UnknownType(0)));
        check(r#"{"type":10}"#, Err(ProtocolError::UnknownType(10)));
        check(r#"{"type":262}"#, Err(ProtocolError::UnknownType(262)));
    }

    /// Every one of `records` is refused as malformed, for `reason`.
    fn check_refused(records: &[&str], reason: &str) {
        for record in records {
            check(record, malformed(reason));
        }
    }

    #[test]
    fn an_invocation_id_that_is_not_a_non_empty_string_is_refused() {
        check_refused(
            &[
                r#"{"type":1,"invocationId":1,"target":"T","arguments":[]}"#,
                r#"{"type":1,"invocationId":"","target":"T","arguments":[]}"#,
                r#"{"type":1,"invocationId":["1"],"target":"T","arguments":[]}"#,
            ],
            "'invocationId' must be a non-empty string",
        );
    }

    #[test]
    fn a_target_that_is_not_a_non_empty_string_is_refused() {
        check_refused(
            &[
                r#"{"type":1,"arguments":[]}"#,
                r#"{"type":1,"target":"","arguments":[]}"#,
                r#"{"type":1,"target":7,"arguments":[]}"#,
                r#"{"type":4,"target":null,"arguments":[]}"#,
            ],
            "'target' must be a non-empty string",
        );
    }

    #[test]
    fn arguments_that_are_not_an_array_are_refused() {
        check_refused(
            &[
                r#"{"type":1,"target":"T"}"#,
                r#"{"type":1,"target":"T","arguments":null}"#,
                r#"{"type":1,"target":"T","arguments":"west"}"#,
                r#"{"type":1,"target":"T","arguments":{"0":"west"}}"#,
            ],
            "'arguments' must be an array",
        );
    }

    #[test]
    fn stream_ids_that_are_not_strings_are_refused() {
        check_refused(
            &[
                r#"{"type":1,"target":"T","arguments":[],"streamIds":[1]}"#,
                r#"{"type":1,"target":"T","arguments":[],"streamIds":"1"}"#,
            ],
            "'streamIds' must be an array of strings",
        );
    }

    #[test]
    fn a_broken_object_is_malformed_without_a_parser_position() {
        check("{\"type\":1", malformed("EOF while parsing an object"));
        check("{\"type\":6}{}", malformed("trailing characters"));
        check(
            "{\"type\":6,\"type\":7}",
            malformed("duplicate field `type`"),
        );
        check(
            "{\"type\":1,\"target\":\"T\",\"arguments\":[}",
            malformed("expected value"),
        );
    }

    #[test]
    fn text_that_is_not_a_json_object_is_malformed() {
        // serde's derived structs also accept sequences in field order; the protocol only has
        // objects, so `[6,null,null,null,null]` must not pass for a Ping.
        for record in [
            "",
            "hello",
            "null",
            "42",
            "\"ping\"",
            "[1]",
            "[6,null,null,null,null]",
            r#"[1,"1","JoinDispatchGroup",["west"],null]"#,
        ] {
            let got = decode(record);
            assert!(
                matches!(got, Err(ProtocolError::Malformed(_))),
                "for {record:?}: {got:?}"
            );
        }
    }
}

mod encode {
    use serde_json::json;

    use super::parse_record;
    use crate::protocol::Message;
    use crate::protocol::codec::{
        Invocation, PING, decode, encode_close, encode_completion, encode_completion_result,
        encode_invocation,
    };

    /// Encodes an event and compares the bytes with `expected`.
    fn check(target: &str, payload: &str, expected: &str) {
        let got = encode_invocation(target, payload.as_bytes(), None);
        assert_eq!(
            std::str::from_utf8(&got).unwrap(),
            expected,
            "for {target} {payload}"
        );
    }

    const JOB_ASSIGNED: &str = r#"{"type":"JobAssigned","jobId":"7d9f4f3e-1c2b-4d5e-8f60-123456789abc","contractorId":"11111111-2222-4333-8444-555555555555","notes":{"nested":[1,2.5,"ü"]}}"#;

    #[test]
    fn an_event_record_is_the_payload_wrapped_byte_for_byte() {
        check(
            "JobAssigned",
            r#"{"a":1}"#,
            "{\"type\":1,\"target\":\"JobAssigned\",\"arguments\":[{\"a\":1}]}\u{1e}",
        );
        check(
            "JobAssigned",
            JOB_ASSIGNED,
            &format!(
                "{{\"type\":1,\"target\":\"JobAssigned\",\"arguments\":[{JOB_ASSIGNED}]}}\u{1e}"
            ),
        );
        check(
            "RecommendationReady",
            "  { \"spaced\" : true }  ",
            "{\"type\":1,\"target\":\"RecommendationReady\",\"arguments\":[  { \"spaced\" : true }  ]}\u{1e}",
        );
    }

    #[test]
    fn a_position_is_the_second_argument_and_the_payload_stays_untouched() {
        let position = br#"{"group":"/dispatch/west","epoch":"e1","seq":42}"#;
        let bytes = encode_invocation("RecommendationReady", b"{ \"a\" :1}", Some(position));
        assert_eq!(
            std::str::from_utf8(&bytes).unwrap(),
            "{\"type\":1,\"target\":\"RecommendationReady\",\"arguments\":[{ \"a\" :1},{\"group\":\"/dispatch/west\",\"epoch\":\"e1\",\"seq\":42}]}\u{1e}"
        );
    }

    #[test]
    fn a_completion_can_carry_a_result() {
        assert_eq!(
            parse_record(&encode_completion_result("3", &json!({"seq": 1}))),
            json!({"type": 3, "invocationId": "3", "result": {"seq": 1}})
        );
    }

    #[test]
    fn an_event_record_round_trips_through_a_json_parser_and_the_decoder() {
        let bytes = encode_invocation("JobAssigned", JOB_ASSIGNED.as_bytes(), None);
        let text = std::str::from_utf8(&bytes).unwrap();
        let payload: serde_json::Value = serde_json::from_str(JOB_ASSIGNED).unwrap();
        assert_eq!(
            parse_record(text),
            json!({"type": 1, "target": "JobAssigned", "arguments": [payload.clone()]})
        );
        assert_eq!(
            decode(text.trim_end_matches('\u{1e}')),
            Ok(Message::Invocation(Invocation {
                invocation_id: None,
                target: "JobAssigned".to_owned(),
                arguments: vec![payload],
                streaming: false,
                stream_ids: Vec::new(),
            }))
        );
    }

    #[test]
    fn a_completion_carries_the_invocation_id_and_an_optional_error() {
        assert_eq!(
            parse_record(&encode_completion("7", None)),
            json!({"type": 3, "invocationId": "7"})
        );
        assert_eq!(
            parse_record(&encode_completion(
                "8",
                Some("region 'north' is not in your token")
            )),
            json!({"type": 3, "invocationId": "8", "error": "region 'north' is not in your token"})
        );
        assert_eq!(
            parse_record(&encode_completion("a\"b", Some("line\nbreak \"quoted\""))),
            json!({"type": 3, "invocationId": "a\"b", "error": "line\nbreak \"quoted\""})
        );
    }

    #[test]
    fn a_close_record_carries_the_error_and_the_reconnect_decision() {
        assert_eq!(
            parse_record(&encode_close("server is shutting down; reconnect", true)),
            json!({"type": 7, "error": "server is shutting down; reconnect", "allowReconnect": true})
        );
        assert_eq!(
            parse_record(&encode_close("bad \"message\"", false)),
            json!({"type": 7, "error": "bad \"message\"", "allowReconnect": false})
        );
    }

    #[test]
    fn the_ping_record_is_a_type_6_message() {
        assert_eq!(PING, "{\"type\":6}\u{1e}");
        assert_eq!(parse_record(PING), json!({"type": 6}));
    }
}

mod frames {
    use publisher_lib::contract::{EventKind, Group, Position};
    use serde_json::json;

    use super::parse_record;
    use crate::protocol::frames::{
        error_completion, event_frame, hub_exception, join_completion, ok_completion,
        position_value,
    };

    fn west() -> Group {
        Group::try_dispatch("west").unwrap()
    }

    fn at(seq: u64) -> Position {
        Position {
            epoch: "e1".to_owned(),
            seq,
        }
    }

    /// The text of a server text frame (unmasked, so the payload follows a short header).
    fn frame_text(frame: &[u8]) -> &str {
        assert_eq!(frame[0], 0x81, "a final text frame");
        let (len, start) = match frame[1] {
            126 => (usize::from(u16::from_be_bytes([frame[2], frame[3]])), 4),
            127 => panic!("no test frame is that long"),
            n => (usize::from(n), 2),
        };
        assert_eq!(frame.len(), start + len);
        std::str::from_utf8(&frame[start..]).unwrap()
    }

    #[test]
    fn an_event_frame_carries_the_payload_untouched_and_its_position_second() {
        let frame = event_frame(
            &west(),
            EventKind::JobAssigned,
            b"{ \"a\" :1}",
            Some(&at(42)),
        );
        assert_eq!(
            frame_text(&frame),
            "{\"type\":1,\"target\":\"JobAssigned\",\"arguments\":[{ \"a\" :1},{\"epoch\":\"e1\",\"group\":\"/dispatch/west\",\"seq\":42}]}\u{1e}"
        );
        let unpositioned = event_frame(&west(), EventKind::JobAssigned, b"{}", None);
        assert_eq!(
            frame_text(&unpositioned),
            "{\"type\":1,\"target\":\"JobAssigned\",\"arguments\":[{}]}\u{1e}"
        );
    }

    #[test]
    fn a_join_completes_with_the_head_and_recovered_only_for_a_resume() {
        assert_eq!(
            parse_record(&join_completion("7", &west(), &at(3), None)),
            json!({"type": 3, "invocationId": "7",
                   "result": {"group": "/dispatch/west", "epoch": "e1", "seq": 3}})
        );
        assert_eq!(
            parse_record(&join_completion("8", &west(), &at(0), Some(false))),
            json!({"type": 3, "invocationId": "8",
                   "result": {"group": "/dispatch/west", "epoch": "e1", "seq": 0, "recovered": false}})
        );
    }

    #[test]
    fn positions_errors_and_plain_completions_have_one_spelling() {
        assert_eq!(
            position_value(&west(), &at(9)),
            json!({"group": "/dispatch/west", "epoch": "e1", "seq": 9})
        );
        let error = hub_exception("JoinDispatchGroup", "too many joins; slow down");
        assert_eq!(
            error,
            "An unexpected error occurred invoking 'JoinDispatchGroup' on the server. HubException: too many joins; slow down"
        );
        assert_eq!(
            parse_record(&error_completion("1", &error)),
            json!({"type": 3, "invocationId": "1", "error": error})
        );
        assert_eq!(
            parse_record(&ok_completion("2")),
            json!({"type": 3, "invocationId": "2"})
        );
    }
}

mod handshake {
    use serde_json::json;

    use super::parse_record;
    use crate::protocol::handshake::{ACCEPTED, HandshakeError, accept};

    /// Checks a handshake request; `expected` is `Ok` or the text the client is shown.
    fn check(record: &str, expected: Result<(), &str>) {
        let got = accept(record).map_err(|e| e.to_string());
        assert_eq!(got, expected.map_err(str::to_owned), "for {record}");
    }

    #[test]
    fn json_version_1_and_2_are_accepted() {
        check(r#"{"protocol":"json","version":1}"#, Ok(()));
        check(r#"{"protocol":"json","version":2}"#, Ok(()));
        check(r#"{ "version": 1, "protocol": "json" }"#, Ok(()));
    }

    #[test]
    fn the_acceptance_reply_is_an_empty_object_without_a_type() {
        assert_eq!(ACCEPTED, "{}\u{1e}");
    }

    #[test]
    fn messagepack_is_refused_in_aspnet_words() {
        check(
            r#"{"protocol":"messagepack","version":1}"#,
            Err("The protocol 'messagepack' is not supported."),
        );
    }

    #[test]
    fn version_3_is_refused_in_aspnet_words() {
        check(
            r#"{"protocol":"json","version":3}"#,
            Err("The server does not support version 3 of the 'json' protocol."),
        );
    }

    #[test]
    fn a_malformed_request_is_refused_without_a_parser_position() {
        check(
            r#"{"protocol":"json","version":1"#,
            Err("Handshake request is malformed: EOF while parsing an object"),
        );
        check(
            r#"{"protocol":"json"}"#,
            Err("Handshake request is malformed: missing field `version`"),
        );
        check(
            r#"{"version":1}"#,
            Err("Handshake request is malformed: missing field `protocol`"),
        );
        check(
            r#"{"protocol":"json","version":"1"}"#,
            Err("Handshake request is malformed: invalid type: string \"1\", expected u64"),
        );
        check(
            r#"{"type":6}"#,
            Err("Handshake request is malformed: missing field `protocol`"),
        );
    }

    #[test]
    fn text_that_is_not_a_json_object_is_not_a_handshake_request() {
        for record in ["", "hello", "null", r#"["json",1]"#] {
            let got = accept(record);
            assert!(
                matches!(got, Err(HandshakeError::Malformed(_))),
                "for {record:?}: {got:?}"
            );
        }
    }

    #[test]
    fn a_refusal_reply_is_an_error_object() {
        assert_eq!(
            parse_record(&HandshakeError::UnsupportedProtocol("messagepack".to_owned()).reply()),
            json!({"error": "The protocol 'messagepack' is not supported."})
        );
        assert_eq!(
            parse_record(&HandshakeError::Canceled.reply()),
            json!({"error": "Handshake was canceled."})
        );
        assert_eq!(
            parse_record(&HandshakeError::ShuttingDown.reply()),
            json!({"error": "The server is shutting down."})
        );
    }

    #[test]
    fn each_refusal_has_its_own_label() {
        let labels = [
            HandshakeError::Malformed(String::new()).label(),
            HandshakeError::UnsupportedProtocol(String::new()).label(),
            HandshakeError::UnsupportedVersion(3).label(),
            HandshakeError::Canceled.label(),
            HandshakeError::ShuttingDown.label(),
        ];
        assert_eq!(
            labels,
            [
                "malformed",
                "unsupported_protocol",
                "unsupported_version",
                "timeout",
                "shutting_down",
            ]
        );
    }
}

mod close {
    use super::parse_record;
    use crate::protocol::handshake::HandshakeError;
    use crate::protocol::{CloseReason, ProtocolError};

    /// What a close reason tells the client: reconnect allowed, WebSocket code, metrics label.
    fn check(reason: CloseReason, expected: (bool, u16, &str)) {
        let got = (reason.allows_reconnect(), reason.ws_code(), reason.label());
        assert_eq!(got, expected, "for {reason:?}");
        assert_eq!(
            parse_record(&reason.record()),
            serde_json::json!({
                "type": 7,
                "error": reason.message(),
                "allowReconnect": expected.0,
            }),
            "record for {reason:?}"
        );
    }

    #[test]
    fn transient_conditions_allow_a_reconnect() {
        check(CloseReason::ServerShutdown, (true, 1001, "server_shutdown"));
        check(CloseReason::SlowConsumer, (true, 1000, "slow_consumer"));
        check(CloseReason::ClientTimeout, (true, 1000, "client_timeout"));
        check(CloseReason::TokenExpired, (true, 1000, "token_expired"));
    }

    #[test]
    fn protocol_violations_forbid_a_reconnect_with_a_fitting_code() {
        check(
            CloseReason::Protocol(ProtocolError::TooLarge { limit: 32768 }),
            (false, 1009, "too_large"),
        );
        check(
            CloseReason::Protocol(ProtocolError::Binary),
            (false, 1003, "binary_frame"),
        );
        check(
            CloseReason::Protocol(ProtocolError::Malformed("x".to_owned())),
            (false, 1008, "malformed"),
        );
        check(
            CloseReason::Protocol(ProtocolError::MissingType),
            (false, 1008, "missing_type"),
        );
        check(
            CloseReason::Protocol(ProtocolError::UnknownType(42)),
            (false, 1008, "unknown_type"),
        );
        check(
            CloseReason::Handshake(HandshakeError::UnsupportedVersion(3)),
            (false, 1008, "handshake"),
        );
        check(
            CloseReason::Handshake(HandshakeError::Canceled),
            (false, 1008, "handshake"),
        );
    }

    #[test]
    fn a_shutdown_during_the_handshake_goes_away_like_a_shutdown() {
        // The client reads a handshake reply rather than this Close record, so only the
        // WebSocket code tells it the server is going away.
        check(
            CloseReason::Handshake(HandshakeError::ShuttingDown),
            (false, 1001, "handshake"),
        );
    }

    #[test]
    fn a_client_that_closed_gets_a_normal_close() {
        check(CloseReason::ClientClosed, (false, 1000, "client_closed"));
    }

    #[test]
    fn a_flooding_client_is_closed_as_a_policy_violation_without_reconnect() {
        check(CloseReason::Flooding, (false, 1008, "flooding"));
        assert_eq!(
            CloseReason::Flooding.message(),
            "too many invocations, far past the limit; slow down"
        );
    }

    #[test]
    fn the_record_says_why_in_words_the_client_shows() {
        let cases = [
            (
                CloseReason::ServerShutdown,
                "server is shutting down; reconnect",
            ),
            (
                CloseReason::TokenExpired,
                "access token expired; reconnect with a fresh one",
            ),
            (
                CloseReason::Protocol(ProtocolError::TooLarge { limit: 32768 }),
                "message larger than the 32768-byte limit",
            ),
            (
                CloseReason::Protocol(ProtocolError::UnknownType(42)),
                "unknown message type 42",
            ),
            (
                CloseReason::Handshake(HandshakeError::UnsupportedProtocol(
                    "messagepack".to_owned(),
                )),
                "The protocol 'messagepack' is not supported.",
            ),
        ];
        for (reason, text) in cases {
            assert_eq!(
                parse_record(&reason.record()),
                serde_json::json!({"type": 7, "error": text, "allowReconnect": reason.allows_reconnect()}),
                "for {reason:?}"
            );
        }
    }
}

#[test]
fn every_message_the_gateway_sends_ends_with_exactly_one_separator() {
    use super::codec::{PING, encode_close, encode_completion, encode_invocation};
    let records = [
        String::from_utf8(encode_invocation("JobAssigned", b"{}", None).to_vec()).unwrap(),
        encode_completion("1", None),
        encode_completion("1", Some("no")),
        // A client-chosen method name echoed in an error cannot end the record early.
        encode_completion("\u{1e}", Some("Failed to invoke 'x\u{1e}{\"type\":7}'")),
        encode_close("bye", false),
        PING.to_owned(),
        super::handshake::ACCEPTED.to_owned(),
    ];
    for record in records {
        assert_eq!(
            record.matches(super::RECORD_SEPARATOR).count(),
            1,
            "for {record:?}"
        );
        assert!(record.ends_with(super::RECORD_SEPARATOR), "for {record:?}");
        assert!(parse_record(&record).is_object(), "for {record:?}");
    }
}
