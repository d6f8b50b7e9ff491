// A minimal RESP2 client for the chaos tests: one command at a time over a fresh loopback
// connection (CLIENT KILL, CONFIG SET, INFO, XRANGE, HGETALL, PING), each bounded by a timeout.

import net from "node:net";

import { encode, parse } from "../resp.mjs";

/** Sends one command to 127.0.0.1:`port`; resolves with the reply (rejects on an error reply). */
export function redisCommand(port, args, timeoutMs = 10_000) {
  return new Promise((resolve, reject) => {
    const socket = net.connect({ host: "127.0.0.1", port });
    let buffer = Buffer.alloc(0);
    const timer = setTimeout(() => {
      socket.destroy();
      reject(new Error(`redis ${args[0]} on port ${port} timed out after ${timeoutMs} ms`));
    }, timeoutMs);
    const finish = (error, value) => {
      clearTimeout(timer);
      socket.destroy();
      if (error) reject(error);
      else resolve(value);
    };
    socket.once("connect", () => socket.write(encode(args)));
    socket.on("data", (chunk) => {
      buffer = Buffer.concat([buffer, chunk]);
      let reply;
      try {
        reply = parse(buffer);
      } catch (error) {
        finish(error);
        return;
      }
      if (!reply) return;
      if (reply.value instanceof Error) finish(new Error(`redis ${args.join(" ")}: ${reply.value.message}`));
      else finish(null, reply.value);
    });
    socket.once("error", (error) => finish(error));
    socket.once("close", () => finish(new Error(`redis connection on port ${port} closed before a reply`)));
  });
}

/** INFO <section> as an object. */
export async function redisInfo(port, section) {
  const text = await redisCommand(port, ["INFO", section]);
  return Object.fromEntries(
    text
      .split("\r\n")
      .filter((line) => line && !line.startsWith("#"))
      .map((line) => [line.slice(0, line.indexOf(":")), line.slice(line.indexOf(":") + 1)]),
  );
}

/** Resolves once Redis answers PING (polled with a deadline). */
export async function redisReady(port, ms = 15_000) {
  const deadline = Date.now() + ms;
  for (;;) {
    try {
      if ((await redisCommand(port, ["PING"], 1000)) === "PONG") return;
    } catch {
      // not yet
    }
    if (Date.now() > deadline) throw new Error(`redis on port ${port} not answering PING within ${ms} ms`);
    await new Promise((resolve) => setTimeout(resolve, 25));
  }
}

/**
 * The history of a group as Redis holds it (spec keys): { epoch, seq, entries: [{ seq, epoch,
 * requestId }] } in stream order.
 */
export async function groupHistory(port, group, prefix = "rt:") {
  const pos = await redisCommand(port, ["HGETALL", `${prefix}{${group}}:pos`]);
  const fields = {};
  for (let i = 0; i + 1 < (pos ?? []).length; i += 2) fields[pos[i]] = pos[i + 1];
  const raw = (await redisCommand(port, ["XRANGE", `${prefix}{${group}}:history`, "-", "+"], 10_000)) ?? [];
  const entries = raw.map(([id, kv]) => {
    const m = JSON.parse(kv[kv.indexOf("m") + 1]);
    return { id, seq: m.seq, epoch: m.epoch, requestId: m.event?.requestId };
  });
  return { epoch: fields.epoch, seq: fields.seq === undefined ? undefined : Number(fields.seq), entries };
}
