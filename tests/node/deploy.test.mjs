// The deploy files, proved without a container engine: docker-compose.yml, deploy/kubernetes,
// deploy/prometheus, deploy/grafana and deploy/Dockerfile are parsed and checked against the
// gateway's real configuration (`gateway --help`), its real metrics (gateway/src/metrics.rs and a
// live /metrics), and CI's build command. External validators run when they are installed:
// promtool (Debian's prometheus package), haproxy, kubectl (kustomize), docker compose.

import assert from "node:assert/strict";
import { execFile, spawn } from "node:child_process";
import { existsSync, readFileSync, readdirSync, statSync } from "node:fs";
import path from "node:path";
import { test } from "node:test";
import { fileURLToPath } from "node:url";
import { promisify } from "node:util";

import { parseAllDocuments } from "yaml";

import {
  GATEWAY_BIN,
  connect,
  dispatcherToken,
  gatewayFor,
  inbox,
  join,
  publishAccepted,
  recommendationReady,
  uniqueRegion,
} from "./harness.mjs";

const run = promisify(execFile);
const here = path.dirname(fileURLToPath(import.meta.url));
const repo = path.resolve(here, "../..");
const at = (...parts) => path.join(repo, ...parts);
const read = (...parts) => readFileSync(at(...parts), "utf8");

// ---------------------------------------------------------------------------------------------
// Helpers

/** Every document of a YAML file (merge keys `<<` resolved, as docker compose does). */
function yamlDocuments(relative) {
  const documents = parseAllDocuments(read(relative), { merge: true });
  const parsed = [];
  for (const document of documents) {
    assert.deepEqual(document.errors.map(String), [], `${relative} does not parse`);
    const value = document.toJS({ maxAliasCount: 100 });
    if (value !== null && value !== undefined) parsed.push(value);
  }
  return parsed;
}

function yamlDocument(relative) {
  const documents = yamlDocuments(relative);
  assert.equal(documents.length, 1, `${relative} should hold one document`);
  return documents[0];
}

/** Seconds in a humantime duration as the gateway reads it (`5s`, `500ms`, `1m`, `1h 30m`). */
function seconds(duration) {
  const units = { ms: 0.001, s: 1, sec: 1, m: 60, min: 60, h: 3600 };
  const text = String(duration).trim();
  assert.match(text, /^(\d+\s*(ms|s|sec|m|min|h)\s*)+$/, `not a duration the gateway reads: ${text}`);
  let total = 0;
  for (const [, amount, unit] of text.matchAll(/(\d+)\s*(ms|sec|min|s|m|h)/g)) total += Number(amount) * units[unit];
  return total;
}

/** Port of a `host:port` listen address. */
const portOf = (address) => Number(String(address).split(":").pop());

let helpText;
/** `gateway --help`, its flags, its GATEWAY_* variables and their defaults. */
async function gatewayHelp() {
  if (!helpText) {
    const env = Object.fromEntries(Object.entries(process.env).filter(([key]) => !key.startsWith("GATEWAY_")));
    const { stdout } = await run(GATEWAY_BIN, ["--help"], { env, timeout: 20_000 });
    helpText = stdout;
  }
  const flags = new Set([...helpText.matchAll(/^\s+(?:-\w, )?(--[a-z][a-z0-9-]*)/gm)].map((m) => m[1]));
  const variables = new Set([...helpText.matchAll(/\[env: (GATEWAY_[A-Z0-9_]+)/g)].map((m) => m[1]));
  const defaults = {};
  for (const block of helpText.split(/\n(?=\s+(?:-\w, )?--)/)) {
    const variable = block.match(/\[env: (GATEWAY_[A-Z0-9_]+)/)?.[1];
    const fallback = block.match(/\[default: ([^\]]+)\]/)?.[1];
    if (variable && fallback !== undefined) defaults[variable] = fallback;
  }
  return { text: helpText, flags, variables, defaults };
}

/** Metric names from gateway/src/metrics.rs: { names, histograms }. */
function exportedMetrics() {
  const source = read("gateway/src/metrics.rs");
  const constants = Object.fromEntries(
    [...source.matchAll(/const ([A-Z_]+): &str = "(gateway_[a-z0-9_]+)";/g)].map((m) => [m[1], m[2]]),
  );
  const names = new Set(Object.values(constants));
  assert.ok(names.size >= 20, `expected the gateway's metric names in metrics.rs, found ${[...names]}`);
  const histograms = new Set(
    [...source.matchAll(/describe_histogram!\(\s*([A-Z_]+)/g)].map((m) => constants[m[1]]).filter(Boolean),
  );
  assert.ok(histograms.has("gateway_publish_to_delivery_seconds"));
  return { names, histograms };
}

/** Is `name` (as written in a query) one of the gateway's series? */
function isExportedSeries(name, { names, histograms }) {
  if (names.has(name)) return true;
  const base = name.replace(/_(bucket|sum|count)$/, "");
  return base !== name && histograms.has(base);
}

/** The command exists on PATH (or at an absolute path). */
function have(command) {
  if (command.includes("/")) return existsSync(command);
  return (process.env.PATH ?? "").split(path.delimiter).some((dir) => dir && existsSync(path.join(dir, command)));
}

/** Runs `command args`; resolves with { code, stdout, stderr } whatever the exit code. */
function runTool(command, args, { input, cwd = repo, timeout = 60_000 } = {}) {
  return new Promise((resolve, reject) => {
    const child = spawn(command, args, { cwd, stdio: ["pipe", "pipe", "pipe"] });
    let stdout = "";
    let stderr = "";
    const timer = setTimeout(() => child.kill("SIGKILL"), timeout);
    child.stdout.on("data", (chunk) => (stdout += chunk));
    child.stderr.on("data", (chunk) => (stderr += chunk));
    child.on("error", reject);
    child.on("close", (code) => {
      clearTimeout(timer);
      resolve({ code, stdout, stderr });
    });
    child.stdin.end(input ?? "");
  });
}

/** GitHub's anchors for the headings of a Markdown file. */
function markdownAnchors(relative) {
  const anchors = new Set();
  let fenced = false;
  for (const line of read(relative).split("\n")) {
    if (line.startsWith("```")) fenced = !fenced;
    const heading = !fenced && line.match(/^#{1,6}\s+(.*)$/);
    if (!heading) continue;
    anchors.add(
      heading[1]
        .trim()
        .toLowerCase()
        .replace(/[^\p{L}\p{N}\s_-]/gu, "")
        .replace(/\s/g, "-"),
    );
  }
  return anchors;
}

/** Every file of the deploy set: deploy/** and docker-compose.yml. */
function deployFiles() {
  const files = ["docker-compose.yml", ".dockerignore"];
  const walk = (relative) => {
    for (const entry of readdirSync(at(relative))) {
      const child = path.join(relative, entry);
      if (statSync(at(child)).isDirectory()) walk(child);
      else files.push(child);
    }
  };
  walk("deploy");
  return files;
}

// The k8s shutdown arithmetic is shared by several checks.
const kubernetesDir = "deploy/kubernetes";
function kubernetesObjects() {
  const objects = [];
  for (const file of readdirSync(at(kubernetesDir)).filter((name) => /\.ya?ml$/.test(name)).sort()) {
    for (const document of yamlDocuments(path.join(kubernetesDir, file))) objects.push({ file, ...document });
  }
  return objects;
}
const byKind = (objects, kind) => objects.filter((object) => object.kind === kind);
const one = (objects, kind) => {
  const found = byKind(objects, kind);
  assert.equal(found.length, 1, `expected one ${kind} in ${kubernetesDir}, found ${found.length}`);
  return found[0];
};

// ---------------------------------------------------------------------------------------------
// Settings: every GATEWAY_* variable and every gateway flag named in a deploy file exists.

// Variables of the tooling around the gateway, not settings of the gateway.
const NOT_SETTINGS = new Set(["GATEWAY_BIN"]);

// Flags in the deploy files that belong to other programs, by program. Anything else that looks
// like `--flag` must be one of the gateway's.
const OTHER_PROGRAMS_FLAGS = {
  cargo: ["--release", "--locked", "--bins"],
  docker: ["--mount", "--from", "--interval", "--timeout", "--start-period", "--retries", "--build", "--build-arg", "--scale", "--no-build", "--no-recreate", "--index"],
  "apt-get / useradd": ["--no-install-recommends", "--system", "--gid", "--uid", "--no-create-home", "--home-dir", "--shell"],
  curl: ["--max-time"],
  "redis-server": ["--appendonly", "--appendfsync", "--aof-use-rdb-preamble", "--bind", "--port", "--save", "--dir", "--daemonize", "--protected-mode"],
  prometheus: ["--config.file", "--storage.tsdb.path", "--storage.tsdb.retention.time", "--web.listen-address"],
};

test("every GATEWAY_* variable and gateway flag named in a deploy file exists in `gateway --help`", async () => {
  const help = await gatewayHelp();
  assert.ok(help.flags.has("--drain-timeout") && help.variables.has("GATEWAY_DRAIN_TIMEOUT"), "could not read gateway --help");
  const foreign = new Set(Object.values(OTHER_PROGRAMS_FLAGS).flat());
  const unknownVariables = [];
  const unknownFlags = [];
  for (const file of deployFiles()) {
    const text = read(file);
    for (const [variable] of text.matchAll(/GATEWAY_[A-Z0-9_]+/g)) {
      if (!NOT_SETTINGS.has(variable) && !help.variables.has(variable)) unknownVariables.push(`${file}: ${variable}`);
    }
    for (const [, flag] of text.matchAll(/(?:^|[^A-Za-z0-9_-])(--[a-z][a-z0-9.-]*[a-z0-9])/g)) {
      if (!foreign.has(flag) && !help.flags.has(flag)) unknownFlags.push(`${file}: ${flag}`);
    }
  }
  assert.deepEqual(unknownVariables, [], "GATEWAY_* variables that gateway --help does not list");
  assert.deepEqual(unknownFlags, [], "flags that are neither the gateway's (gateway --help) nor listed in OTHER_PROGRAMS_FLAGS");
});

test("docs/operations.md names only settings that exist", async () => {
  const help = await gatewayHelp();
  const text = read("docs/operations.md");
  const unknown = [...new Set([...text.matchAll(/GATEWAY_[A-Z0-9_]+/g)].map((m) => m[0]))].filter(
    (variable) => !NOT_SETTINGS.has(variable) && !help.variables.has(variable),
  );
  assert.deepEqual(unknown, []);
  const flags = [...new Set([...text.matchAll(/`(?:gateway [^`]*)?(--[a-z][a-z0-9-]*)/g)].map((m) => m[1]))];
  assert.ok(flags.length > 0);
  const foreign = new Set(Object.values(OTHER_PROGRAMS_FLAGS).flat());
  assert.deepEqual(flags.filter((flag) => !help.flags.has(flag) && !foreign.has(flag)), []);
});

// ---------------------------------------------------------------------------------------------
// Dockerfile

test("the Dockerfile builds with CI's cargo command and runs non-root with a health check on the admin port", () => {
  const dockerfile = read("deploy/Dockerfile");
  const ci = `${read("tests/run")}\n${read(".ci/run")}`;

  const builds = [...dockerfile.matchAll(/cargo build[^\n&]*/g)].map((m) => m[0].trim());
  assert.equal(builds.length, 1, `one cargo build in the Dockerfile: ${builds}`);
  const build = builds[0].split(/\s+/);
  for (const word of ["--release", "--locked", "--bins"]) assert.ok(build.includes(word), `Dockerfile build lacks ${word}`);
  const packages = build.flatMap((word, i) => (word === "-p" ? [build[i + 1]] : []));
  assert.deepEqual(packages.sort(), ["gateway", "publisher-lib"]);
  // CI builds the same binaries from the same lock file (the whole workspace, --locked, --bins).
  const ciBuild = ci.match(/cargo build[^\n]*/)?.[0] ?? "";
  assert.match(ciBuild, /--locked/, "CI's cargo build should use --locked as the Dockerfile does");
  assert.match(ciBuild, /--bins/);
  assert.match(ciBuild, /--workspace/, "CI builds the whole workspace, gateway and publisher-lib included");

  // The toolchain image matches the workspace's rust-version.
  const rustVersion = read("Cargo.toml").match(/rust-version = "([\d.]+)"/)[1];
  // Base images are build arguments (a registry mirror, or local images) defaulting to the public ones.
  assert.match(dockerfile, new RegExp(`^ARG RUST_IMAGE=rust:${rustVersion.replace(".", "\\.")}-bookworm$`, "m"));
  assert.match(dockerfile, /^ARG RUNTIME_IMAGE=debian:bookworm-slim$/m);
  assert.match(dockerfile, /^FROM \$\{RUST_IMAGE\} AS builder$/m);
  assert.match(dockerfile, /^FROM \$\{RUNTIME_IMAGE\}$/m);
  // A `# syntax=` line would make BuildKit pull a frontend image before building anything.
  assert.doesNotMatch(dockerfile, /^#\s*syntax=/m, "no syntax directive: it needs a registry");
  assert.match(dockerfile, /apt-get install[^\n]*ca-certificates[^\n]*curl/);
  assert.match(dockerfile, /target\/release\/gateway target\/release\/realtime-publish/);

  // Non-root, and the listeners the image declares are the ones it exposes and checks.
  const user = dockerfile.match(/^USER (\S+)$/m)?.[1];
  assert.ok(user && !/^(0|root)(:|$)/.test(user), `runtime user: ${user}`);
  const listen = dockerfile.match(/GATEWAY_LISTEN=(\S+)/)[1];
  const admin = dockerfile.match(/GATEWAY_ADMIN_LISTEN=(\S+)/)[1];
  assert.match(listen, /^0\.0\.0\.0:/);
  assert.match(admin, /^0\.0\.0\.0:/);
  assert.match(dockerfile, new RegExp(`^EXPOSE ${portOf(listen)} ${portOf(admin)}$`, "m"));
  const healthcheck = dockerfile.match(/HEALTHCHECK[\s\S]*?CMD (\[[^\n]*\])/);
  assert.ok(healthcheck, "HEALTHCHECK");
  assert.deepEqual(JSON.parse(healthcheck[1]).slice(0, 1), ["curl"]);
  assert.match(healthcheck[1], new RegExp(`http://127\\.0\\.0\\.1:${portOf(admin)}/healthz`));

  // The build context leaves out what must not reach the builder.
  const ignored = read(".dockerignore").split("\n").map((line) => line.trim());
  for (const entry of ["target", ".git", "**/node_modules"]) assert.ok(ignored.includes(entry), `.dockerignore lacks ${entry}`);
});

// ---------------------------------------------------------------------------------------------
// docker-compose.yml

test("docker-compose.yml: Redis with AOF, one scalable gateway service, an LB and Prometheus that find its replicas by DNS, and a grace period that fits the drain", async () => {
  const help = await gatewayHelp();
  const compose = yamlDocument("docker-compose.yml");
  const services = compose.services;
  // One gateway service, scaled with `--scale gateway=N`: nothing in it may pin one container.
  assert.deepEqual(Object.keys(services).filter((name) => name.startsWith("gateway")), ["gateway"]);
  const service = services.gateway;
  for (const key of ["hostname", "container_name", "ports"]) assert.equal(service[key], undefined, `gateway: ${key} would stop --scale`);
  assert.ok(service.deploy.replicas >= 2, "several replicas by default");
  assert.equal(compose.name, undefined, "no top-level name: Debian 12's Compose v1 refuses it");

  const redis = services.redis;
  assert.match(String(redis.image), /^redis:[7-9]/, "Redis 6 or later");
  assert.match(redis.command.join(" "), /--appendonly yes/);

  const dockerfileAdmin = portOf(read("deploy/Dockerfile").match(/GATEWAY_ADMIN_LISTEN=(\S+)/)[1]);
  assert.equal(service.build.dockerfile, "deploy/Dockerfile");
  const env = service.environment;
  assert.ok(env && !Array.isArray(env), "gateway: environment as a map");
  for (const variable of Object.keys(env)) assert.ok(help.variables.has(variable), `gateway: ${variable} is not a gateway setting`);
  // Every replica gets the same Redis, secrets and connection-token secret: they are the service's.
  for (const variable of ["GATEWAY_REDIS_URL", "GATEWAY_JWT_SECRET", "GATEWAY_SERVICE_KEY", "GATEWAY_CONNECTION_TOKEN_SECRET"]) {
    assert.ok(env[variable], `gateway: ${variable}`);
  }
  assert.match(env.GATEWAY_REDIS_URL, /^redis:\/\/redis:6379/);
  assert.equal(portOf(env.GATEWAY_LISTEN), 8080);
  assert.equal(portOf(env.GATEWAY_ADMIN_LISTEN), 9090);
  assert.equal(portOf(env.GATEWAY_ADMIN_LISTEN), dockerfileAdmin);
  assert.deepEqual(service.expose.map(String).sort(), ["8080", "9090"]);
  assert.match(service.healthcheck.test.join(" "), /127\.0\.0\.1:9090\/healthz/);
  assert.equal(service.depends_on.redis.condition, "service_healthy");

  const delay = seconds(env.GATEWAY_SHUTDOWN_DELAY ?? help.defaults.GATEWAY_SHUTDOWN_DELAY);
  const drain = seconds(env.GATEWAY_DRAIN_TIMEOUT ?? help.defaults.GATEWAY_DRAIN_TIMEOUT);
  assert.ok(delay > 0, "gateway: a shutdown delay, so the LB stops sending new clients before any is closed");
  const grace = seconds(service.stop_grace_period);
  assert.ok(grace > delay + drain, `gateway: stop_grace_period ${grace}s must exceed shutdown delay ${delay}s + drain timeout ${drain}s`);

  // The load balancer: the replicas from the engine's DNS (server-template + resolvers), active
  // checks of /readyz on the admin port, long tunnels.
  const lb = services.lb;
  assert.ok(lb.ports.some((port) => String(port).endsWith(":8080")));
  assert.deepEqual(lb.depends_on, ["gateway"]);
  const mounted = lb.volumes.find((volume) => volume.includes("haproxy.cfg")).split(":")[0];
  const haproxy = read(mounted);
  assert.doesNotMatch(haproxy, /^\s*server\s/m, "no fixed server lines: the replicas come from DNS");
  const template = haproxy.match(/^\s*server-template (\S+) (\d+) gateway:8080 (.*)$/m);
  assert.ok(template, "a server-template for the gateway service on 8080");
  assert.ok(Number(template[2]) >= service.deploy.replicas, "slots for at least the default replicas");
  const resolver = template[3].match(/\bresolvers (\S+)/)?.[1];
  assert.ok(resolver, "the server-template resolves through a resolvers section");
  const section = haproxy.match(new RegExp(`^resolvers ${resolver}\n((?:[ \\t]+.*\n|\\s*\n)*)`, "m"));
  assert.ok(section, `resolvers ${resolver} section`);
  assert.match(section[1], /nameserver \S+ 127\.0\.0\.11:53/, "Docker's embedded DNS");
  assert.match(template[3], /\binit-addr none\b/, "HAProxy starts before any replica resolves");
  assert.match(haproxy, /http-check send meth GET uri \/readyz/);
  assert.match(haproxy, /default-server check port 9090 /);
  const inter = seconds(haproxy.match(/ inter (\S+)/)[1]);
  const fall = Number(haproxy.match(/ fall (\d+)/)[1]);
  assert.ok(inter * fall < delay, `HAProxy takes a draining replica out after ${inter * fall}s, within the ${delay}s shutdown delay`);
  assert.ok(seconds(haproxy.match(/timeout tunnel (\S+)/)[1]) >= 3600, "WebSocket tunnels may live an hour");

  // Prometheus mounts the scrape config and the rules, and finds every replica's admin port by DNS.
  const prometheus = services.prometheus;
  for (const file of ["deploy/prometheus/prometheus.yml", "deploy/prometheus/alerts.yml"]) {
    assert.ok(prometheus.volumes.some((volume) => volume.startsWith(`./${file}:`)), `prometheus mounts ${file}`);
  }
  const scrape = yamlDocument("deploy/prometheus/prometheus.yml");
  const job = scrape.scrape_configs.find((config) => config.job_name === "gateway");
  assert.equal(job.static_configs, undefined, "no fixed targets: the replicas come from DNS");
  assert.deepEqual(job.dns_sd_configs, [{ names: ["gateway"], type: "A", port: dockerfileAdmin, refresh_interval: job.dns_sd_configs[0].refresh_interval }]);
  assert.deepEqual(scrape.rule_files, ["alerts.yml"]);

  for (const [name, entry] of Object.entries(services)) {
    for (const volume of entry.volumes ?? []) {
      const source = volume.split(":")[0];
      if (source.startsWith("./")) assert.ok(existsSync(at(source)), `${name} mounts missing ${source}`);
    }
  }
});

test("docker compose config accepts docker-compose.yml", { skip: !have("docker") && !have("docker-compose") && "neither docker nor docker-compose is installed" }, async (t) => {
  // The compose plugin (Compose v2), or Debian 12's docker-compose (v1.29), which the container
  // test (tests/container/run) runs the file with.
  let command = ["docker", "compose"];
  if (!have("docker") || (await runTool("docker", ["compose", "version"])).code !== 0) {
    if (!have("docker-compose")) {
      t.skip("neither the docker compose plugin nor docker-compose is installed");
      return;
    }
    command = ["docker-compose"];
  }
  const result = await runTool(command[0], [...command.slice(1), "-f", "docker-compose.yml", "config", "--quiet"]);
  assert.equal(result.code, 0, result.stderr);
});

test("haproxy accepts deploy/lb/haproxy.cfg", { skip: !have("haproxy") && "haproxy is not installed" }, async () => {
  const result = await runTool("haproxy", ["-c", "-f", "deploy/lb/haproxy.cfg"]);
  assert.equal(result.code, 0, result.stdout + result.stderr);
});

// ---------------------------------------------------------------------------------------------
// Kubernetes

test("deploy/kubernetes: probes on the admin port, grace period above preStop + shutdown delay + drain, settings that exist", async () => {
  const help = await gatewayHelp();
  const objects = kubernetesObjects();
  for (const object of objects) {
    if (object.file === "kustomization.yaml") continue;
    assert.ok(object.apiVersion && object.kind && object.metadata?.name, `${object.file}: apiVersion, kind and metadata.name`);
  }

  const kustomization = yamlDocument(path.join(kubernetesDir, "kustomization.yaml"));
  for (const resource of kustomization.resources) assert.ok(existsSync(at(kubernetesDir, resource)), `kustomization lists missing ${resource}`);
  const unlisted = readdirSync(at(kubernetesDir)).filter(
    (name) => /\.ya?ml$/.test(name) && name !== "kustomization.yaml" && !kustomization.resources.includes(name),
  );
  assert.deepEqual(unlisted, ["servicemonitor.yaml"], "only the ServiceMonitor (needs the operator's CRDs) is left out");
  const images = new Set(kustomization.images.map((image) => image.name));

  const configMap = one(objects, "ConfigMap");
  const secret = one(objects, "Secret");
  const deployment = one(objects, "Deployment");
  const pod = deployment.spec.template;
  assert.deepEqual(
    Object.fromEntries(Object.entries(pod.metadata.labels).filter(([key]) => key in deployment.spec.selector.matchLabels)),
    deployment.spec.selector.matchLabels,
  );
  assert.equal(pod.spec.containers.length, 1);
  const container = pod.spec.containers[0];
  assert.ok(images.has(container.image), `kustomization images names ${container.image}`);

  // Settings: the ConfigMap's keys and the container's env are gateway settings.
  const settings = { ...configMap.data };
  for (const entry of container.env ?? []) settings[entry.name] = entry.value;
  for (const variable of Object.keys(settings)) assert.ok(help.variables.has(variable), `${variable} is not a gateway setting`);
  assert.deepEqual(container.envFrom, [{ configMapRef: { name: configMap.metadata.name } }]);
  assert.ok(settings.GATEWAY_REDIS_URL?.startsWith("redis"), "GATEWAY_REDIS_URL");
  for (const variable of ["GATEWAY_JWT_SECRET_FILE", "GATEWAY_SERVICE_KEY_FILE", "GATEWAY_CONNECTION_TOKEN_SECRET_FILE"]) {
    assert.ok(settings[variable], variable);
  }

  // Secret files: each *_FILE points into the mounted Secret at one of its keys.
  const mount = container.volumeMounts.find((volumeMount) => {
    const volume = pod.spec.volumes.find((v) => v.name === volumeMount.name);
    return volume?.secret?.secretName === secret.metadata.name;
  });
  assert.ok(mount, "the Secret is mounted");
  for (const [variable, value] of Object.entries(settings).filter(([key]) => key.endsWith("_FILE"))) {
    assert.equal(path.posix.dirname(value), mount.mountPath, `${variable} points into the Secret's mount`);
    assert.ok(path.posix.basename(value) in secret.stringData, `${variable}: the Secret has no key ${path.posix.basename(value)}`);
  }

  // Ports: the named container ports are the listeners the ConfigMap sets.
  const ports = Object.fromEntries(container.ports.map((port) => [port.name, port.containerPort]));
  assert.equal(ports.http, portOf(settings.GATEWAY_LISTEN));
  assert.equal(ports.admin, portOf(settings.GATEWAY_ADMIN_LISTEN));
  assert.match(settings.GATEWAY_ADMIN_LISTEN, /^0\.0\.0\.0:/, "probes and Prometheus reach the admin port from outside the pod");

  // Probes: readiness /readyz, liveness /healthz, both on the admin port.
  const probePort = (probe) => (typeof probe.httpGet.port === "string" ? ports[probe.httpGet.port] : probe.httpGet.port);
  assert.equal(container.readinessProbe.httpGet.path, "/readyz");
  assert.equal(probePort(container.readinessProbe), ports.admin);
  assert.equal(container.livenessProbe.httpGet.path, "/healthz");
  assert.equal(probePort(container.livenessProbe), ports.admin);
  if (container.startupProbe) assert.equal(probePort(container.startupProbe), ports.admin);

  // Shutdown: the kubelet must not SIGKILL before the drain is over.
  const preStop = container.lifecycle.preStop;
  const preStopSeconds = preStop.sleep ? Number(preStop.sleep.seconds) : Number(preStop.exec.command.join(" ").match(/^sleep (\d+)$/)?.[1]);
  assert.ok(preStopSeconds > 0, "preStop sleeps");
  const delay = seconds(settings.GATEWAY_SHUTDOWN_DELAY ?? help.defaults.GATEWAY_SHUTDOWN_DELAY);
  const drain = seconds(settings.GATEWAY_DRAIN_TIMEOUT ?? help.defaults.GATEWAY_DRAIN_TIMEOUT);
  assert.ok(delay > 0, "a shutdown delay");
  const readiness = container.readinessProbe;
  assert.ok(
    (readiness.periodSeconds ?? 10) * (readiness.failureThreshold ?? 3) <= delay,
    "the readiness probe notices a draining replica within the shutdown delay",
  );
  const grace = pod.spec.terminationGracePeriodSeconds;
  assert.ok(
    grace > preStopSeconds + delay + drain,
    `terminationGracePeriodSeconds ${grace} must exceed preStop ${preStopSeconds}s + shutdown delay ${delay}s + drain timeout ${drain}s`,
  );

  // Resources: requests and limits, memory limit at least the request.
  for (const kind of ["requests", "limits"]) {
    assert.ok(container.resources[kind].cpu && container.resources[kind].memory, `resources.${kind}`);
  }
  assert.equal(pod.spec.securityContext.runAsNonRoot, true);
  assert.equal(deployment.spec.strategy.rollingUpdate.maxUnavailable, 0);

  // Services: selectors match the pods, target ports exist.
  const services = byKind(objects, "Service");
  for (const service of services) {
    for (const [key, value] of Object.entries(service.spec.selector)) assert.equal(pod.metadata.labels[key], value);
    for (const port of service.spec.ports) assert.ok(port.targetPort in ports, `${service.metadata.name}: target port ${port.targetPort}`);
  }
  const publicService = services.find((service) => service.spec.ports.some((port) => port.targetPort === "http"));
  assert.ok(!publicService.spec.ports.some((port) => port.targetPort === "admin"), "the public Service does not expose the admin port");

  // Ingress: to the public Service, with WebSocket timeouts and no buffering.
  const ingress = one(objects, "Ingress");
  const annotations = ingress.metadata.annotations;
  assert.ok(Number(annotations["nginx.ingress.kubernetes.io/proxy-read-timeout"]) >= 3600);
  assert.ok(Number(annotations["nginx.ingress.kubernetes.io/proxy-send-timeout"]) >= 3600);
  assert.equal(annotations["nginx.ingress.kubernetes.io/proxy-buffering"], "off");
  const paths = ingress.spec.rules.flatMap((rule) => rule.http.paths);
  assert.ok(paths.some((p) => p.path === "/hub/v1"), "the hub is routed");
  for (const p of paths) {
    assert.equal(p.backend.service.name, publicService.metadata.name);
    assert.ok(publicService.spec.ports.some((port) => port.name === p.backend.service.port.name));
  }

  // HPA, PDB, NetworkPolicy.
  const hpa = one(objects, "HorizontalPodAutoscaler");
  assert.equal(hpa.spec.scaleTargetRef.name, deployment.metadata.name);
  assert.ok(hpa.spec.minReplicas >= 2);
  const pdb = one(objects, "PodDisruptionBudget");
  assert.deepEqual(pdb.spec.selector.matchLabels, deployment.spec.selector.matchLabels);
  const policy = one(objects, "NetworkPolicy");
  assert.deepEqual(policy.spec.podSelector.matchLabels, deployment.spec.selector.matchLabels);
  const adminRules = policy.spec.ingress.filter((rule) => rule.ports.some((port) => port.port === "admin" || port.port === ports.admin));
  assert.equal(adminRules.length, 1, "one rule opens the admin port");
  assert.deepEqual(adminRules[0].from, [{ namespaceSelector: { matchLabels: { "kubernetes.io/metadata.name": "monitoring" } } }]);
  assert.ok(adminRules[0].ports.every((port) => port.port === "admin" || port.port === ports.admin), "the monitoring rule opens only the admin port");

  // Scraping: annotations on the pods, or the ServiceMonitor on the admin Service's port.
  assert.equal(pod.metadata.annotations["prometheus.io/port"], String(ports.admin));
  const monitor = one(objects, "ServiceMonitor");
  const adminService = services.find((service) =>
    Object.entries(monitor.spec.selector.matchLabels).every(([key, value]) => service.metadata.labels?.[key] === value),
  );
  assert.ok(adminService, "the ServiceMonitor selects a Service");
  assert.ok(adminService.spec.ports.some((port) => port.name === monitor.spec.endpoints[0].port && port.targetPort === "admin"));
});

test("kubectl kustomize builds deploy/kubernetes", { skip: !have("kubectl") && "kubectl is not installed" }, async () => {
  const result = await runTool("kubectl", ["kustomize", kubernetesDir]);
  assert.equal(result.code, 0, result.stderr);
  const kinds = parseAllDocuments(result.stdout).map((document) => document.toJS().kind);
  for (const kind of ["ConfigMap", "Secret", "Deployment", "Service", "Ingress", "HorizontalPodAutoscaler", "PodDisruptionBudget", "NetworkPolicy"]) {
    assert.ok(kinds.includes(kind), `kustomize output lacks ${kind}`);
  }
});

// ---------------------------------------------------------------------------------------------
// Prometheus and Grafana

const promtool = have("promtool") ? "promtool" : null;

test("promtool accepts the scrape config and the alert rules, and the rules pass their unit tests", { skip: !promtool && "promtool is not installed (apt-get install prometheus)" }, async () => {
  const config = await runTool("promtool", ["check", "config", "deploy/prometheus/prometheus.yml"]);
  assert.equal(config.code, 0, config.stdout + config.stderr);
  const rules = await runTool("promtool", ["check", "rules", "deploy/prometheus/alerts.yml"]);
  assert.equal(rules.code, 0, rules.stdout + rules.stderr);
  // The rules' unit tests: each alert fires when it should and stays quiet when it should not.
  const unit = await runTool("promtool", ["test", "rules", "deploy/prometheus/alerts.test.yml"]);
  assert.equal(unit.code, 0, unit.stdout + unit.stderr);
});

test("the alerts cover the issue's list, use the gateway's metric names and point at runbooks that exist", () => {
  const metrics = exportedMetrics();
  const rules = yamlDocument("deploy/prometheus/alerts.yml").groups.flatMap((group) => group.rules);
  const byName = Object.fromEntries(rules.map((rule) => [rule.alert, rule]));
  const wanted = {
    GatewayNoReadyReplica: /gateway_broker_up/,
    GatewayRedisDisconnected: /gateway_broker_up\{[^}]*\} == 0/,
    GatewaySlowClientClosesRising: /rate\(gateway_slow_consumer_closes_total/,
    GatewayDeliveryLatencyHigh: /histogram_quantile\(0\.99, .*gateway_publish_to_delivery_seconds_bucket/,
    GatewayAuthFailuresSpiking: /rate\(gateway_auth_failures_total/,
  };
  for (const [name, expression] of Object.entries(wanted)) {
    assert.ok(byName[name], `alert ${name}`);
    assert.match(byName[name].expr.replace(/\s+/g, " "), expression, name);
  }
  const anchors = markdownAnchors("docs/operations.md");
  for (const rule of rules) {
    for (const [name] of rule.expr.matchAll(/gateway_[a-z0-9_]+/g)) {
      assert.ok(isExportedSeries(name, metrics), `${rule.alert}: ${name} is not a metric the gateway exports`);
    }
    assert.ok(rule.annotations?.summary && rule.annotations?.description, `${rule.alert}: summary and description`);
    const runbook = rule.annotations.runbook_url?.match(/^docs\/operations\.md#(.+)$/);
    assert.ok(runbook, `${rule.alert}: runbook_url docs/operations.md#<anchor>`);
    assert.ok(anchors.has(runbook[1]), `${rule.alert}: docs/operations.md has no heading for #${runbook[1]}`);
    assert.ok(rule.labels?.severity, `${rule.alert}: severity`);
  }
});

test("the Grafana dashboard queries only metrics the gateway exports, and all the ones it should show", () => {
  const metrics = exportedMetrics();
  const dashboard = JSON.parse(read("deploy/grafana/gateway-dashboard.json"));
  assert.ok(dashboard.title && dashboard.uid && Array.isArray(dashboard.panels));
  const expressions = [];
  const walk = (value) => {
    if (Array.isArray(value)) value.forEach(walk);
    else if (value && typeof value === "object") {
      for (const [key, inner] of Object.entries(value)) {
        if ((key === "expr" || key === "definition") && typeof inner === "string") expressions.push(inner);
        else walk(inner);
      }
    }
  };
  walk(dashboard);
  assert.ok(expressions.length >= 10, "panels with queries");
  // Every selector (a name followed by `{`) is one of the gateway's series: no `up`, no
  // node exporter, nothing the gateway does not export.
  const selected = new Set(expressions.flatMap((expression) => [...expression.matchAll(/([a-zA-Z_:][a-zA-Z0-9_:]*)\s*\{/g)].map((m) => m[1])));
  assert.ok(selected.size > 0);
  for (const name of selected) assert.ok(isExportedSeries(name, metrics), `dashboard selects ${name}`);
  const referenced = new Set(expressions.flatMap((expression) => [...expression.matchAll(/\bgateway_[a-z0-9_]+/g)].map((m) => m[0])));
  for (const name of referenced) assert.ok(isExportedSeries(name, metrics), `dashboard uses ${name}, which the gateway does not export`);
  for (const name of [
    "gateway_connections_active",
    "gateway_frames_delivered_total",
    "gateway_publish_to_delivery_seconds_bucket",
    "gateway_broker_up",
    "gateway_broker_reconnects_total",
    "gateway_slow_consumer_closes_total",
    "gateway_auth_failures_total",
    "gateway_joins_total",
    "gateway_broker_gap_repairs_total",
  ]) {
    assert.ok(referenced.has(name), `the dashboard shows ${name}`);
  }
  assert.ok(expressions.some((e) => e.includes("histogram_quantile(0.5,")) && expressions.some((e) => e.includes("histogram_quantile(0.99,")), "p50 and p99");
});

test("a live gateway's /metrics passes promtool check metrics and names only metrics.rs's metrics", { skip: !promtool && "promtool is not installed" }, async (t) => {
  const gateway = await gatewayFor(t, { name: "deploy-metrics" });
  // Traffic, so counters, gauges and the latency histogram have series: a refused token, then
  // the official client joins a group and receives one event.
  const refused = await fetch(`${gateway.hubUrl}/negotiate?negotiateVersion=1`, { method: "POST", headers: { Authorization: "Bearer nope" } });
  assert.equal(refused.status, 401);
  const region = uniqueRegion("deploy");
  const connection = await connect(t, gateway, dispatcherToken([region]));
  const received = inbox(connection, "RecommendationReady");
  await join(connection, "JoinDispatchGroup", region);
  await publishAccepted(gateway, recommendationReady(region));
  await received.nth(1);

  const response = await fetch(`${gateway.adminUrl}/metrics`);
  assert.equal(response.status, 200);
  const exposition = await response.text();
  const result = await runTool("promtool", ["check", "metrics"], { input: exposition });
  assert.equal(result.code, 0, `promtool check metrics:\n${result.stdout}${result.stderr}`);

  const metrics = exportedMetrics();
  const live = new Set([...exposition.matchAll(/^(gateway_[a-z0-9_]+)/gm)].map((m) => m[1]));
  for (const name of ["gateway_auth_failures_total", "gateway_broker_up", "gateway_joins_total", "gateway_publish_to_delivery_seconds_bucket", "gateway_frames_delivered_total"]) {
    assert.ok(live.has(name), `/metrics lacks ${name} after the traffic above`);
  }
  for (const name of live) assert.ok(isExportedSeries(name, metrics), `/metrics has ${name}, which metrics.rs does not name`);
});

// ---------------------------------------------------------------------------------------------
// docs/operations.md

test("docs/operations.md describes every metric, and every docs link in the deploy files has its heading", () => {
  const { names } = exportedMetrics();
  const operations = read("docs/operations.md");
  const undocumented = [...names].filter((name) => !operations.includes(`\`${name}\``));
  assert.deepEqual(undocumented, [], "metrics missing from docs/operations.md#metrics");

  const broken = [];
  for (const file of [...deployFiles(), "docs/operations.md"]) {
    const text = read(file);
    for (const [, document, anchor] of text.matchAll(/(?:docs\/|\()([a-z-]+\.md)#([a-z0-9-]+)/g)) {
      const target = existsSync(at("docs", document)) ? path.join("docs", document) : document;
      if (!existsSync(at(target)) || !markdownAnchors(target).has(anchor)) broken.push(`${file}: ${document}#${anchor}`);
    }
  }
  const own = markdownAnchors("docs/operations.md");
  for (const [, anchor] of operations.matchAll(/\]\(#([a-z0-9-]+)\)/g)) {
    if (!own.has(anchor)) broken.push(`docs/operations.md: #${anchor}`);
  }
  assert.deepEqual(broken, [], "links to headings that do not exist");
});
