//! Event validation (`contract::Event::from_json`), the check every published event passes.
//!
//! Invariants: no panic; nothing over `MAX_EVENT_BYTES` is accepted; an accepted event encodes
//! again (`to_json`), and that encoding reads back as the same event with the same routing; an
//! accepted event routes to at least one group, whose channel maps back to it.
#![no_main]

use libfuzzer_sys::fuzz_target;
use publisher_lib::contract::{Event, Group, MAX_EVENT_BYTES};

fuzz_target!(|data: &[u8]| {
    let event = match Event::from_json(data) {
        Ok(event) => event,
        Err(error) => {
            assert!(!error.to_string().is_empty());
            return;
        }
    };
    assert!(data.len() <= MAX_EVENT_BYTES);
    let groups = event.groups();
    assert!(!groups.is_empty(), "an accepted event routes nowhere");
    for group in &groups {
        let channel = group.channel("rt:");
        assert_eq!(Group::from_channel("rt:", &channel).as_ref(), Some(group));
    }
    let json = event.to_json().expect("an accepted event encodes");
    let again = Event::from_json(&json).expect("an encoded event reads back");
    assert_eq!(again, event);
    assert_eq!(again.groups(), groups);
    assert_eq!(again.unique_id(), event.unique_id());
});
