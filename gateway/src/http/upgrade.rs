//! `GET /hub/v1`: check Origin, token and connection token, answer the WebSocket upgrade, then
//! hand the raw connection to a tracked connection task.
//!
//! The upgrade is answered here rather than by a WebSocket library so that the connection task
//! gets the TCP stream itself and can write shared, ready-made frames to it.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::extract::{ConnectInfo, Query, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use hyper_util::rt::TokioIo;
use serde::Deserialize;
use tokio::net::TcpStream;
use tracing::Instrument;

use super::{AppState, bearer, unauthorized};
use crate::auth::AuthError;
use crate::connection::{Connection, Socket};
use crate::metrics;

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
    mut request: Request,
) -> Response {
    let headers = request.headers();
    let key = match websocket_key(headers) {
        Ok(key) => key,
        Err(refused) => return refused.into_response(),
    };
    if !state.origins.allows_upgrade(headers) {
        metrics::origin_refused("upgrade");
        return (StatusCode::FORBIDDEN, "origin not allowed").into_response();
    }
    // Checked before the token so a flood of upgrades costs no signature checks.
    let client = state
        .limits
        .client_address(remote.ip(), forwarded_for(headers).as_deref());
    if let Err(refusal) = state.limits.try_connect(client) {
        return super::too_many(refusal);
    }
    let token = query.access_token.as_deref().or_else(|| bearer(headers));
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
    // Admitted before any task exists; the permit travels into the connection task and gives
    // its slots back when that ends, however it ends.
    let permit = match state.limits.try_admit(&principal.subject, client) {
        Ok(permit) => permit,
        Err(refusal) => return super::too_many(refusal),
    };
    let on_upgrade = hyper::upgrade::on(&mut request);
    let conn = Connection {
        id: state.groups.next_conn_id(),
        principal,
        groups: Arc::clone(&state.groups),
        broker: state.broker.clone(),
        settings: Arc::clone(&state.settings),
        permit,
    };
    let span = tracing::debug_span!(
        "connection",
        conn.id = ?conn.id,
        conn.public_id = connection_id.as_deref().unwrap_or("-"),
        user.id = %conn.principal.subject,
        role = conn.principal.role.label(),
        remote.addr = %remote,
    );
    let max_message = state.settings.max_message_bytes;
    state.shutdown.connections().spawn(async move {
        let upgraded = match on_upgrade.await {
            Ok(upgraded) => upgraded,
            Err(e) => {
                tracing::debug!(error = %e, "upgrade failed");
                return;
            }
        };
        // The listener hands out plain TCP streams; take the stream itself, so frames are
        // written to it without another layer and fan-out can write to it directly.
        let Ok(parts) =
            hyper_util::server::conn::auto::upgrade::downcast::<TokioIo<TcpStream>>(upgraded)
        else {
            tracing::error!("upgraded connection is not a TCP stream; closing it");
            return;
        };
        let (reader, writer) = parts.io.into_inner().into_split();
        let serve = conn.serve(Socket::new(
            reader,
            Arc::new(writer),
            parts.read_buf,
            max_message,
        ));
        // A disabled span still costs a little on every poll; attach it only when enabled.
        if span.is_disabled() {
            serve.await;
        } else {
            serve.instrument(span).await;
        }
    });
    let mut response = StatusCode::SWITCHING_PROTOCOLS.into_response();
    let headers = response.headers_mut();
    headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    headers.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
    if let Ok(accept) = HeaderValue::from_str(&ws_frame::accept_key(&key)) {
        headers.insert(header::SEC_WEBSOCKET_ACCEPT, accept);
    }
    response
}

/// Why a request to the hub is not a WebSocket upgrade this gateway can serve.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum NotAnUpgrade {
    /// No `Connection: upgrade` and `Upgrade: websocket`: a plain HTTP request.
    Plain,
    /// A `Sec-WebSocket-Version` other than 13 (or none).
    WrongVersion,
    /// No `Sec-WebSocket-Key`, or one that is not the base64 of 16 bytes.
    BadKey,
}

impl IntoResponse for NotAnUpgrade {
    /// 400 with the reason, except a wrong version: `426 Upgrade Required` naming the version
    /// served (RFC 6455 §4.4).
    fn into_response(self) -> Response {
        let why = match self {
            Self::Plain => "not a WebSocket upgrade request",
            Self::WrongVersion => "WebSocket version 13 is required",
            Self::BadKey => "Sec-WebSocket-Key must be the base64 of 16 bytes",
        };
        let body = format!(
            "{}: only WebSocket upgrades are served here ({why})",
            super::HUB_PATH
        );
        if self == Self::WrongVersion {
            let version = [(
                header::SEC_WEBSOCKET_VERSION,
                HeaderValue::from_static("13"),
            )];
            return (StatusCode::UPGRADE_REQUIRED, version, body).into_response();
        }
        (StatusCode::BAD_REQUEST, body).into_response()
    }
}

/// The client's `Sec-WebSocket-Key`, if the request is a WebSocket upgrade we can serve.
fn websocket_key(headers: &HeaderMap) -> Result<String, NotAnUpgrade> {
    let has_token = |name: header::HeaderName, token: &str| {
        headers.get_all(name).iter().any(|value| {
            value
                .to_str()
                .is_ok_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
        })
    };
    if !has_token(header::CONNECTION, "upgrade") || !has_token(header::UPGRADE, "websocket") {
        return Err(NotAnUpgrade::Plain);
    }
    if headers
        .get(header::SEC_WEBSOCKET_VERSION)
        .is_none_or(|v| v.as_bytes() != b"13")
    {
        return Err(NotAnUpgrade::WrongVersion);
    }
    headers
        .get(header::SEC_WEBSOCKET_KEY)
        .and_then(|key| key.to_str().ok())
        .filter(|key| ws_frame::server::is_valid_key(key))
        .map(str::to_owned)
        .ok_or(NotAnUpgrade::BadKey)
}

/// Every `X-Forwarded-For` value, in order, as one list.
fn forwarded_for(headers: &HeaderMap) -> Option<String> {
    let values: Vec<&str> = headers
        .get_all("x-forwarded-for")
        .iter()
        .filter_map(|value| value.to_str().ok())
        .collect();
    (!values.is_empty()).then(|| values.join(","))
}
