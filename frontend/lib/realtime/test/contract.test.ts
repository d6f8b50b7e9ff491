import assert from "node:assert/strict";
import { test } from "node:test";

import { assignment, recommendation } from "./fixtures.js";
import { groupOfContractor, groupOfDispatch, validateEvent, validatePosition } from "../src/contract.js";

function check(payload: unknown, expected: string | "ok"): void {
  const result = validateEvent(payload);
  if (expected === "ok") {
    assert.ok(result.ok, `expected ${JSON.stringify(payload)} to pass: ${result.ok ? "" : result.error}`);
    assert.equal(result.value, payload, "the event is passed on as it came");
  } else {
    assert.ok(!result.ok, `expected ${JSON.stringify(payload)} to be refused`);
    assert.match(result.error, new RegExp(expected));
  }
}

test("valid events of both types pass, unknown fields kept", () => {
  check(recommendation(), "ok");
  check(recommendation({ schemaVersion: 2, nested: { a: 1 } }), "ok");
  check(recommendation({ configVersion: 4294967295, generatedAt: "2025-11-08T12:34:56.123456Z" }), "ok");
  check(assignment(), "ok");
  check(assignment({ source: "auto", contractorId: "11111111-2222-4333-8444-55555555555A" }), "ok");
});

test("malformed events are refused with the field and the rule", () => {
  check(null, "not a JSON object");
  check([recommendation()], "not a JSON object");
  check("RecommendationReady", "not a JSON object");
  check(recommendation({ type: "Foo" }), 'unknown event type "Foo"');
  check(recommendation({ type: "recommendationready" }), "unknown event type");
  check({ ...recommendation(), type: undefined }, "unknown event type undefined");
  check(recommendation({ jobId: undefined }), "`jobId` is required");
  check(recommendation({ jobId: null }), "`jobId` is required");
  check(recommendation({ jobId: 42 }), "`jobId` must be a string");
  check(recommendation({ requestId: "7d9f4f3e1c2b4d5e8f60123456789abc" }), "`requestId` must be a hyphenated UUID");
  check(recommendation({ region: "" }), "`region` must be 1 to 64");
  check(recommendation({ region: "we st" }), "`region` must be 1 to 64");
  check(recommendation({ region: "x".repeat(65) }), "`region` must be 1 to 64");
  check(recommendation({ configVersion: "1" }), "`configVersion` must be a whole number");
  check(recommendation({ configVersion: 1.5 }), "`configVersion` must be a whole number");
  check(recommendation({ configVersion: -1 }), "`configVersion` must be a whole number");
  check(recommendation({ configVersion: 4294967296 }), "`configVersion` must be a whole number");
  check(recommendation({ generatedAt: "2025-11-08T12:34:56+00:00" }), "`generatedAt` must be an ISO 8601 UTC");
  check(recommendation({ generatedAt: "2025-13-45T12:34:56Z" }), "`generatedAt` must be an ISO 8601 UTC");
  check(assignment({ source: "robot" }), '`source` must be "auto" or "manual"');
  check(assignment({ source: "Manual" }), "`source`");
  check(assignment({ auditId: undefined }), "`auditId` is required");
  check(assignment({ endUtc: "2025-11-08T15:00:00Z" }), "`endUtc` must be after startUtc");
  check(assignment({ startUtc: 0 }), "`startUtc` must be a string");
});

test("positions must carry a group, an epoch and a whole seq", () => {
  assert.deepEqual(validatePosition({ group: "/dispatch/west", epoch: "e1", seq: 3, extra: 1 }), {
    ok: true,
    value: { group: "/dispatch/west", epoch: "e1", seq: 3 },
  });
  for (const bad of [null, 7, { epoch: "e", seq: 1 }, { group: "g", seq: 1 }, { group: "g", epoch: "e" }, { group: "g", epoch: "e", seq: 1.5 }, { group: "g", epoch: "e", seq: -1 }, { group: "g", epoch: "e", seq: "1" }]) {
    assert.equal(validatePosition(bad).ok, false, JSON.stringify(bad));
  }
});

test("group names follow the gateway's", () => {
  assert.equal(groupOfDispatch("West"), "/dispatch/West");
  assert.equal(groupOfContractor("ABCDEF01-2222-4333-8444-555555555555"), "/contractor/abcdef01-2222-4333-8444-555555555555");
});
