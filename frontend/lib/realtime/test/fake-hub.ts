// An in-memory stand-in for a SignalR hub connection, driven by the tests: they decide how each
// start() ends, answer each invoke(), deliver events and close the connection.

import type { ConnectionFactory, HubConnectionLike } from "../src/connection.js";

export interface Deferred<T> {
  promise: Promise<T>;
  resolve: (value: T) => void;
  reject: (error: unknown) => void;
}

export function deferred<T>(): Deferred<T> {
  let resolve!: (value: T) => void;
  let reject!: (error: unknown) => void;
  const promise = new Promise<T>((res, rej) => {
    resolve = res;
    reject = rej;
  });
  return { promise, resolve, reject };
}

/** One invoke() the test has to answer. */
export interface Call {
  method: string;
  args: unknown[];
  reply: Deferred<unknown>;
}

/** A waiter for the n-th item of a growing list. */
class Queue<T> {
  readonly items: T[] = [];
  readonly #waiters: Array<{ index: number; resolve: (item: T) => void }> = [];

  push(item: T): void {
    this.items.push(item);
    for (const waiter of [...this.#waiters]) {
      const found = this.items[waiter.index];
      if (found !== undefined) {
        this.#waiters.splice(this.#waiters.indexOf(waiter), 1);
        waiter.resolve(found);
      }
    }
  }

  /** The item at `index` (0-based), once it exists. */
  at(index: number): Promise<T> {
    const found = this.items[index];
    if (found !== undefined) return Promise.resolve(found);
    return new Promise((resolve) => this.#waiters.push({ index, resolve }));
  }
}

export class FakeHub implements HubConnectionLike {
  /** Each start() call, which the test settles. */
  readonly starts = new Queue<Deferred<void>>();
  /** Each invoke() call, which the test answers. */
  readonly calls = new Queue<Call>();
  connected = false;
  readonly #handlers = new Map<string, Array<(...args: unknown[]) => void>>();
  readonly #onclose: Array<(error?: Error) => void> = [];
  #pending: Call[] = [];

  start(): Promise<void> {
    const attempt = deferred<void>();
    this.starts.push(attempt);
    return attempt.promise.then(() => {
      this.connected = true;
    });
  }

  async stop(): Promise<void> {
    if (this.connected) this.close(undefined);
  }

  invoke(method: string, ...args: unknown[]): Promise<unknown> {
    if (!this.connected) return Promise.reject(new Error("Cannot send data if the connection is not in the 'Connected' State."));
    const call: Call = { method, args, reply: deferred() };
    this.#pending.push(call);
    this.calls.push(call);
    return call.reply.promise;
  }

  on(target: string, handler: (...args: unknown[]) => void): void {
    const key = target.toLowerCase();
    this.#handlers.set(key, [...(this.#handlers.get(key) ?? []), handler]);
  }

  onclose(handler: (error?: Error) => void): void {
    this.#onclose.push(handler);
  }

  /** Delivers an invocation from the server, as SignalR does (case-insensitive target). */
  emit(target: string, ...args: unknown[]): void {
    for (const handler of this.#handlers.get(target.toLowerCase()) ?? []) handler(...args);
  }

  /** Ends the connection as SignalR does: pending invocations fail, then onclose runs. */
  close(error: Error | undefined): void {
    this.connected = false;
    for (const call of this.#pending.splice(0)) call.reply.reject(new Error("Invocation canceled due to the underlying connection being closed."));
    for (const handler of this.#onclose) handler(error);
  }
}

/** A connection factory that hands out `hub`. */
export const factoryOf = (hub: FakeHub): ConnectionFactory => () => hub;

/** Lets pending promise callbacks run. */
export const settle = (): Promise<void> => new Promise((resolve) => setImmediate(resolve));
