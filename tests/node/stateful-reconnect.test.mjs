// Stateful reconnect with the official client's `.withStatefulReconnect()` (issue 14): a socket
// lost without a WebSocket close frame is resumed on the same logical connection, so the client
// keeps its connection id and groups, sees no onreconnecting, and receives every event once and
// in order, with no position or rejoin code of its own. The clients connect through a TCP proxy
// (tcp-proxy.mjs) that takes the network away under them; events are published straight to the
// gateway, so publishing goes on while they are cut off.

import assert from "node:assert/strict";
import { test } from "node:test";

import { HttpTransportType, HubConnectionState } from "@microsoft/signalr";

import {
  RETRY_DELAYS,
  deferred,
  dispatchGroup,
  dispatcherClaims,
  gatewayFor,
  hubConnection,
  inbox,
  join,
  mintJwt,
  publishAccepted,
  rawUpgrade,
  readResponse,
  recommendationReady,
  uniqueRegion,
  within,
} from "./harness.mjs";
import { startTcpProxy } from "./tcp-proxy.mjs";

/** How long a client may take to receive what it is owed, however slow the machine. */
const DELIVERY_MS = 20_000;

/** Starts a proxy in front of `gateway` for one test. */
async function proxyFor(t, gateway) {
  const proxy = await startTcpProxy(gateway.port);
  t.after(() => proxy.close());
  return proxy;
}

/** POST negotiate as the client sends it, asking for stateful reconnect when `stateful`. */
async function negotiateAsking(gateway, token, stateful) {
  const query = stateful ? "negotiateVersion=1&useStatefulReconnect=true" : "negotiateVersion=1";
  const response = await fetch(`${gateway.hubUrl}/negotiate?${query}`, {
    method: "POST",
    headers: { "x-requested-with": "XMLHttpRequest", authorization: `Bearer ${token}` },
    signal: AbortSignal.timeout(10_000),
  });
  return readResponse(response);
}

/** The connection token of a WebSocket upgrade's request line ("GET /hub/v1?id=... HTTP/1.1"). */
function upgradeToken(requestLine) {
  const match = /^GET (\/hub\/v1\?\S*) HTTP\/1\.1$/.exec(requestLine);
  assert.ok(match, `a WebSocket upgrade of the hub, got ${JSON.stringify(requestLine)}`);
  const id = new URL(match[1], "http://proxy").searchParams.get("id");
  assert.ok(id, `the upgrade names its connection: ${requestLine}`);
  return id;
}

/**
 * Starts an official client with `.withStatefulReconnect()` (WebSockets, through `proxy`), as one
 * dispatcher of `region`, and records what happens to it. `configure` adds to the builder (an
 * automatic reconnect policy). Resolves with { connection, token, bearer, connectionId, events,
 * reconnecting, reconnected, closed, broken }: `token` is the connection token its WebSocket
 * carried (read by the proxy), `broken` rejects once it reconnects the long way or closes.
 */
async function statefulClient(t, proxy, region, configure = (builder) => builder) {
  const bearer = mintJwt(dispatcherClaims([region]));
  const connection = hubConnection(t, proxy, bearer, {
    transport: HttpTransportType.WebSockets,
    configure: (builder) => configure(builder.withStatefulReconnect()),
  });
  const client = {
    connection,
    bearer,
    events: inbox(connection, "RecommendationReady"),
    reconnecting: deferred(),
    reconnected: deferred(),
    closed: deferred(),
    broken: deferred(),
  };
  client.broken.promise.catch(() => {}); // only ever awaited in a race
  connection.onreconnecting((error) => {
    client.reconnecting.resolve(error);
    client.broken.reject(new Error(`onreconnecting fired (${error?.message ?? error}): the stateful reconnect did not resume`));
  });
  connection.onreconnected((connectionId) => client.reconnected.resolve(connectionId));
  connection.onclose((error) => {
    client.closed.resolve(error);
    client.broken.reject(new Error(`the connection closed (${error?.message ?? error}) instead of resuming`));
  });

  const upgrades = proxy.nextRequests(1);
  await within(10_000, connection.start(), "the SignalR connection to start");
  // A client's start is one negotiate and one upgrade; the negotiate may ride a kept-alive
  // connection, so the upgrade is the last new connection the proxy saw.
  await upgrades;
  client.token = upgradeToken(proxy.requests.at(-1));
  client.connectionId = connection.connectionId;
  assert.equal(typeof client.connectionId, "string");
  return client;
}

/** Starts `count` stateful clients one after the other (so each upgrade is known to be its own). */
async function statefulClients(t, proxy, region, count) {
  const clients = [];
  for (let i = 0; i < count; i += 1) clients.push(await statefulClient(t, proxy, region));
  return clients;
}

/** The first `count` events `client` received, failing early if it stopped being stateful. */
function eventsOf(client, count) {
  return Promise.race([client.events.take(count, DELIVERY_MS), client.broken.promise]);
}

/** `promise`, failing early if one of `clients` stopped being stateful. */
function unlessBroken(clients, promise) {
  return Promise.race([promise, ...clients.map((client) => client.broken.promise)]);
}

/**
 * A publisher of numbered RecommendationReady events to `region` on `gateway`; `expected()` is
 * what every member joined at seq 0 must receive: each event, then its position, in order.
 */
function numberedEvents(gateway, region, epoch) {
  const published = [];
  return {
    published,
    async publish(count, phase) {
      for (let i = 0; i < count; i += 1) {
        const event = recommendationReady(region, { n: published.length + 1, phase });
        published.push(event);
        await publishAccepted(gateway, event);
      }
    },
    expected() {
      return published.map((event, i) => [event, { group: dispatchGroup(region), epoch, seq: i + 1 }]);
    },
  };
}

/** Joins every client to the dispatch group of `region` (a new group); resolves with its epoch. */
async function joinAll(clients, region) {
  const heads = await Promise.all(clients.map((client) => join(client.connection, "JoinDispatchGroup", region, { seq: 0 })));
  for (const head of heads) assert.equal(head.epoch, heads[0].epoch);
  return heads[0].epoch;
}

/**
 * Asserts every client received exactly `events.expected()` (nothing missing, repeated or out of
 * order: a marker published last is the next thing each receives), stayed on its connection id,
 * never saw onreconnecting or onclose, and is connected.
 */
async function assertEachReceivedOnceInOrder(clients, events) {
  await events.publish(1, "marker");
  const expected = events.expected();
  await Promise.all(
    clients.map(async (client, i) => {
      const got = await eventsOf(client, expected.length);
      assert.deepStrictEqual(got, expected, `client ${i} received every event once, in order`);
    }),
  );
  clients.forEach((client, i) => {
    assert.equal(client.connection.connectionId, client.connectionId, `client ${i} kept its connection id`);
    assert.equal(client.connection.state, HubConnectionState.Connected, `client ${i} is connected`);
  });
  // Nothing arrived after the marker; onreconnecting and onclose would have broken eventsOf.
  clients.forEach((client, i) => assert.equal(client.events.received.length, expected.length, `client ${i} got nothing more`));
  // Stopped here rather than by the gateway's drain, which spreads its closes over seconds.
  await Promise.all(clients.map((client) => client.connection.stop()));
}

/** Resolves once `gateway`'s `name` metric (summed over its labels) satisfies `predicate`. */
async function metricReaches(gateway, name, predicate, what, ms = DELIVERY_MS) {
  const deadline = Date.now() + ms;
  let last;
  for (;;) {
    const text = await (await fetch(`${gateway.adminUrl}/metrics`, { signal: AbortSignal.timeout(5000) })).text();
    last = text
      .split("\n")
      .filter((line) => line.startsWith(`${name} `) || line.startsWith(`${name}{`))
      .reduce((sum, line) => sum + Number(line.slice(line.lastIndexOf(" ") + 1)), 0);
    if (predicate(last)) return last;
    if (Date.now() > deadline) throw new Error(`timed out after ${ms} ms waiting for ${what} (${name} is ${last})`);
    // A polling interval, as for /readyz, not a synchronisation.
    await new Promise((resolve) => setTimeout(resolve, 100));
  }
}

test("negotiate offers stateful reconnect to a client that asks for it, and never when the grace is 0s", async (t) => {
  const [gateway, disabled] = await Promise.all([
    gatewayFor(t),
    gatewayFor(t, { name: `${t.name} (disabled)`, args: ["--stateful-reconnect-grace", "0s"] }),
  ]);
  const token = mintJwt(dispatcherClaims([uniqueRegion()]));

  const asked = await negotiateAsking(gateway, token, true);
  assert.equal(asked.status, 200, asked.text);
  assert.equal(asked.json.useStatefulReconnect, true, asked.text);

  const notAsked = await negotiateAsking(gateway, token, false);
  assert.equal(notAsked.status, 200, notAsked.text);
  assert.equal("useStatefulReconnect" in notAsked.json, false, notAsked.text);

  const off = await negotiateAsking(disabled, token, true);
  assert.equal(off.status, 200, off.text);
  assert.equal("useStatefulReconnect" in off.json, false, off.text);
});

test("clients whose sockets are cut resume by themselves and receive every event once and in order", async (t) => {
  const gateway = await gatewayFor(t);
  const proxy = await proxyFor(t, gateway);
  const region = uniqueRegion("west");
  const clients = await statefulClients(t, proxy, region, 10);
  const events = numberedEvents(gateway, region, await joinAll(clients, region));

  // Delivered before the cut; some are not acknowledged yet when it comes.
  await events.publish(20, "before");
  await Promise.all(clients.map((client) => eventsOf(client, 20)));

  const resumed = proxy.nextRequests(clients.length);
  proxy.cut();
  await events.publish(15, "during");
  // Each client opened one new WebSocket with its own connection token: no negotiate.
  const tokens = (await unlessBroken(clients, resumed)).map(upgradeToken);
  assert.deepStrictEqual(tokens.sort(), clients.map((client) => client.token).sort());
  await events.publish(15, "after");

  await assertEachReceivedOnceInOrder(clients, events);
});

test("clients cut off while the network between the proxy and the gateway is down resume when it returns", async (t) => {
  const gateway = await gatewayFor(t);
  const proxy = await proxyFor(t, gateway);
  const region = uniqueRegion("east");
  const clients = await statefulClients(t, proxy, region, 10);
  const events = numberedEvents(gateway, region, await joinAll(clients, region));

  await events.publish(20, "before");
  await Promise.all(clients.map((client) => eventsOf(client, 20)));

  // The proxy accepts the clients' new WebSockets but holds them, as a load balancer whose
  // connects to the replica hang: everything published meanwhile waits in the gateway.
  const attempts = proxy.nextRequests(clients.length);
  proxy.partition();
  await events.publish(15, "during");
  const tokens = (await unlessBroken(clients, attempts)).map(upgradeToken);
  assert.deepStrictEqual(tokens.sort(), clients.map((client) => client.token).sort());
  await events.publish(5, "during");
  proxy.heal();
  await events.publish(15, "after");

  await assertEachReceivedOnceInOrder(clients, events);
});

test("clients that come back after the grace period fall back to a new connection", async (t) => {
  const gateway = await gatewayFor(t, { args: ["--stateful-reconnect-grace", "1s"] });
  const proxy = await proxyFor(t, gateway);
  const region = uniqueRegion("north");
  const reconnecting = await statefulClient(t, proxy, region, (builder) => builder.withAutomaticReconnect(RETRY_DELAYS));
  const plain = await statefulClient(t, proxy, region);
  const events = numberedEvents(gateway, region, await joinAll([reconnecting, plain], region));
  await events.publish(1, "before");
  await Promise.all([eventsOf(reconnecting, 1), eventsOf(plain, 1)]);

  const attempts = proxy.nextRequests(2);
  proxy.partition();
  await events.publish(1, "during");
  await attempts;
  // The grace is over once the gateway has ended both logical connections.
  await metricReaches(gateway, "gateway_connections_active", (active) => active === 0, "both connections to end");
  proxy.heal();

  // The transport reconnect is refused: the client without a reconnect policy closes, the other
  // reconnects the long way, with a new negotiate and a new connection id.
  const closedWith = await within(DELIVERY_MS, plain.closed.promise, "onclose of the client without automatic reconnect");
  assert.ok(closedWith instanceof Error, `onclose got ${closedWith}`);
  await within(DELIVERY_MS, reconnecting.reconnecting.promise, "onreconnecting");
  const newId = await within(DELIVERY_MS, reconnecting.reconnected.promise, "onreconnected");
  assert.equal(typeof newId, "string");
  assert.notEqual(newId, reconnecting.connectionId, "a new connection");

  // The new connection has no groups until it joins; then events flow again.
  const rejoined = await join(reconnecting.connection, "JoinDispatchGroup", region);
  assert.equal(rejoined.seq, events.published.length);
  const later = recommendationReady(region, { phase: "after" });
  await publishAccepted(gateway, later);
  const got = await reconnecting.events.take(2, DELIVERY_MS);
  assert.deepStrictEqual(got[1], [later, { group: dispatchGroup(region), epoch: rejoined.epoch, seq: events.published.length + 1 }]);
});

test("a client whose transport reconnect cannot connect falls back to a new connection at once", async (t) => {
  const gateway = await gatewayFor(t);
  const proxy = await proxyFor(t, gateway);
  const region = uniqueRegion("south");
  const client = await statefulClient(t, proxy, region, (builder) => builder.withAutomaticReconnect(RETRY_DELAYS));
  const events = numberedEvents(gateway, region, await joinAll([client], region));
  await events.publish(1, "before");
  await eventsOf(client, 1);

  // The client tries its one transport reconnect at once; with nothing listening it is refused.
  await proxy.stop();
  await within(DELIVERY_MS, client.reconnecting.promise, "onreconnecting");
  await proxy.start();
  const newId = await within(DELIVERY_MS, client.reconnected.promise, "onreconnected");
  assert.notEqual(newId, client.connectionId, "a new connection");
  assert.equal(client.connection.state, HubConnectionState.Connected);
});

test("a connection the client stopped cannot be resumed with its token", async (t) => {
  const gateway = await gatewayFor(t);
  const proxy = await proxyFor(t, gateway);
  const region = uniqueRegion("south");
  const client = await statefulClient(t, proxy, region);
  const events = numberedEvents(gateway, region, await joinAll([client], region));
  await events.publish(1, "before");
  await eventsOf(client, 1);

  await within(10_000, client.connection.stop(), "stop()");
  assert.equal(await client.closed.promise, undefined, "stop() closes without an error");
  // stop() resolves as soon as the client has queued its close frame; an upgrade sent before
  // the gateway read that frame would be a resume of a connection still open (as after a cut).
  await metricReaches(gateway, "gateway_connections_active", (active) => active === 0, "the gateway to end the connection");

  const reuse = await rawUpgrade(`${gateway.hubUrl}?id=${client.token}`, { authorization: `Bearer ${client.bearer}` });
  assert.equal(reuse.status, 404, reuse.body);
});
