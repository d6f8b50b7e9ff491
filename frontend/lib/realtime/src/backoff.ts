/**
 * The reconnect policy: capped, jittered exponential backoff, forever by default.
 *
 * Pure: the caller supplies the random source and does the waiting.
 */

/** How the client retries connecting, both the first time and after losing the connection. */
export interface ReconnectPolicy {
  /** The first delay's upper bound, in milliseconds (default 250). */
  initialDelayMs?: number;
  /** The cap on any delay, in milliseconds (default 10000). */
  maxDelayMs?: number;
  /** Connection attempts before giving up (default Infinity: never give up). */
  maxAttempts?: number;
}

/** A policy with every field set and checked. */
export interface ResolvedPolicy {
  initialDelayMs: number;
  maxDelayMs: number;
  maxAttempts: number;
}

/** Default first delay. */
export const DEFAULT_INITIAL_DELAY_MS = 250;
/** Default cap on delays. */
export const DEFAULT_MAX_DELAY_MS = 10_000;

/**
 * Fills in defaults and checks the values.
 *
 * @throws RangeError when a value is negative, not a number, or maxDelayMs < initialDelayMs.
 */
export function resolvePolicy(policy: ReconnectPolicy = {}): ResolvedPolicy {
  const initialDelayMs = policy.initialDelayMs ?? DEFAULT_INITIAL_DELAY_MS;
  const maxDelayMs = policy.maxDelayMs ?? Math.max(DEFAULT_MAX_DELAY_MS, initialDelayMs);
  const maxAttempts = policy.maxAttempts ?? Number.POSITIVE_INFINITY;
  if (!Number.isFinite(initialDelayMs) || initialDelayMs < 0) throw new RangeError("reconnect.initialDelayMs must be a finite number >= 0");
  if (!Number.isFinite(maxDelayMs) || maxDelayMs < initialDelayMs) throw new RangeError("reconnect.maxDelayMs must be a finite number >= initialDelayMs");
  if (!(maxAttempts === Number.POSITIVE_INFINITY || (Number.isInteger(maxAttempts) && maxAttempts >= 1))) {
    throw new RangeError("reconnect.maxAttempts must be a whole number >= 1 or Infinity");
  }
  return { initialDelayMs, maxDelayMs, maxAttempts };
}

/**
 * The delay before retry number `retry` (0 for the first retry): a ceiling that doubles from
 * `initialDelayMs` up to `maxDelayMs`, of which a random half is taken ("equal jitter"), so
 * clients that lost the same replica do not come back in step, yet none retries in a busy loop.
 * `random` returns a number in [0, 1).
 */
export function backoffDelay(policy: ResolvedPolicy, retry: number, random: () => number): number {
  const ceiling = Math.min(policy.maxDelayMs, policy.initialDelayMs * 2 ** Math.min(retry, 30));
  return ceiling / 2 + random() * (ceiling / 2);
}
