//! The real-time fan-out gateway.
//!
//! Browsers hold WebSockets speaking the SignalR JSON hub protocol; backends publish events
//! (over HTTP here, through Redis with the broker of the next layer); the gateway delivers each
//! event to the local members of its groups. Modules in reading order:
//!
//! - [`config`]: flags, environment, validation; [`keys`]: the key files it names.
//! - [`protocol`], [`auth`], [`hub`]: the pure core (SignalR codec, tokens and join rules, hub methods).
//! - [`outbound`], [`groups`], [`broker`]: the data path, broker → groups → queue; [`order`]:
//!   the pure decisions of ordering and resume they share (the replica's cursor, each join's
//!   hold, cut and floor).
//! - [`connection`]: one task per WebSocket, framed with the workspace's `ws-frame` crate.
//! - [`http`]: routers and handlers, the upgrade and the servers; the only module that names axum.
//! - [`limits`]: admission bookkeeping (connections, handshakes, connect and publish rates).
//! - [`metrics`], [`shutdown`], [`telemetry`]: cross-cutting; [`shutdown`] also owns the drain.
//!
//! [`start`] is the only place that wires the parts together, and does nothing else.
// The connection task's future nests the join's broker round trip (Redis connection futures);
// proving it Send takes more than the default depth since stateful reconnect wrapped it once more.
#![recursion_limit = "256"]

pub mod auth;
pub mod broker;
pub mod config;
pub mod connection;
pub mod groups;
pub mod http;
pub mod hub;
pub mod keys;
pub mod limits;
pub mod metrics;
pub mod order;
pub mod outbound;
pub mod protocol;
pub mod shutdown;
pub mod telemetry;

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context;
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::config::{Config, ConfigError};
use crate::groups::Groups;
use crate::http::AppState;
use crate::keys::Keys;
use crate::shutdown::{Servers, Shutdown};

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
    let keys = Keys::load(&config)?;
    let shutdown = Shutdown::new();
    let (subscriptions, requests) = broker::subscriptions(broker::SUBSCRIPTION_QUEUE);
    let groups = Arc::new(Groups::new(subscriptions));
    // The registry of stateful connections; the Redis broker hands it other replicas'
    // requests for them.
    let resumable: Arc<connection::Resumable<tokio::net::tcp::OwnedReadHalf>> = Arc::default();
    let broker = match &config.redis.url {
        None => broker::start_memory(
            groups.clone(),
            config.history.settings(),
            requests,
            &shutdown,
        ),
        Some(url) => broker::Broker::Redis(
            broker::shards::RedisShards::start(
                &broker::redis::RedisSettings {
                    url: url.expose().to_owned(),
                    ca_pem: keys.redis_ca,
                    prefix: config.redis.prefix.clone(),
                    subscriber_buffer: config.redis.subscriber_buffer as usize,
                    history: config.history.settings(),
                },
                groups.clone(),
                resumable.clone(),
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
        resumable,
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

    let stop_accepting = CancellationToken::new();
    let stop_admin = CancellationToken::new();
    let servers = Servers {
        delay: config.timeouts.shutdown_delay,
        timeout: config.timeouts.drain_timeout,
        public: tokio::spawn(http::server::serve(
            public,
            http::public(state.clone()),
            Arc::clone(&state.limits),
            config.timeouts.header_read_timeout,
            stop_accepting.clone(),
        )),
        stop_accepting,
        admin: tokio::spawn(http::server::serve_admin(
            admin,
            http::admin(state.clone(), metrics),
            stop_admin.clone(),
        )),
        stop_admin,
    };
    let trigger = CancellationToken::new();
    let stopping = trigger.clone();
    let groups = Arc::clone(&state.groups);
    let task = tokio::spawn(async move {
        stopping.cancelled().await;
        shutdown
            .drain(servers, || {
                groups.begin_close_all(outbound::Closing::Shutdown)
            })
            .await
    });
    Ok(Gateway {
        public_addr,
        admin_addr,
        trigger,
        task,
    })
}
