// An interrupted test run leaves nothing running. Starts `tests/run node` with only the chaos
// tests (NODE_TESTS), in a process group of its own and a temporary folder of its own (TMPDIR),
// waits until the chaos topology is up (redis-server, three gateways and nginx among the run's
// processes), interrupts it the way a person or a CI timeout does, and checks that once
// tests/run has exited, none of the processes seen during the run is left and no process names
// the run's folder.
//
//   Ctrl-C:   SIGINT to the whole process group, as the terminal sends it;
//   timeout:  SIGTERM to tests/run alone, as `kill` or a supervisor sends it.
//
// A process is the run's if it descends from tests/run, is recorded in a pids/*.pid file under the
// run's folder, or names that folder in its environment (REALTIME_TEST_RUN, TMPDIR) or command
// line. Processes are observed by polling /proc, not by sleeping: the deadlines below only turn
// a hang into a failure.

import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import { mkdtempSync, openSync, closeSync, readFileSync, readdirSync, rmSync } from "node:fs";
import os from "node:os";
import path from "node:path";
import { test } from "node:test";
import { fileURLToPath } from "node:url";

import { ARTIFACTS, stopOnExit } from "./harness.mjs";

const here = path.dirname(fileURLToPath(import.meta.url));
const TESTS_RUN = path.resolve(here, "../run");
const TOPOLOGY_UP_MS = 300_000;
const EXIT_MS = 120_000;

const pause = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

function read(file) {
  try {
    return readFileSync(file);
  } catch {
    return null;
  }
}

/** Every live process: { pid, ppid, start, state, comm, cmdline, environ }. */
function processes() {
  const list = [];
  for (const name of readdirSync("/proc")) {
    if (!/^\d+$/.test(name)) continue;
    const stat = read(`/proc/${name}/stat`)?.toString();
    if (!stat) continue;
    const fields = stat.slice(stat.lastIndexOf(")") + 2).split(" ");
    if (fields[0] === "Z") continue;
    list.push({
      pid: Number(name),
      state: fields[0],
      ppid: Number(fields[1]),
      start: fields[19],
      comm: (read(`/proc/${name}/comm`)?.toString() ?? "").trim(),
      cmdline: (read(`/proc/${name}/cmdline`)?.toString() ?? "").replaceAll("\0", " "),
      environ: read(`/proc/${name}/environ`)?.toString() ?? "",
    });
  }
  return list;
}

/** PIDs in pids/*.pid files anywhere under `dir`. */
function recordedPids(dir) {
  const pids = new Set();
  const walk = (at) => {
    let entries;
    try {
      entries = readdirSync(at, { withFileTypes: true });
    } catch {
      return;
    }
    for (const entry of entries) {
      const full = path.join(at, entry.name);
      if (entry.isDirectory()) walk(full);
      else if (entry.name.endsWith(".pid") && path.basename(at) === "pids") {
        const pid = Number(read(full)?.toString().trim());
        if (pid > 0) pids.add(pid);
      }
    }
  };
  walk(dir);
  return pids;
}

/** The processes of the run started as `runner` with its temporary folder `dir`. */
function runProcesses(runner, dir) {
  const all = processes();
  const recorded = recordedPids(dir);
  const members = new Map();
  for (const p of all) {
    if (p.pid === process.pid) continue;
    if (p.pid === runner || recorded.has(p.pid) || p.cmdline.includes(dir) || p.environ.includes(`=${dir}`)) members.set(p.pid, p);
  }
  for (let grew = true; grew; ) {
    grew = false;
    for (const p of all) {
      if (!members.has(p.pid) && members.has(p.ppid)) {
        members.set(p.pid, p);
        grew = true;
      }
    }
  }
  return [...members.values()];
}

const describe = (list) => list.map((p) => `  ${p.pid} ${p.comm}: ${p.cmdline.slice(0, 140)}`).join("\n");

/** Is the process seen as `seen` (same PID and start time) still alive? */
function stillThere(seen) {
  const stat = read(`/proc/${seen.pid}/stat`)?.toString();
  if (!stat) return false;
  const fields = stat.slice(stat.lastIndexOf(")") + 2).split(" ");
  return fields[0] !== "Z" && fields[19] === seen.start;
}

async function interrupted(t, how) {
  const dir = mkdtempSync(path.join(os.tmpdir(), `interrupt-${how}-`));
  const logFile = path.join(ARTIFACTS, `interrupt-${how}.log`);
  const logFd = openSync(logFile, "w");
  // The binaries and node_modules this test runs with stay as they are (no build, no `npm ci`
  // under a running suite); NODE_TEST_CONTEXT would make the nested `node --test` skip its files.
  const { NODE_TEST_CONTEXT, ...outer } = process.env;
  const env = { ...outer, TMPDIR: dir, NODE_TESTS: "chaos.test.mjs", NODE_DEPS_INSTALLED: "1", SKIP_BUILD: "1" };
  // Its own process group (and session), like a command typed at a terminal.
  const child = spawn(TESTS_RUN, ["node"], { env, detached: true, stdio: ["ignore", logFd, logFd] });
  closeSync(logFd);
  const exited = new Promise((resolve) => child.once("exit", (code, signal) => resolve({ code, signal })));
  // If this test is itself interrupted, tests/run is told to stop (and stops what it started).
  const forget = stopOnExit(() => child.kill("SIGTERM"));
  t.after(async () => {
    if (child.exitCode === null && child.signalCode === null) {
      child.kill("SIGTERM");
      await exited;
    }
    forget();
    rmSync(dir, { recursive: true, force: true });
  });
  const logTail = () => (read(logFile)?.toString() ?? "").split("\n").slice(-40).join("\n");

  // Every process of the run seen until the signal is sent, by PID and start time.
  const seen = new Map();
  const deadline = Date.now() + TOPOLOGY_UP_MS;
  for (;;) {
    const now = runProcesses(child.pid, dir);
    for (const p of now) seen.set(`${p.pid}/${p.start}`, p);
    const count = (comm) => now.filter((p) => p.comm === comm).length;
    if (count("redis-server") >= 1 && count("nginx") >= 1 && count("gateway") >= 3) break;
    if (child.exitCode !== null || child.signalCode !== null) {
      assert.fail(`tests/run exited before the chaos topology was up:\n${logTail()}`);
    }
    if (Date.now() > deadline) assert.fail(`no chaos topology within ${TOPOLOGY_UP_MS} ms; seen:\n${describe(now)}\n${logTail()}`);
    await pause(100);
  }

  if (how === "sigint") process.kill(-child.pid, "SIGINT");
  else process.kill(child.pid, "SIGTERM");

  let timer;
  const result = await Promise.race([
    exited,
    new Promise((resolve) => {
      timer = setTimeout(() => resolve(null), EXIT_MS);
    }),
  ]);
  clearTimeout(timer);
  assert.ok(result, `tests/run still running ${EXIT_MS} ms after ${how}:\n${logTail()}`);
  assert.deepStrictEqual(result, { code: how === "sigint" ? 130 : 143, signal: null }, `how tests/run ended:\n${logTail()}`);

  const left = [...seen.values()].filter(stillThere);
  assert.deepStrictEqual(left.map((p) => p.pid), [], `processes of the run still there:\n${describe(left)}\n${logTail()}`);
  const naming = processes().filter((p) => p.pid !== process.pid && (p.cmdline.includes(dir) || p.environ.includes(`=${dir}`)));
  assert.deepStrictEqual(naming.map((p) => p.pid), [], `processes naming ${dir}:\n${describe(naming)}`);
  assert.deepStrictEqual(
    readdirSync(dir).filter((name) => name.startsWith("realtime-tests.")),
    [],
    "tests/run removes its temporary folder",
  );
  const names = [...seen.values()].map((p) => p.comm);
  t.diagnostic(`${how}: ${seen.size} processes seen (${["redis-server", "nginx", "gateway", "node", "loadgen"].map((c) => `${names.filter((n) => n === c).length} ${c}`).join(", ")}), none left`);
}

test("Ctrl-C (SIGINT to the process group) during the chaos tests leaves no process of the run", { timeout: 600_000 }, async (t) => {
  await interrupted(t, "sigint");
});

test("SIGTERM to tests/run alone during the chaos tests leaves no process of the run", { timeout: 600_000 }, async (t) => {
  await interrupted(t, "sigterm");
});
