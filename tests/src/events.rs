//! Contract events as the tests publish them.

use serde_json::Value;

/// A `RecommendationReady` event for `region` as compact JSON, with `extra` fields appended
/// (fields the contract does not name travel through unchanged).
pub fn recommendation_ready(region: &str, extra: &[(&str, Value)]) -> String {
    let mut event = serde_json::json!({
        "type": "RecommendationReady",
        "jobId": uuid::Uuid::new_v4(),
        "requestId": uuid::Uuid::new_v4(),
        "region": region,
        "configVersion": 3,
        "generatedAt": "2025-11-08T12:34:56Z",
    });
    let object = event.as_object_mut().expect("the event is an object");
    for (name, value) in extra {
        object.insert((*name).to_owned(), value.clone());
    }
    event.to_string()
}
