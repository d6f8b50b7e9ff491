//! The rules an event must satisfy beyond its shape, and the errors that name them.

use chrono::{DateTime, Utc};
use serde::Deserialize;
use serde::de::DeserializeOwned;

use super::event::EventKind;
use super::group::Group;

/// Largest accepted encoding of one event, in bytes: the contract keeps payloads under 2 KB.
pub const MAX_EVENT_BYTES: usize = 2047;

/// Why an event was refused. The message names the field and the rule.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ValidationError {
    /// The encoded event is too large.
    #[error("event is {bytes} bytes; the contract allows at most {MAX_EVENT_BYTES}")]
    TooLarge {
        /// Size of the encoding that was refused.
        bytes: usize,
    },
    /// The body is not a JSON object.
    #[error("event is not a JSON object: {0}")]
    NotJson(String),
    /// The `type` discriminator is absent.
    #[error("field `type` is missing; expected RecommendationReady or JobAssigned")]
    MissingType,
    /// The `type` discriminator names no event of the contract.
    #[error("unknown event type `{0}`; expected RecommendationReady or JobAssigned")]
    UnknownType(String),
    /// A field is missing, has the wrong type or breaks a rule.
    #[error("field `{field}`: {reason}")]
    Field {
        /// The contract's field name (camelCase).
        field: String,
        /// What is wrong with it.
        reason: String,
    },
}

pub(super) fn size(bytes: usize) -> Result<(), ValidationError> {
    if bytes > MAX_EVENT_BYTES {
        return Err(ValidationError::TooLarge { bytes });
    }
    Ok(())
}

/// Reads only the `type` discriminator.
pub(super) fn kind(json: &[u8]) -> Result<EventKind, ValidationError> {
    /// Only the discriminator; every other field is skipped without being stored.
    #[derive(Deserialize)]
    struct Tag {
        #[serde(rename = "type")]
        kind: Option<serde_json::Value>,
    }
    // Serde would also read the struct from an array; an event is an object.
    if json.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
        return Err(ValidationError::NotJson(
            "invalid type: expected a JSON object".to_owned(),
        ));
    }
    let tag: Tag = serde_json::from_slice(json)
        .map_err(|e| ValidationError::NotJson(strip_position(&e.to_string())))?;
    match tag.kind {
        None => Err(ValidationError::MissingType),
        Some(serde_json::Value::String(name)) => {
            EventKind::from_name(&name).ok_or(ValidationError::UnknownType(name))
        }
        Some(other) => Err(ValidationError::UnknownType(other.to_string())),
    }
}

/// Reads the fields of one event, reporting the path of the first bad field.
///
/// A valid event is read once, without tracking paths (tracking keeps every key as a `String`
/// while it reads: about 2% of a gateway's CPU per HTTP publish); only an event that fails is
/// read again with tracking, for the field to name. Both readings accept the same input.
pub(super) fn fields<T: DeserializeOwned>(json: &[u8]) -> Result<T, ValidationError> {
    if let Ok(fields) = serde_json::from_slice(json) {
        return Ok(fields);
    }
    let mut de = serde_json::Deserializer::from_slice(json);
    serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let field = e.path().to_string();
        let inner = e.into_inner();
        let reason = strip_position(&inner.to_string());
        if field == "." {
            // Serde names a missing field in its message: pull it out as the field.
            if let Some(name) = reason
                .strip_prefix("missing field `")
                .and_then(|s| s.split('`').next())
            {
                return ValidationError::Field {
                    field: name.to_owned(),
                    reason: "is required".to_owned(),
                };
            }
            return ValidationError::NotJson(reason);
        }
        ValidationError::Field { field, reason }
    })
}

pub(super) fn region(region: &str) -> Result<(), ValidationError> {
    Group::try_dispatch(region)
        .map(drop)
        .map_err(|e| ValidationError::Field {
            field: "region".to_owned(),
            reason: e.to_string(),
        })
}

pub(super) fn slot(start: DateTime<Utc>, end: DateTime<Utc>) -> Result<(), ValidationError> {
    if end <= start {
        return Err(ValidationError::Field {
            field: "endUtc".to_owned(),
            reason: "must be after startUtc".to_owned(),
        });
    }
    Ok(())
}

/// Deserializes an ISO 8601 timestamp in UTC, written as the contract writes it:
/// `2025-11-08T12:34:56Z`, optionally with fractional seconds. Other offsets, `+00:00`, a
/// lowercase `z` or a space instead of `T` are refused, so browsers only ever see one form.
pub(super) fn utc_timestamp<'de, D>(deserializer: D) -> Result<DateTime<Utc>, D::Error>
where
    D: serde::Deserializer<'de>,
{
    let text = String::deserialize(deserializer)?;
    let parsed = DateTime::parse_from_rfc3339(&text)
        .ok()
        .filter(|_| text.as_bytes().get(10) == Some(&b'T'));
    let Some(parsed) = parsed else {
        return Err(serde::de::Error::custom(format!(
            "`{text}` is not an ISO 8601 timestamp like 2025-11-08T12:34:56Z"
        )));
    };
    if !text.ends_with('Z') || parsed.offset().local_minus_utc() != 0 {
        return Err(serde::de::Error::custom(format!(
            "`{text}` is not in UTC with a `Z` suffix"
        )));
    }
    Ok(parsed.with_timezone(&Utc))
}

/// Deserializes a UUID in its canonical 36-character hyphenated form (either case).
pub(super) fn uuid<'de, D>(deserializer: D) -> Result<uuid::Uuid, D::Error>
where
    D: serde::Deserializer<'de>,
{
    let text = String::deserialize(deserializer)?;
    let hyphens_in_place = text.len() == 36
        && text
            .bytes()
            .enumerate()
            .all(|(i, b)| matches!(i, 8 | 13 | 18 | 23) == (b == b'-'));
    match uuid::Uuid::try_parse(&text) {
        Ok(id) if hyphens_in_place => Ok(id),
        _ => Err(serde::de::Error::custom(format!(
            "`{text}` is not a UUID like 7d9f4f3e-1c2b-4d5e-8f60-123456789abc"
        ))),
    }
}

/// Serde appends " at line 1 column 42"; the field path says more to a caller.
fn strip_position(message: &str) -> String {
    match message.rfind(" at line ") {
        Some(at) => message[..at].to_owned(),
        None => message.to_owned(),
    }
}
