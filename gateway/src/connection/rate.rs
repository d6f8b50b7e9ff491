//! Per-connection rate limits: how many invocations and joins one client may make.
//!
//! A token bucket per kind, with bursts of up to one second's worth, on tokio's clock (so it is
//! tested with paused time). It only decides; the connection answers and counts. A client that
//! keeps sending far past its limit is told to stop by closing it: refusing each invocation
//! would cost the gateway more than serving it.

use std::time::Duration;

use tokio::time::Instant;

/// Refusals within one window, as a multiple of the burst, that make a client a flooder.
const FLOOD_FACTOR: u32 = 10;
/// The window refusals are counted in.
const FLOOD_WINDOW: Duration = Duration::from_secs(1);

/// What the limit says about one more action.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Verdict {
    /// Within the limit.
    Allowed,
    /// Over the limit: refuse this one.
    Refused,
    /// Far over the limit, again and again: close the connection.
    Flooding,
}

/// Allows `per_second` actions per second on average, and bursts of `per_second`.
#[derive(Debug)]
pub(super) struct TokenBucket {
    per_second: u32,
    /// Tokens in thousandths, so a refill needs no floating point.
    milli_tokens: u64,
    refilled: Instant,
    /// Start of the window refusals are counted in.
    window: Instant,
    refused: u32,
}

impl TokenBucket {
    /// A full bucket for `per_second` actions per second (at least one).
    pub(super) fn new(per_second: u32, now: Instant) -> Self {
        let per_second = per_second.max(1);
        Self {
            per_second,
            milli_tokens: u64::from(per_second) * 1000,
            refilled: now,
            window: now,
            refused: 0,
        }
    }

    /// Takes a token for one action at `now`.
    pub(super) fn take(&mut self, now: Instant) -> Verdict {
        let full = u64::from(self.per_second) * 1000;
        let elapsed = now.saturating_duration_since(self.refilled);
        let earned = elapsed
            .as_millis()
            .saturating_mul(u128::from(self.per_second));
        let earned = u64::try_from(earned).unwrap_or(u64::MAX);
        self.milli_tokens = self.milli_tokens.saturating_add(earned).min(full);
        self.refilled = now;
        if self.milli_tokens >= 1000 {
            self.milli_tokens -= 1000;
            return Verdict::Allowed;
        }
        if now.saturating_duration_since(self.window) >= FLOOD_WINDOW {
            self.window = now;
            self.refused = 0;
        }
        self.refused += 1;
        if self.refused > FLOOD_FACTOR.saturating_mul(self.per_second) {
            Verdict::Flooding
        } else {
            Verdict::Refused
        }
    }
}

/// The limits of one connection, made at its first invocation.
#[derive(Debug)]
pub(super) struct Rates {
    /// Every hub invocation.
    pub(super) invocations: TokenBucket,
    /// Joins, on top of the invocation limit.
    pub(super) joins: TokenBucket,
}
