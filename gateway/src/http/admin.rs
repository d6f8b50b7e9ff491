//! The admin listener: liveness, readiness and Prometheus metrics.

use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use metrics_exporter_prometheus::PrometheusHandle;

use super::AppState;

/// State of the admin router.
#[derive(Debug, Clone)]
pub struct AdminState {
    /// The public state, for readiness.
    pub app: AppState,
    /// Renders the metrics.
    pub metrics: PrometheusHandle,
}

/// `/healthz`: the process is alive.
pub async fn healthz() -> &'static str {
    "ok\n"
}

/// `/readyz`: the broker is healthy and the gateway is not draining.
pub async fn readyz(State(state): State<AdminState>) -> Response {
    if state.app.shutdown.is_draining() {
        return (StatusCode::SERVICE_UNAVAILABLE, "not ready: draining\n").into_response();
    }
    if !state.app.broker.is_healthy() {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: broker unavailable\n",
        )
            .into_response();
    }
    (StatusCode::OK, "ready\n").into_response()
}

/// `/metrics`: Prometheus text format.
pub async fn metrics(State(state): State<AdminState>) -> Response {
    crate::metrics::broker_up(state.app.broker.is_healthy());
    crate::metrics::runtime_tasks_alive(
        tokio::runtime::Handle::current()
            .metrics()
            .num_alive_tasks(),
    );
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        state.metrics.render(),
    )
        .into_response()
}
