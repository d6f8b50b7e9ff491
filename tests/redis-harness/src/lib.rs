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
use std::hash::{BuildHasher, Hasher};
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

/// A port that was free a moment ago on the loopback interface, chosen at random below the
/// kernel's ephemeral range (never 6379: the system's server is there, and never a port the
/// kernel gives out on its own). Below that range no outgoing connection of a test running in
/// parallel can take it as its local port between this check and the server's `bind`; two
/// tests may still pick the same one, which [`until_it_answers`] lets the caller retry.
fn free_port() -> u16 {
    let below = ephemeral_range_start();
    let mut random = std::collections::hash_map::RandomState::new().build_hasher();
    for attempt in 0u32..200 {
        random.write_u32(attempt);
        let candidate = match below.checked_sub(FIRST_TEST_PORT) {
            Some(span) if span > 1000 => {
                FIRST_TEST_PORT + u16::try_from(random.finish() % u64::from(span)).unwrap_or(0)
            }
            // An unusual range with no room below it: let the kernel choose.
            _ => 0,
        };
        if candidate == 6379 {
            continue;
        }
        if let Ok(port) = std::net::TcpListener::bind(("127.0.0.1", candidate))
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
        {
            return port;
        }
    }
    panic!("no free port below {below} after 200 tries")
}

/// The lowest port [`free_port`] chooses: above the well-known and most registered ones.
const FIRST_TEST_PORT: u16 = 10_000;

/// The first port of the kernel's ephemeral range (`ip_local_port_range`; Linux's default 32768
/// when it cannot be read).
fn ephemeral_range_start() -> u16 {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|range| range.split_whitespace().next()?.parse().ok())
        .unwrap_or(32_768)
}

/// Why a server started by the harness did not come up.
#[derive(Debug)]
enum NotUp {
    /// The process exited before it answered, most often because its port was taken between
    /// [`free_port`] and its `bind`: start it again on other ports. Holds its log's last lines.
    Exited(String),
}

/// Waits until `answers` (a PING through `redis-cli`) succeeds while `child` runs. Returns
/// [`NotUp::Exited`] if the process exits first (also when something else answers on its
/// port); fails the test after [`DEADLINE`] with `what` and the last lines of `log`.
async fn until_it_answers<F, A>(
    child: &mut std::process::Child,
    log: &std::path::Path,
    what: &str,
    mut answers: F,
) -> Result<(), NotUp>
where
    F: FnMut() -> A,
    A: Future<Output = bool>,
{
    let waited = tokio::time::timeout(DEADLINE, async {
        loop {
            let answered = answers().await;
            // Checked after the answer too: a server that failed its bind exits, and another
            // test's server may be the one answering on that port.
            if !matches!(child.try_wait(), Ok(None)) {
                return Err(NotUp::Exited(log_tail(log)));
            }
            if answered {
                return Ok(());
            }
            // Polling a condition on the server, not a synchronisation sleep.
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    match waited {
        Ok(result) => result,
        Err(_) => panic!(
            "timed out after {DEADLINE:?} waiting for {what}; its log ends with:\n{}",
            log_tail(log)
        ),
    }
}

/// How many times a server whose process exited before answering is started again on other
/// ports before the test fails.
const START_ATTEMPTS: u32 = 4;

/// The last lines of a server's log, for a failure message.
fn log_tail(log: &std::path::Path) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_else(|e| format!("({log:?}: {e})"));
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(15)..].join("\n")
}

/// Starts `command` (a `redis-server`) with its standard output and error in the file `log`
/// (its log, with `--logfile` left empty).
fn spawn_logged(command: &mut std::process::Command, log: &std::path::Path) -> std::process::Child {
    let output = std::fs::File::create(log).expect("create the server's log file");
    command
        .stdout(output.try_clone().expect("share the log file"))
        .stderr(output)
        .spawn()
        .expect("redis-server is installed (.ci/run installs it)")
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn free_ports_are_below_the_ephemeral_range_and_bindable() {
        let below = ephemeral_range_start();
        for _ in 0..50 {
            let port = free_port();
            assert!(port != 6379, "6379 is the system's server");
            if below > FIRST_TEST_PORT + 1000 {
                assert!(
                    (FIRST_TEST_PORT..below).contains(&port),
                    "{port} is outside {FIRST_TEST_PORT}..{below}"
                );
            }
            std::net::TcpListener::bind(("127.0.0.1", port)).expect("the port is free");
        }
    }

    #[tokio::test]
    async fn a_server_whose_port_is_taken_is_reported_exited_with_its_log() {
        let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("a listener");
        let port = taken.local_addr().expect("its address").port();
        let dir = std::env::temp_dir().join(format!("redis-harness-taken-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("a folder");
        let log = dir.join("server.log");
        let mut child = spawn_logged(
            std::process::Command::new("redis-server")
                .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
                .args(["--save", "", "--appendonly", "no"])
                .arg("--dir")
                .arg(&dir),
            &log,
        );
        // What answers on the port is the test's listener, not a Redis: never PONG.
        let result = until_it_answers(&mut child, &log, "the server", || async { false }).await;
        let _ = child.kill();
        let _ = child.wait();
        let _ = std::fs::remove_dir_all(&dir);
        match result {
            Err(NotUp::Exited(log)) => assert!(
                log.contains("Address already in use"),
                "the log says why: {log}"
            ),
            Ok(()) => panic!("a server that could not bind was reported up"),
        }
    }
}
