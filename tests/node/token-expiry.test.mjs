// What happens to a connection when the user token it was opened with expires.

import assert from "node:assert/strict";
import { test } from "node:test";

import { HubConnectionState } from "@microsoft/signalr";

import {
  assertJoinResult,
  assertReceivesPublished,
  deferred,
  dispatchGroup,
  expiringTokens,
  gatewayForFile,
  hubConnection,
  inbox,
  uniqueRegion,
  within,
} from "./harness.mjs";

const gateway = gatewayForFile({ name: "token-expiry", args: ["--jwt-leeway", "0s"] });

/** A retry policy with the given delays that records why each reconnect attempt was made. */
function recordingPolicy(delays) {
  const reasons = [];
  return {
    reasons,
    nextRetryDelayInMilliseconds({ previousRetryCount, retryReason }) {
      reasons.push(retryReason?.message);
      return previousRetryCount < delays.length ? delays[previousRetryCount] : null;
    },
  };
}

test("a connection whose token expires is closed with a reason that lets the client reconnect with a fresh token", async (t) => {
  const region = uniqueRegion();
  // Its first token expires in two seconds; once it did, the client gets a fresh one.
  const tokens = expiringTokens(region, 2);
  const connection = hubConnection(t, gateway, tokens.factory, {
    configure: (builder) => builder.withAutomaticReconnect([0, 200, 500, 1000]),
  });
  const recommendations = inbox(connection, "RecommendationReady");
  const lost = deferred();
  const rejoined = deferred();
  connection.onreconnecting((error) => {
    tokens.expired();
    lost.resolve(error);
  });
  connection.onreconnected(() => connection.invoke("JoinDispatchGroup", region).then(rejoined.resolve, rejoined.reject));
  // Nobody publishes to the region: the rejoin finds its history at the start.

  await within(10_000, connection.start(), "start()");
  const error = await within(45_000, lost.promise, "the gateway to close the connection when its token expires");
  assert.match(error?.message ?? "", /^Server returned an error on close: .*expired/);

  const joined = assertJoinResult(
    await within(10_000, rejoined.promise, "the reconnect with a fresh token and the rejoin"),
    dispatchGroup(region),
    { seq: 0 },
  );
  await assertReceivesPublished(gateway, recommendations, region, { epoch: joined.epoch });
});

test("a client that offers its expired token again is refused instead of being readmitted and cut off again", async (t) => {
  const region = uniqueRegion();
  // One token that expires two seconds from now, offered again on every reconnect.
  const token = await expiringTokens(region, 2).factory();
  const policy = recordingPolicy([0, 200, 500]);
  const connection = hubConnection(t, gateway, token, { configure: (builder) => builder.withAutomaticReconnect(policy) });
  const lost = deferred();
  const readmitted = deferred();
  connection.onreconnecting((error) => lost.resolve(error));
  connection.onreconnected((connectionId) => readmitted.resolve(connectionId));
  const closed = deferred();
  connection.onclose((error) => closed.resolve(error));

  await within(10_000, connection.start(), "start()");
  const error = await within(45_000, lost.promise, "the gateway to close the connection when its token expires");
  assert.match(error?.message ?? "", /^Server returned an error on close: .*expired/);

  const outcome = await within(
    15_000,
    Promise.race([closed.promise.then(() => "refused"), readmitted.promise.then(() => "readmitted")]),
    "the reconnect attempts with the expired token to end",
  );
  assert.equal(
    outcome,
    "refused",
    "after closing the connection because its token expired, the gateway accepted the same token again; it " +
      "closes the new connection at once for the same expiry and the client reconnects in a tight loop",
  );
  assert.equal(connection.state, HubConnectionState.Disconnected);
  // The first reason is the expiry close; every later attempt failed on the token.
  const [, ...attempts] = policy.reasons;
  assert.equal(attempts.length, 3);
  for (const reason of attempts) assert.match(reason, /Status code '401'/);
});
