//! SignalR hub message parser (`codec::decode`) on one record.
//!
//! Invariants: no panic; an invocation written back as JSON decodes to the same message; a
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
    assert_eq!(again, message);
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
