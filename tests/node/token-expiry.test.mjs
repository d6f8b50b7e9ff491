// What happens to a connection when the user token it was opened with expires.

import assert from "node:assert/strict";
import { after, before, test } from "node:test";

import { HubConnectionState } from "@microsoft/signalr";

import {
  deferred,
  assertJoinResult,
  dispatchGroup,
  dispatcherClaims,
  dispatcherToken,
  hubConnection,
  inbox,
  mintJwt,
  publishAccepted,
  recommendationReady,
  startGateway,
  uniqueRegion,
  within,
} from "./harness.mjs";

let gateway;
before(async () => {
  gateway = await startGateway({ name: "token-expiry", args: ["--jwt-leeway", "0s"] });
});
after(() => gateway?.stop());

/** A token for `sub` that expires two seconds from now. */
const shortLivedToken = (region, sub = `dispatcher-${region}`) =>
  mintJwt(dispatcherClaims([region], { sub, exp: Math.floor(Date.now() / 1000) + 2 }));

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
  let expiredOnce = false;
  // The same user throughout (negotiate's connection token is bound to the subject).
  const sub = `dispatcher-${region}`;
  const factory = () => (expiredOnce ? dispatcherToken([region], { sub }) : shortLivedToken(region, sub));
  const connection = hubConnection(t, gateway, factory, {
    configure: (builder) => builder.withAutomaticReconnect([0, 200, 500, 1000]),
  });
  const recommendations = inbox(connection, "RecommendationReady");
  const lost = deferred();
  const rejoined = deferred();
  connection.onreconnecting((error) => {
    expiredOnce = true;
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
  const event = recommendationReady(region);
  await publishAccepted(gateway, event);
  assert.deepStrictEqual(await recommendations.nth(1), [event, { group: dispatchGroup(region), epoch: joined.epoch, seq: 1 }]);
});

test("a client that offers its expired token again is refused instead of being readmitted and cut off again", async (t) => {
  const region = uniqueRegion();
  const token = shortLivedToken(region);
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
