// Starts the real gateway binary for integration tests with tests/node/gateway-process.mjs, the
// module tests/node/harness.mjs starts its gateways with: free loopback ports, the in-process
// broker, an HS256 secret and a service key; readiness is awaited by polling /readyz with a
// deadline. Also mints tokens, publishes over HTTP, reads /metrics and puts a TCP proxy
// (tests/node/tcp-proxy.mjs) in front of a gateway.
//
// GATEWAY_BIN overrides the binary (default: target/debug/gateway at the repository root, built
// by `cargo build --workspace --bins`). Each gateway's output goes to dist-test/artifacts/.

import { createHmac, randomUUID } from "node:crypto";
import { mkdirSync } from "node:fs";
import path from "node:path";
import { fileURLToPath, pathToFileURL } from "node:url";

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

interface Ports {
  port: number;
  adminPort: number;
}

export interface Gateway {
  ports: Ports;
  hubUrl: string;
  eventsUrl: string;
  logFile: string;
  /** SIGTERM, then SIGKILL after 10 s; idempotent. */
  stop(): Promise<void>;
}

/** tests/node/gateway-process.mjs (plain JavaScript, loaded by path: it is outside this package). */
interface GatewayProcessModule {
  startGatewayProcess(options: { bin: string; args: string[]; logFile: string; ports?: Ports | undefined }): Promise<{
    ports: Ports;
    hubUrl: string;
    eventsUrl: string;
    logFile: string;
    stop(): Promise<unknown>;
  }>;
}
const { startGatewayProcess } = (await import(pathToFileURL(path.join(REPO, "tests/node/gateway-process.mjs")).href)) as GatewayProcessModule;

let counter = 0;

/** Starts the gateway (on `ports` when given, for a restart) and resolves once /readyz says 200. */
export async function startGateway(name: string, args: string[] = [], ports?: Ports): Promise<Gateway> {
  mkdirSync(ARTIFACTS, { recursive: true });
  counter += 1;
  const gateway = await startGatewayProcess({
    bin: GATEWAY_BIN,
    args: ["--jwt-secret", JWT_SECRET, "--service-key", SERVICE_KEY, "--allow-missing-origin", ...args],
    logFile: path.join(ARTIFACTS, `${name}-${counter}.log`),
    ports,
  });
  return {
    ports: gateway.ports,
    hubUrl: gateway.hubUrl,
    eventsUrl: gateway.eventsUrl,
    logFile: gateway.logFile,
    stop: async () => {
      await gateway.stop();
    },
  };
}

/**
 * A metric's value from the gateway's admin /metrics, summed over the label sets that carry
 * every one of `labels` (e.g. `{ outcome: "expired" }`).
 */
export async function metric(gateway: Gateway, name: string, labels: Record<string, string> = {}): Promise<number> {
  const response = await fetch(`http://127.0.0.1:${gateway.ports.adminPort}/metrics`, { signal: AbortSignal.timeout(5000) });
  const text = await response.text();
  const wanted = Object.entries(labels).map(([key, value]) => `${key}="${value}"`);
  return text
    .split("\n")
    .filter((line) => line.split(/[{ ]/)[0] === name && wanted.every((label) => line.includes(label)))
    .reduce((sum, line) => sum + Number(line.split(" ").at(-1)), 0);
}

/** tests/node/tcp-proxy.mjs, loaded by path like gateway-process.mjs (the subset these tests use). */
export interface TcpProxy {
  hubUrl: string;
  /** The request lines of the next `count` connections through the proxy. */
  nextRequests(count: number, ms?: number): Promise<string[]>;
  /** Ends every connection and holds new ones until heal(). */
  partition(): void;
  heal(): void;
  /** Ends every connection and refuses new ones until start(). */
  stop(): Promise<void>;
  start(): Promise<void>;
  close(): Promise<void>;
}
const { startTcpProxy } = (await import(pathToFileURL(path.join(REPO, "tests/node/tcp-proxy.mjs")).href)) as {
  startTcpProxy(upstreamPort: number): Promise<TcpProxy>;
};

/** A proxy in front of `gateway`'s public port. */
export function proxyTo(gateway: Gateway): Promise<TcpProxy> {
  return startTcpProxy(gateway.ports.port);
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
