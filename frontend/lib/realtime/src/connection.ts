/**
 * The seam between the client and `@microsoft/signalr`: the few calls the client makes on a hub
 * connection, so tests can drive the client with an in-memory fake.
 *
 * The client does its own reconnecting (one policy for the first start and for every loss), so
 * the SignalR connection is built without automatic reconnect and simply started again. It is
 * built with stateful reconnect unless told otherwise: a WebSocket lost while connected is then
 * reopened by the SignalR client itself, on the same logical connection, and only a resume the
 * gateway refuses ends the connection (`onclose`), which is when the client's own loop takes over.
 */

import { HttpTransportType, HubConnectionBuilder, LogLevel } from "@microsoft/signalr";
import type { IHttpConnectionOptions } from "@microsoft/signalr";

/** Log levels the client accepts, mapped onto SignalR's. */
export type RealtimeLogLevel = "none" | "error" | "warning" | "information" | "debug";

/** What the client needs of a hub connection (`HubConnection` satisfies it). */
export interface HubConnectionLike {
  /** Connects; rejects if connecting failed. May be called again after the connection closed. */
  start(): Promise<void>;
  /** Closes the connection (also aborts a start in progress). */
  stop(): Promise<void>;
  /** Calls a hub method; rejects with the server's refusal or when the connection closes. */
  invoke(method: string, ...args: unknown[]): Promise<unknown>;
  /** Registers a handler for a server-to-client target. */
  on(target: string, handler: (...args: unknown[]) => void): void;
  /** Registers a callback for the end of a started connection (not for a failed start). */
  onclose(handler: (error?: Error) => void): void;
}

/** Options a connection is built from. */
export interface ConnectionOptions {
  url: string;
  accessTokenFactory: () => string | Promise<string>;
  skipNegotiation?: boolean;
  /** Build with `withStatefulReconnect()` (default true). Needs negotiation; ignored without it. */
  statefulReconnect?: boolean;
  logLevel?: RealtimeLogLevel;
}

/** Builds the hub connection a client uses; tests pass a fake. */
export type ConnectionFactory = (options: ConnectionOptions) => HubConnectionLike;

const LOG_LEVELS: Record<RealtimeLogLevel, LogLevel> = {
  none: LogLevel.None,
  error: LogLevel.Error,
  warning: LogLevel.Warning,
  information: LogLevel.Information,
  debug: LogLevel.Debug,
};

/**
 * A `@microsoft/signalr` hub connection without automatic reconnect, with stateful reconnect
 * unless `statefulReconnect` is false.
 */
export const signalRConnection: ConnectionFactory = (options) => {
  const http: IHttpConnectionOptions = { accessTokenFactory: options.accessTokenFactory };
  if (options.skipNegotiation === true) {
    http.skipNegotiation = true;
    http.transport = HttpTransportType.WebSockets;
  }
  const builder = new HubConnectionBuilder().withUrl(options.url, http).configureLogging(LOG_LEVELS[options.logLevel ?? "warning"]);
  // Stateful reconnect is agreed in negotiate's answer: without negotiation the flag is inert.
  if (options.statefulReconnect !== false) builder.withStatefulReconnect();
  return builder.build();
};
