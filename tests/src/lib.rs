//! Harness for the system tests: in-process gateways on port 0 (`test_gateway`), a raw SignalR
//! client (`client`, `records`), tokens (`tokens`), contract events (`events`), raw HTTP
//! (`http`), `redis-server` processes and clusters (the `redis-harness` crate, shared with
//! publisher-lib's tests) and [`within`], which turns a hang into a failure that says what was
//! awaited.
//!
//! Everything here panics on failure with a message naming what went wrong: it only ever runs
//! inside tests.

// The harness is its own crate, so clippy's exemption for code in tests does not reach it; a
// failed unwrap here is a failed test, which is what we want.
#![allow(clippy::unwrap_used)]

mod client;
mod events;
mod http;
mod records;
mod test_gateway;
mod tokens;

use std::future::Future;
use std::path::PathBuf;
use std::time::Duration;

pub use reqwest::StatusCode;

pub use crate::client::{Closed, Refusal, WsClient};
pub use crate::events::recommendation_ready;
pub use crate::http::HeldRequest;
pub use crate::records::{joined, parse_event, parse_positioned_event, split_records};
pub use crate::test_gateway::{
    GatewayBuilder, TestGateway, gateway_with_dispatcher, start_gateway,
};
pub use crate::tokens::{contractor, dispatcher, hs256_token, sign, unix_now};
pub use redis_harness::{RedisCluster, RedisServer};

/// The HS256 secret every test gateway verifies user tokens with (test-only, 32+ bytes).
pub const TEST_SECRET: &str = "e2e-test-jwt-secret-never-use-in-production";
/// The service key test backends publish with (test-only).
pub const TEST_KEY: &str = "e2e-test-service-key-never-use-in-production";
/// How long a test waits for something the gateway should do promptly. Generous: the machine
/// is small and shared with other builds, and a deadline is a failure detector, not a benchmark.
pub const DEADLINE: Duration = Duration::from_secs(10);
/// The record separator that ends every SignalR JSON record.
pub const RS: char = '\u{1e}';
/// The handshake the official JavaScript client sends.
pub const HANDSHAKE: &str = "{\"protocol\":\"json\",\"version\":1}\u{1e}";

/// Awaits `future`, failing the test with `what` if it takes longer than `deadline`.
pub async fn within<T>(deadline: Duration, future: impl Future<Output = T>, what: &str) -> T {
    match tokio::time::timeout(deadline, future).await {
        Ok(value) => value,
        Err(_) => panic!("timed out after {deadline:?} waiting for {what}"),
    }
}

/// The workspace root (the parent of this package's folder).
pub fn workspace_root() -> PathBuf {
    let manifest = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    manifest
        .parent()
        .expect("the e2e package lives one level below the workspace root")
        .to_path_buf()
}

/// A file in `tests/fixtures/`.
pub fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures")
        .join(name)
}
