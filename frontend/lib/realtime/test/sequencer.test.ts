import assert from "node:assert/strict";
import { test } from "node:test";

import { Sequencer } from "../src/sequencer.js";
import type { Verdict } from "../src/sequencer.js";

const G = "/dispatch/west";
const at = (epoch: string, seq: number) => ({ group: G, epoch, seq });

/** Feeds (epoch, seq) pairs and returns the verdicts. */
function feed(sequencer: Sequencer, events: Array<[string, number]>): Verdict[] {
  return events.map(([epoch, seq]) => sequencer.acceptEvent(at(epoch, seq)));
}

const deliver = { deliver: true };
const drop = { deliver: false };

test("in-order events are delivered, duplicates and older ones dropped", () => {
  const s = new Sequencer();
  s.track(G);
  assert.equal(s.acceptJoin({ group: G, epoch: "a", seq: 0 }, undefined), undefined);
  assert.deepEqual(feed(s, [["a", 1], ["a", 2], ["a", 2], ["a", 1], ["a", 3]]), [deliver, deliver, drop, drop, deliver]);
  assert.deepEqual(s.snapshot(), { [G]: at("a", 3) });
});

test("a jump in seq is delivered and asks for a resync", () => {
  const s = new Sequencer();
  s.track(G);
  s.acceptJoin({ group: G, epoch: "a", seq: 4 }, undefined);
  assert.deepEqual(feed(s, [["a", 5], ["a", 8], ["a", 7], ["a", 9]]), [deliver, { deliver: true, resync: "gap" }, drop, deliver]);
});

test("a new epoch is delivered and asks for a resync; its events then follow in order", () => {
  const s = new Sequencer();
  s.track(G);
  s.acceptJoin({ group: G, epoch: "a", seq: 0 }, undefined);
  assert.deepEqual(feed(s, [["a", 1], ["b", 1], ["b", 2], ["a", 2]]), [
    deliver,
    { deliver: true, resync: "epoch_changed" },
    deliver,
    { deliver: true, resync: "epoch_changed" },
  ]);
});

test("events of groups not tracked are dropped; forgetting a group drops its position", () => {
  const s = new Sequencer();
  assert.deepEqual(s.acceptEvent(at("a", 1)), drop);
  s.track(G);
  assert.deepEqual(s.acceptEvent(at("a", 1)), deliver);
  s.forget(G);
  assert.deepEqual(s.acceptEvent(at("a", 2)), drop);
  assert.deepEqual(s.snapshot(), {});
  s.track(G);
  assert.equal(s.last(G), undefined);
});

test("a resume that worked keeps the position the replayed events reached", () => {
  const s = new Sequencer();
  s.track(G);
  s.acceptJoin({ group: G, epoch: "a", seq: 0 }, undefined);
  feed(s, [["a", 1], ["a", 2]]);
  const sent = s.last(G);
  // The gateway replays 3..5 before the join resolves.
  assert.deepEqual(feed(s, [["a", 3], ["a", 4], ["a", 5]]), [deliver, deliver, deliver]);
  assert.equal(s.acceptJoin({ group: G, epoch: "a", seq: 5, recovered: true }, sent), undefined);
  assert.deepEqual(s.last(G), at("a", 5));
  assert.deepEqual(feed(s, [["a", 6]]), [deliver]);
});

test("a resume that did not work asks for a resync once and moves to the returned head", () => {
  const s = new Sequencer();
  s.track(G);
  s.acceptJoin({ group: G, epoch: "a", seq: 0 }, undefined);
  feed(s, [["a", 1]]);
  assert.equal(s.acceptJoin({ group: G, epoch: "b", seq: 7, recovered: false }, s.last(G)), "recovery_incomplete");
  assert.deepEqual(s.last(G), at("b", 7));
  // The first event of the join's epoch is not another resync.
  assert.deepEqual(feed(s, [["b", 8], ["b", 9]]), [deliver, deliver]);
});

test("a first join's head does not move a position that events already advanced", () => {
  const s = new Sequencer();
  s.track(G);
  feed(s, [["a", 3]]);
  assert.equal(s.acceptJoin({ group: G, epoch: "a", seq: 2 }, undefined), undefined);
  assert.deepEqual(s.last(G), at("a", 3));
});
