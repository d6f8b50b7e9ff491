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
use serde_json::value::RawValue;
use std::collections::HashMap;

fuzz_target!(|data: &[u8]| {
    let Ok(record) = std::str::from_utf8(data) else {
        return;
    };
    match handshake::accept(record) {
        Ok(()) => {
            // Raw values: other fields may hold numbers (`1e999`) that `Value` cannot.
            let request: HashMap<String, Box<RawValue>> =
                serde_json::from_str(record).expect("accepted means a JSON object");
            let field = |name: &str| request.get(name).map(|raw| raw.get());
            let protocol: String = serde_json::from_str(field("protocol").unwrap_or_default())
                .expect("accepted means a protocol");
            assert_eq!(protocol, "json");
            let version: u64 = serde_json::from_str(field("version").unwrap_or_default())
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
