//! Publishes one event with [`publisher_lib::Publisher`] and prints the receipt.
//!
//! `recommendation` (the default) builds a typed `RecommendationReady` in code and publishes it
//! to the `/dispatch/{region}` group's Redis channel (`rt:{/dispatch/west}`). `job-assigned`
//! reads a `JobAssigned` from its JSON with the contract's validation, and shows that one publish
//! reaches two groups: the job's dispatch region (`rt:{/dispatch/west}`) and the assigned
//! contractor (`rt:{/contractor/<id>}`), under one envelope id, with a position in each. Run it
//! twice within five minutes: the second run is acknowledged as a duplicate (the idempotency key
//! is the event's `assignmentId`) and delivers nothing.
//!
//! The receipt gives the envelope id, the event's position in each group (epoch and seq) and how
//! many gateway replicas were subscribed.
//!
//! Needs a Redis reachable at `REDIS_URL` (default `redis://127.0.0.1:6379`). Run it with:
//!
//! ```text
//! REDIS_URL=redis://127.0.0.1:6379 cargo run -p publisher-lib --example publish -- recommendation
//! REDIS_URL=redis://127.0.0.1:6379 cargo run -p publisher-lib --example publish -- job-assigned
//! ```

use chrono::Utc;
use publisher_lib::contract::{Event, RecommendationReady};
use publisher_lib::{Publisher, PublisherConfig};
use uuid::Uuid;

const JOB_ASSIGNED: &str = r#"{
  "type": "JobAssigned",
  "jobId": "7d9f4f3e-1c2b-4d5e-8f60-123456789abc",
  "contractorId": "a1b2c3d4-e5f6-4a7b-8c9d-0e1f2a3b4c5d",
  "assignmentId": "11111111-2222-4333-8444-555555555555",
  "startUtc": "2025-11-09T08:00:00Z",
  "endUtc": "2025-11-09T10:00:00Z",
  "region": "west",
  "source": "manual",
  "auditId": "99999999-8888-4777-8666-555555555555"
}"#;

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let event = match std::env::args().nth(1).as_deref() {
        None | Some("recommendation") => Event::RecommendationReady(RecommendationReady {
            job_id: Uuid::new_v4(),
            request_id: Uuid::new_v4(),
            region: "west".to_owned(),
            config_version: 1,
            generated_at: Utc::now(),
        }),
        Some("job-assigned") => Event::from_json(JOB_ASSIGNED.as_bytes())?,
        Some(other) => {
            return Err(
                format!("unknown event kind {other:?}: recommendation or job-assigned").into(),
            );
        }
    };

    let url = std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned());
    let publisher = Publisher::new(PublisherConfig::new(url))?;
    let receipt = publisher.publish(&event).await?;

    for delivery in &receipt.deliveries {
        eprintln!(
            "published {} to {} at seq {} of epoch {} ({} subscribers{})",
            receipt.id,
            delivery.group,
            delivery.position.seq,
            delivery.position.epoch,
            delivery.subscribers,
            if delivery.duplicate {
                ", duplicate"
            } else {
                ""
            },
        );
    }
    Ok(())
}
