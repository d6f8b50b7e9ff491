// The SignalR JSON hub protocol on the wire, driven with raw WebSocket frames where the official
// client would hide the detail: batching, handshake versions, event records, method-name case.

import assert from "node:assert/strict";
import { test } from "node:test";

import { HubConnectionState } from "@microsoft/signalr";

import {
  RS,
  assertJoinResult,
  connect,
  delivered,
  dispatchGroup,
  dispatcherToken,
  gatewayForFile,
  nextClose,
  publishAccepted,
  rawHandshakeAndJoin,
  rawWebSocket,
  recommendationReady,
  recordsFrom,
  uniqueRegion,
  within,
} from "./harness.mjs";


const gateway = gatewayForFile({ name: "protocol" });

/** A raw WebSocket to the hub for a dispatcher of `region`, closed when the test ends. */
async function openHub(t, region) {
  const ws = await rawWebSocket(gateway.hubUrl, { authorization: `Bearer ${dispatcherToken([region])}` });
  t.after(() => ws.socket.destroy());
  assert.equal(ws.status, 101);
  return ws;
}

/** Opens the hub and completes the JSON handshake. */
async function handshaken(t, region) {
  const ws = await openHub(t, region);
  ws.sendText(`{"protocol":"json","version":1}${RS}`);
  assert.deepStrictEqual(await recordsFrom(ws, 0, 1), [{}]);
  return ws;
}

test("a handshake and an invocation batched into one frame are both answered", async (t) => {
  const region = uniqueRegion();
  const ws = await openHub(t, region);
  await rawHandshakeAndJoin(ws, region);
});

test("a handshake asking for version 2 of the JSON protocol is accepted", async (t) => {
  const ws = await openHub(t, uniqueRegion());
  ws.sendText(`{"protocol":"json","version":2}${RS}`);

  assert.deepStrictEqual(await recordsFrom(ws, 0, 1), [{}]);
});

test("an event reaches a raw client as one text-frame Invocation record without an invocation id", async (t) => {
  const region = uniqueRegion();
  const ws = await handshaken(t, region);
  // Method names match case-insensitively, as in ASP.NET Core.
  ws.sendText(`{"target":"joindispatchgroup","arguments":["${region}"],"invocationId":"7","type":1}${RS}`);
  const [completion] = await recordsFrom(ws, 1, 1);
  assert.deepStrictEqual(completion, { type: 3, invocationId: "7", result: completion.result });
  const joined = assertJoinResult(completion.result, dispatchGroup(region), { seq: 0 });

  const event = recommendationReady(region, { schemaVersion: 2 });
  const seen = ws.frames.length;
  const published = await publishAccepted(gateway, event);
  // Two arguments: the event untouched, then its position in the group.
  const position = { group: dispatchGroup(region), epoch: joined.epoch, seq: 1 };
  assert.deepStrictEqual(await recordsFrom(ws, seen, 1), [
    { type: 1, target: "RecommendationReady", arguments: [event, position] },
  ]);
  assert.deepStrictEqual([event, position], delivered(event, published, dispatchGroup(region)));
  // The published body is placed byte for byte as the first argument.
  const text = ws.frames.slice(seen).find((frame) => frame.opcode === 0x1 && frame.text.includes('"type":1'))?.text ?? "";
  assert.ok(text.startsWith(`{"type":1,"target":"RecommendationReady","arguments":[${JSON.stringify(event)},{`), text);
});

test("a non-blocking invocation (no invocation id) is carried out without a reply", async (t) => {
  const region = uniqueRegion();
  const ws = await handshaken(t, region);

  ws.sendText(`{"target":"JoinDispatchGroup","arguments":["${region}"],"type":1}${RS}`);
  // A blocking call on another group as a barrier: had the first call been answered, its reply
  // would come before the barrier's.
  ws.sendText(`{"target":"LeaveDispatchGroup","arguments":["${uniqueRegion()}"],"invocationId":"barrier","type":1}${RS}`);
  assert.deepStrictEqual(await recordsFrom(ws, 1, 1), [{ type: 3, invocationId: "barrier" }]);

  // The non-blocking join took effect: the group's events arrive.
  const event = recommendationReady(region);
  const published = await publishAccepted(gateway, event);
  assert.deepStrictEqual(await recordsFrom(ws, 1, 2), [
    { type: 3, invocationId: "barrier" },
    { type: 1, target: "RecommendationReady", arguments: delivered(event, published, dispatchGroup(region)) },
  ]);
  assert.equal(published.json.positions[0].seq, 1);
});

test("a client message over the size limit closes the connection with a reason that forbids reconnecting", async (t) => {
  const connection = await connect(t, gateway, dispatcherToken([uniqueRegion()]), {
    configure: (builder) => builder.withAutomaticReconnect([0, 0, 0]),
  });
  let reconnecting = false;
  connection.onreconnecting(() => {
    reconnecting = true;
  });
  const closed = nextClose(connection);

  await assert.rejects(connection.invoke("JoinDispatchGroup", "x".repeat(40 * 1024)), (error) => {
    assert.match(error.message, /^Server returned an error on close: .*limit/);
    return true;
  });
  const error = await within(5000, closed, "onclose");
  assert.match(error?.message ?? "", /^Server returned an error on close: .*32768/);
  assert.equal(reconnecting, false, "a client that broke the protocol is not invited back");
  assert.equal(connection.state, HubConnectionState.Disconnected);
});
