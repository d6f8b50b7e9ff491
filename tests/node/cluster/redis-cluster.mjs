// A local Redis Cluster for the tests: Debian's redis-server on free loopback ports (never
// 6379), three masters with a replica each, and what the tests do to it: move a slot from one
// master to another while traffic flows, SIGKILL a master and wait for its replica's promotion,
// add a node. Every server is stopped when the test file ends, however it ends (stopOnExit).
// Waits poll the cluster's own state with a deadline; nothing sleeps for a fixed time to let
// something happen.

import { execFile, spawn } from "node:child_process";
import { mkdirSync, mkdtempSync, openSync } from "node:fs";
import os from "node:os";
import path from "node:path";
import { promisify } from "node:util";

import { stopOnExit } from "../harness.mjs";
import { freePort } from "../local-topology.mjs";
import { redisCommand } from "../chaos/redis.mjs";

const run = promisify(execFile);

/** Polls `check` (async, truthy when done) every 100 ms until it is, or fails after `ms`. */
export async function until(what, check, ms = 30_000) {
  const deadline = Date.now() + ms;
  let last;
  for (;;) {
    try {
      const value = await check();
      if (value) return value;
    } catch (error) {
      last = error;
    }
    if (Date.now() > deadline) throw new Error(`${what}: not within ${ms} ms${last ? ` (last error: ${last.message})` : ""}`);
    await new Promise((resolve) => setTimeout(resolve, 100));
  }
}

/** One redis-server of the cluster. */
class Node {
  constructor(port, busPort, dir) {
    this.port = port;
    // The cluster bus defaults to port + 10000, past 65535 for an ephemeral port: choose it.
    this.busPort = busPort;
    this.dir = dir;
    this.child = null;
  }

  start() {
    const log = openSync(path.join(this.dir, `redis-${this.port}.log`), "a");
    this.child = spawn(
      "redis-server",
      [
        "--port", String(this.port), "--bind", "127.0.0.1", "--dir", this.dir,
        "--cluster-enabled", "yes", "--cluster-config-file", `nodes-${this.port}.conf`,
        "--cluster-port", String(this.busPort),
        "--cluster-node-timeout", "2000", "--save", "", "--appendonly", "no",
      ],
      { stdio: ["ignore", log, log] },
    );
    const child = this.child;
    this.forget = stopOnExit(() => child.kill("SIGKILL"));
    this.exited = new Promise((resolve) => child.once("exit", resolve));
  }

  /** Stops it at once (SIGKILL) and waits for the process to be gone. */
  async kill() {
    if (!this.child) return;
    this.child.kill("SIGKILL");
    await this.exited;
    this.forget();
    this.child = null;
  }

  get address() {
    return `127.0.0.1:${this.port}`;
  }

  command(...args) {
    return redisCommand(this.port, args);
  }
}

/** Masters and their slots, as a live node sees them: [{ port, ranges: [[start, end], ...] }]. */
function mastersOf(slotsReply) {
  const masters = new Map();
  for (const [start, end, [, port]] of slotsReply) {
    if (!masters.has(port)) masters.set(port, []);
    masters.get(port).push([start, end]);
  }
  return [...masters].map(([port, ranges]) => ({ port, ranges }));
}

/** `count` distinct free ports, none of them 6379 or in `taken`. */
async function freePorts(count, taken) {
  const ports = [];
  while (ports.length < count) {
    const port = await freePort();
    if (port !== 6379 && !taken.includes(port) && !ports.includes(port)) ports.push(port);
  }
  return ports;
}

/** A running cluster; see startCluster. */
export class RedisCluster {
  constructor(dir, nodes) {
    this.dir = dir;
    this.nodes = nodes;
  }

  /** The URL the gateway and publishers take: every node as a seed. */
  get url() {
    return `redis+cluster://${this.live().map((n) => n.address).join(",")}`;
  }

  live() {
    return this.nodes.filter((n) => n.child);
  }

  node(port) {
    const node = this.nodes.find((n) => n.port === port);
    if (!node) throw new Error(`no node on port ${port}`);
    return node;
  }

  /** The masters and their slot ranges, from a live node. */
  async masters() {
    return mastersOf(await this.live()[0].command("CLUSTER", "SLOTS"));
  }

  /** The slot of `key` (hash tags apply). */
  async slotOf(key) {
    return this.live()[0].command("CLUSTER", "KEYSLOT", key);
  }

  /** The port of the master serving `slot`. */
  async ownerOf(slot) {
    const masters = await this.masters();
    const owner = masters.find((m) => m.ranges.some(([start, end]) => slot >= start && slot <= end));
    if (!owner) throw new Error(`no master serves slot ${slot}`);
    return owner.port;
  }

  /** Waits until every live node reports `cluster_state:ok` and all of them agree on who serves each slot. */
  async settled(ms = 30_000) {
    await until("the cluster settles", async () => {
      const views = [];
      for (const node of this.live()) {
        const info = await node.command("CLUSTER", "INFO");
        if (!/cluster_state:ok/.test(info)) return false;
        views.push(JSON.stringify(mastersOf(await node.command("CLUSTER", "SLOTS")).sort((a, b) => a.port - b.port)));
      }
      return views.every((v) => v === views[0]);
    }, ms);
  }

  /**
   * Moves `slot` (and its keys) to the master on `toPort` the way `redis-cli --cluster reshard`
   * does, while clients keep using it: IMPORTING/MIGRATING, MIGRATE the keys in batches, then
   * SETSLOT NODE on every master. Resolves once every node agrees.
   */
  async migrateSlot(slot, toPort) {
    const fromPort = await this.ownerOf(slot);
    if (fromPort === toPort) return;
    const from = this.node(fromPort);
    const to = this.node(toPort);
    const fromId = await from.command("CLUSTER", "MYID");
    const toId = await to.command("CLUSTER", "MYID");
    await to.command("CLUSTER", "SETSLOT", slot, "IMPORTING", fromId);
    await from.command("CLUSTER", "SETSLOT", slot, "MIGRATING", toId);
    for (;;) {
      const keys = await from.command("CLUSTER", "GETKEYSINSLOT", slot, 100);
      if (keys.length === 0) break;
      await from.command("MIGRATE", "127.0.0.1", toPort, "", 0, 5000, "KEYS", ...keys).catch((error) => {
        throw new Error(`MIGRATE of ${keys.length} keys of slot ${slot} from ${fromPort} to ${toPort}: ${error.message.slice(-200)}`);
      });
    }
    await to.command("CLUSTER", "SETSLOT", slot, "NODE", toId);
    await from.command("CLUSTER", "SETSLOT", slot, "NODE", toId);
    for (const master of await this.masters()) {
      if (master.port !== toPort && master.port !== fromPort) {
        await this.node(master.port).command("CLUSTER", "SETSLOT", slot, "NODE", toId);
      }
    }
    await this.settled();
  }

  /**
   * SIGKILLs the master on `port` and waits until one of its replicas serves its slots and the
   * cluster is ok again; resolves with the milliseconds from the kill to that.
   */
  async killMaster(port) {
    const slots = (await this.masters()).find((m) => m.port === port)?.ranges ?? [];
    if (slots.length === 0) throw new Error(`${port} is not a master`);
    const killed = Date.now();
    await this.node(port).kill();
    await until(`a replica of ${port} takes over`, async () => {
      const owner = await this.ownerOf(slots[0][0]);
      return owner !== port;
    });
    await this.settled();
    return Date.now() - killed;
  }

  /** Starts a new empty master and joins it to the cluster; resolves with its port. */
  async addNode() {
    const [port, busPort] = await freePorts(2, this.nodes.flatMap((n) => [n.port, n.busPort]));
    const node = new Node(port, busPort, this.dir);
    node.start();
    this.nodes.push(node);
    await until(`redis-server ${node.port} answers`, () => node.command("PING"));
    await run("redis-cli", ["--cluster", "add-node", node.address, this.live()[0].address]);
    await until(`every node knows ${node.port}`, async () => {
      for (const other of this.live()) {
        const known = await other.command("CLUSTER", "NODES");
        if (!known.split("\n").some((line) => line.includes(`127.0.0.1:${node.port}@`) && line.includes("connected"))) return false;
      }
      return true;
    });
    // The new node serves nothing yet, but it must see the cluster as ok before a slot can move to it.
    await this.settled();
    return node.port;
  }

  /** Stops every node. */
  async stop() {
    await Promise.all(this.nodes.map((n) => n.kill()));
  }
}

/** Starts `masters` masters with `replicas` replicas each and waits until the cluster is ok. */
export async function startCluster({ masters = 3, replicas = 1 } = {}) {
  const base = process.env.TMPDIR ?? os.tmpdir();
  mkdirSync(base, { recursive: true });
  const dir = mkdtempSync(path.join(base, "redis-cluster-"));
  const nodes = [];
  for (let i = 0; i < masters * (1 + replicas); i += 1) {
    const [port, busPort] = await freePorts(2, nodes.flatMap((n) => [n.port, n.busPort]));
    nodes.push(new Node(port, busPort, dir));
  }
  const cluster = new RedisCluster(dir, nodes);
  try {
    for (const node of nodes) node.start();
    for (const node of nodes) await until(`redis-server ${node.port} answers`, () => node.command("PING"));
    await run("redis-cli", ["--cluster", "create", ...nodes.map((n) => n.address), "--cluster-replicas", String(replicas), "--cluster-yes"]);
    await cluster.settled();
    // Replicas are attached once each master lists its replica as online.
    await until("every replica is attached", async () => {
      for (const master of await cluster.masters()) {
        const info = await cluster.node(master.port).command("INFO", "replication");
        const attached = (info.match(/^slave\d+:.*state=online/gm) ?? []).length;
        if (attached < replicas) return false;
      }
      return true;
    });
  } catch (error) {
    await cluster.stop();
    throw error;
  }
  return cluster;
}
