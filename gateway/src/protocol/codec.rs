//! Records in, messages out; messages in, bytes out.

use bytes::Bytes;
use serde::Deserialize;
use serde_json::Value;

use super::RECORD_SEPARATOR;

/// A message from the client, reduced to what the gateway acts on.
#[derive(Debug, Clone, PartialEq)]
pub enum Message {
    /// Type 1 (or 4, with `streaming` set): a call of a hub method.
    Invocation(Invocation),
    /// Type 6: keep-alive.
    Ping,
    /// Type 7: the client is going away.
    Close,
    /// Type 8 (stateful reconnect): the client has processed the server's messages up to this
    /// sequence id.
    Ack(u64),
    /// Type 9 (stateful reconnect): the first message the client sends on a resumed transport;
    /// the id of the next message it will send (its oldest unacknowledged one).
    Sequence(u64),
    /// Types 2, 3 and 5: valid, but nothing for this hub to do.
    Ignored(u8),
}

impl Message {
    /// Whether the message counts in stateful reconnect's sequence ids: types 1 to 5.
    pub fn is_trackable(&self) -> bool {
        matches!(self, Self::Invocation(_) | Self::Ignored(2 | 3 | 5))
    }
}

/// A hub method call from the client.
#[derive(Debug, Clone, PartialEq)]
pub struct Invocation {
    /// Present when the client waits for a completion; absent for `send()`.
    pub invocation_id: Option<String>,
    /// The hub method name, as the client spelled it.
    pub target: String,
    /// The arguments, in order.
    pub arguments: Vec<Value>,
    /// Whether this was a StreamInvocation (type 4).
    pub streaming: bool,
    /// Client-to-server stream ids; the hub takes none.
    pub stream_ids: Vec<String>,
}

/// Why a client's bytes could not be read as the JSON hub protocol.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtocolError {
    /// A record is not a JSON object of the expected shape.
    #[error("malformed message: {0}")]
    Malformed(String),
    /// The record has no numeric `type`.
    #[error("message has no numeric 'type'")]
    MissingType,
    /// A message type the protocol does not define.
    #[error("unknown message type {0}")]
    UnknownType(u64),
    /// A record (or a WebSocket message) is larger than the configured limit.
    #[error("message larger than the {limit}-byte limit")]
    TooLarge {
        /// The configured limit in bytes.
        limit: usize,
    },
    /// A binary WebSocket frame on the text-only JSON protocol.
    #[error("binary frames are not supported by the JSON hub protocol")]
    Binary,
    /// WebSocket frames that break RFC 6455 (unmasked, reserved bits, bad UTF-8, ...).
    #[error("invalid WebSocket frame: {0}")]
    BadFrame(ws_frame::server::FrameError),
}

impl From<ws_frame::server::FrameError> for ProtocolError {
    fn from(error: ws_frame::server::FrameError) -> Self {
        match error {
            ws_frame::server::FrameError::TooLarge { limit } => Self::TooLarge { limit },
            other => Self::BadFrame(other),
        }
    }
}

impl ProtocolError {
    /// Low-cardinality label for metrics and logs.
    pub fn label(&self) -> &'static str {
        match self {
            Self::Malformed(_) => "malformed",
            Self::MissingType => "missing_type",
            Self::UnknownType(_) => "unknown_type",
            Self::TooLarge { .. } => "too_large",
            Self::Binary => "binary_frame",
            Self::BadFrame(_) => "bad_frame",
        }
    }
}

/// Collects text from WebSocket messages and yields complete records.
///
/// The official client never splits a record across messages, but the protocol allows it, so an
/// incomplete tail is kept until the next message completes it. The tail is bounded by the size
/// limit; in steady state it is empty and holds no allocation.
#[derive(Debug)]
pub struct RecordBuffer {
    partial: String,
    limit: usize,
}

impl RecordBuffer {
    /// A buffer refusing records longer than `limit` bytes.
    pub fn new(limit: usize) -> Self {
        Self {
            partial: String::new(),
            limit,
        }
    }

    /// Adds the text of one WebSocket message and returns the records it completes, in order.
    ///
    /// # Errors
    /// [`ProtocolError::TooLarge`] when the message or an unfinished record exceeds the limit.
    pub fn feed(&mut self, text: &str) -> Result<Vec<String>, ProtocolError> {
        if text.len() > self.limit {
            return Err(ProtocolError::TooLarge { limit: self.limit });
        }
        let mut records = Vec::new();
        let mut rest = text;
        while let Some(end) = rest.find(RECORD_SEPARATOR) {
            let piece = &rest[..end];
            rest = &rest[end + RECORD_SEPARATOR.len_utf8()..];
            let record = if self.partial.is_empty() {
                piece.to_owned()
            } else {
                let mut whole = std::mem::take(&mut self.partial);
                whole.push_str(piece);
                whole
            };
            if record.len() > self.limit {
                return Err(ProtocolError::TooLarge { limit: self.limit });
            }
            records.push(record);
        }
        if !rest.is_empty() {
            self.partial.push_str(rest);
            if self.partial.len() > self.limit {
                return Err(ProtocolError::TooLarge { limit: self.limit });
            }
        }
        Ok(records)
    }
}

/// Decodes one record (without its separator) sent by a client after the handshake.
///
/// Property order does not matter: the official client writes `type` last.
///
/// # Errors
/// [`ProtocolError`] when the record is not a message of the protocol.
pub fn decode(record: &str) -> Result<Message, ProtocolError> {
    #[derive(Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct Raw {
        #[serde(rename = "type")]
        kind: Option<Value>,
        invocation_id: Option<Value>,
        target: Option<Value>,
        arguments: Option<Value>,
        stream_ids: Option<Value>,
        sequence_id: Option<Value>,
    }
    // serde would also read a struct from an array; the protocol only has objects.
    if !record.trim_start().starts_with('{') {
        return Err(malformed("a message must be a JSON object"));
    }
    let raw: Raw =
        serde_json::from_str(record).map_err(|e| ProtocolError::Malformed(without_position(&e)))?;
    let kind = raw
        .kind
        .as_ref()
        .and_then(Value::as_u64)
        .ok_or(ProtocolError::MissingType)?;
    match kind {
        1 | 4 => {
            let invocation_id = match raw.invocation_id {
                None | Some(Value::Null) => None,
                Some(Value::String(id)) if !id.is_empty() => Some(id),
                Some(_) => return Err(malformed("'invocationId' must be a non-empty string")),
            };
            let target = match raw.target {
                Some(Value::String(t)) if !t.is_empty() => t,
                _ => return Err(malformed("'target' must be a non-empty string")),
            };
            let Some(Value::Array(arguments)) = raw.arguments else {
                return Err(malformed("'arguments' must be an array"));
            };
            let stream_ids = match raw.stream_ids {
                None | Some(Value::Null) => Vec::new(),
                Some(ids) => serde_json::from_value(ids)
                    .map_err(|_| malformed("'streamIds' must be an array of strings"))?,
            };
            Ok(Message::Invocation(Invocation {
                invocation_id,
                target,
                arguments,
                streaming: kind == 4,
                stream_ids,
            }))
        }
        6 => Ok(Message::Ping),
        7 => Ok(Message::Close),
        8 | 9 => {
            let id = raw
                .sequence_id
                .as_ref()
                .and_then(Value::as_u64)
                .ok_or_else(|| malformed("'sequenceId' must be a non-negative integer"))?;
            Ok(if kind == 8 {
                Message::Ack(id)
            } else {
                Message::Sequence(id)
            })
        }
        2 | 3 | 5 => Ok(Message::Ignored(kind as u8)),
        other => Err(ProtocolError::UnknownType(other)),
    }
}

/// The record of a server-to-client event: `{"type":1,"target":…,"arguments":[payload]}` + RS.
///
/// `payload` must be one complete JSON value; it is copied in unchanged, so fields the gateway
/// does not know reach the browser. `second`, when given, is a second argument (the event's
/// position), also complete JSON. Built once per publication and shared by every recipient.
pub fn encode_invocation(target: &str, payload: &[u8], second: Option<&[u8]>) -> Bytes {
    debug_assert!(
        target
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_'),
        "event targets are plain identifiers and need no escaping"
    );
    const HEAD: &str = r#"{"type":1,"target":""#;
    const MIDDLE: &str = r#"","arguments":["#;
    const TAIL: &str = "]}\u{1e}";
    let extra = second.map_or(0, |s| s.len() + 1);
    let mut out = Vec::with_capacity(
        HEAD.len() + target.len() + MIDDLE.len() + payload.len() + extra + TAIL.len(),
    );
    out.extend_from_slice(HEAD.as_bytes());
    out.extend_from_slice(target.as_bytes());
    out.extend_from_slice(MIDDLE.as_bytes());
    out.extend_from_slice(payload);
    if let Some(second) = second {
        out.push(b',');
        out.extend_from_slice(second);
    }
    out.extend_from_slice(TAIL.as_bytes());
    Bytes::from(out)
}

/// A Completion record: success without a result, or an error.
pub fn encode_completion(invocation_id: &str, error: Option<&str>) -> String {
    let message = match error {
        None => serde_json::json!({"type": 3, "invocationId": invocation_id}),
        Some(error) => {
            serde_json::json!({"type": 3, "invocationId": invocation_id, "error": error})
        }
    };
    record(&message)
}

/// A Completion record with a result.
pub fn encode_completion_result(invocation_id: &str, result: &serde_json::Value) -> String {
    record(&serde_json::json!({"type": 3, "invocationId": invocation_id, "result": result}))
}

/// A Close record with the reason and whether the client may reconnect.
pub fn encode_close(error: &str, allow_reconnect: bool) -> String {
    record(&serde_json::json!({"type": 7, "error": error, "allowReconnect": allow_reconnect}))
}

/// An Ack record (stateful reconnect): the server has processed the client's messages up to
/// `sequence_id`.
pub fn encode_ack(sequence_id: u64) -> String {
    format!("{{\"type\":8,\"sequenceId\":{sequence_id}}}{RECORD_SEPARATOR}")
}

/// A Sequence record (stateful reconnect): the first message on a resumed transport, the id of
/// the first message the server replays (or of its next message when nothing is replayed).
pub fn encode_sequence(sequence_id: u64) -> String {
    format!("{{\"type\":9,\"sequenceId\":{sequence_id}}}{RECORD_SEPARATOR}")
}

/// The Ping record, sent when the server has been quiet for the keep-alive interval.
pub const PING: &str = "{\"type\":6}\u{1e}";

pub(super) fn record(message: &Value) -> String {
    let mut text = message.to_string();
    text.push(RECORD_SEPARATOR);
    text
}

/// serde_json's message without its " at line 1 column 7" suffix, which means nothing to a
/// client that sent one line.
pub(super) fn without_position(error: &serde_json::Error) -> String {
    let message = error.to_string();
    match message.rfind(" at line ") {
        Some(at) => message[..at].to_owned(),
        None => message,
    }
}

fn malformed(what: &str) -> ProtocolError {
    ProtocolError::Malformed(what.to_owned())
}
