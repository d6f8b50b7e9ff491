// Three replicas behind nginx, sharing publications through Redis: the local topology that
// deploy/local/up starts (redis-server, three gateways, nginx round-robin without sticky
// sessions), driven with the official client through the load balancer.
//
// Needs redis-server, nginx, curl and envsubst on this machine (deploy/local/up says which is
// missing). The topology's logs stay in a temporary state directory, printed when a test fails.

import assert from "node:assert/strict";
import { execFile } from "node:child_process";
import { randomUUID } from "node:crypto";
import { mkdtempSync, rmSync } from "node:fs";
import os from "node:os";
import path from "node:path";
import { after, before, test } from "node:test";

import { HubConnectionState } from "@microsoft/signalr";

import {
  GATEWAY_BIN,
  JWT_SECRET,
  SERVICE_KEY,
  EPOCH,
  arrivals,
  assertJoinResult,
  connect,
  contractorGroup,
  contractorToken,
  deferred,
  delivered,
  dispatchGroup,
  dispatcherToken,
  hubConnection,
  inbox,
  jobAssigned,
  join,
  publishAccepted,
  recommendationReady,
  uniqueRegion,
  within,
} from "./harness.mjs";
import { killReplica, startTopology, withLogTails } from "./local-topology.mjs";

const RETRY_DELAYS = [0, 200, 500, 1000, 1000, 2000];

/**
 * Runs realtime-publish (built next to the gateway) with `args` and `event` as JSON; resolves with
 * the receipt it prints on stdout, rejects with its output when it exits non-zero.
 */
function realtimePublish(args, event) {
  const cli = path.resolve(path.dirname(GATEWAY_BIN), "realtime-publish");
  // The key comes from `args` only: REALTIME_PUBLISH_KEY from the outer shell must not leak in.
  const cliEnv = Object.fromEntries(Object.entries(process.env).filter(([key]) => key !== "REALTIME_PUBLISH_KEY"));
  return new Promise((resolve, reject) => {
    execFile(cli, [...args, JSON.stringify(event)], { env: cliEnv, timeout: 10_000 }, (error, stdout, stderr) => {
      if (error) {
        reject(new Error(`realtime-publish failed: ${error.message}\n${stdout}\n${stderr}`));
        return;
      }
      try {
        resolve(JSON.parse(stdout));
      } catch {
        reject(new Error(`realtime-publish printed no JSON receipt: ${stdout}\n${stderr}`));
      }
    });
  });
}

let stateDir;
let topology;
let lb; // nginx: { hubUrl, eventsUrl }
let replicas; // [{ name, hubUrl, eventsUrl, adminUrl, pidFile }]

before(async () => {
  stateDir = mkdtempSync(path.join(os.tmpdir(), "realtime-lb-"));
  topology = await startTopology(stateDir, { gatewayBin: GATEWAY_BIN, jwtSecret: JWT_SECRET, serviceKey: SERVICE_KEY, name: "lb" });
  ({ lb, replicas } = topology);
});

after(async () => {
  if (topology) await topology.stop();
  if (stateDir && !process.env.KEEP_LB_STATE) rmSync(stateDir, { recursive: true, force: true });
});

/** gateway_connections_active of a replica (0 when the gauge was never set). */
async function activeConnections(replica) {
  const response = await fetch(`${replica.adminUrl}/metrics`, { signal: AbortSignal.timeout(5000) });
  assert.equal(response.status, 200, `${replica.name} /metrics`);
  const text = await response.text();
  const line = text.split("\n").find((l) => /^gateway_connections_active(\{[^}]*\})? /.test(l));
  return line ? Number(line.split(" ").at(-1)) : 0;
}

/** A test body whose failures carry the topology's logs. */
function withLogs(body) {
  return async (t) => {
    try {
      await body(t);
    } catch (error) {
      throw withLogTails(error, topology);
    }
  };
}

/**
 * gateway_connections_active of every replica in `among`, once they add up to `total` (polled
 * with a deadline: a client's stop() may resolve just before its replica counts the close).
 */
async function settledActive(among, total, ms = 5000) {
  const deadline = Date.now() + ms;
  for (;;) {
    const active = await Promise.all(among.map(activeConnections));
    if (active.reduce((a, b) => a + b, 0) === total) return active;
    if (Date.now() > deadline) throw new Error(`connections per replica ${active}, expected ${total} in all`);
    await new Promise((resolve) => setTimeout(resolve, 50));
  }
}

test("clients negotiating through nginx spread over the three replicas and all receive an event published once to one replica",
  withLogs(async (t) => {
    const region = uniqueRegion("lb");
    const token = dispatcherToken([region]);
    const clients = [];
    // One after the other: round-robin then gives every replica some of the WebSockets.
    for (let i = 0; i < 6; i += 1) clients.push(await connect(t, lb, token));
    const inboxes = clients.map((client) => inbox(client, "RecommendationReady"));
    const group = dispatchGroup(region);
    // Whatever replica a client reached, the group has one history in Redis: one epoch, at 0.
    const heads = await Promise.all(clients.map((client) => join(client, "JoinDispatchGroup", region, { seq: 0 })));
    const { epoch } = heads[0];
    for (const head of heads) assert.equal(head.epoch, epoch, "every replica reports the same epoch");

    const active = await settledActive(replicas, 6);
    for (const [i, count] of active.entries()) assert.ok(count > 0, `${replicas[i].name} has no connection: ${active}`);

    const event = recommendationReady(region);
    const published = await publishAccepted(replicas[1], event);
    const received = await Promise.all(inboxes.map((events) => events.nth(1)));
    for (const args of received) assert.deepStrictEqual(args, [event, { group, epoch, seq: 1 }]);
    assert.deepStrictEqual(received[0], delivered(event, published, group));

    // Published once more straight into Redis by realtime-publish (publisher-lib's Publisher).
    const second = recommendationReady(region);
    const viaRedis = await realtimePublish(["--redis-url", topology.redisUrl], second);
    assert.equal(viaRedis.via, "redis", JSON.stringify(viaRedis));
    assert.deepStrictEqual(
      viaRedis.groups.map(({ group: name, epoch: e, seq, duplicate }) => ({ group: name, epoch: e, seq, duplicate })),
      [{ group, epoch, seq: 2, duplicate: false }],
      JSON.stringify(viaRedis),
    );
    const again = await Promise.all(inboxes.map((events) => events.nth(2)));
    for (const args of again) assert.deepStrictEqual(args, [second, { group, epoch, seq: 2 }]);

    // And once more by realtime-publish through another replica's POST /api/v1/events.
    const third = recommendationReady(region);
    const gatewayUrl = new URL(replicas[2].eventsUrl).origin;
    const viaGateway = await realtimePublish(["--gateway-url", gatewayUrl, "--key", SERVICE_KEY], third);
    assert.equal(viaGateway.via, "gateway", JSON.stringify(viaGateway));
    assert.equal(viaGateway.status, 202, JSON.stringify(viaGateway));
    assert.equal(viaGateway.duplicate, false, JSON.stringify(viaGateway));
    assert.deepStrictEqual(viaGateway.positions, [{ group, epoch, seq: 3 }], JSON.stringify(viaGateway));
    const thirdTime = await Promise.all(inboxes.map((events) => events.nth(3)));
    for (const args of thirdTime) assert.deepStrictEqual(args, [third, { group, epoch, seq: 3 }]);
  }));

test("a contractor connected through nginx receives only its own JobAssigned, whichever replica publishes",
  withLogs(async (t) => {
    const region = uniqueRegion("lb");
    const ownId = randomUUID();
    const otherId = randomUUID();
    const own = await connect(t, lb, contractorToken(ownId));
    const other = await connect(t, lb, contractorToken(otherId), { skipNegotiation: true });
    const ownEvents = arrivals(own);
    const otherEvents = arrivals(other);
    const ownHead = await join(own, "JoinContractorGroup", ownId, { seq: 0 });
    const otherHead = await join(other, "JoinContractorGroup", otherId, { seq: 0 });

    const forOther = jobAssigned(region, otherId);
    const forOwn = jobAssigned(region, ownId);
    await publishAccepted(replicas[0], forOther);
    await publishAccepted(replicas[2], forOwn);

    // Published in this order, the other contractor's event would arrive first had it been sent.
    assert.deepStrictEqual((await ownEvents.take(1))[0], {
      target: "JobAssigned",
      args: [forOwn, { group: contractorGroup(ownId), epoch: ownHead.epoch, seq: 1 }],
    });
    assert.deepStrictEqual((await otherEvents.take(1))[0], {
      target: "JobAssigned",
      args: [forOther, { group: contractorGroup(otherId), epoch: otherHead.epoch, seq: 1 }],
    });
  }));

test("the clients of a replica stopped with SIGTERM reconnect through nginx to the others and receive later events",
  withLogs(async (t) => {
    const region = uniqueRegion("lb");
    const token = dispatcherToken([region]);
    const stopped = replicas[1];
    const clients = [];
    const lost = [];
    const allLost = deferred();
    let expectedLost = Infinity;
    for (let i = 0; i < 6; i += 1) {
      const connection = hubConnection(t, lb, token, {
        configure: (builder) => builder.withAutomaticReconnect(RETRY_DELAYS),
      });
      const state = {
        connection,
        events: inbox(connection, "RecommendationReady"),
        rejoined: deferred(),
        closedWith: "not closed",
      };
      state.rejoined.promise.catch(() => {}); // onclose at the end of the test must not be unhandled
      connection.onreconnecting(() => {
        lost.push(state);
        if (lost.length >= expectedLost) allLost.resolve();
      });
      connection.onreconnected((connectionId) => {
        connection
          .invoke("JoinDispatchGroup", region)
          .then((result) => state.rejoined.resolve({ connectionId, result }), state.rejoined.reject);
      });
      connection.onclose((error) => {
        state.closedWith = error;
        state.rejoined.reject(new Error(`a client gave up instead of reconnecting: ${error?.message ?? error}`));
      });
      await within(10_000, connection.start(), "start() through nginx");
      state.head = await join(connection, "JoinDispatchGroup", region, { seq: 0 });
      state.firstId = connection.connectionId;
      clients.push(state);
    }

    const before = (await settledActive(replicas, 6))[1];
    assert.ok(before > 0, `${stopped.name} has no connection to lose`);
    expectedLost = before;
    const group = dispatchGroup(region);
    const { epoch } = clients[0].head;
    assert.match(epoch, EPOCH);
    for (const client of clients) assert.equal(client.head.epoch, epoch, "one history for the group on every replica");
    const event = recommendationReady(region);
    await publishAccepted(replicas[0], event);
    for (const client of clients) assert.deepStrictEqual(await client.events.nth(1), [event, { group, epoch, seq: 1 }]);

    await killReplica(topology, 1, "SIGTERM", 15_000);

    // Its clients were closed with reconnect allowed: exactly those reconnect.
    await within(10_000, allLost.promise, `onreconnecting of the ${before} clients of ${stopped.name}`);
    const moved = [...lost];
    const rejoins = await within(20_000, Promise.all(moved.map((client) => client.rejoined.promise)), "reconnect and rejoin");
    for (const [i, client] of moved.entries()) {
      assert.notEqual(rejoins[i].connectionId, client.firstId, "a new connection was negotiated");
      // The history lives in Redis: the other replicas report the same epoch and head.
      assertJoinResult(rejoins[i].result, group, { epoch, seq: 1 });
    }
    for (const client of clients) {
      assert.equal(client.connection.state, HubConnectionState.Connected);
      assert.equal(client.closedWith, "not closed");
    }
    assert.equal(lost.length, before, `only the clients of ${stopped.name} reconnected`);
    await settledActive([replicas[0], replicas[2]], 6);

    const later = recommendationReady(region, { schemaVersion: 2 });
    await publishAccepted(replicas[2], later);
    for (const client of clients) assert.deepStrictEqual(await client.events.nth(2), [later, { group, epoch, seq: 2 }]);
  }));
