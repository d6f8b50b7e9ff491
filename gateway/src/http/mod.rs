//! Everything that names axum: the public and admin routers and their shared state.
//!
//! Public: `POST /hub/v1/negotiate`, `GET /hub/v1` (WebSocket), `POST /api/v1/events` and
//! `POST /api/v1/events/batch`.
//! Admin: `/healthz`, `/readyz`, `/metrics`. Handlers translate between HTTP and the runtime
//! modules; they hold no state of their own. [`server`] is the public listener's accept loop,
//! with the header-read timeout axum's `serve` leaves off.

pub mod admin;
pub mod events;
pub mod negotiate;
pub mod origin;
pub mod server;
pub mod upgrade;

use std::sync::Arc;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::net::tcp::OwnedReadHalf;

use crate::auth::{AuthError, ConnectionTokens, Verifier};
use crate::broker::Broker;
use crate::connection::{Resumable, Settings};
use crate::groups::Groups;
use crate::limits::{Limits, Refusal};
use crate::shutdown::Shutdown;

/// The hub route; the version is part of the contract.
pub const HUB_PATH: &str = "/hub/v1";
/// Largest HTTP publish body read, in bytes; events themselves are limited to 2 KB.
pub const MAX_PUBLISH_BODY_BYTES: usize = 64 * 1024;
/// Largest batch body read, in bytes: room for [`events::MAX_BATCH_EVENTS`] events of the
/// largest size.
pub const MAX_BATCH_BODY_BYTES: usize = 256 * 1024;

/// What the handlers share.
#[derive(Debug, Clone)]
pub struct AppState {
    /// Checks user tokens.
    pub verifier: Arc<Verifier>,
    /// Signs and checks negotiate's connection tokens.
    pub connection_tokens: ConnectionTokens,
    /// The key backends publish with; `None` disables HTTP publishing.
    pub service_key: Option<Arc<str>>,
    /// Allowed browser origins.
    pub origins: Arc<origin::Origins>,
    /// This replica's memberships.
    pub groups: Arc<Groups>,
    /// Where publications go.
    pub broker: Broker,
    /// Per-connection settings.
    pub settings: Arc<Settings>,
    /// Shutdown and drain.
    pub shutdown: Shutdown,
    /// Admission limits: connections, handshakes, connect and publish rates.
    pub limits: Arc<Limits>,
    /// This replica's stateful connections, which an upgrade with their token resumes.
    pub resumable: Arc<Resumable<OwnedReadHalf>>,
}

/// The public router.
pub fn public(state: AppState) -> Router {
    Router::new()
        .route(
            &format!("{HUB_PATH}/negotiate"),
            post(negotiate::negotiate).options(negotiate::preflight),
        )
        .route(HUB_PATH, get(upgrade::upgrade))
        .route(
            "/api/v1/events",
            post(events::publish).layer(DefaultBodyLimit::max(MAX_PUBLISH_BODY_BYTES)),
        )
        .route(
            "/api/v1/events/batch",
            post(events::publish_batch).layer(DefaultBodyLimit::max(MAX_BATCH_BODY_BYTES)),
        )
        .with_state(state)
}

/// The admin router.
pub fn admin(state: AppState, metrics: PrometheusHandle) -> Router {
    Router::new()
        .route("/healthz", get(admin::healthz))
        .route("/readyz", get(admin::readyz))
        .route("/metrics", get(admin::metrics))
        .with_state(admin::AdminState {
            app: state,
            metrics,
        })
}

/// The bearer token of an `Authorization` header, if any.
pub fn bearer(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

/// 401 with a short reason, as the negotiate and upgrade endpoints answer a bad token.
pub fn unauthorized(error: &AuthError) -> Response {
    (
        StatusCode::UNAUTHORIZED,
        [(
            header::WWW_AUTHENTICATE,
            format!("Bearer error=\"invalid_token\", error_description=\"{error}\""),
        )],
        format!("unauthorized: {error}"),
    )
        .into_response()
}

/// A limit's answer: 503 for the replica's own limits (another replica may have room), 429
/// for one client's; a short body naming the limit, and `Retry-After`.
pub fn too_many(refusal: Refusal) -> Response {
    let status = if refusal.limit.is_global() {
        StatusCode::SERVICE_UNAVAILABLE
    } else {
        StatusCode::TOO_MANY_REQUESTS
    };
    (
        status,
        [(
            header::RETRY_AFTER,
            refusal.retry_after.as_secs().max(1).to_string(),
        )],
        format!(
            "{} (limit: {})",
            refusal.limit.reason(),
            refusal.limit.label()
        ),
    )
        .into_response()
}
