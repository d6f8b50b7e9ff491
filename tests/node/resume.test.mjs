// Resuming a group after a lost connection, and idempotent publishing (docs/events.md "On the
// wire", "Publishing over HTTP", "4. Join groups", "7. Reconnect"), with the official client
// against one gateway and its in-process broker.
//
// The gateway makes the client go away by closing its connection when its token expires (with a
// Close that allows reconnecting); the client's accessTokenFactory holds the reconnect back until
// the test has published the events it is to miss, so nothing synchronises by sleeping.

import assert from "node:assert/strict";
import { randomUUID } from "node:crypto";
import { test } from "node:test";

import { HubConnectionState } from "@microsoft/signalr";

import {
  EPOCH,
  RETRY_DELAYS,
  connect,
  deferred,
  dispatchGroup,
  dispatcherToken,
  expiringTokens,
  gatewayForFile,
  hubConnection,
  inbox,
  join,
  positionIn,
  publish,
  publishAccepted,
  recommendationReady,
  startGateway,
  uniqueRegion,
  within,
} from "./harness.mjs";

const gateway = gatewayForFile({ name: "resume", args: ["--jwt-leeway", "0s"] });

/**
 * A dispatcher of `region` with automatic reconnect, as docs/events.md recommends writing one: it
 * keeps the last position of each group from the events' second argument, and in onreconnected
 * rejoins the group with it. Its first token expires four seconds after it is minted, so the
 * gateway closes the connection; every later token is valid for ten minutes but is handed out only
 * once `release()` was called, which holds the reconnect back while the test publishes.
 */
function resumingClient(t, target, region, { url } = {}) {
  const gate = deferred();
  const tokens = expiringTokens(region, 4, gate.promise);
  const connection = hubConnection(t, target, tokens.factory, {
    url,
    configure: (builder) => builder.withAutomaticReconnect(RETRY_DELAYS),
  });
  const group = dispatchGroup(region);
  const lastPosition = new Map();
  connection.on("RecommendationReady", (_event, position) => {
    if (position) lastPosition.set(position.group, position);
  });
  const recommendations = inbox(connection, "RecommendationReady");

  const away = deferred();
  const rejoined = deferred();
  rejoined.promise.catch(() => {}); // onclose at the end of the test must not be an unhandled rejection
  connection.onreconnecting((error) => {
    tokens.expired();
    away.resolve(error);
  });
  connection.onreconnected(() => {
    connection.invoke("JoinDispatchGroup", region, lastPosition.get(group) ?? null).then(rejoined.resolve, rejoined.reject);
  });
  connection.onclose((error) => {
    rejoined.reject(new Error(`the client gave up instead of reconnecting: ${error?.message ?? error}`));
  });

  return {
    connection,
    group,
    recommendations,
    lastPosition,
    /** Resolves with the error onreconnecting reported. */
    away: away.promise,
    /** Lets the reconnect go ahead. */
    release: () => gate.resolve(),
    /** Resolves with the result of the rejoin made in onreconnected. */
    rejoined: rejoined.promise,
  };
}

test("a client that rejoins with its last position receives exactly the events it missed, in order and once, then live ones", async (t) => {
  const region = uniqueRegion("resume");
  const client = resumingClient(t, gateway, region);
  const { connection, group, recommendations } = client;

  await within(10_000, connection.start(), "start()");
  const joined = await join(connection, "JoinDispatchGroup", region, { seq: 0 });
  const { epoch } = joined;
  const seen = [recommendationReady(region), recommendationReady(region)];
  for (const event of seen) await publishAccepted(gateway, event);
  assert.deepStrictEqual(await recommendations.take(2), [
    [seen[0], { group, epoch, seq: 1 }],
    [seen[1], { group, epoch, seq: 2 }],
  ]);
  assert.deepStrictEqual(client.lastPosition.get(group), { group, epoch, seq: 2 });

  // The gateway closes the connection when the token expires; the client goes away.
  const error = await within(15_000, client.away, "the gateway to close the connection (token expiry)");
  assert.match(error?.message ?? "", /^Server returned an error on close: .*expired/);

  // Published while it is away: nobody receives them, the group's history keeps them.
  const missed = [recommendationReady(region), recommendationReady(region), recommendationReady(region)];
  for (const [i, event] of missed.entries()) {
    const published = await publishAccepted(gateway, event);
    assert.deepStrictEqual(positionIn(published, group), { group, epoch, seq: 3 + i });
  }
  assert.equal(recommendations.received.length, 2, "nothing was delivered while the client was away");

  client.release();
  const rejoinedAt = await within(15_000, client.rejoined, "onreconnected and the rejoin with the last position");
  assert.equal(connection.state, HubConnectionState.Connected);
  // Recovered: the events after seq 2 up to the head (5) were sent.
  assert.deepStrictEqual(rejoinedAt, { group, epoch, seq: 5, recovered: true });

  const live = recommendationReady(region, { live: true });
  const livePublished = await publishAccepted(gateway, live);
  assert.deepStrictEqual(positionIn(livePublished, group), { group, epoch, seq: 6 });
  // A last one proves nothing (a duplicate of a missed event) arrived after the live one either.
  const marker = recommendationReady(region, { marker: true });
  await publishAccepted(gateway, marker);

  const expected = [...seen, ...missed, live, marker].map((event, i) => [event, { group, epoch, seq: i + 1 }]);
  assert.deepStrictEqual(await recommendations.take(7), expected);
  assert.deepStrictEqual(client.lastPosition.get(group), { group, epoch, seq: 7 });
});

test("rejoining with a position of another epoch resolves with recovered false and the current head", async (t) => {
  // A gateway of its own, restarted on the same ports: the in-process history does not survive a
  // restart, so the client's last position belongs to an epoch that no longer exists.
  let own = await startGateway({ name: t.name, args: ["--jwt-leeway", "0s"] });
  t.after(() => own.stop());
  const region = uniqueRegion("epoch");
  const client = resumingClient(t, own, region);
  const { connection, group, recommendations } = client;

  await within(10_000, connection.start(), "start()");
  const joined = await join(connection, "JoinDispatchGroup", region, { seq: 0 });
  const before = recommendationReady(region);
  await publishAccepted(own, before);
  assert.deepStrictEqual(await recommendations.take(1), [[before, { group, epoch: joined.epoch, seq: 1 }]]);

  const { ports } = own;
  await within(15_000, own.kill(), "the gateway to exit");
  await within(15_000, client.away, "onreconnecting");
  own = await startGateway({ name: `${t.name} (restarted)`, ports, args: ["--jwt-leeway", "0s"] });

  // Published to the new history while the client is away; they cannot be recovered for it.
  const unrecoverable = [recommendationReady(region), recommendationReady(region)];
  const answers = [];
  for (const event of unrecoverable) answers.push(await publishAccepted(own, event));
  const head = positionIn(answers[1], group);
  assert.match(head.epoch, EPOCH);
  assert.notEqual(head.epoch, joined.epoch, "a restarted gateway starts a new history");
  assert.deepStrictEqual(positionIn(answers[0], group), { group, epoch: head.epoch, seq: 1 });
  assert.equal(head.seq, 2);

  client.release();
  const rejoinedAt = await within(15_000, client.rejoined, "onreconnected and the rejoin with the old position");
  assert.deepStrictEqual(rejoinedAt, { group, epoch: head.epoch, seq: 2, recovered: false });

  // Nothing is replayed; live events after the returned head follow.
  const live = recommendationReady(region, { live: true });
  await publishAccepted(own, live);
  assert.deepStrictEqual(await recommendations.take(2), [
    [before, { group, epoch: joined.epoch, seq: 1 }],
    [live, { group, epoch: head.epoch, seq: 3 }],
  ]);
});

test("a join with a position the history cannot serve resolves with recovered false; one at the head with true and no replay", async (t) => {
  const region = uniqueRegion("positions");
  const token = dispatcherToken([region]);
  const group = dispatchGroup(region);
  const publisher = await connect(t, gateway, token);
  const { epoch } = await join(publisher, "JoinDispatchGroup", region, { seq: 0 });
  for (let i = 0; i < 2; i += 1) await publishAccepted(gateway, recommendationReady(region));

  const otherEpoch = randomUUID().replaceAll("-", "");
  let head = 2;
  // Each case makes the position from the head at that moment.
  const cases = [
    [() => ({ epoch: otherEpoch, seq: 1 }), false, "another epoch"],
    [() => ({ epoch: otherEpoch, seq: head }), false, "another epoch at the head's seq"],
    [() => ({ epoch, seq: head }), true, "at the head: nothing was missed"],
    // Other fields, such as the group of a position passed back as it came, are ignored.
    [() => ({ group, epoch, seq: head }), true, "at the head, with its group"],
  ];
  for (const [position, recovered, what] of cases) {
    const connection = await connect(t, gateway, token);
    const recommendations = inbox(connection, "RecommendationReady");
    const result = await connection.invoke("JoinDispatchGroup", region, position());
    assert.deepStrictEqual(result, { group, epoch, seq: head, recovered }, what);
    // Nothing is replayed: the first event to arrive is the next live one.
    const live = recommendationReady(region);
    const published = await publishAccepted(gateway, live);
    head += 1;
    assert.deepStrictEqual(positionIn(published, group), { group, epoch, seq: head }, what);
    assert.deepStrictEqual(await recommendations.take(1), [[live, { group, epoch, seq: head }]], what);
    await connection.stop();
  }

  // A position ahead of the history proves nothing (any client can send one): that client is
  // told it did not recover, and the group keeps its epoch, so the others still resume.
  const connection = await connect(t, gateway, token);
  const ahead = await connection.invoke("JoinDispatchGroup", region, { epoch, seq: 999999999 });
  assert.deepStrictEqual(ahead, { group, epoch, seq: head, recovered: false }, "ahead of the head");
  const old = await connection.invoke("JoinDispatchGroup", region, { epoch, seq: head });
  assert.deepStrictEqual(old, { group, epoch, seq: head, recovered: true }, "the epoch is kept");
  await connection.stop();
});

test("the same event published twice is delivered once and the second answer says duplicate", async (t) => {
  const region = uniqueRegion("idem");
  const group = dispatchGroup(region);
  const connection = await connect(t, gateway, dispatcherToken([region]));
  const recommendations = inbox(connection, "RecommendationReady");
  const { epoch } = await join(connection, "JoinDispatchGroup", region, { seq: 0 });

  // Without an Idempotency-Key the event's requestId is the key.
  const event = recommendationReady(region);
  const first = await publish(gateway, event);
  assert.equal(first.status, 202, first.text);
  assert.deepStrictEqual(first.json, {
    type: "RecommendationReady",
    groups: [group],
    positions: [{ group, epoch, seq: 1 }],
    duplicate: false,
  });
  const again = await publish(gateway, event);
  assert.equal(again.status, 202, again.text);
  assert.deepStrictEqual(again.json, { ...first.json, duplicate: true }, "a duplicate answers the first publish's positions");
  // The same requestId with a changed body is the same publication too.
  const changed = await publish(gateway, { ...event, configVersion: 2 });
  assert.deepStrictEqual(changed.json, { ...first.json, duplicate: true });

  // An Idempotency-Key names the publication instead: the same key is a duplicate whatever the
  // event, the same event under distinct keys is delivered each time.
  const key = `publish-${randomUUID()}`;
  const keyed = recommendationReady(region);
  const keyedFirst = await publishAccepted(gateway, keyed, { headers: { "idempotency-key": key } });
  assert.deepStrictEqual(positionIn(keyedFirst, group), { group, epoch, seq: 2 });
  const otherUnderKey = await publish(gateway, recommendationReady(region), { headers: { "idempotency-key": key } });
  assert.equal(otherUnderKey.status, 202, otherUnderKey.text);
  assert.deepStrictEqual(otherUnderKey.json, { ...keyedFirst.json, duplicate: true });
  const sameUnderOtherKey = await publishAccepted(gateway, keyed, { headers: { "idempotency-key": `${key}-2` } });
  assert.deepStrictEqual(positionIn(sameUnderOtherKey, group), { group, epoch, seq: 3 });

  const marker = recommendationReady(region, { marker: true });
  await publishAccepted(gateway, marker);
  assert.deepStrictEqual(await recommendations.take(4), [
    [event, { group, epoch, seq: 1 }],
    [keyed, { group, epoch, seq: 2 }],
    [keyed, { group, epoch, seq: 3 }],
    [marker, { group, epoch, seq: 4 }],
  ]);
});
