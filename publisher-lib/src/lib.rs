//! What a backend links to publish SmartScheduler's real-time events.
//!
//! [`contract`] is the wire contract shared by every backend and by the gateway: the two events
//! (`RecommendationReady`, `JobAssigned`), their validation, the groups they are routed to, the
//! Redis envelope, the SignalR target names, and the defaults and key rules (channel prefix,
//! history bounds, idempotency window and keys) that every publisher and replica share.
//!
//! With the `redis` feature (on by default), `Publisher` publishes an event to each of its
//! groups with one atomic script per group (on a server, the script calls of concurrent
//! publishes are batched: one call carries every publish waiting at the time, up to 64): the event gets a [`contract::Position`] (epoch and
//! seq) in the group, is appended to the group's bounded history and PUBLISHed on the group's
//! channel, where every gateway replica is subscribed; a repeated idempotency key within the
//! window is acknowledged as a duplicate instead. `Publisher::read_history` reads a group's
//! history after a position, for resuming clients. `BackgroundPublisher` puts a bounded queue
//! with retries (one idempotency key per event) in front of it. The `cli` feature (also on by default)
//! builds the `realtime-publish` command line. [`target`] reads Redis URLs (plain, TLS,
//! Sentinel). The gateway links the contract and `Publisher` (without the `cli` feature), so its
//! HTTP endpoint publishes exactly as a backend does.
//!
//! A backend that already holds a `deadpool_redis::Pool` can build a `Publisher` from it with the
//! `deadpool` feature (off by default): `Publisher::from_pool(pool, PublisherConfig::new(url))` runs
//! each script call on a connection from the pool, with the same script, receipts, errors and
//! publish timeout. `Publisher::new`'s one shared multiplexed connection stays the default
//! because it is about three to four times faster: a pooled `get()` costs a recycle round trip
//! (`UNWATCH` + `PING`) per call and a pooled connection carries one call at a time
//! (`docs/benchmarks.md`, "Publish path").
//!
//! ```no_run
//! # #[cfg(feature = "redis")]
//! # async fn publish() -> Result<(), Box<dyn std::error::Error>> {
//! use publisher_lib::contract::Event;
//! use publisher_lib::{Publisher, PublisherConfig};
//!
//! let publisher = Publisher::new(PublisherConfig::new("redis://127.0.0.1:6379"))?;
//! let event = Event::from_json(br#"{"type":"RecommendationReady",
//!   "jobId":"7d9f4f3e-1c2b-4d5e-8f60-123456789abc","requestId":"0b1c2d3e-4f50-4a6b-9c8d-0e1f2a3b4c5d",
//!   "region":"west","configVersion":1,"generatedAt":"2025-11-08T12:34:56Z"}"#)?;
//! let receipt = publisher.publish(&event).await?;
//! for delivery in &receipt.deliveries {
//!     println!("{}: seq {}", delivery.group, delivery.position.seq);
//! }
//! # Ok(())
//! # }
//! ```
//!
//! Reading and routing an event needs only the contract:
//!
//! ```
//! use publisher_lib::contract::{Event, Group};
//!
//! let json = r#"{"type":"RecommendationReady","jobId":"7d9f4f3e-1c2b-4d5e-8f60-123456789abc",
//!   "requestId":"0b1c2d3e-4f50-4a6b-9c8d-0e1f2a3b4c5d","region":"west","configVersion":1,
//!   "generatedAt":"2025-11-08T12:34:56Z"}"#;
//! let event = Event::from_json(json.as_bytes())?;
//! assert_eq!(event.groups(), vec![Group::try_dispatch("west")?]);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
#![warn(missing_docs)]

#[cfg(feature = "redis")]
mod background;
#[cfg(feature = "redis")]
pub mod backoff;
#[cfg(feature = "redis")]
mod batch;
pub mod contract;
#[cfg(feature = "redis")]
mod history;
#[cfg(feature = "redis")]
mod publisher;
#[cfg(feature = "redis")]
pub mod target;

#[cfg(feature = "redis")]
pub use background::{
    BackgroundConfig, BackgroundPublisher, DEFAULT_CAPACITY, DEFAULT_INITIAL_BACKOFF,
    DEFAULT_MAX_ATTEMPTS, DEFAULT_MAX_BACKOFF, Dropped,
};
// Defined in the contract, which the gateway shares; also here, where backends first found them.
pub use contract::{
    DEFAULT_HISTORY_SIZE, DEFAULT_HISTORY_TTL, DEFAULT_IDEMPOTENCY_WINDOW, DEFAULT_PREFIX,
    MAX_IDEMPOTENCY_KEY_LEN,
};
#[cfg(feature = "redis")]
pub use history::{HistoryRead, PUBLISH_SCRIPT, READ_SCRIPT};
#[cfg(feature = "redis")]
pub use publisher::{
    DEFAULT_CONNECT_TIMEOUT, DEFAULT_MAX_RECONNECT_DELAY, DEFAULT_PUBLISH_TIMEOUT,
    DEFAULT_RESPONSE_TIMEOUT, GroupDelivery, PublishError, PublishReceipt, Publisher,
    PublisherConfig,
};
