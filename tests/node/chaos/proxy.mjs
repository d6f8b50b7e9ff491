// A TCP proxy on loopback between a publisher and Redis. Once armed, it forwards the next
// script call (EVALSHA/EVAL: a publish) to Redis, waits for Redis's reply, drops that reply and
// cuts both connections: the publisher sees its call fail after Redis executed it.

import net from "node:net";

import { deferred } from "../harness.mjs";

/** Starts the proxy to 127.0.0.1:`targetPort`; resolves with { port, armCut, cut, close, stats }. */
export async function cuttingProxy(targetPort) {
  const sockets = new Set();
  const stats = { connections: 0, cuts: 0 };
  let armed = false;
  const cut = deferred();

  const server = net.createServer((client) => {
    stats.connections += 1;
    const upstream = net.connect({ host: "127.0.0.1", port: targetPort });
    sockets.add(client);
    sockets.add(upstream);
    let victim = null; // set when this connection carries the publish to cut
    const drop = () => {
      client.destroy();
      upstream.destroy();
      sockets.delete(client);
      sockets.delete(upstream);
    };
    client.on("data", (chunk) => {
      if (armed && victim === null && /EVAL/i.test(chunk.toString("latin1"))) {
        armed = false;
        const text = chunk.toString("latin1");
        const key = /:id:([0-9a-f-]{36})/i.exec(text)?.[1] ?? null;
        const group = /\{(\/[a-z]+\/[^}]+)\}/i.exec(text)?.[1] ?? null;
        victim = { key, group, at: Date.now(), bytes: chunk.length };
      }
      upstream.write(chunk);
    });
    upstream.on("data", (chunk) => {
      if (victim) {
        // Redis answered the publish: the reply never reaches the publisher.
        stats.cuts += 1;
        victim.replyBytes = chunk.length;
        drop();
        cut.resolve(victim);
        return;
      }
      client.write(chunk);
    });
    client.on("error", drop);
    upstream.on("error", drop);
    client.on("close", drop);
    upstream.on("close", drop);
  });
  await new Promise((resolve, reject) => {
    server.once("error", reject);
    server.listen(0, "127.0.0.1", resolve);
  });
  return {
    port: server.address().port,
    stats,
    /** The next publish is forwarded, its reply dropped and the connection cut. */
    armCut() {
      armed = true;
      return cut.promise;
    },
    cut: cut.promise,
    async close() {
      for (const socket of sockets) socket.destroy();
      await new Promise((resolve) => server.close(resolve));
    },
  };
}
