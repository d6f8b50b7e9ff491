//! `redis-server` processes for one test each: plain, replica, Sentinel and TLS, on free
//! loopback ports (never the server on 6379), killed when dropped.

use std::path::PathBuf;

use crate::{NotUp, START_ATTEMPTS, free_port, spawn_logged, until_it_answers};

/// A `redis-server` started for one test on a free loopback port, killed when dropped. Never the
/// server on 6379.
#[derive(Debug)]
pub struct RedisServer {
    port: u16,
    child: Option<std::process::Child>,
    /// With TLS: the directory holding `ca.pem`, `server.pem` and `server.key`.
    tls: Option<PathBuf>,
    /// Arguments after the common ones (e.g. `--replicaof`).
    extra: Vec<String>,
    /// For a Sentinel: its configuration file (Sentinel rewrites it, so it is the test's own).
    sentinel_config: Option<PathBuf>,
}

impl RedisServer {
    /// Starts a server without persistence on a free port and waits until it answers.
    pub async fn start() -> Self {
        Self::start_with(&[]).await
    }

    /// Starts a server without persistence with `extra` arguments, e.g. `--replicaof`.
    pub async fn start_with(extra: &[&str]) -> Self {
        Self {
            port: 0,
            child: None,
            tls: None,
            extra: extra.iter().map(|a| (*a).to_owned()).collect(),
            sentinel_config: None,
        }
        .start_on_a_free_port(|_| {})
        .await
    }

    /// Starts a Sentinel that monitors the master at `master_port` as `primary` (quorum 1,
    /// down after 1 s), its configuration file in `dir`.
    pub async fn start_sentinel(dir: &std::path::Path, master_port: u16) -> Self {
        let dir = dir.to_owned();
        Self {
            port: 0,
            child: None,
            tls: None,
            extra: Vec::new(),
            sentinel_config: None,
        }
        .start_on_a_free_port(move |server| {
            let port = server.port;
            let config = dir.join(format!("sentinel-{port}.conf"));
            std::fs::write(
                &config,
                format!(
                    "port {port}\nbind 127.0.0.1\n\
                     sentinel monitor primary 127.0.0.1 {master_port} 1\n\
                     sentinel down-after-milliseconds primary 1000\n\
                     sentinel failover-timeout primary 5000\n"
                ),
            )
            .expect("write the sentinel configuration");
            server.sentinel_config = Some(config);
        })
        .await
    }

    /// Runs `redis-cli` against this server and returns its standard output.
    pub async fn cli(&self, args: &[&str]) -> String {
        let output = tokio::process::Command::new("redis-cli")
            .args(["-h", "127.0.0.1", "-p", &self.port.to_string()])
            .args(args)
            .output()
            .await
            .expect("redis-cli runs");
        String::from_utf8_lossy(&output.stdout).into_owned()
    }

    /// Starts a server that speaks only TLS, with a certificate for 127.0.0.1 signed by a test
    /// authority generated in `dir` (`ca.pem` is what clients must trust).
    pub async fn start_tls(dir: &std::path::Path) -> Self {
        make_certificates(dir);
        Self {
            port: 0,
            child: None,
            tls: Some(dir.to_owned()),
            extra: Vec::new(),
            sentinel_config: None,
        }
        .start_on_a_free_port(|_| {})
        .await
    }

    /// Starts the server on a free port, after `prepare` (which may write files naming the
    /// port); on other ports again if the process exits before it answers (its port was
    /// taken in the meantime), up to [`START_ATTEMPTS`] times.
    async fn start_on_a_free_port(mut self, mut prepare: impl FnMut(&mut Self)) -> Self {
        for attempt in 1..=START_ATTEMPTS {
            self.port = free_port();
            prepare(&mut self);
            match self.spawn().await {
                Ok(()) => return self,
                Err(NotUp::Exited(log)) if attempt == START_ATTEMPTS => panic!(
                    "redis-server exited before it answered, {attempt} times on other ports; \
                     the last log ends with:\n{log}"
                ),
                Err(NotUp::Exited(_)) => self.kill(),
            }
        }
        unreachable!("the last attempt returns or fails the test")
    }

    /// The server's port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `redis://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Kills the server (SIGKILL) and waits for it to exit.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            // A stopped process still dies of SIGKILL; CONT first keeps `wait` prompt.
            let _ = std::process::Command::new("kill")
                .args(["-CONT", &child.id().to_string()])
                .status();
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Sends a signal (`STOP`, `CONT`, ...) to the server process.
    pub fn signal(&self, signal: &str) {
        let child = self.child.as_ref().expect("the server is running");
        let status = std::process::Command::new("kill")
            .args([format!("-{signal}"), child.id().to_string()])
            .status()
            .expect("kill runs");
        assert!(status.success(), "kill -{signal} failed");
    }

    /// Starts the server again on the same port.
    pub async fn restart(&mut self) {
        self.kill();
        self.start_again().await;
    }

    /// Starts the server again on the same port after it was killed.
    pub async fn start_again(&mut self) {
        if let Err(NotUp::Exited(log)) = self.spawn().await {
            panic!(
                "redis-server exited when started again on port {}; its log ends with:\n{log}",
                self.port
            );
        }
    }

    /// Kills the server and starts it again on the same port with `extra` arguments instead of
    /// those it had (e.g. an ACL that refuses a command).
    pub async fn restart_with(&mut self, extra: &[&str]) {
        self.kill();
        self.extra = extra.iter().map(|a| (*a).to_owned()).collect();
        self.start_again().await;
    }

    /// Starts the process on `self.port` and waits until it answers PING.
    async fn spawn(&mut self) -> Result<(), NotUp> {
        let port = self.port.to_string();
        let mut command = std::process::Command::new("redis-server");
        if let Some(config) = &self.sentinel_config {
            command.arg(config).arg("--sentinel");
        } else {
            command.args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]);
            // A replica's full sync writes an RDB file: keep it out of the working tree.
            command
                .arg("--dir")
                .arg(std::env::temp_dir())
                .args(["--dbfilename", &format!("e2e-redis-{port}.rdb")]);
        }
        command.args(&self.extra);
        match &self.tls {
            None if self.sentinel_config.is_some() => &mut command,
            None => command.args(["--port", &port]),
            Some(dir) => crate::tls_only(command.args(["--tls-port", &port]), dir),
        };
        let log = self.log();
        let child = self.child.insert(spawn_logged(&mut command, &log));
        let tls = self.tls.as_deref();
        until_it_answers(child, &log, "redis-server to answer PING", || {
            answers_ping(&port, tls)
        })
        .await
    }

    /// Where the process writes its log: the run's temporary folder, named by the port.
    fn log(&self) -> PathBuf {
        std::env::temp_dir().join(format!("e2e-redis-{}.log", self.port))
    }
}

/// Writes a test certificate authority (`ca.pem`, `ca.key`) and a certificate for 127.0.0.1
/// that it signed (`server.pem`, `server.key`) into `dir`.
pub(crate) fn make_certificates(dir: &std::path::Path) {
    let run = |args: &[&str]| {
        let status = std::process::Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()
            .expect("openssl runs");
        assert!(status.success(), "openssl {args:?} failed");
    };
    std::fs::write(dir.join("san.ext"), "subjectAltName=IP:127.0.0.1\n").expect("write san.ext");
    run(&[
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        "-days",
        "1",
        "-subj",
        "/CN=e2e-test-ca",
    ]);
    run(&[
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "server.key",
        "-out",
        "server.csr",
        "-subj",
        "/CN=127.0.0.1",
    ]);
    run(&[
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "server.pem",
        "-days",
        "1",
        "-extfile",
        "san.ext",
    ]);
}

/// Whether a redis-server on `port` answers PING (through redis-cli, which speaks TLS too).
async fn answers_ping(port: &str, tls: Option<&std::path::Path>) -> bool {
    let mut command = tokio::process::Command::new("redis-cli");
    command.args(["-h", "127.0.0.1", "-p", port]);
    if let Some(dir) = tls {
        command.arg("--tls").arg("--cacert").arg(dir.join("ca.pem"));
    }
    command
        .arg("PING")
        .output()
        .await
        .is_ok_and(|output| output.stdout.starts_with(b"PONG"))
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_file(self.log());
    }
}
