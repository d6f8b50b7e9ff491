//! System tests.

mod auth;
mod cluster;
mod contract_doc;
mod docs;
mod handshake;
mod hostile;
mod invocations;
mod keepalive;
mod limits;
mod origin;
mod protocol_errors;
mod publish_batch;
mod publish_http;
mod redis;
mod resume;
mod shards;
mod shutdown;
mod slow_consumer;
mod stateful;
mod tidy;
mod websocket;
