//! SignalR records read off the wire: splitting frames into records, events with their
//! payload and position, and join completions.

use serde_json::Value;
use serde_json::value::RawValue;

use crate::RS;

/// Splits the text of one frame into records; every record must end with the separator.
pub fn split_records(text: &str) -> Vec<String> {
    let Some(body) = text.strip_suffix(RS) else {
        panic!("frame does not end with the record separator: {text:?}");
    };
    body.split(RS).map(str::to_owned).collect()
}

/// Parses an event record `{"type":1,"target":…,"arguments":[payload]}` into its target and
/// the raw text of the payload, exactly as it was on the wire.
pub fn parse_event(record: &str) -> (String, String) {
    #[derive(serde::Deserialize)]
    struct Event<'a> {
        #[serde(rename = "type")]
        kind: u8,
        target: String,
        #[serde(rename = "invocationId")]
        invocation_id: Option<String>,
        #[serde(borrow)]
        arguments: Vec<&'a RawValue>,
    }
    let event: Event<'_> = serde_json::from_str(record)
        .unwrap_or_else(|e| panic!("record `{record}` is not an event: {e}"));
    assert_eq!(event.kind, 1, "not an Invocation: {record}");
    assert_eq!(event.invocation_id, None, "events carry no invocationId");
    (event.target, event_payload(&event.arguments, record))
}

/// The first argument of an event, after checking the second (its position) when present.
fn event_payload(arguments: &[&RawValue], record: &str) -> String {
    match arguments {
        [payload] => payload.get().to_owned(),
        [payload, position] => {
            let position: Value = serde_json::from_str(position.get())
                .unwrap_or_else(|e| panic!("position in `{record}` is not JSON: {e}"));
            assert!(
                position["group"].is_string()
                    && position["epoch"].is_string()
                    && position["seq"].is_u64(),
                "the second argument is a position: {record}"
            );
            payload.get().to_owned()
        }
        _ => panic!("an event has its payload and maybe a position: {record}"),
    }
}

/// An event's target, payload and position (`{"group","epoch","seq"}`).
pub fn parse_positioned_event(record: &str) -> (String, String, Value) {
    let (target, payload) = parse_event(record);
    let message: Value = serde_json::from_str(record).expect("an event is JSON");
    (target, payload, message["arguments"][1].clone())
}

/// Checks that `completion` answers a successful join of `group` and returns its result: the
/// group's head position (`{"group","epoch","seq"}`, plus `"recovered"` when one was given).
pub fn joined(completion: &Value, group: &str) -> Value {
    assert!(
        completion.get("error").is_none(),
        "join refused: {completion}"
    );
    let result = &completion["result"];
    assert_eq!(result["group"], group, "{completion}");
    assert!(
        result["epoch"].as_str().is_some_and(|e| e.len() == 32),
        "{completion}"
    );
    assert!(result["seq"].is_u64(), "{completion}");
    result.clone()
}
