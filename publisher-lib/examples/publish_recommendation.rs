//! Publishes one `RecommendationReady` event with [`publisher_lib::Publisher`].
//!
//! Shows building the typed event in code, publishing it to the `/dispatch/{region}` group's
//! Redis channel (`rt:{/dispatch/west}`) and reading the receipt: the envelope id, the event's
//! position in the group (epoch and seq) and how many gateway replicas were subscribed.
//!
//! Needs a Redis reachable at `REDIS_URL` (default `redis://127.0.0.1:6379`). Run it with:
//!
//! ```text
//! REDIS_URL=redis://127.0.0.1:6379 cargo run -p publisher-lib --example publish_recommendation
//! ```

use chrono::Utc;
use publisher_lib::contract::{Event, RecommendationReady};
use publisher_lib::{Publisher, PublisherConfig};
use uuid::Uuid;

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let url = std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned());
    let publisher = Publisher::new(PublisherConfig::new(url))?;

    let event = Event::RecommendationReady(RecommendationReady {
        job_id: Uuid::new_v4(),
        request_id: Uuid::new_v4(),
        region: "west".to_owned(),
        config_version: 1,
        generated_at: Utc::now(),
    });
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
