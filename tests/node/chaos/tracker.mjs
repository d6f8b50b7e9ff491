// Checks what every client received against what the publisher published, per group: every
// event exactly once and in publish order, positions contiguous within an epoch. Prints one
// table row per scenario and writes it to chaos-results/<scenario>.json.

import assert from "node:assert/strict";
import { mkdirSync, writeFileSync } from "node:fs";
import path from "node:path";
import { fileURLToPath } from "node:url";

const here = path.dirname(fileURLToPath(import.meta.url));
export const RESULTS = path.resolve(here, "../chaos-results");

/**
 * `published`: region -> [requestId in publish order] (loadgen publish-stream's summary groups).
 * `clients`: [{ name, regions, received: { group: [{ requestId, epoch, seq }] }, joins, downMs(), reconnects }].
 * options.required: group -> Set of requestIds that must be delivered (default: all published).
 * options.gapFreeEpochs: "all" (default) or "last": which epochs must have contiguous seqs.
 */
export function track(published, clients, options = {}) {
  const { required = null, gapFreeEpochs = "all" } = options;
  const indexOf = {}; // group -> Map(requestId -> publish index)
  for (const [region, ids] of Object.entries(published)) {
    indexOf[`/dispatch/${region}`] = new Map(ids.map((id, i) => [id, i]));
  }
  const totals = {
    published: Object.values(published).reduce((n, ids) => n + ids.length, 0),
    clients: clients.length,
    expected: 0,
    delivered: 0,
    duplicates: 0,
    outOfOrder: 0,
    lost: 0,
    lostRequired: 0,
    unknown: 0,
    seqGaps: 0,
    withoutPosition: 0,
    rejoins: 0,
    recoveredTrue: 0,
    recoveredFalse: 0,
    joinErrors: 0,
    clientGroups: 0,
    toldIncomplete: 0, // client-groups that saw another epoch or recovered:false
    reconnects: 0,
    disconnectedMsTotal: 0,
    disconnectedMsMax: 0,
  };
  const problems = [];
  for (const client of clients) {
    const down = typeof client.downMs === "function" ? client.downMs() : client.disconnectedMs ?? 0;
    totals.disconnectedMsTotal += down;
    totals.disconnectedMsMax = Math.max(totals.disconnectedMsMax, down);
    totals.reconnects += client.reconnects ?? 0;
    for (const join of client.joins ?? []) {
      if (join.error) totals.joinErrors += 1;
      if (join.rejoin || join.sent) {
        if (join.result) totals.rejoins += 1;
        if (join.result?.recovered === true) totals.recoveredTrue += 1;
        if (join.result?.recovered === false) totals.recoveredFalse += 1;
      }
    }
    for (const region of client.regions) {
      const group = `/dispatch/${region}`;
      const index = indexOf[group] ?? new Map();
      const must = required?.[group] ?? null;
      const got = client.received[group] ?? [];
      totals.clientGroups += 1;
      totals.expected += index.size;
      totals.delivered += got.length;
      const seen = new Set();
      let highest = -1;
      let prev = null;
      const epochs = [];
      const local = { duplicates: 0, outOfOrder: 0, unknown: 0, seqGaps: 0 };
      for (const entry of got) {
        if (entry.epoch === undefined) totals.withoutPosition += 1;
        else if (!epochs.includes(entry.epoch)) epochs.push(entry.epoch);
        if (seen.has(entry.requestId)) {
          local.duplicates += 1;
          if ((local.dupSamples ??= []).length < 3) {
            local.dupSamples.push({
              requestId: entry.requestId,
              copies: got.filter((e) => e.requestId === entry.requestId),
              joins: (client.joins ?? []).filter((j) => j.group === group),
              reconnectedAt: client.reconnectedAt,
            });
          }
          continue;
        }
        seen.add(entry.requestId);
        const at = index.get(entry.requestId);
        if (at === undefined) local.unknown += 1;
        else if (at < highest) local.outOfOrder += 1;
        else highest = at;
        if (entry.epoch !== undefined) {
          if (prev && prev.epoch === entry.epoch && entry.seq !== prev.seq + 1) entry.gap = true;
          prev = entry;
        }
      }
      const lastEpoch = epochs.at(-1);
      for (const entry of got) {
        if (entry.gap && (gapFreeEpochs === "all" || entry.epoch === lastEpoch)) local.seqGaps += 1;
        delete entry.gap;
      }
      let lost = 0;
      let lostRequired = 0;
      const lostIds = [];
      for (const id of index.keys()) {
        if (!seen.has(id)) {
          lost += 1;
          if (!must || must.has(id)) lostRequired += 1;
          if (lostIds.length < 5) lostIds.push(id);
        }
      }
      const told =
        epochs.length > 1 ||
        (client.joins ?? []).some((j) => j.group === group && j.result?.recovered === false);
      if (told) totals.toldIncomplete += 1;
      totals.duplicates += local.duplicates;
      totals.outOfOrder += local.outOfOrder;
      totals.unknown += local.unknown;
      totals.seqGaps += local.seqGaps;
      totals.lost += lost;
      totals.lostRequired += lostRequired;
      if (local.duplicates || local.outOfOrder || local.unknown || local.seqGaps || lostRequired) {
        if (problems.length < 10) {
          problems.push({ client: client.name, group, ...local, lost, lostRequired, lostIds, received: got.length, epochs });
        }
      }
    }
  }
  return { totals, problems };
}

const COLUMNS = [
  ["scenario", 34],
  ["published", 9],
  ["expected", 9],
  ["delivered", 9],
  ["dups", 5],
  ["order", 5],
  ["lost", 6],
  ["lostReq", 7],
  ["gaps", 5],
  ["rejoin ok/false", 15],
  ["down total/max ms", 18],
];

export function tableHeader() {
  const head = COLUMNS.map(([name, width]) => name.padEnd(width)).join(" | ");
  return `${head}\n${COLUMNS.map(([, width]) => "-".repeat(width)).join("-|-")}`;
}

export function tableRow(scenario, totals) {
  const cells = [
    scenario,
    totals.published,
    totals.expected,
    totals.delivered,
    totals.duplicates,
    totals.outOfOrder,
    totals.lost,
    totals.lostRequired,
    totals.seqGaps,
    `${totals.recoveredTrue}/${totals.recoveredFalse}`,
    `${Math.round(totals.disconnectedMsTotal)}/${Math.round(totals.disconnectedMsMax)}`,
  ];
  return cells.map((cell, i) => String(cell).padEnd(COLUMNS[i][1])).join(" | ");
}

/** Prints the row and writes { scenario, totals, problems, ...extra } to chaos-results/<file>.json. */
export function report(file, scenario, result, extra = {}) {
  mkdirSync(RESULTS, { recursive: true });
  const row = tableRow(scenario, result.totals);
  const record = { scenario, at: new Date().toISOString(), row, totals: result.totals, problems: result.problems, ...extra };
  writeFileSync(path.join(RESULTS, `${file}.json`), `${JSON.stringify(record, null, 2)}\n`);
  console.log(`${tableHeader()}\n${row}`);
  return record;
}

/**
 * Waits until every client has every event `summary` (loadgen publish-stream's) published to its
 * groups, or `ms` passed; resolves with how many clients are still behind (polled every 100 ms).
 */
export async function settled(clients, summary, ms) {
  const deadline = Date.now() + ms;
  const wanted = (group) => summary.groups[group.slice("/dispatch/".length)]?.length ?? 0;
  for (;;) {
    const behind = clients.filter((client) =>
      client.groups.some((group) => new Set(client.received[group].map((e) => e.requestId)).size < wanted(group)),
    );
    if (behind.length === 0 || Date.now() > deadline) return behind.length;
    await new Promise((resolve) => setTimeout(resolve, 100));
  }
}

/**
 * The verdict on a stream of resuming clients (`result` of track): the publisher queued and sent
 * every event of `summary`, no client gave up, and every client got every event of its groups
 * once, in order, without a seq gap or a refused resume.
 */
export function assertEveryEventOnce(summary, clients, { totals }) {
  assert.equal(summary.dropped, 0, "events dropped before queueing");
  assert.equal(summary.failed, 0, "events the publisher gave up on");
  for (const client of clients) assert.equal(client.closedWith, undefined, `${client.name} gave up: ${client.closedWith}`);
  assert.equal(totals.lost, 0, "lost events");
  assert.equal(totals.duplicates, 0, "duplicates");
  assert.equal(totals.outOfOrder, 0, "out of order");
  assert.equal(totals.seqGaps, 0, "seq gaps");
  assert.equal(totals.recoveredFalse, 0, "a resume was refused");
}
