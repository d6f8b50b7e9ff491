//! The configuration tree: flags and `GATEWAY_*` environment variables, defaults, validation.
//!
//! Pure: parses and checks. It reads no files (key files are read by [`crate::keys`]) and no
//! process state besides clap's lookup of the `GATEWAY_*` variables; the binary resolves
//! `--worker-threads 0` into a count of CPUs. Defaults shared with every publisher (history, idempotency
//! window, channel prefix) come from [`publisher_lib::contract`]. Every problem is reported at
//! once, so an operator fixes a bad deployment in one round.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};
use publisher_lib::contract::{
    self, DEFAULT_HISTORY_SIZE, DEFAULT_HISTORY_TTL, DEFAULT_IDEMPOTENCY_WINDOW, DEFAULT_PREFIX,
};

use crate::auth::Algorithm;
use crate::auth::dev;

/// Default public listener (WebSocket hub, negotiate, HTTP publish).
pub const DEFAULT_LISTEN: &str = "0.0.0.0:8080";
/// Default admin listener (`/healthz`, `/readyz`, `/metrics`); loopback unless configured.
pub const DEFAULT_ADMIN_LISTEN: &str = "127.0.0.1:9090";
/// Default keep-alive interval; the official client's 30 s server timeout needs pings well within it.
pub const DEFAULT_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(15);
/// Longest keep-alive interval accepted.
pub const MAX_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(15);
/// Default time without any message after which a client is closed.
pub const DEFAULT_CLIENT_TIMEOUT: Duration = Duration::from_secs(30);
/// Default time a client has to complete the SignalR handshake.
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(15);
/// Default time one socket write may take before the client counts as slow.
pub const DEFAULT_WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// Default time shutdown waits for connections to close.
pub const DEFAULT_DRAIN_TIMEOUT: Duration = Duration::from_secs(10);
/// Default largest message a client may send, in bytes (as ASP.NET Core).
pub const DEFAULT_MAX_MESSAGE_BYTES: usize = 32 * 1024;
/// Default number of frames queued per connection before it counts as slow.
pub const DEFAULT_OUTBOUND_QUEUE: usize = 256;
/// Shortest service key or connection token secret accepted, in bytes.
pub const MIN_KEY_BYTES: usize = 16;
/// Default number of groups one connection may be in.
pub const DEFAULT_MAX_GROUPS_PER_CONNECTION: usize = 64;
/// Default hub invocations one connection may make per second (sustained; short bursts allowed).
pub const DEFAULT_MAX_INVOCATIONS_PER_SECOND: u32 = 50;
/// Default group joins one connection may make per second (sustained; short bursts allowed).
pub const DEFAULT_MAX_JOINS_PER_SECOND: u32 = 20;
/// Default WebSockets one replica holds (a replica holds 5,000 with ~20 MiB; see benchmarks).
pub const DEFAULT_MAX_CONNECTIONS: usize = 20_000;
/// Default connections between their upgrade and their completed SignalR handshake.
pub const DEFAULT_MAX_PENDING_HANDSHAKES: usize = 2_000;
/// Default HTTP connections that have not sent a full request head yet.
pub const DEFAULT_MAX_PENDING_REQUESTS: usize = 4_096;
/// Default WebSockets one user (`sub`) may hold (tabs and devices; 0 turns it off).
pub const DEFAULT_MAX_CONNECTIONS_PER_USER: usize = 20;
/// Default HTTP publishes per second per service key (0 turns it off).
pub const DEFAULT_MAX_PUBLISHES_PER_SECOND: u32 = 5_000;
/// Default time a client has to send a full HTTP request head (and the idle limit between
/// requests of a kept-alive connection).
pub const DEFAULT_HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// `gateway`: real-time fan-out over the SignalR protocol.
#[derive(Debug, Parser)]
#[command(name = "gateway", version, about, long_about = None)]
pub struct Cli {
    /// What to do; without a subcommand the gateway runs.
    #[command(subcommand)]
    pub command: Option<Command>,
    /// Settings of the running gateway.
    #[command(flatten)]
    pub config: Config,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Mint an HS256 user token (for development and tests; production tokens come from your identity provider).
    Token(TokenArgs),
}

/// Arguments of `gateway token`.
#[derive(Debug, Args)]
pub struct TokenArgs {
    /// Role of the user.
    #[arg(long, value_enum)]
    pub role: TokenRole,
    /// Region a dispatcher may join (repeat for several).
    #[arg(long = "region")]
    pub regions: Vec<String>,
    /// Contractor id (defaults to the subject).
    #[arg(long)]
    pub contractor_id: Option<String>,
    /// Subject (user id).
    #[arg(long, default_value = "dev-user")]
    pub sub: String,
    /// Lifetime of the token.
    #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
    pub ttl: Duration,
}

/// Roles `gateway token` can mint.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum TokenRole {
    /// May join the dispatch groups of its regions.
    Dispatcher,
    /// May join its own contractor group.
    Contractor,
}

/// Everything the running gateway needs to know.
#[derive(Debug, Clone, Args)]
pub struct Config {
    /// Development mode: mint an ephemeral secret and service key when none is given, allow any
    /// origin, and print ready-to-use tokens. Never use in production.
    #[arg(long, env = "GATEWAY_DEV")]
    pub dev: bool,
    /// Runtime worker threads; 0 means one per CPU the process may use. With one, fan-out
    /// writes frames for small groups straight to idle sockets.
    #[arg(long, env = "GATEWAY_WORKER_THREADS", default_value_t = 0)]
    pub worker_threads: usize,
    /// Listeners.
    #[command(flatten)]
    pub listen: ListenConfig,
    /// Redis, for several replicas.
    #[command(flatten)]
    pub redis: RedisConfig,
    /// Per-group history and idempotency.
    #[command(flatten)]
    pub history: HistoryConfig,
    /// User tokens, service key and connection tokens.
    #[command(flatten)]
    pub auth: AuthConfig,
    /// Which browser origins may connect.
    #[command(flatten)]
    pub cors: CorsConfig,
    /// Sizes and counts.
    #[command(flatten)]
    pub limits: LimitsConfig,
    /// Keep-alive, timeouts and drain.
    #[command(flatten)]
    pub timeouts: TimeoutsConfig,
    /// Logging.
    #[command(flatten)]
    pub log: LogConfig,
}

/// Listener addresses.
#[derive(Debug, Clone, Args)]
pub struct ListenConfig {
    /// Address of the public listener: the hub at /hub/v1 and POST /api/v1/events.
    #[arg(long = "listen", env = "GATEWAY_LISTEN", default_value = DEFAULT_LISTEN)]
    pub public: SocketAddr,
    /// Address of the admin listener: /healthz, /readyz, /metrics.
    #[arg(long = "admin-listen", env = "GATEWAY_ADMIN_LISTEN", default_value = DEFAULT_ADMIN_LISTEN)]
    pub admin: SocketAddr,
}

/// Redis settings; without a URL the gateway runs alone on its in-process broker.
#[derive(Debug, Clone, Args)]
pub struct RedisConfig {
    /// Redis URL (`redis://[user:password@]host:port[/db]`, `rediss://` for TLS, or
    /// `redis+sentinel://[user:password@]host:port[,host:port...]/<master>` to follow a Sentinel
    /// failover, or `redis+cluster://[user:password@]host:port[,host:port...]` for a Redis
    /// Cluster over sharded pub/sub); switches from the in-process broker to Redis pub/sub so
    /// several replicas share publications. Several URLs separated by spaces spread the groups
    /// over as many independent servers (every replica and publisher must list the same ones in
    /// the same order). Needs Redis 6 or later (RESP3), 7 for a cluster.
    #[arg(long = "redis-url", env = "GATEWAY_REDIS_URL", hide_env_values = true)]
    pub url: Option<Secret>,
    /// PEM file of the certificate authority that signed the Redis server's certificate, for
    /// `rediss://` (TLS) URLs; the system's roots are used without it.
    #[arg(long = "redis-ca-file", env = "GATEWAY_REDIS_CA_FILE")]
    pub ca_file: Option<PathBuf>,
    /// Prefix of every channel (and, later, key), so several deployments can share one Redis.
    #[arg(
        long = "redis-prefix",
        env = "GATEWAY_REDIS_PREFIX",
        default_value = DEFAULT_PREFIX
    )]
    pub prefix: String,
    /// Redis messages held between the subscriber connection and fan-out; when fan-out falls
    /// this far behind, further messages are dropped and counted.
    #[arg(
        long = "redis-subscriber-buffer",
        env = "GATEWAY_REDIS_SUBSCRIBER_BUFFER",
        default_value_t = 65_536,
        value_parser = clap::value_parser!(u32).range(1..)
    )]
    pub subscriber_buffer: u32,
}

/// How much of each group's history is kept for clients that resume, and how long a publish's
/// idempotency key is remembered. With Redis, the publisher library must use the same values.
#[derive(Debug, Clone, Args)]
pub struct HistoryConfig {
    /// Events kept per group for clients that resume from a position.
    #[arg(
        long = "history-size",
        env = "GATEWAY_HISTORY_SIZE",
        default_value_t = DEFAULT_HISTORY_SIZE as u32,
        value_parser = clap::value_parser!(u32).range(1..)
    )]
    pub size: u32,
    /// A group's history is forgotten this long after its last publish (a new epoch follows).
    #[arg(long = "history-ttl", env = "GATEWAY_HISTORY_TTL", default_value_t = DEFAULT_HISTORY_TTL.into())]
    pub ttl: humantime::Duration,
    /// A publish whose idempotency key was seen within this window is acknowledged without
    /// being delivered again.
    #[arg(long = "idempotency-window", env = "GATEWAY_IDEMPOTENCY_WINDOW", default_value_t = DEFAULT_IDEMPOTENCY_WINDOW.into())]
    pub idempotency_window: humantime::Duration,
}

impl HistoryConfig {
    /// As the broker takes them.
    pub fn settings(&self) -> crate::broker::HistorySettings {
        crate::broker::HistorySettings {
            size: self.size as usize,
            ttl: self.ttl.into(),
            idempotency_window: self.idempotency_window.into(),
        }
    }
}

/// Authentication settings.
#[derive(Debug, Clone, Args)]
pub struct AuthConfig {
    /// Signature algorithm user tokens must use (pinned; anything else is refused): HS256, RS256 or ES256.
    #[arg(long, env = "GATEWAY_JWT_ALGORITHM", default_value = "HS256")]
    pub jwt_algorithm: Algorithm,
    /// HS256 secret for user tokens (at least 32 bytes).
    #[arg(long, env = "GATEWAY_JWT_SECRET", hide_env_values = true)]
    pub jwt_secret: Option<Secret>,
    /// File holding the HS256 secret (trailing newline ignored).
    #[arg(long, env = "GATEWAY_JWT_SECRET_FILE")]
    pub jwt_secret_file: Option<PathBuf>,
    /// PEM public key for RS256 or ES256 user tokens.
    #[arg(long, env = "GATEWAY_JWT_PUBLIC_KEY_FILE")]
    pub jwt_public_key_file: Option<PathBuf>,
    /// Required `iss` claim, when set.
    #[arg(long, env = "GATEWAY_JWT_ISSUER")]
    pub jwt_issuer: Option<String>,
    /// Clock skew tolerated on a token's `exp` and `nbf`. A connection is closed (reconnect allowed) when
    /// its token is no longer accepted.
    #[arg(long, env = "GATEWAY_JWT_LEEWAY", default_value = "30s", value_parser = humantime::parse_duration)]
    pub jwt_leeway: Duration,
    /// Required `aud` claim, when set.
    #[arg(long, env = "GATEWAY_JWT_AUDIENCE")]
    pub jwt_audience: Option<String>,
    /// Service key backends present as `Authorization: Bearer` on POST /api/v1/events; without
    /// one, HTTP publishing is disabled.
    #[arg(long, env = "GATEWAY_SERVICE_KEY", hide_env_values = true)]
    pub service_key: Option<Secret>,
    /// File holding the service key (trailing newline ignored).
    #[arg(long, env = "GATEWAY_SERVICE_KEY_FILE")]
    pub service_key_file: Option<PathBuf>,
    /// Key that signs negotiate's connection tokens. Give every replica the same one so a
    /// client may negotiate with one replica and connect to another; random per process when unset.
    #[arg(long, env = "GATEWAY_CONNECTION_TOKEN_SECRET", hide_env_values = true)]
    pub connection_token_secret: Option<Secret>,
    /// File holding the connection token secret (trailing newline ignored).
    #[arg(long, env = "GATEWAY_CONNECTION_TOKEN_SECRET_FILE")]
    pub connection_token_secret_file: Option<PathBuf>,
}

/// Origin checks for negotiate (CORS) and the WebSocket upgrade.
#[derive(Debug, Clone, Args)]
pub struct CorsConfig {
    /// Browser origins allowed to negotiate and connect, comma-separated (e.g.
    /// `https://app.example.com`); `*` allows any origin (development only).
    #[arg(
        long = "cors-origins",
        env = "GATEWAY_CORS_ORIGINS",
        value_delimiter = ','
    )]
    pub origins: Vec<String>,
    /// Accept WebSocket upgrades that carry no Origin header (non-browser clients such as
    /// backends or Node; browsers always send one).
    #[arg(long, env = "GATEWAY_ALLOW_MISSING_ORIGIN")]
    pub allow_missing_origin: bool,
}

/// Sizes and counts.
#[derive(Debug, Clone, Args)]
pub struct LimitsConfig {
    /// Largest message a client may send (bytes; `KiB`/`MiB` suffixes accepted).
    #[arg(long = "max-message-size", env = "GATEWAY_MAX_MESSAGE_SIZE", default_value = "32KiB", value_parser = parse_bytes)]
    pub max_message_bytes: usize,
    /// Frames queued for one connection before it is closed as a slow consumer.
    #[arg(long, env = "GATEWAY_OUTBOUND_QUEUE", default_value_t = DEFAULT_OUTBOUND_QUEUE)]
    pub outbound_queue: usize,
    /// Stateful reconnect: bytes of messages a connection keeps until its client acknowledges
    /// them; past it nothing more is sent until an Ack (`KiB`/`MiB` suffixes accepted).
    #[arg(long = "stateful-reconnect-buffer", env = "GATEWAY_STATEFUL_RECONNECT_BUFFER", default_value = "1MiB", value_parser = parse_bytes)]
    pub stateful_reconnect_buffer: usize,
    /// Groups one connection may be in at once.
    #[arg(long, env = "GATEWAY_MAX_GROUPS_PER_CONNECTION", default_value_t = DEFAULT_MAX_GROUPS_PER_CONNECTION)]
    pub max_groups_per_connection: usize,
    /// Hub invocations one connection may make per second; past it the invocation fails.
    #[arg(long, env = "GATEWAY_MAX_INVOCATIONS_PER_SECOND", default_value_t = DEFAULT_MAX_INVOCATIONS_PER_SECOND)]
    pub max_invocations_per_second: u32,
    /// Group joins one connection may make per second; past it the join fails.
    #[arg(long, env = "GATEWAY_MAX_JOINS_PER_SECOND", default_value_t = DEFAULT_MAX_JOINS_PER_SECOND)]
    pub max_joins_per_second: u32,
    /// WebSockets this replica holds at most; past it upgrades get 503 with Retry-After.
    #[arg(long, env = "GATEWAY_MAX_CONNECTIONS", default_value_t = DEFAULT_MAX_CONNECTIONS)]
    pub max_connections: usize,
    /// Connections between their upgrade and their completed handshake at most; past it
    /// upgrades get 503 with Retry-After.
    #[arg(long, env = "GATEWAY_MAX_PENDING_HANDSHAKES", default_value_t = DEFAULT_MAX_PENDING_HANDSHAKES)]
    pub max_pending_handshakes: usize,
    /// HTTP connections that have not sent a full request head yet, at most; further
    /// connections are closed at once.
    #[arg(long, env = "GATEWAY_MAX_PENDING_REQUESTS", default_value_t = DEFAULT_MAX_PENDING_REQUESTS)]
    pub max_pending_requests: usize,
    /// WebSockets one user (`sub`) may hold; past it upgrades get 429. 0 turns it off.
    #[arg(long, env = "GATEWAY_MAX_CONNECTIONS_PER_USER", default_value_t = DEFAULT_MAX_CONNECTIONS_PER_USER)]
    pub max_connections_per_user: usize,
    /// WebSockets one source address may hold; past it upgrades get 429. 0 (the default)
    /// turns it off: behind a load balancer every client has its address.
    #[arg(long, env = "GATEWAY_MAX_CONNECTIONS_PER_ADDRESS", default_value_t = 0)]
    pub max_connections_per_address: usize,
    /// New WebSockets per second one source address may open (a burst of as many); past it
    /// upgrades get 429. 0 (the default) turns it off.
    #[arg(
        long,
        env = "GATEWAY_MAX_CONNECTS_PER_SECOND_PER_ADDRESS",
        default_value_t = 0
    )]
    pub max_connects_per_second_per_address: u32,
    /// Proxies (addresses or networks like 10.0.0.0/8, comma-separated) whose
    /// X-Forwarded-For names the client for the per-address limits; none by default.
    #[arg(long, env = "GATEWAY_TRUSTED_PROXIES", value_delimiter = ',')]
    pub trusted_proxies: Vec<crate::limits::IpNet>,
    /// Publishes per second on POST /api/v1/events per service key (a burst of as many);
    /// past it 429 with Retry-After. 0 turns it off.
    #[arg(long, env = "GATEWAY_MAX_PUBLISHES_PER_SECOND", default_value_t = DEFAULT_MAX_PUBLISHES_PER_SECOND)]
    pub max_publishes_per_second: u32,
}

impl LimitsConfig {
    /// The admission slice, as [`crate::limits::Limits`] takes it.
    pub fn admission(&self) -> crate::limits::Settings {
        crate::limits::Settings {
            max_connections: self.max_connections,
            max_pending_handshakes: self.max_pending_handshakes,
            max_pending_requests: self.max_pending_requests,
            max_connections_per_user: self.max_connections_per_user,
            max_connections_per_address: self.max_connections_per_address,
            connects_per_second_per_address: self.max_connects_per_second_per_address,
            publishes_per_second: self.max_publishes_per_second,
            trusted_proxies: crate::limits::TrustedProxies::new(self.trusted_proxies.clone()),
        }
    }
}

/// Keep-alive, timeouts and drain.
#[derive(Debug, Clone, Args)]
pub struct TimeoutsConfig {
    /// Send a ping when nothing was sent for this long (at most 15s).
    #[arg(long, env = "GATEWAY_KEEPALIVE_INTERVAL", default_value = "15s", value_parser = humantime::parse_duration)]
    pub keepalive_interval: Duration,
    /// Close a client from which nothing was received for this long.
    #[arg(long, env = "GATEWAY_CLIENT_TIMEOUT", default_value = "30s", value_parser = humantime::parse_duration)]
    pub client_timeout: Duration,
    /// Close a client that has not completed the SignalR handshake after this long.
    #[arg(long, env = "GATEWAY_HANDSHAKE_TIMEOUT", default_value = "15s", value_parser = humantime::parse_duration)]
    pub handshake_timeout: Duration,
    /// Close an HTTP connection that has not sent a full request head this long after it
    /// opened or after its previous request (slow or idle clients).
    #[arg(long, env = "GATEWAY_HEADER_READ_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    pub header_read_timeout: Duration,
    /// Close a client as slow when one socket write takes longer than this.
    #[arg(long, env = "GATEWAY_WRITE_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    pub write_timeout: Duration,
    /// Stateful reconnect: how long a connection whose socket was lost waits for its client to
    /// resume it (`withStatefulReconnect()`); `0s` stops offering stateful reconnect.
    #[arg(long, env = "GATEWAY_STATEFUL_RECONNECT_GRACE", default_value = "15s", value_parser = humantime::parse_duration)]
    pub stateful_reconnect_grace: Duration,
    /// On SIGTERM, how long to report not ready (while still serving and accepting) before
    /// closing clients, so the load balancer stops sending new ones first.
    #[arg(long, env = "GATEWAY_SHUTDOWN_DELAY", default_value = "0s", value_parser = humantime::parse_duration)]
    pub shutdown_delay: Duration,
    /// After the shutdown delay, how long the drain may take: clients are closed (reconnect
    /// allowed) spread over its first half, then the rest is waited for before exiting.
    #[arg(long, env = "GATEWAY_DRAIN_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    pub drain_timeout: Duration,
}

/// Logging.
#[derive(Debug, Clone, Args)]
pub struct LogConfig {
    /// Log format.
    #[arg(
        long = "log-format",
        env = "GATEWAY_LOG_FORMAT",
        value_enum,
        default_value = "text"
    )]
    pub format: LogFormat,
    /// Log filter in tracing's env-filter syntax (e.g. `info,gateway=debug`).
    #[arg(long = "log", env = "GATEWAY_LOG", default_value = "info")]
    pub filter: String,
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable text.
    Text,
    /// One JSON object per line.
    Json,
}

/// A secret value whose `Debug` never shows it.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret.
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    /// The secret itself.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

impl std::str::FromStr for Secret {
    type Err = std::convert::Infallible;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(Self(s.to_owned()))
    }
}

/// Every problem found in a configuration.
#[derive(Debug, thiserror::Error)]
#[error("invalid configuration:\n  - {}", .0.join("\n  - "))]
pub struct ConfigError(pub Vec<String>);

/// The credentials in force in `--dev` mode, for the banner; `None` where they come from a file
/// or a public key the banner cannot use.
#[derive(Debug, Clone)]
pub struct DevCredentials {
    /// The HS256 secret in force.
    pub jwt_secret: Option<Secret>,
    /// The service key in force.
    pub service_key: Option<Secret>,
}

impl Config {
    /// Parses a configuration from command-line words (the first is the program name).
    /// Environment variables are read too, as in the binary.
    ///
    /// # Errors
    /// clap's error when the words do not parse.
    pub fn try_from_args<I, T>(args: I) -> Result<Self, clap::Error>
    where
        I: IntoIterator<Item = T>,
        T: Into<std::ffi::OsString> + Clone,
    {
        Cli::try_parse_from(args).map(|cli| cli.config)
    }

    /// Fills in what development mode promises: an ephemeral secret and service key when none
    /// is configured, any origin, clients without an Origin header.
    pub fn apply_dev_defaults(&mut self) -> DevCredentials {
        let auth = &mut self.auth;
        if auth.jwt_algorithm == Algorithm::Hs256
            && auth.jwt_secret.is_none()
            && auth.jwt_secret_file.is_none()
        {
            auth.jwt_secret = Some(Secret(dev::random_secret()));
        }
        if auth.service_key.is_none() && auth.service_key_file.is_none() {
            auth.service_key = Some(Secret(dev::random_secret()));
        }
        if self.cors.origins.is_empty() {
            self.cors.origins = vec!["*".to_owned()];
        }
        self.cors.allow_missing_origin = true;
        DevCredentials {
            jwt_secret: auth.jwt_secret.clone(),
            service_key: auth.service_key.clone(),
        }
    }

    /// The runtime threads asked for: `--worker-threads`, where 0 means one per CPU. The binary
    /// replaces 0 with the count before the runtime starts; a configuration that still says 0
    /// (a test's) is taken as several threads.
    pub fn worker_threads(&self) -> usize {
        self.worker_threads
    }

    /// Checks the configuration and reports every problem.
    ///
    /// # Errors
    /// [`ConfigError`] listing each problem on its own line.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let mut problems = Vec::new();
        let auth = &self.auth;
        match auth.jwt_algorithm {
            Algorithm::Hs256 => match (&auth.jwt_secret, &auth.jwt_secret_file) {
                (None, None) => problems.push(
                    "HS256 needs --jwt-secret or --jwt-secret-file (or use --dev to try the gateway)"
                        .to_owned(),
                ),
                (Some(_), Some(_)) => problems
                    .push("give either --jwt-secret or --jwt-secret-file, not both".to_owned()),
                (Some(secret), None) if secret.0.len() < crate::auth::token::MIN_SECRET_BYTES => {
                    problems.push(format!(
                        "--jwt-secret must be at least {} bytes",
                        crate::auth::token::MIN_SECRET_BYTES
                    ));
                }
                _ => {}
            },
            Algorithm::Rs256 | Algorithm::Es256 => {
                if auth.jwt_public_key_file.is_none() {
                    problems.push(format!(
                        "{} needs --jwt-public-key-file with a PEM public key",
                        auth.jwt_algorithm
                    ));
                }
                if auth.jwt_secret.is_some() || auth.jwt_secret_file.is_some() {
                    problems.push(format!(
                        "--jwt-secret is for HS256; the pinned algorithm is {}",
                        auth.jwt_algorithm
                    ));
                }
            }
        }
        if auth.service_key.is_some() && auth.service_key_file.is_some() {
            problems.push("give either --service-key or --service-key-file, not both".to_owned());
        }
        for (flag, value) in [
            ("--service-key", &auth.service_key),
            ("--connection-token-secret", &auth.connection_token_secret),
        ] {
            if let Some(value) = value
                && value.0.len() < MIN_KEY_BYTES
            {
                problems.push(format!(
                    "{flag} must be at least {MIN_KEY_BYTES} characters"
                ));
            }
        }
        if auth.connection_token_secret.is_some() && auth.connection_token_secret_file.is_some() {
            problems.push(
                "give either --connection-token-secret or --connection-token-secret-file, not both"
                    .to_owned(),
            );
        }
        for origin in &self.cors.origins {
            if origin != "*" && !valid_origin(origin) {
                problems.push(format!(
                    "--cors-origins: `{origin}` is not an origin like https://app.example.com"
                ));
            }
        }
        let t = &self.timeouts;
        if t.keepalive_interval.is_zero() || t.keepalive_interval > MAX_KEEPALIVE_INTERVAL {
            problems.push(format!(
                "--keepalive-interval must be between 1ms and {}s: the official client gives up after 30s of silence",
                MAX_KEEPALIVE_INTERVAL.as_secs()
            ));
        }
        if t.client_timeout <= t.keepalive_interval {
            problems.push("--client-timeout must be longer than --keepalive-interval".to_owned());
        }
        for (name, value) in [
            ("--handshake-timeout", t.handshake_timeout),
            ("--write-timeout", t.write_timeout),
            ("--header-read-timeout", t.header_read_timeout),
        ] {
            if value.is_zero() {
                problems.push(format!("{name} must be more than zero"));
            }
        }
        let l = &self.limits;
        if l.max_message_bytes < 1024 {
            problems.push("--max-message-size must be at least 1KiB".to_owned());
        }
        if l.stateful_reconnect_buffer < 1024 {
            problems.push("--stateful-reconnect-buffer must be at least 1KiB".to_owned());
        }
        if l.outbound_queue == 0 {
            problems.push("--outbound-queue must be at least 1".to_owned());
        }
        if l.max_groups_per_connection == 0 {
            problems.push("--max-groups-per-connection must be at least 1".to_owned());
        }
        if l.max_invocations_per_second == 0 {
            problems.push("--max-invocations-per-second must be at least 1".to_owned());
        }
        if l.max_joins_per_second == 0 {
            problems.push("--max-joins-per-second must be at least 1".to_owned());
        }
        for (name, value) in [
            ("--max-connections", l.max_connections),
            ("--max-pending-handshakes", l.max_pending_handshakes),
            ("--max-pending-requests", l.max_pending_requests),
        ] {
            if value == 0 {
                problems.push(format!("{name} must be at least 1"));
            }
        }
        if let Err(rule) = contract::check_prefix(&self.redis.prefix) {
            problems.push(format!("--redis-prefix {rule}"));
        }
        let schemes = [
            "redis://",
            "rediss://",
            "redis+unix://",
            "redis+sentinel://",
            "rediss+sentinel://",
            "redis+cluster://",
            "rediss+cluster://",
        ];
        if let Some(url) = &self.redis.url
            && (url.0.split_whitespace().next().is_none()
                || !url
                    .0
                    .split_whitespace()
                    .all(|url| schemes.iter().any(|scheme| url.starts_with(scheme))))
        {
            problems.push(
                "--redis-url must be one or more URLs (separated by spaces) starting with redis://, rediss://, redis+unix://, redis+sentinel://, rediss+sentinel://, redis+cluster:// or rediss+cluster://".to_owned(),
            );
        }
        if self.listen.public == self.listen.admin && self.listen.public.port() != 0 {
            problems.push("--listen and --admin-listen must differ".to_owned());
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(ConfigError(problems))
        }
    }
}

/// Parses a byte size: `32768`, `32KiB`, `1MiB` (also `KB`/`MB`, read as binary units).
///
/// # Errors
/// A message naming the accepted forms.
pub fn parse_bytes(text: &str) -> Result<usize, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (digits, unit) = text.split_at(split);
    let number: usize = digits
        .parse()
        .map_err(|_| format!("`{text}` is not a size like 32768, 32KiB or 1MiB"))?;
    let factor = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1024,
        "m" | "mb" | "mib" => 1024 * 1024,
        _ => return Err(format!("`{text}` is not a size like 32768, 32KiB or 1MiB")),
    };
    number
        .checked_mul(factor)
        .ok_or_else(|| format!("`{text}` is too large"))
}

fn valid_origin(origin: &str) -> bool {
    let Some((scheme, rest)) = origin.split_once("://") else {
        return false;
    };
    matches!(scheme, "http" | "https")
        && !rest.is_empty()
        && !rest.contains('/')
        && !rest.contains(char::is_whitespace)
}

#[cfg(test)]
#[path = "config_tests.rs"]
mod tests;
