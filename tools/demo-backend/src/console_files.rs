//! The built console (`--console-dir`) served as static files: `/` is `index.html`, paths
//! outside the directory are refused, `/api/...` paths never fall through to it.

use std::path::{Component, Path};

use axum::extract::State;
use axum::http::{StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};

use crate::App;
use crate::error::ApiError;

/// Serves the console: `/` is `index.html`; paths outside the directory are refused.
pub(crate) async fn static_file(State(app): State<App>, uri: Uri) -> Result<Response, ApiError> {
    let not_found = || ApiError {
        status: StatusCode::NOT_FOUND,
        message: format!("no route for {}", uri.path()),
    };
    let Some(dir) = app.console_dir.as_deref() else {
        return Err(not_found());
    };
    if uri.path().starts_with("/api/") {
        return Err(not_found());
    }
    let relative = match uri.path().trim_start_matches('/') {
        "" => "index.html",
        path => path,
    };
    let relative = Path::new(relative);
    if !relative
        .components()
        .all(|c| matches!(c, Component::Normal(_)))
    {
        return Err(not_found());
    }
    let bytes = tokio::fs::read(dir.join(relative))
        .await
        .map_err(|_| not_found())?;
    let content_type = match relative.extension().and_then(|e| e.to_str()) {
        Some("html") => "text/html; charset=utf-8",
        Some("js") => "text/javascript; charset=utf-8",
        Some("css") => "text/css; charset=utf-8",
        Some("map" | "json") => "application/json",
        Some("png") => "image/png",
        Some("svg") => "image/svg+xml",
        _ => "application/octet-stream",
    };
    Ok((
        [
            (header::CONTENT_TYPE, content_type),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        bytes,
    )
        .into_response())
}
