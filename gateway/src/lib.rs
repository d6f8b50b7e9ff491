//! The real-time fan-out gateway.
//!
//! Browsers hold WebSockets speaking the SignalR JSON hub protocol; backends publish events
//! (over HTTP here, through Redis with the broker of the next layer); the gateway delivers each
//! event to the local members of its groups. Modules in reading order:
//!
//! - [`config`]: flags, environment, validation.
//! - [`protocol`], [`auth`], [`hub`]: the pure core (SignalR codec, tokens and join rules, hub methods).
//! - [`outbound`], [`groups`], [`broker`]: the data path, broker → groups → queue.
//! - [`connection`]: one task per WebSocket.
//! - [`http`]: routers and handlers, the only place besides `connection` that names axum.
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
use crate::config::{Config, Secret};
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
    let verifier = Arc::new(verifier(&config).await?);
    let connection_tokens = ConnectionTokens::new(
        match &config.auth.connection_token_secret {
            Some(secret) => secret.expose().to_owned(),
            None => {
                tracing::warn!(
                    "no connection token secret configured: negotiate tokens are valid on this replica only; set GATEWAY_CONNECTION_TOKEN_SECRET on every replica"
                );
                auth::dev::random_secret()
            }
        }
        .as_bytes(),
    );
    let service_key = match (&config.auth.service_key, &config.auth.service_key_file) {
        (Some(key), _) => Some(Arc::from(key.expose())),
        (None, Some(path)) => Some(Arc::from(read_secret(path).await?.expose())),
        (None, None) => {
            tracing::warn!("no service key configured: POST /api/v1/events is disabled");
            None
        }
    };

    let shutdown = Shutdown::new();
    let (subscriptions, requests) = broker::subscriptions(broker::SUBSCRIPTION_QUEUE);
    let groups = Arc::new(Groups::new(subscriptions));
    let broker = broker::start_memory(groups.clone(), requests, &shutdown);
    let state = AppState {
        verifier,
        connection_tokens,
        service_key,
        origins: Arc::new(http::origin::Origins::new(
            &config.cors.origins,
            config.cors.allow_missing_origin,
        )),
        groups,
        broker,
        settings: Arc::new(connection::Settings::from_config(&config)),
        shutdown: shutdown.clone(),
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
    let admin_stop = CancellationToken::new();
    let public_server = tokio::spawn(
        axum::serve(
            public,
            http::public(state.clone()).into_make_service_with_connect_info::<SocketAddr>(),
        )
        .with_graceful_shutdown(trigger.clone().cancelled_owned())
        .into_future(),
    );
    let admin_server = tokio::spawn(
        axum::serve(admin, http::admin(state, metrics))
            .with_graceful_shutdown(admin_stop.clone().cancelled_owned())
            .into_future(),
    );
    let drain_timeout = config.timeouts.drain_timeout;
    let stopping = trigger.clone();
    let task = tokio::spawn(async move {
        stopping.cancelled().await;
        let started = tokio::time::Instant::now();
        tracing::info!("shutdown started: not ready, no new connections");
        shutdown.begin_drain();
        public_server
            .await
            .context("public server panicked")?
            .context("public server failed")?;
        tracing::info!(
            connections = shutdown.connections().len(),
            "closing connections with reconnect allowed"
        );
        match shutdown.drain_connections(drain_timeout).await {
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

/// Builds the token verifier from the configured key material.
async fn verifier(config: &Config) -> anyhow::Result<Verifier> {
    let auth = &config.auth;
    let key = match auth.jwt_algorithm {
        Algorithm::Hs256 => match (&auth.jwt_secret, &auth.jwt_secret_file) {
            (Some(secret), _) => secret.expose().as_bytes().to_vec(),
            (None, Some(path)) => read_secret(path).await?.expose().as_bytes().to_vec(),
            (None, None) => anyhow::bail!("no HS256 secret configured"),
        },
        Algorithm::Rs256 | Algorithm::Es256 => {
            let path = auth
                .jwt_public_key_file
                .as_deref()
                .context("no public key file configured")?;
            tokio::fs::read(path)
                .await
                .with_context(|| format!("reading the JWT public key {}", path.display()))?
        }
    };
    Ok(Verifier::try_new(
        auth.jwt_algorithm,
        &key,
        auth.jwt_issuer.as_deref(),
        auth.jwt_audience.as_deref(),
    )?)
}

async fn read_secret(path: &Path) -> anyhow::Result<Secret> {
    let text = tokio::fs::read_to_string(path)
        .await
        .with_context(|| format!("reading secret file {}", path.display()))?;
    Ok(Secret::new(text.trim_end_matches(['\n', '\r'])))
}
