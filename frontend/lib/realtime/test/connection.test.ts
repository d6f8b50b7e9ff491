// The hub connection the client builds by default, checked at its first request: negotiate must
// ask for stateful reconnect unless the option turns it off. A local HTTP server records the
// request and refuses it, so no gateway is needed.

import assert from "node:assert/strict";
import { once } from "node:events";
import { createServer } from "node:http";
import type { AddressInfo } from "node:net";
import { test } from "node:test";

import { signalRConnection } from "../src/connection.js";
import type { ConnectionOptions } from "../src/connection.js";

/** The path and query of the first request a connection built with `options` makes on start(). */
async function firstRequest(options: Omit<ConnectionOptions, "url" | "accessTokenFactory">): Promise<string> {
  const requests: string[] = [];
  const server = createServer((request, response) => {
    requests.push(request.url ?? "");
    response.writeHead(503).end();
  });
  server.listen(0, "127.0.0.1");
  await once(server, "listening");
  try {
    const { port } = server.address() as AddressInfo;
    const connection = signalRConnection({ url: `http://127.0.0.1:${port}/hub/v1`, accessTokenFactory: () => "token", logLevel: "none", ...options });
    await assert.rejects(connection.start(), /503/);
    assert.equal(requests.length, 1, "one negotiate, refused");
    return requests[0] ?? "";
  } finally {
    server.close();
  }
}

test("by default negotiate asks for stateful reconnect", async () => {
  const url = new URL(await firstRequest({}), "http://x");
  assert.equal(url.pathname, "/hub/v1/negotiate");
  assert.equal(url.searchParams.get("useStatefulReconnect"), "true");
});

test("statefulReconnect: false negotiates without asking for it", async () => {
  const url = new URL(await firstRequest({ statefulReconnect: false }), "http://x");
  assert.equal(url.pathname, "/hub/v1/negotiate");
  assert.equal(url.searchParams.get("useStatefulReconnect"), null);
});
