//! Publishes one `JobAssigned` event from its JSON with [`publisher_lib::Publisher`].
//!
//! Shows reading an event from JSON with the contract's validation, and that one publish reaches
//! two groups: the job's dispatch region (`rt:{/dispatch/west}`) and the assigned contractor
//! (`rt:{/contractor/<id>}`), under one envelope id, with a position in each. Run it twice
//! within five minutes: the second run is acknowledged as a duplicate (the idempotency key is
//! the event's `assignmentId`) and delivers nothing.
//!
//! Needs a Redis reachable at `REDIS_URL` (default `redis://127.0.0.1:6379`). Run it with:
//!
//! ```text
//! REDIS_URL=redis://127.0.0.1:6379 cargo run -p publisher-lib --example publish_job_assigned
//! ```

use publisher_lib::contract::Event;
use publisher_lib::{Publisher, PublisherConfig};

const EVENT: &str = r#"{
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
    let url = std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned());
    let publisher = Publisher::new(PublisherConfig::new(url))?;

    let event = Event::from_json(EVENT.as_bytes())?;
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
