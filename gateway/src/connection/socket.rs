//! A server-side WebSocket over a socket: messages in, frames out.
//!
//! The gateway frames its own WebSocket (with the `ws-frame` crate) so an event's frame is built
//! once and written as-is to every recipient, several queued frames in one vectored write. The
//! write side is a shared [`Wire`], so fan-out can also write to it directly (see
//! [`crate::outbound`]). An idle socket holds only a small read buffer. Decoded frames are
//! skipped with an offset, and the undecoded rest moves to the front at most once per read,
//! never once per frame.

use std::future::poll_fn;
use std::io::{self, IoSlice};
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncReadExt};
use ws_frame::server::{self as ws, Decoded, Decoder, FrameError, Incoming};

use crate::outbound::Wire;

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
pub struct Socket<R> {
    reader: R,
    wire: Arc<dyn Wire>,
    /// Bytes read; those before `read_at` are decoded already.
    read_buf: Vec<u8>,
    /// Where the undecoded bytes start in `read_buf`: a burst of tiny frames after a large one
    /// costs no copy per frame.
    read_at: usize,
    decoder: Decoder,
}

impl<R: AsyncRead + Unpin> Socket<R> {
    /// Wraps an upgraded socket's halves; `read` holds bytes that arrived with the upgrade
    /// request.
    pub fn new(reader: R, wire: Arc<dyn Wire>, read: Bytes, max_message_bytes: usize) -> Self {
        Self {
            reader,
            wire,
            read_buf: read.to_vec(),
            read_at: 0,
            decoder: Decoder::new(max_message_bytes),
        }
    }

    /// The shared write side.
    pub fn wire(&self) -> Arc<dyn Wire> {
        Arc::clone(&self.wire)
    }

    /// The next message from the client.
    ///
    /// # Cancel safety
    /// Cancel-safe: bytes read are kept in the socket's buffer until a whole frame is there.
    pub async fn recv(&mut self) -> Result<Incoming, ReadError> {
        loop {
            while let Some(Decoded { message, used }) = self
                .decoder
                .decode(&self.read_buf[self.read_at..])
                .map_err(ReadError::Frame)?
            {
                self.read_at += used;
                if self.read_at == self.read_buf.len() {
                    self.read_at = 0;
                    self.read_buf.clear();
                    if self.read_buf.capacity() > RETAINED_READ_CAPACITY {
                        self.read_buf = Vec::new();
                    }
                }
                if let Some(message) = message {
                    return Ok(message);
                }
            }
            if self.read_at > 0 {
                // Once per read, not per frame: move the start of the next frame to the front.
                self.read_buf.drain(..self.read_at);
                self.read_at = 0;
            }
            self.read_buf.reserve(READ_CHUNK);
            match self.reader.read_buf(&mut self.read_buf).await {
                Ok(0) | Err(_) => return Err(ReadError::Gone),
                Ok(_) => {}
            }
        }
    }

    /// Writes one text message.
    ///
    /// # Errors
    /// The I/O error when the client is gone.
    pub async fn send_text(&self, text: &str) -> io::Result<()> {
        self.send_frame(&ws::text_frame(text.as_bytes())).await
    }

    /// Writes one ready-made frame.
    ///
    /// # Errors
    /// The I/O error when the client is gone.
    pub async fn send_frame(&self, frame: &[u8]) -> io::Result<()> {
        let mut rest = frame;
        while !rest.is_empty() {
            match self.wire.try_write(rest) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(written) => rest = &rest[written..],
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => self.writable().await?,
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Writes ready-made frames with as few system calls as the kernel allows.
    ///
    /// # Errors
    /// The I/O error when the client is gone.
    pub async fn send_frames(&self, frames: &[Bytes]) -> io::Result<()> {
        let mut slices: Vec<IoSlice<'_>> = frames.iter().map(|f| IoSlice::new(f)).collect();
        let mut slices = &mut slices[..];
        while !slices.is_empty() {
            match self.wire.try_write_vectored(slices) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(written) => IoSlice::advance_slices(&mut slices, written),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => self.writable().await?,
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Answers a client's ping.
    ///
    /// # Errors
    /// The I/O error when the client is gone.
    pub async fn pong(&self, payload: &[u8]) -> io::Result<()> {
        self.send_frame(&ws::pong_frame(payload)).await
    }

    /// Sends a close frame. The write side shuts down when the last holder of the wire drops it.
    ///
    /// # Errors
    /// The I/O error when the client is gone.
    pub async fn close(&self, code: u16, reason: &str) -> io::Result<()> {
        self.send_frame(&ws::close_frame(code, reason)).await
    }

    async fn writable(&self) -> io::Result<()> {
        poll_fn(|cx| self.wire.poll_write_ready(cx)).await
    }
}

impl Wire for tokio::net::tcp::OwnedWriteHalf {
    fn try_write(&self, buf: &[u8]) -> io::Result<usize> {
        tokio::net::tcp::OwnedWriteHalf::try_write(self, buf)
    }

    fn try_write_vectored(&self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        tokio::net::tcp::OwnedWriteHalf::try_write_vectored(self, bufs)
    }

    fn poll_write_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.as_ref().poll_write_ready(cx)
    }
}

impl Wire for tokio::net::unix::OwnedWriteHalf {
    fn try_write(&self, buf: &[u8]) -> io::Result<usize> {
        tokio::net::unix::OwnedWriteHalf::try_write(self, buf)
    }

    fn try_write_vectored(&self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        tokio::net::unix::OwnedWriteHalf::try_write_vectored(self, bufs)
    }

    fn poll_write_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.as_ref().poll_write_ready(cx)
    }
}

#[cfg(test)]
mod tests;
