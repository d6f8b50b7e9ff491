use std::sync::Arc;

use bytes::Bytes;
use tokio::net::UnixStream;
use ws_frame::OPCODE_TEXT;
use ws_frame::client;
use ws_frame::server::Incoming;

use super::{RETAINED_READ_CAPACITY, Socket};

const MASK: [u8; 4] = [1, 2, 3, 4];

#[tokio::test]
async fn a_burst_of_tiny_frames_after_a_large_one_is_read_in_place_and_the_buffer_released() {
    let big = "b".repeat(64 * 1024);
    let mut burst = client::frame(OPCODE_TEXT, big.as_bytes(), MASK);
    let tiny: Vec<String> = (0..10_000).map(|i| i.to_string()).collect();
    for text in &tiny {
        burst.extend(client::frame(OPCODE_TEXT, text.as_bytes(), MASK));
    }
    let total = burst.len();
    let (_client, server) = UnixStream::pair().unwrap();
    let (_, writer) = server.into_split();
    // Everything arrives at once, with the upgrade: nothing more is read from the stream.
    let mut socket = Socket::new(&b""[..], Arc::new(writer), Bytes::from(burst), 128 * 1024);

    assert_eq!(socket.recv().await.unwrap(), Incoming::Text(big));
    for (i, text) in tiny.iter().enumerate() {
        assert_eq!(socket.recv().await.unwrap(), Incoming::Text(text.clone()));
        if i + 1 < tiny.len() {
            // Decoded frames are skipped, not drained: the bytes after them never move.
            assert_eq!(socket.read_buf.len(), total, "after message {i}");
        }
    }
    assert!(socket.read_buf.is_empty());
    assert!(
        socket.read_buf.capacity() <= RETAINED_READ_CAPACITY,
        "a grown buffer is released once empty: {} bytes kept",
        socket.read_buf.capacity()
    );
    assert!(matches!(socket.recv().await, Err(super::ReadError::Gone)));
}
