// Stateful reconnect carried across replicas (issue 14), on the deploy/local topology
// (redis-server, three replicas, nginx round-robin without affinity): official clients built
// with `.withStatefulReconnect()` and nothing else (no positions kept, no rejoin in
// onreconnected) lose their WebSocket under a steady stream published into Redis by `loadgen
// publish-stream`, and must end with every event of their groups once and in order, on the
// connection they started with, without a single onreconnecting:
//
//   1. the three replicas restarted one after the other with SIGTERM (each drain parks its
//      connections in Redis; the clients resume on the others);
//   2. the network between nginx and one replica cut (a proxy in between, stopped and started);
//   3. the clients' own sockets cut under them (a proxy in front of nginx), three times;
//   4. a connection carried to another replica and back to the first (a proxy in front of the
//      replicas, pointed at one, then the other, then the first again).
//
// Each prints how long the clients' transports took to come back (socket lost -> WebSocket
// open again, and -> the next event) and the replicas' gateway_stateful_transports_total by
// outcome (adopted: resumed on another replica; resumed: on the same one), and writes
// chaos-results/stateful-<n>.json. Times are reported, never asserted.

import assert from "node:assert/strict";
import { mkdtempSync, rmSync } from "node:fs";
import os from "node:os";
import path from "node:path";
import { test } from "node:test";

import { HttpTransportType, HubConnectionBuilder, HubConnectionState, LogLevel } from "@microsoft/signalr";

import { dispatcherToken, uniqueRegion, within } from "./harness.mjs";
import { killReplica, metric, publishStream, restartReplica, startTopology } from "./chaos/topology.mjs";
import { assertEveryEventOnce, report, settled, track } from "./chaos/tracker.mjs";
import { cutProxy, routeReplicaThrough } from "./cut-proxy.mjs";
import { pidIn, withLogTails } from "./local-topology.mjs";
import { startAll } from "./chaos/client.mjs";

const CLIENTS = Number(process.env.STATEFUL_REPLICAS_CLIENTS ?? 30);
const GROUPS = 3;
const RATE = 60; // events/s over all groups
const SHUTDOWN_DELAY_MS = 1000;
const DRAIN_TIMEOUT_MS = 4000;
const OUTCOMES = ["lost", "resumed", "adopted", "handed_over", "expired", "refused"];

const groupOf = (region) => `/dispatch/${region}`;
const pause = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

// ---------------------------------------------------------------------------------------------
// The client

/**
 * An official client as an app would build it for stateful reconnect: `.withStatefulReconnect()`
 * plus the usual automatic reconnect (which must never be needed here), joined once to the
 * dispatch groups of `regions` without a position. It records what the tracker reads (each
 * event's requestId and position per group), every onreconnecting, and from the client's own log
 * each time its WebSocket closed and opened again (the stateful transport reconnect, which the
 * client does silently).
 */
function statefulClient({ hubUrl, regions, name }) {
  const client = {
    name,
    regions,
    groups: regions.map(groupOf),
    received: Object.fromEntries(regions.map((region) => [groupOf(region), []])),
    joins: [],
    reconnects: 0,
    reconnectingAt: [],
    closedWith: undefined,
    errors: [],
    /** One per lost WebSocket: { lostAt, openedAt, eventAt } (ms since the epoch). */
    transports: [],
    downMs: () => 0,
  };
  let started = false;
  const logger = {
    log(level, message) {
      if (level >= LogLevel.Error && client.errors.length < 20) client.errors.push(String(message));
      if (!started) return;
      if (message === "(WebSockets transport) socket closed.") {
        client.transports.push({ lostAt: Date.now(), openedAt: null, eventAt: null });
      } else if (message.startsWith("WebSocket connected to ")) {
        const last = client.transports.at(-1);
        if (last && last.openedAt === null) last.openedAt = Date.now();
      }
    },
  };
  const token = dispatcherToken(regions);
  const connection = new HubConnectionBuilder()
    .withUrl(hubUrl, { accessTokenFactory: () => token, transport: HttpTransportType.WebSockets })
    .withStatefulReconnect()
    .withAutomaticReconnect()
    .configureLogging(logger)
    .build();
  client.connection = connection;

  connection.on("RecommendationReady", (event, position) => {
    const group = position?.group ?? groupOf(event.region);
    (client.received[group] ??= []).push({ requestId: event.requestId, epoch: position?.epoch, seq: position?.seq });
    const last = client.transports.at(-1);
    if (last && last.openedAt !== null && last.eventAt === null) last.eventAt = Date.now();
  });
  connection.onreconnecting(() => {
    client.reconnects += 1;
    client.reconnectingAt.push(Date.now());
  });
  connection.onclose((error) => {
    client.closedWith = error ?? null;
  });

  client.start = async () => {
    await within(15_000, connection.start(), `${name}: start()`);
    client.connectionId = connection.connectionId;
    for (const region of regions) {
      const result = await within(15_000, connection.invoke("JoinDispatchGroup", region), `${name}: join ${region}`);
      client.joins.push({ group: groupOf(region), sent: null, result, rejoin: false });
    }
    started = true;
  };
  client.stop = async () => {
    started = false;
    await within(10_000, connection.stop(), `${name}: stop()`).catch(() => {});
  };
  /** WebSockets lost so far, and how many of them were opened again. */
  client.lost = () => client.transports.length;
  client.reopened = () => client.transports.filter((t) => t.openedAt !== null).length;
  return client;
}

/**
 * `count` clients through `hubUrl`, started, each in two of GROUPS fresh regions (so every carried
 * connection has groups); stopped when the test ends.
 */
async function startedClients(t, hubUrl, count = CLIENTS) {
  const regions = Array.from({ length: GROUPS }, () => uniqueRegion("stateful"));
  const clients = Array.from({ length: count }, (_, i) =>
    statefulClient({ hubUrl, regions: [regions[i % regions.length], regions[(i + 1) % regions.length]], name: `client-${i}` }),
  );
  t.after(() => Promise.all(clients.map((c) => c.stop())));
  await startAll(clients, 10);
  return { regions, clients };
}

/**
 * Resolves once `ready(clients)` holds and every WebSocket the clients lost is open again
 * (polled every 50 ms within `ms`); rejects with each client's counts otherwise.
 */
async function transportsBack(clients, what, ready = () => true, ms = 30_000) {
  const deadline = Date.now() + ms;
  for (;;) {
    if (ready(clients) && clients.every((c) => c.reopened() === c.lost())) return;
    if (Date.now() > deadline) {
      const counts = clients.map((c) => `${c.name} lost ${c.lost()} reopened ${c.reopened()} reconnecting ${c.reconnects}`);
      throw new Error(`timed out after ${ms} ms waiting for ${what}:\n${counts.join("\n")}`);
    }
    await pause(50);
  }
}

/** min / median / p95 / max of `values` (ms), or null when there are none. */
function spread(values) {
  if (values.length === 0) return null;
  const sorted = [...values].sort((a, b) => a - b);
  const at = (q) => sorted[Math.min(sorted.length - 1, Math.floor(q * sorted.length))];
  return { count: sorted.length, min: sorted[0], median: at(0.5), p95: at(0.95), max: sorted.at(-1) };
}

/** The clients' resume times: lost -> WebSocket open again, and lost -> the next event. */
function resumeTimes(clients) {
  const transports = clients.flatMap((c) => c.transports);
  return {
    reopenMs: spread(transports.filter((t) => t.openedAt !== null).map((t) => t.openedAt - t.lostAt)),
    nextEventMs: spread(transports.filter((t) => t.eventAt !== null).map((t) => t.eventAt - t.lostAt)),
  };
}

// ---------------------------------------------------------------------------------------------
// The replicas' side: gateway_stateful_transports_total{outcome}

/** A replica's gateway_stateful_transports_total by outcome. */
async function transportOutcomes(replica) {
  const response = await fetch(`${replica.adminUrl}/metrics`, { signal: AbortSignal.timeout(2000) });
  const text = await response.text();
  const counts = Object.fromEntries(OUTCOMES.map((outcome) => [outcome, 0]));
  for (const line of text.split("\n")) {
    const match = /^gateway_stateful_transports_total\{[^}]*outcome="([a-z_]+)"[^}]*\} (\S+)$/.exec(line);
    if (match) counts[match[1]] = (counts[match[1]] ?? 0) + Number(match[2]);
  }
  return counts;
}

/**
 * Scrapes every replica's outcomes every 200 ms until stopped, keeping each process's last
 * reading (a restarted replica is a new process whose counters start at 0), so the totals
 * include replicas that have since been restarted. A process's counts after its last scrape
 * (a draining replica's last hand-overs) can be missed: `handed_over` is a lower bound.
 * Returns { stop() -> { total, byProcess } }.
 */
function sampleOutcomes(topology) {
  const last = new Map(); // "<replica name> pid <pid>" -> counts
  let running = true;
  const scrape = () =>
    Promise.all(
      topology.replicas.map(async (replica) => {
        try {
          const pid = pidIn(replica.pidFile);
          last.set(`${replica.name} pid ${pid}`, await transportOutcomes(replica));
        } catch {
          // stopped or restarting
        }
      }),
    );
  const loop = (async () => {
    while (running) {
      await scrape();
      await pause(200);
    }
  })();
  return {
    async stop() {
      running = false;
      await loop;
      await scrape();
      const total = Object.fromEntries(OUTCOMES.map((outcome) => [outcome, 0]));
      for (const counts of last.values()) for (const outcome of OUTCOMES) total[outcome] += counts[outcome] ?? 0;
      return { total, byProcess: Object.fromEntries(last) };
    },
  };
}

/**
 * Resolves once nginx sends requests to replica `i` again: after a restart, nginx's passive
 * health check leaves a replica that refused a connection out for its fail_timeout, and a
 * stateful client gets one attempt to reopen its WebSocket, so the next replica is drained only
 * when this one takes requests. Unauthenticated negotiates go through the load balancer until
 * one is counted by the replica (gateway_auth_failures_total), within `ms`.
 */
async function inRotation(topology, i, ms = 30_000) {
  const replica = topology.replicas[i];
  const before = await metric(replica, "gateway_auth_failures_total");
  const deadline = Date.now() + ms;
  for (;;) {
    const response = await fetch(`${topology.lb.hubUrl}/negotiate?negotiateVersion=1`, {
      method: "POST",
      signal: AbortSignal.timeout(5000),
    }).catch(() => null);
    await response?.arrayBuffer();
    if ((await metric(replica, "gateway_auth_failures_total")) > before) return;
    if (Date.now() > deadline) throw new Error(`nginx sent nothing to ${replica.name} within ${ms} ms`);
    await pause(50);
  }
}

// ---------------------------------------------------------------------------------------------
// Set-up and the common verdict

/**
 * `loadgen publish-stream` (chaos/topology.mjs) for one test: killed when the test ends, so a
 * failure midway leaves no publisher behind (and no unhandled rejection of its summary).
 */
function streamFor(t, options) {
  const stream = publishStream(options);
  stream.done.catch(() => {});
  t.after(() => stream.kill());
  return stream;
}

/**
 * A fresh topology for one test, stopped (and its state removed unless KEEP_CHAOS_STATE is set)
 * when the test ends. Its replicas run one worker thread, as replicas pinned to a core do: then
 * fan-out writes stateful frames straight to idle sockets and numbers them itself, the path whose
 * numbering and positions a hand-over carries (the Rust system tests run several threads and
 * cover the queued path). STATEFUL_REPLICAS_LOG sets the replicas' --log filter (e.g.
 * "info,gateway=debug", to see each connection's hand-overs in their logs).
 */
async function topologyFor(t, name, replicaArgs = "") {
  const stateDir = mkdtempSync(path.join(os.tmpdir(), `realtime-${name}-`));
  const log = process.env.STATEFUL_REPLICAS_LOG ? ` --log ${process.env.STATEFUL_REPLICAS_LOG}` : "";
  const topology = await startTopology(stateDir, `--worker-threads 1 ${replicaArgs}${log}`);
  t.after(async () => {
    await topology.stop();
    if (!process.env.KEEP_CHAOS_STATE) rmSync(stateDir, { recursive: true, force: true });
  });
  return topology;
}

/** Runs `body(topology)` on a fresh topology; a failure carries the topology's log tails. */
function onTopology(name, replicaArgs, body) {
  return async (t) => {
    const topology = await topologyFor(t, name, replicaArgs);
    try {
      await body(t, topology);
    } catch (error) {
      throw withLogTails(error, topology);
    }
  };
}

/**
 * Waits for every event of `summary` at every client, reports, and asserts: every event once
 * and in order, no onreconnecting, the same connection throughout, still connected.
 */
async function verdict(file, scenario, summary, clients, figures) {
  const behind = await settled(clients, summary, 30_000);
  const result = track(summary.groups, clients);
  const times = resumeTimes(clients);
  const fallbacks = clients.filter((c) => c.reconnects > 0).map((c) => ({ client: c.name, lost: c.lost(), errors: c.errors.slice(0, 3) }));
  report(file, scenario, result, { clients: clients.length, clientsBehindAtDeadline: behind, ...times, ...figures, fallbacks });
  console.log(`${scenario}: resume times ${JSON.stringify(times)}`);
  console.log(`${scenario}: ${JSON.stringify(figures)}`);

  // A client that fell back to a new connection (onreconnecting) misses every later event, as
  // it does not join again: say which fell back and why before counting the events.
  const fellBack = clients.filter((c) => c.reconnects > 0);
  const why = fellBack.map((c) => `${c.name} after losing ${c.lost()} WebSocket(s): ${c.errors.slice(0, 3).join(" | ")}`);
  assert.equal(fellBack.length, 0, `${fellBack.length} client(s) fired onreconnecting (a resume failed):\n${why.join("\n")}`);
  assertEveryEventOnce(summary, clients, result);
  for (const client of clients) {
    assert.equal(client.connection.connectionId, client.connectionId, `${client.name}: the connection changed`);
    assert.equal(client.connection.state, HubConnectionState.Connected, `${client.name}: not connected`);
  }
  return result;
}

// ---------------------------------------------------------------------------------------------
// The tests

test(
  "stateful clients lose nothing and never reconnect while the three replicas are restarted one after another",
  { timeout: 300_000 },
  onTopology("stateful-rolling", `--shutdown-delay ${SHUTDOWN_DELAY_MS}ms --drain-timeout ${DRAIN_TIMEOUT_MS}ms`, async (t, topology) => {
    const { regions, clients } = await startedClients(t, topology.lb.hubUrl);

    const outcomes = sampleOutcomes(topology);
    const stream = streamFor(t, { redisUrl: topology.redisUrl, regions, rate: RATE, secs: 30 });
    const restarts = [];
    let counted;
    try {
      await within(20_000, stream.reached(RATE * 2), "the stream to start");
      for (let i = 0; i < 3; i += 1) {
        const lostBefore = clients.reduce((n, c) => n + c.lost(), 0);
        // Every client is connected (the previous restart's resumed): this many are on it.
        const held = await metric(topology.replicas[i], "gateway_connections_active");
        const stopped = await killReplica(topology, i, "SIGTERM");
        // Its clients were parked and their sockets closed: each must be open again elsewhere.
        await transportsBack(clients, `the ${held} clients of ${topology.replicas[i].name} to resume`, (all) =>
          all.reduce((n, c) => n + c.lost(), 0) - lostBefore >= held,
        );
        restarts.push({ replica: topology.replicas[i].name, held, stopMs: stopped.stopMs, moved: clients.reduce((n, c) => n + c.lost(), 0) - lostBefore });
        await restartReplica(topology, i, stopped.argv);
        await inRotation(topology, i);
      }
    } finally {
      counted = await outcomes.stop();
    }
    const summary = await stream.done;
    await verdict("stateful-1-rolling-restart", "stateful rolling restart x3", summary, clients, {
      settings: { rate: RATE, clients: CLIENTS, groups: GROUPS, shutdownDelayMs: SHUTDOWN_DELAY_MS, drainTimeoutMs: DRAIN_TIMEOUT_MS },
      restarts,
      outcomes: counted,
    });
    // Every replica was drained once, so every client lost its WebSocket at least once, and a
    // drained replica cannot take its clients back: they resumed on another one.
    for (const client of clients) assert.ok(client.lost() >= 1, `${client.name} never lost its WebSocket`);
    for (const { replica, held, moved } of restarts) {
      assert.ok(held > 0, `no client was on ${replica}`);
      assert.equal(moved, held, `the clients that lost their WebSocket when ${replica} was drained`);
    }
    assert.ok(counted.total.adopted > 0, `no resume landed on another replica: ${JSON.stringify(counted.total)}`);
  }),
);

test(
  "stateful clients cut from their replica by the network resume and lose nothing",
  { timeout: 300_000 },
  onTopology("stateful-netcut", "", async (t, topology) => {
    // nginx reaches the third replica through a proxy: stopping it cuts that replica off.
    const proxy = await cutProxy(topology.replicas[2].port);
    t.after(() => proxy.close());
    await routeReplicaThrough(topology, 2, proxy.port, () => proxy.stats.accepted > 0);

    const { regions, clients } = await startedClients(t, topology.lb.hubUrl);
    const behindProxy = proxy.webSockets();
    assert.ok(behindProxy > 0, "no client reached the replica behind the proxy");

    const outcomes = sampleOutcomes(topology);
    const stream = streamFor(t, { redisUrl: topology.redisUrl, regions, rate: RATE, secs: 15 });
    let cut;
    let counted;
    try {
      await within(20_000, stream.reached(RATE * 2), "the stream to start");
      // Both directions reset: the replica and nginx each see the connection fail.
      cut = await proxy.stop("reset");
      await transportsBack(clients, "the cut clients to resume", (all) => all.filter((c) => c.lost() > 0).length >= cut.webSockets);
      await proxy.start();
      // Events published from here on reach everyone too (the stream runs on).
      const queued = stream.progress.queued;
      await within(20_000, stream.reached(queued + RATE), "more events after the proxy is back");
    } finally {
      counted = await outcomes.stop();
    }
    const summary = await stream.done;
    const cutClients = clients.filter((c) => c.lost() > 0);
    await verdict("stateful-2-network-cut", "stateful network cut lb-replica", summary, clients, {
      settings: { rate: RATE, clients: CLIENTS, groups: GROUPS },
      webSocketsBehindProxy: behindProxy,
      cut,
      clientsCut: cutClients.length,
      outcomes: counted,
    });
    assert.equal(cut.webSockets, behindProxy, "the proxy cut the WebSockets it carried");
    assert.equal(cutClients.length, cut.webSockets, "exactly the clients behind the proxy lost their WebSocket");
    for (const client of cutClients) assert.equal(client.lost(), 1, `${client.name} lost its WebSocket more than once`);
  }),
);

test(
  "stateful clients whose sockets are cut under them resume, wherever nginx sends them, and lose nothing",
  { timeout: 300_000 },
  onTopology("stateful-clientcut", "", async (t, topology) => {
    // The clients reach nginx through a proxy that drops their connections.
    const front = await cutProxy(topology.lb.port);
    t.after(() => front.close());
    const { regions, clients } = await startedClients(t, `http://127.0.0.1:${front.port}/hub/v1`);

    const outcomes = sampleOutcomes(topology);
    const stream = streamFor(t, { redisUrl: topology.redisUrl, regions, rate: RATE, secs: 20 });
    const cuts = [];
    let counted;
    try {
      await within(20_000, stream.reached(RATE * 2), "the stream to start");
      for (const [round, how] of ["fin", "reset", "fin"].entries()) {
        const cut = front.cut(how);
        cuts.push({ how, ...cut });
        await transportsBack(clients, `every client to resume after cut ${round + 1}`, (all) => all.every((c) => c.lost() === round + 1));
        const queued = stream.progress.queued;
        await within(20_000, stream.reached(queued + RATE / 2), `events after cut ${round + 1}`);
      }
    } finally {
      counted = await outcomes.stop();
    }
    const summary = await stream.done;
    await verdict("stateful-3-client-cut", "stateful client socket cut x3", summary, clients, {
      settings: { rate: RATE, clients: CLIENTS, groups: GROUPS },
      cuts,
      outcomes: counted,
    });
    for (const cut of cuts) assert.equal(cut.webSockets, CLIENTS, `a cut dropped ${cut.webSockets} WebSockets, not ${CLIENTS}`);
  }),
);

test(
  "a stateful connection carried to another replica and back to the first keeps going",
  { timeout: 120_000 },
  onTopology("stateful-back", "", async (t, topology) => {
    // The clients reach the replicas directly through a proxy the test points at one replica,
    // then another: each cut's resume lands where the test says, with no load balancer choosing.
    const [first, second] = topology.replicas;
    const proxy = await cutProxy(first.port);
    t.after(() => proxy.close());
    const { regions, clients } = await startedClients(t, `http://127.0.0.1:${proxy.port}/hub/v1`, 3);

    const outcomes = sampleOutcomes(topology);
    const stream = streamFor(t, { redisUrl: topology.redisUrl, regions, rate: RATE, secs: 10 });
    const moves = [];
    let counted;
    try {
      await within(20_000, stream.reached(RATE), "the stream to start");
      for (const [round, replica] of [second, first].entries()) {
        proxy.retarget(replica.port);
        proxy.cut("fin");
        moves.push(replica.name);
        await transportsBack(clients, `the clients to resume on ${replica.name}`, (all) => all.every((c) => c.lost() === round + 1));
        const queued = stream.progress.queued;
        await within(20_000, stream.reached(queued + RATE / 2), `events after the move to ${replica.name}`);
      }
    } finally {
      counted = await outcomes.stop();
    }
    const summary = await stream.done;
    await verdict("stateful-4-there-and-back", "stateful carried there and back", summary, clients, {
      settings: { rate: RATE, clients: clients.length, groups: GROUPS },
      path: [first.name, ...moves],
      outcomes: counted,
    });
  }),
);
