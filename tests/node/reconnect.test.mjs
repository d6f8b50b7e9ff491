// Automatic reconnect of the official client when the gateway goes away and comes back.

import assert from "node:assert/strict";
import { test } from "node:test";

import { HubConnectionState } from "@microsoft/signalr";

import {
  RETRY_DELAYS,
  assertJoinResult,
  assertReceivesPublished,
  deferred,
  dispatchGroup,
  dispatcherToken,
  hubConnection,
  inbox,
  join,
  startGateway,
  uniqueRegion,
  within,
} from "./harness.mjs";

/**
 * Connects a dispatcher that rejoins its group in onreconnected, takes the gateway down with
 * `takeDown`, starts a new gateway on the same ports, and checks an event published to the new
 * gateway arrives.
 */
async function reconnectsAfter(t, takeDown) {
  const region = uniqueRegion("west");
  let gateway = await startGateway({ name: t.name });
  t.after(() => gateway.stop());

  const connection = hubConnection(t, gateway, dispatcherToken([region]), {
    configure: (builder) => builder.withAutomaticReconnect(RETRY_DELAYS),
  });
  const recommendations = inbox(connection, "RecommendationReady");
  const reconnecting = deferred();
  const rejoined = deferred();
  rejoined.promise.catch(() => {}); // onclose at the end of the test must not be an unhandled rejection
  let closedWith = "not closed";
  connection.onreconnecting((error) => reconnecting.resolve(error));
  connection.onreconnected((connectionId) => {
    connection.invoke("JoinDispatchGroup", region).then((result) => rejoined.resolve({ connectionId, result }), rejoined.reject);
  });
  connection.onclose((error) => {
    closedWith = error;
    rejoined.reject(new Error(`the client gave up instead of reconnecting: ${error?.message ?? error}`));
  });

  await within(10_000, connection.start(), "start()");
  const firstId = connection.connectionId;
  const group = dispatchGroup(region);
  const joined = await join(connection, "JoinDispatchGroup", region, { seq: 0 });
  await assertReceivesPublished(gateway, recommendations, region, { epoch: joined.epoch });

  const { ports } = gateway;
  const exit = await within(15_000, takeDown(gateway), "the gateway to exit");
  const lossError = await within(5_000, reconnecting.promise, "onreconnecting");
  gateway = await startGateway({ name: `${t.name} (restarted)`, ports });

  const { connectionId: secondId, result: rejoinedAt } = await within(15_000, rejoined.promise, "onreconnected and the rejoin");
  // The restarted in-process broker has a new, empty history for the group: a new epoch.
  assertJoinResult(rejoinedAt, group, { seq: 0 });
  assert.notEqual(rejoinedAt.epoch, joined.epoch, "a restarted gateway starts a new history");
  assert.equal(connection.state, HubConnectionState.Connected);
  assert.notEqual(secondId, firstId, "the reconnect negotiated a new connection");
  assert.equal(closedWith, "not closed");

  await assertReceivesPublished(gateway, recommendations, region, { nth: 2, epoch: rejoinedAt.epoch, extra: { schemaVersion: 2 } });
  return { exit, lossError };
}

test("the client reconnects and rejoins after the gateway shuts down gracefully and restarts", async (t) => {
  const { exit, lossError } = await reconnectsAfter(t, (gateway) => gateway.stop(15_000));
  assert.deepEqual(exit, { code: 0, signal: null }, "SIGTERM ends the gateway with exit status 0");
  // A graceful shutdown says so in a Close message that allows reconnecting.
  assert.ok(lossError instanceof Error, `onreconnecting got ${lossError}`);
  assert.match(lossError.message, /^Server returned an error on close: .*shutting down/);
});

test("the client reconnects and rejoins after the gateway is killed and restarted", async (t) => {
  const { exit, lossError } = await reconnectsAfter(t, (gateway) => gateway.kill());
  assert.equal(exit.signal, "SIGKILL");
  assert.ok(lossError instanceof Error, `onreconnecting got ${lossError}`);
  assert.match(lossError.message, /WebSocket closed with status code: 1006/);
});
