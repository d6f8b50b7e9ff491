// A TCP proxy on loopback that a test can cut: it forwards every connection to 127.0.0.1:<target>
// byte for byte, and on request drops the connections it carries (`cut`), or stops listening and
// drops them (`stop`) until it listens again on the same port (`start`). Put in front of the load
// balancer it cuts clients' sockets under them; put between the load balancer and a replica (see
// `routeReplicaThrough`) it cuts the network to that replica. It imports nothing outside Node.

import { readFileSync, writeFileSync } from "node:fs";
import net from "node:net";
import path from "node:path";

/**
 * Starts a proxy to 127.0.0.1:`target` on `port` (0: a free one). Resolves with { port, stats,
 * webSockets(), cut(how), stop(how), start(), retarget(port), close() }; stats counts the
 * connections accepted and dropped. `how` is "fin" (the socket is ended as by a closing peer) or
 * "reset" (the kernel sends RST, as after a crash or a middlebox timing out).
 */
export async function cutProxy(target, port = 0) {
  const pairs = new Set();
  const stats = { accepted: 0, dropped: 0 };
  let server = null;

  const drop = (pair, how) => {
    if (!pairs.delete(pair)) return;
    for (const socket of [pair.client, pair.upstream]) {
      if (how === "reset" && typeof socket.resetAndDestroy === "function" && !socket.destroyed) socket.resetAndDestroy();
      else socket.destroy();
    }
  };

  const accept = (client) => {
    stats.accepted += 1;
    const upstream = net.connect({ host: "127.0.0.1", port: target });
    const pair = { client, upstream, webSocket: false };
    pairs.add(pair);
    // A 101 answer: this connection now carries a WebSocket (the rest are plain requests).
    upstream.once("data", (chunk) => {
      pair.webSocket = chunk.subarray(0, 12).toString("latin1") === "HTTP/1.1 101";
    });
    client.pipe(upstream);
    upstream.pipe(client);
    // Either side ending or failing ends the pair, as a plain TCP relay would.
    for (const socket of [client, upstream]) {
      socket.on("error", () => drop(pair, "fin"));
      socket.on("close", () => drop(pair, "fin"));
    }
  };

  const listen = () =>
    new Promise((resolve, reject) => {
      server = net.createServer(accept);
      server.once("error", reject);
      server.listen(port, "127.0.0.1", () => {
        port = server.address().port;
        resolve();
      });
    });

  /**
   * Drops every connection carried now; returns how many, and how many of them carried a
   * WebSocket: { connections, webSockets }.
   */
  const cut = (how = "fin") => {
    const now = [...pairs];
    for (const pair of now) drop(pair, how);
    stats.dropped += now.length;
    return { connections: now.length, webSockets: now.filter((pair) => pair.webSocket).length };
  };

  /** Stops listening and drops every connection; resolves with what `cut` returns. */
  const stop = async (how = "fin") => {
    const closing = server;
    server = null;
    const closed = closing ? new Promise((resolve) => closing.close(resolve)) : Promise.resolve();
    const dropped = cut(how);
    await closed;
    return dropped;
  };

  await listen();
  return {
    get port() {
      return port;
    },
    stats,
    /** How many WebSockets it carries now. */
    webSockets: () => [...pairs].filter((pair) => pair.webSocket).length,
    cut,
    stop,
    /** Listens again on the same port. */
    start: () => (server ? Promise.resolve() : listen()),
    /** Sends the connections it accepts from now on to 127.0.0.1:`port` instead. */
    retarget(to) {
      target = to;
    },
    close: () => stop("fin"),
  };
}

/**
 * Makes the nginx of a deploy/local `topology` (local-topology.mjs) reach replica `i` through
 * 127.0.0.1:`port` instead of the replica's own port: rewrites the generated nginx.conf, tells
 * nginx to reload it (SIGHUP to its master) and resolves once `reached()` is true, polled after
 * each negotiate sent through the load balancer (within `ms`). `reached` is typically "the proxy
 * on `port` accepted a connection". Returns a function that puts the replica's own port back.
 */
export async function routeReplicaThrough(topology, i, port, reached, ms = 20_000) {
  const conf = path.join(topology.stateDir, "nginx", "nginx.conf");
  const original = readFileSync(conf, "utf8");
  const server = `server 127.0.0.1:${topology.replicas[i].port} `;
  if (!original.includes(server)) throw new Error(`${conf} has no upstream '${server.trim()}'`);
  const reload = (text) => {
    writeFileSync(conf, text);
    // nginx's own pid file names its master (deploy/lb/nginx.conf.template).
    process.kill(Number(readFileSync(path.join(topology.stateDir, "nginx", "nginx.pid"), "utf8").trim()), "SIGHUP");
  };
  reload(original.replace(server, `server 127.0.0.1:${port} `));
  // Round-robin sends one request in three to each upstream: a few negotiates reach the proxy
  // once the new workers are up.
  const deadline = Date.now() + ms;
  while (!reached()) {
    if (Date.now() > deadline) throw new Error(`nginx did not route replica ${i} through port ${port} within ${ms} ms`);
    const response = await fetch(`${topology.lb.hubUrl}/negotiate?negotiateVersion=1`, {
      method: "POST",
      signal: AbortSignal.timeout(5000),
    }).catch(() => null);
    await response?.arrayBuffer();
  }
  return () => reload(original);
}
