//! SignalR record splitter (`RecordBuffer`) fed text messages cut at arbitrary points, and every
//! record it yields decoded as a hub message.
//!
//! Input: `[limit selector, count, count chunk lengths..., UTF-8 text...]` (see `gateway_fuzz`).
//! Invariants: no panic; without an error, the records joined by the separator are exactly the
//! text, and none is longer than the limit or contains a separator; an error is `TooLarge` and
//! only when a message, a record or an unfinished record really is over the limit.
#![no_main]

use gateway::protocol::{ProtocolError, RECORD_SEPARATOR, RecordBuffer, codec};
use gateway_fuzz::Chunked;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some(input) = Chunked::parse(data) else {
        return;
    };
    let Ok(text) = std::str::from_utf8(input.stream) else {
        return;
    };
    let limit = input.limit;
    let mut buffer = RecordBuffer::new(limit);
    let mut records = Vec::new();
    let mut fed = String::new();
    for chunk in Chunked::text_chunks(text, input.lengths()) {
        fed.push_str(chunk);
        match buffer.feed(chunk) {
            Ok(mut complete) => records.append(&mut complete),
            Err(error) => {
                assert_eq!(error, ProtocolError::TooLarge { limit });
                let over = chunk.len() > limit
                    || fed.split(RECORD_SEPARATOR).any(|piece| piece.len() > limit);
                assert!(over, "TooLarge without anything over {limit} bytes");
                return;
            }
        }
    }
    // A final separator completes the unfinished record, if any.
    match buffer.feed("\u{1e}") {
        Ok(mut complete) => records.append(&mut complete),
        Err(error) => {
            assert_eq!(error, ProtocolError::TooLarge { limit });
            let last = fed.rsplit(RECORD_SEPARATOR).next().unwrap_or("");
            assert!(
                last.len() > limit,
                "TooLarge for a {}-byte record",
                last.len()
            );
            return;
        }
    }
    for record in &records {
        assert!(record.len() <= limit && !record.contains(RECORD_SEPARATOR));
        let _ = codec::decode(record);
    }
    // Every separator ended a record, the final one included.
    assert_eq!(records.join("\u{1e}"), text);
});
