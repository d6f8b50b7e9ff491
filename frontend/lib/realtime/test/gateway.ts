// Starts the real gateway binary for integration tests, the way tests/node/harness.mjs does:
// free loopback ports, the in-process broker, an HS256 secret and a service key; readiness is
// awaited by polling /readyz with a deadline. Also mints tokens and publishes over HTTP.
//
// GATEWAY_BIN overrides the binary (default: target/debug/gateway at the repository root, built
// by `cargo build --workspace --bins`). Each gateway's output goes to dist-test/artifacts/.

import { spawn } from "node:child_process";
import type { ChildProcess } from "node:child_process";
import { createHmac, randomUUID } from "node:crypto";
import { closeSync, existsSync, mkdirSync, openSync, readFileSync } from "node:fs";
import net from "node:net";
import path from "node:path";
import { fileURLToPath } from "node:url";

import { recommendation } from "./fixtures.js";

const here = path.dirname(fileURLToPath(import.meta.url)); // frontend/lib/realtime/dist-test/test
const REPO = path.resolve(here, "../../../../..");
export const GATEWAY_BIN = path.resolve(REPO, process.env["GATEWAY_BIN"] ?? "target/debug/gateway");
export const JWT_SECRET = "realtime-lib-test-jwt-secret-0123456789abcdef0123456789";
export const SERVICE_KEY = "realtime-lib-test-service-key-0123456789";
const ARTIFACTS = path.resolve(here, "../artifacts");

/** Rejects with "timed out ... waiting for <what>" unless `promise` settles within `ms`. */
export function within<T>(ms: number, promise: Promise<T>, what: string): Promise<T> {
  let timer: NodeJS.Timeout | undefined;
  const deadline = new Promise<never>((_, reject) => {
    timer = setTimeout(() => reject(new Error(`timed out after ${ms} ms waiting for ${what}`)), ms);
  });
  return Promise.race([promise, deadline]).finally(() => clearTimeout(timer));
}

async function freePort(): Promise<number> {
  const server = net.createServer();
  await new Promise<void>((resolve, reject) => {
    server.once("error", reject);
    server.listen(0, "127.0.0.1", resolve);
  });
  const address = server.address();
  await new Promise((resolve) => server.close(resolve));
  if (address === null || typeof address === "string") throw new Error("no port");
  return address.port;
}

export interface Gateway {
  ports: { port: number; adminPort: number };
  hubUrl: string;
  eventsUrl: string;
  logFile: string;
  /** SIGTERM, then SIGKILL after 10 s; idempotent. */
  stop(): Promise<void>;
}

let counter = 0;

/** Starts the gateway (on `ports` when given, for a restart) and resolves once /readyz says 200. */
export async function startGateway(name: string, args: string[] = [], ports?: { port: number; adminPort: number }): Promise<Gateway> {
  if (!existsSync(GATEWAY_BIN)) {
    throw new Error(`no gateway binary at ${GATEWAY_BIN}: build it with \`cargo build --workspace --bins\` or set GATEWAY_BIN`);
  }
  const port = ports?.port ?? (await freePort());
  let adminPort = ports?.adminPort ?? (await freePort());
  for (let i = 0; adminPort === port && i < 10; i += 1) adminPort = await freePort();
  mkdirSync(ARTIFACTS, { recursive: true });
  counter += 1;
  const logFile = path.join(ARTIFACTS, `${name}-${counter}.log`);
  const fd = openSync(logFile, "w");
  const env = Object.fromEntries(Object.entries(process.env).filter(([key]) => !key.startsWith("GATEWAY_")));
  const argv = [
    "--listen", `127.0.0.1:${port}`,
    "--admin-listen", `127.0.0.1:${adminPort}`,
    "--jwt-secret", JWT_SECRET,
    "--service-key", SERVICE_KEY,
    "--allow-missing-origin",
    ...args,
  ];
  const child: ChildProcess = spawn(GATEWAY_BIN, argv, { env, stdio: ["ignore", fd, fd] });
  closeSync(fd);
  let exited = false;
  const exit = new Promise<void>((resolve) => {
    child.once("exit", () => {
      exited = true;
      resolve();
    });
    child.once("error", () => {
      exited = true;
      resolve();
    });
  });
  const stop = async (): Promise<void> => {
    if (exited) return;
    child.kill("SIGTERM");
    let timer: NodeJS.Timeout | undefined;
    const forced = new Promise<void>((resolve) => {
      timer = setTimeout(() => {
        child.kill("SIGKILL");
        resolve();
      }, 10_000);
    });
    await Promise.race([exit, forced]);
    clearTimeout(timer);
    await exit;
  };
  const deadline = Date.now() + 20_000;
  for (;;) {
    if (exited) throw new Error(`gateway exited before it was ready; see ${logFile}:\n${readFileSync(logFile, "utf8").slice(-2000)}`);
    try {
      const response = await fetch(`http://127.0.0.1:${adminPort}/readyz`, { signal: AbortSignal.timeout(1000) });
      await response.arrayBuffer();
      if (response.status === 200) break;
    } catch {
      // not listening yet
    }
    if (Date.now() > deadline) {
      await stop();
      throw new Error(`gateway not ready within 20 s; see ${logFile}`);
    }
    await new Promise((resolve) => setTimeout(resolve, 50)); // polling interval, not synchronisation
  }
  const base = `http://127.0.0.1:${port}`;
  return { ports: { port, adminPort }, hubUrl: `${base}/hub/v1`, eventsUrl: `${base}/api/v1/events`, logFile, stop };
}

/** An HS256 JWT over `claims`. */
export function mintJwt(claims: Record<string, unknown>): string {
  const encode = (value: unknown) => Buffer.from(JSON.stringify(value)).toString("base64url");
  const input = `${encode({ alg: "HS256", typ: "JWT" })}.${encode(claims)}`;
  return `${input}.${createHmac("sha256", JWT_SECRET).update(input).digest("base64url")}`;
}

/** A dispatcher token for `regions`, valid for `seconds`. */
export function dispatcherToken(sub: string, regions: string[], seconds = 600): string {
  return mintJwt({ sub, role: "dispatcher", regions, exp: Math.floor(Date.now() / 1000) + seconds });
}

/** A fresh RecommendationReady for `region`. */
export function freshRecommendation(region: string, extra: Record<string, unknown> = {}): Record<string, unknown> {
  return recommendation({ jobId: randomUUID(), requestId: randomUUID(), region, ...extra });
}

/** Publishes over HTTP with the service key; resolves with the 202 answer or throws. */
export async function publish(gateway: Gateway, event: Record<string, unknown>): Promise<{ positions: Array<{ group: string; epoch: string; seq: number }> }> {
  const response = await fetch(gateway.eventsUrl, {
    method: "POST",
    headers: { "content-type": "application/json", authorization: `Bearer ${SERVICE_KEY}` },
    body: JSON.stringify(event),
    signal: AbortSignal.timeout(10_000),
  });
  const text = await response.text();
  if (response.status !== 202) throw new Error(`publish answered ${response.status}: ${text}`);
  return JSON.parse(text) as { positions: Array<{ group: string; epoch: string; seq: number }> };
}
