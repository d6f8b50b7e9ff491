// Valid events of both types, with fields to override.

export const recommendation = (extra: Record<string, unknown> = {}): Record<string, unknown> => ({
  type: "RecommendationReady",
  jobId: "7d9f4f3e-1c2b-4d5e-8f60-123456789abc",
  requestId: "0b1c2d3e-4f50-4a6b-9c8d-0e1f2a3b4c5d",
  region: "west",
  configVersion: 1,
  generatedAt: "2025-11-08T12:34:56Z",
  ...extra,
});

export const assignment = (extra: Record<string, unknown> = {}): Record<string, unknown> => ({
  type: "JobAssigned",
  jobId: "7d9f4f3e-1c2b-4d5e-8f60-123456789abc",
  contractorId: "11111111-2222-4333-8444-555555555555",
  assignmentId: "0b1c2d3e-4f50-4a6b-9c8d-0e1f2a3b4c5d",
  startUtc: "2025-11-08T15:00:00Z",
  endUtc: "2025-11-08T17:00:00.5Z",
  region: "west",
  source: "manual",
  auditId: "9a8b7c6d-5e4f-4321-8fed-cba987654321",
  ...extra,
});
