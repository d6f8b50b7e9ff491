import assert from "node:assert/strict";
import { test } from "node:test";

import { backoffDelay, resolvePolicy } from "../src/backoff.js";

test("defaults: 250 ms doubling to a 10 s cap, forever", () => {
  assert.deepEqual(resolvePolicy(), { initialDelayMs: 250, maxDelayMs: 10_000, maxAttempts: Infinity });
  assert.deepEqual(resolvePolicy({ initialDelayMs: 20_000 }), { initialDelayMs: 20_000, maxDelayMs: 20_000, maxAttempts: Infinity });
});

test("delays double up to the cap and take a random half of the ceiling", () => {
  const policy = resolvePolicy({ initialDelayMs: 100, maxDelayMs: 1000 });
  const ceilings = [100, 200, 400, 800, 1000, 1000, 1000];
  for (const [retry, ceiling] of ceilings.entries()) {
    assert.equal(backoffDelay(policy, retry, () => 0), ceiling / 2, `lowest delay of retry ${retry}`);
    assert.equal(backoffDelay(policy, retry, () => 0.999999), ceiling / 2 + 0.999999 * (ceiling / 2), `highest delay of retry ${retry}`);
  }
  // Huge retry numbers stay at the cap (no overflow to Infinity or NaN).
  assert.equal(backoffDelay(policy, 10_000, () => 0.5), 750);
});

test("invalid policies are refused", () => {
  assert.throws(() => resolvePolicy({ initialDelayMs: -1 }), RangeError);
  assert.throws(() => resolvePolicy({ initialDelayMs: 500, maxDelayMs: 100 }), RangeError);
  assert.throws(() => resolvePolicy({ maxDelayMs: Infinity }), RangeError);
  assert.throws(() => resolvePolicy({ maxAttempts: 0 }), RangeError);
  assert.throws(() => resolvePolicy({ maxAttempts: 1.5 }), RangeError);
  assert.deepEqual(resolvePolicy({ maxAttempts: 3 }).maxAttempts, 3);
});
