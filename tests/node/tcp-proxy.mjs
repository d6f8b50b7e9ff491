// A TCP proxy on a free loopback port in front of one upstream (a gateway), for tests that take
// the network away under a client while the gateway stays up:
//
//   cut()         destroys every connection the proxy carries, on both sides: the client and the
//                 gateway each see their TCP connection end without a WebSocket close frame (a
//                 FIN, not a RST: with Node 20, resetAndDestroy() on these sockets now and then
//                 left the test process spinning at exit, in its handle cleanup);
//   stop()        stops listening and cuts: new connections are refused until start(), which
//                 listens again on the same port;
//   partition()   cuts, and from then on accepts connections but holds them (their bytes wait,
//                 the upstream is not dialled) until heal(), as a load balancer whose connect to
//                 a replica hangs while the network between them is down.
//
// It looks at the bytes only to remember the first line each client sent (`requests`, e.g.
// "GET /hub/v1?id=... HTTP/1.1"), so a test can tell a negotiate from a WebSocket upgrade and
// read the connection token a client used. It imports nothing outside Node.

import net from "node:net";

/**
 * Starts a proxy on 127.0.0.1 (a free port) forwarding to `upstreamPort` on 127.0.0.1. Resolves
 * with { port, baseUrl, hubUrl, requests, nextRequests, cut, stop, start, partition, heal, close }.
 */
export async function startTcpProxy(upstreamPort) {
  const pairs = new Set();
  const requests = [];
  const waiters = [];
  let gate = null; // while partitioned: { promise, open } that new connections wait on
  let closed = false;

  const recordRequest = (line) => {
    requests.push(line);
    for (const waiter of [...waiters]) {
      if (requests.length >= waiter.count) {
        waiters.splice(waiters.indexOf(waiter), 1);
        waiter.resolve(requests.slice(waiter.from, waiter.count));
      }
    }
  };

  const server = net.createServer((client) => {
    const pair = { client, upstream: null };
    pairs.add(pair);
    client.on("error", () => {});
    // An orderly close passes every byte on first (a WebSocket close frame followed at once by
    // the end of the stream must reach the gateway); only an error cuts the other side.
    client.once("close", (hadError) => {
      pairs.delete(pair);
      if (hadError) pair.upstream?.destroy();
      else pair.upstream?.end();
    });
    // Bytes that arrive before the upstream is dialled (while partitioned) wait here.
    const early = [];
    let ended = false;
    let head = "";
    client.on("data", (chunk) => {
      if (head !== null) {
        head += chunk.toString("latin1");
        const end = head.indexOf("\r\n");
        if (end >= 0 || head.length > 8192) {
          recordRequest(end >= 0 ? head.slice(0, end) : head);
          head = null;
        }
      }
      if (!pair.upstream) early.push(chunk);
      else if (!pair.upstream.write(chunk)) client.pause();
    });
    client.once("end", () => {
      ended = true;
      pair.upstream?.end();
    });
    const connect = () => {
      if (client.destroyed) return;
      const upstream = net.connect(upstreamPort, "127.0.0.1");
      pair.upstream = upstream;
      upstream.on("error", () => {});
      upstream.on("drain", () => client.resume());
      // An error on the gateway's side ends the client's connection at once; an orderly end has
      // been piped already.
      upstream.once("close", (hadError) => (hadError ? client.destroy() : client.end()));
      upstream.pipe(client);
      for (const chunk of early.splice(0)) upstream.write(chunk);
      if (ended) upstream.end();
    };
    if (gate) gate.promise.then(connect);
    else connect();
  });

  const listen = (port) =>
    new Promise((resolve, reject) => {
      server.once("error", reject);
      server.listen(port, "127.0.0.1", () => {
        server.off("error", reject);
        resolve(server.address().port);
      });
    });

  const port = await listen(0);
  const baseUrl = `http://127.0.0.1:${port}`;

  const cut = () => {
    for (const { client, upstream } of [...pairs]) {
      if (!client.destroyed) client.destroy();
      if (upstream && !upstream.destroyed) upstream.destroy();
    }
  };

  return {
    port,
    baseUrl,
    hubUrl: `${baseUrl}/hub/v1`,
    /** The first line of every connection's request, in order of arrival. */
    requests,
    /**
     * The request lines of the next `count` connections after those already seen, once they
     * have arrived; rejects after `ms`.
     */
    nextRequests(count, ms = 15_000) {
      const from = requests.length;
      let resolve;
      const arrived = new Promise((res) => {
        resolve = res;
      });
      waiters.push({ from, count: from + count, resolve });
      let timer;
      const deadline = new Promise((_, reject) => {
        timer = setTimeout(
          () => reject(new Error(`timed out after ${ms} ms waiting for ${count} connection(s) through the proxy (got ${requests.length - from})`)),
          ms,
        );
      });
      return Promise.race([arrived, deadline]).finally(() => clearTimeout(timer));
    },
    /** Destroys every current connection (both sides). */
    cut,
    /** Stops listening (connections are refused) and cuts every current connection. */
    async stop() {
      const stopped = new Promise((resolve) => server.close(resolve));
      cut();
      await stopped;
    },
    /** Listens again on the same port. */
    async start() {
      await listen(port);
    },
    /** Cuts every current connection and holds new ones until heal(). */
    partition() {
      if (!gate) {
        let open;
        const promise = new Promise((resolve) => {
          open = resolve;
        });
        gate = { promise, open };
      }
      cut();
    },
    /** Lets the held connections (and every later one) through to the upstream. */
    heal() {
      const held = gate;
      gate = null;
      held?.open();
    },
    /** Stops for good: closes the listener and every connection. Idempotent. */
    async close() {
      if (closed) return;
      closed = true;
      this.heal();
      const stopped = server.listening ? new Promise((resolve) => server.close(resolve)) : Promise.resolve();
      cut();
      await stopped;
    },
  };
}
