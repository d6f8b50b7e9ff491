// CORS on negotiate and Origin checks on the WebSocket upgrade, as a browser on another origin
// would exercise them.

import assert from "node:assert/strict";
import { test } from "node:test";

import {
  dispatcherToken,
  gatewayForFile,
  negotiate,
  rawUpgrade,
  startGateway,
  uniqueRegion,
} from "./harness.mjs";

const ALLOWED = "http://app.example";
const OTHER = "http://evil.example";

const gateway = gatewayForFile({ name: "origins", args: ["--cors-origins", ALLOWED] });

/** The preflight a browser sends before the client's negotiate POST. */
async function preflight(origin) {
  const response = await fetch(`${gateway.hubUrl}/negotiate?negotiateVersion=1`, {
    method: "OPTIONS",
    headers: {
      origin,
      "access-control-request-method": "POST",
      "access-control-request-headers": "authorization,x-requested-with,x-signalr-user-agent",
    },
    signal: AbortSignal.timeout(10_000),
  });
  await response.arrayBuffer();
  return response;
}

const listOf = (header) => (header ?? "").split(",").map((item) => item.trim().toLowerCase()).filter(Boolean);

test("negotiate answers a CORS preflight from a configured origin with credentials allowed", async () => {
  const response = await preflight(ALLOWED);

  assert.ok(response.status === 200 || response.status === 204, `preflight answered ${response.status}`);
  assert.equal(response.headers.get("access-control-allow-origin"), ALLOWED);
  assert.equal(response.headers.get("access-control-allow-credentials"), "true");
  const methods = listOf(response.headers.get("access-control-allow-methods"));
  assert.ok(methods.includes("post"), `allow-methods ${methods}`);
  const allowedHeaders = listOf(response.headers.get("access-control-allow-headers"));
  for (const header of ["authorization", "x-requested-with", "x-signalr-user-agent"]) {
    assert.ok(allowedHeaders.includes(header) || allowedHeaders.includes("*"), `allow-headers ${allowedHeaders} lacks ${header}`);
  }
  assert.match(response.headers.get("vary") ?? "", /origin/i, "the answer varies by Origin");
});

test("negotiate from a configured origin carries the CORS headers on the actual response", async () => {
  const response = await negotiate(gateway, dispatcherToken([uniqueRegion()]), { origin: ALLOWED });

  assert.equal(response.status, 200, response.text);
  assert.equal(response.headers.get("access-control-allow-origin"), ALLOWED);
  assert.equal(response.headers.get("access-control-allow-credentials"), "true");
});

test("negotiate refuses an origin that is not configured and grants it no CORS access", async () => {
  const response = await preflight(OTHER);

  assert.equal(response.status, 403, `preflight from ${OTHER} answered ${response.status}`);
  assert.equal(response.headers.get("access-control-allow-origin"), null, "a foreign origin is not allowed");
  assert.equal(response.headers.get("access-control-allow-credentials"), null);

  const actual = await negotiate(gateway, dispatcherToken([uniqueRegion()]), { origin: OTHER });
  assert.equal(actual.status, 403, `negotiate from ${OTHER} answered ${actual.status} ${actual.text}`);
  assert.equal(actual.headers.get("access-control-allow-origin"), null);
});

test("a WebSocket upgrade from an origin that is not configured is refused with 403", async () => {
  const token = dispatcherToken([uniqueRegion()]);

  const refused = await rawUpgrade(gateway.hubUrl, { origin: OTHER, authorization: `Bearer ${token}` });
  assert.equal(refused.status, 403, `upgrade with Origin ${OTHER} answered ${refused.status} ${refused.body}`);

  const accepted = await rawUpgrade(gateway.hubUrl, { origin: ALLOWED, authorization: `Bearer ${token}` });
  assert.equal(accepted.status, 101, `upgrade with Origin ${ALLOWED} answered ${accepted.status} ${accepted.body}`);
});

test("a WebSocket upgrade without an Origin header is refused unless missing origins are allowed", async (t) => {
  const strict = await startGateway({ name: "origins-strict", args: ["--cors-origins", ALLOWED], allowMissingOrigin: false });
  t.after(() => strict.stop());
  const token = dispatcherToken([uniqueRegion()]);

  const refused = await rawUpgrade(strict.hubUrl, { authorization: `Bearer ${token}` });
  assert.equal(refused.status, 403, `upgrade without Origin answered ${refused.status} ${refused.body}`);
  const lenient = await rawUpgrade(gateway.hubUrl, { authorization: `Bearer ${token}` });
  assert.equal(lenient.status, 101);
});
