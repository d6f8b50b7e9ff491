//! SignalR hub message parser (`codec::decode`) on one record.
//!
//! Invariants: no panic; an invocation written back as JSON decodes to the same message (floats
//! within a rounding step: serde_json's default float parsing is not exact); a
//! completion answering it (success or error) is one JSON record carrying the same id; errors
//! carry no "at line … column …" position.
#![no_main]

use gateway::protocol::{Message, RECORD_SEPARATOR, codec};
use libfuzzer_sys::fuzz_target;
use serde_json::{Value, json};

fuzz_target!(|data: &[u8]| {
    let Ok(record) = std::str::from_utf8(data) else {
        return;
    };
    let message = match codec::decode(record) {
        Ok(message) => message,
        Err(error) => {
            assert!(!error.label().is_empty());
            assert!(!error.to_string().contains(" at line "), "{error}");
            return;
        }
    };
    let Message::Invocation(invocation) = &message else {
        return;
    };
    let mut written = json!({
        "type": if invocation.streaming { 4 } else { 1 },
        "target": invocation.target,
        "arguments": invocation.arguments,
    });
    if let Some(id) = &invocation.invocation_id {
        written["invocationId"] = json!(id);
    }
    if !invocation.stream_ids.is_empty() {
        written["streamIds"] = json!(invocation.stream_ids);
    }
    let again = codec::decode(&written.to_string()).expect("a decoded invocation re-encodes");
    let Message::Invocation(again) = again else {
        panic!("an invocation re-encodes as an invocation: {again:?}");
    };
    assert_eq!(again.invocation_id, invocation.invocation_id);
    assert_eq!(again.target, invocation.target);
    assert_eq!(again.streaming, invocation.streaming);
    assert_eq!(again.stream_ids, invocation.stream_ids);
    assert!(
        same(
            &Value::Array(again.arguments.clone()),
            &Value::Array(invocation.arguments.clone())
        ),
        "{:?} != {:?}",
        again.arguments,
        invocation.arguments
    );
    if let Some(id) = &invocation.invocation_id {
        for error in [None, Some(invocation.target.as_str())] {
            let reply = codec::encode_completion(id, error);
            let body = reply
                .strip_suffix(RECORD_SEPARATOR)
                .expect("a completion ends with the separator");
            assert!(!body.contains(RECORD_SEPARATOR));
            let parsed: Value = serde_json::from_str(body).expect("a completion is JSON");
            assert_eq!(parsed["invocationId"], json!(id));
        }
    }
});

/// Equal JSON values, floats allowed to differ in the last bits.
fn same(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) if x.is_f64() || y.is_f64() => {
            match (x.as_f64(), y.as_f64()) {
                (Some(x), Some(y)) => (x - y).abs() <= 1e-12 * x.abs().max(y.abs()),
                _ => false,
            }
        }
        (Value::Array(x), Value::Array(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(x, y)| same(x, y))
        }
        (Value::Object(x), Value::Object(y)) => {
            x.len() == y.len() && x.iter().all(|(k, v)| y.get(k).is_some_and(|w| same(v, w)))
        }
        _ => a == b,
    }
}
