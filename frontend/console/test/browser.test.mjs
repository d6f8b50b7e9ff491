// Browser tests of the console: Debian's Chromium driven by playwright-core (headless, nothing
// downloaded) against the deploy/local topology (redis-server, three gateway replicas, nginx) and
// the demo backend serving dist/, all on free loopback ports (see topology.mjs).
//
// Prerequisites: `cargo build -p gateway --bin gateway`, `cargo build -p demo-backend`,
// the front-end build (`npm run build --workspaces` at frontend/), redis-server, nginx and
// /usr/bin/chromium (CHROMIUM_BIN overrides). Screenshots and latency.json go to test/artifacts/;
// UPDATE_SCREENSHOTS=1 also writes docs/screenshots/{dispatcher,contractor}.png.
//
// No sleeps as synchronisation: every wait is for a DOM condition (waitForFunction/waitForSelector)
// or a process/HTTP condition, with a deadline.

import assert from "node:assert/strict";
import { copyFileSync, mkdirSync, mkdtempSync, rmSync, writeFileSync } from "node:fs";
import os from "node:os";
import path from "node:path";
import { after, before, test } from "node:test";
import { performance } from "node:perf_hooks";
import { fileURLToPath } from "node:url";

import { chromium } from "playwright-core";

import { CHROMIUM_BIN, REPO, checkPrerequisites, consoleApi, redisPublisher, startEnvironment, until } from "./topology.mjs";

const here = path.dirname(fileURLToPath(import.meta.url));
const ARTIFACTS = path.join(here, "artifacts");
const SCREENSHOTS = path.join(REPO, "docs/screenshots");
// How long a test waits for an update before it gives up: a failure detector for a lost update,
// not a speed target (a busy 2-core machine once took more than a second for one that arrived).
const UPDATE_MS = 15_000;

const sel = {
  indicator: "[data-testid=connection-indicator]",
  counter: "[data-testid=events-applied]",
  row: (jobId) => `[data-testid=job-row][data-job-id="${jobId}"]`,
  sheet: "[data-testid=recommendations-sheet]",
  card: (jobId) => `[data-testid=schedule-card][data-job-id="${jobId}"]`,
};

let env;
let browser;
let publisher;
let stateDir;
let contractors; // [{contractorId, name, region}]
let jobs; // [{jobId, region, title, ...}]
const pages = [];
const pageErrors = [];
const by = (region) => ({
  jobs: jobs.filter((j) => j.region === region).map((j) => j.jobId),
  contractors: contractors.filter((c) => c.region === region).map((c) => c.contractorId),
});
const nameOf = (contractorId) => contractors.find((c) => c.contractorId === contractorId).name;
const slot = (k) => {
  const start = new Date(Date.UTC(2030, 0, 1, 8) + k * 60_000);
  return { startUtc: start.toISOString().replace(".000Z", "Z"), endUtc: new Date(start.getTime() + 7_200_000).toISOString().replace(".000Z", "Z") };
};

/** Calls the demo backend's API at `/api/<pathAndQuery>`; fails the test on an error answer. */
const api = (method, pathAndQuery, body) => consoleApi(env.consoleUrl, method, pathAndQuery, body);

/** Opens `hash` in a fresh context; resolves once connected and joined to `groups` groups. */
async function openPage(name, hash, groups) {
  const context = await browser.newContext({ viewport: { width: 1100, height: 400 }, deviceScaleFactor: 1 });
  const page = await context.newPage();
  page.on("pageerror", (error) => pageErrors.push(`${name}: ${error.message}`));
  page.on("console", (message) => {
    if (message.type() === "error") pageErrors.push(`${name} console: ${message.text()}`);
  });
  await page.goto(`${env.consoleUrl}#${hash}`);
  await page.waitForSelector(`${sel.indicator}[data-state=connected]`, { timeout: 15_000 });
  await page.waitForFunction((n) => Object.keys(window.realtime.positions()).length >= n, groups, { timeout: 10_000 });
  pages.push({ name, page });
  return page;
}

const applied = (page) => page.$eval(sel.counter, (el) => Number(el.dataset.count));
const appliedAtLeast = (page, n, timeout = 10_000) =>
  page.waitForFunction((count) => Number(document.querySelector("[data-testid=events-applied]").dataset.count) >= count, n, { timeout });

async function screenshot(page, name, publish) {
  mkdirSync(ARTIFACTS, { recursive: true });
  const file = path.join(ARTIFACTS, `${name}.png`);
  await page.screenshot({ path: file });
  if (publish && process.env.UPDATE_SCREENSHOTS === "1") {
    mkdirSync(SCREENSHOTS, { recursive: true });
    copyFileSync(file, path.join(SCREENSHOTS, `${name}.png`));
  }
}

/** Percentile by nearest rank. */
function percentile(sorted, p) {
  return sorted[Math.min(sorted.length - 1, Math.max(0, Math.ceil((p / 100) * sorted.length) - 1))];
}

before(async () => {
  checkPrerequisites();
  stateDir = mkdtempSync(path.join(os.tmpdir(), "console-browser-"));
  env = await startEnvironment(stateDir);
  publisher = await redisPublisher(env.redisPort);
  contractors = await api("GET", "contractors");
  jobs = await api("GET", "jobs");
  browser = await chromium.launch({
    executablePath: CHROMIUM_BIN,
    headless: true,
    args: [
      "--no-sandbox",
      "--disable-gpu",
      "--disable-quic",
      "--no-first-run",
      "--disable-background-networking",
      "--disable-component-update",
      "--disable-sync",
    ],
  });
});

after(async () => {
  const failures = [];
  for (const step of [() => browser?.close(), () => publisher?.close(), () => env?.stop()]) {
    try {
      await step();
    } catch (error) {
      failures.push(error);
    }
  }
  if (pageErrors.length) console.log(`page console errors (404s are the sheet of a job without recommendations; 1006 the killed replica):\n  ${pageErrors.join("\n  ")}`);
  if (stateDir && failures.length === 0 && process.env.KEEP_STATE !== "1") rmSync(stateDir, { recursive: true, force: true });
  if (failures.length) throw failures[0];
});

// Shared by the tests below (they run in order): two dispatchers of west, the first west contractor.
let d1;
let d2;
let c1;

test("two dispatchers and a contractor see the right updates; the contractor only its own", async () => {
  const west = by("west");
  const [job1, job2, job3] = west.jobs;
  const [me, other] = west.contractors;

  const landing = await (await browser.newContext({ viewport: { width: 1100, height: 400 } })).newPage();
  await landing.goto(env.consoleUrl);
  await landing.waitForSelector("a[href^='#/contractor']", { timeout: 10_000 });
  await screenshot(landing, "landing");
  await landing.context().close();

  d1 = await openPage("dispatcher-1", "/dispatcher?regions=west", 1);
  d2 = await openPage("dispatcher-2", "/dispatcher?regions=west", 1);
  c1 = await openPage("contractor-1", `/contractor?id=${me}`, 1);
  const c1Before = await applied(c1);

  for (const page of [d1, d2]) {
    await page.click(sel.row(job1));
    await page.waitForSelector(`${sel.sheet}[data-job-id="${job1}"][data-state=empty]`, { timeout: 5000 });
  }

  // Get recommendations on dispatcher 1: both sheets load the new request. (How fast is measured
  // below and printed, not asserted: UPDATE_MS only turns a lost update into a failure.)
  const recommended = d1.waitForResponse((r) => r.url().endsWith("/api/recommendations") && r.request().method() === "POST");
  await d1.click("[data-testid=get-recommendations]");
  const { requestId } = await (await recommended).json();
  const publishedAt = Date.now(); // the backend publishes before it answers 202
  await Promise.all(
    [d1, d2].map((page) =>
      page.waitForSelector(`${sel.sheet}[data-state=loaded][data-request-id="${requestId}"]`, { timeout: UPDATE_MS }),
    ),
  );
  const sheetMs = Date.now() - publishedAt;
  assert.equal(await d2.locator("[data-testid=ranked-contractor]").count(), west.contractors.length);

  // Assign to the contractor from dispatcher 1: both rows turn assigned, the contractor gets the card.
  const assigned = d1.waitForResponse((r) => r.url().endsWith("/api/assign"));
  await d1.click(`[data-testid=assign][data-contractor-id="${me}"]`);
  const { assignmentId } = await (await assigned).json();
  const assignedAt = Date.now();
  await Promise.all([
    d1.waitForSelector(`${sel.row(job1)}[data-status=assigned]`, { timeout: UPDATE_MS }),
    d2.waitForSelector(`${sel.row(job1)}[data-status=assigned]`, { timeout: UPDATE_MS }),
    c1.waitForSelector(`${sel.card(job1)}[data-assignment-id="${assignmentId}"]`, { timeout: UPDATE_MS }),
  ]);
  const assignMs = Date.now() - assignedAt;
  for (const page of [d1, d2]) {
    assert.match(await page.locator(`${sel.row(job1)} [data-testid=job-contractor]`).innerText(), new RegExp(`^${nameOf(me)}`));
  }

  // Another contractor's assignment reaches the dispatchers but not this contractor; checked once
  // a later assignment of its own has arrived (events of one group arrive in order).
  await api("POST", "assign", { jobId: job2, contractorId: other });
  const own = await api("POST", "assign", { jobId: job3, contractorId: me });
  await c1.waitForSelector(`${sel.card(job3)}[data-assignment-id="${own.assignmentId}"]`, { timeout: UPDATE_MS });
  await Promise.all([d1, d2].map((page) => page.waitForSelector(`${sel.row(job2)}[data-status=assigned]`, { timeout: UPDATE_MS })));
  assert.equal(await c1.locator(sel.card(job2)).count(), 0, "the contractor page shows another contractor's job");
  assert.equal(await applied(c1), c1Before + 2, "the contractor page applied exactly its own two assignments");
  assert.deepEqual(
    (await c1.locator("[data-testid=schedule-card]").evaluateAll((cards) => cards.map((c) => c.dataset.jobId))).sort(),
    [job1, job3].sort(),
  );

  await screenshot(d1, "dispatcher", true);
  await screenshot(d2, "dispatcher-2");
  await screenshot(c1, "contractor", true);
  console.log(`updates: sheets loaded ${sheetMs} ms, rows and card ${assignMs} ms after the backend's answer`);
});

test("the answer to Get recommendations held back until its event has loaded the sheet: the sheet stays loaded", async () => {
  // The backend publishes RecommendationReady before it answers 202, so the event and the fetch
  // it starts can beat the answer to the page. Held here until they have, every time.
  const [job1] = by("west").jobs;
  await d1.waitForSelector(`${sel.sheet}[data-job-id="${job1}"][data-state=loaded]`, { timeout: 5000 });
  let loadedFirst;
  await d1.route("**/api/recommendations", async (route) => {
    if (route.request().method() !== "POST") return route.fallback();
    const response = await route.fetch();
    const { requestId } = await response.json();
    loadedFirst = d1
      .waitForSelector(`${sel.sheet}[data-state=loaded][data-request-id="${requestId}"]`, { timeout: UPDATE_MS })
      .then(() => true, () => false);
    await loadedFirst;
    await route.fulfill({ response });
    return undefined;
  });
  try {
    const answered = d1.waitForResponse((r) => r.url().endsWith("/api/recommendations") && r.request().method() === "POST");
    // The button clicked: the sheet's re-render replaces it, and the click handler enables this
    // (now detached) one again when it is done.
    const button = await d1.$("[data-testid=get-recommendations]");
    await button.click();
    const { requestId } = await (await answered).json();
    await d1.waitForFunction((clicked) => !clicked.disabled, button, { timeout: 5000 });
    assert.equal(await loadedFirst, true, "the event loaded the sheet while the answer was held");
    assert.deepEqual(
      await d1.$eval(sel.sheet, (el) => ({ state: el.dataset.state, requestId: el.dataset.requestId })),
      { state: "loaded", requestId },
    );
  } finally {
    await d1.unroute("**/api/recommendations");
  }
});

test("kill the replica a page is connected to: reconnecting, connected, the events published meanwhile in order, once", async () => {
  const north = by("north");
  const baseline = await env.connections();
  const page = await openPage("dispatcher-north", "/dispatcher?regions=north", 1);
  // Deterministic: the replica whose active connections grew by one when this page connected
  // through nginx (the other pages stay where they are).
  const victim = await until("one replica with one more connection", 5000, async () => {
    const now = await env.connections();
    const grown = now.map((n, i) => n - baseline[i]);
    return grown.filter((d) => d === 1).length === 1 && grown.filter((d) => d !== 0).length === 1 ? grown.indexOf(1) + 1 : 0;
  });
  const i = victim - 1;

  await page.evaluate(() => {
    const indicator = document.querySelector("[data-testid=connection-indicator]");
    window.__states = [[indicator.dataset.state, performance.timeOrigin + performance.now()]];
    new MutationObserver(() => window.__states.push([indicator.dataset.state, performance.timeOrigin + performance.now()])).observe(indicator, {
      attributes: true,
      attributeFilter: ["data-state"],
    });
    window.__seen = [];
    window.realtime.on("JobAssigned", (event) => window.__seen.push(event.assignmentId));
  });
  const before = await applied(page);

  const argv = await env.killReplica(i);
  let restarted = false;
  try {
    // Published right after the kill, while the page is away (the indicator's transitions are
    // recorded by the observer above and checked below): jobs 1..4 of north, then job 1 again (its final state must
    // be the last one, so order matters).
    const plan = [0, 1, 2, 3, 0].map((j, k) => ({ jobId: north.jobs[j], contractorId: north.contractors[k % north.contractors.length] }));
    const published = [];
    for (const step of plan) published.push({ ...step, at: Date.now(), ...(await api("POST", "assign", step)) });

    await page.waitForFunction(
      () => {
        const states = window.__states.map(([s]) => s);
        const r = states.indexOf("reconnecting");
        return r >= 0 && states.indexOf("connected", r) > r;
      },
      null,
      { timeout: 15_000 },
    );
    await appliedAtLeast(page, before + plan.length, 10_000);

    // Exactly once and in order: a sentinel published afterwards is the next (and last) one seen.
    const sentinel = await api("POST", "assign", { jobId: north.jobs[1], contractorId: north.contractors[0] });
    await appliedAtLeast(page, before + plan.length + 1, 5000);
    const seen = await page.evaluate(() => window.__seen);
    assert.deepEqual(seen, [...published.map((p) => p.assignmentId), sentinel.assignmentId], "events in publish order, each once");
    assert.equal(await applied(page), before + plan.length + 1, "events-applied grew by exactly the number published");

    // The DOM ends in the state of the last event per job.
    const last = new Map();
    for (const p of [...published, { jobId: north.jobs[1], contractorId: north.contractors[0] }]) last.set(p.jobId, p.contractorId);
    for (const [jobId, contractorId] of last) {
      assert.equal(await page.getAttribute(sel.row(jobId), "data-status"), "assigned");
      assert.match(await page.locator(`${sel.row(jobId)} [data-testid=job-contractor]`).innerText(), new RegExp(`^${nameOf(contractorId)}`));
    }
    const states = await page.evaluate(() => window.__states);
    const reconnectedAt = states.find(([s], k) => s === "connected" && k > 0)[1];
    const whileAway = published.filter((p) => p.at < reconnectedAt).length;
    assert.ok(whileAway >= 1, "at least one event was published before the page reconnected");
    await screenshot(page, "dispatcher-after-reconnect");
    console.log(
      `reconnect: killed gateway-${victim}; states ${states.map(([s]) => s).join(" → ")}; ` +
        `${whileAway}/${published.length} published before reconnecting; reconnected ${Math.round(reconnectedAt - states[1][1])} ms after the drop`,
    );

    await env.restartReplica(i, argv);
    restarted = true;
  } finally {
    if (!restarted) await env.restartReplica(i, argv).catch((error) => console.log(`restart failed: ${error.message}`));
    await page.context().close();
  }
});

/** Publishes one event to the west groups and waits until every page of the first test applied it. */
async function everyoneLive() {
  await Promise.all([d1, d2, c1].map((page) => page.waitForSelector(`${sel.indicator}[data-state=connected]`, { timeout: 15_000 })));
  const counts = await Promise.all([d1, d2, c1].map(applied));
  const west = by("west");
  await publisher.jobAssigned({ jobId: west.jobs[3], contractorId: west.contractors[0], region: "west", ...slot(0) });
  await Promise.all([d1, d2, c1].map((page, k) => appliedAtLeast(page, counts[k] + 1, 10_000)));
}

test("a burst of 1,000 events: the page stays responsive and ends in the right state", async () => {
  await everyoneLive();
  const west = by("west");
  const N = 1000;
  const before = await Promise.all([d1, d2, c1].map(applied));
  await d1.bringToFront();
  await d1.evaluate(() => {
    window.__frames = { max: 0, frames: 0, running: true };
    let last = performance.now();
    const loop = (now) => {
      window.__frames.max = Math.max(window.__frames.max, now - last);
      window.__frames.frames += 1;
      last = now;
      if (window.__frames.running) requestAnimationFrame(loop);
    };
    requestAnimationFrame(loop);
  });
  // Wait for the loop to tick once so the first gap is a real frame gap.
  await d1.waitForFunction(() => window.__frames.frames > 1, null, { timeout: 5000 });

  const events = Array.from({ length: N }, (_, k) => ({
    jobId: west.jobs[k % west.jobs.length],
    contractorId: west.contractors[k % west.contractors.length],
    region: "west",
    ...slot(k),
  }));
  const started = Date.now();
  const replies = events.map((event) => publisher.jobAssigned(event));
  // A click during the burst still works: select another job, the row is selected and the sheet follows.
  const clickStarted = Date.now();
  await d1.click(sel.row(west.jobs[2]), { timeout: UPDATE_MS });
  await d1.waitForSelector(`${sel.row(west.jobs[2])}.selected`, { timeout: UPDATE_MS });
  await d1.waitForSelector(`${sel.sheet}[data-job-id="${west.jobs[2]}"]`, { timeout: UPDATE_MS });
  const clickMs = Date.now() - clickStarted;
  const results = await Promise.all(replies);
  const publishMs = Date.now() - started;
  assert.ok(results.every(([dispatch, contractor]) => dispatch[2] === 0 && contractor[2] === 0), "no duplicates");

  await appliedAtLeast(d1, before[0] + N, 15_000);
  const doneMs = Date.now() - started;
  const frames = await d1.evaluate(() => {
    window.__frames.running = false;
    return window.__frames;
  });
  const mine = events.filter((e) => e.contractorId === west.contractors[0]);
  await appliedAtLeast(d2, before[1] + N, 15_000);
  await appliedAtLeast(c1, before[2] + mine.length, 15_000);

  assert.equal(await applied(d1), before[0] + N);
  assert.equal(await applied(d2), before[1] + N);
  assert.equal(await applied(c1), before[2] + mine.length);
  const last = new Map(events.map((e) => [e.jobId, e]));
  for (const page of [d1, d2]) {
    for (const [jobId, event] of last) {
      assert.equal(await page.getAttribute(sel.row(jobId), "data-status"), "assigned");
      assert.match(await page.locator(`${sel.row(jobId)} [data-testid=job-contractor]`).innerText(), new RegExp(`^${nameOf(event.contractorId)}`));
    }
  }
  const lastMine = new Map(mine.map((e) => [e.jobId, e]));
  for (const jobId of lastMine.keys()) await c1.waitForSelector(sel.card(jobId), { timeout: UPDATE_MS });
  console.log(
    `burst: ${N} events published in ${publishMs} ms, all applied after ${doneMs} ms; ` +
      `longest frame gap ${frames.max.toFixed(1)} ms over ${frames.frames} frames; click → selected in ${clickMs} ms`,
  );
  mkdirSync(ARTIFACTS, { recursive: true });
  writeFileSync(path.join(ARTIFACTS, "burst.json"), `${JSON.stringify({ events: N, publishMs, doneMs, longestFrameGapMs: frames.max, frames: frames.frames, clickMs }, null, 2)}\n`);
  // The longest frame gap is measured (burst.json), not asserted: a busy machine stretches it.
  // What is asserted is what happened: the click above, made while the burst was being published,
  // was handled, and every page applied every event it should, once, and ended in the last
  // event's state.
  await screenshot(d1, "dispatcher-after-burst");
  await screenshot(c1, "contractor-after-burst");
});

test("100 events published one at a time each make their own DOM update (publish to DOM p50/p99 measured)", async () => {
  await everyoneLive();
  const west = by("west");
  const N = 100;
  await d1.bringToFront();
  await d1.evaluate(() => {
    const counter = document.querySelector("[data-testid=events-applied]");
    window.__applied = new Map();
    new MutationObserver(() => {
      const count = Number(counter.dataset.count);
      if (!window.__applied.has(count)) window.__applied.set(count, performance.timeOrigin + performance.now());
    }).observe(counter, { attributes: true, attributeFilter: ["data-count"] });
  });
  const start = await applied(d1);
  const publishedAt = [];
  for (let k = 0; k < N; k += 1) {
    const event = { jobId: west.jobs[k % west.jobs.length], contractorId: west.contractors[k % west.contractors.length], region: "west", ...slot(k) };
    publishedAt.push(performance.timeOrigin + performance.now());
    await publisher.jobAssigned(event);
    await appliedAtLeast(d1, start + k + 1, 5000);
  }
  const shownAt = await d1.evaluate(({ from, n }) => Array.from({ length: n }, (_, k) => window.__applied.get(from + k + 1) ?? null), { from: start, n: N });
  assert.ok(shownAt.every((t) => t !== null), "every event made its own DOM update");
  const latencies = shownAt.map((t, k) => t - publishedAt[k]);
  const sorted = [...latencies].sort((a, b) => a - b);
  const result = {
    events: N,
    path: "Node EVALSHA publish (docs/redis-contract.md) → Redis → gateway replica → nginx → browser → DOM (events-applied counter)",
    p50Ms: Number(percentile(sorted, 50).toFixed(2)),
    p99Ms: Number(percentile(sorted, 99).toFixed(2)),
    minMs: Number(sorted[0].toFixed(2)),
    maxMs: Number(sorted.at(-1).toFixed(2)),
    latenciesMs: latencies.map((l) => Number(l.toFixed(2))),
  };
  mkdirSync(ARTIFACTS, { recursive: true });
  writeFileSync(path.join(ARTIFACTS, "latency.json"), `${JSON.stringify(result, null, 2)}\n`);
  // Measured and written to latency.json, not asserted: speed is for benchmarks, not this test.
  console.log(`publish → DOM over ${N} events: p50 ${result.p50Ms} ms, p99 ${result.p99Ms} ms (min ${result.minMs}, max ${result.maxMs})`);
});
