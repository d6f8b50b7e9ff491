// docker-compose.yml for real, scaled up and down under a publish stream (issue 15). Run by
// tests/container/run, which starts a private Docker engine, makes the base images and builds
// realtime-gateway:local from deploy/Dockerfile; run alone, this file skips.
//
// This sandbox gives containers only the host network, so the stack runs from
// docker-compose.yml with an override applied (written below into the run's folder, merged the
// way compose merges an override file, minus `ports`, which Compose v1 refuses on the host
// network and an override cannot remove) that puts every service on the host network, on
// loopback ports:
// - redis, HAProxy and Prometheus: the production service definitions, with their stand-in
//   images (tests/container/images), a loopback address each, and descriptor limits capped at
//   this machine's hard limit;
// - gateway: the production definition (image, environment, grace period, health check endpoint)
//   with one change forced by the shared network namespace: each replica claims a pair of ports
//   (tests/container/gateway-slot) instead of all listening on 8080 and 9090;
// - HAProxy's config and Prometheus's scrape config are the production files with one edit each
//   (and HAProxy's maxconn capped to the descriptor limit): the slots' addresses instead of the
//   engine's DNS (there is no service DNS on the host network). The
//   production discovery (server-template + resolvers, dns_sd_configs) is checked offline by
//   deploy.test.mjs (haproxy -c, promtool).
//
// The scenario: `up --scale gateway=2`; official clients that resume connect through HAProxy and
// join; a stream of events is published into Redis; `--scale gateway=4` (new replicas healthy,
// in HAProxy's rotation, scraped by Prometheus, and taking new clients); `--scale gateway=1`
// (three replicas drain, their clients come back through HAProxy to the last one and resume).
// Every client must end with every event of its groups, once and in order. Writes
// chaos-results/15-compose-scale.json.

import assert from "node:assert/strict";
import { execFile } from "node:child_process";
import { randomUUID } from "node:crypto";
import { chmodSync, mkdirSync, readFileSync, writeFileSync } from "node:fs";
import net from "node:net";
import path from "node:path";
import { after, before, test } from "node:test";
import { fileURLToPath } from "node:url";

import { parse, stringify } from "yaml";

import { JWT_SECRET, dispatcherToken, uniqueRegion, within } from "../harness.mjs";
import { resumingClient, startAll } from "../chaos/client.mjs";
import { publishStream } from "../chaos/topology.mjs";
import { assertEveryEventOnce, report, settled, track } from "../chaos/tracker.mjs";

const here = path.dirname(fileURLToPath(import.meta.url));
const repo = path.resolve(here, "../../..");
const env = process.env;
const skip = !env.CONTAINER_WORK && "run by tests/container/run, which starts the Docker engine and builds the images";

const SLOTS = 6;
const GROUPS = 4;
const FIRST_CLIENTS = 40;
const LATE_CLIENTS = 20;
// Long enough that the scale-down starts well before the stream ends, even on a loaded machine
// (there the scale-up took 51 s to be healthy); the test waits for the stream's end anyway.
const RATE = 30;
const SECS = 150;
const IMAGE = "realtime-gateway:local";
const SERVICE_KEY = `container-test-service-key-${randomUUID()}`;

const pause = (ms) => new Promise((resolve) => setTimeout(resolve, ms));
const elapsed = (since) => Math.round((Date.now() - since) / 100) / 10;

/** Runs a program; resolves with stdout, rejects with its output when it fails. */
function run(file, args, { timeout = 120_000, extraEnv = {} } = {}) {
  return new Promise((resolve, reject) => {
    execFile(file, args, { cwd: repo, timeout, maxBuffer: 64 << 20, env: { ...env, ...extraEnv } }, (error, stdout, stderr) => {
      if (error) reject(new Error(`${file} ${args.join(" ")} failed: ${error.message}\n${stdout}\n${stderr}`));
      else resolve(stdout);
    });
  });
}

const docker = (...args) => run(env.DOCKER_BIN, args);
/** The last lines a container wrote, stdout and stderr together. */
const logsOf = (id) =>
  new Promise((resolve) => execFile(env.DOCKER_BIN, ["logs", "--tail", "30", id], { timeout: 30_000 }, (_, stdout, stderr) => resolve(`${stdout}${stderr}`)));
const composeCommand = (env.COMPOSE_COMMAND ?? "").split("\n").filter(Boolean);
let files = [];
/** docker compose (or docker-compose) with the production file and the override. */
const compose = (...args) =>
  run(composeCommand[0], [...composeCommand.slice(1), "-p", env.CONTAINER_PROJECT, "--project-directory", repo, ...files.flatMap((f) => ["-f", f]), ...args], {
    timeout: 180_000,
    extraEnv: { SERVICE_KEY, JWT_SECRET, CONNECTION_TOKEN_SECRET: `container-test-${randomUUID()}` },
  });

/** Is 127.0.0.1:port free to bind right now? */
function portFree(port) {
  return new Promise((resolve) => {
    const server = net.createServer();
    server.once("error", () => resolve(false));
    server.listen(port, "127.0.0.1", () => server.close(() => resolve(true)));
  });
}

/**
 * `count` consecutive free loopback ports (a random block, retried), below the kernel's
 * ephemeral range: a slot no replica holds yet must not be taken meanwhile by the source port
 * of some outgoing connection (the clients', HAProxy's, Prometheus's, other tests').
 */
async function freeBlock(count) {
  const [ephemeralLow] = readFileSync("/proc/sys/net/ipv4/ip_local_port_range", "utf8").trim().split(/\s+/).map(Number);
  const low = 10_000;
  const high = Math.max(low + 1000, (ephemeralLow || 32_768) - count);
  for (let attempt = 0; attempt < 50; attempt += 1) {
    const base = low + Math.floor(Math.random() * (high - low));
    const ports = Array.from({ length: count }, (_, i) => base + i);
    let free = true;
    for (const port of ports) if (!(free = await portFree(port))) break;
    if (free) return ports;
  }
  throw new Error(`no block of ${count} free loopback ports`);
}

/**
 * `production` with `override` applied the way compose merges an override file: maps of settings
 * (environment, healthcheck, ulimits) key by key, volumes by their target, anything else
 * replaced; then every service's `ports` removed (see the caller).
 */
function applyOverride(production, override) {
  const merged = structuredClone(production);
  const target = (volume) => volume.split(":")[1];
  for (const [name, patch] of Object.entries(override.services)) {
    const service = merged.services[name];
    assert.ok(service, `the production file has no service ${name}`);
    for (const [key, value] of Object.entries(patch)) {
      if (["environment", "healthcheck", "ulimits"].includes(key)) service[key] = { ...service[key], ...value };
      else if (key === "volumes") {
        const replaced = new Set(value.map(target));
        service.volumes = [...(service.volumes ?? []).filter((volume) => !replaced.has(target(volume))), ...value];
      } else service[key] = value;
    }
  }
  for (const service of Object.values(merged.services)) delete service.ports;
  return merged;
}

/** Replaces `pattern` in `text`, failing if the production file no longer has it. */
function edit(text, pattern, replacement, what) {
  assert.match(text, pattern, `the production file changed: cannot ${what}`);
  return text.replace(pattern, replacement);
}

async function getText(url) {
  const response = await fetch(url, { signal: AbortSignal.timeout(3000) });
  return { status: response.status, text: await response.text() };
}

/** Polls `probe` (async, truthy when done) every 250 ms until it is, or fails after `ms`. */
async function until(ms, what, probe) {
  const deadline = Date.now() + ms;
  let last;
  for (;;) {
    try {
      last = await probe();
      if (last) return last;
    } catch (error) {
      last = error;
    }
    if (Date.now() > deadline) throw new Error(`timed out after ${ms} ms waiting for ${what} (last: ${last?.message ?? JSON.stringify(last)})`);
    await pause(250);
  }
}

let ports;
let stack;

before(async () => {
  if (skip) return;
  const block = await freeBlock(4 + 2 * SLOTS);
  ports = {
    redis: block[0],
    lb: block[1],
    stats: block[2],
    prometheus: block[3],
    public: block.slice(4, 4 + SLOTS),
    admin: block.slice(4 + SLOTS),
  };
  const work = env.CONTAINER_WORK;
  const slots = path.join(work, "slots");
  mkdirSync(slots, { recursive: true });
  chmodSync(slots, 0o777); // the gateway's user (10001) takes its locks there

  // A container may not raise its descriptor limit above the engine's own hard limit (20,000 in
  // this sandbox): the production limits, capped at what this machine allows.
  const hardLimit = Number(readFileSync("/proc/self/limits", "utf8").match(/^Max open files\s+\d+\s+(\d+)/m)?.[1] ?? 1024);
  // HAProxy: the production config, with the slots instead of the engine's DNS.
  let haproxy = readFileSync(path.join(repo, "deploy/lb/haproxy.cfg"), "utf8");
  haproxy = edit(haproxy, /^resolvers docker\n(?:[ \t]+.*\n|[ \t]*\n(?=[ \t]))*/m, "", "drop the resolvers section");
  // Each proxied connection holds two descriptors: the connection limits, capped to fit this
  // machine's descriptor limit (the production file gives HAProxy 131,072).
  const maxconn = Math.floor((hardLimit - 1000) / 2);
  haproxy = edit(haproxy, /^(global\n(?:.*\n)*?\s*)maxconn \d+$/m, `$1maxconn ${maxconn}`, "cap the global maxconn");
  haproxy = edit(haproxy, /^(frontend hub\n(?:.*\n)*?\s*)maxconn \d+$/m, `$1maxconn ${maxconn - 1000}`, "cap the hub's maxconn");
  haproxy = edit(haproxy, /^(\s*)bind :8080$/m, `$1bind 127.0.0.1:${ports.lb}`, "bind the hub frontend to loopback");
  haproxy = edit(haproxy, /^(\s*)bind :8404$/m, `$1bind 127.0.0.1:${ports.stats}`, "bind the stats frontend to loopback");
  haproxy = edit(
    haproxy,
    /^(\s*)server-template gateway- \d+ gateway:8080 .*$/m,
    (_, indent) => ports.public.map((port, i) => `${indent}server slot-${i + 1} 127.0.0.1:${port} check port ${ports.admin[i]}`).join("\n"),
    "replace the server-template with the slots",
  );
  writeFileSync(path.join(work, "haproxy.cfg"), haproxy);

  // Prometheus: the production scrape config, with the slots instead of the engine's DNS.
  const scrape = parse(readFileSync(path.join(repo, "deploy/prometheus/prometheus.yml"), "utf8"));
  const job = scrape.scrape_configs.find((config) => config.job_name === "gateway");
  assert.deepEqual(job.dns_sd_configs?.[0]?.names, ["gateway"], "the production scrape config finds the replicas by DNS");
  delete job.dns_sd_configs;
  job.static_configs = [{ targets: ports.admin.map((port) => `127.0.0.1:${port}`) }];
  job.scrape_interval = "1s";
  job.scrape_timeout = "1s";
  scrape.scrape_configs.find((config) => config.job_name === "prometheus").static_configs = [{ targets: [`127.0.0.1:${ports.prometheus}`] }];
  writeFileSync(path.join(work, "prometheus.yml"), stringify(scrape));

  const production = parse(readFileSync(path.join(repo, "docker-compose.yml"), "utf8"));
  const nofile = (service) => {
    const limit = Math.min(production.services[service].ulimits.nofile.hard, hardLimit);
    return { nofile: { soft: limit, hard: limit } };
  };
  const override = {
    services: {
      redis: {
        image: env.STANDIN_REDIS,
        network_mode: "host",
        command: [...production.services.redis.command, "--bind", "127.0.0.1", "--port", String(ports.redis)],
        healthcheck: { test: ["CMD", "redis-cli", "-p", String(ports.redis), "ping"], interval: "1s" },
      },
      gateway: {
        network_mode: "host",
        entrypoint: ["/usr/local/bin/gateway-slot"],
        ulimits: nofile("gateway"),
        volumes: [`${path.join(repo, "tests/container/gateway-slot")}:/usr/local/bin/gateway-slot:ro`, `${slots}:/run/gateway-slots`],
        environment: {
          GATEWAY_REDIS_URL: `redis://127.0.0.1:${ports.redis}`,
          SLOT_PUBLIC_PORTS: ports.public.join(" "),
          SLOT_ADMIN_PORTS: ports.admin.join(" "),
        },
        healthcheck: {
          test: ["CMD-SHELL", "curl -fsS -o /dev/null --max-time 2 http://127.0.0.1:$$(cat /tmp/gateway-admin-port)/healthz"],
        },
      },
      lb: {
        image: env.STANDIN_HAPROXY,
        network_mode: "host",
        ulimits: nofile("lb"),
        volumes: [`${path.join(work, "haproxy.cfg")}:/usr/local/etc/haproxy/haproxy.cfg:ro`],
      },
      prometheus: {
        image: env.STANDIN_PROMETHEUS,
        network_mode: "host",
        command: [...production.services.prometheus.command, `--web.listen-address=127.0.0.1:${ports.prometheus}`],
        volumes: [`${path.join(work, "prometheus.yml")}:/etc/prometheus/prometheus.yml:ro`],
      },
    },
  };
  // Applied as compose applies an override file, except that `ports` go: on the host network
  // they mean nothing, and Compose v1 refuses them there but has no way (`!reset`) for an
  // override to remove them. Nothing else of the production file is dropped.
  const hostNetwork = applyOverride(production, override);
  const file = path.join(work, "compose.host-network.yml");
  // Every string quoted: Compose v1 reads YAML 1.1, where a bare `yes` is a boolean.
  writeFileSync(file, stringify(hostNetwork, { defaultStringType: "QUOTE_DOUBLE", defaultKeyType: "PLAIN" }));
  files = [file];
  stack = { work };
});

after(async () => {
  if (skip || !stack) return;
  if (process.env.KEEP_STACK) return;
  await compose("down", "--volumes", "--timeout", "30").catch((error) => console.error(String(error)));
});

/** The project's containers of `service` (ids), running or not. */
async function containersOf(service) {
  const out = await docker("ps", "-aq", "--filter", `label=com.docker.compose.project=${env.CONTAINER_PROJECT}`, "--filter", `label=com.docker.compose.service=${service}`);
  return out.split("\n").filter(Boolean);
}

/** { id, name, status, health, pid, restarts } of each container. */
async function inspect(ids) {
  if (ids.length === 0) return [];
  return JSON.parse(await docker("inspect", ...ids)).map((c) => ({
    id: c.Id,
    name: c.Name.replace(/^\//, ""),
    status: c.State.Status,
    health: c.State.Health?.Status,
    pid: c.State.Pid,
    restarts: c.RestartCount,
  }));
}

/** Resolves once `service` has exactly `count` containers, all running and healthy. */
/** Resolves once `service`'s one container is running; shows its log if it is not. */
async function running(service, ms = 30_000) {
  return until(ms, `${service} to run`, async () => {
    const [state] = await inspect(await containersOf(service));
    if (state && (state.restarts > 0 || ["restarting", "exited", "dead"].includes(state.status))) {
      throw new Error(`${state.name} is ${state.status}:\n${await logsOf(state.id)}`);
    }
    return state?.status === "running" ? state : false;
  });
}

async function healthy(service, count, ms = 120_000) {
  return until(ms, `${count} healthy ${service} container(s)`, async () => {
    const states = await inspect(await containersOf(service));
    const unhealthy = states.find((s) => s.health === "unhealthy");
    if (unhealthy) throw new Error(`${unhealthy.name} is unhealthy:\n${await logsOf(unhealthy.id)}`);
    return states.length === count && states.every((s) => s.status === "running" && s.health === "healthy") ? states : false;
  });
}

/** HAProxy's view of the slots: { "slot-1": "UP", ... } from its stats CSV. */
async function lbServers() {
  const { text } = await getText(`http://127.0.0.1:${ports.stats}/;csv`);
  const [header, ...rows] = text.replace(/^# /, "").split("\n").filter(Boolean);
  const columns = header.split(",");
  return Object.fromEntries(
    rows
      .map((row) => Object.fromEntries(row.split(",").map((cell, i) => [columns[i], cell])))
      .filter((row) => row.pxname === "gateway_replicas" && row.svname.startsWith("slot-"))
      .map((row) => [row.svname, row.status]),
  );
}

const upCount = (servers) => Object.values(servers).filter((status) => status === "UP").length;

/** Active connections per slot (slots whose admin port answers). */
async function connectionsPerSlot() {
  const result = {};
  for (const [i, port] of ports.admin.entries()) {
    try {
      const { text } = await getText(`http://127.0.0.1:${port}/metrics`);
      const line = text.split("\n").find((l) => l.startsWith("gateway_connections_active "));
      result[`slot-${i + 1}`] = Number(line?.split(" ").at(-1) ?? 0);
    } catch {
      // no replica holds this slot
    }
  }
  return result;
}

/** Prometheus's gateway targets that are up. */
async function scrapedUp() {
  const { text } = await getText(`http://127.0.0.1:${ports.prometheus}/api/v1/targets?state=active`);
  return JSON.parse(text).data.activeTargets.filter((target) => target.labels.job === "gateway" && target.health === "up").length;
}

test("the image runs as a non-root user with a health check", { skip }, async () => {
  const [image] = JSON.parse(await docker("image", "inspect", IMAGE));
  assert.equal(image.Config.User, "10001:10001");
  assert.deepEqual(image.Config.Healthcheck.Test.slice(0, 2), ["CMD", "curl"]);
  const id = (await docker("run", "--rm", "--network", "host", "--entrypoint", "id", IMAGE)).trim();
  assert.match(id, /^uid=10001\(gateway\) gid=10001\(gateway\)/);
  const help = await docker("run", "--rm", "--network", "host", IMAGE, "--help");
  assert.match(help, /--drain-timeout/);
  console.log(`image ${IMAGE}: ${(image.Size / 1e6).toFixed(1)} MB, built in ${env.CONTAINER_BUILD_SECS} s (${env.CONTAINER_CRATES_COMPILED} crates compiled), runs as ${id}`);
  stack.image = { sizeBytes: image.Size, buildSecs: Number(env.CONTAINER_BUILD_SECS), cratesCompiled: Number(env.CONTAINER_CRATES_COMPILED) };
});

test("compose --scale gateway up and down under a publish stream loses nothing for resuming clients", { skip, timeout: 600_000 }, async (t) => {
  // Up with two replicas: every health check goes healthy.
  const upStarted = Date.now();
  await compose("up", "-d", "--no-build", "--scale", "gateway=2");
  const [redis] = await healthy("redis", 1);
  const first = await healthy("gateway", 2);
  const timeToHealthy = elapsed(upStarted);
  await running("lb");
  await running("prometheus");
  await until(30_000, "HAProxy to see two replicas up", async () => upCount(await lbServers()) === 2);
  const timeToServing = elapsed(upStarted);
  // The replicas run as the image's user, not root.
  for (const { pid, name } of first) {
    const uid = readFileSync(`/proc/${pid}/status`, "utf8").match(/^Uid:\s+(\d+)/m)[1];
    assert.equal(uid, "10001", `${name} runs as uid ${uid}`);
  }
  assert.ok(redis);
  console.log(`stack up: redis and 2 replicas healthy in ${timeToHealthy} s, in HAProxy's rotation in ${timeToServing} s`);

  const hubUrl = `http://127.0.0.1:${ports.lb}/hub/v1`;
  const regions = Array.from({ length: GROUPS }, () => uniqueRegion("compose"));
  const makeClient = (i, initial) => {
    const mine = [regions[i % GROUPS]];
    return resumingClient({ hubUrl, token: dispatcherToken(mine), regions: mine, name: `client-${i}`, initial });
  };
  const clients = Array.from({ length: FIRST_CLIENTS }, (_, i) => makeClient(i));
  t.after(() => Promise.all(clients.map((c) => c.stop())));
  await startAll(clients);
  // Where each group stood when the first clients joined: the late clients resume from there.
  const startPositions = Object.fromEntries(
    regions.map((region) => {
      const group = `/dispatch/${region}`;
      const joined = clients.find((c) => c.groups[0] === group).joins.find((j) => j.result).result;
      return [group, { epoch: joined.epoch, seq: joined.seq }];
    }),
  );
  const before = await connectionsPerSlot();
  assert.equal(Object.values(before).reduce((a, b) => a + b, 0), FIRST_CLIENTS, `connections per replica: ${JSON.stringify(before)}`);

  const stream = publishStream({ redisUrl: `redis://127.0.0.1:${ports.redis}`, regions, rate: RATE, secs: SECS });
  await within(20_000, stream.reached(RATE * 2), "the stream to start");

  // Scale up to four under the stream.
  const upAt = Date.now();
  await compose("up", "-d", "--no-build", "--no-recreate", "--scale", "gateway=4");
  const four = await healthy("gateway", 4);
  const scaleUpHealthy = elapsed(upAt);
  await until(30_000, "HAProxy to see four replicas up", async () => upCount(await lbServers()) === 4);
  const scaleUpServing = elapsed(upAt);
  assert.deepEqual(
    first.map((c) => c.id).filter((id) => !four.some((c) => c.id === id)),
    [],
    "scaling up left the running replicas alone",
  );
  await until(30_000, "Prometheus to scrape four replicas", async () => (await scrapedUp()) === 4);
  const scaleUpScraped = elapsed(upAt);

  // New clients go to the new replicas (least connections), and resume there from the start.
  const late = Array.from({ length: LATE_CLIENTS }, (_, i) => {
    const index = FIRST_CLIENTS + i;
    const group = `/dispatch/${regions[index % GROUPS]}`;
    const client = makeClient(index, { [group]: startPositions[group] });
    clients.push(client);
    return client;
  });
  await startAll(late);
  const spread = await connectionsPerSlot();
  assert.equal(Object.keys(spread).length, 4, `four replicas answer: ${JSON.stringify(spread)}`);
  for (const [slot, count] of Object.entries(spread)) assert.ok(count > 0, `${slot} holds no client after the scale-up: ${JSON.stringify(spread)}`);
  console.log(`scaled up 2 -> 4: healthy in ${scaleUpHealthy} s, in rotation in ${scaleUpServing} s, scraped in ${scaleUpScraped} s; clients per replica ${JSON.stringify(spread)}`);

  // Scale down to one under the stream: three replicas drain.
  const queuedBeforeScaleDown = stream.progress.queued;
  assert.ok(queuedBeforeScaleDown < RATE * SECS, "the scale-down starts while the stream is still publishing");
  const downAt = Date.now();
  await compose("up", "-d", "--no-build", "--no-recreate", "--scale", "gateway=1");
  const scaleDownSecs = elapsed(downAt);
  const queuedAtScaleDown = stream.progress.queued;
  const [last] = await healthy("gateway", 1);
  assert.ok(four.some((c) => c.id === last.id), "the replica left is one of the four");
  await until(30_000, "HAProxy to see one replica up", async () => upCount(await lbServers()) === 1);
  console.log(`scaled down 4 -> 1 in ${scaleDownSecs} s, while events ${queuedBeforeScaleDown} to ${queuedAtScaleDown} of ${RATE * SECS} were published`);

  const summary = await stream.done;
  const behind = await settled(clients, summary, 30_000);
  const finalConnections = await connectionsPerSlot();
  const result = track(summary.groups, clients);
  const reconnected = clients.filter((c) => c.reconnects > 0).length;
  report("15-compose-scale", "15 compose --scale 2->4->1", result, {
    settings: { rate: RATE, secs: SECS, clients: clients.length, groups: GROUPS, compose: composeCommand.join(" ") },
    image: stack.image,
    timings: { timeToHealthy, timeToServing, scaleUpHealthy, scaleUpServing, scaleUpScraped, scaleDownSecs },
    connections: { before, afterScaleUp: spread, afterScaleDown: finalConnections },
    clientsReconnected: reconnected,
    clientsBehindAtDeadline: behind,
  });
  console.log(`clients that reconnected: ${reconnected} of ${clients.length}; connections at the end ${JSON.stringify(finalConnections)}`);

  assertEveryEventOnce(summary, clients, result);
  assert.ok(reconnected > 0, "the scale-down moved clients");
  assert.equal(Object.values(finalConnections).reduce((a, b) => a + b, 0), clients.length, "every client is back, on the last replica");
});
