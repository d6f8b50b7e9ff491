//! Raw HTTP/1.1 requests for what a client library hides: a request held open mid-body.

use std::net::SocketAddr;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::{DEADLINE, TEST_KEY, within};

/// A raw HTTP/1.1 request held open mid-body: the server has started handling it (it answered
/// `100 Continue`) and waits for the rest.
#[derive(Debug)]
pub struct HeldRequest {
    stream: TcpStream,
    rest: Vec<u8>,
}

impl HeldRequest {
    /// Starts `POST {path}` with `body` and the service key, sending the headers with
    /// `Expect: 100-continue` and none of the body; returns once the handler waits for it.
    pub async fn start(addr: SocketAddr, path: &str, body: &str) -> Self {
        let mut stream = within(DEADLINE, TcpStream::connect(addr), "a TCP connection")
            .await
            .expect("connecting to the gateway");
        let head = format!(
            "POST {path} HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {TEST_KEY}\r\n\
             Content-Type: application/json\r\nContent-Length: {}\r\nExpect: 100-continue\r\n\r\n",
            body.len()
        );
        stream
            .write_all(head.as_bytes())
            .await
            .expect("sending the request head");
        let interim = read_head(&mut stream).await;
        assert!(
            interim.starts_with("HTTP/1.1 100"),
            "expected 100 Continue, got {interim:?}"
        );
        Self {
            stream,
            rest: body.as_bytes().to_vec(),
        }
    }

    /// Sends the body and returns the response's status line and headers.
    pub async fn finish(mut self) -> String {
        self.stream
            .write_all(&self.rest)
            .await
            .expect("sending the request body");
        read_head(&mut self.stream).await
    }
}

/// Reads an HTTP response head (up to the blank line).
async fn read_head(stream: &mut TcpStream) -> String {
    let read = async {
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            let n = stream.read(&mut byte).await.expect("reading a response");
            assert!(n == 1, "connection closed inside a response head: {head:?}");
            head.push(byte[0]);
        }
        String::from_utf8(head).expect("a response head is ASCII")
    };
    within(DEADLINE, read, "an HTTP response head").await
}
