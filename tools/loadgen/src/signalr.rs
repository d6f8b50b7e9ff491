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

/// The Ack of a stateful connection for every trackable message up to `sequence_id`.
pub(crate) fn ack(sequence_id: u64) -> String {
    format!("{{\"type\":8,\"sequenceId\":{sequence_id}}}{RECORD_SEPARATOR}")
}

/// The connection token of a negotiate answer, provided it granted stateful reconnect.
///
/// # Errors
/// A body that is not a negotiate answer, or one without `"useStatefulReconnect": true`.
pub(crate) fn stateful_connection_token(body: &[u8]) -> Result<String, String> {
    #[derive(Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct Negotiated {
        connection_token: String,
        #[serde(default)]
        use_stateful_reconnect: bool,
    }
    let negotiated: Negotiated =
        serde_json::from_slice(body).map_err(|e| format!("negotiate answer: {e}"))?;
    if !negotiated.use_stateful_reconnect {
        return Err("negotiate: stateful reconnect not granted".to_owned());
    }
    Ok(negotiated.connection_token)
}

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
    /// Another message a stateful connection acknowledges (types 1 to 5: an invocation of
    /// another target, a stream item...), not counted as a delivery.
    Tracked,
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
    /// Whether the server numbered this message on a stateful connection (an Ack counts it).
    pub(crate) fn is_tracked(&self) -> bool {
        matches!(
            self,
            Self::Delivery(_) | Self::Completion { .. } | Self::Tracked
        )
    }

    /// Classifies one record (without its separator).
    ///
    /// A delivery written exactly as the gateway frames the publisher's events is read by a
    /// byte scan (`stamp_fast`); every other record, and any delivery the scan is not sure of,
    /// goes through the full JSON parse, which decides.
    pub(crate) fn parse(record: &str) -> Self {
        match stamp_fast(record) {
            Some(stamp) => Self::Delivery(Some(stamp)),
            None => Self::parse_json(record),
        }
    }

    /// Classifies one record with serde_json.
    fn parse_json(record: &str) -> Self {
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
            Some(1..=5) => Self::Tracked,
            Some(6) => Self::Ping,
            Some(7) => Self::Close(envelope.error),
            Some(_) => Self::Other,
        }
    }
}

/// How the gateway frames an event record up to its payload (`arguments[0]`).
const EVENT_HEAD: &[u8] = b"{\"type\":1,\"target\":\"RecommendationReady\",\"arguments\":[";

/// How the gateway ends an event record (before the separator).
const EVENT_TAIL: &[u8] = b"]}";

/// The stamp of a delivery, read without a JSON parser when the record is an event exactly as
/// the gateway frames it (`EVENT_HEAD`, the payload, `EVENT_TAIL`), its payload an object with
/// a top-level `"lg"` member written as the publisher writes it: `{"g":G,"n":N,"t":T,"s":S}`,
/// plain integers, no whitespace. Members before `lg` are skipped by their JSON structure, so
/// an `lg` nested in another member is not taken; the padding after it is not read.
///
/// `None` means "not sure", never "no stamp": the caller then parses the record as JSON. The
/// scan trusts that the gateway forwards well-formed JSON (it checks payloads on publish), so
/// it does not validate what follows the stamp.
fn stamp_fast(record: &str) -> Option<Stamp> {
    let body = record
        .as_bytes()
        .strip_prefix(EVENT_HEAD)?
        .strip_suffix(EVENT_TAIL)?;
    let members = body.strip_prefix(b"{")?;
    let value = member(members, b"lg")?;
    let (g, rest) = integer(value.strip_prefix(b"{\"g\":")?)?;
    let (n, rest) = integer(rest.strip_prefix(b",\"n\":")?)?;
    let (t, rest) = integer(rest.strip_prefix(b",\"t\":")?)?;
    let (s, rest) = integer(rest.strip_prefix(b",\"s\":")?)?;
    rest.strip_prefix(b"}")?;
    Some(Stamp {
        g: u32::try_from(g).ok()?,
        n,
        t,
        s: u32::try_from(s).ok()?,
    })
}

/// The value of member `key` of the object whose members start `members` (just after its
/// `{`), and what follows it; `None` when it is not there or the object is not plain enough.
fn member<'a>(mut members: &'a [u8], key: &[u8]) -> Option<&'a [u8]> {
    loop {
        let rest = skip_space(members).strip_prefix(b"\"")?;
        let end = rest.iter().position(|&b| b == b'"' || b == b'\\')?;
        if rest[end] != b'"' {
            return None; // An escaped name: leave it to the JSON parser.
        }
        let name = &rest[..end];
        let value = skip_space(skip_space(&rest[end + 1..]).strip_prefix(b":")?);
        if name == key {
            return Some(value);
        }
        members = skip_space(skip_value(value)?).strip_prefix(b",")?;
    }
}

/// What follows the JSON value at the start of `json`.
fn skip_value(json: &[u8]) -> Option<&[u8]> {
    match json.first()? {
        b'"' => skip_string(&json[1..]),
        b'{' | b'[' => {
            let mut depth = 0_usize;
            let mut rest = json;
            loop {
                let at = rest
                    .iter()
                    .position(|&b| matches!(b, b'"' | b'{' | b'[' | b'}' | b']'))?;
                match rest[at] {
                    b'"' => rest = skip_string(&rest[at + 1..])?,
                    b'{' | b'[' => {
                        depth += 1;
                        rest = &rest[at + 1..];
                    }
                    _ => {
                        depth -= 1;
                        rest = &rest[at + 1..];
                        if depth == 0 {
                            return Some(rest);
                        }
                    }
                }
            }
        }
        _ => {
            let end = json
                .iter()
                .position(|&b| matches!(b, b',' | b'}' | b']' | b' ' | b'\t' | b'\r' | b'\n'))?;
            (end > 0).then(|| &json[end..])
        }
    }
}

/// What follows the string whose contents start `json` (just after its opening quote).
fn skip_string(mut json: &[u8]) -> Option<&[u8]> {
    loop {
        let at = json.iter().position(|&b| b == b'"' || b == b'\\')?;
        if json[at] == b'"' {
            return Some(&json[at + 1..]);
        }
        json = json.get(at + 2..)?;
    }
}

fn skip_space(json: &[u8]) -> &[u8] {
    let start = json
        .iter()
        .position(|b| !matches!(b, b' ' | b'\t' | b'\r' | b'\n'))
        .unwrap_or(json.len());
    &json[start..]
}

/// A JSON non-negative integer at the start of `json` (as serde_json reads it: no leading
/// zero before another digit) that fits a `u64`, and what follows it.
fn integer(json: &[u8]) -> Option<(u64, &[u8])> {
    let digits = json.iter().take_while(|b| b.is_ascii_digit()).count();
    if digits == 0 || (digits > 1 && json[0] == b'0') {
        return None;
    }
    let value = json[..digits].iter().try_fold(0_u64, |acc, &d| {
        acc.checked_mul(10)?.checked_add(u64::from(d - b'0'))
    })?;
    Some((value, &json[digits..]))
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
            Incoming::Tracked,
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

    /// The record the gateway writes for `payload`.
    fn event(payload: &str) -> String {
        format!("{{\"type\":1,\"target\":\"RecommendationReady\",\"arguments\":[{payload}]}}")
    }

    #[test]
    fn the_byte_scan_reads_stamps_as_the_publisher_writes_them() {
        let stamp = Stamp {
            g: 4_294_967_295,
            n: 0,
            t: 18_446_744_073_709_551_615,
            s: 12,
        };
        let payload = r#"{"type":"RecommendationReady","jobId":"7d9f","region":"lg-3","configVersion":1,"nested":{"lg":{"g":9,"n":9,"t":9,"s":9},"a":[1,"]}",{"b":"\"}"}]},"esc":"a\"lg\":{","lg":{"g":4294967295,"n":0,"t":18446744073709551615,"s":12},"pad":"xxxx"}"#;
        let record = event(payload);
        assert_eq!(stamp_fast(&record), Some(stamp));
        assert_eq!(
            Incoming::parse_json(&record),
            Incoming::Delivery(Some(stamp))
        );
        assert_eq!(Incoming::parse(&record), Incoming::Delivery(Some(stamp)));
    }

    #[test]
    fn the_byte_scan_leaves_anything_unusual_to_the_json_parse() {
        let declined = [
            // Not the gateway's framing of an event.
            r#"{"type":1,"target":"JobAssigned","arguments":[{"lg":{"g":1,"n":2,"t":3,"s":4}}]}"#.to_owned(),
            r#"{"target":"RecommendationReady","type":1,"arguments":[{"lg":{"g":1,"n":2,"t":3,"s":4}}]}"#.to_owned(),
            r#"{"type":1,"target":"RecommendationReady","arguments":[{"lg":{"g":1,"n":2,"t":3,"s":4}}],"x":1}"#.to_owned(),
            // The stamp in the second argument, nested, absent, null or not a plain object.
            event(r#""text",{"lg":{"g":1,"n":1,"t":1,"s":1}}"#),
            event(r#"{"region":"a"},{"lg":{"g":1,"n":1,"t":1,"s":1}}"#),
            event(r#"{"x":{"lg":{"g":1,"n":1,"t":1,"s":1}}}"#),
            event(r#"{"x":"\"lg\":{\"g\":1,\"n\":1,\"t\":1,\"s\":1}"}"#),
            event(r#"{"region":"a"}"#),
            event(r#"{"lg":null}"#),
            event("[]"),
            event(""),
            // Written otherwise than the publisher writes it.
            event(r#"{"lg":{"n":2,"g":1,"t":3,"s":4}}"#),
            event(r#"{"lg":{"g":1,"n":2,"t":3,"s":4,"x":5}}"#),
            event(r#"{"lg":{ "g":1,"n":2,"t":3,"s":4}}"#),
            event(r#"{"lg":{"g":1,"n":2,"t":3,"s":4 }}"#),
            event(r#"{"lg":{"g":1,"n":2.5,"t":3,"s":4}}"#),
            event(r#"{"lg":{"g":-1,"n":2,"t":3,"s":4}}"#),
            event(r#"{"lg":{"g":01,"n":2,"t":3,"s":4}}"#),
            event(r#"{"lg":{"g":4294967296,"n":2,"t":3,"s":4}}"#),
            event(r#"{"lg":{"g":1,"n":18446744073709551616,"t":3,"s":4}}"#),
            event(r#"{"l\u0067":{"g":1,"n":2,"t":3,"s":4}}"#),
            event(r#"{"a":"unterminated,"lg":{"g":1,"n":2,"t":3,"s":4}}"#),
        ];
        for record in &declined {
            assert_eq!(stamp_fast(record), None, "{record}");
            // What the JSON parse makes of it stands.
            assert_eq!(
                Incoming::parse(record),
                Incoming::parse_json(record),
                "{record}"
            );
        }
        let stamp = Stamp {
            g: 1,
            n: 2,
            t: 3,
            s: 4,
        };
        for payload in [
            r#"{"lg": {"s":4, "t":3, "n":2, "g":1}}"#,
            r#"{"l\u0067":{"g":1,"n":2,"t":3,"s":4}}"#,
        ] {
            check(&event(payload), Incoming::Delivery(Some(stamp)));
        }
        check(
            &event(r#"{"lg":{"g":-1,"n":2,"t":3,"s":4}}"#),
            Incoming::Other,
        );
    }

    #[test]
    fn the_byte_scan_agrees_with_the_json_parse_on_whitespace_and_leading_members() {
        let members = [
            r#""a":1"#,
            r#""a":-1.5e3"#,
            r#""a":true,"b":null"#,
            r#""a" : "x,}]" , "b":[1,[2,{"c":"]"}]]"#,
            r#""a":{"b":{"c":{}}},"d":[]"#,
            r#""a":"\\","b":"\"""#,
        ];
        for lead in members {
            let record = event(&format!(
                r#"{{ {lead} , "lg" : {{"g":5,"n":6,"t":7,"s":8}},"pad":"x"}}"#
            ));
            let stamp = Stamp {
                g: 5,
                n: 6,
                t: 7,
                s: 8,
            };
            assert_eq!(
                Incoming::parse_json(&record),
                Incoming::Delivery(Some(stamp)),
                "{record}"
            );
            assert_eq!(stamp_fast(&record), Some(stamp), "{record}");
        }
    }

    #[test]
    fn an_ack_names_the_last_message_and_counts_only_tracked_ones() {
        assert_eq!(ack(42), "{\"type\":8,\"sequenceId\":42}\u{1e}");
        let tracked = |record: &str| Incoming::parse(record).is_tracked();
        assert!(tracked(&event(r#"{"lg":{"g":1,"n":2,"t":3,"s":4}}"#)));
        assert!(tracked(r#"{"type":3,"invocationId":"1"}"#));
        assert!(tracked(
            r#"{"type":1,"target":"JobAssigned","arguments":[{}]}"#
        ));
        for untracked in [
            r#"{"type":6}"#,
            r#"{"type":8,"sequenceId":1}"#,
            r#"{"type":7}"#,
            "{}",
        ] {
            assert!(!tracked(untracked), "{untracked}");
        }
    }

    #[test]
    fn a_negotiate_answer_gives_its_token_only_when_stateful_was_granted() {
        let granted = br#"{"negotiateVersion":1,"connectionId":"c","connectionToken":"t-1","availableTransports":[],"useStatefulReconnect":true}"#;
        assert_eq!(stateful_connection_token(granted), Ok("t-1".to_owned()));
        let refused = br#"{"negotiateVersion":1,"connectionId":"c","connectionToken":"t-1","availableTransports":[]}"#;
        assert!(stateful_connection_token(refused).is_err());
        assert!(stateful_connection_token(b"not json").is_err());
    }

    #[test]
    fn the_join_invocation_names_the_region() {
        assert_eq!(
            join("lg-7"),
            "{\"type\":1,\"invocationId\":\"1\",\"target\":\"JoinDispatchGroup\",\"arguments\":[\"lg-7\"]}\u{1e}"
        );
    }
}
