//! The real-time fan-out gateway.
//!
//! Browsers hold WebSockets speaking the SignalR JSON hub protocol; backends publish events
//! (over HTTP here, through Redis with the broker of the next layer); the gateway delivers each
//! event to the local members of its groups. Modules in reading order:
//!
//! - [`config`]: flags, environment, validation.
//! - [`protocol`], [`auth`], [`hub`]: the pure core (SignalR codec, tokens and join rules, hub methods).
//! - [`outbound`], [`groups`], [`broker`]: the data path, broker → groups → queue.
//! - [`connection`]: one task per WebSocket, framed with the workspace's `ws-frame` crate.
//! - [`http`]: routers and handlers, and the upgrade; with `start`, the only place that names axum.
//! - [`limits`]: admission bookkeeping (connections, handshakes, connect and publish rates).
//! - [`metrics`], [`shutdown`], [`telemetry`]: cross-cutting.
//!
//! [`start`] is the only place that wires the parts together.

pub mod auth;
pub mod broker;
pub mod config;
pub mod connection;
pub mod groups;
pub mod http;
pub mod hub;
pub mod limits;
pub mod metrics;
pub mod outbound;
pub mod protocol;
pub mod shutdown;
pub mod telemetry;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::auth::{Algorithm, ConnectionTokens, Verifier};
use crate::config::{Config, ConfigError, MIN_KEY_BYTES, Secret};
use crate::groups::Groups;
use crate::http::AppState;
use crate::shutdown::{Drained, Shutdown};

/// How long background tasks (the broker) get to stop after the connections are gone.
const BACKGROUND_STOP_TIMEOUT: Duration = Duration::from_secs(5);

/// A running gateway.
#[derive(Debug)]
pub struct Gateway {
    public_addr: SocketAddr,
    admin_addr: SocketAddr,
    trigger: CancellationToken,
    task: JoinHandle<anyhow::Result<()>>,
}

impl Gateway {
    /// Where the hub and the publish endpoint listen.
    pub fn public_addr(&self) -> SocketAddr {
        self.public_addr
    }

    /// Where `/healthz`, `/readyz` and `/metrics` listen.
    pub fn admin_addr(&self) -> SocketAddr {
        self.admin_addr
    }

    /// Starts the graceful shutdown; [`Gateway::wait`] returns when it is done.
    pub fn shutdown(&self) {
        self.trigger.cancel();
    }

    /// Waits until the gateway has stopped.
    ///
    /// # Errors
    /// When a server failed.
    pub async fn wait(self) -> anyhow::Result<()> {
        self.task.await.context("gateway task panicked")?
    }
}

/// Validates the configuration, binds both listeners and starts serving.
///
/// # Errors
/// An invalid configuration (every problem listed), unreadable key files, or a listener that
/// cannot bind.
pub async fn start(config: Config, metrics: PrometheusHandle) -> anyhow::Result<Gateway> {
    config.validate()?;
    let keys = Keys::load(&config).await?;
    let shutdown = Shutdown::new();
    let (subscriptions, requests) = broker::subscriptions(broker::SUBSCRIPTION_QUEUE);
    let groups = Arc::new(Groups::new(subscriptions));
    let broker = match &config.redis.url {
        None => broker::start_memory(
            groups.clone(),
            config.history.settings(),
            requests,
            &shutdown,
        ),
        Some(url) => broker::Broker::Redis(
            broker::redis::RedisBroker::start(
                broker::redis::RedisSettings {
                    url: url.expose().to_owned(),
                    ca_pem: match &config.redis.ca_file {
                        None => None,
                        Some(path) => Some(tokio::fs::read(path).await.map_err(|e| {
                            ConfigError(vec![format!("--redis-ca-file {}: {e}", path.display())])
                        })?),
                    },
                    prefix: config.redis.prefix.clone(),
                    subscriber_buffer: config.redis.subscriber_buffer as usize,
                    history: config.history.settings(),
                },
                groups.clone(),
                requests,
                &shutdown,
            )
            .map_err(|e| ConfigError(vec![format!("--redis-url: {e}")]))?,
        ),
    };
    let state = AppState {
        verifier: Arc::new(keys.verifier),
        connection_tokens: keys.connection_tokens,
        service_key: keys.service_key,
        origins: Arc::new(http::origin::Origins::new(
            &config.cors.origins,
            config.cors.allow_missing_origin,
        )),
        groups,
        broker,
        settings: Arc::new(connection::Settings::from_config(&config)),
        shutdown: shutdown.clone(),
        limits: limits::Limits::new(config.limits.admission()),
    };

    let public = TcpListener::bind(config.listen.public)
        .await
        .with_context(|| format!("binding the public listener on {}", config.listen.public))?;
    let admin = TcpListener::bind(config.listen.admin)
        .await
        .with_context(|| format!("binding the admin listener on {}", config.listen.admin))?;
    let public_addr = public.local_addr()?;
    let admin_addr = admin.local_addr()?;
    tracing::info!(
        public.addr = %public_addr,
        admin.addr = %admin_addr,
        broker = state.broker.label(),
        "listening"
    );

    let trigger = CancellationToken::new();
    let listener_stop = CancellationToken::new();
    let admin_stop = CancellationToken::new();
    let public_server = tokio::spawn(http::server::serve(
        public,
        http::public(state.clone()),
        Arc::clone(&state.limits),
        config.timeouts.header_read_timeout,
        listener_stop.clone(),
    ));
    let admin_server = tokio::spawn(
        axum::serve(admin, http::admin(state.clone(), metrics))
            .with_graceful_shutdown(admin_stop.clone().cancelled_owned())
            .into_future(),
    );
    let drain_timeout = config.timeouts.drain_timeout;
    let shutdown_delay = config.timeouts.shutdown_delay;
    let groups = Arc::clone(&state.groups);
    let stopping = trigger.clone();
    let task = tokio::spawn(async move {
        stopping.cancelled().await;
        let started = tokio::time::Instant::now();
        shutdown.begin_drain();
        if !shutdown_delay.is_zero() {
            tracing::info!(
                delay_ms = shutdown_delay.as_millis() as u64,
                "shutdown started: not ready, still serving until the load balancer notices"
            );
            tokio::time::sleep(shutdown_delay).await;
        }
        listener_stop.cancel();
        let queues = groups.begin_close_all(outbound::Closing::Shutdown);
        let spread = drain_timeout / 2;
        tracing::info!(
            connections = queues.len(),
            spread_ms = spread.as_millis() as u64,
            "no new connections; closing clients with reconnect allowed"
        );
        let closing = close_spread(queues, spread);
        // The listener has stopped accepting; plain HTTP requests still in flight finish on
        // their own, but none of them may hold the WebSocket drain back.
        let ((), server, drained) = tokio::join!(
            closing,
            tokio::time::timeout(drain_timeout, public_server),
            shutdown.drain_connections(drain_timeout)
        );
        match server {
            Ok(joined) => joined.context("public server panicked")?,
            Err(_) => tracing::warn!("HTTP requests still in flight at the drain deadline"),
        }
        match drained {
            Drained::Completely => tracing::info!(
                elapsed_ms = started.elapsed().as_millis() as u64,
                "connections drained"
            ),
            Drained::CutShort(left) => {
                tracing::warn!(left, "drain deadline reached with connections still open")
            }
        }
        shutdown.stop_background(BACKGROUND_STOP_TIMEOUT).await;
        admin_stop.cancel();
        admin_server
            .await
            .context("admin server panicked")?
            .context("admin server failed")?;
        tracing::info!(
            elapsed_ms = started.elapsed().as_millis() as u64,
            "shutdown finished"
        );
        Ok(())
    });
    Ok(Gateway {
        public_addr,
        admin_addr,
        trigger,
        task,
    })
}

/// Closes `queues` in even batches over `over` (at most one batch every 20 ms), so a replica's
/// clients reconnect to the others at a steady rate instead of all at once.
async fn close_spread(queues: Vec<outbound::Outbound>, over: Duration) {
    const STEP: Duration = Duration::from_millis(20);
    if queues.is_empty() {
        return;
    }
    let most_batches = (over.as_millis() / STEP.as_millis()).max(1) as usize;
    let batch = queues.len().div_ceil(queues.len().min(most_batches));
    let batches = queues.len().div_ceil(batch);
    let period = over / u32::try_from(batches).unwrap_or(u32::MAX);
    let mut tick = tokio::time::interval(period.max(Duration::from_millis(1)));
    for chunk in queues.chunks(batch) {
        tick.tick().await;
        for queue in chunk {
            queue.close(outbound::Closing::Shutdown);
        }
    }
}

/// Key material read from the configuration and its files.
struct Keys {
    verifier: Verifier,
    connection_tokens: ConnectionTokens,
    service_key: Option<Arc<str>>,
}

impl Keys {
    /// Reads every key file and checks every key, reporting all problems at once.
    async fn load(config: &Config) -> Result<Self, ConfigError> {
        let auth = &config.auth;
        let mut problems = Vec::new();
        let jwt_key = match auth.jwt_algorithm {
            Algorithm::Hs256 => secret(
                &auth.jwt_secret,
                &auth.jwt_secret_file,
                "--jwt-secret-file",
                &mut problems,
            )
            .await
            .map(|s| s.expose().as_bytes().to_vec()),
            Algorithm::Rs256 | Algorithm::Es256 => match &auth.jwt_public_key_file {
                Some(path) => match tokio::fs::read(path).await {
                    Ok(pem) => Some(pem),
                    Err(e) => {
                        problems.push(format!("--jwt-public-key-file {}: {e}", path.display()));
                        None
                    }
                },
                None => None,
            },
        };
        let verifier = jwt_key.and_then(|key| {
            Verifier::try_new(
                auth.jwt_algorithm,
                &key,
                auth.jwt_issuer.as_deref(),
                auth.jwt_audience.as_deref(),
            )
            .map(|v| v.with_leeway(auth.jwt_leeway.as_secs()))
            .map_err(|e| problems.push(format!("user token key: {e}")))
            .ok()
        });
        let service_key = secret(
            &auth.service_key,
            &auth.service_key_file,
            "--service-key-file",
            &mut problems,
        )
        .await;
        let connection_secret = secret(
            &auth.connection_token_secret,
            &auth.connection_token_secret_file,
            "--connection-token-secret-file",
            &mut problems,
        )
        .await;
        // Values given directly were checked by `Config::validate`; these came from files.
        for (flag, file, value) in [
            ("--service-key-file", &auth.service_key_file, &service_key),
            (
                "--connection-token-secret-file",
                &auth.connection_token_secret_file,
                &connection_secret,
            ),
        ] {
            if let (Some(path), Some(value)) = (file, value)
                && value.expose().len() < MIN_KEY_BYTES
            {
                problems.push(format!(
                    "{flag} {}: the key must be at least {MIN_KEY_BYTES} bytes",
                    path.display()
                ));
            }
        }
        let Some(verifier) = verifier.filter(|_| problems.is_empty()) else {
            if problems.is_empty() {
                problems.push("no key for user tokens is configured".to_owned());
            }
            return Err(ConfigError(problems));
        };
        if service_key.is_none() {
            tracing::warn!("no service key configured: POST /api/v1/events is disabled");
        }
        let connection_secret = connection_secret.unwrap_or_else(|| {
            tracing::warn!(
                "no connection token secret configured: negotiate tokens are valid on this replica only; set GATEWAY_CONNECTION_TOKEN_SECRET on every replica"
            );
            Secret::new(auth::dev::random_secret())
        });
        Ok(Self {
            verifier,
            connection_tokens: ConnectionTokens::new(connection_secret.expose().as_bytes()),
            service_key: service_key.map(|key| Arc::from(key.expose())),
        })
    }
}

/// A secret given directly or by file; a file that cannot be read is a problem.
async fn secret(
    value: &Option<Secret>,
    file: &Option<std::path::PathBuf>,
    flag: &str,
    problems: &mut Vec<String>,
) -> Option<Secret> {
    if let Some(value) = value {
        return Some(value.clone());
    }
    let path = file.as_deref()?;
    match read_secret(path).await {
        Ok(secret) => Some(secret),
        Err(e) => {
            problems.push(format!("{flag} {}: {e}", path.display()));
            None
        }
    }
}

async fn read_secret(path: &Path) -> std::io::Result<Secret> {
    let text = tokio::fs::read_to_string(path).await?;
    Ok(Secret::new(text.trim_end_matches(['\n', '\r'])))
}
