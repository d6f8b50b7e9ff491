// Who may connect, which groups they may join, and who may publish.

import assert from "node:assert/strict";
import { randomUUID } from "node:crypto";
import { test } from "node:test";

import { HubConnectionState } from "@microsoft/signalr";

import {
  JWT_SECRET,
  arrivals,
  assertJoinResult,
  connect,
  contractorGroup,
  contractorToken,
  delivered,
  dispatchGroup,
  dispatcherClaims,
  dispatcherToken,
  gatewayFor,
  gatewayForFile,
  hubConnection,
  inbox,
  jobAssigned,
  join,
  mintJwt,
  negotiate,
  publish,
  publishAccepted,
  rawUpgrade,
  recommendationReady,
  uniqueRegion,
  within,
} from "./harness.mjs";

const gateway = gatewayForFile({ name: "authorization" });

// ---------------------------------------------------------------------------------------------
// Joining groups

/** Asserts `promise` (an invoke) rejects with a message matching every pattern. */
async function assertRefused(promise, ...patterns) {
  await assert.rejects(promise, (error) => {
    assert.ok(error instanceof Error, `expected an Error, got ${error}`);
    for (const pattern of patterns) assert.match(error.message, pattern);
    return true;
  });
}

test("a dispatcher cannot join the dispatch group of a region missing from its token", async (t) => {
  const own = uniqueRegion("west");
  const foreign = uniqueRegion("east");
  const connection = await connect(t, gateway, dispatcherToken([own]));
  const recommendations = inbox(connection, "RecommendationReady");

  await assertRefused(connection.invoke("JoinDispatchGroup", foreign), /region/i, new RegExp(foreign));
  assert.equal(connection.state, HubConnectionState.Connected);

  // The connection is still usable, and the refused join left no membership behind.
  const joined = await join(connection, "JoinDispatchGroup", own, { seq: 0 });
  const refused = recommendationReady(foreign);
  const allowed = recommendationReady(own);
  await publishAccepted(gateway, refused);
  const published = await publishAccepted(gateway, allowed);
  assert.deepStrictEqual(await recommendations.take(1), [
    [allowed, { group: dispatchGroup(own), epoch: joined.epoch, seq: 1 }],
  ]);
  assert.deepStrictEqual(recommendations.received[0], delivered(allowed, published, dispatchGroup(own)));
});

test("a contractor cannot join another contractor's group", async (t) => {
  const own = randomUUID();
  const foreign = randomUUID();
  const connection = await connect(t, gateway, contractorToken(own));
  const events = arrivals(connection);

  await assertRefused(connection.invoke("JoinContractorGroup", foreign), /only your own|not yours/i);
  assert.equal(connection.state, HubConnectionState.Connected);

  const joined = await join(connection, "JoinContractorGroup", own, { seq: 0 });
  const refused = jobAssigned(uniqueRegion(), foreign);
  const allowed = jobAssigned(uniqueRegion(), own);
  await publishAccepted(gateway, refused);
  const published = await publishAccepted(gateway, allowed);
  assert.deepStrictEqual(await events.take(1), [
    { target: "JobAssigned", args: [allowed, { group: contractorGroup(own), epoch: joined.epoch, seq: 1 }] },
  ]);
  assert.deepStrictEqual(events.received[0].args, delivered(allowed, published, contractorGroup(own)));
});

test("a dispatcher cannot join a contractor group", async (t) => {
  const region = uniqueRegion();
  const contractorId = randomUUID();
  const connection = await connect(t, gateway, dispatcherToken([region]));
  const events = arrivals(connection);

  await assertRefused(connection.invoke("JoinContractorGroup", contractorId), /dispatcher/i, /may not|not allowed|cannot/i);
  assert.equal(connection.state, HubConnectionState.Connected);

  const joined = await join(connection, "JoinDispatchGroup", region, { seq: 0 });
  const refused = jobAssigned(uniqueRegion(), contractorId);
  const allowed = recommendationReady(region);
  await publishAccepted(gateway, refused);
  await publishAccepted(gateway, allowed);
  assert.deepStrictEqual(await events.take(1), [
    { target: "RecommendationReady", args: [allowed, { group: dispatchGroup(region), epoch: joined.epoch, seq: 1 }] },
  ]);
});

test("a contractor cannot join a dispatch group", async (t) => {
  const contractorId = randomUUID();
  const connection = await connect(t, gateway, contractorToken(contractorId));

  await assertRefused(connection.invoke("JoinDispatchGroup", "west"), /contractor/i, /may not|not allowed|cannot/i);
  assert.equal(connection.state, HubConnectionState.Connected);
  assertJoinResult(await connection.invoke("JoinContractorGroup", contractorId), contractorGroup(contractorId), { seq: 0 });
});

test("joining a dispatch group with an invalid or empty region name is refused", async (t) => {
  const region = uniqueRegion();
  const connection = await connect(t, gateway, dispatcherToken([region]));

  await assertRefused(connection.invoke("JoinDispatchGroup", "west/../east"), /invalid region/i);
  await assertRefused(connection.invoke("JoinDispatchGroup", ""), /invalid region/i);
  assert.equal(connection.state, HubConnectionState.Connected);
  await join(connection, "JoinDispatchGroup", region);
});

test("a join with a wrong argument count is refused and the connection stays usable", async (t) => {
  const region = uniqueRegion();
  const connection = await connect(t, gateway, dispatcherToken([region]));

  // A join takes the name and an optional position; a leave only the name.
  await assertRefused(connection.invoke("JoinDispatchGroup"), /provides 0 argument\(s\) but target expects 1 or 2\./);
  await assertRefused(
    connection.invoke("JoinDispatchGroup", region, null, null),
    /provides 3 argument\(s\) but target expects 1 or 2\./,
  );
  await assertRefused(connection.invoke("JoinContractorGroup"), /provides 0 argument\(s\) but target expects 1 or 2\./);
  await assertRefused(connection.invoke("LeaveDispatchGroup", region, null), /provides 2 argument\(s\) but target expects 1\./);
  // A second argument that is not a position is a binding error.
  await assertRefused(
    connection.invoke("JoinDispatchGroup", region, region),
    /Error binding arguments\. The position must be null or \{"epoch": string, "seq": integer\}/,
  );
  await assertRefused(
    connection.invoke("JoinDispatchGroup", region, { epoch: "0".repeat(32) }),
    /The position must be null or/,
  );
  assert.equal(connection.state, HubConnectionState.Connected);
  // The refused calls joined nothing: the group's head is still the start of its history.
  await join(connection, "JoinDispatchGroup", region, { seq: 0 });
  // null is no position: the result carries no "recovered".
  await join(connection, "JoinDispatchGroup", region, { position: null, seq: 0 });
});

test("a connection cannot be in more groups than the configured limit", async (t) => {
  const limited = await gatewayFor(t, { args: ["--max-groups-per-connection", "2"] });
  const [first, second, third] = [uniqueRegion("a"), uniqueRegion("b"), uniqueRegion("c")];
  const connection = await connect(t, limited, dispatcherToken([first, second, third]));
  const events = arrivals(connection);

  await join(connection, "JoinDispatchGroup", first);
  await join(connection, "JoinDispatchGroup", second);
  await assertRefused(connection.invoke("JoinDispatchGroup", third), /2 groups/, /limit/);
  assert.equal(connection.state, HubConnectionState.Connected);
  // Joining a group it is already in is not a new membership.
  await join(connection, "JoinDispatchGroup", first);
  // Leaving makes room.
  await connection.invoke("LeaveDispatchGroup", second);
  const head = await join(connection, "JoinDispatchGroup", third, { seq: 0 });

  const left = recommendationReady(second);
  const joined = recommendationReady(third);
  await publishAccepted(limited, left);
  await publishAccepted(limited, joined);
  assert.deepStrictEqual(await events.take(1), [
    { target: "RecommendationReady", args: [joined, { group: dispatchGroup(third), epoch: head.epoch, seq: 1 }] },
  ]);
});

// ---------------------------------------------------------------------------------------------
// Connecting

/** Tokens the gateway must refuse, each with the reason its 401 must give. */
const badTokens = {
  garbage: [() => "this-is-not-a-jwt", /malformed/i],
  expired: [() => mintJwt(dispatcherClaims(["west"], { exp: Math.floor(Date.now() / 1000) - 3600 })), /expired/i],
  "signed with HS384 and the right secret": [() => mintJwt(dispatcherClaims(["west"]), { alg: "HS384" }), /algorithm/i],
  "signed with HS512 and the right secret": [() => mintJwt(dispatcherClaims(["west"]), { alg: "HS512" }), /algorithm/i],
  "unsigned with alg none": [() => mintJwt(dispatcherClaims(["west"]), { alg: "none" }), /algorithm|malformed/i],
  "signed with another secret": [() => mintJwt(dispatcherClaims(["west"]), { secret: `${JWT_SECRET}-other` }), /signature/i],
  "without exp": [
    () => {
      const claims = dispatcherClaims(["west"]);
      delete claims.exp;
      return mintJwt(claims);
    },
    /exp/,
  ],
  "with an unknown role": [() => mintJwt(dispatcherClaims(["west"], { role: "admin" })), /role/],
};

for (const [name, [makeToken, reason]] of Object.entries(badTokens)) {
  test(`a token that is ${name} is refused at negotiate with 401 and a reason`, async (t) => {
    const token = makeToken();

    const raw = await negotiate(gateway, token);
    assert.equal(raw.status, 401, raw.text);
    assert.match(raw.text, reason);
    assert.ok(raw.text.length <= 200, `the 401 body is short, got ${raw.text.length} characters: ${raw.text}`);

    const connection = hubConnection(t, gateway, token);
    await assert.rejects(within(10_000, connection.start(), "start() to fail"), (error) => {
      assert.match(error.message, /Status code '401'/);
      return true;
    });
    assert.equal(connection.state, HubConnectionState.Disconnected);
  });
}

test("negotiate without a token is refused with 401", async () => {
  const raw = await negotiate(gateway, undefined);
  assert.equal(raw.status, 401, raw.text);
  assert.match(raw.text, /token/i, "the 401 body says the token is missing");
});

test("a direct WebSocket upgrade with a bad token is refused with 401 before upgrading", async () => {
  const wsUrl = gateway.hubUrl;
  const expired = badTokens.expired[0]();

  const viaHeader = await rawUpgrade(wsUrl, { authorization: `Bearer ${expired}` });
  assert.equal(viaHeader.status, 401);
  const viaQuery = await rawUpgrade(`${wsUrl}?access_token=${encodeURIComponent(expired)}`);
  assert.equal(viaQuery.status, 401);
  const without = await rawUpgrade(wsUrl);
  assert.equal(without.status, 401);
});

test("a direct WebSocket upgrade accepts the token in the header or the access_token parameter", async () => {
  const token = dispatcherToken([uniqueRegion()]);
  const viaHeader = await rawUpgrade(gateway.hubUrl, { authorization: `Bearer ${token}` });
  assert.equal(viaHeader.status, 101);
  const viaQuery = await rawUpgrade(`${gateway.hubUrl}?access_token=${encodeURIComponent(token)}`);
  assert.equal(viaQuery.status, 101);
});

test("the official client with skipNegotiation and a bad token fails to start", async (t) => {
  const connection = hubConnection(t, gateway, badTokens.garbage[0](), { skipNegotiation: true });
  await assert.rejects(within(10_000, connection.start(), "start() to fail"), (error) => {
    assert.match(error.message, /401|WebSocket failed to connect/);
    return true;
  });
  assert.equal(connection.state, HubConnectionState.Disconnected);
});

// ---------------------------------------------------------------------------------------------
// Publishing

test("publishing without the service key is refused with 401", async () => {
  const event = recommendationReady(uniqueRegion());
  const missing = await publish(gateway, event, { key: null });
  assert.equal(missing.status, 401, missing.text);
  const wrong = await publish(gateway, event, { key: "not-the-service-key" });
  assert.equal(wrong.status, 401, wrong.text);
  const jwt = await publish(gateway, event, { key: dispatcherToken(["west"]) });
  assert.equal(jwt.status, 401, "a user's JWT is not a service key");
});

test("publishing an invalid event is refused with 400 and an error naming the problem", async (t) => {
  const region = uniqueRegion();
  const connection = await connect(t, gateway, dispatcherToken([region]));
  const events = arrivals(connection);
  const joined = await join(connection, "JoinDispatchGroup", region, { seq: 0 });

  const cases = [
    [{ ...recommendationReady(region), jobId: "not-a-uuid" }, /jobId/],
    [(({ requestId, ...rest }) => rest)(recommendationReady(region)), /requestId/],
    [{ ...recommendationReady(region), generatedAt: "2025-11-08T12:34:56+02:00" }, /generatedAt/],
    [{ ...recommendationReady(region), type: "JobCancelled" }, /JobCancelled|type/],
    [{ ...jobAssigned(region, randomUUID()), endUtc: "2025-11-08T14:00:00Z" }, /endUtc/],
    [{ ...jobAssigned(region, randomUUID()), source: "robot" }, /source/],
    [{ ...recommendationReady(region), region: "west east" }, /region/],
    ["{not json", /json/i],
  ];
  for (const [body, pattern] of cases) {
    const response = await publish(gateway, body);
    assert.equal(response.status, 400, `${JSON.stringify(body)} → ${response.status} ${response.text}`);
    assert.equal(typeof response.json?.error, "string", `400 body is {"error": ...}, got ${response.text}`);
    assert.match(response.json.error, pattern);
  }

  // A malformed Idempotency-Key refuses even a valid event.
  for (const badKey of ["has space", "x".repeat(201)]) {
    const response = await publish(gateway, recommendationReady(region), { headers: { "idempotency-key": badKey } });
    assert.equal(response.status, 400, `Idempotency-Key ${JSON.stringify(badKey)} → ${response.status} ${response.text}`);
    assert.match(response.json?.error ?? "", /Idempotency-Key must be 1 to 200 printable ASCII characters without spaces/);
  }

  // None of the refused events reached the group: the first event to arrive is a valid one.
  // Nor did they take a position in its history: the valid event is the group's first.
  const valid = recommendationReady(region);
  await publishAccepted(gateway, valid);
  assert.deepStrictEqual(await events.take(1), [
    { target: "RecommendationReady", args: [valid, { group: dispatchGroup(region), epoch: joined.epoch, seq: 1 }] },
  ]);
});
