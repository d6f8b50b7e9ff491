//! `redis-server` processes for tests, shared by the system tests (`e2e`) and publisher-lib's
//! Redis tests: [`RedisServer`] (one server: plain, replica, Sentinel or TLS) and
//! [`RedisCluster`] (a local Redis Cluster of 3 masters and 3 replicas, with the operations the
//! failover and migration tests need).
//!
//! Every process listens on a free loopback port (never the server on 6379) and is killed when
//! its owner is dropped. Each one names a folder under the temporary directory on its command
//! line (`--dir`, and a cluster node's `--cluster-config-file`), and `tests/run` points `TMPDIR`
//! at the run's own folder, so `tests/reap` finds and stops them when a run is interrupted.
//! Everything here panics on failure with a message that says what was awaited: it only ever
//! runs inside tests.

mod cluster;
mod server;

use std::future::Future;
use std::time::Duration;

pub use crate::cluster::{ClusterNode, RedisCluster, SlotMigration};
pub use crate::server::RedisServer;

/// How long starting a server (or a cluster operation) may take before the test fails. A
/// failure detector, not a benchmark: the machine is small and shared.
pub const DEADLINE: Duration = Duration::from_secs(10);

/// Awaits `future`, failing the test with `what` if it takes longer than `deadline`.
async fn within<T>(deadline: Duration, future: impl Future<Output = T>, what: &str) -> T {
    match tokio::time::timeout(deadline, future).await {
        Ok(value) => value,
        Err(_) => panic!("timed out after {deadline:?} waiting for {what}"),
    }
}

/// A port that was free a moment ago on the loopback interface (never 6379: the system's
/// server is there, and the kernel does not hand out a bound port).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// Makes `command` (a `redis-server`) serve TLS only: no plain port, the certificate, key and
/// authority from `dir` (`server.pem`, `server.key`, `ca.pem`), clients not asked for one.
fn tls_only<'a>(
    command: &'a mut std::process::Command,
    dir: &std::path::Path,
) -> &'a mut std::process::Command {
    command
        .args(["--port", "0", "--tls-auth-clients", "no"])
        .arg("--tls-cert-file")
        .arg(dir.join("server.pem"))
        .arg("--tls-key-file")
        .arg(dir.join("server.key"))
        .arg("--tls-ca-cert-file")
        .arg(dir.join("ca.pem"))
}
