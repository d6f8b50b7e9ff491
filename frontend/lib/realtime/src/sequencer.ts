/**
 * Per-group ordering: which events to hand on, which to drop, and when the app must resync.
 *
 * The sequencer keeps the last position of every group the client is a member of (or wants to
 * be). Within an epoch, `seq` counts the group's events one by one, so an event at or below the
 * last `seq` is a duplicate (dropped), one exactly above it is next (delivered), and one further
 * on means events were lost (delivered, and the group needs a resync). An event of another epoch
 * means the group's history was replaced (delivered, resync). Pure: no I/O, no timers.
 */

import type { JoinResult, Position } from "./contract.js";

/** Why the app must refetch a group's state over HTTP. */
export type ResyncReason = "recovery_incomplete" | "epoch_changed" | "gap";

/** What to do with one event. */
export interface Verdict {
  deliver: boolean;
  resync?: ResyncReason;
}

const DROP: Verdict = { deliver: false };
const DELIVER: Verdict = { deliver: true };

/** The last position of each tracked group. */
export class Sequencer {
  readonly #last = new Map<string, Position | undefined>();

  /** Starts tracking `group` (a join was requested); keeps its last position if it has one. */
  track(group: string): void {
    if (!this.#last.has(group)) this.#last.set(group, undefined);
  }

  /** Stops tracking `group` (left): its events are dropped and its position forgotten. */
  forget(group: string): void {
    this.#last.delete(group);
  }

  /** Whether `group` is tracked. */
  tracks(group: string): boolean {
    return this.#last.has(group);
  }

  /** The last position seen in `group`, if any. */
  last(group: string): Position | undefined {
    return this.#last.get(group);
  }

  /** The last position of every tracked group that has one. */
  snapshot(): Record<string, Position> {
    const positions: Record<string, Position> = {};
    for (const [group, position] of this.#last) if (position) positions[group] = { ...position };
    return positions;
  }

  /** Decides about an event delivered at `position`, and records the position if it is new. */
  acceptEvent(position: Position): Verdict {
    const { group } = position;
    if (!this.#last.has(group)) return DROP; // not a member (left, or never joined)
    const last = this.#last.get(group);
    const next = { group, epoch: position.epoch, seq: position.seq };
    if (last === undefined) {
      this.#last.set(group, next);
      return DELIVER;
    }
    if (position.epoch !== last.epoch) {
      this.#last.set(group, next);
      return { deliver: true, resync: "epoch_changed" };
    }
    if (position.seq <= last.seq) return DROP;
    this.#last.set(group, next);
    return position.seq === last.seq + 1 ? DELIVER : { deliver: true, resync: "gap" };
  }

  /**
   * Records what a join resolved with. `sent` is the position the join passed (undefined for a
   * first join). Returns the reason to resync, if any.
   *
   * A resume that worked delivered the missed events before the join resolved, so the last
   * position already reflects them and is kept; if it is still behind the head, the next event
   * shows the gap. A resume that did not work moves the group to the returned head (possibly of a
   * new epoch), so the events that follow are in order and raise nothing more.
   */
  acceptJoin(result: JoinResult, sent: Position | undefined): ResyncReason | undefined {
    const { group } = result;
    if (!this.#last.has(group)) return undefined;
    const head = { group, epoch: result.epoch, seq: result.seq };
    const last = this.#last.get(group);
    if (sent !== undefined && result.recovered === false) {
      this.#last.set(group, head);
      return "recovery_incomplete";
    }
    if (last === undefined || (last.epoch === head.epoch && last.seq < head.seq && sent === undefined)) {
      this.#last.set(group, head);
    }
    return undefined;
  }
}
