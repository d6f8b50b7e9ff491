// The demo backend's HTTP API (tools/demo-backend), same origin as the page.

export type JobStatus = "open" | "assigned";

export interface Job {
  jobId: string;
  region: string;
  title: string;
  status: JobStatus;
  contractorId?: string;
  assignmentId?: string;
  startUtc?: string;
  endUtc?: string;
}

export interface Contractor {
  contractorId: string;
  name: string;
  region: string;
}

export interface Ranked {
  contractorId: string;
  name: string;
  score: number;
}

export interface Recommendations {
  jobId: string;
  requestId: string;
  ranked: Ranked[];
}

/** An answer other than 2xx; `message` is the backend's `{"error"}` text when it sent one. */
export class ApiError extends Error {
  constructor(
    readonly status: number,
    message: string,
  ) {
    super(message);
    this.name = "ApiError";
  }
}

async function call<T>(path: string, init?: RequestInit): Promise<T> {
  const response = await fetch(path, {
    ...init,
    headers: { Accept: "application/json", ...(init?.body ? { "Content-Type": "application/json" } : {}) },
  });
  const text = await response.text();
  let body: unknown;
  try {
    body = text ? JSON.parse(text) : undefined;
  } catch {
    body = undefined;
  }
  if (!response.ok) {
    const error = (body as { error?: unknown } | undefined)?.error;
    throw new ApiError(response.status, `${init?.method ?? "GET"} ${path}: ${typeof error === "string" ? error : `HTTP ${response.status}`}`);
  }
  return body as T;
}

const post = <T>(path: string, body: unknown): Promise<T> => call<T>(path, { method: "POST", body: JSON.stringify(body) });
const q = encodeURIComponent;

export const api = {
  config: () => call<{ hubUrl: string }>("/api/config"),
  dispatcherToken: (regions: string[]) =>
    call<{ token: string }>(`/api/token?role=dispatcher&regions=${q(regions.join(","))}`).then((r) => r.token),
  contractorToken: (contractorId: string) =>
    call<{ token: string }>(`/api/token?role=contractor&contractorId=${q(contractorId)}`).then((r) => r.token),
  jobs: (regions: string[]) => call<Job[]>(`/api/jobs?region=${q(regions.join(","))}`),
  contractors: () => call<Contractor[]>("/api/contractors"),
  requestRecommendations: (jobId: string) => post<{ requestId: string }>("/api/recommendations", { jobId }),
  recommendations: (jobId: string) => call<Recommendations>(`/api/recommendations/${q(jobId)}`),
  assign: (jobId: string, contractorId: string) => post<{ assignmentId: string }>("/api/assign", { jobId, contractorId }),
  schedule: (contractorId: string) => call<Job[]>(`/api/schedule?contractorId=${q(contractorId)}`),
};
