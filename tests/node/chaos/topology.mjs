// The deploy/local topology (redis-server, three gateway replicas, nginx) for the chaos tests,
// and the faults they inject: SIGKILL a replica and start it again, stop and start redis-server
// on the same port, and a steady publisher (loadgen publish-stream).

import { execFile, spawn } from "node:child_process";
import { randomUUID } from "node:crypto";
import { closeSync, mkdirSync, openSync, readFileSync, readdirSync, writeFileSync } from "node:fs";
import path from "node:path";
import { fileURLToPath } from "node:url";

import { GATEWAY_BIN, JWT_SECRET, SERVICE_KEY, deferred, downOnExit, freePort, stopOnExit } from "../harness.mjs";
import { redisReady } from "./redis.mjs";

const here = path.dirname(fileURLToPath(import.meta.url));
const DEPLOY = path.resolve(here, "../../../deploy/local");
export const LOADGEN_BIN = path.resolve(path.dirname(GATEWAY_BIN), "loadgen");

function runScript(script, env, timeoutMs) {
  return new Promise((resolve, reject) => {
    execFile(path.join(DEPLOY, script), [], { env, timeout: timeoutMs }, (error, stdout, stderr) => {
      if (error) reject(new Error(`deploy/local/${script} failed: ${error.message}\n${stdout}\n${stderr}`));
      else resolve(stdout);
    });
  });
}

async function distinctFreePorts(count) {
  const ports = new Set();
  while (ports.size < count) ports.add(await freePort());
  return [...ports];
}

const pause = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

/** Is `pid` alive (not a zombie)? */
export function alive(pid) {
  try {
    process.kill(pid, 0);
    return !/\)\s+Z\s/.test(readFileSync(`/proc/${pid}/stat`, "utf8"));
  } catch {
    return false;
  }
}

/** Resolves when `pid` has exited (polled with a deadline). */
export async function exitOf(pid, ms) {
  const deadline = Date.now() + ms;
  while (alive(pid)) {
    if (Date.now() > deadline) throw new Error(`pid ${pid} still running after ${ms} ms`);
    await pause(20);
  }
}

/** Starts the topology with deploy/local/up on free ports in a fresh state directory. */
export async function startTopology(stateDir, replicaArgs = "") {
  for (let attempt = 1; ; attempt += 1) {
    const [redis, lbPort, p1, p2, p3, a1, a2, a3] = await distinctFreePorts(8);
    const env = {
      ...Object.fromEntries(Object.entries(process.env).filter(([key]) => !key.startsWith("GATEWAY_"))),
      GATEWAY_BIN,
      STATE_DIR: stateDir,
      REDIS_PORT: String(redis),
      LB_PORT: String(lbPort),
      REPLICA_PORTS: `${p1} ${p2} ${p3}`,
      ADMIN_PORTS: `${a1} ${a2} ${a3}`,
      JWT_SECRET,
      SERVICE_KEY,
      CONNECTION_TOKEN_SECRET: `chaos-connection-token-secret-${randomUUID()}`,
      READY_TIMEOUT: "30",
      REPLICA_ARGS: replicaArgs,
    };
    // Whatever up starts is stopped if this process is interrupted or exits first.
    const forgetDown = downOnExit(env);
    try {
      await runScript("up", env, 60_000);
    } catch (error) {
      forgetDown();
      if (attempt === 3 || !/already in use|Address in use|AddrInUse/i.test(error.message)) throw error;
      continue;
    }
    const topology = {
      env,
      stateDir,
      redisPort: redis,
      redisUrl: `redis://127.0.0.1:${redis}`,
      lb: { hubUrl: `http://127.0.0.1:${lbPort}/hub/v1` },
      replicas: [
        [p1, a1],
        [p2, a2],
        [p3, a3],
      ].map(([port, admin], i) => ({
        name: `gateway-${i + 1}`,
        hubUrl: `http://127.0.0.1:${port}/hub/v1`,
        adminUrl: `http://127.0.0.1:${admin}`,
        pidFile: path.join(stateDir, "pids", `gateway-${i + 1}.pid`),
      })),
      redisPidFile: path.join(stateDir, "pids", "redis.pid"),
      stop: () => runScript("down", env, 90_000).finally(forgetDown),
      logTails() {
        try {
          const logs = path.join(stateDir, "logs");
          return readdirSync(logs)
            .map((f) => `--- ${f}\n${readFileSync(path.join(logs, f), "utf8").split("\n").slice(-12).join("\n")}`)
            .join("\n");
        } catch {
          return "";
        }
      },
    };
    return topology;
  }
}

const pidIn = (file) => Number(readFileSync(file, "utf8").trim());

/** A process started detached (own session) like deploy/local/up's launch, its PID recorded. */
function launch(topology, name, argv, env) {
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
  const env = Object.fromEntries(Object.entries(process.env).filter(([key]) => !key.startsWith("GATEWAY_")));
  const pid = launch(topology, topology.replicas[i].name, argv, env);
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

/** deploy/local/up's redis-server command line (redis-server rewrites its /proc cmdline). */
function redisArgv(topology, extra) {
  return [
    process.env.REDIS_BIN ?? "redis-server",
    "--bind", "127.0.0.1",
    "--port", String(topology.redisPort),
    "--save", "",
    "--appendonly", "no",
    "--dir", path.join(topology.stateDir, "redis"),
    "--daemonize", "no",
    "--protected-mode", "yes",
    ...extra,
  ];
}

/**
 * Stops redis-server with `signal` (SIGTERM: a clean shutdown that syncs the AOF; SIGKILL: a
 * crash) and starts it again on the same port with `extra` arguments (later ones win).
 * Resolves with { downMs } once it answers PING again.
 */
export async function restartRedis(topology, { signal = "SIGTERM", extra = [] } = {}) {
  const pid = pidIn(topology.redisPidFile);
  const stoppedAt = Date.now();
  process.kill(pid, signal);
  await exitOf(pid, 15_000);
  for (const dirArg of extra.flatMap((arg, i) => (arg === "--dir" ? [extra[i + 1]] : []))) {
    mkdirSync(dirArg, { recursive: true });
  }
  launch(topology, "redis", redisArgv(topology, extra), process.env);
  await redisReady(topology.redisPort, 15_000);
  return { downMs: Date.now() - stoppedAt, signal, extra };
}

/** A metric's value summed over its label sets, from a replica's /metrics (0 when absent). */
export async function metric(replica, name) {
  const response = await fetch(`${replica.adminUrl}/metrics`, { signal: AbortSignal.timeout(5000) });
  const text = await response.text();
  return text
    .split("\n")
    .filter((line) => line.startsWith(name) && /^[a-z_]+(\{[^}]*\})? /.test(line) && line.split(/[{ ]/)[0] === name)
    .reduce((sum, line) => sum + Number(line.split(" ").at(-1)), 0);
}

/**
 * Runs `loadgen publish-stream`. Returns { reached(n), done, progress, kill }: reached(n) resolves
 * once n events are queued; done resolves with the summary (rejects if it fails or overruns).
 */
export function publishStream({ redisUrl, regions, rate, secs, extra = [] }) {
  const args = ["publish-stream", "--redis-url", redisUrl, "--groups", regions.join(","), "--rate", String(rate), "--secs", String(secs), ...extra];
  const child = spawn(LOADGEN_BIN, args, { stdio: ["ignore", "pipe", "pipe"] });
  const forget = stopOnExit(() => child.kill("SIGKILL"));
  child.once("exit", forget);
  let stdout = "";
  let stderrTail = "";
  let partial = "";
  const progress = { queued: 0 };
  const waiters = [];
  child.stdout.on("data", (chunk) => {
    stdout += chunk;
  });
  child.stderr.on("data", (chunk) => {
    partial += chunk;
    const lines = partial.split("\n");
    partial = lines.pop();
    for (const line of lines) {
      try {
        const parsed = JSON.parse(line);
        if (parsed.progress) Object.assign(progress, parsed.progress);
      } catch {
        stderrTail = `${stderrTail}\n${line}`.slice(-2000);
      }
    }
    for (const waiter of [...waiters]) {
      if (progress.queued >= waiter.n) {
        waiters.splice(waiters.indexOf(waiter), 1);
        waiter.resolve(progress.queued);
      }
    }
  });
  const limitMs = (secs + 90) * 1000;
  const done = new Promise((resolve, reject) => {
    const timer = setTimeout(() => {
      child.kill("SIGKILL");
      reject(new Error(`loadgen publish-stream still running after ${limitMs} ms`));
    }, limitMs);
    child.once("exit", (code, sig) => {
      clearTimeout(timer);
      for (const waiter of waiters) waiter.reject(new Error(`loadgen exited (${code ?? sig}) before ${waiter.n} events`));
      try {
        const summary = JSON.parse(stdout);
        if (code !== 0) reject(new Error(`loadgen publish-stream exited ${code ?? sig}: ${stdout}${stderrTail}`));
        else resolve(summary);
      } catch {
        reject(new Error(`loadgen publish-stream exited ${code ?? sig} without a summary:${stderrTail}`));
      }
    });
  });
  return {
    progress,
    done,
    reached(n) {
      if (progress.queued >= n) return Promise.resolve(progress.queued);
      const waiter = { n, ...deferred() };
      waiters.push(waiter);
      return waiter.promise;
    },
    kill: () => child.kill("SIGKILL"),
  };
}
