// The browser tests' environment: deploy/local/up (redis-server, three gateway replicas, nginx) and
// the demo backend serving the built console, all on free loopback ports in a fresh state
// directory; SIGKILL/restart of one replica; each replica's /metrics; and a pipelining Redis
// publisher that follows docs/redis-contract.md (SCRIPT LOAD publish.lua, then EVALSHA per group)
// for bursts faster than any HTTP round trip. The topology, the replicas' faults and RESP are
// tests/node's modules that import nothing outside Node (local-topology.mjs, resp.mjs,
// stop-on-exit.mjs), so the front-end workspace needs none of tests/node's packages.

import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import { randomUUID } from "node:crypto";
import { closeSync, existsSync, mkdirSync, openSync, readFileSync } from "node:fs";
import net from "node:net";
import path from "node:path";
import { fileURLToPath } from "node:url";
import { alive, killReplica, metric, restartReplica, startTopology } from "../../../tests/node/local-topology.mjs";
import { encode, parse } from "../../../tests/node/resp.mjs";
import { stopOnExit } from "../../../tests/node/stop-on-exit.mjs";

const here = path.dirname(fileURLToPath(import.meta.url));
export const REPO = path.resolve(here, "../../..");
export const CONSOLE_DIST = path.resolve(here, "../dist");
export const GATEWAY_BIN = path.resolve(REPO, process.env.GATEWAY_BIN ?? "target/debug/gateway");
export const DEMO_BACKEND_BIN = path.resolve(REPO, process.env.DEMO_BACKEND_BIN ?? "target/debug/demo-backend");
export const CHROMIUM_BIN = process.env.CHROMIUM_BIN ?? "/usr/bin/chromium";
const PUBLISH_LUA = path.join(REPO, "publisher-lib/src/history/publish.lua");

export const JWT_SECRET = "console-browser-test-jwt-secret-0123456789abcdef0123456789";
const SERVICE_KEY = "console-browser-test-service-key-0123456789";

/** Throws a message naming the command that builds whatever is missing. */
export function checkPrerequisites() {
  const missing = [];
  if (!existsSync(GATEWAY_BIN)) missing.push(`${GATEWAY_BIN} (cargo build -p gateway --bin gateway)`);
  if (!existsSync(DEMO_BACKEND_BIN)) missing.push(`${DEMO_BACKEND_BIN} (cargo build -p demo-backend)`);
  if (!existsSync(path.join(CONSOLE_DIST, "index.html"))) missing.push(`${CONSOLE_DIST}/index.html (npm run build --workspaces at frontend/)`);
  if (!existsSync(CHROMIUM_BIN)) missing.push(`${CHROMIUM_BIN} (apt-get install chromium, or set CHROMIUM_BIN)`);
  if (missing.length) throw new Error(`browser tests: missing prerequisites:\n  ${missing.join("\n  ")}`);
}

/** Calls the demo backend behind `consoleUrl` (`<consoleUrl>api/<pathAndQuery>`, JSON in and
 * out, 5 s at most) and fails the test unless it answers 2xx; resolves with the JSON. */
export async function consoleApi(consoleUrl, method, pathAndQuery, body) {
  const response = await fetch(`${consoleUrl}api/${pathAndQuery}`, {
    method,
    headers: body ? { "content-type": "application/json" } : {},
    body: body ? JSON.stringify(body) : undefined,
    signal: AbortSignal.timeout(5000),
  });
  const json = await response.json();
  assert.ok(response.ok, `${method} /api/${pathAndQuery}: ${response.status} ${JSON.stringify(json)}`);
  return json;
}

export const pause = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

/** Polls `check` every `everyMs` until it returns a truthy value; throws after `ms`. */
export async function until(what, ms, check, everyMs = 25) {
  const deadline = Date.now() + ms;
  for (;;) {
    const value = await check();
    if (value) return value;
    if (Date.now() > deadline) throw new Error(`timed out after ${ms} ms waiting for ${what}`);
    await pause(everyMs);
  }
}

async function httpOk(url) {
  try {
    const response = await fetch(url, { signal: AbortSignal.timeout(1000) });
    await response.arrayBuffer();
    return response.ok;
  } catch {
    return false;
  }
}

/**
 * Starts the topology and the demo backend (serving dist/) on free ports in `stateDir`.
 * Returns { consoleUrl, redisPort, replicas, killReplica, restartReplica, metric, stop, logTails }.
 */
export async function startEnvironment(stateDir) {
  mkdirSync(stateDir, { recursive: true });
  const topology = await startTopology(stateDir, {
    gatewayBin: GATEWAY_BIN,
    jwtSecret: JWT_SECRET,
    serviceKey: SERVICE_KEY,
    name: "console-browser-test",
    extraPorts: 1,
    env: ([consolePort]) => ({ CORS_ORIGINS: `http://127.0.0.1:${consolePort}` }),
  });
  const [consolePort] = topology.extraPorts;
  const { redisPort, lb, replicas } = topology;

  // The demo backend, a child of this process (killed in stop()).
  const backendLog = openSync(path.join(stateDir, "logs", "demo_backend.log"), "a");
  const backend = spawn(
    DEMO_BACKEND_BIN,
    [
      "--listen", `127.0.0.1:${consolePort}`,
      "--redis-url", `redis://127.0.0.1:${redisPort}`,
      "--jwt-secret", JWT_SECRET,
      "--hub-url", lb.hubUrl,
      "--console-dir", CONSOLE_DIST,
    ],
    { stdio: ["ignore", backendLog, backendLog] },
  );
  closeSync(backendLog);
  // Stopped if this process exits or is told to stop before a test's own cleanup ran.
  const forgetBackend = stopOnExit(() => backend.kill("SIGKILL"));
  backend.once("exit", forgetBackend);
  const consoleUrl = `http://127.0.0.1:${consolePort}/`;

  const environment = {
    consoleUrl,
    redisPort,
    replicas,
    backend,
    async stop() {
      if (backend.exitCode === null && backend.signalCode === null) {
        backend.kill("SIGTERM");
        await until("the demo backend to exit", 10_000, () => !alive(backend.pid)).catch(() => backend.kill("SIGKILL"));
      }
      forgetBackend();
      await topology.stop();
    },
    logTails: topology.logTails,
    /** A metric's value summed over its label sets, from replica `i`'s /metrics. */
    metric: (i, name) => metric(replicas[i], name),
    /** Active connections per replica (null for one that does not answer). */
    async connections() {
      return Promise.all(replicas.map((_, i) => environment.metric(i, "gateway_connections_active").catch(() => null)));
    },
    /** SIGKILLs replica `i`, waits until it has exited; returns its argv to start it again. */
    async killReplica(i) {
      return (await killReplica(topology, i, "SIGKILL", 10_000)).argv;
    },
    /** Starts replica `i` again (detached, like deploy/local/up) and waits for its /readyz. */
    async restartReplica(i, argv) {
      await restartReplica(topology, i, argv);
    },
  };

  try {
    await until("the demo backend's /api/config", 20_000, async () => {
      if (backend.exitCode !== null) throw new Error(`the demo backend exited (${backend.exitCode})`);
      return httpOk(`${consoleUrl}api/config`);
    }, 50);
  } catch (error) {
    await environment.stop().catch(() => {});
    throw error;
  }
  return environment;
}

// ---------------------------------------------------------------------------------------------
// Publishing straight into Redis (docs/redis-contract.md), pipelined on one connection.

/**
 * A Redis connection that publishes events with the contract's publish script. Commands are
 * written back to back (a pipeline) and replies matched in order.
 */
export async function redisPublisher(port) {
  const socket = net.connect({ host: "127.0.0.1", port });
  await new Promise((resolve, reject) => {
    socket.once("connect", resolve);
    socket.once("error", reject);
  });
  let buffer = Buffer.alloc(0);
  const pending = [];
  socket.on("data", (chunk) => {
    buffer = buffer.length ? Buffer.concat([buffer, chunk]) : chunk;
    let offset = 0;
    for (;;) {
      const reply = parse(buffer, offset);
      if (!reply) break;
      offset = reply.offset;
      const waiter = pending.shift();
      if (reply.value instanceof Error) waiter?.reject(reply.value);
      else waiter?.resolve(reply.value);
    }
    buffer = buffer.subarray(offset);
  });
  socket.on("error", (error) => {
    for (const waiter of pending.splice(0)) waiter.reject(error);
  });
  const command = (args) =>
    new Promise((resolve, reject) => {
      pending.push({ resolve, reject });
      socket.write(encode(args));
    });
  const sha = await command(["SCRIPT", "LOAD", readFileSync(PUBLISH_LUA, "utf8")]);

  /** Publishes one envelope to one group; resolves with the script's {epoch, seq, duplicate, subscribers}. */
  function publishToGroup(group, envelope, key) {
    const base = `rt:{${group}}`;
    return command([
      "EVALSHA", sha, 3, `${base}:pos`, `${base}:history`, `${base}:id:${key}`,
      base, randomUUID().replaceAll("-", ""), envelope, 1000, 600, 300,
    ]);
  }

  return {
    /**
     * Publishes JobAssigned to /dispatch/{region} and /contractor/{contractorId} (the routing rule)
     * without waiting; returns the promise of both replies.
     */
    jobAssigned({ jobId, contractorId, region, startUtc, endUtc, assignmentId = randomUUID() }) {
      const event = {
        type: "JobAssigned",
        jobId,
        contractorId,
        assignmentId,
        startUtc,
        endUtc,
        region,
        source: "manual",
        auditId: randomUUID(),
      };
      const envelope = JSON.stringify({ v: 1, id: randomUUID(), type: "JobAssigned", publishedAt: Date.now() * 1000, event });
      return Promise.all([
        publishToGroup(`/dispatch/${region}`, envelope, assignmentId),
        publishToGroup(`/contractor/${contractorId.toLowerCase()}`, envelope, assignmentId),
      ]);
    },
    close: () => socket.end(),
  };
}
