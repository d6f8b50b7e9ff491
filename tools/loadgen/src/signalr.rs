//! The client side of the SignalR JSON hub protocol, as much as the load tool needs; pure.
//!
//! Splits text frames into records, recognises the handshake answer, join completions, pings,
//! closes and `RecommendationReady` invocations, and reads the load tool's stamp (`lg`) out of
//! the event payload. It does no I/O and knows nothing of sockets or timing.

use std::borrow::Cow;

use serde::Deserialize;
use serde::de::value::MapAccessDeserializer;
use serde::de::{IgnoredAny, MapAccess, SeqAccess, Visitor};

/// Ends every SignalR record.
pub(crate) const RECORD_SEPARATOR: char = '\u{1e}';

/// The handshake the client sends first.
pub(crate) const HANDSHAKE: &str = "{\"protocol\":\"json\",\"version\":1}\u{1e}";

/// A client ping.
pub(crate) const PING: &str = "{\"type\":6}\u{1e}";

/// Invocation id of the one join each connection makes.
pub(crate) const JOIN_INVOCATION_ID: &str = "1";

/// The hub method that joins a region's dispatch group.
const JOIN_TARGET: &str = "JoinDispatchGroup";

/// The event the load tool publishes and counts.
const EVENT_TARGET: &str = "RecommendationReady";

/// The join invocation for `region` (region names need no JSON escaping: `[A-Za-z0-9_.-]`).
pub(crate) fn join(region: &str) -> String {
    format!(
        "{{\"type\":1,\"invocationId\":\"{JOIN_INVOCATION_ID}\",\"target\":\"{JOIN_TARGET}\",\"arguments\":[\"{region}\"]}}{RECORD_SEPARATOR}"
    )
}

/// The records of one text frame, without separators; an unterminated tail is ignored.
pub(crate) fn records(frame: &str) -> impl Iterator<Item = &str> {
    let complete = frame
        .rfind(RECORD_SEPARATOR)
        .map_or("", |end| &frame[..end]);
    complete
        .split(RECORD_SEPARATOR)
        .filter(|record| !record.is_empty())
}

/// The load tool's stamp, carried in the event's `lg` field.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub(crate) struct Stamp {
    /// Group index.
    pub(crate) g: u32,
    /// Per-group counter, from 0, one higher for each publish to the group.
    pub(crate) n: u64,
    /// Send time, in microseconds of the machine's monotonic clock.
    pub(crate) t: u64,
    /// Step index.
    pub(crate) s: u32,
}

/// One record from the server, as far as the load tool cares.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Incoming {
    /// The handshake answer; `Some` carries the server's refusal.
    Handshake(Option<String>),
    /// A `RecommendationReady` invocation; `None` when its payload carries no stamp.
    Delivery(Option<Stamp>),
    /// A completion of invocation `id`; `error` when the server refused it.
    Completion { id: String, error: Option<String> },
    /// A keep-alive ping.
    Ping,
    /// The server closes the connection.
    Close(Option<String>),
    /// Anything else, or a record that does not parse.
    Other,
}

#[derive(Deserialize)]
struct Envelope<'a> {
    #[serde(rename = "type")]
    kind: Option<u8>,
    #[serde(borrow, default)]
    target: Option<Cow<'a, str>>,
    #[serde(rename = "invocationId", borrow, default)]
    invocation_id: Option<Cow<'a, str>>,
    #[serde(default)]
    arguments: Option<FirstArgument>,
    #[serde(default)]
    error: Option<String>,
}

/// The stamp of `arguments[0]`, read in the same pass as the envelope; later arguments are
/// skipped. Any first argument that is not an object with a readable `lg` gives `None`.
struct FirstArgument(Option<Stamp>);

#[derive(Deserialize)]
struct Payload {
    lg: Option<Stamp>,
}

impl<'de> Deserialize<'de> for FirstArgument {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visit;
        impl<'de> Visitor<'de> for Visit {
            type Value = FirstArgument;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("an arguments array")
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
                let first = seq.next_element::<MaybePayload>()?.and_then(|p| p.0);
                while seq.next_element::<IgnoredAny>()?.is_some() {}
                Ok(FirstArgument(first))
            }
        }
        deserializer.deserialize_seq(Visit)
    }
}

/// A payload whose shape may be anything: an object with a stamp, or something to skip.
struct MaybePayload(Option<Stamp>);

impl<'de> Deserialize<'de> for MaybePayload {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visit;
        impl<'de> Visitor<'de> for Visit {
            type Value = MaybePayload;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("any JSON value")
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
                let payload = Payload::deserialize(MapAccessDeserializer::new(map))?;
                Ok(MaybePayload(payload.lg))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
                while seq.next_element::<IgnoredAny>()?.is_some() {}
                Ok(MaybePayload(None))
            }
            fn visit_str<E: serde::de::Error>(self, _: &str) -> Result<Self::Value, E> {
                Ok(MaybePayload(None))
            }
            fn visit_i64<E: serde::de::Error>(self, _: i64) -> Result<Self::Value, E> {
                Ok(MaybePayload(None))
            }
            fn visit_u64<E: serde::de::Error>(self, _: u64) -> Result<Self::Value, E> {
                Ok(MaybePayload(None))
            }
            fn visit_f64<E: serde::de::Error>(self, _: f64) -> Result<Self::Value, E> {
                Ok(MaybePayload(None))
            }
            fn visit_bool<E: serde::de::Error>(self, _: bool) -> Result<Self::Value, E> {
                Ok(MaybePayload(None))
            }
            fn visit_unit<E: serde::de::Error>(self) -> Result<Self::Value, E> {
                Ok(MaybePayload(None))
            }
        }
        deserializer.deserialize_any(Visit)
    }
}

impl Incoming {
    /// Classifies one record (without its separator).
    pub(crate) fn parse(record: &str) -> Self {
        let Ok(envelope) = serde_json::from_str::<Envelope<'_>>(record) else {
            return Self::Other;
        };
        match envelope.kind {
            None => Self::Handshake(envelope.error),
            Some(1) if envelope.target.as_deref() == Some(EVENT_TARGET) => {
                Self::Delivery(envelope.arguments.and_then(|first| first.0))
            }
            Some(3) => Self::Completion {
                id: envelope.invocation_id.unwrap_or_default().into_owned(),
                error: envelope.error,
            },
            Some(6) => Self::Ping,
            Some(7) => Self::Close(envelope.error),
            Some(_) => Self::Other,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_split_into_records_and_drop_an_unterminated_tail() {
        let frame = "{}\u{1e}{\"type\":6}\u{1e}{\"type\":";
        assert_eq!(records(frame).collect::<Vec<_>>(), ["{}", "{\"type\":6}"]);
        assert_eq!(records("{\"type\":6}").count(), 0);
        assert_eq!(records("\u{1e}\u{1e}").count(), 0);
    }

    fn check(record: &str, expected: Incoming) {
        assert_eq!(Incoming::parse(record), expected, "{record}");
    }

    #[test]
    fn records_are_classified() {
        check("{}", Incoming::Handshake(None));
        check(
            r#"{"error":"bad protocol"}"#,
            Incoming::Handshake(Some("bad protocol".to_owned())),
        );
        check(r#"{"type":6}"#, Incoming::Ping);
        check(
            r#"{"type":3,"invocationId":"1"}"#,
            Incoming::Completion {
                id: "1".to_owned(),
                error: None,
            },
        );
        check(
            r#"{"type":3,"invocationId":"1","error":"not allowed"}"#,
            Incoming::Completion {
                id: "1".to_owned(),
                error: Some("not allowed".to_owned()),
            },
        );
        check(
            r#"{"type":7,"error":"shutting down","allowReconnect":true}"#,
            Incoming::Close(Some("shutting down".to_owned())),
        );
        check("not json", Incoming::Other);
        check(
            r#"{"type":1,"target":"JobAssigned","arguments":[{}]}"#,
            Incoming::Other,
        );
    }

    #[test]
    fn deliveries_carry_the_stamp_of_the_first_argument() {
        check(
            r#"{"type":1,"target":"RecommendationReady","arguments":[{"region":"lg-3","lg":{"g":3,"n":17,"t":123456,"s":2},"pad":"xx"},{"extra":1}]}"#,
            Incoming::Delivery(Some(Stamp {
                g: 3,
                n: 17,
                t: 123_456,
                s: 2,
            })),
        );
        check(
            r#"{"type":1,"target":"RecommendationReady","arguments":[{"region":"a"}]}"#,
            Incoming::Delivery(None),
        );
        check(
            r#"{"type":1,"target":"RecommendationReady","arguments":[]}"#,
            Incoming::Delivery(None),
        );
        check(
            r#"{"type":1,"target":"RecommendationReady","arguments":["text",{"lg":{"g":1,"n":1,"t":1,"s":1}}]}"#,
            Incoming::Delivery(None),
        );
        check(
            r#"{"arguments":[{"lg":{"g":1,"n":2,"t":3,"s":4}}],"target":"RecommendationReady","type":1}"#,
            Incoming::Delivery(Some(Stamp {
                g: 1,
                n: 2,
                t: 3,
                s: 4,
            })),
        );
    }

    #[test]
    fn the_join_invocation_names_the_region() {
        assert_eq!(
            join("lg-7"),
            "{\"type\":1,\"invocationId\":\"1\",\"target\":\"JoinDispatchGroup\",\"arguments\":[\"lg-7\"]}\u{1e}"
        );
    }
}
