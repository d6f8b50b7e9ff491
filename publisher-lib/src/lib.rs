//! What a backend links to publish SmartScheduler's real-time events.
//!
//! Today this crate holds the wire contract shared by every backend and by the gateway:
//! the two events (`RecommendationReady`, `JobAssigned`), their validation, the groups they are
//! routed to, and the SignalR target names. The Redis publisher and the `realtime-publish`
//! command line arrive with the scale-out work.
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

pub mod contract;
