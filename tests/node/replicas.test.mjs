// Several replicas without sticky sessions: negotiate on one, connect to another.

import assert from "node:assert/strict";
import { test } from "node:test";

import {
  dispatchGroup,
  dispatcherToken,
  gatewayFor,
  negotiate,
  positionIn,
  publishAccepted,
  rawHandshakeAndJoin,
  rawUpgrade,
  rawWebSocket,
  recommendationReady,
  recordsFrom,
  uniqueRegion,
} from "./harness.mjs";

const SHARED = ["--connection-token-secret", "replica-connection-token-secret-0123456789"];

test("a connection token from one replica is accepted by another replica sharing the connection token secret", async (t) => {
  const [first, second] = await Promise.all([gatewayFor(t, { args: SHARED }), gatewayFor(t, { args: SHARED })]);
  const region = uniqueRegion();
  const token = dispatcherToken([region]);

  const negotiated = await negotiate(first, token);
  assert.equal(negotiated.status, 200, negotiated.text);
  const auth = { authorization: `Bearer ${token}` };
  const ws = await rawWebSocket(`${second.hubUrl}?id=${negotiated.json.connectionToken}`, auth);
  t.after(() => ws.socket.destroy());
  assert.equal(ws.status, 101);

  const joined = await rawHandshakeAndJoin(ws, region);

  const event = recommendationReady(region);
  const seen = ws.frames.length;
  const published = await publishAccepted(second, event);
  assert.deepStrictEqual(await recordsFrom(ws, seen, 1), [
    { type: 1, target: "RecommendationReady", arguments: [event, { group: dispatchGroup(region), epoch: joined.epoch, seq: 1 }] },
  ]);
  assert.deepStrictEqual(positionIn(published, dispatchGroup(region)), { group: dispatchGroup(region), epoch: joined.epoch, seq: 1 });
});

test("a connection token is refused with 404 by a replica with another secret, for another user, or as a bare connection id", async (t) => {
  const other = ["--connection-token-secret", "some-other-connection-token-secret-0123456789"];
  const [first, stranger] = await Promise.all([gatewayFor(t, { args: SHARED }), gatewayFor(t, { args: other })]);
  const token = dispatcherToken([uniqueRegion()]);
  const auth = { authorization: `Bearer ${token}` };
  const { json } = await negotiate(first, token);

  const otherSecret = await rawUpgrade(`${stranger.hubUrl}?id=${json.connectionToken}`, auth);
  assert.equal(otherSecret.status, 404, otherSecret.body);
  assert.match(otherSecret.body, /No Connection with that ID/);

  const someoneElse = { authorization: `Bearer ${dispatcherToken(["west"])}` };
  const otherUser = await rawUpgrade(`${first.hubUrl}?id=${json.connectionToken}`, someoneElse);
  assert.equal(otherUser.status, 404, otherUser.body);

  const idOnly = await rawUpgrade(`${first.hubUrl}?id=${json.connectionId}`, auth);
  assert.equal(idOnly.status, 404, idOnly.body);

  const own = await rawUpgrade(`${first.hubUrl}?id=${json.connectionToken}`, auth);
  assert.equal(own.status, 101);
});
