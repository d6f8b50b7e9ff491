// Test harness for driving the gateway with the official @microsoft/signalr client.
//
// It starts the real gateway binary on free loopback ports, waits for its admin /readyz with a
// deadline, mints HS256 tokens with node:crypto, publishes events over the HTTP API, and offers
// event-driven helpers (`within`, `inbox`) so no test synchronises by sleeping.
//
// Environment:
//   GATEWAY_BIN       path of the gateway binary; relative paths are resolved against this
//                     directory (default: ../../target/debug/gateway)
//   E2E_CLIENT_LOG    SignalR client log level to print (Trace, Debug, Information, Warning, ...)
// Each gateway's stdout/stderr goes to artifacts/<name>-<n>.log next to this file.

import assert from "node:assert/strict";
import { createHmac, randomUUID } from "node:crypto";
import { mkdirSync } from "node:fs";
import http from "node:http";
import path from "node:path";
import { after, before } from "node:test";
import { fileURLToPath } from "node:url";

import { HttpTransportType, HubConnectionBuilder, LogLevel } from "@microsoft/signalr";
import { startGatewayProcess } from "./gateway-process.mjs";
import { stopOnExit } from "./stop-on-exit.mjs";

const here = path.dirname(fileURLToPath(import.meta.url));

export const GATEWAY_BIN = path.resolve(here, process.env.GATEWAY_BIN ?? "../../target/debug/gateway");
export const JWT_SECRET = "node-e2e-jwt-secret-that-is-long-enough-for-hs512-0123456789";
export const SERVICE_KEY = "node-e2e-service-key-0123456789abcdef";
export const ARTIFACTS = path.join(here, "artifacts");

// ---------------------------------------------------------------------------------------------
// Deadlines

/**
 * Resolves or rejects like `promise`, but rejects with "timed out after <ms> ms waiting for <what>"
 * if it has not settled within `ms`.
 */
export function within(ms, promise, what) {
  let timer;
  const deadline = new Promise((_, reject) => {
    timer = setTimeout(() => reject(new Error(`timed out after ${ms} ms waiting for ${what}`)), ms);
  });
  return Promise.race([Promise.resolve(promise), deadline]).finally(() => clearTimeout(timer));
}

/** A promise plus its resolve/reject functions. */
export function deferred() {
  let resolve;
  let reject;
  const promise = new Promise((res, rej) => {
    resolve = res;
    reject = rej;
  });
  return { promise, resolve, reject };
}

/**
 * A list that grows as things arrive (`add`), and `take(count, ms)`, which resolves with its first
 * `count` items once they are there; `what(count)` names them in the timeout's message.
 */
function arrivalList(what) {
  const received = [];
  const waiters = [];
  return {
    received,
    add(item) {
      received.push(item);
      for (const waiter of [...waiters]) {
        if (received.length >= waiter.count) {
          waiters.splice(waiters.indexOf(waiter), 1);
          waiter.resolve(received.slice(0, waiter.count));
        }
      }
    },
    take(count, ms = 5000) {
      if (received.length >= count) return Promise.resolve(received.slice(0, count));
      const waiter = { count, ...deferred() };
      waiters.push(waiter);
      return within(ms, waiter.promise, what(count));
    },
  };
}

// ---------------------------------------------------------------------------------------------
// Stopping what a test file started, however it ends: `stopOnExit` (stop-on-exit.mjs, shared
// with the console's browser tests; a deploy/local topology's is `downOnExit` in
// local-topology.mjs).

export { stopOnExit };

// ---------------------------------------------------------------------------------------------
// Gateways (the process itself: gateway-process.mjs, shared with the realtime library's tests)

let gatewayCounter = 0;

/**
 * Starts the gateway binary and resolves once GET /readyz on its admin port answers 200.
 *
 * options.args      extra command-line arguments (e.g. ["--client-timeout", "3s"])
 * options.ports     { port, adminPort } to reuse (a restart); fresh free ports otherwise
 * options.name      label for the log file
 * options.readyMs   deadline for readiness (default 20 s)
 * options.allowMissingOrigin  pass --allow-missing-origin (default true: Node clients send no Origin)
 */
export async function startGateway(options = {}) {
  const { args = [], name = "gateway", readyMs = 20_000, allowMissingOrigin = true } = options;
  mkdirSync(ARTIFACTS, { recursive: true });
  gatewayCounter += 1;
  const logFile = path.join(ARTIFACTS, `${name.replace(/[^A-Za-z0-9_.-]+/g, "_").slice(0, 80)}-${gatewayCounter}.log`);
  const gateway = await startGatewayProcess({
    bin: GATEWAY_BIN,
    ports: options.ports,
    logFile,
    readyMs,
    args: [
      "--jwt-secret", JWT_SECRET,
      "--service-key", SERVICE_KEY,
      // One runtime thread, as a replica pinned to one core runs: it is the mode in which fan-out
      // writes frames straight to idle sockets, so the official client exercises that path (the
      // Rust system tests run multi-threaded and exercise the queued path).
      "--worker-threads", "1",
      ...(allowMissingOrigin ? ["--allow-missing-origin"] : []),
      ...args,
    ],
  });
  return { ...gateway, args };
}

/**
 * One gateway for every test of a file: started before the file's first test, stopped after its
 * last. Call it at the top level of the test file; the object it returns is that gateway (its
 * URLs, `stop`, ...) once the tests run. `options` as for startGateway.
 */
export function gatewayForFile(options) {
  const gateway = {};
  before(async () => {
    Object.assign(gateway, await startGateway(options));
  });
  after(() => gateway.stop?.());
  return gateway;
}

/** Starts a gateway for one test and stops it when the test ends. */
export async function gatewayFor(t, options = {}) {
  const gateway = await startGateway({ name: t.name, ...options });
  t.after(() => gateway.stop());
  return gateway;
}

// ---------------------------------------------------------------------------------------------
// Tokens

const HMAC = { HS256: "sha256", HS384: "sha384", HS512: "sha512" };

/**
 * A compact JWS over `claims`. `alg` is HS256 (default), HS384, HS512 or "none" (no signature);
 * `header` adds or overrides header fields.
 */
export function mintJwt(claims, { secret = JWT_SECRET, alg = "HS256", header = {} } = {}) {
  const encode = (value) => Buffer.from(JSON.stringify(value)).toString("base64url");
  const signingInput = `${encode({ alg, typ: "JWT", ...header })}.${encode(claims)}`;
  if (alg === "none") return `${signingInput}.`;
  const hash = HMAC[alg];
  if (!hash) throw new Error(`mintJwt cannot sign with ${alg}`);
  const signature = createHmac(hash, secret).update(signingInput).digest("base64url");
  return `${signingInput}.${signature}`;
}

/** A JWT time (`exp`): `seconds` from now, in whole seconds since the epoch. */
export const secondsFromNow = (seconds) => Math.floor(Date.now() / 1000) + seconds;

/** Claims of a dispatcher allowed in `regions`, valid for ten minutes. */
export function dispatcherClaims(regions, extra = {}) {
  return { sub: `dispatcher-${randomUUID()}`, role: "dispatcher", regions, exp: secondsFromNow(600), ...extra };
}

/** Claims of a contractor, valid for ten minutes. */
export function contractorClaims(contractorId, extra = {}) {
  return { sub: `contractor-${randomUUID()}`, role: "contractor", contractorId, exp: secondsFromNow(600), ...extra };
}

export const dispatcherToken = (regions, extra, options) => mintJwt(dispatcherClaims(regions, extra), options);
export const contractorToken = (contractorId, extra, options) => mintJwt(contractorClaims(contractorId, extra), options);

/**
 * An accessTokenFactory (`factory`) for one dispatcher of `region`, the same user throughout
 * (negotiate's connection token is bound to the subject): its tokens expire `seconds` after they
 * are minted, so the gateway closes the connection, until `expired()` is called (in
 * onreconnecting); from then on they are valid for ten minutes, handed out once `gate` resolved.
 */
export function expiringTokens(region, seconds, gate = Promise.resolve()) {
  const sub = `dispatcher-${randomUUID()}`;
  let expired = false;
  return {
    expired() {
      expired = true;
    },
    async factory() {
      if (!expired) return dispatcherToken([region], { sub, exp: secondsFromNow(seconds) });
      await gate;
      return dispatcherToken([region], { sub });
    },
  };
}

// ---------------------------------------------------------------------------------------------
// Events and publishing

/** A region name no other test uses, so tests sharing a gateway never see each other's events. */
export function uniqueRegion(prefix = "region") {
  return `${prefix}-${randomUUID().slice(0, 8)}`;
}

export function recommendationReady(region, extra = {}) {
  return {
    type: "RecommendationReady",
    jobId: randomUUID(),
    requestId: randomUUID(),
    region,
    configVersion: 1,
    generatedAt: "2025-11-08T12:34:56Z",
    ...extra,
  };
}

export function jobAssigned(region, contractorId, extra = {}) {
  return {
    type: "JobAssigned",
    jobId: randomUUID(),
    contractorId,
    assignmentId: randomUUID(),
    startUtc: "2025-11-08T15:00:00Z",
    endUtc: "2025-11-08T17:00:00Z",
    region,
    source: "manual",
    auditId: randomUUID(),
    ...extra,
  };
}

/**
 * POST /api/v1/events. `body` is JSON-encoded unless it is already a string.
 * Resolves with { status, headers, text, json } (json is undefined when the body is not JSON).
 */
export async function publish(gateway, body, { key = SERVICE_KEY, headers = {} } = {}) {
  const response = await fetch(gateway.eventsUrl, {
    method: "POST",
    headers: {
      "content-type": "application/json",
      ...(key === null ? {} : { authorization: `Bearer ${key}` }),
      ...headers,
    },
    body: typeof body === "string" ? body : JSON.stringify(body),
    signal: AbortSignal.timeout(10_000),
  });
  return readResponse(response);
}

/**
 * Publishes and fails unless the gateway answers 202 with a fresh (not duplicate) publication:
 * `{"type","groups","positions":[{group,epoch,seq}, one per group in order],"duplicate":false}`.
 * Publishing is idempotent (the key is the event's requestId/assignmentId unless `options.headers`
 * carries an Idempotency-Key), so every call must publish a distinct event or pass a distinct key.
 * `options` is passed to `publish`.
 */
export async function publishAccepted(gateway, event, options = {}) {
  const result = await publish(gateway, event, options);
  if (result.status !== 202) {
    throw new Error(`publishing ${event.type} was answered ${result.status} ${result.text}, expected 202`);
  }
  assertPublishAnswer(result.json, event.type, { duplicate: false });
  return result;
}

// ---------------------------------------------------------------------------------------------
// Positions (docs/events.md "On the wire", "4. Join groups")

/** An epoch: 32 lowercase hex characters (a UUID v4 in simple form). */
export const EPOCH = /^[0-9a-f]{32}$/;

/** The group an event for a dispatch region or a contractor id is routed to. */
export const dispatchGroup = (region) => `/dispatch/${region}`;
export const contractorGroup = (contractorId) => `/contractor/${contractorId.toLowerCase()}`;

/** Asserts `position` is exactly `{group, epoch, seq}` of `group` (seq an integer >= min). */
export function assertPosition(position, group, min = 0) {
  assert.deepStrictEqual(Object.keys(position ?? {}).sort(), ["epoch", "group", "seq"], `a position, got ${JSON.stringify(position)}`);
  assert.equal(position.group, group, `position of another group: ${JSON.stringify(position)}`);
  assert.match(position.epoch, EPOCH, `epoch of ${JSON.stringify(position)}`);
  assert.ok(Number.isSafeInteger(position.seq) && position.seq >= min, `seq of ${JSON.stringify(position)}`);
  return position;
}

/**
 * Asserts `result` is a join result for `group`: exactly `{group, epoch, seq}`, plus `recovered`
 * when `options.recovered` is given (true/false), and resolves with it.
 * `options.seq` / `options.epoch` pin the head when the test knows it.
 */
export function assertJoinResult(result, group, options = {}) {
  const { recovered, seq, epoch } = options;
  const keys = ["epoch", "group", "seq", ...(recovered === undefined ? [] : ["recovered"])].sort();
  assert.deepStrictEqual(Object.keys(result ?? {}).sort(), keys, `join result of ${group}: ${JSON.stringify(result)}`);
  const { recovered: got, ...position } = result;
  assertPosition(position, group);
  if (recovered !== undefined) assert.equal(got, recovered, `recovered of ${JSON.stringify(result)}`);
  if (seq !== undefined) assert.equal(result.seq, seq, `head seq of ${JSON.stringify(result)}`);
  if (epoch !== undefined) assert.equal(result.epoch, epoch, `epoch of ${JSON.stringify(result)}`);
  return result;
}

/** Invokes a join method and asserts its result (see assertJoinResult); resolves with the result. */
export async function join(connection, method, name, options = {}) {
  const { position, ...expected } = options;
  const args = position === undefined ? [name] : [name, position];
  const result = await connection.invoke(method, ...args);
  const group = method === "JoinDispatchGroup" ? dispatchGroup(name) : contractorGroup(name);
  return assertJoinResult(result, group, expected);
}

/**
 * Proves `connection` works: joins it to the dispatch group of `region` (a new group: head seq 0),
 * publishes one RecommendationReady (with `extra` fields) to `gateway`, and asserts the connection
 * receives it as published, at seq 1 of the group's epoch. Resolves with the join result.
 */
export async function assertJoinsAndReceives(gateway, connection, region, extra = {}) {
  const recommendations = inbox(connection, "RecommendationReady");
  const joined = await join(connection, "JoinDispatchGroup", region, { seq: 0 });
  await assertReceivesPublished(gateway, recommendations, region, { epoch: joined.epoch, extra });
  return joined;
}

/**
 * Publishes one RecommendationReady for `region` (with `extra` fields) to `gateway` and asserts
 * it is the `nth` invocation (default 1) that `recommendations` (an inbox) receives, as published,
 * at position { epoch, seq } (seq default 1) of the region's dispatch group. Resolves with the event.
 */
export async function assertReceivesPublished(gateway, recommendations, region, { nth = 1, epoch, seq = 1, extra = {} }) {
  const event = recommendationReady(region, extra);
  await publishAccepted(gateway, event);
  assert.deepStrictEqual(await recommendations.nth(nth), [event, { group: dispatchGroup(region), epoch, seq }]);
  return event;
}

/**
 * Asserts the JSON answer to a 202 publish: `{type, groups, positions, duplicate}` with one
 * well-formed position per group, in the same order.
 */
export function assertPublishAnswer(json, type, { duplicate } = {}) {
  assert.deepStrictEqual(Object.keys(json ?? {}).sort(), ["duplicate", "groups", "positions", "type"], `publish answer ${JSON.stringify(json)}`);
  assert.equal(json.type, type);
  assert.ok(Array.isArray(json.groups) && json.groups.length > 0, `groups of ${JSON.stringify(json)}`);
  assert.equal(json.positions.length, json.groups.length, `one position per group: ${JSON.stringify(json)}`);
  json.positions.forEach((position, i) => assertPosition(position, json.groups[i], 1));
  if (duplicate !== undefined) assert.equal(json.duplicate, duplicate, `duplicate of ${JSON.stringify(json)}`);
  return json;
}

/** The position a publish answer (a `publish`/`publishAccepted` result or its json) gave in `group`. */
export function positionIn(published, group) {
  const json = published?.json ?? published;
  const position = json?.positions?.find((candidate) => candidate.group === group);
  assert.ok(position, `the publish answer has no position in ${group}: ${JSON.stringify(json)}`);
  return position;
}

/**
 * The arguments a handler receives for an event published with answer `published` and delivered
 * through `group`: the event untouched, then its position.
 */
export const delivered = (event, published, group) => [event, positionIn(published, group)];

export async function readResponse(response) {
  const text = await response.text();
  let json;
  try {
    json = JSON.parse(text);
  } catch {
    json = undefined;
  }
  return { status: response.status, headers: response.headers, text, json };
}

/** POST <hub>/negotiate?negotiateVersion=1 as the client sends it, with an optional bearer token. */
export async function negotiate(gateway, token, headers = {}) {
  const response = await fetch(`${gateway.hubUrl}/negotiate?negotiateVersion=1`, {
    method: "POST",
    headers: {
      "x-requested-with": "XMLHttpRequest",
      ...(token === undefined ? {} : { authorization: `Bearer ${token}` }),
      ...headers,
    },
    signal: AbortSignal.timeout(10_000),
  });
  return readResponse(response);
}

/**
 * Sends a raw WebSocket upgrade request to `url` (http://...) with `headers`, answered within 10 s:
 * `onUpgrade(response, socket, head)` gets a 101, `onResponse(response)` any other answer, and
 * `reject` an error.
 */
function sendUpgrade(url, headers, { onUpgrade, onResponse, reject }) {
  const request = http.request(url, {
    method: "GET",
    agent: false, // a connection of its own: never reuse one from (or leave one to) the pool
    headers: {
      connection: "Upgrade",
      upgrade: "websocket",
      "sec-websocket-version": "13",
      "sec-websocket-key": Buffer.from(randomUUID().slice(0, 16)).toString("base64"),
      ...headers,
    },
    timeout: 10_000,
  });
  request.once("upgrade", (response, socket, head) => {
    request.setTimeout(0);
    onUpgrade(response, socket, head);
  });
  request.once("response", onResponse);
  request.once("timeout", () => request.destroy(new Error(`upgrade request to ${url} timed out`)));
  request.once("error", reject);
  request.end();
}

/**
 * A raw WebSocket upgrade request to `url` (http://...) with the given headers. Resolves with
 * { status, headers, body } — status 101 when the upgrade was accepted (the socket is then
 * closed), otherwise the refusal as the server sent it.
 */
export function rawUpgrade(url, headers = {}) {
  return new Promise((resolve, reject) => {
    sendUpgrade(url, headers, {
      onUpgrade(response, socket) {
        socket.destroy();
        resolve({ status: response.statusCode, headers: response.headers, body: "" });
      },
      onResponse(response) {
        let body = "";
        response.setEncoding("utf8");
        response.on("data", (chunk) => {
          body += chunk;
        });
        response.once("end", () => resolve({ status: response.statusCode, headers: response.headers, body }));
        response.once("error", reject);
      },
      reject,
    });
  });
}

/**
 * Opens a raw WebSocket to `url` (http://...) and keeps it: resolves with { socket, frames, closed,
 * take, sendText } once the server answered 101. `frames` lists the frames the server sent
 * ({ opcode, text, code, reason }), `take(n)` resolves with the first n of them once they arrived,
 * `closed` resolves when the TCP connection ends. `sendText(text)` sends one masked text frame.
 * Rejects if the upgrade is refused.
 */
export function rawWebSocket(url, headers = {}) {
  return new Promise((resolve, reject) => {
    sendUpgrade(url, headers, {
      onUpgrade(response, socket, head) {
        /** The first `count` frames, once they have arrived. */
        const { received: frames, add, take } = arrivalList((count) => `${count} WebSocket frame(s) (got ${JSON.stringify(frames)})`);
        const closed = new Promise((resolveClosed) => socket.once("close", () => resolveClosed(frames)));
        let buffer = head;
        const parse = () => {
          for (;;) {
            if (buffer.length < 2) return;
            const opcode = buffer[0] & 0x0f;
            let length = buffer[1] & 0x7f;
            let offset = 2;
            if (length === 126) {
              if (buffer.length < 4) return;
              length = buffer.readUInt16BE(2);
              offset = 4;
            } else if (length === 127) {
              if (buffer.length < 10) return;
              length = Number(buffer.readBigUInt64BE(2));
              offset = 10;
            }
            if (buffer.length < offset + length) return;
            const payload = buffer.subarray(offset, offset + length);
            buffer = buffer.subarray(offset + length);
            const frame = { opcode };
            if (opcode === 0x1) frame.text = payload.toString("utf8");
            if (opcode === 0x8 && payload.length >= 2) {
              frame.code = payload.readUInt16BE(0);
              frame.reason = payload.subarray(2).toString("utf8");
            }
            add(frame);
            if (opcode === 0x8 && !socket.destroyed) {
              // Complete the closing handshake (echo the status code), then end our side.
              socket.end(maskedFrame(0x88, payload.subarray(0, 2)));
            }
          }
        };
        parse();
        socket.on("data", (chunk) => {
          buffer = Buffer.concat([buffer, chunk]);
          parse();
        });
        socket.on("error", () => {});
        const sendText = (text) => socket.write(maskedFrame(0x81, Buffer.from(text, "utf8")));
        resolve({ status: response.statusCode, headers: response.headers, socket, frames, closed, take, sendText });
      },
      onResponse(response) {
        response.resume();
        reject(new Error(`WebSocket upgrade to ${url} refused with ${response.statusCode}`));
      },
      reject,
    });
  });
}

/** The record separator that ends every JSON hub protocol record. */
export const RS = "\x1e";

/** The JSON records of one server text frame, each terminated by the record separator. */
export function frameRecords(frame) {
  if (frame.opcode !== 0x1) throw new Error(`expected a text frame, got ${JSON.stringify(frame)}`);
  if (!frame.text.endsWith(RS)) throw new Error(`record not terminated by RS: ${JSON.stringify(frame.text)}`);
  return frame.text.split(RS).slice(0, -1).map((record) => JSON.parse(record));
}

/**
 * The first `count` records other than Pings in the frames a raw WebSocket (see rawWebSocket)
 * received from frame index `from` on, once they have arrived (each frame within 5 s).
 */
export async function recordsFrom(ws, from, count) {
  for (let frames = from + 1; ; frames += 1) {
    const got = (await ws.take(frames))
      .slice(from)
      .flatMap(frameRecords)
      .filter((record) => record.type !== 6);
    if (got.length >= count) return got.slice(0, count);
  }
}

/**
 * Sends the JSON handshake and a JoinDispatchGroup of `region` (invocation id "0") batched in one
 * frame on a raw hub WebSocket (see rawWebSocket) that has received nothing yet, and asserts both
 * answers: the handshake's, then the join's Completion, whose result is the group's position (a
 * new group: head seq 0). Resolves with the join result.
 */
export async function rawHandshakeAndJoin(ws, region) {
  ws.sendText(
    `{"protocol":"json","version":1}${RS}` +
      `{"target":"JoinDispatchGroup","arguments":["${region}"],"invocationId":"0","type":1}${RS}`,
  );
  const [handshake, completion] = await recordsFrom(ws, 0, 2);
  assert.deepStrictEqual(handshake, {});
  // The join's Completion carries its result, the group's position.
  assert.deepStrictEqual(completion, { type: 3, invocationId: "0", result: completion.result });
  return assertJoinResult(completion.result, dispatchGroup(region), { seq: 0 });
}

/** One client-to-server WebSocket frame (FIN set, masked as clients must). */
function maskedFrame(firstByte, payload) {
  const mask = Buffer.from([0x12, 0x34, 0x56, 0x78]);
  let header;
  if (payload.length < 126) {
    header = Buffer.from([firstByte, 0x80 | payload.length]);
  } else {
    header = Buffer.alloc(4);
    header[0] = firstByte;
    header[1] = 0x80 | 126;
    header.writeUInt16BE(payload.length, 2);
  }
  const masked = Buffer.from(payload.map((byte, i) => byte ^ mask[i % 4]));
  return Buffer.concat([header, mask, masked]);
}

// ---------------------------------------------------------------------------------------------
// SignalR client

/** The automatic reconnect delays of a client that must outlast a gateway restart (about 5 s). */
export const RETRY_DELAYS = [0, 200, 500, 1000, 1000, 1000, 1000, 1000];

class CapturingLogger {
  constructor() {
    this.lines = [];
    const level = process.env.E2E_CLIENT_LOG;
    this.printLevel = level && LogLevel[level] !== undefined ? LogLevel[level] : LogLevel.None;
  }

  log(level, message) {
    this.lines.push(`${LogLevel[level]}: ${message}`);
    if (level >= this.printLevel) console.error(`[signalr ${LogLevel[level]}] ${message}`);
  }
}

/**
 * An unstarted HubConnection to `gateway`, stopped when the test ends. `token` is a string or an
 * access token factory.
 *
 * options.skipNegotiation  connect the WebSocket directly (transport forced to WebSockets)
 * options.configure        (builder) => builder, for keep-alive, timeouts, reconnect policy
 * options.url              another hub URL (e.g. after a restart on the same ports it is the same,
 *                          or a proxy's in front of the gateway)
 * options.transport        the transport to ask for (an HttpTransportType), with negotiate
 */
export function hubConnection(t, gateway, token, options = {}) {
  const { skipNegotiation = false, configure = (builder) => builder } = options;
  const logger = new CapturingLogger();
  const httpOptions = { accessTokenFactory: typeof token === "function" ? token : () => token, logger };
  if (options.transport !== undefined) httpOptions.transport = options.transport;
  if (skipNegotiation) {
    httpOptions.skipNegotiation = true;
    httpOptions.transport = HttpTransportType.WebSockets;
  }
  const builder = new HubConnectionBuilder().withUrl(options.url ?? gateway.hubUrl, httpOptions).configureLogging(logger);
  const connection = configure(builder).build();
  connection.clientLog = logger.lines;
  t.after(() => connection.stop());
  return connection;
}

/** A started HubConnection; fails the test if start() does not resolve within 10 s. */
export async function connect(t, gateway, token, options = {}) {
  const connection = hubConnection(t, gateway, token, options);
  await within(10_000, connection.start(), "the SignalR connection to start");
  return connection;
}

/**
 * Records every invocation of `target` on `connection` (a list of argument arrays) and lets a
 * test await the first `count` of them.
 */
export function inbox(connection, target) {
  const list = arrivalList((count) => `${count} '${target}' invocation(s) (got ${list.received.length})`);
  connection.on(target, (...args) => list.add(args));
  return {
    received: list.received,
    /** The first `count` invocations (argument arrays), once they have arrived. */
    take: list.take,
    /** The argument array of the `n`th invocation (1-based). */
    async nth(n, ms = 5000) {
      const all = await this.take(n, ms);
      return all[n - 1];
    },
  };
}

/**
 * Resolves with the first `count` events (argument arrays) delivered to `connection` under any of
 * `targets`, in arrival order. Used to prove a negative by ordering: publish the event that must
 * not arrive, then one that must, and check the first one to arrive is the second.
 */
export function arrivals(connection, targets = ["RecommendationReady", "JobAssigned"]) {
  const list = arrivalList((count) => `${count} event(s) on ${targets.join("/")} (got ${list.received.length})`);
  for (const target of targets) connection.on(target, (...args) => list.add({ target, args }));
  return { received: list.received, take: list.take };
}

/** A promise for the next onclose of `connection` (resolves with the error, possibly undefined). */
export function nextClose(connection) {
  const { promise, resolve } = deferred();
  connection.onclose((error) => resolve(error));
  return promise;
}
