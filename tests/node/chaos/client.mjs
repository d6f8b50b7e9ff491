// A dispatcher client that resumes: the official @microsoft/signalr client with automatic
// reconnect that never gives up within a test, which joins its dispatch groups with its last
// position per group (`JoinDispatchGroup(region, { epoch, seq })`) after every reconnect and
// records everything: each event with its position (second argument), each join and its
// completion (`recovered`), and the time spent disconnected (onreconnecting -> onreconnected).
// It drops nothing itself: duplicates are for the tracker to count.

import { HttpTransportType, HubConnectionBuilder, HubConnectionState, LogLevel } from "@microsoft/signalr";

import { within } from "../harness.mjs";

export const RECONNECT_DELAYS = [0, 100, 250, 500, 1000];
const GIVE_UP_AFTER_MS = 120_000;
const JOIN_ATTEMPTS = 40;
const JOIN_RETRY_MS = 250;

const groupOf = (region) => `/dispatch/${region}`;

/**
 * Creates (not starts) a client. `initial` optionally maps group -> { epoch, seq } to resume
 * from on the first join (a client coming back). Returns the client record; call start().
 */
export function resumingClient({ hubUrl, token, regions, name, initial = {} }) {
  const errors = [];
  const logger = {
    log(level, message) {
      if (level >= LogLevel.Error && errors.length < 20) errors.push(String(message));
    },
  };
  const connection = new HubConnectionBuilder()
    .withUrl(hubUrl, { accessTokenFactory: () => token, transport: HttpTransportType.WebSockets })
    .withAutomaticReconnect({
      nextRetryDelayInMilliseconds: (context) =>
        context.elapsedMilliseconds > GIVE_UP_AFTER_MS
          ? null
          : RECONNECT_DELAYS[Math.min(context.previousRetryCount, RECONNECT_DELAYS.length - 1)],
    })
    .configureLogging(logger)
    .build();

  const client = {
    name,
    regions,
    groups: regions.map(groupOf),
    connection,
    /** group -> [{ requestId, epoch, seq, at }] in arrival order */
    received: Object.fromEntries(regions.map((r) => [groupOf(r), []])),
    /** group -> last position { epoch, seq } (from events and join results) */
    last: { ...initial },
    /** [{ group, sent, result, error, at, rejoin }] */
    joins: [],
    reconnects: 0,
    disconnectedMs: 0,
    disconnectedSince: null,
    closedWith: undefined,
    errors,
    eventsWithoutPosition: 0,
  };

  connection.on("RecommendationReady", (event, position) => {
    const group = position?.group ?? groupOf(event.region);
    const list = client.received[group] ?? (client.received[group] = []);
    list.push({ requestId: event.requestId, epoch: position?.epoch, seq: position?.seq, at: Date.now() });
    if (position && position.epoch !== undefined) client.last[group] = { epoch: position.epoch, seq: position.seq };
    else client.eventsWithoutPosition += 1;
  });

  connection.onreconnecting(() => {
    client.reconnects += 1;
    (client.reconnectingAt ??= []).push(Date.now());
    if (client.disconnectedSince === null) client.disconnectedSince = Date.now();
  });
  connection.onreconnected(() => {
    (client.reconnectedAt ??= []).push(Date.now());
    if (client.disconnectedSince !== null) {
      client.disconnectedMs += Date.now() - client.disconnectedSince;
      client.disconnectedSince = null;
    }
    joinAll(true).catch(() => {});
  });
  connection.onclose((error) => {
    client.closedWith = error ?? null;
  });

  /** Joins one group with the last position, retrying hub errors while connected (bounded). */
  async function join(region, rejoin) {
    const group = groupOf(region);
    for (let attempt = 1; attempt <= JOIN_ATTEMPTS; attempt += 1) {
      if (connection.state !== HubConnectionState.Connected) return; // onreconnected joins again
      const sent = client.last[group] ? { ...client.last[group] } : null;
      const record = { group, sent, at: Date.now(), rejoin, attempt };
      client.joins.push(record);
      try {
        const result = sent
          ? await connection.invoke("JoinDispatchGroup", region, sent)
          : await connection.invoke("JoinDispatchGroup", region);
        record.result = result;
        adopt(group, result);
        return;
      } catch (error) {
        record.error = String(error?.message ?? error);
        if (connection.state !== HubConnectionState.Connected) return;
        await new Promise((resolve) => setTimeout(resolve, JOIN_RETRY_MS));
      }
    }
  }

  /** A join completion moves the last position forward when it says to. */
  function adopt(group, result) {
    if (!result || typeof result !== "object" || result.epoch === undefined) return;
    const last = client.last[group];
    if (!last || last.epoch !== result.epoch || (result.recovered === false && last.seq < result.seq)) {
      client.last[group] = { epoch: result.epoch, seq: result.seq };
    }
  }

  async function joinAll(rejoin) {
    await Promise.all(regions.map((region) => join(region, rejoin)));
  }

  client.start = async (ms = 15_000) => {
    await within(ms, connection.start(), `${name}: start()`);
    await within(ms, joinAll(false), `${name}: first joins`);
    const failed = client.joins.filter((j) => !j.result && j.error);
    if (regions.some((r) => !client.joins.some((j) => j.group === groupOf(r) && j.result !== undefined))) {
      throw new Error(`${name}: a first join failed: ${JSON.stringify(failed.slice(-3))}`);
    }
  };
  client.stop = async () => {
    if (client.disconnectedSince !== null) {
      client.disconnectedMs += Date.now() - client.disconnectedSince;
      client.disconnectedSince = null;
    }
    await within(10_000, connection.stop(), `${name}: stop()`).catch(() => {});
  };
  /** Disconnected time so far, counting an ongoing disconnection. */
  client.downMs = () =>
    client.disconnectedMs + (client.disconnectedSince === null ? 0 : Date.now() - client.disconnectedSince);
  client.connected = () => connection.state === HubConnectionState.Connected;
  return client;
}

/** Starts `clients` with at most `concurrency` starts in flight. */
export async function startAll(clients, concurrency = 20) {
  let next = 0;
  const worker = async () => {
    while (next < clients.length) {
      const client = clients[next];
      next += 1;
      await client.start();
    }
  };
  await Promise.all(Array.from({ length: Math.min(concurrency, clients.length) }, worker));
}
