import assert from "node:assert/strict";
import { test } from "node:test";

import { RealtimeClient } from "../src/index.js";
import type { ConnectionState, JobAssigned, Position, RealtimeOptions, RecommendationReady, ResyncReason } from "../src/index.js";
import type { ConnectionOptions } from "../src/connection.js";
import { assignment, recommendation } from "./fixtures.js";
import { FakeHub, factoryOf, settle } from "./fake-hub.js";

const G = "/dispatch/west";
const C = "/contractor/11111111-2222-4333-8444-555555555555";

/** A client on a fake hub whose backoff waits are recorded and return at once. */
function setup(options: Partial<RealtimeOptions> = {}) {
  const hub = new FakeHub();
  const delays: number[] = [];
  const client = new RealtimeClient(
    { url: "http://127.0.0.1:1/hub/v1", accessTokenFactory: () => "token", logLevel: "none", ...options },
    { connect: factoryOf(hub), random: () => 0.5, sleep: async (ms) => void delays.push(ms) },
  );
  const states: Array<[ConnectionState, string | undefined]> = [];
  const resyncs: Array<[string, ResyncReason]> = [];
  const errors: string[] = [];
  const received: Array<[string, unknown, Position]> = [];
  client.onStateChange((state, error) => states.push([state, error?.message]));
  client.onResyncRequired((group, reason) => resyncs.push([group, reason]));
  client.onError((error) => errors.push(error.message));
  client.on("RecommendationReady", (event: RecommendationReady, position) => received.push([event.type, event, position]));
  client.on("JobAssigned", (event: JobAssigned, position) => received.push([event.type, event, position]));
  return { hub, client, delays, states, resyncs, errors, received };
}

/** Starts the client and lets the fake's start attempt `n` (0-based) succeed. */
async function connect(hub: FakeHub, n = 0): Promise<void> {
  (await hub.starts.at(n)).resolve();
  await settle();
}

test("start() retries forever with capped, jittered backoff and resolves once connected", async () => {
  const { hub, client, delays, states } = setup({ reconnect: { initialDelayMs: 100, maxDelayMs: 400 } });
  const started = client.start();
  assert.equal(client.state, "connecting");
  for (let i = 0; i < 5; i += 1) (await hub.starts.at(i)).reject(new Error(`refused ${i}`));
  await connect(hub, 5);
  await started;
  assert.equal(client.state, "connected");
  // The first attempt is immediate; then half the ceiling plus half of it again times random() = 0.5.
  assert.deepEqual(delays, [75, 150, 300, 300, 300]);
  assert.equal(client.lastError?.message, "refused 4");
  assert.deepEqual(states, [["connecting", undefined], ["connected", undefined]]);
  assert.equal(client.start(), client.start(), "start() while started is the same promise");
});

test("start() gives up after maxAttempts and says why", async () => {
  const { hub, client, states } = setup({ reconnect: { maxAttempts: 2 } });
  const started = client.start();
  (await hub.starts.at(0)).reject(new Error("first"));
  (await hub.starts.at(1)).reject(new Error("second"));
  await assert.rejects(started, /second/);
  assert.equal(client.state, "disconnected");
  assert.deepEqual(states.at(-1), ["disconnected", "second"]);
});

test("stop() during the backoff ends the retries", async () => {
  const hub = new FakeHub();
  let wake: () => void = () => {};
  const client = new RealtimeClient(
    { url: "http://127.0.0.1:1/hub/v1", accessTokenFactory: () => "t", logLevel: "none" },
    { connect: factoryOf(hub), sleep: () => new Promise((resolve) => (wake = resolve)) },
  );
  const started = client.start();
  (await hub.starts.at(0)).reject(new Error("down"));
  await settle();
  await client.stop();
  await assert.rejects(started, /stopped/);
  wake();
  await settle();
  assert.equal(hub.starts.items.length, 1, "no attempt after stop()");
  assert.equal(client.state, "disconnected");
});

test("joins requested while disconnected are made on connect, without a position", async () => {
  const { hub, client } = setup();
  const dispatch = client.joinDispatch("west");
  const contractor = client.joinContractor("11111111-2222-4333-8444-555555555555");
  assert.equal(hub.calls.items.length, 0);
  const started = client.start();
  await connect(hub);
  await started;
  const [first, second] = [await hub.calls.at(0), await hub.calls.at(1)];
  assert.deepEqual([first.method, first.args], ["JoinDispatchGroup", ["west", null]]);
  assert.deepEqual([second.method, second.args], ["JoinContractorGroup", ["11111111-2222-4333-8444-555555555555", null]]);
  first.reply.resolve({ group: G, epoch: "a", seq: 3 });
  second.reply.resolve({ group: C, epoch: "c", seq: 0 });
  assert.deepEqual(await dispatch, { group: G, epoch: "a", seq: 3 });
  assert.deepEqual(await contractor, { group: C, epoch: "c", seq: 0 });
  assert.deepEqual(client.positions(), { [G]: { group: G, epoch: "a", seq: 3 }, [C]: { group: C, epoch: "c", seq: 0 } });
});

test("invalid names are refused before anything is sent", async () => {
  const { client } = setup();
  await assert.rejects(client.joinDispatch("we st"), /invalid region/);
  await assert.rejects(client.joinContractor(""), /invalid contractor id/);
  await assert.rejects(client.leaveDispatch("x".repeat(65)), /invalid region/);
  assert.deepEqual(client.positions(), {});
});

/** A connected client that joined /dispatch/west at (a, 0). */
async function joined(options: Partial<RealtimeOptions> = {}) {
  const env = setup(options);
  const started = env.client.start();
  await connect(env.hub);
  await started;
  const join = env.client.joinDispatch("west");
  (await env.hub.calls.at(0)).reply.resolve({ group: G, epoch: "a", seq: 0 });
  await join;
  return env;
}

test("events are delivered once and in order; gaps and new epochs ask for a resync", async () => {
  const { hub, received, resyncs, errors } = await joined();
  const events = [1, 2, 2, 1, 3, 6, 5, 7].map((seq) => recommendation({ seq }));
  for (const event of events) hub.emit("RecommendationReady", event, { group: G, epoch: "a", seq: event["seq"] });
  hub.emit("recommendationready", recommendation({ seq: 1, epoch: "b" }), { group: G, epoch: "b", seq: 1 });
  assert.deepEqual(
    received.map(([, , position]) => [position.epoch, position.seq]),
    [["a", 1], ["a", 2], ["a", 3], ["a", 6], ["a", 7], ["b", 1]],
  );
  assert.deepEqual(resyncs, [[G, "gap"], [G, "epoch_changed"]]);
  assert.deepEqual(errors, []);
});

test("malformed events go to onError, not to handlers; unknown fields reach handlers", async () => {
  const { hub, received, errors } = await joined();
  hub.emit("RecommendationReady", recommendation({ jobId: 7 }), { group: G, epoch: "a", seq: 1 });
  hub.emit("RecommendationReady", assignment(), { group: G, epoch: "a", seq: 1 });
  hub.emit("JobAssigned", assignment(), { group: G, epoch: "a", seq: "1" });
  hub.emit("JobAssigned", "not an object", { group: G, epoch: "a", seq: 1 });
  assert.equal(received.length, 0);
  assert.equal(errors.length, 4);
  assert.match(errors[0] ?? "", /`jobId` must be a string/);
  assert.match(errors[1] ?? "", /its type is JobAssigned/);
  assert.match(errors[2] ?? "", /`seq`/);
  const event = assignment({ schemaVersion: 2 });
  hub.emit("JobAssigned", event, { group: G, epoch: "a", seq: 1 });
  assert.deepEqual(received, [["JobAssigned", event, { group: G, epoch: "a", seq: 1 }]]);
});

test("a throwing handler affects neither the other handlers nor later events", async () => {
  const { client, hub, received, errors } = await joined();
  const seen: number[] = [];
  client.on("RecommendationReady", () => {
    throw new Error("boom");
  });
  client.on("RecommendationReady", (_event, position) => seen.push(position.seq));
  client.onResyncRequired(() => {
    throw new Error("resync boom");
  });
  hub.emit("RecommendationReady", recommendation(), { group: G, epoch: "a", seq: 1 });
  hub.emit("RecommendationReady", recommendation(), { group: G, epoch: "a", seq: 3 });
  assert.deepEqual(seen, [1, 3]);
  assert.equal(received.length, 2);
  assert.deepEqual(errors, [
    "a RecommendationReady handler threw: boom",
    "a resync handler threw: resync boom",
    "a RecommendationReady handler threw: boom",
  ]);
  assert.equal(client.state, "connected");
});

test("unsubscribing stops a handler", async () => {
  const { client, hub } = await joined();
  const seen: number[] = [];
  const off = client.on("RecommendationReady", (_event, position) => seen.push(position.seq));
  hub.emit("RecommendationReady", recommendation(), { group: G, epoch: "a", seq: 1 });
  off();
  hub.emit("RecommendationReady", recommendation(), { group: G, epoch: "a", seq: 2 });
  assert.deepEqual(seen, [1]);
});

test("after a lost connection it reconnects, rejoins with the last position and resumes in order", async () => {
  const { client, hub, received, resyncs, states, delays } = await joined();
  hub.emit("RecommendationReady", recommendation(), { group: G, epoch: "a", seq: 1 });
  hub.emit("RecommendationReady", recommendation(), { group: G, epoch: "a", seq: 2 });

  hub.close(new Error("Server returned an error on close: access token expired; reconnect with a fresh one"));
  assert.equal(client.state, "reconnecting");
  assert.match(client.lastError?.message ?? "", /token expired/);
  (await hub.starts.at(1)).reject(new Error("still down"));
  await connect(hub, 2);
  assert.equal(client.state, "connected");
  assert.deepEqual(delays, [187.5, 375], "the first retry after a loss waits too, jittered");

  const rejoin = await hub.calls.at(1);
  assert.deepEqual([rejoin.method, rejoin.args], ["JoinDispatchGroup", ["west", { epoch: "a", seq: 2 }]]);
  // The gateway replays what was missed (a duplicate of 2 included, to be safe), then resolves.
  for (const seq of [2, 3, 4]) hub.emit("RecommendationReady", recommendation(), { group: G, epoch: "a", seq });
  rejoin.reply.resolve({ group: G, epoch: "a", seq: 4, recovered: true });
  await settle();
  hub.emit("RecommendationReady", recommendation(), { group: G, epoch: "a", seq: 5 });

  assert.deepEqual(received.map(([, , p]) => p.seq), [1, 2, 3, 4, 5]);
  assert.deepEqual(resyncs, []);
  assert.deepEqual(client.positions(), { [G]: { group: G, epoch: "a", seq: 5 } });
  assert.deepEqual(
    states.map(([state]) => state),
    ["connecting", "connected", "reconnecting", "connected"],
  );
});

test("a rejoin that could not recover asks for a resync once; the new epoch's events follow", async () => {
  const { hub, received, resyncs } = await joined();
  hub.emit("RecommendationReady", recommendation(), { group: G, epoch: "a", seq: 1 });
  hub.close(undefined);
  await connect(hub, 1);
  const rejoin = await hub.calls.at(1);
  assert.deepEqual(rejoin.args, ["west", { epoch: "a", seq: 1 }]);
  rejoin.reply.resolve({ group: G, epoch: "b", seq: 0, recovered: false });
  await settle();
  hub.emit("RecommendationReady", recommendation(), { group: G, epoch: "b", seq: 1 });
  assert.deepEqual(resyncs, [[G, "recovery_incomplete"]]);
  assert.deepEqual(received.map(([, , p]) => [p.epoch, p.seq]), [["a", 1], ["b", 1]]);
});

test("a join cut off by a lost connection is made again after reconnecting and then resolves", async () => {
  const { client, hub } = setup();
  const started = client.start();
  await connect(hub);
  await started;
  const join = client.joinDispatch("west");
  await hub.calls.at(0);
  hub.close(new Error("WebSocket closed with status code: 1006"));
  await connect(hub, 1);
  const again = await hub.calls.at(1);
  assert.deepEqual(again.args, ["west", null]);
  again.reply.resolve({ group: G, epoch: "a", seq: 9 });
  assert.deepEqual(await join, { group: G, epoch: "a", seq: 9 });
});

test("a refused join rejects and is forgotten; a refused rejoin is reported and kept", async () => {
  const { client, hub, errors } = await joined();
  const east = client.joinDispatch("east");
  (await hub.calls.at(1)).reply.reject(new Error("HubException: region 'east' is not in your token"));
  await assert.rejects(east, /joining \/dispatch\/east failed: .*not in your token/);
  assert.deepEqual(Object.keys(client.positions()), [G]);

  hub.close(undefined);
  await connect(hub, 1);
  const rejoin = await hub.calls.at(2);
  assert.deepEqual(rejoin.args, ["west", { epoch: "a", seq: 0 }]);
  assert.equal(hub.calls.items.length, 3, "the refused group is not rejoined");
  rejoin.reply.reject(new Error("HubException: broker unavailable: try again"));
  await settle();
  assert.deepEqual(errors, ["joining /dispatch/west failed: HubException: broker unavailable: try again"]);
  assert.deepEqual(Object.keys(client.positions()), [G], "kept for the next reconnect");
});

test("leaving forgets the group: its events are dropped and it is not rejoined", async () => {
  const { client, hub, received } = await joined();
  const left = client.leaveDispatch("west");
  const leave = await hub.calls.at(1);
  assert.deepEqual([leave.method, leave.args], ["LeaveDispatchGroup", ["west"]]);
  hub.emit("RecommendationReady", recommendation(), { group: G, epoch: "a", seq: 1 });
  leave.reply.resolve(null);
  await left;
  assert.equal(received.length, 0);
  assert.deepEqual(client.positions(), {});
  hub.close(undefined);
  await connect(hub, 1);
  assert.equal(hub.calls.items.length, 2, "nothing rejoined");
});

test("leaving while disconnected sends nothing and rejects the queued join", async () => {
  const { client, hub } = setup();
  const join = client.joinDispatch("west");
  await client.leaveDispatch("west");
  await assert.rejects(join, /left \/dispatch\/west before the join completed/);
  const started = client.start();
  await connect(hub);
  await started;
  assert.equal(hub.calls.items.length, 0);
});

test("joining twice while a join is in flight sends one join and resolves both", async () => {
  const { client, hub } = setup();
  const started = client.start();
  await connect(hub);
  await started;
  const first = client.joinDispatch("west");
  const second = client.joinDispatch("west");
  (await hub.calls.at(0)).reply.resolve({ group: G, epoch: "a", seq: 1 });
  assert.deepEqual(await first, await second);
  assert.equal(hub.calls.items.length, 1);
});

test("events without a position (an old publisher) are delivered untracked", async () => {
  const { hub, received, resyncs } = await joined();
  hub.emit("RecommendationReady", recommendation());
  assert.equal(received.length, 1);
  assert.equal(received[0]?.[2], undefined);
  assert.deepEqual(resyncs, []);
});

test("stop() closes the connection and ends in disconnected without reconnecting", async () => {
  const { client, hub, states } = await joined();
  await client.stop();
  assert.equal(client.state, "disconnected");
  await settle();
  assert.equal(hub.starts.items.length, 1);
  assert.deepEqual(states.at(-1), ["disconnected", undefined]);
});

test("the hub connection asks for stateful reconnect unless the option turns it off", () => {
  const built: ConnectionOptions[] = [];
  const connect = (options: ConnectionOptions) => {
    built.push(options);
    return new FakeHub();
  };
  const base = { url: "http://127.0.0.1:1/hub/v1", accessTokenFactory: () => "t", logLevel: "none" } as const;
  new RealtimeClient(base, { connect });
  new RealtimeClient({ ...base, statefulReconnect: false }, { connect });
  new RealtimeClient({ ...base, statefulReconnect: true, skipNegotiation: true }, { connect });
  assert.deepEqual(
    built.map((options) => [options.statefulReconnect, options.skipNegotiation]),
    [
      [true, undefined],
      [false, undefined],
      [true, true],
    ],
  );
});
