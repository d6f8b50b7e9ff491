/**
 * `@smartscheduler/realtime`: a typed client of the SmartScheduler real-time gateway on top of
 * the official `@microsoft/signalr` client. See README.md.
 */

export type { RecommendationReady, JobAssigned, RealtimeEvent, RealtimeEventType, Position, JoinResult } from "./contract.js";
export { groupOfDispatch, groupOfContractor, validateEvent } from "./contract.js";
export type { ResyncReason } from "./sequencer.js";
export type { ReconnectPolicy } from "./backoff.js";
export type { ConnectionState, RealtimeOptions, ClientInternals } from "./client.js";
export { RealtimeClient } from "./client.js";
export type { HubConnectionLike, ConnectionFactory, ConnectionOptions, RealtimeLogLevel } from "./connection.js";
