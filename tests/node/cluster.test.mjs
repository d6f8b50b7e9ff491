// Redis Cluster tests of issue 13: two gateway replicas on a local cluster (three masters with a
// replica each, cluster/redis-cluster.mjs) over sharded pub/sub, official-client connections in
// groups spread over every master, a steady stream published into the cluster by `loadgen
// publish-stream` (publisher-lib's BackgroundPublisher on a `redis+cluster://` URL), and one
// change of the cluster mid-stream: a busy group's slot moved to another master, a node added
// and a slot moved to it, a master SIGKILLed and its replica promoted. Every client must end
// with every event of its groups once and in order (chaos/tracker.mjs). Each scenario prints a
// row and writes chaos-results/cluster-<n>.json with the longest time each group went without
// a live delivery.
//
// Knobs: CLUSTER_RATE [120] events/s over all groups, CLUSTER_SECS [12] s of publishing,
// CLUSTER_CLIENTS [24] connections (each in two groups). Needs redis-server 7 and redis-cli,
// and `cargo build --workspace --bins` (gateway and loadgen next to GATEWAY_BIN).

import assert from "node:assert/strict";
import { after, before, test } from "node:test";

import { dispatcherToken, startGateway, uniqueRegion } from "./harness.mjs";
import { resumingClient, startAll } from "./chaos/client.mjs";
import { metric, publishStream } from "./chaos/topology.mjs";
import { report, track } from "./chaos/tracker.mjs";
import { startCluster, until } from "./cluster/redis-cluster.mjs";

const RATE = Number(process.env.CLUSTER_RATE ?? 120);
const SECS = Number(process.env.CLUSTER_SECS ?? 12);
const CLIENTS = Number(process.env.CLUSTER_CLIENTS ?? 24);
const GROUPS_PER_MASTER = 2;
const TEST_TIMEOUT = 180_000;

let cluster;
let gateways = [];

before(async () => {
  cluster = await startCluster({ masters: 3, replicas: 1 });
  gateways = [];
  for (const name of ["cluster-gateway-1", "cluster-gateway-2"]) {
    gateways.push(await startGateway({ name, args: ["--redis-url", cluster.url] }));
  }
});

after(async () => {
  await Promise.all(gateways.map((g) => g.stop()));
  if (cluster) await cluster.stop();
});

/**
 * Fresh regions, GROUPS_PER_MASTER on each master that serves more than a few slots (by the slot
 * of their group's hash tag; a node added by an earlier test serves one slot).
 */
async function regionsOnEveryMaster() {
  const size = (ranges) => ranges.reduce((n, [start, end]) => n + end - start + 1, 0);
  const masters = (await cluster.masters()).filter((m) => size(m.ranges) > 100).map((m) => m.port);
  const chosen = new Map(masters.map((port) => [port, []]));
  for (let tries = 0; [...chosen.values()].some((list) => list.length < GROUPS_PER_MASTER); tries += 1) {
    assert.ok(tries < 10_000, "regions on every master");
    const region = uniqueRegion("cl");
    const owner = await cluster.ownerOf(await cluster.slotOf(`{/dispatch/${region}}`));
    const list = chosen.get(owner);
    if (list && list.length < GROUPS_PER_MASTER) list.push(region);
  }
  return [...chosen.values()].flat();
}

/** The longest time between two live deliveries of one group to one client, per group. */
function longestSilences(clients) {
  const longest = {};
  for (const client of clients) {
    for (const [group, got] of Object.entries(client.received)) {
      for (let i = 1; i < got.length; i += 1) {
        longest[group] = Math.max(longest[group] ?? 0, got[i].at - got[i - 1].at);
      }
    }
  }
  return longest;
}

/**
 * Publishes a stream to fresh groups while `change(regions)` alters the cluster a third of the
 * way in; checks that every client got every event once and in order. Returns what `change`
 * returned and the result.
 */
async function scenario(name, file, change) {
  const regions = await regionsOnEveryMaster();
  const token = dispatcherToken(regions);
  const clients = Array.from({ length: CLIENTS }, (_, i) =>
    resumingClient({
      hubUrl: gateways[i % gateways.length].hubUrl,
      token,
      regions: [regions[i % regions.length], regions[(i + 1) % regions.length]],
      name: `${file}-client-${i}`,
    }),
  );
  try {
    await startAll(clients);
    const stream = publishStream({ redisUrl: cluster.url, regions, rate: RATE, secs: SECS });
    await stream.reached(Math.floor((RATE * SECS) / 3));
    const changed = await change(regions);
    const summary = await stream.done;
    const published = summary.groups;
    for (const region of regions) assert.ok(published[region]?.length > 0, `events were published to ${region}`);
    // Every client ends up with every event of its groups (bounded wait), then the check.
    await until(
      "every client has every event",
      () =>
        clients.every((client) =>
          client.regions.every((region) => (client.received[`/dispatch/${region}`] ?? []).length >= published[region].length),
        ),
      30_000,
    ).catch(() => {});
    const result = track(published, clients);
    const silences = longestSilences(clients);
    const resubscribes = [];
    for (const gateway of gateways) resubscribes.push(await metric(gateway, "gateway_broker_resubscribes_total"));
    report(file, name, result, { changed, longestSilenceMs: silences, resubscribes, publisher: summary.dropped ?? null });
    const { totals } = result;
    assert.equal(totals.lost, 0, `${name}: lost events ${JSON.stringify(result.problems.slice(0, 2)).slice(0, 2000)}`);
    assert.equal(totals.duplicates, 0, `${name}: duplicates`);
    assert.equal(totals.outOfOrder, 0, `${name}: out of order`);
    assert.equal(totals.unknown, 0, `${name}: events nobody published`);
    assert.equal(totals.seqGaps, 0, `${name}: gaps in positions`);
    return { changed, result };
  } finally {
    await Promise.all(clients.map((client) => client.stop()));
  }
}

test("a busy group's slot moved to another master mid-stream: every client gets every event once, in order", { timeout: TEST_TIMEOUT }, async () => {
  await scenario("slot moved", "cluster-1-slot-moved", async (regions) => {
    const slot = await cluster.slotOf(`{/dispatch/${regions[0]}}`);
    const from = await cluster.ownerOf(slot);
    const to = (await cluster.masters()).find((m) => m.port !== from).port;
    const started = Date.now();
    await cluster.migrateSlot(slot, to);
    assert.equal(await cluster.ownerOf(slot), to);
    return { slot, from, to, migrationMs: Date.now() - started };
  });
});

test("a node added and a busy group's slot moved to it mid-stream: every client gets every event once, in order", { timeout: TEST_TIMEOUT }, async () => {
  await scenario("node added", "cluster-2-node-added", async (regions) => {
    const started = Date.now();
    const port = await cluster.addNode();
    const slot = await cluster.slotOf(`{/dispatch/${regions[1]}}`);
    const from = await cluster.ownerOf(slot);
    await cluster.migrateSlot(slot, port);
    assert.equal(await cluster.ownerOf(slot), port);
    const addAndMoveMs = Date.now() - started;
    // Readiness covers the new master too: each replica probes a health channel there.
    const probed = await until(
      "each gateway probes the new master",
      async () => {
        const channels = await cluster.node(port).command("PUBSUB", "SHARDCHANNELS", "rt:health:*");
        return channels.length >= gateways.length && channels;
      },
      30_000,
    );
    return { port, slot, from, addAndMoveMs, healthChannelsOnNewMaster: probed.length, healthAfterMs: Date.now() - started };
  });
});

test("a master SIGKILLed and its replica promoted mid-stream: every client gets every event once, in order", { timeout: TEST_TIMEOUT }, async () => {
  await scenario("master killed", "cluster-3-master-killed", async (regions) => {
    const slot = await cluster.slotOf(`{/dispatch/${regions[0]}}`);
    const master = await cluster.ownerOf(slot);
    const failoverMs = await cluster.killMaster(master);
    // The gateways come back to ready: the round trip covers the promoted master too.
    for (const gateway of gateways) {
      await until(`${gateway.adminUrl} ready again`, async () => (await fetch(`${gateway.adminUrl}/readyz`)).status === 200);
    }
    return { killed: master, slot, failoverMs };
  });
});
