//! `POST /api/v1/events` and `POST /api/v1/events/batch`: backends publish over HTTP with the
//! service key, one event or an array of them.
//!
//! The body is validated once with the contract's rules, then its bytes travel unchanged, so
//! fields a newer backend adds reach the browsers. Publishing is idempotent: the
//! `Idempotency-Key` header (or, without it, the event's own unique id) seen again within the
//! window is acknowledged with `"duplicate": true` and not delivered twice.

use std::collections::HashMap;

use axum::Json;
use axum::body::Bytes;
use axum::extract::State;
use axum::extract::rejection::BytesRejection;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use futures_util::future::join_all;
use publisher_lib::contract::{self, Event, Group, ValidationError};
use serde::Serialize;
use serde_json::json;
use serde_json::value::RawValue;
use subtle::ConstantTimeEq;

use super::{AppState, bearer};
use crate::limits::Refusal;
use crate::metrics;
use crate::protocol::frames;

/// What a publisher is told when the broker fails; the detail is logged, never sent.
pub const UNAVAILABLE: &str = "unavailable";

/// Most events in one `POST /api/v1/events/batch`.
pub const MAX_BATCH_EVENTS: usize = 100;

/// Validates and publishes one event.
pub async fn publish(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    if let Some(refused) = unauthorized(&state, &headers) {
        return refused;
    }
    if let Err(refusal) = state.limits.try_publish() {
        return too_many(refusal);
    }
    let payload = match readable(body) {
        Ok(payload) => payload,
        Err(refused) => return *refused,
    };
    let event = match Event::from_json(&payload) {
        Ok(event) => event,
        Err(e) => {
            metrics::event_rejected(rejection_label(&e));
            return error(StatusCode::BAD_REQUEST, &e.to_string());
        }
    };
    let key = match headers.get("idempotency-key").map(|v| v.to_str()) {
        None => event.unique_id(),
        Some(Ok(key)) if contract::check_idempotency_key(key).is_ok() => key.to_owned(),
        Some(_) => {
            metrics::event_rejected("bad_idempotency_key");
            return error(
                StatusCode::BAD_REQUEST,
                &format!(
                    "Idempotency-Key must be 1 to {} printable ASCII characters without spaces",
                    contract::MAX_IDEMPOTENCY_KEY_LEN
                ),
            );
        }
    };
    match publish_event(&state, &event, payload, &key).await {
        Ok(answer) => (StatusCode::ACCEPTED, Json(answer)).into_response(),
        Err(BrokerDown) => error(StatusCode::SERVICE_UNAVAILABLE, UNAVAILABLE),
    }
}

/// Validates a JSON array of events, all of them before any is published, then publishes
/// them, each under its own unique id: events that share a group in array order, the others
/// side by side.
pub async fn publish_batch(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    if let Some(refused) = unauthorized(&state, &headers) {
        return refused;
    }
    if headers.contains_key("idempotency-key") {
        metrics::event_rejected("bad_idempotency_key");
        return error(
            StatusCode::BAD_REQUEST,
            "Idempotency-Key applies to single events; each event of a batch is keyed by its own id",
        );
    }
    let payload = match readable(body) {
        Ok(payload) => payload,
        Err(refused) => return *refused,
    };
    let items: Vec<&RawValue> = match serde_json::from_slice(&payload) {
        Ok(items) => items,
        Err(e) => {
            metrics::event_rejected("not_json");
            return error(
                StatusCode::BAD_REQUEST,
                &format!("a batch is a JSON array of events: {e}"),
            );
        }
    };
    if items.is_empty() || items.len() > MAX_BATCH_EVENTS {
        metrics::event_rejected("batch_size");
        return error(
            StatusCode::BAD_REQUEST,
            &format!(
                "a batch holds 1 to {MAX_BATCH_EVENTS} events, not {}",
                items.len()
            ),
        );
    }
    let mut events = Vec::with_capacity(items.len());
    for (index, item) in items.iter().enumerate() {
        // The event's own bytes, as they came: they travel unchanged.
        let bytes = payload.slice_ref(item.get().as_bytes());
        match Event::from_json(&bytes) {
            Ok(event) => events.push((event, bytes)),
            Err(e) => {
                metrics::event_rejected(rejection_label(&e));
                return refused_at(StatusCode::BAD_REQUEST, index, &e.to_string());
            }
        }
    }
    let count = u32::try_from(events.len()).unwrap_or(u32::MAX);
    let rate = state.limits.publishes_per_second();
    if rate != 0 && count > rate {
        metrics::event_rejected("batch_size");
        return error(
            StatusCode::BAD_REQUEST,
            &format!(
                "a batch of {count} events is more than the {rate} publishes a second allowed"
            ),
        );
    }
    if let Err(refusal) = state.limits.try_publish_many(count) {
        return too_many(refusal);
    }
    // Events that share a group run one after another, in array order; the others side by
    // side, so a Redis publisher can carry them in one script call.
    let chains = chains(events.iter().map(|(event, _)| event.groups()));
    let state = &state;
    let events = &events;
    let outcomes = join_all(chains.into_iter().map(|chain| async move {
        let mut outcomes = Vec::with_capacity(chain.len());
        for index in chain {
            let (event, bytes) = &events[index];
            let outcome = publish_event(state, event, bytes.clone(), &event.unique_id()).await;
            let failed = outcome.is_err();
            outcomes.push((index, outcome));
            // The rest of this chain waits for a retry, so its groups keep their order.
            if failed {
                break;
            }
        }
        outcomes
    }))
    .await;
    let mut results: Vec<Option<Box<RawValue>>> = vec![None; events.len()];
    let mut failed = false;
    for (index, outcome) in outcomes.into_iter().flatten() {
        match outcome {
            Ok(answer) => results[index] = Some(answer),
            Err(BrokerDown) => failed = true,
        }
    }
    if failed {
        // Which events went out; a retry of the whole batch publishes only the others (each
        // event's id makes a repeat a duplicate).
        let published: Vec<usize> = (0..results.len())
            .filter(|i| results[*i].is_some())
            .collect();
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({ "error": UNAVAILABLE, "published": published })),
        )
            .into_response();
    }
    let results: Vec<Box<RawValue>> = results.into_iter().flatten().collect();
    (StatusCode::ACCEPTED, Json(json!({ "results": results }))).into_response()
}

/// Splits a batch into chains: each event's index goes into one chain with every earlier
/// event it shares a group with (transitively), in array order; chains share no group.
fn chains(groups_per_event: impl Iterator<Item = Vec<Group>>) -> Vec<Vec<usize>> {
    let mut chains: Vec<Vec<usize>> = Vec::new();
    let mut chain_of: HashMap<Group, usize> = HashMap::new();
    for (index, groups) in groups_per_event.enumerate() {
        let mut joined: Vec<usize> = groups
            .iter()
            .filter_map(|group| chain_of.get(group).copied())
            .collect();
        joined.sort_unstable();
        joined.dedup();
        let chain = match joined.split_first() {
            None => {
                chains.push(Vec::new());
                chains.len() - 1
            }
            Some((&first, others)) => {
                for &other in others {
                    let moved = std::mem::take(&mut chains[other]);
                    chains[first].extend(moved);
                }
                if !others.is_empty() {
                    chains[first].sort_unstable();
                    for owner in chain_of.values_mut() {
                        if others.contains(owner) {
                            *owner = first;
                        }
                    }
                }
                first
            }
        };
        chains[chain].push(index);
        for group in groups {
            chain_of.insert(group, chain);
        }
    }
    chains.retain(|chain| !chain.is_empty());
    chains
}

/// The broker failed; its detail is in the log.
struct BrokerDown;

/// Publishes one validated event under `key` and returns the answer for it.
async fn publish_event(
    state: &AppState,
    event: &Event,
    payload: Bytes,
    key: &str,
) -> Result<Box<RawValue>, BrokerDown> {
    let groups = event.groups();
    let published = match state
        .broker
        .publish(event.kind(), payload, &groups, key)
        .await
    {
        Ok(published) => published,
        // The broker's text can name Redis hosts (`MOVED 10.0.0.7:6379`) or its memory state:
        // it goes to the log, the publisher gets a fixed word.
        Err(e) => {
            tracing::warn!(error = %e, "publish failed");
            return Err(BrokerDown);
        }
    };
    let duplicate = !published.is_empty() && published.iter().all(|p| p.duplicate);
    metrics::event_published(if duplicate { "http_duplicate" } else { "http" });
    let answer = Accepted {
        duplicate,
        groups: groups.iter().map(|g| g.name()).collect(),
        positions: published
            .iter()
            .map(|p| frames::GroupPosition::new(&p.group, &p.position))
            .collect(),
        kind: event.kind().name(),
    };
    serde_json::value::to_raw_value(&answer).map_err(|e| {
        tracing::error!(error = %e, "publish answer not serializable");
        BrokerDown
    })
}

/// Checks the service key: the answer when it is missing or wrong.
fn unauthorized(state: &AppState, headers: &HeaderMap) -> Option<Response> {
    let Some(key) = &state.service_key else {
        return Some(error(
            StatusCode::FORBIDDEN,
            "HTTP publishing is disabled: no service key is configured",
        ));
    };
    let presented = bearer(headers).unwrap_or_default();
    if !bool::from(presented.as_bytes().ct_eq(key.as_bytes())) {
        let reason = if presented.is_empty() {
            "missing"
        } else {
            "wrong_key"
        };
        metrics::auth_failed("publish", reason);
        return Some(error(
            StatusCode::UNAUTHORIZED,
            "missing or invalid service key",
        ));
    }
    None
}

/// The body without surrounding whitespace, or the answer to a body over the limit (413) or
/// unreadable, in the endpoint's JSON shape.
fn readable(body: Result<Bytes, BytesRejection>) -> Result<Bytes, Box<Response>> {
    match body {
        Ok(body) => Ok(trim(body)),
        Err(rejection) => {
            metrics::event_rejected("unreadable_body");
            Err(Box::new(error(rejection.status(), &rejection.body_text())))
        }
    }
}

/// The answer to an accepted publish, serialized straight from borrowed fields (no JSON value
/// tree per request). Fields in alphabetical order: the bytes are those the endpoint always sent.
#[derive(Serialize)]
struct Accepted<'a> {
    duplicate: bool,
    groups: Vec<&'a str>,
    positions: Vec<frames::GroupPosition<'a>>,
    #[serde(rename = "type")]
    kind: &'static str,
}

/// 429 with `Retry-After`, in the endpoint's JSON shape, naming the limit.
fn too_many(refusal: Refusal) -> Response {
    let retry_after = refusal.retry_after.as_secs().max(1);
    (
        StatusCode::TOO_MANY_REQUESTS,
        [(header::RETRY_AFTER, retry_after.to_string())],
        Json(json!({
            "error": refusal.limit.reason(),
            "limit": refusal.limit.label(),
            "retryAfterSeconds": retry_after,
        })),
    )
        .into_response()
}

fn error(status: StatusCode, message: &str) -> Response {
    (status, Json(json!({ "error": message }))).into_response()
}

/// As [`error`], naming the batch element at fault.
fn refused_at(status: StatusCode, index: usize, message: &str) -> Response {
    (
        status,
        Json(json!({ "error": format!("event {index}: {message}"), "index": index })),
    )
        .into_response()
}

fn rejection_label(error: &ValidationError) -> &'static str {
    match error {
        ValidationError::TooLarge { .. } => "too_large",
        ValidationError::NotJson(_) => "not_json",
        ValidationError::MissingType | ValidationError::UnknownType(_) => "unknown_type",
        _ => "invalid_field",
    }
}

/// The body without surrounding whitespace, so the frame carries just the JSON value.
fn trim(body: Bytes) -> Bytes {
    let start = body
        .iter()
        .position(|b| !b.is_ascii_whitespace())
        .unwrap_or(body.len());
    let end = body
        .iter()
        .rposition(|b| !b.is_ascii_whitespace())
        .map_or(start, |e| e + 1);
    body.slice(start..end)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn groups(names: &[&str]) -> Vec<Group> {
        names
            .iter()
            .map(|name| Group::try_dispatch(name).expect("a valid region"))
            .collect()
    }

    #[test]
    fn events_sharing_a_group_share_a_chain_in_array_order_and_the_others_do_not() {
        let batch = [
            groups(&["a"]),
            groups(&["b"]),
            groups(&["a"]),
            groups(&["c"]),
            groups(&["b"]),
        ];
        assert_eq!(chains(batch.into_iter()), [vec![0, 2], vec![1, 4], vec![3]]);
    }

    #[test]
    fn an_event_of_two_groups_joins_their_chains() {
        // Event 2 is in a and b (a JobAssigned's region and contractor): everything of a and
        // b before it must be published first, and what follows in either after it.
        let batch = [
            groups(&["a"]),
            groups(&["b"]),
            groups(&["a", "b"]),
            groups(&["c"]),
            groups(&["b"]),
            groups(&["a"]),
        ];
        assert_eq!(chains(batch.into_iter()), [vec![0, 1, 2, 4, 5], vec![3]]);
    }
}
