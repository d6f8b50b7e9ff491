// The browser tests' environment: deploy/local/up (redis-server, three gateway replicas, nginx) and
// the demo backend serving the built console, all on free loopback ports in a fresh state
// directory; SIGKILL/restart of one replica; each replica's /metrics; and a pipelining Redis
// publisher that follows docs/redis-contract.md (SCRIPT LOAD publish.lua, then EVALSHA per group)
// for bursts faster than any HTTP round trip. Ideas taken from tests/node/chaos/topology.mjs, kept
// self-contained so the front-end workspace needs nothing from tests/node.

import { execFile, execFileSync, spawn } from "node:child_process";
import { randomUUID } from "node:crypto";
import { closeSync, existsSync, mkdirSync, openSync, readFileSync, readdirSync, writeFileSync } from "node:fs";
import net from "node:net";
import path from "node:path";
import { fileURLToPath } from "node:url";
import { stopOnExit } from "../../../tests/node/stop-on-exit.mjs";

const here = path.dirname(fileURLToPath(import.meta.url));
export const REPO = path.resolve(here, "../../..");
export const CONSOLE_DIST = path.resolve(here, "../dist");
export const GATEWAY_BIN = path.resolve(REPO, process.env.GATEWAY_BIN ?? "target/debug/gateway");
export const DEMO_BACKEND_BIN = path.resolve(REPO, process.env.DEMO_BACKEND_BIN ?? "target/debug/demo-backend");
export const CHROMIUM_BIN = process.env.CHROMIUM_BIN ?? "/usr/bin/chromium";
const DEPLOY = path.join(REPO, "deploy/local");
const PUBLISH_LUA = path.join(REPO, "publisher-lib/src/history/publish.lua");

export const JWT_SECRET = "console-browser-test-jwt-secret-0123456789abcdef0123456789";
const SERVICE_KEY = "console-browser-test-service-key-0123456789";

// What must be stopped if this process exits or is told to stop before a test's own cleanup
// ran: an interrupted run leaves no topology or demo backend behind.
const forgets = [];
const forgetAll = () => forgets.splice(0).forEach((forget) => forget());

/** Throws a message naming the command that builds whatever is missing. */
export function checkPrerequisites() {
  const missing = [];
  if (!existsSync(GATEWAY_BIN)) missing.push(`${GATEWAY_BIN} (cargo build -p gateway --bin gateway)`);
  if (!existsSync(DEMO_BACKEND_BIN)) missing.push(`${DEMO_BACKEND_BIN} (cargo build -p demo-backend)`);
  if (!existsSync(path.join(CONSOLE_DIST, "index.html"))) missing.push(`${CONSOLE_DIST}/index.html (npm run build --workspaces at frontend/)`);
  if (!existsSync(CHROMIUM_BIN)) missing.push(`${CHROMIUM_BIN} (apt-get install chromium, or set CHROMIUM_BIN)`);
  if (missing.length) throw new Error(`browser tests: missing prerequisites:\n  ${missing.join("\n  ")}`);
}

export const pause = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

/** A free loopback port (the kernel's pick; a later bind may still race, hence the retries below). */
function freePort() {
  return new Promise((resolve, reject) => {
    const server = net.createServer();
    server.once("error", reject);
    server.listen(0, "127.0.0.1", () => {
      const { port } = server.address();
      server.close(() => resolve(port));
    });
  });
}

async function distinctFreePorts(count) {
  const ports = new Set();
  for (let i = 0; ports.size < count && i < count * 20; i += 1) ports.add(await freePort());
  if (ports.size < count) throw new Error("could not find free ports");
  return [...ports];
}

function runScript(script, env, timeoutMs) {
  return new Promise((resolve, reject) => {
    execFile(path.join(DEPLOY, script), [], { env, timeout: timeoutMs }, (error, stdout, stderr) => {
      if (error) reject(new Error(`deploy/local/${script} failed: ${error.message}\n${stdout}\n${stderr}`));
      else resolve(stdout);
    });
  });
}

/** Is `pid` alive (and not a zombie)? */
export function alive(pid) {
  try {
    process.kill(pid, 0);
    return !/\)\s+Z\s/.test(readFileSync(`/proc/${pid}/stat`, "utf8"));
  } catch {
    return false;
  }
}

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
  let env;
  let consolePort;
  for (let attempt = 1; ; attempt += 1) {
    const [redis, lbPort, p1, p2, p3, a1, a2, a3, cp] = await distinctFreePorts(9);
    consolePort = cp;
    env = {
      ...Object.fromEntries(Object.entries(process.env).filter(([key]) => !key.startsWith("GATEWAY_"))),
      GATEWAY_BIN,
      STATE_DIR: stateDir,
      REDIS_PORT: String(redis),
      LB_PORT: String(lbPort),
      REPLICA_PORTS: `${p1} ${p2} ${p3}`,
      ADMIN_PORTS: `${a1} ${a2} ${a3}`,
      JWT_SECRET,
      SERVICE_KEY,
      CONNECTION_TOKEN_SECRET: `console-browser-test-connection-token-${randomUUID()}`,
      CORS_ORIGINS: `http://127.0.0.1:${consolePort}`,
      READY_TIMEOUT: "30",
    };
    const downEnv = env;
    forgets.push(stopOnExit(() => execFileSync(path.join(DEPLOY, "down"), [], { env: { ...downEnv, STOP_TIMEOUT: "5" }, timeout: 30_000, stdio: "ignore" })));
    try {
      await runScript("up", env, 60_000);
      break;
    } catch (error) {
      // Not started: nothing to stop, but a half-started topology is, so always try down.
      await runScript("down", env, 60_000).catch(() => {});
      if (attempt === 3 || !/already in use|Address in use|AddrInUse/i.test(error.message)) throw error;
    }
  }
  const redisPort = Number(env.REDIS_PORT);
  const lbPort = Number(env.LB_PORT);
  const replicas = env.REPLICA_PORTS.split(" ").map((port, i) => ({
    name: `gateway-${i + 1}`,
    port: Number(port),
    adminUrl: `http://127.0.0.1:${env.ADMIN_PORTS.split(" ")[i]}`,
    pidFile: path.join(stateDir, "pids", `gateway-${i + 1}.pid`),
  }));

  // The demo backend, a child of this process (killed in stop()).
  const backendLog = openSync(path.join(stateDir, "logs", "demo_backend.log"), "a");
  const backend = spawn(
    DEMO_BACKEND_BIN,
    [
      "--listen", `127.0.0.1:${consolePort}`,
      "--redis-url", `redis://127.0.0.1:${redisPort}`,
      "--jwt-secret", JWT_SECRET,
      "--hub-url", `http://127.0.0.1:${lbPort}/hub/v1`,
      "--console-dir", CONSOLE_DIST,
    ],
    { stdio: ["ignore", backendLog, backendLog] },
  );
  closeSync(backendLog);
  const killBackend = () => backend.kill("SIGKILL");
  const forgetBackend = stopOnExit(killBackend);
  forgets.push(forgetBackend);
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
      await runScript("down", env, 90_000);
      forgetAll();
    },
    logTails() {
      try {
        const logs = path.join(stateDir, "logs");
        return readdirSync(logs)
          .map((f) => `--- ${f}\n${readFileSync(path.join(logs, f), "utf8").split("\n").slice(-15).join("\n")}`)
          .join("\n");
      } catch {
        return "";
      }
    },
    /** A metric's value summed over its label sets, from replica `i`'s /metrics. */
    async metric(i, name) {
      const response = await fetch(`${replicas[i].adminUrl}/metrics`, { signal: AbortSignal.timeout(3000) });
      const text = await response.text();
      return text
        .split("\n")
        .filter((line) => line.split(/[{ ]/)[0] === name)
        .reduce((sum, line) => sum + Number(line.split(" ").at(-1)), 0);
    },
    /** Active connections per replica (null for one that does not answer). */
    async connections() {
      return Promise.all(replicas.map((_, i) => environment.metric(i, "gateway_connections_active").catch(() => null)));
    },
    /** SIGKILLs replica `i`, waits until it has exited; returns its argv to start it again. */
    async killReplica(i) {
      const pid = Number(readFileSync(replicas[i].pidFile, "utf8").trim());
      const argv = readFileSync(`/proc/${pid}/cmdline`, "utf8").split("\0").filter(Boolean);
      process.kill(pid, "SIGKILL");
      await until(`${replicas[i].name} (pid ${pid}) to exit`, 10_000, () => !alive(pid), 10);
      return argv;
    },
    /** Starts replica `i` again (detached, like deploy/local/up) and waits for its /readyz. */
    async restartReplica(i, argv) {
      const logFd = openSync(path.join(stateDir, "logs", `${replicas[i].name}.log`), "a");
      const childEnv = Object.fromEntries(Object.entries(process.env).filter(([key]) => !key.startsWith("GATEWAY_")));
      const child = spawn(argv[0], argv.slice(1), { env: childEnv, detached: true, stdio: ["ignore", logFd, logFd] });
      closeSync(logFd);
      child.unref();
      writeFileSync(replicas[i].pidFile, `${child.pid}\n`);
      await until(`${replicas[i].name} /readyz after restart`, 20_000, async () => {
        if (!alive(child.pid)) throw new Error(`${replicas[i].name} exited after restart`);
        return httpOk(`${replicas[i].adminUrl}/readyz`);
      }, 50);
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

function encode(args) {
  let out = `*${args.length}\r\n`;
  for (const arg of args) {
    const text = String(arg);
    out += `$${Buffer.byteLength(text)}\r\n${text}\r\n`;
  }
  return out;
}

/** Parses one RESP2 reply at `offset`; returns { value, offset } or null when incomplete. */
function parse(buffer, offset) {
  const end = buffer.indexOf("\r\n", offset);
  if (end < 0) return null;
  const kind = String.fromCharCode(buffer[offset]);
  const line = buffer.subarray(offset + 1, end).toString("utf8");
  const next = end + 2;
  switch (kind) {
    case "+":
      return { value: line, offset: next };
    case "-":
      return { value: new Error(line), offset: next };
    case ":":
      return { value: Number(line), offset: next };
    case "$": {
      const length = Number(line);
      if (length < 0) return { value: null, offset: next };
      if (buffer.length < next + length + 2) return null;
      return { value: buffer.subarray(next, next + length).toString("utf8"), offset: next + length + 2 };
    }
    case "*": {
      const count = Number(line);
      if (count < 0) return { value: null, offset: next };
      const items = [];
      let at = next;
      for (let i = 0; i < count; i += 1) {
        const item = parse(buffer, at);
        if (!item) return null;
        items.push(item.value);
        at = item.offset;
      }
      return { value: items, offset: at };
    }
    default:
      throw new Error(`unexpected RESP type ${JSON.stringify(kind)}`);
  }
}

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
