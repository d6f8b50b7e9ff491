//! `POST /api/v1/events`: backends publish over HTTP with the service key.
//!
//! The body is validated once with the contract's rules, then its bytes travel unchanged, so
//! fields a newer backend adds reach the browsers. Publishing is idempotent: the
//! `Idempotency-Key` header (or, without it, the event's own unique id) seen again within the
//! window is acknowledged with `"duplicate": true` and not delivered twice.

use axum::Json;
use axum::body::Bytes;
use axum::extract::State;
use axum::extract::rejection::BytesRejection;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use publisher_lib::contract::{self, Event, ValidationError};
use serde::Serialize;
use serde_json::json;
use subtle::ConstantTimeEq;

use super::{AppState, bearer};
use crate::limits::Refusal;
use crate::metrics;
use crate::protocol::frames;

/// What a publisher is told when the broker fails; the detail is logged, never sent.
pub const UNAVAILABLE: &str = "unavailable";

/// Validates and publishes one event.
pub async fn publish(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let Some(key) = &state.service_key else {
        return error(
            StatusCode::FORBIDDEN,
            "HTTP publishing is disabled: no service key is configured",
        );
    };
    let presented = bearer(&headers).unwrap_or_default();
    if !bool::from(presented.as_bytes().ct_eq(key.as_bytes())) {
        let reason = if presented.is_empty() {
            "missing"
        } else {
            "wrong_key"
        };
        metrics::auth_failed("publish", reason);
        return error(StatusCode::UNAUTHORIZED, "missing or invalid service key");
    }
    if let Err(refusal) = state.limits.try_publish() {
        return too_many(refusal);
    }
    let body = match body {
        Ok(body) => body,
        // Over the body limit (413) or unreadable: answered in the same JSON shape as the rest.
        Err(rejection) => {
            metrics::event_rejected("unreadable_body");
            return error(rejection.status(), &rejection.body_text());
        }
    };
    let payload = trim(body);
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
    let groups = event.groups();
    let published = match state
        .broker
        .publish(event.kind(), payload, &groups, &key)
        .await
    {
        Ok(published) => published,
        // The broker's text can name Redis hosts (`MOVED 10.0.0.7:6379`) or its memory state:
        // it goes to the log, the publisher gets a fixed word.
        Err(e) => {
            tracing::warn!(error = %e, "publish failed");
            return error(StatusCode::SERVICE_UNAVAILABLE, UNAVAILABLE);
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
    (StatusCode::ACCEPTED, Json(answer)).into_response()
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
