//! Command line: the three modes, their flags, and the checks that keep the tool on loopback.
//!
//! Everything here is parsing and validation; nothing connects anywhere. Targets are resolved
//! to socket addresses once, so the rest of the tool never sees a host name.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use anyhow::{Context, bail, ensure};
use clap::{Args, Parser, Subcommand};
use reqwest::Url;

/// Largest `--payload-bytes`: events must stay under 2,047 bytes, and the counters grow.
pub(crate) const MAX_PAYLOAD_BYTES: usize = 1900;

/// Bounded load tool for the gateway (loopback only; every mode stops by itself).
#[derive(Debug, Parser)]
#[command(name = "loadgen", version)]
pub(crate) struct Cli {
    #[command(subcommand)]
    pub(crate) mode: Mode,
}

/// What to measure.
#[derive(Debug, Subcommand)]
pub(crate) enum Mode {
    /// Hold N connections over G groups, publish at stepped rates, report each step.
    Run(RunArgs),
    /// Hold N idle connections and report the gateway's RSS per connection.
    Idle(IdleArgs),
    /// Internal: hold a share of the connections for a `run` or `idle` parent, which drives this
    /// process over stdin and stdout (JSON lines).
    #[command(hide = true)]
    Receivers(ReceiversArgs),
    /// Publish a steady stream of events into Redis through publisher-lib's background
    /// publisher, riding out Redis outages, and print what was published (the chaos tests).
    PublishStream(crate::stream::StreamArgs),
    /// Publish N events into Redis through publisher-lib's `Publisher` from C tasks and report
    /// publishes/s, latency and whether every group's history holds every event (no gateway).
    PublishBench(crate::bench::BenchArgs),
    /// The soak's load: stable clients that must lose nothing, a publish stream into Redis,
    /// and connection churn with abrupt closes and hostile inputs (tools/soak).
    Churn(crate::churn::ChurnArgs),
}

/// Where the gateway is and how to get in; shared by every mode.
#[derive(Debug, Clone, Args)]
pub(crate) struct Target {
    /// Public listener of the gateway (http://127.0.0.1:8080); the hub is at /hub/v1.
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    pub(crate) url: String,
    /// HS256 secret the gateway verifies tokens with.
    #[arg(long, env = "LOADGEN_JWT_SECRET", hide_env_values = true)]
    pub(crate) jwt_secret: String,
    /// Origin header to send on the WebSocket upgrade (none by default).
    #[arg(long)]
    pub(crate) origin: Option<String>,
    /// Bind every client socket to 127.0.0.1 instead of spreading over 127.0.0.2-254.
    #[arg(long)]
    pub(crate) no_spread: bool,
    /// Connection attempts in flight at once.
    #[arg(long, default_value_t = 200)]
    pub(crate) connect_concurrency: usize,
    /// Seconds one connection may take for TCP, upgrade, handshake and join.
    #[arg(long, default_value_t = 10)]
    pub(crate) connect_timeout_secs: u64,
    /// Hard deadline for the whole process, in seconds.
    #[arg(long, default_value_t = 600)]
    pub(crate) max_secs: u64,
    /// Connect as the official client does with `withStatefulReconnect()`: negotiate with
    /// `useStatefulReconnect=true`, upgrade with the connection token, and acknowledge what
    /// arrived every second.
    #[arg(long)]
    pub(crate) stateful: bool,
}

/// The gateway process and its admin listener, for /proc and /readyz.
#[derive(Debug, Clone, Args)]
pub(crate) struct Observe {
    /// Admin listener of the gateway (/readyz is polled before starting).
    #[arg(long, default_value = "http://127.0.0.1:9090")]
    pub(crate) admin_url: String,
    /// PID of the gateway, for CPU and RSS from /proc (columns are empty without it).
    #[arg(long)]
    pub(crate) gateway_pid: Option<u32>,
    /// Connections per load process; more connections are split over child processes.
    #[arg(long, default_value_t = 15_000)]
    pub(crate) conns_per_process: usize,
    /// Print JSON lines instead of the markdown report.
    #[arg(long)]
    pub(crate) json: bool,
}

/// Flags of `loadgen run`.
#[derive(Debug, Args)]
pub(crate) struct RunArgs {
    #[command(flatten)]
    pub(crate) target: Target,
    #[command(flatten)]
    pub(crate) observe: Observe,
    /// Service key for POST /api/v1/events.
    #[arg(long, env = "LOADGEN_SERVICE_KEY", hide_env_values = true)]
    pub(crate) service_key: String,
    /// Connections to hold (connection i joins group i mod G).
    #[arg(long, default_value_t = 5000)]
    pub(crate) connections: usize,
    /// Groups (regions lg-0, lg-1, ...).
    #[arg(long, default_value_t = 50)]
    pub(crate) groups: usize,
    /// Publish rates of the steps, in publishes per second over all groups.
    #[arg(long, value_delimiter = ',', default_value = "500,750,1000,1250")]
    pub(crate) rates: Vec<f64>,
    /// Seconds of publishing per step.
    #[arg(long, default_value_t = 10)]
    pub(crate) step_secs: u64,
    /// Seconds to wait after each step for late deliveries.
    #[arg(long, default_value_t = 3)]
    pub(crate) drain_secs: u64,
    /// Approximate size of each event body, in bytes.
    #[arg(long, default_value_t = 300)]
    pub(crate) payload_bytes: usize,
    /// Publisher lanes; each owns whole groups so a group's events stay in order
    /// (default: one per group, at most 256).
    #[arg(long)]
    pub(crate) lanes: Option<usize>,
    /// Events per publish request: more than 1 posts arrays of that many to
    /// `/api/v1/events/batch` (at most 100).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(1..=100))]
    pub(crate) batch: u8,
}

/// Flags of `loadgen idle`.
#[derive(Debug, Args)]
pub(crate) struct IdleArgs {
    #[command(flatten)]
    pub(crate) target: Target,
    #[command(flatten)]
    pub(crate) observe: Observe,
    /// Connections to hold.
    #[arg(long, default_value_t = 10_000)]
    pub(crate) connections: usize,
    /// Groups the connections join (connection i joins group i mod G); 0 joins none.
    #[arg(long, default_value_t = 50)]
    pub(crate) groups: usize,
    /// Seconds to let the gateway settle before reading RSS.
    #[arg(long, default_value_t = 5)]
    pub(crate) settle_secs: u64,
}

/// Flags of the internal `receivers` mode.
#[derive(Debug, Args)]
pub(crate) struct ReceiversArgs {
    #[command(flatten)]
    pub(crate) target: Target,
    /// Global index of this process's first connection.
    #[arg(long)]
    pub(crate) first: usize,
    /// Connections this process holds.
    #[arg(long)]
    pub(crate) count: usize,
    /// Groups over all processes.
    #[arg(long)]
    pub(crate) groups: usize,
}

/// A validated target: where to connect, on loopback only.
#[derive(Debug, Clone)]
pub(crate) struct Endpoint {
    /// Base URL as given, e.g. `http://127.0.0.1:8080/`.
    pub(crate) base: Url,
    /// The resolved socket address.
    pub(crate) addr: SocketAddr,
}

impl Endpoint {
    /// Parses an `http://` URL whose host is loopback.
    ///
    /// # Errors
    /// When the URL does not parse, is not `http`, or names a host off loopback.
    pub(crate) fn try_loopback(url: &str) -> anyhow::Result<Self> {
        let base = Url::parse(url).with_context(|| format!("`{url}` is not a URL"))?;
        ensure!(
            base.scheme() == "http",
            "`{url}`: only http:// is supported"
        );
        let host = base.host_str().unwrap_or_default();
        let ip = if host == "localhost" {
            IpAddr::V4(Ipv4Addr::LOCALHOST)
        } else {
            host.trim_start_matches('[')
                .trim_end_matches(']')
                .parse::<IpAddr>()
                .map_err(|_| {
                    anyhow::anyhow!("`{url}`: the host must be 127.x.x.x, ::1 or localhost")
                })?
        };
        ensure!(
            ip.is_loopback(),
            "`{url}`: refusing a target off loopback ({ip})"
        );
        let port = base
            .port_or_known_default()
            .with_context(|| format!("`{url}` has no port"))?;
        Ok(Self {
            addr: SocketAddr::new(ip, port),
            base,
        })
    }

    /// The URL of `path` on this endpoint.
    pub(crate) fn join(&self, path: &str) -> String {
        let mut url = self.base.clone();
        url.set_path(path);
        url.set_query(None);
        url.into()
    }
}

impl RunArgs {
    /// Checks what clap cannot.
    ///
    /// # Errors
    /// Every problem found, one per line.
    pub(crate) fn validate(&self) -> anyhow::Result<()> {
        let mut problems = common_problems(&self.target, self.connections, &self.observe);
        if self.groups == 0 {
            problems.push("--groups must be at least 1".to_owned());
        }
        if self.rates.is_empty() || self.rates.iter().any(|r| !(r.is_finite() && *r > 0.0)) {
            problems.push("--rates must be positive numbers".to_owned());
        }
        if self.step_secs == 0 {
            problems.push("--step-secs must be at least 1".to_owned());
        }
        if self.payload_bytes > MAX_PAYLOAD_BYTES {
            problems.push(format!(
                "--payload-bytes must be at most {MAX_PAYLOAD_BYTES}"
            ));
        }
        if self.lanes == Some(0) {
            problems.push("--lanes must be at least 1".to_owned());
        }
        report(problems)
    }
}

impl IdleArgs {
    /// Checks what clap cannot.
    ///
    /// # Errors
    /// Every problem found, one per line.
    pub(crate) fn validate(&self) -> anyhow::Result<()> {
        report(common_problems(
            &self.target,
            self.connections,
            &self.observe,
        ))
    }
}

fn common_problems(target: &Target, connections: usize, observe: &Observe) -> Vec<String> {
    let mut problems = Vec::new();
    for url in [&target.url, &observe.admin_url] {
        if let Err(e) = Endpoint::try_loopback(url) {
            problems.push(format!("{e:#}"));
        }
    }
    if connections == 0 {
        problems.push("--connections must be at least 1".to_owned());
    }
    if target.connect_concurrency == 0 {
        problems.push("--connect-concurrency must be at least 1".to_owned());
    }
    if observe.conns_per_process == 0 {
        problems.push("--conns-per-process must be at least 1".to_owned());
    }
    problems
}

fn report(problems: Vec<String>) -> anyhow::Result<()> {
    if problems.is_empty() {
        Ok(())
    } else {
        bail!("{}", problems.join("\n"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(url: &str, ok: bool) {
        assert_eq!(Endpoint::try_loopback(url).is_ok(), ok, "{url}");
    }

    #[test]
    fn only_loopback_targets_are_accepted() {
        check("http://127.0.0.1:8080", true);
        check("http://127.3.4.5:80/", true);
        check("http://localhost:9090", true);
        check("http://[::1]:8080", true);
        check("http://10.0.0.1:8080", false);
        check("http://example.com:8080", false);
        check("https://127.0.0.1:8080", false);
        check("http://0.0.0.0:8080", false);
    }

    #[test]
    fn paths_are_joined_without_the_query() {
        let e = Endpoint::try_loopback("http://127.0.0.1:8080/x?y=1").unwrap();
        assert_eq!(e.join("/hub/v1"), "http://127.0.0.1:8080/hub/v1");
        assert_eq!(e.addr, "127.0.0.1:8080".parse().unwrap());
    }
}
