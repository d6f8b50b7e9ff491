//! SignalR handshake request (`handshake::accept`) on one record.
//!
//! Invariants: no panic; an accepted request is a JSON object asking for protocol `json` at a
//! version no higher than `MAX_VERSION`; a refusal's reply is one JSON record `{"error": …}`
//! carrying the refusal's message.
#![no_main]

use gateway::protocol::RECORD_SEPARATOR;
use gateway::protocol::handshake::{self, MAX_VERSION};
use libfuzzer_sys::fuzz_target;
use serde_json::Value;

fuzz_target!(|data: &[u8]| {
    let Ok(record) = std::str::from_utf8(data) else {
        return;
    };
    match handshake::accept(record) {
        Ok(()) => {
            let request: Value = serde_json::from_str(record).expect("accepted means JSON");
            assert_eq!(request["protocol"], "json");
            let version = request["version"]
                .as_u64()
                .expect("accepted means a version");
            assert!(version <= MAX_VERSION);
        }
        Err(error) => {
            assert!(!error.label().is_empty());
            let reply = error.reply();
            let body = reply
                .strip_suffix(RECORD_SEPARATOR)
                .expect("a reply ends with the separator");
            assert!(!body.contains(RECORD_SEPARATOR));
            let parsed: Value = serde_json::from_str(body).expect("a reply is JSON");
            assert_eq!(parsed["error"], error.to_string());
        }
    }
});
