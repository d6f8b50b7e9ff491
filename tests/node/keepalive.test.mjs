// Keep-alive, client timeout and handshake timeout, with a gateway tuned to short intervals.

import assert from "node:assert/strict";
import { test } from "node:test";

import { HubConnectionState } from "@microsoft/signalr";

import {
  RS,
  assertJoinsAndReceives,
  connect,
  deferred,
  dispatcherToken,
  gatewayForFile,
  hubConnection,
  nextClose,
  rawWebSocket,
  uniqueRegion,
  within,
} from "./harness.mjs";

const CLIENT_TIMEOUT_MS = 3000;

const gateway = gatewayForFile({
    name: "keepalive",
    args: ["--keepalive-interval", "1s", "--client-timeout", `${CLIENT_TIMEOUT_MS / 1000}s`, "--handshake-timeout", "1s"],
  });

/** A client that never pings on its own (its keep-alive is far beyond the server's timeout). */
const silent = (builder) => builder.withKeepAliveInterval(60_000).withServerTimeout(120_000);

test("the gateway closes a client that stays silent past the client timeout with a reason", async (t) => {
  const connection = hubConnection(t, gateway, dispatcherToken([uniqueRegion()]), { configure: silent });
  const closed = nextClose(connection);
  await within(10_000, connection.start(), "start()");
  const startedAt = Date.now();

  const error = await within(CLIENT_TIMEOUT_MS + 10_000, closed, "the gateway to close the silent client");
  const elapsed = Date.now() - startedAt;

  assert.ok(error instanceof Error, `onclose got ${error}, expected the server's close error`);
  assert.match(error.message, /^Server returned an error on close: \S/);
  assert.match(error.message, /client timeout/i, "the reason names the client timeout");
  assert.ok(elapsed >= CLIENT_TIMEOUT_MS - 500, `closed after ${elapsed} ms, before the ${CLIENT_TIMEOUT_MS} ms client timeout`);
  assert.equal(connection.state, HubConnectionState.Disconnected);
});

test("a silent client closed for inactivity is allowed to reconnect", async (t) => {
  const region = uniqueRegion();
  const reconnecting = deferred();
  const reconnected = deferred();
  const connection = hubConnection(t, gateway, dispatcherToken([region]), {
    configure: (builder) => silent(builder).withAutomaticReconnect([0, 200, 500, 1000]),
  });
  connection.onreconnecting((error) => reconnecting.resolve(error));
  connection.onreconnected((connectionId) => reconnected.resolve(connectionId));
  await within(10_000, connection.start(), "start()");
  const firstId = connection.connectionId;

  const error = await within(CLIENT_TIMEOUT_MS + 10_000, reconnecting.promise, "onreconnecting after the idle close");
  assert.ok(error instanceof Error, `onreconnecting got ${error}`);
  assert.match(error.message, /^Server returned an error on close: \S/);

  const secondId = await within(10_000, reconnected.promise, "onreconnected");
  assert.notEqual(secondId, firstId, "a reconnect negotiates a new connection");
  await assertJoinsAndReceives(gateway, connection, region);
});

test("a client that pings outlives the client timeout and server pings keep it from timing out", async (t) => {
  const region = uniqueRegion();
  // Pings every 500 ms when idle; gives up on the server after 3 s of silence from it.
  const lively = await connect(t, gateway, dispatcherToken([region]), {
    configure: (builder) => builder.withKeepAliveInterval(500).withServerTimeout(CLIENT_TIMEOUT_MS),
  });
  let livelyClosed;
  lively.onclose((error) => {
    livelyClosed = error ?? new Error("closed without error");
  });

  // The silent client, started after the lively one, is the clock: once the gateway has closed it,
  // the lively client has been connected for longer than both timeouts.
  const quiet = hubConnection(t, gateway, dispatcherToken([region]), { configure: silent });
  const quietClosed = nextClose(quiet);
  await within(10_000, quiet.start(), "start()");
  await within(CLIENT_TIMEOUT_MS + 10_000, quietClosed, "the gateway to close the silent client");

  assert.equal(livelyClosed, undefined, `the pinging client was closed: ${livelyClosed?.message}`);
  assert.equal(lively.state, HubConnectionState.Connected);
  await assertJoinsAndReceives(gateway, lively, region);
});

test("a WebSocket that never sends the handshake is closed after the handshake timeout", async () => {
  const socket = await rawWebSocket(gateway.hubUrl, { authorization: `Bearer ${dispatcherToken([uniqueRegion()])}` });
  assert.equal(socket.status, 101);
  const openedAt = Date.now();

  const frames = await within(10_000, socket.closed, "the gateway to close the connection");
  const elapsed = Date.now() - openedAt;
  assert.ok(elapsed >= 500, `closed after ${elapsed} ms, before the 1 s handshake timeout`);
  // As ASP.NET Core does: a handshake error record, then the close.
  const text = frames.filter((frame) => frame.opcode === 0x1).map((frame) => frame.text);
  assert.deepStrictEqual(text, [`{"error":"Handshake was canceled."}${RS}`]);
  assert.equal(frames.at(-1).opcode, 0x8, "the WebSocket is closed with a close frame");
});

test("a handshake asking for an unsupported protocol is answered with a handshake error", async () => {
  const socket = await rawWebSocket(gateway.hubUrl, { authorization: `Bearer ${dispatcherToken([uniqueRegion()])}` });
  socket.sendText(`{"protocol":"messagepack","version":1}${RS}`);

  const frames = await within(10_000, socket.closed, "the gateway to answer and close");
  const replies = frames.filter((frame) => frame.opcode === 0x1).map((frame) => frame.text);
  assert.equal(replies.length >= 1, true, `expected a handshake error frame, got ${JSON.stringify(frames)}`);
  assert.ok(replies[0].endsWith(RS), "the handshake reply is terminated by the record separator");
  const reply = JSON.parse(replies[0].split(RS)[0]);
  assert.equal(reply.type, undefined, "a handshake reply carries no type");
  assert.match(reply.error, /messagepack/);
  assert.equal(frames.at(-1).opcode, 0x8, "the WebSocket is closed with a close frame");
});
