// A TCP proxy on a loopback port in front of one target, for tests that lose a client's socket
// without either end closing it: cut() resets every connection it carries (RST both ways, no
// WebSocket close frame), and a mode decides what happens to connections made afterwards:
//
//   forward  connect to the target and pipe both ways (the default)
//   hold     accept and keep the client's bytes until release(), then forward them
//   refuse   reset at once, as if nothing listened
//
// Plain JavaScript importing only Node, so the realtime library's tests (compiled TypeScript,
// loading it by path) and the console's browser tests can share it.

import net from "node:net";

/**
 * Starts a proxy to `targetHost:targetPort` on a free port of 127.0.0.1.
 *
 * Resolves with { port, accepted, mode, accepting(n), hold(), refuse(), release(), cut(), close() }:
 * `accepted` counts the client connections taken so far (refused ones included) and
 * `accepting(n)` resolves once it reaches n.
 */
export async function startTcpProxy({ targetPort, targetHost = "127.0.0.1" }) {
  /** Every open socket, both sides. */
  const sockets = new Set();
  /** Connections waiting for release(): functions that forward them. */
  let held = [];
  let mode = "forward";
  let accepted = 0;
  let waiters = [];

  // An RST where the socket can still send one; a socket already half closed is only destroyed
  // (resetting one that has ended can leave it never closing, and the server never closing).
  const reset = (socket) => (socket.writableEnded || socket.readableEnded ? socket.destroy() : socket.resetAndDestroy());

  const track = (socket) => {
    sockets.add(socket);
    socket.once("close", () => sockets.delete(socket));
    // A reset is the point of this proxy; its errors are expected and end only that socket.
    socket.on("error", () => socket.destroy());
    return socket;
  };

  const forward = (client, early) => {
    if (client.destroyed) return;
    const upstream = track(net.connect({ host: targetHost, port: targetPort }));
    for (const chunk of early) upstream.write(chunk);
    client.pipe(upstream);
    upstream.pipe(client);
    // Whatever ends one side ends the other the same way: a reset stays a reset.
    client.once("close", () => (client.errored ? reset(upstream) : upstream.end()));
    upstream.once("close", () => (upstream.errored ? reset(client) : client.end()));
  };

  const server = net.createServer((client) => {
    track(client);
    client.setNoDelay(true);
    accepted += 1;
    for (const waiter of waiters.filter((w) => accepted >= w.n)) waiter.resolve();
    waiters = waiters.filter((w) => accepted < w.n);
    if (mode === "refuse") {
      reset(client);
      return;
    }
    if (mode === "hold") {
      const early = [];
      const keep = (chunk) => early.push(chunk);
      client.on("data", keep);
      held.push(() => {
        client.off("data", keep);
        forward(client, early);
      });
      return;
    }
    forward(client, []);
  });
  await new Promise((resolve, reject) => {
    server.once("error", reject);
    server.listen(0, "127.0.0.1", resolve);
  });

  return {
    port: server.address().port,
    get accepted() {
      return accepted;
    },
    get mode() {
      return mode;
    },
    /** Resolves once `n` client connections have been accepted in all. */
    accepting(n) {
      if (accepted >= n) return Promise.resolve();
      return new Promise((resolve) => waiters.push({ n, resolve }));
    },
    /** New connections wait (their bytes kept) until release(). */
    hold() {
      mode = "hold";
    },
    /** New connections are reset at once until release(). */
    refuse() {
      mode = "refuse";
    },
    /** Back to forwarding; held connections are forwarded now, in the order they came. */
    release() {
      mode = "forward";
      const waiting = held;
      held = [];
      for (const go of waiting) go();
    },
    /** Resets every open connection, both sides; returns how many client connections it cut. */
    cut() {
      let clients = 0;
      for (const socket of [...sockets]) {
        if (socket.server === server) clients += 1;
        reset(socket);
      }
      held = [];
      return clients;
    },
    /** Stops listening and resets whatever is still open. */
    async close() {
      const closed = new Promise((resolve) => server.close(resolve));
      for (const socket of [...sockets]) reset(socket);
      held = [];
      await closed;
    },
  };
}
