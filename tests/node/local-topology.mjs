// The deploy/local topology (redis-server, three gateway replicas, nginx) on free loopback ports in
// a fresh state directory, and the ports and processes around it: free ports, liveness of a PID,
// stopping and restarting a replica, a replica's /metrics. Used by the chaos and load-balancer
// tests (through harness.mjs and chaos/topology.mjs) and by the console's browser tests
// (frontend/console/test/topology.mjs); it imports nothing outside Node, so either can load it
// without the other's packages.

import { execFile, execFileSync, spawn } from "node:child_process";
import { randomUUID } from "node:crypto";
import { closeSync, openSync, readFileSync, readdirSync, writeFileSync } from "node:fs";
import net from "node:net";
import path from "node:path";
import { fileURLToPath } from "node:url";

import { stopOnExit } from "./stop-on-exit.mjs";

const here = path.dirname(fileURLToPath(import.meta.url));
const DEPLOY = path.resolve(here, "../../deploy/local");

const pause = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

// ---------------------------------------------------------------------------------------------
// Ports and processes

/** The lowest port freePort chooses: above the well-known and most registered ones. */
const FIRST_TEST_PORT = 10000;

/** The first port of the kernel's ephemeral range (Linux's default when it cannot be read). */
function ephemeralRangeStart() {
  try {
    const low = Number(readFileSync("/proc/sys/net/ipv4/ip_local_port_range", "utf8").trim().split(/\s+/)[0]);
    return Number.isInteger(low) ? low : 32768;
  } catch {
    return 32768;
  }
}

/** Does listening on `port` (0: any) at 127.0.0.1 work now? Resolves the port that was bound, or null. */
async function bindable(port) {
  const server = net.createServer();
  const bound = await new Promise((resolve) => {
    server.once("error", () => resolve(null));
    server.listen(port, "127.0.0.1", () => resolve(server.address().port));
  });
  if (bound !== null) await new Promise((resolve) => server.close(resolve));
  return bound;
}

/**
 * A port that was free a moment ago, chosen at random below the kernel's ephemeral range (never
 * 6379): there, no outgoing connection (the tests open thousands) can take it as its local port
 * between this check and the bind of the process it is meant for.
 */
export async function freePort() {
  const below = ephemeralRangeStart();
  const span = below - FIRST_TEST_PORT;
  for (let attempt = 0; attempt < 200; attempt += 1) {
    // An unusual range with no room below it: let the kernel choose.
    const candidate = span > 1000 ? FIRST_TEST_PORT + Math.floor(Math.random() * span) : 0;
    if (candidate === 6379) continue;
    const port = await bindable(candidate);
    if (port !== null) return port;
  }
  throw new Error(`no free port below ${below} after 200 tries`);
}

/** `count` distinct ports that were free a moment ago. */
export async function distinctFreePorts(count) {
  const ports = new Set();
  for (let i = 0; ports.size < count && i < count * 20; i += 1) ports.add(await freePort());
  if (ports.size < count) throw new Error("could not find free ports");
  return [...ports];
}

/**
 * This process's environment without any GATEWAY_* variable: only what a test passes configures
 * a gateway it starts, never the outer shell.
 */
export function envWithoutGatewayVariables() {
  return Object.fromEntries(Object.entries(process.env).filter(([key]) => !key.startsWith("GATEWAY_")));
}

/** Is `pid` alive (and not a zombie, which has exited and only waits to be reaped)? */
export function alive(pid) {
  try {
    process.kill(pid, 0);
    return !/\)\s+Z\s/.test(readFileSync(`/proc/${pid}/stat`, "utf8"));
  } catch {
    return false;
  }
}

/** Resolves when `pid` has exited (polled every `everyMs` with a deadline). */
export async function exitOf(pid, ms, everyMs = 20) {
  const deadline = Date.now() + ms;
  while (alive(pid)) {
    if (Date.now() > deadline) throw new Error(`pid ${pid} still running after ${ms} ms`);
    await pause(everyMs);
  }
}

// ---------------------------------------------------------------------------------------------
// deploy/local

/** Runs deploy/local/<script> with `env`; resolves with its output, rejects with it on failure. */
function runScript(script, env, timeoutMs) {
  return new Promise((resolve, reject) => {
    execFile(path.join(DEPLOY, script), [], { env, timeout: timeoutMs }, (error, stdout, stderr) => {
      if (error) reject(new Error(`deploy/local/${script} failed: ${error.message}\n${stdout}\n${stderr}`));
      else resolve(stdout);
    });
  });
}

/**
 * Registers deploy/local/down for the topology whose environment (STATE_DIR, ...) is `env`, to
 * run if this process exits or is interrupted before `forget()`. Register it before deploy/local/up
 * runs, so a half-started topology is stopped too.
 */
export function downOnExit(env) {
  return stopOnExit(() => {
    execFileSync(path.join(DEPLOY, "down"), [], { env: { ...env, STOP_TIMEOUT: "5" }, timeout: 30_000, stdio: "ignore" });
  });
}

/**
 * Starts the topology with deploy/local/up on free ports in `stateDir` (an existing directory).
 *
 * options.gatewayBin   the gateway binary the replicas run
 * options.jwtSecret    the user token secret; options.serviceKey the publishers' key
 * options.name         names the run's random connection token secret
 * options.replicaArgs  more arguments for every replica (REPLICA_ARGS)
 * options.extraPorts   how many more free ports to pick, distinct from the topology's, for a
 *                      service beside it (topology.extraPorts)
 * options.env          (extraPorts) => more variables for deploy/local/up (e.g. CORS_ORIGINS)
 *
 * Resolves with { env, stateDir, redisPort, redisUrl, lb, replicas, redisPidFile, extraPorts,
 * stop(), logTails() }; lb and each replica have hubUrl and eventsUrl, a replica also its name,
 * port, adminUrl and pidFile.
 */
export async function startTopology(stateDir, options) {
  const { gatewayBin, jwtSecret, serviceKey, name, replicaArgs = "", extraPorts = 0, env: moreEnv = () => ({}) } = options;
  // A port found free can be taken before the topology binds it: then try other ports.
  for (let attempt = 1; ; attempt += 1) {
    const [redis, lbPort, p1, p2, p3, a1, a2, a3, ...extra] = await distinctFreePorts(8 + extraPorts);
    const env = {
      ...envWithoutGatewayVariables(),
      GATEWAY_BIN: gatewayBin,
      STATE_DIR: stateDir,
      REDIS_PORT: String(redis),
      LB_PORT: String(lbPort),
      REPLICA_PORTS: `${p1} ${p2} ${p3}`,
      ADMIN_PORTS: `${a1} ${a2} ${a3}`,
      JWT_SECRET: jwtSecret,
      SERVICE_KEY: serviceKey,
      CONNECTION_TOKEN_SECRET: `${name}-connection-token-secret-${randomUUID()}`,
      READY_TIMEOUT: "30",
      REPLICA_ARGS: replicaArgs,
      ...moreEnv(extra),
    };
    // Whatever up starts is stopped if this process is interrupted or exits first (up itself
    // stops what it started when it fails).
    const forgetDown = downOnExit(env);
    try {
      await runScript("up", env, 60_000);
    } catch (error) {
      forgetDown();
      if (attempt === 3 || !/already in use|Address in use|AddrInUse/i.test(error.message)) throw error;
      continue;
    }
    const urls = (port) => ({ hubUrl: `http://127.0.0.1:${port}/hub/v1`, eventsUrl: `http://127.0.0.1:${port}/api/v1/events` });
    return {
      env,
      stateDir,
      redisPort: redis,
      redisUrl: `redis://127.0.0.1:${redis}`,
      lb: { port: lbPort, ...urls(lbPort) },
      replicas: [
        [p1, a1],
        [p2, a2],
        [p3, a3],
      ].map(([port, admin], i) => ({
        name: `gateway-${i + 1}`,
        port,
        ...urls(port),
        adminUrl: `http://127.0.0.1:${admin}`,
        pidFile: path.join(stateDir, "pids", `gateway-${i + 1}.pid`),
      })),
      redisPidFile: path.join(stateDir, "pids", "redis.pid"),
      extraPorts: extra,
      stop: () => runScript("down", env, 90_000).finally(forgetDown),
      /** The last lines of every log in the state directory, for failure messages. */
      logTails() {
        try {
          const logs = path.join(stateDir, "logs");
          return readdirSync(logs)
            .map((file) => `--- ${file}\n${readFileSync(path.join(logs, file), "utf8").split("\n").slice(-15).join("\n")}`)
            .join("\n");
        } catch {
          return "";
        }
      },
    };
  }
}

/** The PID a pid file of the topology holds. */
export const pidIn = (file) => Number(readFileSync(file, "utf8").trim());

/** A process started detached (own session) like deploy/local/up's launch, its PID recorded. */
export function launch(topology, name, argv, env) {
  const logFd = openSync(path.join(topology.stateDir, "logs", `${name}.log`), "a");
  const child = spawn(argv[0], argv.slice(1), { env, detached: true, stdio: ["ignore", logFd, logFd] });
  closeSync(logFd);
  child.unref();
  writeFileSync(path.join(topology.stateDir, "pids", `${name}.pid`), `${child.pid}\n`);
  return child.pid;
}

/**
 * Stops replica `i` (0-based) with `signal` (SIGKILL: a crash; SIGTERM: a graceful drain) and
 * waits until it has exited; returns { pid, argv, stopMs } to start it again.
 */
export async function killReplica(topology, i, signal = "SIGKILL", ms = 30_000) {
  const replica = topology.replicas[i];
  const pid = pidIn(replica.pidFile);
  const argv = readFileSync(`/proc/${pid}/cmdline`, "utf8").split("\0").filter(Boolean);
  const started = Date.now();
  process.kill(pid, signal);
  await exitOf(pid, ms);
  return { pid, argv, stopMs: Date.now() - started };
}

/** Starts replica `i` again with the command line it had, and waits for its /readyz. */
export async function restartReplica(topology, i, argv, ms = 20_000) {
  const pid = launch(topology, topology.replicas[i].name, argv, envWithoutGatewayVariables());
  const deadline = Date.now() + ms;
  for (;;) {
    try {
      const response = await fetch(`${topology.replicas[i].adminUrl}/readyz`, { signal: AbortSignal.timeout(1000) });
      await response.arrayBuffer();
      if (response.status === 200) return pid;
    } catch {
      // not yet
    }
    if (!alive(pid) || Date.now() > deadline) {
      const why = alive(pid) ? `not ready within ${ms} ms` : "exited";
      throw new Error(`${topology.replicas[i].name} did not come back (${why})\n${topology.logTails()}`);
    }
    await pause(50);
  }
}

/** A metric's value summed over its label sets, from a replica's /metrics (0 when absent). */
export async function metric(replica, name) {
  const response = await fetch(`${replica.adminUrl}/metrics`, { signal: AbortSignal.timeout(5000) });
  const text = await response.text();
  return text
    .split("\n")
    .filter((line) => line.split(/[{ ]/)[0] === name)
    .reduce((sum, line) => sum + Number(line.split(" ").at(-1)), 0);
}

/**
 * `error` with `topology`'s log tails added to its message, for a failing test to rethrow. An
 * error whose message cannot be written (the DOMException of a timed-out fetch) or a value that
 * is not an error is wrapped in a new Error that keeps it as its cause, instead of the append
 * throwing a TypeError that hides it.
 */
export function withLogTails(error, topology) {
  const tails = topology.logTails();
  if (error instanceof Error && Object.getOwnPropertyDescriptor(error, "message")?.writable) {
    error.message += `\n${tails}`;
    return error;
  }
  const what = error instanceof Object && "message" in error ? `${error.name}: ${error.message}` : String(error);
  return new Error(`${what}\n${tails}`, { cause: error });
}
