// The client against the real gateway binary and the official @microsoft/signalr client: it is
// made to lose its connection (token expiry, a gateway restart, a socket ended at a TCP proxy),
// and must come back by itself, either resuming the same connection (stateful reconnect) or
// rejoining with its positions, and hand on the missed events once and in order, or ask for a
// resync when the gateway's history was lost.

import assert from "node:assert/strict";
import { randomUUID } from "node:crypto";
import { test } from "node:test";

import { RealtimeClient, groupOfDispatch } from "../src/index.js";
import type { ConnectionState, Position, RecommendationReady, ResyncReason } from "../src/index.js";
import { deferred } from "./fake-hub.js";
import { dispatcherToken, freshRecommendation, metric, proxyTo, publish, startGateway, within } from "./gateway.js";
import type { Gateway } from "./gateway.js";

/** Records what a client hands on, and lets a test await the n-th event, state or resync. */
function observe(client: RealtimeClient) {
  const events: Array<[RecommendationReady, Position]> = [];
  const resyncs: Array<[string, ResyncReason]> = [];
  const errors: Error[] = [];
  const states: ConnectionState[] = [];
  const waiters: Array<() => boolean> = [];
  const poke = () => {
    for (const waiter of [...waiters]) if (waiter()) waiters.splice(waiters.indexOf(waiter), 1);
  };
  client.on("RecommendationReady", (event, position) => {
    events.push([event, position]);
    poke();
  });
  client.onResyncRequired((group, reason) => {
    resyncs.push([group, reason]);
    poke();
  });
  client.onError((error) => errors.push(error));
  client.onStateChange((state) => {
    states.push(state);
    poke();
  });
  /** Resolves once `condition` holds (checked after every notification), within `ms`. */
  const until = (condition: () => boolean, what: string, ms = 15_000): Promise<void> => {
    if (condition()) return Promise.resolve();
    const done = deferred<void>();
    waiters.push(() => {
      if (!condition()) return false;
      done.resolve();
      return true;
    });
    return within(ms, done.promise, what);
  };
  return { events, resyncs, errors, states, until };
}

const RECONNECT = { initialDelayMs: 50, maxDelayMs: 500 };

/** Polls `condition` every 50 ms until it holds; rejects after `ms`. */
async function waitFor(condition: () => Promise<boolean>, what: string, ms = 15_000): Promise<void> {
  const deadline = Date.now() + ms;
  while (!(await condition())) {
    if (Date.now() > deadline) throw new Error(`timed out after ${ms} ms waiting for ${what}`);
    await new Promise((resolve) => setTimeout(resolve, 50));
  }
}

test("after the gateway closes an expired connection, the client rejoins and gets the missed events once and in order", async (t) => {
  const gateway = await startGateway("token-expiry", ["--jwt-leeway", "0s"]);
  t.after(() => gateway.stop());
  const region = `resume-${randomUUID().slice(0, 8)}`;
  const group = groupOfDispatch(region);
  const sub = `dispatcher-${randomUUID()}`;
  // The first token expires in 3 s, so the gateway closes the connection (token_expired); later
  // tokens are handed out only once the test has published what the client is to miss.
  const gate = deferred<void>();
  let lost = false;
  const client = new RealtimeClient({
    url: gateway.hubUrl,
    accessTokenFactory: async () => {
      if (!lost) return dispatcherToken(sub, [region], 3);
      await gate.promise;
      return dispatcherToken(sub, [region]);
    },
    reconnect: RECONNECT,
    logLevel: "none",
  });
  t.after(() => client.stop());
  client.onStateChange((state) => {
    if (state === "reconnecting") lost = true;
  });
  const seen = observe(client);

  await within(10_000, client.start(), "start()");
  const joined = await within(10_000, client.joinDispatch(region), "joinDispatch");
  assert.equal(joined.group, group);
  assert.equal(joined.seq, 0);
  assert.equal(joined.recovered, undefined);
  const { epoch } = joined;

  const before = [freshRecommendation(region), freshRecommendation(region)];
  for (const event of before) await publish(gateway, event);
  await seen.until(() => seen.events.length === 2, "the first two events");

  await seen.until(() => client.state === "reconnecting", "the gateway to close the expired connection");
  assert.match(client.lastError?.message ?? "", /expired/);
  const missed = [freshRecommendation(region), freshRecommendation(region), freshRecommendation(region)];
  for (const [i, event] of missed.entries()) {
    const answer = await publish(gateway, event);
    assert.deepEqual(answer.positions, [{ group, epoch, seq: 3 + i }]);
  }
  assert.equal(seen.events.length, 2, "nothing arrives while away");

  gate.resolve();
  await seen.until(() => seen.events.length === 5, "the missed events after the automatic rejoin");
  assert.equal(client.state, "connected");
  const live = [freshRecommendation(region, { live: true }), freshRecommendation(region, { marker: true })];
  for (const event of live) await publish(gateway, event);
  await seen.until(() => seen.events.length >= 7, "the live events");

  const expected = [...before, ...missed, ...live].map((event, i) => [event, { group, epoch, seq: i + 1 }]);
  assert.deepEqual(seen.events, expected, "every event once, in order, with its position");
  assert.deepEqual(seen.resyncs, []);
  assert.deepEqual(seen.errors, []);
  assert.deepEqual(client.positions(), { [group]: { group, epoch, seq: 7 } });
  assert.deepEqual(seen.states, ["connecting", "connected", "reconnecting", "connected"]);
});

test("after a gateway restart (a new history) the client reconnects by itself and asks for a resync", async (t) => {
  let gateway = await startGateway("restart");
  t.after(() => gateway.stop());
  const region = `restart-${randomUUID().slice(0, 8)}`;
  const group = groupOfDispatch(region);
  const sub = `dispatcher-${randomUUID()}`;
  const client = new RealtimeClient({
    url: gateway.hubUrl,
    accessTokenFactory: () => dispatcherToken(sub, [region]),
    reconnect: RECONNECT,
    logLevel: "none",
  });
  t.after(() => client.stop());
  const seen = observe(client);

  // Joined before start(): queued, then made on connect.
  const joining = client.joinDispatch(region);
  await within(10_000, client.start(), "start()");
  const joined = await within(10_000, joining, "the queued join");
  const first = freshRecommendation(region);
  await publish(gateway, first);
  await seen.until(() => seen.events.length === 1, "the first event");
  assert.deepEqual(seen.events[0], [first, { group, epoch: joined.epoch, seq: 1 }]);

  const { ports } = gateway;
  await gateway.stop();
  await seen.until(() => client.state === "reconnecting", "the client to notice the shutdown");
  gateway = await startGateway("restart-again", [], ports);

  await seen.until(() => seen.resyncs.length === 1, "resyncRequired after the rejoin", 20_000);
  assert.deepEqual(seen.resyncs, [[group, "recovery_incomplete"]]);
  assert.equal(client.state, "connected");
  const newEpoch = client.positions()[group]?.epoch;
  assert.ok(newEpoch !== undefined && newEpoch !== joined.epoch, "the restarted gateway has a new epoch");

  const second = freshRecommendation(region);
  await publish(gateway, second);
  await seen.until(() => seen.events.length === 2, "the event published after the restart");
  assert.deepEqual(seen.events[1], [second, { group, epoch: newEpoch, seq: 1 }]);
  assert.deepEqual(seen.resyncs, [[group, "recovery_incomplete"]], "no second resync for the new epoch's first event");
  assert.deepEqual(seen.errors, []);
});

test("a socket lost while connected is resumed in place: no reconnect, no rejoin, every event once and in order", async (t) => {
  const gateway = await startGateway("stateful-resume");
  t.after(() => gateway.stop());
  const proxy = await proxyTo(gateway);
  t.after(() => proxy.close());
  const { hubUrl } = proxy;
  const region = `stateful-${randomUUID().slice(0, 8)}`;
  const group = groupOfDispatch(region);
  const sub = `dispatcher-${randomUUID()}`;
  const client = new RealtimeClient({ url: hubUrl, accessTokenFactory: () => dispatcherToken(sub, [region]), reconnect: RECONNECT, logLevel: "none" });
  t.after(() => client.stop());
  const seen = observe(client);

  await within(10_000, client.start(), "start()");
  const { epoch } = await within(10_000, client.joinDispatch(region), "joinDispatch");
  const before = [freshRecommendation(region), freshRecommendation(region)];
  for (const event of before) await publish(gateway, event);
  await seen.until(() => seen.events.length === 2, "the first two events");

  // The socket ends under both ends (no close frame); the SignalR client's one attempt to reopen
  // it is held at the proxy while more events are published, so they can only arrive through
  // the resume.
  const reopened = proxy.nextRequests(1);
  proxy.partition();
  const [upgrade] = await reopened;
  assert.match(upgrade ?? "", /^GET \/hub\/v1\?id=/, "the client reopens its socket with its connection token");
  const away = [freshRecommendation(region), freshRecommendation(region), freshRecommendation(region)];
  for (const event of away) await publish(gateway, event);
  proxy.heal();

  const after = [freshRecommendation(region), freshRecommendation(region)];
  for (const event of after) await publish(gateway, event);
  await seen.until(() => seen.events.length >= 7, "the events published while away and after");

  const expected = [...before, ...away, ...after].map((event, i) => [event, { group, epoch, seq: i + 1 }]);
  assert.deepEqual(seen.events, expected, "every event once, in order, with its position");
  assert.deepEqual(seen.states, ["connecting", "connected"], "a resume is no reconnect");
  assert.equal(await metric(gateway, "gateway_stateful_transports_total", { outcome: "resumed" }), 1, "the gateway resumed the connection");
  assert.deepEqual(seen.resyncs, []);
  assert.deepEqual(seen.errors, []);
  assert.equal(client.lastError, undefined);
});

/** A client of `region` through a proxy to a gateway with a 1 s grace, joined, two events in. */
async function joinedBehindProxy(t: { after: (fn: () => unknown) => void }, name: string, region: string) {
  const gateway = await startGateway(name, ["--stateful-reconnect-grace", "1s"]);
  t.after(() => gateway.stop());
  const proxy = await proxyTo(gateway);
  t.after(() => proxy.close());
  const sub = `dispatcher-${randomUUID()}`;
  const client = new RealtimeClient({ url: proxy.hubUrl, accessTokenFactory: () => dispatcherToken(sub, [region]), reconnect: RECONNECT, logLevel: "none" });
  t.after(() => client.stop());
  const seen = observe(client);
  await within(10_000, client.start(), "start()");
  const { epoch } = await within(10_000, client.joinDispatch(region), "joinDispatch");
  const before = [freshRecommendation(region), freshRecommendation(region)];
  for (const event of before) await publish(gateway, event);
  await seen.until(() => seen.events.length === 2, "the first two events");
  return { gateway, proxy, client, seen, epoch, before };
}

/** After a fallback: publishes one more event, then checks the client went through one
 * reconnect and has every event (before, `missed`, after) once, in order, with no resync. */
async function rejoinedWithPositions(
  joined: Awaited<ReturnType<typeof joinedBehindProxy>>,
  region: string,
  group: string,
  missed: ReturnType<typeof freshRecommendation>[],
) {
  const { gateway, seen, epoch, before } = joined;
  const after = [freshRecommendation(region)];
  for (const event of after) await publish(gateway, event);
  await seen.until(() => seen.events.length >= 6, "the event published after the rejoin");

  const expected = [...before, ...missed, ...after].map((event, i) => [event, { group, epoch, seq: i + 1 }]);
  assert.deepEqual(seen.events, expected, "every event once, in order, with its position");
  assert.deepEqual(seen.states, ["connecting", "connected", "reconnecting", "connected"]);
  assert.deepEqual(seen.resyncs, [], "the gateway's history covered the gap");
  assert.deepEqual(seen.errors, []);
}

/** Resolves once the gateway has counted a stateful transport `outcome` (lost, resumed, refused, expired). */
const counted = (gateway: Gateway, outcome: string) =>
  waitFor(async () => (await metric(gateway, "gateway_stateful_transports_total", { outcome })) >= 1, `a stateful transport ${outcome}`);

test("a resume that reaches the gateway after its grace is refused, and the client reconnects and rejoins with its positions", async (t) => {
  const region = `expired-${randomUUID().slice(0, 8)}`;
  const group = groupOfDispatch(region);
  const joined = await joinedBehindProxy(t, "stateful-expired", region);
  const { gateway, proxy, client, seen } = joined;

  // The SignalR client's attempt to reopen the socket is held at the proxy until the gateway has
  // given the connection up; it then reaches the gateway, which answers 404.
  const reopened = proxy.nextRequests(1);
  proxy.partition();
  await reopened;
  const missed = [freshRecommendation(region), freshRecommendation(region), freshRecommendation(region)];
  for (const event of missed) await publish(gateway, event);
  await counted(gateway, "expired");
  assert.equal(client.state, "connected", "nothing has told the client yet");
  proxy.heal();

  await seen.until(() => seen.events.length === 5 && client.state === "connected", "the missed events after the rejoin", 20_000);
  await counted(gateway, "refused");
  await rejoinedWithPositions(joined, region, group, missed);
});

test("a socket that cannot be reopened at all: the client reconnects once the network is back and rejoins with its positions", async (t) => {
  const region = `down-${randomUUID().slice(0, 8)}`;
  const group = groupOfDispatch(region);
  const joined = await joinedBehindProxy(t, "stateful-down", region);
  const { gateway, proxy, client, seen } = joined;

  // Down: the resume and the client's own attempts are refused at the proxy until the gateway
  // has given the connection up.
  await proxy.stop();
  await seen.until(() => client.state === "reconnecting", "the client to give up the resume and reconnect");
  const missed = [freshRecommendation(region), freshRecommendation(region), freshRecommendation(region)];
  for (const event of missed) await publish(gateway, event);
  await counted(gateway, "expired");
  await proxy.start();

  await seen.until(() => seen.events.length === 5 && client.state === "connected", "the missed events after the rejoin", 20_000);
  await rejoinedWithPositions(joined, region, group, missed);
});
