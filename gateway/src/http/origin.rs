//! The Origin allow-list: CORS on negotiate, and the check on the WebSocket upgrade that
//! stops cross-site WebSocket hijacking.

use axum::http::{HeaderMap, HeaderValue, header};

/// Which origins may use the hub.
#[derive(Debug, Clone)]
pub struct Origins {
    any: bool,
    allowed: Vec<String>,
    allow_missing: bool,
}

/// The CORS request headers the official client sends cross-origin.
const ALLOWED_HEADERS: &str = "authorization, x-requested-with, x-signalr-user-agent, content-type";

impl Origins {
    /// An allow-list; `*` in `allowed` admits any origin.
    pub fn new(allowed: &[String], allow_missing: bool) -> Self {
        Self {
            any: allowed.iter().any(|o| o == "*"),
            allowed: allowed
                .iter()
                .filter(|o| *o != "*")
                .map(|o| o.trim_end_matches('/').to_ascii_lowercase())
                .collect(),
            allow_missing,
        }
    }

    /// Whether a browser at `origin` may use the hub.
    pub fn allows(&self, origin: &str) -> bool {
        self.any
            || self
                .allowed
                .iter()
                .any(|o| o.eq_ignore_ascii_case(origin.trim_end_matches('/')))
    }

    /// Whether a request with these headers may upgrade to a WebSocket.
    pub fn allows_upgrade(&self, headers: &HeaderMap) -> bool {
        match headers.get(header::ORIGIN).map(HeaderValue::to_str) {
            None => self.allow_missing,
            Some(Ok(origin)) => self.allows(origin),
            Some(Err(_)) => false,
        }
    }

    /// The CORS response headers for a request from an allowed origin; `None` when the request
    /// has no Origin (same-origin or not a browser) or the origin is not allowed.
    pub fn cors_headers(&self, request: &HeaderMap, preflight: bool) -> Option<HeaderMap> {
        let origin = request.get(header::ORIGIN)?;
        if !self.allows(origin.to_str().ok()?) {
            return None;
        }
        let mut headers = HeaderMap::new();
        headers.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin.clone());
        headers.insert(
            header::ACCESS_CONTROL_ALLOW_CREDENTIALS,
            HeaderValue::from_static("true"),
        );
        headers.insert(header::VARY, HeaderValue::from_static("Origin"));
        if preflight {
            headers.insert(
                header::ACCESS_CONTROL_ALLOW_METHODS,
                HeaderValue::from_static("GET, POST, OPTIONS"),
            );
            headers.insert(
                header::ACCESS_CONTROL_ALLOW_HEADERS,
                HeaderValue::from_static(ALLOWED_HEADERS),
            );
            headers.insert(
                header::ACCESS_CONTROL_MAX_AGE,
                HeaderValue::from_static("600"),
            );
        }
        Some(headers)
    }
}
