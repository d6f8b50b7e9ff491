// Stateful reconnect in Chromium: the dispatcher console connected to a gateway through a TCP
// proxy (tests/node/tcp-proxy.mjs) that ends the socket under both ends, without a WebSocket
// close frame, while events are published. A resumed connection must look like nothing happened
// (no reconnecting indicator, no second negotiate, no resync, every event once and in order); a
// resume that cannot be made before the gateway's grace ends (the gateway answers 404) must
// fall back to the client's reconnect, which rejoins with the last positions and gets the
// missed events from the gateway's history.
//
// The environment is topology.mjs's (Redis, the demo backend serving dist/; its three replicas and
// nginx are not used here) plus one gateway per test on the same Redis, each behind its own
// proxy; the page's GET /api/config is answered with the proxy's hub URL. Prerequisites are the
// browser tests' (browser.test.mjs). No sleeps as synchronisation: every wait is for a DOM, page,
// proxy or /metrics condition, with a deadline.

import assert from "node:assert/strict";
import { mkdtempSync, rmSync } from "node:fs";
import os from "node:os";
import path from "node:path";
import { after, before, test } from "node:test";

import { chromium } from "playwright-core";

import { startGatewayProcess } from "../../../tests/node/gateway-process.mjs";
import { startTcpProxy } from "../../../tests/node/tcp-proxy.mjs";
import { CHROMIUM_BIN, GATEWAY_BIN, JWT_SECRET, checkPrerequisites, consoleApi, startEnvironment, until } from "./topology.mjs";

const SERVICE_KEY = "console-stateful-test-service-key-0123456789";
const UPDATE_MS = 15_000;
const sel = {
  indicator: "[data-testid=connection-indicator]",
  counter: "[data-testid=events-applied]",
};

let env;
let browser;
let stateDir;
let jobs;
let contractors;
const stops = [];
const pageErrors = [];

/** Calls the demo backend's API at `/api/<pathAndQuery>`; fails the test on an error answer. */
const api = (method, pathAndQuery, body) => consoleApi(env.consoleUrl, method, pathAndQuery, body);

/** Assigns the region's jobs in turn; resolves with the assignment ids, in publish order. */
async function assignSome(region, n, offset) {
  const regionJobs = jobs.filter((j) => j.region === region).map((j) => j.jobId);
  const regionContractors = contractors.filter((c) => c.region === region).map((c) => c.contractorId);
  const ids = [];
  for (let k = offset; k < offset + n; k += 1) {
    const answer = await api("POST", "assign", { jobId: regionJobs[k % regionJobs.length], contractorId: regionContractors[k % regionContractors.length] });
    ids.push(answer.assignmentId);
  }
  return ids;
}

/** A gateway on the environment's Redis with `args`, behind a fresh proxy. */
async function gatewayBehindProxy(name, args) {
  const gateway = await startGatewayProcess({
    bin: GATEWAY_BIN,
    args: [
      "--redis-url", `redis://127.0.0.1:${env.redisPort}`,
      "--jwt-secret", JWT_SECRET,
      "--service-key", SERVICE_KEY,
      "--cors-origins", new URL(env.consoleUrl).origin,
      ...args,
    ],
    logFile: path.join(stateDir, "logs", `${name}.log`),
  });
  stops.push(() => gateway.stop());
  const proxy = await startTcpProxy(gateway.port);
  stops.push(() => proxy.close());
  return { gateway, proxy, hubUrl: proxy.hubUrl };
}

/**
 * Opens the dispatcher view of `region` with `hubUrl` as the hub; resolves once it is connected
 * and joined, with the page and what it requested: negotiates, WebSockets (their URLs) and job
 * list fetches (a resync refetches the jobs).
 */
async function openDispatcher(name, region, hubUrl) {
  const context = await browser.newContext({ viewport: { width: 1100, height: 400 } });
  stops.push(() => context.close());
  await context.route(
    (url) => url.pathname === "/api/config",
    async (route) => {
      const response = await route.fetch();
      await route.fulfill({ response, json: { ...(await response.json()), hubUrl } });
    },
  );
  const page = await context.newPage();
  const seen = { negotiates: 0, sockets: [], jobLists: 0 };
  page.on("request", (request) => {
    const { pathname } = new URL(request.url());
    if (pathname === "/hub/v1/negotiate") seen.negotiates += 1;
    if (pathname === "/api/jobs") seen.jobLists += 1;
  });
  page.on("websocket", (socket) => seen.sockets.push(socket.url()));
  page.on("pageerror", (error) => pageErrors.push(`${name}: ${error.message}`));
  page.on("console", (message) => {
    if (message.type() === "error") pageErrors.push(`${name} console: ${message.text()}`);
  });
  await page.goto(`${env.consoleUrl}#/dispatcher?regions=${region}`);
  await page.waitForSelector(`${sel.indicator}[data-state=connected]`, { timeout: 15_000 });
  await page.waitForFunction(() => Object.keys(window.realtime.positions()).length >= 1, null, { timeout: 10_000 });
  // The dispatcher view lists the jobs on load and once more after its join (src/dispatcher.ts);
  // any later list is a resync's refetch.
  await until("the job list and its reload after the join", 10_000, () => seen.jobLists >= 2);
  // From here on: every indicator state, every JobAssigned handed to the app, every resync.
  await page.evaluate(() => {
    const indicator = document.querySelector("[data-testid=connection-indicator]");
    window.__states = [indicator.dataset.state];
    new MutationObserver(() => window.__states.push(indicator.dataset.state)).observe(indicator, {
      attributes: true,
      attributeFilter: ["data-state"],
    });
    window.__seen = [];
    window.realtime.on("JobAssigned", (event) => window.__seen.push(event.assignmentId));
    window.__resyncs = [];
    window.realtime.onResyncRequired((group, reason) => window.__resyncs.push([group, reason]));
  });
  return { page, seen };
}

const applied = (page) => page.$eval(sel.counter, (el) => Number(el.dataset.count));
const appliedAtLeast = (page, n) =>
  page.waitForFunction((count) => Number(document.querySelector("[data-testid=events-applied]").dataset.count) >= count, n, { timeout: UPDATE_MS });
const connectionId = (socketUrl) => new URL(socketUrl).searchParams.get("id");

/** gateway_stateful_transports_total{outcome} from the gateway's /metrics (lost, resumed, refused, expired). */
async function stateful(gateway, outcome) {
  const response = await fetch(`${gateway.adminUrl}/metrics`, { signal: AbortSignal.timeout(5000) });
  const line = (await response.text()).split("\n").find((l) => l.startsWith("gateway_stateful_transports_total{") && l.includes(`outcome="${outcome}"`));
  return line ? Number(line.split(" ").at(-1)) : 0;
}

before(async () => {
  checkPrerequisites();
  stateDir = mkdtempSync(path.join(os.tmpdir(), "console-stateful-"));
  env = await startEnvironment(stateDir);
  contractors = await api("GET", "contractors");
  jobs = await api("GET", "jobs");
  browser = await chromium.launch({
    executablePath: CHROMIUM_BIN,
    headless: true,
    args: ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync"],
  });
});

after(async () => {
  const failures = [];
  for (const step of [...stops.reverse(), () => browser?.close(), () => env?.stop()]) {
    try {
      await step();
    } catch (error) {
      failures.push(error);
    }
  }
  if (pageErrors.length) console.log(`page console errors (a cut socket shows as 1006, a refused resume as 404):\n  ${pageErrors.join("\n  ")}`);
  if (stateDir && failures.length === 0 && process.env.KEEP_STATE !== "1") rmSync(stateDir, { recursive: true, force: true });
  if (failures.length) throw failures[0];
});

test("a socket lost while events are published is resumed: no reconnecting, no resync, every event once and in order", async () => {
  const region = "east";
  const { gateway, proxy, hubUrl } = await gatewayBehindProxy("gateway-stateful", []);
  const { page, seen } = await openDispatcher("dispatcher-east", region, hubUrl);
  assert.equal(seen.negotiates, 1);
  assert.equal(seen.sockets.length, 1);
  const start = await applied(page);

  const live = await assignSome(region, 2, 0);
  await appliedAtLeast(page, start + 2);

  // End the socket; the page's one attempt to reopen it is held at the proxy while more events
  // are published, so those can only reach the page through the resumed connection.
  const lists = seen.jobLists;
  const reopened = page.waitForEvent("websocket", { timeout: UPDATE_MS });
  const gaveUp = page.waitForFunction(() => window.__states.includes("reconnecting"), null, { timeout: UPDATE_MS }).then(
    () => Promise.reject(new Error("the page went reconnecting instead of reopening its socket")),
    () => new Promise(() => {}),
  );
  proxy.partition();
  await Promise.race([reopened, gaveUp]);
  const away = await assignSome(region, 3, 2);
  proxy.heal();
  const later = await assignSome(region, 2, 5);
  await appliedAtLeast(page, start + 7);

  assert.deepEqual(await page.evaluate(() => window.__seen), [...live, ...away, ...later], "every event once, in publish order");
  assert.equal(await applied(page), start + 7, "events-applied grew by exactly the number published");
  assert.deepEqual(await page.evaluate(() => window.__states), ["connected"], "the indicator never left connected");
  assert.deepEqual(await page.evaluate(() => window.__resyncs), []);
  assert.equal(seen.jobLists, lists, "no job list refetch: no resync");
  assert.equal(seen.negotiates, 1, "no second negotiate: the same connection went on");
  assert.equal(seen.sockets.length, 2);
  assert.equal(connectionId(seen.sockets[1]), connectionId(seen.sockets[0]), "the socket was reopened with the same connection token");
  assert.equal(await stateful(gateway, "resumed"), 1, "the gateway resumed the connection");
  await page.context().close();
});

test("a resume held up past the gateway's grace is refused: the page reconnects and rejoins with its positions", async () => {
  const region = "north";
  const { gateway, proxy, hubUrl } = await gatewayBehindProxy("gateway-grace-1s", ["--stateful-reconnect-grace", "1s"]);
  const { page, seen } = await openDispatcher("dispatcher-north", region, hubUrl);
  const start = await applied(page);

  const live = await assignSome(region, 2, 0);
  await appliedAtLeast(page, start + 2);

  // The page's attempt to reopen its socket is held at the proxy while events are published and
  // until the gateway has given the connection up (its grace is 1 s); released, it gets 404.
  const lists = seen.jobLists;
  const reopened = page.waitForEvent("websocket", { timeout: UPDATE_MS });
  proxy.partition();
  await reopened;
  const missed = await assignSome(region, 3, 2);
  await until("the gateway's grace to expire", UPDATE_MS, async () => (await stateful(gateway, "expired")) >= 1, 50);
  proxy.heal();

  await page.waitForFunction(() => window.__states.length >= 3 && window.__states.at(-1) === "connected", null, { timeout: 30_000 });
  await appliedAtLeast(page, start + 5);
  const later = await assignSome(region, 1, 5);
  await appliedAtLeast(page, start + 6);

  assert.deepEqual(await page.evaluate(() => window.__seen), [...live, ...missed, ...later], "every event once, in publish order");
  assert.equal(await applied(page), start + 6, "events-applied grew by exactly the number published");
  assert.deepEqual(await page.evaluate(() => window.__states), ["connected", "reconnecting", "connected"]);
  assert.deepEqual(await page.evaluate(() => window.__resyncs), [], "the rejoin recovered from the gateway's history");
  assert.equal(seen.jobLists, lists, "no job list refetch: no resync");
  assert.equal(await stateful(gateway, "refused"), 1, "the gateway refused the late resume");
  assert.equal(seen.negotiates, 2, "the fallback negotiated a new connection");
  assert.notEqual(connectionId(seen.sockets.at(-1)), connectionId(seen.sockets[0]), "a new connection token");
  await page.context().close();
});
