/**
 * `RealtimeClient`: one hub connection, kept up forever, with remembered group memberships.
 *
 * A lost WebSocket is first resumed by the SignalR client itself (stateful reconnect): the
 * logical connection, its groups and the events sent meanwhile survive, and this client sees
 * nothing of it, because it listens only to `onclose`, which a resume does not raise. When the
 * gateway refuses the resume (or stateful reconnect is off or not agreed), the connection closes
 * and the client's own retry loop (the same capped, jittered backoff for the first start and
 * after every loss) connects again and rejoins every remembered group with its last position once
 * connected, checks each incoming event against the contract, puts it through the group's
 * sequencer (drop duplicates, flag gaps and new epochs) and calls the app's handlers, each
 * isolated from the others. It does no HTTP of its own: a resync is a signal for the app.
 */

import { backoffDelay, resolvePolicy } from "./backoff.js";
import type { ReconnectPolicy, ResolvedPolicy } from "./backoff.js";
import { signalRConnection } from "./connection.js";
import type { ConnectionFactory, HubConnectionLike, RealtimeLogLevel } from "./connection.js";
import {
  EVENT_TYPES,
  groupOfContractor,
  groupOfDispatch,
  validateEvent,
  validateJoinResult,
  validatePosition,
} from "./contract.js";
import type { JoinResult, Position, RealtimeEvent, RealtimeEventType } from "./contract.js";
import { Sequencer } from "./sequencer.js";
import type { ResyncReason } from "./sequencer.js";

/** The client's connection state. */
export type ConnectionState = "connecting" | "connected" | "reconnecting" | "disconnected";

/** What a client is built from. */
export interface RealtimeOptions {
  /** The hub URL, e.g. "http://127.0.0.1:8080/hub/v1" (through the load balancer). */
  url: string;
  /** Called before every connection attempt: return a current, unexpired token. */
  accessTokenFactory: () => string | Promise<string>;
  /** Capped, jittered exponential backoff; forever by default (also for the initial start). */
  reconnect?: ReconnectPolicy;
  /** Connect the WebSocket directly, without negotiating (which also rules out stateful reconnect). */
  skipNegotiation?: boolean;
  /**
   * Ask for SignalR stateful reconnect (default true): a lost WebSocket is reopened on the same
   * logical connection without a reconnect; rejoining with positions remains the fallback.
   */
  statefulReconnect?: boolean;
  /** The SignalR client's log level (default "warning"). */
  logLevel?: RealtimeLogLevel;
}

/** Replaceable parts, for tests: the hub connection, the random source and the timer. */
export interface ClientInternals {
  connect?: ConnectionFactory;
  random?: () => number;
  /** Resolves after `ms` milliseconds. */
  sleep?: (ms: number) => Promise<void>;
}

type EventHandler<K extends RealtimeEventType> = (event: Extract<RealtimeEvent, { type: K }>, position: Position) => void;
type AnyEventHandler = (event: RealtimeEvent, position: Position) => void;

type GroupKind = "dispatch" | "contractor";

/** A remembered membership: joined again after every reconnect until left. */
interface Membership {
  kind: GroupKind;
  name: string;
  group: string;
  /** Join calls waiting for the next successful join. */
  waiters: Array<{ resolve: (result: JoinResult) => void; reject: (error: Error) => void }>;
  /** The connection generation a join is in flight on, if any. */
  inflight: number | undefined;
}

const NAME = /^[A-Za-z0-9._-]{1,64}$/;

const METHODS: Record<GroupKind, { join: string; leave: string; groupOf: (name: string) => string; what: string }> = {
  dispatch: { join: "JoinDispatchGroup", leave: "LeaveDispatchGroup", groupOf: groupOfDispatch, what: "region" },
  contractor: { join: "JoinContractorGroup", leave: "LeaveContractorGroup", groupOf: groupOfContractor, what: "contractor id" },
};

const toError = (value: unknown): Error => (value instanceof Error ? value : new Error(String(value)));

/** A typed, self-reconnecting client of the real-time gateway. */
export class RealtimeClient {
  readonly #options: RealtimeOptions;
  readonly #policy: ResolvedPolicy;
  readonly #connection: HubConnectionLike;
  readonly #random: () => number;
  readonly #sleep: (ms: number) => Promise<void>;

  #state: ConnectionState = "disconnected";
  #lastError: Error | undefined;
  /** True between start() and stop() (or giving up). */
  #running = false;
  /** Counts connections; a reply from an older one is stale. */
  #generation = 0;
  #started: Promise<void> | undefined;
  /** Resolved by stop() to cut a backoff wait short. */
  #wake: () => void = () => {};

  readonly #memberships = new Map<string, Membership>();
  readonly #sequencer = new Sequencer();
  readonly #eventHandlers = new Map<RealtimeEventType, Set<AnyEventHandler>>(EVENT_TYPES.map((type) => [type, new Set()]));
  readonly #stateHandlers = new Set<(state: ConnectionState, error?: Error) => void>();
  readonly #resyncHandlers = new Set<(group: string, reason: ResyncReason) => void>();
  readonly #errorHandlers = new Set<(error: Error) => void>();

  /**
   * Builds a client; nothing connects until start().
   *
   * @throws RangeError when the reconnect policy is invalid.
   */
  constructor(options: RealtimeOptions, internals: ClientInternals = {}) {
    this.#options = options;
    this.#policy = resolvePolicy(options.reconnect);
    this.#random = internals.random ?? Math.random;
    this.#sleep = internals.sleep ?? ((ms) => new Promise((resolve) => setTimeout(resolve, ms)));
    const connect = internals.connect ?? signalRConnection;
    const connectionOptions = {
      url: options.url,
      accessTokenFactory: options.accessTokenFactory,
      ...(options.skipNegotiation === undefined ? {} : { skipNegotiation: options.skipNegotiation }),
      statefulReconnect: options.statefulReconnect ?? true,
      ...(options.logLevel === undefined ? {} : { logLevel: options.logLevel }),
    };
    this.#connection = connect(connectionOptions);
    for (const type of EVENT_TYPES) {
      this.#connection.on(type, (...args: unknown[]) => this.#receive(type, args[0], args[1]));
    }
    // The only connection callback: a stateful resume raises none, so it is no reconnect here
    // (no state change, no rejoin); onclose means the logical connection is gone.
    this.#connection.onclose((error) => this.#closed(error));
  }

  /** The connection state. */
  get state(): ConnectionState {
    return this.#state;
  }

  /** The last connection error (a failed attempt or the reason a connection ended). */
  get lastError(): Error | undefined {
    return this.#lastError;
  }

  /**
   * Connects, retrying per the reconnect policy; resolves once connected. Remembered groups are
   * joined right after. Calling it while started returns the same promise.
   *
   * @throws when stop() is called first, or the policy's maxAttempts are used up.
   */
  start(): Promise<void> {
    if (this.#running && this.#started) return this.#started;
    this.#running = true;
    this.#started = this.#connectLoop("connecting", undefined);
    return this.#started;
  }

  /** Closes the connection and stops reconnecting. Memberships and positions are kept for a later start(). */
  async stop(): Promise<void> {
    this.#running = false;
    this.#started = undefined;
    this.#wake();
    try {
      await this.#connection.stop();
    } finally {
      this.#setState("disconnected");
    }
  }

  /** Joins (and remembers) a region's dispatch group. Queued until connected. */
  joinDispatch(region: string): Promise<JoinResult> {
    return this.#join("dispatch", region);
  }

  /** Leaves (and forgets) a region's dispatch group. */
  leaveDispatch(region: string): Promise<void> {
    return this.#leave("dispatch", region);
  }

  /** Joins (and remembers) a contractor's group. Queued until connected. */
  joinContractor(contractorId: string): Promise<JoinResult> {
    return this.#join("contractor", contractorId);
  }

  /** Leaves (and forgets) a contractor's group. */
  leaveContractor(contractorId: string): Promise<void> {
    return this.#leave("contractor", contractorId);
  }

  /**
   * Calls `handler` for every valid, in-order, first-seen event of `type`, with the position it
   * arrived at. Returns a function that unsubscribes.
   */
  on<K extends RealtimeEventType>(type: K, handler: EventHandler<K>): () => void {
    const handlers = this.#eventHandlers.get(type);
    if (!handlers) throw new TypeError(`unknown event type ${JSON.stringify(type)}`);
    const erased = handler as unknown as AnyEventHandler;
    handlers.add(erased);
    return () => handlers.delete(erased);
  }

  /** Calls `handler` on every state change, with the error that caused it when there is one. */
  onStateChange(handler: (state: ConnectionState, error?: Error) => void): () => void {
    return this.#subscribe(this.#stateHandlers, handler);
  }

  /** Calls `handler` when a group's state must be refetched over HTTP. */
  onResyncRequired(handler: (group: string, reason: ResyncReason) => void): () => void {
    return this.#subscribe(this.#resyncHandlers, handler);
  }

  /** Calls `handler` for handler exceptions, malformed events and failed rejoins. */
  onError(handler: (error: Error) => void): () => void {
    return this.#subscribe(this.#errorHandlers, handler);
  }

  /** The last position of every joined group that has one. */
  positions(): Record<string, Position> {
    return this.#sequencer.snapshot();
  }

  // --- connecting -----------------------------------------------------------------------------

  async #connectLoop(phase: "connecting" | "reconnecting", cause: Error | undefined): Promise<void> {
    this.#setState(phase, cause);
    const stopped = () => new Error("the realtime client was stopped");
    for (let attempt = 0; ; attempt += 1) {
      const retry = phase === "reconnecting" ? attempt : attempt - 1;
      if (retry >= 0) await this.#pause(backoffDelay(this.#policy, retry, this.#random));
      if (!this.#running) throw stopped();
      try {
        await this.#connection.start();
      } catch (error) {
        if (!this.#running) throw stopped();
        this.#lastError = toError(error);
        if (attempt + 1 >= this.#policy.maxAttempts) {
          this.#running = false;
          this.#started = undefined;
          this.#setState("disconnected", this.#lastError);
          throw this.#lastError;
        }
        continue;
      }
      if (!this.#running) throw stopped(); // stop() ran while start() was finishing; it closes the connection
      this.#generation += 1;
      this.#setState("connected");
      for (const membership of this.#memberships.values()) this.#joinOnce(membership);
      return;
    }
  }

  /** Waits `ms`, or less if stop() is called. */
  #pause(ms: number): Promise<void> {
    return new Promise((resolve) => {
      this.#wake = resolve;
      this.#sleep(ms).then(resolve, resolve);
    });
  }

  #closed(error: Error | undefined): void {
    this.#generation += 1;
    if (error) this.#lastError = error;
    if (!this.#running) {
      this.#setState("disconnected", error);
      return;
    }
    // Reconnecting; when the policy gives up the state says so, so nothing is left to report here.
    this.#connectLoop("reconnecting", error).catch(() => {});
  }

  // --- groups ---------------------------------------------------------------------------------

  #join(kind: GroupKind, name: string): Promise<JoinResult> {
    const { groupOf, what } = METHODS[kind];
    if (typeof name !== "string" || !NAME.test(name)) {
      return Promise.reject(new TypeError(`invalid ${what} ${JSON.stringify(name)}: 1 to 64 characters of A-Z a-z 0-9 - _ .`));
    }
    const group = groupOf(name);
    let membership = this.#memberships.get(group);
    if (!membership) {
      membership = { kind, name, group, waiters: [], inflight: undefined };
      this.#memberships.set(group, membership);
      this.#sequencer.track(group);
    }
    const joined = new Promise<JoinResult>((resolve, reject) => membership.waiters.push({ resolve, reject }));
    if (this.#state === "connected") this.#joinOnce(membership);
    return joined;
  }

  /** Joins `membership` on the current connection unless a join is already in flight there. */
  #joinOnce(membership: Membership): void {
    const generation = this.#generation;
    if (membership.inflight === generation) return;
    membership.inflight = generation;
    const sent = this.#sequencer.last(membership.group);
    const position = sent === undefined ? null : { epoch: sent.epoch, seq: sent.seq };
    const current = () => this.#memberships.get(membership.group) === membership && generation === this.#generation;
    this.#connection.invoke(METHODS[membership.kind].join, membership.name, position).then(
      (raw) => {
        if (membership.inflight === generation) membership.inflight = undefined;
        if (!current()) return; // left meanwhile, or the connection was replaced (the next one joins again)
        const result = validateJoinResult(raw);
        if (!result.ok || result.value.group !== membership.group) {
          const problem = result.ok ? `it names ${result.value.group}` : result.error;
          this.#joinFailed(membership, new Error(`joining ${membership.group} resolved with ${JSON.stringify(raw)}: ${problem}`));
          return;
        }
        const resync = this.#sequencer.acceptJoin(result.value, sent);
        for (const waiter of membership.waiters.splice(0)) waiter.resolve(result.value);
        if (resync) this.#emitResync(membership.group, resync);
      },
      (error: unknown) => {
        if (membership.inflight === generation) membership.inflight = undefined;
        // A join cut off by the connection closing is made again on the next connection.
        if (!current() || this.#state !== "connected") return;
        this.#joinFailed(membership, new Error(`joining ${membership.group} failed: ${toError(error).message}`, { cause: error }));
      },
    );
  }

  /**
   * The server refused a join. A join call still waiting is rejected and the group forgotten
   * unless it had joined before; a refused rejoin is reported and tried again after the next
   * reconnect.
   */
  #joinFailed(membership: Membership, error: Error): void {
    const waiters = membership.waiters.splice(0);
    if (waiters.length > 0 && this.#sequencer.last(membership.group) === undefined) {
      this.#memberships.delete(membership.group);
      this.#sequencer.forget(membership.group);
      for (const waiter of waiters) waiter.reject(error);
      return;
    }
    for (const waiter of waiters) waiter.reject(error);
    this.#reportError(error);
  }

  async #leave(kind: GroupKind, name: string): Promise<void> {
    const { groupOf, leave, what } = METHODS[kind];
    if (typeof name !== "string" || !NAME.test(name)) {
      throw new TypeError(`invalid ${what} ${JSON.stringify(name)}: 1 to 64 characters of A-Z a-z 0-9 - _ .`);
    }
    const group = groupOf(name);
    const membership = this.#memberships.get(group);
    this.#memberships.delete(group);
    this.#sequencer.forget(group);
    for (const waiter of membership?.waiters.splice(0) ?? []) waiter.reject(new Error(`left ${group} before the join completed`));
    if (this.#state !== "connected") return; // memberships do not outlive a connection
    const generation = this.#generation;
    try {
      await this.#connection.invoke(leave, name);
    } catch (error) {
      if (generation !== this.#generation) return; // the connection ended, and the membership with it
      throw toError(error);
    }
  }

  // --- events ---------------------------------------------------------------------------------

  #receive(target: RealtimeEventType, payload: unknown, rawPosition: unknown): void {
    const event = validateEvent(payload);
    if (!event.ok) {
      this.#reportError(new Error(`malformed ${target} event dropped: ${event.error}`));
      return;
    }
    if (event.value.type !== target) {
      this.#reportError(new Error(`malformed ${target} event dropped: its type is ${event.value.type}`));
      return;
    }
    if (rawPosition === undefined || rawPosition === null) {
      // Published without the position script (an old publisher): deliverable, not resumable.
      this.#deliver(event.value, undefined);
      return;
    }
    const position = validatePosition(rawPosition);
    if (!position.ok) {
      this.#reportError(new Error(`malformed ${target} event dropped: ${position.error}`));
      return;
    }
    const verdict = this.#sequencer.acceptEvent(position.value);
    if (verdict.resync) this.#emitResync(position.value.group, verdict.resync);
    if (verdict.deliver) this.#deliver(event.value, position.value);
  }

  #deliver(event: RealtimeEvent, position: Position | undefined): void {
    for (const handler of [...(this.#eventHandlers.get(event.type) ?? [])]) {
      try {
        // Handlers are typed with a Position; only events from an old publisher come without one.
        handler(event, position as Position);
      } catch (error) {
        this.#reportError(new Error(`a ${event.type} handler threw: ${toError(error).message}`, { cause: error }));
      }
    }
  }

  // --- notifications --------------------------------------------------------------------------

  #setState(state: ConnectionState, error?: Error): void {
    if (this.#state === state) return;
    this.#state = state;
    for (const handler of [...this.#stateHandlers]) {
      try {
        handler(state, error);
      } catch (thrown) {
        this.#reportError(new Error(`a state handler threw: ${toError(thrown).message}`, { cause: thrown }));
      }
    }
  }

  #emitResync(group: string, reason: ResyncReason): void {
    for (const handler of [...this.#resyncHandlers]) {
      try {
        handler(group, reason);
      } catch (error) {
        this.#reportError(new Error(`a resync handler threw: ${toError(error).message}`, { cause: error }));
      }
    }
  }

  #reportError(error: Error): void {
    if (this.#errorHandlers.size === 0) {
      if (this.#options.logLevel !== "none") console.error("[realtime]", error);
      return;
    }
    for (const handler of [...this.#errorHandlers]) {
      try {
        handler(error);
      } catch (thrown) {
        // An error handler that throws has nowhere left to report to.
        if (this.#options.logLevel !== "none") console.error("[realtime] an error handler threw", thrown);
      }
    }
  }

  #subscribe<H>(handlers: Set<H>, handler: H): () => void {
    handlers.add(handler);
    return () => handlers.delete(handler);
  }
}
