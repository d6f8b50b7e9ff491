//! One connection's socket and the bytes received and not used yet, with the reads and
//! writes of whole WebSocket frames it needs while connecting.

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::ws;

/// What a connection reads into while it connects (it then keeps only partial frames).
const CONNECT_READ_BYTES: usize = 2048;

/// One connection's socket and the received bytes it has not used yet.
pub(super) struct Wire {
    pub(super) stream: TcpStream,
    /// Received and not consumed: while connecting, whatever came; once holding, the start of
    /// a frame that is not complete yet (usually nothing).
    pub(super) pending: Vec<u8>,
    /// Bytes the incomplete frame in `pending` needs in all, once its header is known.
    pub(super) want: usize,
    /// The mask of every frame this client sends.
    pub(super) mask: [u8; 4],
}

/// A message read while connecting.
pub(super) enum Received {
    Text(String),
    Close,
    Ping(Vec<u8>),
    Other,
}

/// Why a message could not be read while connecting.
pub(super) enum ReceiveError {
    Eof,
    Io(std::io::ErrorKind),
    Frame(ws::FrameError),
    Utf8,
}

impl std::fmt::Display for ReceiveError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Eof => f.write_str("eof"),
            Self::Io(kind) => write!(f, "io {kind:?}"),
            Self::Frame(e) => e.fmt(f),
            Self::Utf8 => f.write_str("text frame not UTF-8"),
        }
    }
}

impl Wire {
    pub(super) fn new(stream: TcpStream, mask: [u8; 4]) -> Self {
        Self {
            stream,
            pending: Vec::new(),
            want: 0,
            mask,
        }
    }

    /// Reads what the socket has onto the end of `pending`; `Ok(0)` at the end of the stream.
    pub(super) async fn fill(&mut self) -> std::io::Result<usize> {
        self.pending.reserve(CONNECT_READ_BYTES);
        self.stream.read_buf(&mut self.pending).await
    }

    /// Keeps `tail` (the start of an incomplete frame) as what is pending.
    pub(super) fn keep(&mut self, tail: &[u8]) {
        self.pending.clear();
        self.pending.extend_from_slice(tail);
        self.want = match ws::frame_head(tail) {
            Ok(Some(head)) => head.total_len(),
            _ => 0,
        };
    }

    /// Reads the next message (whole frames only), waiting for it.
    pub(super) async fn receive(&mut self) -> Result<Received, ReceiveError> {
        loop {
            if let Some(ws::Frame {
                opcode,
                payload,
                len,
            }) = ws::next_frame(&self.pending).map_err(ReceiveError::Frame)?
            {
                let message = match opcode {
                    ws::OPCODE_TEXT => Received::Text(
                        String::from_utf8(payload.to_vec()).map_err(|_| ReceiveError::Utf8)?,
                    ),
                    ws::OPCODE_CLOSE => Received::Close,
                    ws::OPCODE_PING => Received::Ping(payload.to_vec()),
                    _ => Received::Other,
                };
                self.pending.drain(..len);
                return Ok(message);
            }
            match self.fill().await {
                Ok(0) => return Err(ReceiveError::Eof),
                Ok(_) => {}
                Err(e) => return Err(ReceiveError::Io(e.kind())),
            }
        }
    }

    /// Sends one masked frame.
    pub(super) async fn send(&mut self, opcode: u8, payload: &[u8]) -> std::io::Result<()> {
        let frame = ws::client_frame(opcode, payload, self.mask);
        self.stream.write_all(&frame).await
    }

    /// Sends one text frame.
    pub(super) async fn send_text(&mut self, text: &str) -> std::io::Result<()> {
        self.send(ws::OPCODE_TEXT, text.as_bytes()).await
    }
}
