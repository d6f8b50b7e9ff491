//! A server-side WebSocket over any byte stream: messages in, frames out.
//!
//! The gateway frames its own WebSocket (see [`crate::websocket`]) so an event's frame is built
//! once and written as-is to every recipient, several queued frames in one vectored write. An
//! idle socket holds only a small read buffer.

use std::io::IoSlice;

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::websocket::{self, Decoder, FrameError, Incoming};

/// Bytes reserved for each read; client messages are small (pings, joins).
const READ_CHUNK: usize = 256;
/// A read buffer that grew past this for a large message is released once it is empty.
const RETAINED_READ_CAPACITY: usize = 1024;

/// Why no message could be read.
#[derive(Debug)]
pub enum ReadError {
    /// The client's bytes are not acceptable WebSocket frames.
    Frame(FrameError),
    /// The connection ended (end of stream or an I/O error).
    Gone,
}

/// The gateway's end of one WebSocket.
#[derive(Debug)]
pub struct Socket<S> {
    stream: S,
    read_buf: Vec<u8>,
    decoder: Decoder,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Socket<S> {
    /// Wraps an upgraded stream; `read` holds bytes that arrived with the upgrade request.
    pub fn new(stream: S, read: Bytes, max_message_bytes: usize) -> Self {
        Self {
            stream,
            read_buf: read.to_vec(),
            decoder: Decoder::new(max_message_bytes),
        }
    }

    /// The next message from the client.
    ///
    /// # Cancel safety
    /// Cancel-safe: bytes read are kept in the socket's buffer until a whole frame is there.
    pub async fn recv(&mut self) -> Result<Incoming, ReadError> {
        loop {
            while let Some((message, used)) = self
                .decoder
                .decode(&self.read_buf)
                .map_err(ReadError::Frame)?
            {
                self.read_buf.drain(..used);
                if self.read_buf.is_empty() && self.read_buf.capacity() > RETAINED_READ_CAPACITY {
                    self.read_buf = Vec::new();
                }
                if let Some(message) = message {
                    return Ok(message);
                }
            }
            self.read_buf.reserve(READ_CHUNK);
            match self.stream.read_buf(&mut self.read_buf).await {
                Ok(0) | Err(_) => return Err(ReadError::Gone),
                Ok(_) => {}
            }
        }
    }

    /// Writes one text message.
    ///
    /// # Errors
    /// The I/O error when the client is gone.
    pub async fn send_text(&mut self, text: &str) -> std::io::Result<()> {
        self.send_frame(&websocket::text_frame(text.as_bytes()))
            .await
    }

    /// Writes one ready-made frame.
    ///
    /// # Errors
    /// The I/O error when the client is gone.
    pub async fn send_frame(&mut self, frame: &[u8]) -> std::io::Result<()> {
        self.stream.write_all(frame).await?;
        self.stream.flush().await
    }

    /// Writes ready-made frames with as few system calls as the kernel allows.
    ///
    /// # Errors
    /// The I/O error when the client is gone.
    pub async fn send_frames(&mut self, frames: &[Bytes]) -> std::io::Result<()> {
        let mut slices: Vec<IoSlice<'_>> = frames.iter().map(|f| IoSlice::new(f)).collect();
        let mut slices = &mut slices[..];
        while !slices.is_empty() {
            let written = self.stream.write_vectored(slices).await?;
            if written == 0 {
                return Err(std::io::ErrorKind::WriteZero.into());
            }
            IoSlice::advance_slices(&mut slices, written);
        }
        self.stream.flush().await
    }

    /// Answers a client's ping.
    ///
    /// # Errors
    /// The I/O error when the client is gone.
    pub async fn pong(&mut self, payload: &[u8]) -> std::io::Result<()> {
        self.send_frame(&websocket::pong_frame(payload)).await
    }

    /// Sends a close frame and ends the write side.
    ///
    /// # Errors
    /// The I/O error when the client is gone.
    pub async fn close(&mut self, code: u16, reason: &str) -> std::io::Result<()> {
        self.send_frame(&websocket::close_frame(code, reason))
            .await?;
        self.stream.shutdown().await
    }
}
