// Rolling restart on the deploy/local topology (redis-server, three replicas, nginx): ROLLING_CLIENTS
// official-client connections that resume with their last positions, a steady stream published
// into Redis by `loadgen publish-stream`, and the three replicas restarted one after the other
// with SIGTERM (not ready for --shutdown-delay, then clients closed spread over half of
// --drain-timeout). Every client must end with every event of its groups once and in order, and
// every client a restart closed must come back. How the reconnects spread over time is measured
// and reported (peak per 500 ms window), not asserted: the drain's schedule is the behaviour, and
// it is tested with paused time in gateway/src/shutdown_tests.rs. Writes
// chaos-results/7-rolling-restart.json.

import assert from "node:assert/strict";
import { test } from "node:test";

import { dispatcherToken, uniqueRegion, within } from "./harness.mjs";
import { resumingClient, startAll } from "./chaos/client.mjs";
import { killReplica, metric, publishStream, restartReplica, topologyForFile } from "./chaos/topology.mjs";
import { assertEveryEventOnce, report, settled, track } from "./chaos/tracker.mjs";

const CLIENTS = Number(process.env.ROLLING_CLIENTS ?? 300);
const GROUPS = 4;
// 300 connections in one Node process: one group each and a moderate rate keep the test
// process itself from becoming the bottleneck (its event loop would delay every timestamp).
const RATE = 100;
const SHUTDOWN_DELAY_MS = 1000;
const DRAIN_TIMEOUT_MS = 4000;
/** Clients are closed over half the drain timeout; the report gives the most in a window this long. */
const WINDOW_MS = 500;

const topology = topologyForFile("rolling", `--shutdown-delay ${SHUTDOWN_DELAY_MS}ms --drain-timeout ${DRAIN_TIMEOUT_MS}ms`);

/**
 * Samples the survivors' `gateway_connections_total` every 100 ms until stopped: the server's own
 * count of the reconnections that land on them. Returns { stop() -> [{ at, total }] }.
 */
function sampleConnections(replicas) {
  const samples = [];
  let running = true;
  const loop = (async () => {
    while (running) {
      const at = Date.now();
      const totals = await Promise.all(replicas.map((r) => metric(r, "gateway_connections_total").catch(() => NaN)));
      samples.push({ at, total: totals.reduce((a, b) => a + b, 0) });
      await new Promise((resolve) => setTimeout(resolve, 100));
    }
  })();
  return {
    async stop() {
      running = false;
      await loop;
      return samples.filter((s) => Number.isFinite(s.total));
    },
  };
}

/** The most new connections within any WINDOW_MS of `samples`, and the total. */
function peakFromSamples(samples) {
  let peak = 0;
  let start = 0;
  for (let end = 0; end < samples.length; end += 1) {
    while (samples[end].at - samples[start].at > WINDOW_MS) start += 1;
    peak = Math.max(peak, samples[end].total - samples[start].total);
  }
  return { peak, total: samples.length ? samples.at(-1).total - samples[0].total : 0 };
}

/** The most reconnects that landed within any WINDOW_MS among `times` (sorted ms). */
function peakInWindow(times) {
  let peak = 0;
  let start = 0;
  for (let end = 0; end < times.length; end += 1) {
    while (times[end] - times[start] >= WINDOW_MS) start += 1;
    peak = Math.max(peak, end - start + 1);
  }
  return peak;
}

test("restarting the three replicas one after another loses nothing and every closed client comes back", { timeout: 300_000 }, async (t) => {
  const regions = Array.from({ length: GROUPS }, () => uniqueRegion("rolling"));
  const clients = [];
  for (let i = 0; i < CLIENTS; i += 1) {
    const mine = [regions[i % GROUPS]];
    clients.push(resumingClient({ hubUrl: topology.lb.hubUrl, token: dispatcherToken(mine), regions: mine, name: `client-${i}` }));
  }
  t.after(() => Promise.all(clients.map((c) => c.stop())));
  await startAll(clients);

  const restarts = [];
  const secs = 30;
  const stream = publishStream({ redisUrl: topology.redisUrl, regions, rate: RATE, secs });
  await within(20_000, stream.reached(RATE * 2), "the stream to start");
  for (let i = 0; i < 3; i += 1) {
    const before = Date.now();
    const survivors = sampleConnections(topology.replicas.filter((_, j) => j !== i));
    let stopped;
    try {
      stopped = await killReplica(topology, i, "SIGTERM");
      await restartReplica(topology, i, stopped.argv);
    } finally {
      // Stopped on failure too: its polling loop would keep this process alive.
      await survivors.stop();
    }
    // By now the replica's clients are back on the others (the restart takes longer than they do).
    const landed = peakFromSamples(await survivors.stop());
    restarts.push({ replica: topology.replicas[i].name, from: before, stopMs: stopped.stopMs, until: Date.now(), landed });
  }
  const summary = await stream.done;
  const behind = await settled(clients, summary, 30_000);

  // Reconnects per restart: each client's reconnections from that replica's SIGTERM until the
  // next one's (the last: until the stream ended).
  const reconnects = restarts.map(({ replica, from, stopMs, landed }, i) => {
    const to = restarts[i + 1]?.from ?? Date.now();
    const times = clients
      .flatMap((c) => (c.reconnectedAt ?? []).filter((at) => at >= from && at < to))
      .sort((a, b) => a - b);
    const peak = peakInWindow(times);
    const lost = clients
      .flatMap((c) => (c.reconnectingAt ?? []).filter((at) => at >= from && at < to))
      .sort((a, b) => a - b);
    return {
      replica,
      stopMs,
      landedOnSurvivors: landed.total,
      landedPeakInWindow: landed.peak,
      landedPeakPerSecond: (landed.peak * 1000) / WINDOW_MS,
      reconnected: times.length,
      peakInWindow: peak,
      peakPerSecond: (peak * 1000) / WINDOW_MS,
      closedPeakInWindow: peakInWindow(lost),
      closedOverMs: lost.length ? lost.at(-1) - lost[0] : 0,
    };
  });
  const result = track(summary.groups, clients);
  report("7-rolling-restart", "7 rolling restart x3", result, {
    settings: { rate: RATE, secs, clients: CLIENTS, groups: GROUPS, shutdownDelayMs: SHUTDOWN_DELAY_MS, drainTimeoutMs: DRAIN_TIMEOUT_MS },
    reconnects,
    clientsBehindAtDeadline: behind,
  });
  console.log(`reconnects per restart: ${JSON.stringify(reconnects)}`);

  assertEveryEventOnce(summary, clients, result);
  for (const { replica, landedOnSurvivors: landedTotal, reconnected, stopMs } of reconnects) {
    assert.ok(landedTotal > 0, `no client was on ${replica}`);
    assert.ok(reconnected > 0, `no client reconnected after ${replica} was restarted`);
    // A lower bound: the replica kept serving through its shutdown delay (not a speed target).
    assert.ok(stopMs >= SHUTDOWN_DELAY_MS, `${replica} stopped after ${stopMs} ms, before its shutdown delay`);
  }
  // Every connection a drain closed came back (the official client reconnects by itself).
  for (const client of clients) {
    assert.equal((client.reconnectedAt ?? []).length, (client.reconnectingAt ?? []).length, `${client.name}: reconnecting and reconnected`);
  }
});
