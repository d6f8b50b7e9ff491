//! The Redis envelope: how an event travels from a publisher to every gateway replica.
//!
//! One JSON object per message, published on the channel of each group the event is routed to:
//!
//! ```text
//! {"v":1,"id":"<uuid>","type":"JobAssigned","publishedAt":1795700000123456,"event":{...}}
//! ```
//!
//! `id` identifies the event for deduplication, `publishedAt` is the publish time in microseconds
//! since the Unix epoch (for delivery latency), and `event` is the event's JSON exactly as the
//! contract defines it; its bytes reach browsers unchanged. The publish script in Redis stores and
//! publishes a *positioned* envelope, the same object with two leading fields naming the event's
//! [`Position`] in the group: `{"epoch":"<epoch>","seq":42,"v":1,...}`. [`Envelope::encode`]
//! writes the envelope without them; [`Envelope::decode`] reads both forms. Channels are named
//! `<prefix>{<group>}`, e.g. `rt:{/dispatch/west}`: the braces make the group a Redis Cluster hash
//! tag, so a group's channel and keys share one slot.

use serde::Deserialize;
use serde_json::value::RawValue;
use uuid::Uuid;

use super::event::EventKind;
use super::group::Group;
use super::position::Position;

/// The envelope version this crate writes and reads.
pub const ENVELOPE_VERSION: u64 = 1;

/// A decoded envelope; `event` is the event's JSON text, untouched.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Envelope {
    /// The event's id, for deduplication.
    pub id: Uuid,
    /// Which event it carries.
    pub kind: EventKind,
    /// Publish time, microseconds since the Unix epoch.
    pub published_at_micros: u64,
    /// The event's JSON, exactly as published.
    pub event: String,
    /// The event's position in the channel's group, when the message is a positioned envelope
    /// (published by the publish script); `None` for a plain envelope PUBLISHed directly.
    pub position: Option<Position>,
}

/// Why a Redis message is not an envelope this crate understands.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum EnvelopeError {
    /// Not JSON, or a field is missing or has the wrong type.
    #[error("malformed envelope: {0}")]
    Malformed(String),
    /// A version this crate does not read.
    #[error("unsupported envelope version {0}")]
    Version(u64),
    /// `type` names no event of the contract.
    #[error("unknown event type `{0}`")]
    UnknownType(String),
}

impl Envelope {
    /// Encodes an envelope around `event_json` (a complete JSON object, already validated).
    pub fn encode(
        id: Uuid,
        kind: EventKind,
        published_at_micros: u64,
        event_json: &str,
    ) -> Vec<u8> {
        let mut out = Vec::with_capacity(event_json.len() + 128);
        out.extend_from_slice(b"{\"v\":");
        out.extend_from_slice(ENVELOPE_VERSION.to_string().as_bytes());
        out.extend_from_slice(b",\"id\":\"");
        out.extend_from_slice(id.hyphenated().to_string().as_bytes());
        out.extend_from_slice(b"\",\"type\":\"");
        out.extend_from_slice(kind.name().as_bytes());
        out.extend_from_slice(b"\",\"publishedAt\":");
        out.extend_from_slice(published_at_micros.to_string().as_bytes());
        out.extend_from_slice(b",\"event\":");
        out.extend_from_slice(event_json.as_bytes());
        out.push(b'}');
        out
    }

    /// Decodes a Redis message: a plain envelope or a positioned one (with `epoch` and `seq`).
    ///
    /// # Errors
    /// [`EnvelopeError`] when it is not a version-1 envelope of a known event, or when only one
    /// of `epoch` and `seq` is present.
    pub fn decode(message: &[u8]) -> Result<Self, EnvelopeError> {
        #[derive(Deserialize)]
        #[serde(rename_all = "camelCase")]
        struct Raw<'a> {
            v: u64,
            id: Uuid,
            #[serde(rename = "type")]
            kind: &'a str,
            published_at: u64,
            #[serde(borrow)]
            event: &'a RawValue,
            epoch: Option<String>,
            seq: Option<u64>,
        }
        if message.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
            return Err(EnvelopeError::Malformed(
                "expected a JSON object".to_owned(),
            ));
        }
        let raw: Raw<'_> =
            serde_json::from_slice(message).map_err(|e| EnvelopeError::Malformed(e.to_string()))?;
        if raw.v != ENVELOPE_VERSION {
            return Err(EnvelopeError::Version(raw.v));
        }
        let kind = EventKind::from_name(raw.kind)
            .ok_or_else(|| EnvelopeError::UnknownType(raw.kind.to_owned()))?;
        let position = match (raw.epoch, raw.seq) {
            (Some(epoch), Some(seq)) => Some(Position { epoch, seq }),
            (None, None) => None,
            _ => {
                return Err(EnvelopeError::Malformed(
                    "`epoch` and `seq` come together or not at all".to_owned(),
                ));
            }
        };
        Ok(Self {
            id: raw.id,
            kind,
            published_at_micros: raw.published_at,
            event: raw.event.get().to_owned(),
            position,
        })
    }
}

impl Group {
    /// The Redis channel of this group under `prefix`: `<prefix>{<group name>}`.
    pub fn channel(&self, prefix: &str) -> String {
        format!("{prefix}{{{}}}", self.name())
    }

    /// The group a channel under `prefix` belongs to, if it is one.
    pub fn from_channel(prefix: &str, channel: &str) -> Option<Self> {
        let name = channel
            .strip_prefix(prefix)?
            .strip_prefix('{')?
            .strip_suffix('}')?;
        Group::try_from_name(name).ok()
    }
}
