//! `Publisher`, `BackgroundPublisher` and `realtime-publish` against a real `redis-server`.
//!
//! Each test spawns its own `redis-server` on a free loopback port (never 6379), killed when the
//! test ends, and subscribes with the redis crate's async pub/sub like a gateway replica would.
//! Every wait is bounded by a deadline; nothing sleeps to synchronise.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod background;
mod batch;
mod cli;
mod cluster;
mod harness;
mod history;
mod keys;
mod pool;
mod publish;
mod shards;
