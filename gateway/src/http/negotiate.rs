//! `POST /hub/v1/negotiate`: authenticate, hand out a connection id and token, offer WebSockets.
//!
//! Nothing is stored: the connection token is signed with the key every replica shares, so the
//! upgrade may land on any replica. A client that asks for stateful reconnect
//! (`useStatefulReconnect=true`) gets it, and its token says so.

use std::collections::HashMap;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::Json;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::json;

use super::{AppState, bearer, unauthorized};
use crate::auth::AuthError;
use crate::metrics;

/// Answers a negotiate request.
pub async fn negotiate(
    State(state): State<AppState>,
    Query(query): Query<HashMap<String, String>>,
    headers: HeaderMap,
) -> Response {
    let cors = state.origins.cors_headers(&headers, false);
    if headers.contains_key(axum::http::header::ORIGIN) && cors.is_none() {
        metrics::origin_refused("negotiate");
        return (StatusCode::FORBIDDEN, "origin not allowed").into_response();
    }
    let cors = cors.unwrap_or_default();
    let principal = match bearer(&headers)
        .ok_or(AuthError::Missing)
        .and_then(|token| state.verifier.verify(token))
    {
        Ok(principal) => principal,
        Err(error) => {
            metrics::auth_failed("negotiate", error.label());
            return (cors, unauthorized(&error)).into_response();
        }
    };
    // .NET looks the version up case-insensitively; absent means version 0.
    let version = query
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case("negotiateVersion"))
        .map(|(_, v)| v.parse::<u64>());
    let version = match version {
        None => 0,
        Some(Ok(v)) => v.min(1),
        Some(Err(_)) => {
            return (
                cors,
                Json(json!({"error": "The client requested a non-integer protocol version."})),
            )
                .into_response();
        }
    };
    // Stateful reconnect needs a connection token (version 1) and is offered unless turned off.
    let stateful = version >= 1
        && !state.settings.stateful_grace.is_zero()
        && query
            .iter()
            .any(|(k, v)| k.eq_ignore_ascii_case("useStatefulReconnect") && v == "true");
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let issued =
        state
            .connection_tokens
            .issue_for(rand::random(), &principal.subject, now, stateful);
    let transports = json!([{"transport": "WebSockets", "transferFormats": ["Text"]}]);
    let body = if version >= 1 {
        let mut body = json!({
            "negotiateVersion": 1,
            "connectionId": issued.connection_id,
            "connectionToken": issued.connection_token,
            "availableTransports": transports,
        });
        // Written only when agreed, as ASP.NET Core does: a client that did not ask fails on it.
        if stateful {
            body["useStatefulReconnect"] = json!(true);
        }
        body
    } else {
        // Version 0 clients connect with the connection id, so it must be the verifiable token.
        json!({
            "negotiateVersion": 0,
            "connectionId": issued.connection_token,
            "availableTransports": transports,
        })
    };
    (cors, Json(body)).into_response()
}

/// Answers a CORS preflight for negotiate.
pub async fn preflight(State(state): State<AppState>, headers: HeaderMap) -> Response {
    match state.origins.cors_headers(&headers, true) {
        Some(cors) => (StatusCode::NO_CONTENT, cors).into_response(),
        None => {
            metrics::origin_refused("preflight");
            (StatusCode::FORBIDDEN, "origin not allowed").into_response()
        }
    }
}
