// Delivery of published events to the official client, over negotiate and over a direct WebSocket.
// One gateway serves the whole file; every test uses its own regions and contractor ids.

import assert from "node:assert/strict";
import { randomUUID } from "node:crypto";
import { test } from "node:test";

import { HubConnectionState } from "@microsoft/signalr";

import {
  EPOCH,
  arrivals,
  assertJoinsAndReceives,
  assertPublishAnswer,
  connect,
  contractorClaims,
  contractorGroup,
  contractorToken,
  delivered,
  dispatchGroup,
  dispatcherToken,
  gatewayForFile,
  inbox,
  jobAssigned,
  join,
  mintJwt,
  negotiate,
  positionIn,
  publish,
  publishAccepted,
  recommendationReady,
  uniqueRegion,
} from "./harness.mjs";

const gateway = gatewayForFile({ name: "delivery" });

test("negotiate offers only the WebSockets transport with text frames", async () => {
  const response = await negotiate(gateway, dispatcherToken([uniqueRegion()]));

  assert.equal(response.status, 200, response.text);
  assert.match(response.headers.get("content-type") ?? "", /^application\/json/);
  assert.equal(response.json.negotiateVersion, 1);
  assert.equal(typeof response.json.connectionId, "string");
  assert.ok(response.json.connectionId.length > 0, "connectionId is empty");
  assert.equal(typeof response.json.connectionToken, "string");
  assert.match(response.json.connectionToken, /^[A-Za-z0-9._~-]+$/, "connectionToken must be URL-safe (unreserved characters only)");
  assert.notEqual(response.json.connectionToken, response.json.connectionId);
  assert.deepEqual(response.json.availableTransports, [{ transport: "WebSockets", transferFormats: ["Text"] }]);
  assert.equal(response.json.useStatefulReconnect, undefined);
});

test("a dispatcher connected via negotiate receives RecommendationReady for its region exactly as published", async (t) => {
  const region = uniqueRegion("west");
  const connection = await connect(t, gateway, dispatcherToken([region]));
  assert.equal(typeof connection.connectionId, "string", "negotiate gives the client a connection id");
  const recommendations = inbox(connection, "RecommendationReady");

  // A join resolves with the group's current position: a group nobody published to is at seq 0.
  const joined = await connection.invoke("JoinDispatchGroup", region);
  assert.deepStrictEqual(joined, { group: dispatchGroup(region), epoch: joined?.epoch, seq: 0 });
  assert.match(joined.epoch, EPOCH);

  const plain = recommendationReady(region);
  const extended = recommendationReady(region, { schemaVersion: 2, hint: { ranks: [1, 2, 3], note: "ünïcödé ✓" } });
  const plainPublished = await publishAccepted(gateway, plain);
  const extendedPublished = await publishAccepted(gateway, extended);

  // Each event comes untouched, then its position: the joined epoch, seq counting on from the head.
  const [first, second] = await recommendations.take(2);
  const group = dispatchGroup(region);
  assert.deepStrictEqual(first, [plain, { group, epoch: joined.epoch, seq: 1 }]);
  assert.deepStrictEqual(second, [extended, { group, epoch: joined.epoch, seq: 2 }], "fields unknown to the contract reach the client unchanged");
  assert.deepStrictEqual(first, delivered(plain, plainPublished, group), "the position is the one the publish answered");
  assert.deepStrictEqual(second, delivered(extended, extendedPublished, group));
});

test("a dispatcher connected with skipNegotiation over WebSockets receives RecommendationReady exactly as published", async (t) => {
  const region = uniqueRegion("west");
  const connection = await connect(t, gateway, dispatcherToken([region]), { skipNegotiation: true });
  assert.equal(connection.connectionId, null, "without negotiate the client has no connection id");
  await assertJoinsAndReceives(gateway, connection, region, { schemaVersion: 2 });
});

test("JobAssigned reaches the dispatchers of its region and only the assigned contractor", async (t) => {
  const region = uniqueRegion("west");
  const assignedId = randomUUID();
  const otherId = randomUUID();

  const dispatcher = await connect(t, gateway, dispatcherToken([region]));
  const assigned = await connect(t, gateway, contractorToken(assignedId));
  const other = await connect(t, gateway, contractorToken(otherId), { skipNegotiation: true });
  const dispatcherJobs = inbox(dispatcher, "JobAssigned");
  const assignedJobs = inbox(assigned, "JobAssigned");
  const otherEvents = arrivals(other);

  const dispatch = await join(dispatcher, "JoinDispatchGroup", region, { seq: 0 });
  const assignedHead = await join(assigned, "JoinContractorGroup", assignedId, { seq: 0 });
  const otherHead = await join(other, "JoinContractorGroup", otherId, { seq: 0 });

  const forAssigned = jobAssigned(region, assignedId, { source: "auto" });
  const forOther = jobAssigned(region, otherId);
  const assignedPublished = await publishAccepted(gateway, forAssigned);
  const otherPublished = await publishAccepted(gateway, forOther);
  // Routed to the region's dispatch group and the contractor's group, a position in each.
  assert.deepStrictEqual(assignedPublished.json.groups, [dispatchGroup(region), contractorGroup(assignedId)]);
  assert.deepStrictEqual(otherPublished.json.groups, [dispatchGroup(region), contractorGroup(otherId)]);

  // Each member gets the position in the group it is a member of.
  assert.deepStrictEqual(await assignedJobs.nth(1), [
    forAssigned,
    { group: contractorGroup(assignedId), epoch: assignedHead.epoch, seq: 1 },
  ]);
  assert.deepStrictEqual(await dispatcherJobs.take(2), [
    [forAssigned, { group: dispatchGroup(region), epoch: dispatch.epoch, seq: 1 }],
    [forOther, { group: dispatchGroup(region), epoch: dispatch.epoch, seq: 2 }],
  ]);
  assert.deepStrictEqual(dispatcherJobs.received[1], delivered(forOther, otherPublished, dispatchGroup(region)));
  // Events reach one connection in publication order, so had the other contractor been sent the
  // first assignment it would have arrived before its own.
  const [firstForOther] = await otherEvents.take(1);
  assert.deepStrictEqual(firstForOther, {
    target: "JobAssigned",
    args: [forOther, { group: contractorGroup(otherId), epoch: otherHead.epoch, seq: 1 }],
  });
});

test("a contractor whose token carries only sub joins the group named by sub", async (t) => {
  const contractorId = randomUUID();
  const claims = contractorClaims(undefined, { sub: contractorId });
  delete claims.contractorId;
  const connection = await connect(t, gateway, mintJwt(claims));
  const jobs = inbox(connection, "JobAssigned");

  const joined = await join(connection, "JoinContractorGroup", contractorId, { seq: 0 });
  const event = jobAssigned(uniqueRegion(), contractorId);
  await publishAccepted(gateway, event);

  assert.deepStrictEqual(await jobs.nth(1), [event, { group: contractorGroup(contractorId), epoch: joined.epoch, seq: 1 }]);
});

test("a contractor id in upper case names the same group as the event's lower-case uuid", async (t) => {
  const contractorId = randomUUID();
  const connection = await connect(t, gateway, contractorToken(contractorId.toUpperCase()));
  const jobs = inbox(connection, "JobAssigned");

  // The join result names the group in lower case, as the event's position does.
  const joined = await join(connection, "JoinContractorGroup", contractorId.toUpperCase(), { seq: 0 });
  assert.equal(joined.group, `/contractor/${contractorId}`);
  const event = jobAssigned(uniqueRegion(), contractorId);
  await publishAccepted(gateway, event);

  assert.deepStrictEqual(await jobs.nth(1), [event, { group: `/contractor/${contractorId}`, epoch: joined.epoch, seq: 1 }]);
});

test("a dispatcher that leaves a dispatch group stops receiving its events", async (t) => {
  const left = uniqueRegion("west");
  const kept = uniqueRegion("east");
  const connection = await connect(t, gateway, dispatcherToken([left, kept]));
  const events = arrivals(connection);

  const leftHead = await join(connection, "JoinDispatchGroup", left, { seq: 0 });
  const keptHead = await join(connection, "JoinDispatchGroup", kept, { seq: 0 });
  const beforeLeaving = recommendationReady(left);
  await publishAccepted(gateway, beforeLeaving);
  assert.deepStrictEqual(await events.take(1), [
    { target: "RecommendationReady", args: [beforeLeaving, { group: dispatchGroup(left), epoch: leftHead.epoch, seq: 1 }] },
  ]);

  const leaveResult = await connection.invoke("LeaveDispatchGroup", left);
  assert.equal(leaveResult ?? undefined, undefined, "a leave completes without a result");
  const afterLeaving = recommendationReady(left);
  const stillJoined = jobAssigned(kept, randomUUID());
  const afterPublished = await publishAccepted(gateway, afterLeaving);
  // The left group's history goes on without this client.
  assert.deepStrictEqual(positionIn(afterPublished, dispatchGroup(left)), { group: dispatchGroup(left), epoch: leftHead.epoch, seq: 2 });
  await publishAccepted(gateway, stillJoined);

  const [, next] = await events.take(2);
  assert.deepStrictEqual(
    next,
    { target: "JobAssigned", args: [stillJoined, { group: dispatchGroup(kept), epoch: keptHead.epoch, seq: 1 }] },
    "the event for the left region arrived",
  );
});

test("a contractor that leaves its group stops receiving assignments", async (t) => {
  const contractorId = randomUUID();
  const region = uniqueRegion();
  const dispatcher = await connect(t, gateway, dispatcherToken([region]));
  const contractor = await connect(t, gateway, contractorToken(contractorId));
  const contractorEvents = arrivals(contractor);
  const dispatcherJobs = inbox(dispatcher, "JobAssigned");

  const first = await join(contractor, "JoinContractorGroup", contractorId, { seq: 0 });
  const dispatch = await join(dispatcher, "JoinDispatchGroup", region, { seq: 0 });
  await contractor.invoke("LeaveContractorGroup", contractorId);
  const afterLeaving = jobAssigned(region, contractorId);
  await publishAccepted(gateway, afterLeaving);
  // Proof of publication: the dispatcher of the region got it.
  assert.deepStrictEqual(await dispatcherJobs.nth(1), [afterLeaving, { group: dispatchGroup(region), epoch: dispatch.epoch, seq: 1 }]);

  // Rejoining without a position starts after the event published while away (no replay).
  const rejoined = await join(contractor, "JoinContractorGroup", contractorId, { epoch: first.epoch, seq: 1 });
  const afterRejoining = jobAssigned(region, contractorId);
  await publishAccepted(gateway, afterRejoining);

  assert.deepStrictEqual(await contractorEvents.take(1), [
    { target: "JobAssigned", args: [afterRejoining, { group: contractorGroup(contractorId), epoch: rejoined.epoch, seq: 2 }] },
  ]);
});

test("invoking an unknown hub method is refused by name and the connection stays usable", async (t) => {
  const region = uniqueRegion();
  const connection = await connect(t, gateway, dispatcherToken([region]));

  await assert.rejects(connection.invoke("NoSuchMethod", region), (error) => {
    assert.match(error.message, /NoSuchMethod/);
    assert.match(error.message, /does not exist|unknown/i);
    return true;
  });
  assert.equal(connection.state, HubConnectionState.Connected);
  await assertJoinsAndReceives(gateway, connection, region);
});

test("every connection in a dispatch group receives each event once", async (t) => {
  const region = uniqueRegion();
  const token = dispatcherToken([region]);
  const first = await connect(t, gateway, token);
  const second = await connect(t, gateway, token, { skipNegotiation: true });
  const firstEvents = arrivals(first);
  const secondEvents = arrivals(second);
  const head = await join(first, "JoinDispatchGroup", region, { seq: 0 });
  // Every member of a group sees the same history.
  await join(second, "JoinDispatchGroup", region, { epoch: head.epoch, seq: 0 });
  // Joining twice keeps one membership.
  await join(first, "JoinDispatchGroup", region, { epoch: head.epoch, seq: 0 });

  const events = [recommendationReady(region), jobAssigned(region, randomUUID()), recommendationReady(region)];
  for (const event of events) await publishAccepted(gateway, event);
  const marker = recommendationReady(region, { marker: true });
  await publishAccepted(gateway, marker);

  const group = dispatchGroup(region);
  const expected = [...events, marker].map((event, i) => ({
    target: event.type,
    args: [event, { group, epoch: head.epoch, seq: i + 1 }],
  }));
  assert.deepStrictEqual(await firstEvents.take(4), expected);
  assert.deepStrictEqual(await secondEvents.take(4), expected);
});

test("the answer to a publish names the event type and the groups it was routed to", async () => {
  const region = uniqueRegion();
  const contractorId = randomUUID();

  const recommendation = await publish(gateway, recommendationReady(region));
  assert.equal(recommendation.status, 202, recommendation.text);
  const dispatchEpoch = recommendation.json?.positions?.[0]?.epoch;
  assert.match(dispatchEpoch ?? "", EPOCH, recommendation.text);
  assert.deepStrictEqual(recommendation.json, {
    type: "RecommendationReady",
    groups: [`/dispatch/${region}`],
    positions: [{ group: `/dispatch/${region}`, epoch: dispatchEpoch, seq: 1 }],
    duplicate: false,
  });

  const assignment = await publish(gateway, jobAssigned(region, contractorId.toUpperCase()));
  assert.equal(assignment.status, 202, assignment.text);
  const contractorEpoch = assignment.json?.positions?.[1]?.epoch;
  assert.match(contractorEpoch ?? "", EPOCH, assignment.text);
  assert.deepStrictEqual(assignment.json, {
    type: "JobAssigned",
    groups: [`/dispatch/${region}`, `/contractor/${contractorId}`],
    positions: [
      { group: `/dispatch/${region}`, epoch: dispatchEpoch, seq: 2 },
      { group: `/contractor/${contractorId}`, epoch: contractorEpoch, seq: 1 },
    ],
    duplicate: false,
  });
  assertPublishAnswer(assignment.json, "JobAssigned", { duplicate: false });
});

test("a client asking for stateful reconnect is offered it and receives events", async (t) => {
  const region = uniqueRegion();
  const token = dispatcherToken([region]);
  const raw = await fetch(`${gateway.hubUrl}/negotiate?negotiateVersion=1&useStatefulReconnect=true`, {
    method: "POST",
    headers: { authorization: `Bearer ${token}` },
  });
  const body = await raw.json();
  assert.equal(raw.status, 200);
  assert.equal(body.useStatefulReconnect, true, "stateful reconnect is offered");

  // The resumption itself is stateful-reconnect.test.mjs's.
  const connection = await connect(t, gateway, token, { configure: (builder) => builder.withStatefulReconnect() });
  await assertJoinsAndReceives(gateway, connection, region);
});
