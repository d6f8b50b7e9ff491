// The deploy/local topology (redis-server, three gateway replicas, nginx) for the chaos tests,
// and the faults they inject: SIGKILL a replica and start it again, stop and start redis-server
// on the same port, and a steady publisher (loadgen publish-stream). The topology itself, and
// stopping and restarting a replica, are local-topology.mjs's (shared with the console's tests).

import { spawn } from "node:child_process";
import { mkdirSync, mkdtempSync, rmSync } from "node:fs";
import os from "node:os";
import path from "node:path";
import { after, before } from "node:test";

import { GATEWAY_BIN, JWT_SECRET, SERVICE_KEY, deferred, stopOnExit } from "../harness.mjs";
import { exitOf, launch, pidIn, startTopology as startLocalTopology } from "../local-topology.mjs";
import { redisReady } from "./redis.mjs";

export { killReplica, metric, restartReplica } from "../local-topology.mjs";

export const LOADGEN_BIN = path.resolve(path.dirname(GATEWAY_BIN), "loadgen");

/** Starts the topology with deploy/local/up on free ports in a fresh state directory. */
export function startTopology(stateDir, replicaArgs = "") {
  return startLocalTopology(stateDir, { gatewayBin: GATEWAY_BIN, jwtSecret: JWT_SECRET, serviceKey: SERVICE_KEY, name: "chaos", replicaArgs });
}

/**
 * The topology for every test of a file: started before the file's first test in a fresh state
 * directory (named after `name`), stopped after its last, the directory then removed unless
 * KEEP_CHAOS_STATE is set. Call it at the top level of the test file; the object it returns is
 * the topology once the tests run.
 */
export function topologyForFile(name, replicaArgs = "") {
  const topology = {};
  let stateDir;
  before(async () => {
    stateDir = mkdtempSync(path.join(os.tmpdir(), `realtime-${name}-`));
    Object.assign(topology, await startTopology(stateDir, replicaArgs));
  });
  after(async () => {
    if (topology.stop) await topology.stop();
    if (stateDir && !process.env.KEEP_CHAOS_STATE) rmSync(stateDir, { recursive: true, force: true });
  });
  return topology;
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
