//! The `/api` routes and their handlers: configuration, demo tokens, jobs and contractors,
//! recommendations and assignments (each published with `Publisher`), a contractor's schedule.

use std::time::{SystemTime, UNIX_EPOCH};

use axum::extract::rejection::JsonRejection;
use axum::extract::{Path as UrlPath, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use chrono::{DateTime, DurationRound, Timelike, Utc};
use serde::{Deserialize, Serialize};
use serde_json::json;
use uuid::Uuid;

use publisher_lib::contract::{self, Event, Source};

use crate::App;
use crate::console_files::static_file;
use crate::error::ApiError;
use crate::store::{Assignment, Contractor, Job, JobStatus, REGIONS, Recommendations};

/// Version of the (pretend) scoring configuration sent in `RecommendationReady`.
const CONFIG_VERSION: u32 = 1;
/// How far ahead an assigned slot starts, and how long it lasts.
const SLOT_LEAD: chrono::Duration = chrono::Duration::hours(2);
const SLOT_LENGTH: chrono::Duration = chrono::Duration::hours(3);

/// The routes; every other path is the console's files.
pub(crate) fn router(app: App) -> Router {
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
