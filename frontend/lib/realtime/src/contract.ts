/**
 * The event contract (docs/events.md): the two event types, group names and positions, and the
 * checks an incoming payload must pass before a handler sees it.
 *
 * Pure: no I/O, no SignalR. Unknown fields are kept (a newer backend may add some); a payload
 * that misses a required field or has one of the wrong type is refused with a message naming it.
 */

/** Recommendations for a job were computed or refreshed: refetch the ranked list over HTTP. */
export interface RecommendationReady {
  type: "RecommendationReady";
  jobId: string;
  requestId: string;
  region: string;
  configVersion: number;
  /** ISO 8601, UTC, "Z". */
  generatedAt: string;
  [extra: string]: unknown;
}

/** A job was assigned: job views, contractor cards and calendars update. */
export interface JobAssigned {
  type: "JobAssigned";
  jobId: string;
  contractorId: string;
  assignmentId: string;
  /** ISO 8601, UTC, "Z". */
  startUtc: string;
  /** ISO 8601, UTC, "Z", after startUtc. */
  endUtc: string;
  region: string;
  source: "auto" | "manual";
  auditId: string;
  [extra: string]: unknown;
}

/** Any event the gateway delivers. */
export type RealtimeEvent = RecommendationReady | JobAssigned;

/** The event types, which are also the SignalR targets. */
export type RealtimeEventType = RealtimeEvent["type"];

/** Where an event sits in its group's history: the history (`epoch`) and its number in it. */
export interface Position {
  group: string;
  epoch: string;
  seq: number;
}

/** What a successful join resolves with: the group's current position, and whether a resume worked. */
export interface JoinResult {
  group: string;
  epoch: string;
  seq: number;
  recovered?: boolean;
}

/** The event types in the order the client subscribes to them. */
export const EVENT_TYPES: readonly RealtimeEventType[] = ["RecommendationReady", "JobAssigned"];

/** The dispatch group of a region: "/dispatch/{region}" (regions are case-sensitive). */
export function groupOfDispatch(region: string): string {
  return `/dispatch/${region}`;
}

/** The contractor group of an id: "/contractor/{id}", lowercased as the gateway names it. */
export function groupOfContractor(id: string): string {
  return `/contractor/${id.toLowerCase()}`;
}

const UUID = /^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$/;
const UTC_TIMESTAMP = /^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?Z$/;
const REGION = /^[A-Za-z0-9._-]{1,64}$/;
const MAX_CONFIG_VERSION = 4_294_967_295;

type Check = (value: unknown) => string | undefined;

const uuid: Check = (value) =>
  typeof value !== "string" ? "must be a string" : UUID.test(value) ? undefined : "must be a hyphenated UUID";
const timestamp: Check = (value) => {
  if (typeof value !== "string") return "must be a string";
  if (!UTC_TIMESTAMP.test(value) || Number.isNaN(Date.parse(value))) return "must be an ISO 8601 UTC timestamp ending in Z";
  return undefined;
};
const region: Check = (value) =>
  typeof value !== "string"
    ? "must be a string"
    : REGION.test(value)
      ? undefined
      : "must be 1 to 64 characters of A-Z a-z 0-9 - _ .";
const configVersion: Check = (value) =>
  typeof value === "number" && Number.isInteger(value) && value >= 0 && value <= MAX_CONFIG_VERSION
    ? undefined
    : "must be a whole number from 0 to 4294967295";
const source: Check = (value) => (value === "auto" || value === "manual" ? undefined : 'must be "auto" or "manual"');

const FIELDS: Record<RealtimeEventType, Record<string, Check>> = {
  RecommendationReady: { jobId: uuid, requestId: uuid, region, configVersion, generatedAt: timestamp },
  JobAssigned: {
    jobId: uuid,
    contractorId: uuid,
    assignmentId: uuid,
    startUtc: timestamp,
    endUtc: timestamp,
    region,
    source,
    auditId: uuid,
  },
};

/** The outcome of checking a payload: the typed event, or why it was refused. */
export type Validated<T> = { ok: true; value: T } | { ok: false; error: string };

const isObject = (value: unknown): value is Record<string, unknown> =>
  typeof value === "object" && value !== null && !Array.isArray(value);

/**
 * Checks `payload` against the contract. The returned event is `payload` itself (unknown fields
 * kept, nothing copied).
 */
export function validateEvent(payload: unknown): Validated<RealtimeEvent> {
  if (!isObject(payload)) return { ok: false, error: "event is not a JSON object" };
  const type = payload["type"];
  if (type !== "RecommendationReady" && type !== "JobAssigned") {
    return { ok: false, error: `unknown event type ${JSON.stringify(type)}; expected RecommendationReady or JobAssigned` };
  }
  for (const [field, check] of Object.entries(FIELDS[type])) {
    const value = payload[field];
    if (value === undefined || value === null) return { ok: false, error: `${type}: field \`${field}\` is required` };
    const problem = check(value);
    if (problem !== undefined) return { ok: false, error: `${type}: field \`${field}\` ${problem}` };
  }
  if (type === "JobAssigned" && Date.parse(payload["endUtc"] as string) <= Date.parse(payload["startUtc"] as string)) {
    return { ok: false, error: "JobAssigned: field `endUtc` must be after startUtc" };
  }
  return { ok: true, value: payload as RealtimeEvent };
}

/** Checks an event's second argument: `{group, epoch, seq}` with a whole, non-negative `seq`. */
export function validatePosition(value: unknown): Validated<Position> {
  if (!isObject(value)) return { ok: false, error: "position is not an object" };
  const { group, epoch, seq } = value;
  if (typeof group !== "string" || group === "") return { ok: false, error: "position: `group` must be a non-empty string" };
  if (typeof epoch !== "string" || epoch === "") return { ok: false, error: "position: `epoch` must be a non-empty string" };
  if (typeof seq !== "number" || !Number.isSafeInteger(seq) || seq < 0) {
    return { ok: false, error: "position: `seq` must be a whole number >= 0" };
  }
  return { ok: true, value: { group, epoch, seq } };
}

/** Checks what a join resolved with: `{group, epoch, seq, recovered?}`. */
export function validateJoinResult(value: unknown): Validated<JoinResult> {
  const position = validatePosition(value);
  if (!position.ok) return { ok: false, error: position.error.replace(/^position/, "join result") };
  const recovered = (value as Record<string, unknown>)["recovered"];
  if (recovered !== undefined && typeof recovered !== "boolean") {
    return { ok: false, error: "join result: `recovered` must be a boolean" };
  }
  return { ok: true, value: recovered === undefined ? position.value : { ...position.value, recovered } };
}
