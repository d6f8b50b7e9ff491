//! `GET /hub/v1`: check Origin, token and connection token, then hand the socket to a tracked
//! connection task.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::extract::ws::WebSocketUpgrade;
use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::{ConnectInfo, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use futures_util::future::Either;
use serde::Deserialize;
use tracing::Instrument;

use super::{AppState, bearer, unauthorized};
use crate::auth::AuthError;
use crate::connection::Connection;
use crate::metrics;

/// Read buffer per connection. Clients send little (pings, joins), and a small buffer keeps an
/// idle connection cheap; larger messages are still read, in several steps.
const READ_BUFFER_BYTES: usize = 512;
/// Bytes buffered before tungstenite writes to the socket; frames of one batch are flushed together.
const WRITE_BUFFER_BYTES: usize = 16 * 1024;
/// Most bytes tungstenite buffers for a socket that does not drain.
const MAX_WRITE_BUFFER_BYTES: usize = 1024 * 1024;

/// The query of the upgrade request.
#[derive(Debug, Deserialize)]
pub struct UpgradeQuery {
    /// The connection token from negotiate; absent with `skipNegotiation`.
    id: Option<String>,
    /// The user token, as browsers send it.
    access_token: Option<String>,
}

/// Upgrades an authenticated request to a SignalR connection.
pub async fn upgrade(
    State(state): State<AppState>,
    ConnectInfo(remote): ConnectInfo<SocketAddr>,
    Query(query): Query<UpgradeQuery>,
    headers: HeaderMap,
    upgrade: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Response {
    let upgrade = match upgrade {
        Ok(upgrade) => upgrade,
        Err(rejection) => {
            return (
                StatusCode::BAD_REQUEST,
                format!(
                    "{HUB}: only WebSocket upgrades are served here ({rejection})",
                    HUB = super::HUB_PATH
                ),
            )
                .into_response();
        }
    };
    if !state.origins.allows_upgrade(&headers) {
        metrics::origin_refused("upgrade");
        return (StatusCode::FORBIDDEN, "origin not allowed").into_response();
    }
    let token = query.access_token.as_deref().or_else(|| bearer(&headers));
    let principal = match token
        .ok_or(AuthError::Missing)
        .and_then(|token| state.verifier.verify(token))
    {
        Ok(principal) => principal,
        Err(error) => {
            metrics::auth_failed("upgrade", error.label());
            return unauthorized(&error);
        }
    };
    let connection_id = match &query.id {
        None => None,
        Some(token) => {
            let now = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs());
            match state
                .connection_tokens
                .verify(token, &principal.subject, now)
            {
                Ok(id) => Some(id),
                Err(error) => {
                    metrics::auth_failed("upgrade", "connection_token");
                    return (
                        StatusCode::NOT_FOUND,
                        format!("No Connection with that ID: {error}"),
                    )
                        .into_response();
                }
            }
        }
    };
    let conn = Connection {
        id: state.groups.next_conn_id(),
        principal,
        groups: Arc::clone(&state.groups),
        settings: Arc::clone(&state.settings),
    };
    let span = tracing::debug_span!(
        "connection",
        conn.id = ?conn.id,
        conn.public_id = connection_id.as_deref().unwrap_or("-"),
        user.id = %conn.principal.subject,
        role = conn.principal.role.label(),
        remote.addr = %remote,
    );
    let tracker = state.shutdown.connections().clone();
    let max_message = state.settings.max_message_bytes;
    upgrade
        .read_buffer_size(READ_BUFFER_BYTES)
        .write_buffer_size(WRITE_BUFFER_BYTES)
        .max_write_buffer_size(MAX_WRITE_BUFFER_BYTES)
        .max_message_size(max_message)
        .max_frame_size(max_message)
        .on_upgrade(move |socket| {
            // A disabled span still costs a little on every poll of every connection; attach
            // it only when its level is enabled.
            let serve = conn.serve(socket);
            if span.is_disabled() {
                Either::Left(tracker.track_future(serve))
            } else {
                Either::Right(tracker.track_future(serve.instrument(span)))
            }
        })
}
