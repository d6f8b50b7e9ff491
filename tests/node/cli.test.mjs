// The command line as the README shows it: `gateway token`, and configuration errors.

import assert from "node:assert/strict";
import { execFile } from "node:child_process";
import { test } from "node:test";
import { promisify } from "node:util";

import {
  GATEWAY_BIN,
  JWT_SECRET,
  assertJoinsAndReceives,
  connect,
  gatewayFor,
  join,
  uniqueRegion,
} from "./harness.mjs";

const run = promisify(execFile);

/** Runs the gateway binary with `args`; resolves with { code, stdout, stderr } whatever the exit code. */
async function gateway(args, env = {}) {
  const cleanEnv = Object.fromEntries(Object.entries(process.env).filter(([key]) => !key.startsWith("GATEWAY_")));
  try {
    const { stdout, stderr } = await run(GATEWAY_BIN, args, { env: { ...cleanEnv, ...env }, timeout: 20_000 });
    return { code: 0, stdout, stderr };
  } catch (error) {
    if (typeof error.code !== "number") throw error;
    return { code: error.code, stdout: error.stdout, stderr: error.stderr };
  }
}

test("a token minted with `gateway token` lets the official client join the regions it names", async (t) => {
  const region = uniqueRegion();
  const minted = await gateway(["token", "--role", "dispatcher", "--region", region, "--ttl", "10m"], {
    GATEWAY_JWT_SECRET: JWT_SECRET,
  });
  assert.equal(minted.code, 0, minted.stderr);
  const token = minted.stdout.trim();
  assert.match(token, /^[\w-]+\.[\w-]+\.[\w-]+$/);

  const server = await gatewayFor(t);
  const connection = await connect(t, server, token);
  await assertJoinsAndReceives(server, connection, region);
});

test("a bad configuration exits with code 64 and lists every problem", async () => {
  const result = await gateway([
    "--listen", "127.0.0.1:0",
    "--admin-listen", "127.0.0.1:0",
    "--jwt-secret", "too-short",
    "--service-key", "short",
    "--keepalive-interval", "20s",
  ]);

  assert.equal(result.code, 64, result.stderr);
  assert.match(result.stderr, /--jwt-secret/);
  assert.match(result.stderr, /--service-key/);
  assert.match(result.stderr, /--keepalive-interval/);
});
