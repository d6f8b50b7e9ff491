//! A WebSocket echo server built on `ws-frame`, for the Autobahn|Testsuite fuzzing client.
//!
//! Echoes every text and binary message, answers pings, completes the close handshake (echoing
//! the client's code), and fails the connection with the close code of the first protocol error.
//! Messages may be as large as 16 MiB so the suite's limit cases (9.*) run. No compression.
//!
//! Needs nothing. Run with `cargo run --release -p ws-frame --example echo_server [ADDR]`
//! (default `127.0.0.1:0`); it prints `listening on <addr>` once it accepts connections.
//! `tests/autobahn/run` builds it, runs the suite against it and stops it.

use std::error::Error;
use std::io::Write as _;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use ws_frame::server::{self, Decoded, Decoder, Incoming};

/// Largest message echoed: the suite's largest is 16 MiB.
const MAX_MESSAGE_BYTES: usize = 16 << 20;
/// Largest upgrade request head.
const MAX_REQUEST_HEAD: usize = 8192;
/// Bytes reserved for each read.
const READ_CHUNK: usize = 64 * 1024;

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn Error>> {
    let addr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:0".to_owned());
    let listener = TcpListener::bind(&addr).await?;
    writeln!(std::io::stdout(), "listening on {}", listener.local_addr()?)?;
    loop {
        let (stream, _) = listener.accept().await?;
        // The suite runs one case at a time; each connection gets its own task.
        tokio::spawn(async move {
            let _ = serve(stream).await;
        });
    }
}

/// Upgrades one connection and echoes until it closes.
async fn serve(mut stream: TcpStream) -> std::io::Result<()> {
    stream.set_nodelay(true)?;
    let mut buf = Vec::with_capacity(READ_CHUNK);
    let head_len = loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break end + 4;
        }
        if buf.len() > MAX_REQUEST_HEAD || stream.read_buf(&mut buf).await? == 0 {
            return Ok(());
        }
    };
    let Some(key) = websocket_key(&buf[..head_len]).filter(|key| server::is_valid_key(key)) else {
        stream
            .write_all(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
            .await?;
        return Ok(());
    };
    stream
        .write_all(server::switching_protocols(&key).as_bytes())
        .await?;
    let mut decoder = Decoder::new(MAX_MESSAGE_BYTES);
    let mut at = head_len;
    loop {
        loop {
            let decoded = match decoder.decode(&buf[at..]) {
                Ok(Some(decoded)) => decoded,
                Ok(None) => break,
                Err(error) => {
                    stream
                        .write_all(&server::close_frame(error.close_code(), ""))
                        .await?;
                    return stream.shutdown().await;
                }
            };
            let Decoded { message, used } = decoded;
            at += used;
            let reply = match message {
                None | Some(Incoming::Pong) => continue,
                Some(Incoming::Text(text)) => server::text_frame(text.as_bytes()),
                Some(Incoming::Binary(data)) => server::binary_frame(&data),
                Some(Incoming::Ping(payload)) => server::pong_frame(&payload),
                Some(Incoming::Close(code)) => {
                    let payload = code.map(u16::to_be_bytes);
                    let close = server::frame(
                        ws_frame::OPCODE_CLOSE,
                        payload.as_ref().map_or(&[], |p| &p[..]),
                    );
                    stream.write_all(&close).await?;
                    return stream.shutdown().await;
                }
            };
            stream.write_all(&reply).await?;
        }
        // Once per read, not per frame: move the start of the next frame to the front.
        buf.drain(..at);
        at = 0;
        buf.reserve(READ_CHUNK);
        if stream.read_buf(&mut buf).await? == 0 {
            return Ok(());
        }
    }
}

/// The `Sec-WebSocket-Key` header's value in an HTTP request head.
fn websocket_key(head: &[u8]) -> Option<String> {
    let head = std::str::from_utf8(head).ok()?;
    head.split("\r\n").find_map(|line| {
        let (name, value) = line.split_once(':')?;
        name.trim()
            .eq_ignore_ascii_case("sec-websocket-key")
            .then(|| value.trim().to_owned())
    })
}
