// Starting the gateway binary on loopback ports and waiting for its /readyz with a deadline, and
// stopping it (SIGTERM, then SIGKILL after a grace period; SIGKILL if this process exits first).
// Used by harness.mjs and by the realtime library's integration tests
// (frontend/lib/realtime/test/gateway.ts); it imports nothing outside Node, so either can load it
// without the other's packages.

import { spawn } from "node:child_process";
import { closeSync, existsSync, openSync, readFileSync } from "node:fs";

import { distinctFreePorts, envWithoutGatewayVariables } from "./local-topology.mjs";
import { stopOnExit } from "./stop-on-exit.mjs";

/** Resolves after `ms`; used only as a polling interval, never as synchronisation. */
const pause = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

/**
 * Starts the gateway binary `bin` listening on 127.0.0.1 with `args` after its listen addresses,
 * its output written to `logFile`, and resolves once GET /readyz on its admin port answers 200.
 *
 * options.ports    { port, adminPort } to reuse (a restart); fresh free ports otherwise (and then,
 *                  should another process take one first, other ports: up to three attempts)
 * options.readyMs  deadline for readiness (default 20 s)
 *
 * Resolves with { port, adminPort, ports, baseUrl, adminUrl, hubUrl, eventsUrl, logFile, process,
 * exited, logTail(), stop(graceMs), kill() }; only the environment's GATEWAY_* variables are left
 * out, so what configures the gateway is `args`.
 */
export async function startGatewayProcess(options) {
  if (!existsSync(options.bin)) {
    throw new Error(`no gateway binary at ${options.bin}: build it with \`cargo build -p gateway\` or set GATEWAY_BIN`);
  }
  for (let attempt = 1; ; attempt += 1) {
    try {
      return await startOnce(options);
    } catch (error) {
      if (options.ports || attempt === 3 || !/address already in use|AddrInUse/i.test(error.message)) throw error;
    }
  }
}

async function startOnce({ bin, args, ports, logFile, readyMs = 20_000 }) {
  const [port, adminPort] = ports ? [ports.port, ports.adminPort] : await distinctFreePorts(2);
  const logFd = openSync(logFile, "w");
  const argv = ["--listen", `127.0.0.1:${port}`, "--admin-listen", `127.0.0.1:${adminPort}`, ...args];
  const child = spawn(bin, argv, { env: envWithoutGatewayVariables(), stdio: ["ignore", logFd, logFd] });
  closeSync(logFd);
  const forget = stopOnExit(() => child.kill("SIGKILL"));

  const exited = new Promise((resolve) => {
    child.once("exit", (code, signal) => resolve({ code, signal }));
    child.once("error", (error) => resolve({ code: null, signal: null, error }));
  });
  let exitInfo = null;
  exited.then((info) => {
    exitInfo = info;
    forget();
  });

  const baseUrl = `http://127.0.0.1:${port}`;
  const adminUrl = `http://127.0.0.1:${adminPort}`;
  const logTail = () => {
    try {
      return readFileSync(logFile, "utf8").split("\n").slice(-30).join("\n");
    } catch {
      return "";
    }
  };

  const gateway = {
    port,
    adminPort,
    ports: { port, adminPort },
    baseUrl,
    adminUrl,
    hubUrl: `${baseUrl}/hub/v1`,
    eventsUrl: `${baseUrl}/api/v1/events`,
    logFile,
    process: child,
    exited,
    logTail,
    /** SIGTERM, then SIGKILL if it has not exited within `graceMs`. Idempotent. */
    async stop(graceMs = 10_000) {
      if (exitInfo) return exitInfo;
      child.kill("SIGTERM");
      let timer;
      const forced = new Promise((resolve) => {
        timer = setTimeout(() => {
          child.kill("SIGKILL");
          resolve();
        }, graceMs);
      });
      await Promise.race([exited, forced]);
      clearTimeout(timer);
      return exited;
    },
    /** SIGKILL: a crash. */
    async kill() {
      if (exitInfo) return exitInfo;
      child.kill("SIGKILL");
      return exited;
    },
  };

  const deadline = Date.now() + readyMs;
  let lastProblem = "no answer yet";
  for (;;) {
    if (exitInfo) {
      throw new Error(
        `gateway exited before it was ready (${JSON.stringify(exitInfo)}); ` +
          `command: ${bin} ${argv.join(" ")}\n--- ${logFile} ---\n${logTail()}`,
      );
    }
    try {
      const response = await fetch(`${adminUrl}/readyz`, { signal: AbortSignal.timeout(1000) });
      await response.arrayBuffer();
      if (response.status === 200) return gateway;
      lastProblem = `/readyz answered ${response.status}`;
    } catch (error) {
      lastProblem = String(error?.cause?.code ?? error);
    }
    if (Date.now() > deadline) {
      await gateway.stop(2000);
      throw new Error(`gateway not ready within ${readyMs} ms (${lastProblem})\n--- ${logFile} ---\n${logTail()}`);
    }
    await pause(50);
  }
}
