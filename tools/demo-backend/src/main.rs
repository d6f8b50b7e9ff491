//! A demo SmartScheduler backend for the console in `frontend/console/`: jobs, contractors,
//! recommendations and assignments held in memory, events published with
//! [`publisher_lib::Publisher`].
//!
//! Shows the HTTP side of stories 6.5 and 7.6: `POST /api/recommendations` computes a ranked list,
//! stores it and publishes `RecommendationReady` (idempotency key = `requestId`); the dispatcher's
//! console then fetches the list over HTTP. `POST /api/assign` marks a job assigned and publishes
//! `JobAssigned` to the job's region and to the contractor. For the demo only, it also mints the
//! HS256 user tokens the gateway accepts (`GET /api/token`); a real backend gets them from its
//! identity provider.
//!
//! | Endpoint | Answer |
//! |---|---|
//! | `GET /api/config` | `{"hubUrl"}` |
//! | `GET /api/token?role=dispatcher&regions=west,east` or `?role=contractor&contractorId=ID` | `{"token"}` |
//! | `GET /api/jobs[?region=west[,east]]` | `[{jobId, region, title, status, contractorId?, ...}]` |
//! | `GET /api/contractors` | `[{contractorId, name, region}]` |
//! | `POST /api/recommendations {"jobId"}` | `202 {"requestId"}`, then `RecommendationReady` |
//! | `GET /api/recommendations/{jobId}` | `{jobId, requestId, ranked: [{contractorId, name, score}]}` |
//! | `POST /api/assign {"jobId", "contractorId"}` | `202 {"assignmentId"}`, then `JobAssigned` |
//! | `GET /api/schedule?contractorId=ID` | the contractor's assigned jobs |
//!
//! Errors are `{"error": "..."}` with 400 for unknown jobs, contractors, regions or bad input, 404
//! for recommendations not computed yet, 503 when Redis refuses the publish. With
//! `--console-dir`, every other path is served from that directory (`/` is `index.html`).
//!
//! Needs a Redis (the one the gateway replicas use) and the gateway's JWT secret. Run it with:
//!
//! ```text
//! cargo run -p demo-backend -- --listen 127.0.0.1:8090 \
//!   --redis-url redis://127.0.0.1:6390 --jwt-secret "$JWT_SECRET" \
//!   --hub-url http://127.0.0.1:8080/hub/v1 --console-dir frontend/console/dist
//! ```
//!
//! Modules: `api` (the routes and their handlers), `store` (the seed data and what the demo
//! remembers), `console_files` (the built console), `error` (`ApiError`, answered as JSON).

mod api;
mod console_files;
mod error;
mod store;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use clap::Parser;
use publisher_lib::{Publisher, PublisherConfig};

use crate::store::Store;

/// Command line.
#[derive(Debug, Parser)]
#[command(about = "Demo SmartScheduler backend for the realtime console")]
struct Cli {
    /// Address to listen on (loopback for a demo).
    #[arg(long, default_value = "127.0.0.1:8090")]
    listen: SocketAddr,
    /// Redis the gateway replicas subscribe to.
    #[arg(long, env = "REDIS_URL")]
    redis_url: String,
    /// The gateway's HS256 JWT secret, to mint user tokens.
    #[arg(long, env = "JWT_SECRET")]
    jwt_secret: String,
    /// Hub URL the console connects to (through the load balancer).
    #[arg(long, default_value = "http://127.0.0.1:8080/hub/v1")]
    hub_url: String,
    /// Lifetime of minted user tokens, in seconds.
    #[arg(long, default_value_t = 3600)]
    token_ttl: u64,
    /// Directory of the built console to serve at `/`.
    #[arg(long)]
    console_dir: Option<PathBuf>,
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let cli = Cli::parse();
    let publisher = Publisher::new(PublisherConfig::new(cli.redis_url.clone()))?;
    let app = App {
        publisher,
        hub_url: cli.hub_url,
        jwt_secret: Arc::from(cli.jwt_secret.into_bytes()),
        token_ttl: Duration::from_secs(cli.token_ttl),
        console_dir: cli.console_dir,
        store: Arc::new(Mutex::new(Store::seed())),
    };
    let listener = tokio::net::TcpListener::bind(cli.listen).await?;
    eprintln!(
        "demo-backend: listening on http://{} (redis {}, hub {})",
        listener.local_addr()?,
        cli.redis_url,
        app.hub_url
    );
    axum::serve(listener, api::router(app))
        .with_graceful_shutdown(async {
            // An error here means no signal handler: then run until killed.
            if tokio::signal::ctrl_c().await.is_err() {
                std::future::pending::<()>().await;
            }
        })
        .await?;
    Ok(())
}

/// Everything a handler needs; cheap to clone.
#[derive(Debug, Clone)]
pub(crate) struct App {
    pub(crate) publisher: Publisher,
    pub(crate) hub_url: String,
    pub(crate) jwt_secret: Arc<[u8]>,
    pub(crate) token_ttl: Duration,
    pub(crate) console_dir: Option<PathBuf>,
    pub(crate) store: Arc<Mutex<Store>>,
}

impl App {
    /// The store; never held across an await.
    pub(crate) fn store(&self) -> MutexGuard<'_, Store> {
        self.store.lock().unwrap_or_else(PoisonError::into_inner)
    }
}
