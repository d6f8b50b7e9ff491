//! Redis envelope decoder (`contract::Envelope::decode`), what every replica reads from a
//! channel.
//!
//! Invariants: no panic; a decoded envelope encodes again (`Envelope::encode`) and reads back
//! with the same id, kind, time and event bytes; the event text is one complete JSON value.
#![no_main]

use libfuzzer_sys::fuzz_target;
use publisher_lib::contract::Envelope;

fuzz_target!(|data: &[u8]| {
    let envelope = match Envelope::decode(data) {
        Ok(envelope) => envelope,
        Err(error) => {
            assert!(!error.to_string().is_empty());
            return;
        }
    };
    // Syntax only: a number outside f64 (`1e999`) is valid JSON that `Value` cannot hold, and
    // the event's bytes are forwarded, never parsed, by the gateway.
    serde_json::from_str::<Box<serde_json::value::RawValue>>(&envelope.event)
        .expect("the event is one JSON value");
    let encoded = Envelope::encode(
        envelope.id,
        envelope.kind,
        envelope.published_at_micros,
        &envelope.event,
    );
    let again = Envelope::decode(&encoded).expect("an encoded envelope decodes");
    assert_eq!(again.id, envelope.id);
    assert_eq!(again.kind, envelope.kind);
    assert_eq!(again.published_at_micros, envelope.published_at_micros);
    assert_eq!(again.event, envelope.event);
    assert_eq!(again.position, None);
});
