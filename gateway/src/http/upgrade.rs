//! `GET /hub/v1`: check Origin, token and connection token, answer the WebSocket upgrade, then
//! hand the raw connection to a tracked connection task.
//!
//! The upgrade is answered here rather than by a WebSocket library so that the connection task
//! gets the TCP stream itself and can write shared, ready-made frames to it.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::extract::{ConnectInfo, Query, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use hyper_util::rt::TokioIo;
use serde::Deserialize;
use tokio::net::TcpStream;
use tokio::net::tcp::OwnedReadHalf;
use tokio::sync::mpsc;
use tracing::Instrument;

use super::{AppState, bearer, unauthorized};
use crate::auth::AuthError;
use crate::auth::connection_token::ConnectionTokenError;
use crate::broker::redis::{Holder, RedisBroker};
use crate::connection::{Carried, Claim, Connection, Resumed, Socket, Transport};
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
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let claims = match &query.id {
        None => None,
        Some(token) => match state.connection_tokens.open(token, &principal.subject) {
            Ok(claims) => Some(claims),
            Err(error) => return no_connection("connection_token", &error.to_string()),
        },
    };
    let mut resume = None;
    let mut carried = None;
    if let Some(claims) = claims.as_ref().filter(|c| c.stateful) {
        match state
            .resumable
            .claim(&claims.connection_id, now, claims.expires)
        {
            // A live stateful connection: this upgrade is its client coming back, whatever
            // the token's age.
            Claim::Resume(transports) => {
                return resume_upgrade(&state, request, &key, transports, principal.valid_until);
            }
            Claim::Ended => {
                metrics::stateful_transport("refused");
                return no_connection("connection_ended", "the connection has ended");
            }
            // Not here: new, or a client coming back from another replica.
            Claim::New(slot) => {
                let expired = claims.expires < now;
                let redis = state.broker.connections();
                match locate(redis, &claims.connection_id, expired).await {
                    Located::New => resume = Some(slot),
                    Located::Carried(from) if from.subject == principal.subject => {
                        if let Some(redis) = redis
                            && let Err(e) = redis
                                .hold_connection(&claims.connection_id, HELD_MARKER_TTL)
                                .await
                        {
                            tracing::warn!(error = %e, "cannot mark a carried connection as held here");
                        }
                        carried = Some(from);
                        resume = Some(slot);
                    }
                    Located::Carried(_) => {
                        metrics::stateful_transport("refused");
                        return no_connection("connection_token", "carried for another user");
                    }
                    Located::Gone(label, why) => {
                        metrics::stateful_transport("refused");
                        return no_connection(label, why);
                    }
                }
            }
        }
    }
    if let Some(claims) = &claims
        && claims.expires < now
        && carried.is_none()
    {
        return no_connection(
            "connection_token",
            &ConnectionTokenError::Expired.to_string(),
        );
    }
    let connection_id = claims.map(|c| c.connection_id);
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
        carried,
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
        let Some(socket) = upgraded_socket(on_upgrade, max_message).await else {
            return;
        };
        let serve = conn.serve(socket, resume);
        // A disabled span still costs a little on every poll; attach it only when enabled.
        if span.is_disabled() {
            serve.await;
        } else {
            serve.instrument(span).await;
        }
    });
    switching_protocols(&key)
}

/// How long the marker of a stateful connection held by a replica lives in Redis: a
/// connection that outlives it is still resumed on its own replica, and elsewhere its client
/// starts over.
const HELD_MARKER_TTL: Duration = Duration::from_secs(24 * 3600);
/// How long an upgrade waits for the replica holding a connection to hand it over.
const HANDOVER_WAIT: Duration = Duration::from_secs(2);
/// How often it looks whether the connection was handed over meanwhile.
const HANDOVER_POLL: Duration = Duration::from_millis(20);

/// Where the client of a stateful connection unknown on this replica comes from.
enum Located {
    /// Nowhere: a new connection (its id is now marked as held here).
    New,
    /// Another replica: the connection, to go on with here.
    Carried(Box<Carried>),
    /// It ended, or it cannot be had: the upgrade is refused (label and reason).
    Gone(&'static str, &'static str),
}

/// Finds out whether stateful connection `id` is new, or where it lives: parked in Redis by a
/// replica that drained, or held by a live replica, which is asked to hand it over. Without
/// Redis there is no other replica. Redis failing leaves a fresh token new (the connection
/// could not join groups anyway) and refuses a resume.
async fn locate(redis: Option<&RedisBroker>, id: &str, expired: bool) -> Located {
    const ENDED: Located = Located::Gone("connection_ended", "the connection has ended");
    let Some(redis) = redis else {
        return if expired { ENDED } else { Located::New };
    };
    if let Some(carried) = take_parked(redis, id).await {
        return Located::Carried(carried);
    }
    let channel = match redis.holder(id).await {
        Ok(Holder::Replica(channel)) => channel,
        Ok(Holder::Ended) => return ENDED,
        Ok(Holder::Nobody) | Err(_) if expired => return ENDED,
        Ok(Holder::Nobody) => {
            return match redis.claim_connection(id, HELD_MARKER_TTL).await {
                Ok(true) => Located::New,
                Ok(false) => Located::Gone(
                    "connection_elsewhere",
                    "another replica took the connection",
                ),
                Err(e) => {
                    tracing::warn!(error = %e, "cannot mark a stateful connection id as held");
                    Located::New
                }
            };
        }
        Err(e) => {
            tracing::warn!(error = %e, "cannot look up a stateful connection id");
            return Located::New;
        }
    };
    // This replica's own marker for a connection it no longer has: it ended unannounced.
    if channel == redis.replica_channel() {
        return ENDED;
    }
    if redis.request_handover(&channel, id).await.is_err() {
        return Located::Gone("connection_unreachable", "the connection cannot be reached");
    }
    let deadline = tokio::time::Instant::now() + HANDOVER_WAIT;
    while tokio::time::Instant::now() < deadline {
        tokio::time::sleep(HANDOVER_POLL).await;
        if let Some(carried) = take_parked(redis, id).await {
            return Located::Carried(carried);
        }
    }
    Located::Gone(
        "connection_unreachable",
        "the replica holding the connection did not hand it over",
    )
}

/// The state a replica parked for connection `id`, taken (once) and read.
async fn take_parked(redis: &RedisBroker, id: &str) -> Option<Box<Carried>> {
    let parked = match redis.take_parked(id).await {
        Ok(parked) => parked?,
        Err(e) => {
            tracing::debug!(error = %e, "cannot read a parked connection");
            return None;
        }
    };
    match Carried::from_bytes(&parked) {
        Ok(carried) => Some(Box::new(carried)),
        Err(e) => {
            tracing::warn!(error = %e, "dropped a parked connection that cannot be read");
            None
        }
    }
}

/// The 101 answer to a WebSocket upgrade with `key`.
fn switching_protocols(key: &str) -> Response {
    let mut response = StatusCode::SWITCHING_PROTOCOLS.into_response();
    let headers = response.headers_mut();
    headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    headers.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
    if let Ok(accept) = HeaderValue::from_str(&ws_frame::accept_key(key)) {
        headers.insert(header::SEC_WEBSOCKET_ACCEPT, accept);
    }
    response
}

/// 404, as ASP.NET Core answers an upgrade for a connection it does not have: the official
/// client then starts over (negotiate, new connection).
fn no_connection(label: &'static str, why: &str) -> Response {
    metrics::auth_failed("upgrade", label);
    (
        StatusCode::NOT_FOUND,
        format!("No Connection with that ID: {why}"),
    )
        .into_response()
}

/// Answers the upgrade of a client resuming its stateful connection and hands the new socket
/// to the connection's task, which sends the Sequence and what the client has not acknowledged.
/// No handshake follows on a resumed transport.
fn resume_upgrade(
    state: &AppState,
    mut request: Request,
    key: &str,
    transports: mpsc::Sender<Transport<OwnedReadHalf>>,
    valid_until: u64,
) -> Response {
    let on_upgrade = hyper::upgrade::on(&mut request);
    let max_message = state.settings.max_message_bytes;
    let wait = state.settings.handshake_timeout;
    state.shutdown.connections().spawn(async move {
        let Some(socket) = upgraded_socket(on_upgrade, max_message).await else {
            return;
        };
        let resumed = Transport::Resumed(Box::new(Resumed {
            socket,
            valid_until,
        }));
        // Refused when the connection ended meanwhile: the socket is dropped, and the client
        // starts over.
        if transports.send_timeout(resumed, wait).await.is_err() {
            tracing::debug!("the resumed connection ended before it took its new transport");
        }
    });
    switching_protocols(key)
}

/// The upgraded connection as a [`Socket`] over its TCP stream.
async fn upgraded_socket(
    on_upgrade: hyper::upgrade::OnUpgrade,
    max_message: usize,
) -> Option<Socket<OwnedReadHalf>> {
    let upgraded = match on_upgrade.await {
        Ok(upgraded) => upgraded,
        Err(e) => {
            tracing::debug!(error = %e, "upgrade failed");
            return None;
        }
    };
    // The listener hands out plain TCP streams; take the stream itself, so frames are
    // written to it without another layer and fan-out can write to it directly.
    let Ok(parts) =
        hyper_util::server::conn::auto::upgrade::downcast::<TokioIo<TcpStream>>(upgraded)
    else {
        tracing::error!("upgraded connection is not a TCP stream; closing it");
        return None;
    };
    let (reader, writer) = parts.io.into_inner().into_split();
    Some(Socket::new(
        reader,
        Arc::new(writer),
        parts.read_buf,
        max_message,
    ))
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
