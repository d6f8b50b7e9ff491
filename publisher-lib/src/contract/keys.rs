//! What every publisher and the gateway must agree on about a group's keys in Redis: the channel
//! prefix, the rule for idempotency keys, and the default bounds of a group's history and of the
//! idempotency window.
//!
//! The publish script applies the bounds it is given, so a publisher and the gateway replicas
//! that read the same history should pass the same values; these are the defaults both start
//! from (`publisher_lib::PublisherConfig::new` and the gateway's `--history-size`,
//! `--history-ttl`, `--idempotency-window` and `--redis-prefix`). Pure: constants and checks.

use std::time::Duration;

use super::validate::ValidationError;

/// The channel prefix the gateway subscribes under unless configured otherwise; channels are
/// `<prefix>{<group>}`.
pub const DEFAULT_PREFIX: &str = "rt:";
/// Default number of events each group's history keeps.
pub const DEFAULT_HISTORY_SIZE: usize = 1000;
/// Default time without publishes after which a group's history (and position) expires.
pub const DEFAULT_HISTORY_TTL: Duration = Duration::from_secs(600);
/// Default time within which a second publish under the same idempotency key is a duplicate.
pub const DEFAULT_IDEMPOTENCY_WINDOW: Duration = Duration::from_secs(300);
/// Longest idempotency key, in bytes.
pub const MAX_IDEMPOTENCY_KEY_LEN: usize = 200;

/// Checks an idempotency key: 1 to [`MAX_IDEMPOTENCY_KEY_LEN`] printable ASCII characters
/// without spaces (a key travels in an HTTP header, which trims spaces, and in a Redis key name).
///
/// # Errors
/// [`ValidationError::Field`] for `idempotencyKey`, naming the rule that failed.
pub fn check_idempotency_key(key: &str) -> Result<(), ValidationError> {
    let reason = if key.is_empty() {
        "is empty".to_owned()
    } else if key.len() > MAX_IDEMPOTENCY_KEY_LEN {
        format!(
            "is {} bytes; at most {MAX_IDEMPOTENCY_KEY_LEN} are allowed",
            key.len()
        )
    } else if !key.bytes().all(|b| b.is_ascii_graphic()) {
        "must be printable ASCII without spaces".to_owned()
    } else {
        return Ok(());
    };
    Err(ValidationError::Field {
        field: "idempotencyKey".to_owned(),
        reason: format!("the idempotency key {reason}"),
    })
}

/// Checks a channel prefix: it must not contain `{` or `}`, which delimit the group's Redis
/// Cluster hash tag in `<prefix>{<group>}`.
///
/// # Errors
/// A sentence naming the rule.
pub fn check_prefix(prefix: &str) -> Result<(), &'static str> {
    if prefix.contains(['{', '}']) {
        Err("must not contain '{' or '}' (they delimit the hash tag)")
    } else {
        Ok(())
    }
}
