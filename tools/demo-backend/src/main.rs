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

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Component, Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::extract::rejection::JsonRejection;
use axum::extract::{Path as UrlPath, Query, State};
use axum::http::{StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use chrono::{DateTime, DurationRound, Timelike, Utc};
use clap::Parser;
use serde::{Deserialize, Serialize};
use serde_json::json;
use uuid::Uuid;

use publisher_lib::contract::{self, Event, Source};
use publisher_lib::{Publisher, PublisherConfig};

/// Regions of the seed data, in display order.
const REGIONS: [&str; 3] = ["west", "east", "north"];
/// Version of the (pretend) scoring configuration sent in `RecommendationReady`.
const CONFIG_VERSION: u32 = 1;
/// How far ahead an assigned slot starts, and how long it lasts.
const SLOT_LEAD: chrono::Duration = chrono::Duration::hours(2);
const SLOT_LENGTH: chrono::Duration = chrono::Duration::hours(3);

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
    axum::serve(listener, router(app))
        .with_graceful_shutdown(async {
            // An error here means no signal handler: then run until killed.
            if tokio::signal::ctrl_c().await.is_err() {
                std::future::pending::<()>().await;
            }
        })
        .await?;
    Ok(())
}

fn router(app: App) -> Router {
    Router::new()
        .route("/api/config", get(config))
        .route("/api/token", get(token))
        .route("/api/jobs", get(jobs))
        .route("/api/contractors", get(contractors))
        .route("/api/recommendations", post(recommend))
        .route("/api/recommendations/{job_id}", get(recommendations))
        .route("/api/assign", post(assign))
        .route("/api/schedule", get(schedule))
        .fallback(static_file)
        .with_state(app)
}

// === State ===

/// Everything a handler needs; cheap to clone.
#[derive(Debug, Clone)]
struct App {
    publisher: Publisher,
    hub_url: String,
    jwt_secret: Arc<[u8]>,
    token_ttl: Duration,
    console_dir: Option<PathBuf>,
    store: Arc<Mutex<Store>>,
}

impl App {
    /// The store; never held across an await.
    fn store(&self) -> MutexGuard<'_, Store> {
        self.store.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// The in-memory data of the demo.
#[derive(Debug)]
struct Store {
    contractors: Vec<Contractor>,
    jobs: Vec<Job>,
    /// Latest recommendations per job.
    recommendations: HashMap<Uuid, Recommendations>,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
struct Contractor {
    contractor_id: Uuid,
    name: String,
    region: String,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
struct Job {
    job_id: Uuid,
    region: String,
    title: String,
    status: JobStatus,
    #[serde(flatten, skip_serializing_if = "Option::is_none")]
    assignment: Option<Assignment>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
enum JobStatus {
    Open,
    Assigned,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
struct Assignment {
    contractor_id: Uuid,
    assignment_id: Uuid,
    start_utc: DateTime<Utc>,
    end_utc: DateTime<Utc>,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
struct Recommendations {
    job_id: Uuid,
    request_id: Uuid,
    ranked: Vec<Ranked>,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
struct Ranked {
    contractor_id: Uuid,
    name: String,
    score: u32,
}

impl Store {
    /// Fixed seed data: three contractors and four jobs per region, with stable ids
    /// (`c0000000-…` contractors, `a0000000-…` jobs) so tests and bookmarks can name them.
    fn seed() -> Self {
        const NAMES: [&str; 9] = [
            "Ada Alvarez",
            "Ben Brooks",
            "Cleo Chen",
            "Dev Dalton",
            "Eli Evans",
            "Fay Fischer",
            "Gus Green",
            "Hana Hill",
            "Ivo Ivanov",
        ];
        const TITLES: [&str; 4] = [
            "Replace water heater",
            "Fix leaking roof",
            "Install ceiling fan",
            "Repair garage door",
        ];
        let mut contractors = Vec::new();
        let mut jobs = Vec::new();
        for (r, region) in (0u128..).zip(REGIONS) {
            for c in 0..3 {
                contractors.push(Contractor {
                    contractor_id: seed_id(0xc, r * 16 + c + 1),
                    name: NAMES[usize::try_from(r * 3 + c).unwrap_or_default()].to_owned(),
                    region: region.to_owned(),
                });
            }
            for (j, title) in (0u128..).zip(TITLES) {
                jobs.push(Job {
                    job_id: seed_id(0xa, r * 16 + j + 1),
                    region: region.to_owned(),
                    title: format!("{title} ({region})"),
                    status: JobStatus::Open,
                    assignment: None,
                });
            }
        }
        Self {
            contractors,
            jobs,
            recommendations: HashMap::new(),
        }
    }

    fn job(&self, id: Uuid) -> Result<&Job, ApiError> {
        self.jobs
            .iter()
            .find(|job| job.job_id == id)
            .ok_or_else(|| ApiError::bad_request(format!("unknown job {id}")))
    }

    fn contractor(&self, id: Uuid) -> Result<&Contractor, ApiError> {
        self.contractors
            .iter()
            .find(|c| c.contractor_id == id)
            .ok_or_else(|| ApiError::bad_request(format!("unknown contractor {id}")))
    }

    /// The contractors of the job's region, best first, with a deterministic pseudo-score.
    fn rank(&self, job: &Job) -> Vec<Ranked> {
        let mut ranked: Vec<Ranked> = self
            .contractors
            .iter()
            .filter(|c| c.region == job.region)
            .map(|c| Ranked {
                contractor_id: c.contractor_id,
                name: c.name.clone(),
                score: pseudo_score(job.job_id, c.contractor_id),
            })
            .collect();
        ranked.sort_by(|a, b| {
            b.score
                .cmp(&a.score)
                .then(a.contractor_id.cmp(&b.contractor_id))
        });
        ranked
    }
}

/// `{prefix}0000000-0000-4000-8000-{n:012x}`: a valid, readable v4-shaped UUID.
fn seed_id(prefix: u128, n: u128) -> Uuid {
    Uuid::from_u128((prefix << 124) | (0x4000 << 64) | (0x8000 << 48) | n)
}

/// A score from 50 to 99 that depends only on the pair (FNV-1a over both ids).
fn pseudo_score(job: Uuid, contractor: Uuid) -> u32 {
    let hash = job
        .as_bytes()
        .iter()
        .chain(contractor.as_bytes())
        .fold(0x811c_9dc5_u32, |h, b| {
            (h ^ u32::from(*b)).wrapping_mul(0x0100_0193)
        });
    50 + hash % 50
}

// === Handlers ===

async fn config(State(app): State<App>) -> Json<serde_json::Value> {
    Json(json!({ "hubUrl": app.hub_url }))
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct TokenQuery {
    role: Option<String>,
    regions: Option<String>,
    contractor_id: Option<String>,
}

/// The claims the gateway reads (docs/events.md, "User tokens").
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct Claims {
    sub: String,
    role: &'static str,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    regions: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    contractor_id: Option<String>,
    exp: u64,
}

async fn token(
    State(app): State<App>,
    Query(query): Query<TokenQuery>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let exp = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .saturating_add(app.token_ttl)
        .as_secs();
    let claims = match query.role.as_deref() {
        Some("dispatcher") => {
            let regions = regions_param(query.regions.as_deref())?;
            if regions.is_empty() {
                return Err(ApiError::bad_request(
                    "a dispatcher token needs regions, e.g. regions=west,east",
                ));
            }
            Claims {
                sub: format!("dispatcher-{}", regions.join("-")),
                role: "dispatcher",
                regions,
                contractor_id: None,
                exp,
            }
        }
        Some("contractor") => {
            let id = uuid_param("contractorId", query.contractor_id.as_deref())?;
            app.store().contractor(id)?;
            Claims {
                sub: id.to_string(),
                role: "contractor",
                regions: Vec::new(),
                contractor_id: Some(id.to_string()),
                exp,
            }
        }
        _ => {
            return Err(ApiError::bad_request(
                "role must be `dispatcher` or `contractor`",
            ));
        }
    };
    let token = jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(&app.jwt_secret),
    )
    .map_err(|e| ApiError::internal(format!("could not sign the token: {e}")))?;
    Ok(Json(json!({ "token": token })))
}

#[derive(Debug, Deserialize)]
struct JobsQuery {
    region: Option<String>,
}

async fn jobs(
    State(app): State<App>,
    Query(query): Query<JobsQuery>,
) -> Result<Json<Vec<Job>>, ApiError> {
    let regions = regions_param(query.region.as_deref())?;
    let store = app.store();
    Ok(Json(
        store
            .jobs
            .iter()
            .filter(|job| regions.is_empty() || regions.contains(&job.region))
            .cloned()
            .collect(),
    ))
}

async fn contractors(State(app): State<App>) -> Json<Vec<Contractor>> {
    Json(app.store().contractors.clone())
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct RecommendRequest {
    job_id: Uuid,
}

async fn recommend(
    State(app): State<App>,
    body: Result<Json<RecommendRequest>, JsonRejection>,
) -> Result<Response, ApiError> {
    let Json(request) = body?;
    let request_id = Uuid::new_v4();
    let region = {
        let mut store = app.store();
        let job = store.job(request.job_id)?;
        let (region, ranked) = (job.region.clone(), store.rank(job));
        store.recommendations.insert(
            request.job_id,
            Recommendations {
                job_id: request.job_id,
                request_id,
                ranked,
            },
        );
        region
    };
    // Stored before publishing, so a console that reacts to the event finds the new list.
    let event = Event::RecommendationReady(contract::RecommendationReady {
        job_id: request.job_id,
        request_id,
        region,
        config_version: CONFIG_VERSION,
        generated_at: now(),
    });
    publish(&app, &event).await?;
    Ok(accepted(json!({ "requestId": request_id })))
}

async fn recommendations(
    State(app): State<App>,
    UrlPath(job_id): UrlPath<String>,
) -> Result<Json<Recommendations>, ApiError> {
    let job_id = uuid_param("jobId", Some(&job_id))?;
    let store = app.store();
    store.job(job_id)?;
    store
        .recommendations
        .get(&job_id)
        .cloned()
        .map(Json)
        .ok_or_else(|| ApiError {
            status: StatusCode::NOT_FOUND,
            message: format!("no recommendations for job {job_id} yet: POST /api/recommendations"),
        })
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct AssignRequest {
    job_id: Uuid,
    contractor_id: Uuid,
}

async fn assign(
    State(app): State<App>,
    body: Result<Json<AssignRequest>, JsonRejection>,
) -> Result<Response, ApiError> {
    let Json(request) = body?;
    // The slot starts on the hour, some hours ahead.
    let start_utc = (now() + SLOT_LEAD)
        .duration_trunc(chrono::Duration::hours(1))
        .unwrap_or_else(|_| now() + SLOT_LEAD);
    let assignment = Assignment {
        contractor_id: request.contractor_id,
        assignment_id: Uuid::new_v4(),
        start_utc,
        end_utc: start_utc + SLOT_LENGTH,
    };
    let region = {
        let store = app.store();
        store.contractor(request.contractor_id)?;
        store.job(request.job_id)?.region.clone()
    };
    let event = Event::JobAssigned(contract::JobAssigned {
        job_id: request.job_id,
        contractor_id: assignment.contractor_id,
        assignment_id: assignment.assignment_id,
        start_utc: assignment.start_utc,
        end_utc: assignment.end_utc,
        region,
        source: Source::Manual,
        audit_id: Uuid::new_v4(),
    });
    // Recorded before publishing, so a console that refetches on the event sees the assignment.
    let assignment_id = assignment.assignment_id;
    {
        let mut store = app.store();
        if let Some(job) = store.jobs.iter_mut().find(|j| j.job_id == request.job_id) {
            job.status = JobStatus::Assigned;
            job.assignment = Some(assignment);
        }
    }
    publish(&app, &event).await?;
    Ok(accepted(json!({ "assignmentId": assignment_id })))
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct ScheduleQuery {
    contractor_id: Option<String>,
}

async fn schedule(
    State(app): State<App>,
    Query(query): Query<ScheduleQuery>,
) -> Result<Json<Vec<Job>>, ApiError> {
    let id = uuid_param("contractorId", query.contractor_id.as_deref())?;
    let store = app.store();
    store.contractor(id)?;
    let mut jobs: Vec<Job> = store
        .jobs
        .iter()
        .filter(|job| job.assignment.as_ref().map(|a| a.contractor_id) == Some(id))
        .cloned()
        .collect();
    jobs.sort_by_key(|job| job.assignment.as_ref().map(|a| a.start_utc));
    Ok(Json(jobs))
}

/// Serves the console: `/` is `index.html`; paths outside the directory are refused.
async fn static_file(State(app): State<App>, uri: Uri) -> Result<Response, ApiError> {
    let not_found = || ApiError {
        status: StatusCode::NOT_FOUND,
        message: format!("no route for {}", uri.path()),
    };
    let Some(dir) = app.console_dir.as_deref() else {
        return Err(not_found());
    };
    if uri.path().starts_with("/api/") {
        return Err(not_found());
    }
    let relative = match uri.path().trim_start_matches('/') {
        "" => "index.html",
        path => path,
    };
    let relative = Path::new(relative);
    if !relative
        .components()
        .all(|c| matches!(c, Component::Normal(_)))
    {
        return Err(not_found());
    }
    let bytes = tokio::fs::read(dir.join(relative))
        .await
        .map_err(|_| not_found())?;
    let content_type = match relative.extension().and_then(|e| e.to_str()) {
        Some("html") => "text/html; charset=utf-8",
        Some("js") => "text/javascript; charset=utf-8",
        Some("css") => "text/css; charset=utf-8",
        Some("map" | "json") => "application/json",
        Some("png") => "image/png",
        Some("svg") => "image/svg+xml",
        _ => "application/octet-stream",
    };
    Ok((
        [
            (header::CONTENT_TYPE, content_type),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        bytes,
    )
        .into_response())
}

// === Helpers ===

async fn publish(app: &App, event: &Event) -> Result<(), ApiError> {
    app.publisher.publish(event).await.map(drop).map_err(|e| {
        let mut message = format!("publishing {:?} failed: {e}", event.kind());
        let mut source = std::error::Error::source(&e);
        while let Some(cause) = source {
            message.push_str(&format!(": {cause}"));
            source = cause.source();
        }
        ApiError {
            status: StatusCode::SERVICE_UNAVAILABLE,
            message,
        }
    })
}

fn accepted(body: serde_json::Value) -> Response {
    (StatusCode::ACCEPTED, Json(body)).into_response()
}

/// Now in UTC, whole seconds (the contract allows fractions; whole seconds read better).
fn now() -> DateTime<Utc> {
    let now = Utc::now();
    now.with_nanosecond(0).unwrap_or(now)
}

/// A comma-separated list of known regions; empty when absent.
fn regions_param(value: Option<&str>) -> Result<Vec<String>, ApiError> {
    value
        .unwrap_or_default()
        .split(',')
        .map(str::trim)
        .filter(|r| !r.is_empty())
        .map(|r| {
            if REGIONS.contains(&r) {
                Ok(r.to_owned())
            } else {
                Err(ApiError::bad_request(format!(
                    "unknown region `{r}`; the demo has {}",
                    REGIONS.join(", ")
                )))
            }
        })
        .collect()
}

fn uuid_param(name: &str, value: Option<&str>) -> Result<Uuid, ApiError> {
    let value = value.ok_or_else(|| ApiError::bad_request(format!("`{name}` is required")))?;
    Uuid::try_parse(value)
        .map_err(|_| ApiError::bad_request(format!("`{name}` is not a UUID: `{value}`")))
}

/// An error answered as `{"error": message}`.
#[derive(Debug)]
struct ApiError {
    status: StatusCode,
    message: String,
}

impl ApiError {
    fn bad_request(message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
        }
    }

    fn internal(message: String) -> Self {
        Self {
            status: StatusCode::INTERNAL_SERVER_ERROR,
            message,
        }
    }
}

impl From<JsonRejection> for ApiError {
    fn from(rejection: JsonRejection) -> Self {
        Self::bad_request(rejection.body_text())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, Json(json!({ "error": self.message }))).into_response()
    }
}
