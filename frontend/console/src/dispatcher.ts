// The dispatcher view: the jobs of the dispatcher's regions and the recommendations sheet of the
// selected job. Events only say what changed: `JobAssigned` updates a row in place, and
// `RecommendationReady` for the selected job makes the sheet fetch the ranked list over HTTP.

import type { JobAssigned, RealtimeClient, RealtimeEvent } from "@smartscheduler/realtime";
import { api, type Job, type Recommendations } from "./api.js";
import { FrameBatch } from "./batch.js";
import { formatSlot, h, type Shell } from "./dom.js";

type SheetState = "empty" | "requested" | "loading" | "loaded" | "error";

export function mountDispatcher(shell: Shell, client: RealtimeClient, regions: string[]): void {
  const jobs = new Map<string, Job>();
  /** Per job, the batch count when an event last changed it: newer than a fetch still in flight. */
  const touched = new Map<string, number>();
  const rows = new Map<string, HTMLLIElement>();
  const names = new Map<string, string>();
  let selected: string | undefined;

  const list = h("ul", { class: "jobs", "data-testid": "job-list" });
  const sheet = h("section", { class: "sheet", "data-testid": "recommendations-sheet", "data-state": "empty" });
  shell.main.replaceChildren(h("div", { class: "dispatcher" }, h("section", {}, h("h2", {}, "Jobs"), list), sheet));

  // --- Jobs -------------------------------------------------------------------------------------

  function renderRow(job: Job): void {
    let row = rows.get(job.jobId);
    if (!row) {
      row = h("li", { "data-testid": "job-row", "data-job-id": job.jobId, tabindex: "0" });
      row.addEventListener("click", () => select(job.jobId));
      row.addEventListener("keydown", (e) => e.key === "Enter" && select(job.jobId));
      rows.set(job.jobId, row);
    }
    row.dataset.status = job.status;
    row.classList.toggle("selected", job.jobId === selected);
    const who = job.contractorId ? `${names.get(job.contractorId) ?? job.contractorId} · ${formatSlot(job.startUtc, job.endUtc)}` : "";
    row.replaceChildren(
      h("span", { class: "title" }, job.title),
      h("span", { class: "region" }, job.region),
      h("span", { class: `status ${job.status}`, "data-testid": "job-status" }, job.status),
      h("span", { class: "who", "data-testid": "job-contractor" }, who),
    );
  }

  function renderList(): void {
    const ordered = [...jobs.values()].sort((a, b) => a.region.localeCompare(b.region) || a.title.localeCompare(b.title));
    for (const job of ordered) renderRow(job);
    list.replaceChildren(...ordered.map((job) => rows.get(job.jobId)!));
  }

  let batches = 0;
  async function loadJobs(): Promise<void> {
    const startedAt = batches;
    try {
      const fresh = await api.jobs(regions);
      const previous = new Map(jobs);
      jobs.clear();
      for (const job of fresh) {
        // An event applied after this fetch started is newer than the answer: keep it.
        const local = previous.get(job.jobId);
        jobs.set(job.jobId, local && (touched.get(job.jobId) ?? -1) > startedAt ? local : job);
      }
      renderList();
    } catch (error) {
      shell.showError(error);
    }
  }

  // --- Recommendations sheet --------------------------------------------------------------------

  let sheetFetch: Promise<void> | undefined;
  let fetchAgain = false;

  function select(jobId: string): void {
    if (selected === jobId) return;
    rows.get(selected ?? "")?.classList.remove("selected");
    selected = jobId;
    rows.get(jobId)?.classList.add("selected");
    renderSheet("loading");
    void refreshSheet();
  }

  /** Fetches the selected job's latest ranked list; calls made meanwhile coalesce into one more fetch. */
  async function refreshSheet(): Promise<void> {
    if (sheetFetch) {
      fetchAgain = true;
      return sheetFetch;
    }
    const jobId = selected;
    if (!jobId) return;
    sheetFetch = (async () => {
      try {
        const recommendations = await api.recommendations(jobId);
        if (selected === jobId) renderSheet("loaded", recommendations);
      } catch (error) {
        if (selected !== jobId) return;
        if ((error as { status?: number }).status === 404) renderSheet("empty");
        else renderSheet("error", undefined, error);
      }
    })();
    await sheetFetch;
    sheetFetch = undefined;
    if (fetchAgain) {
      fetchAgain = false;
      await refreshSheet();
    }
  }

  function renderSheet(state: SheetState, recommendations?: Recommendations, error?: unknown): void {
    const job = selected ? jobs.get(selected) : undefined;
    sheet.dataset.state = state;
    sheet.dataset.jobId = selected ?? "";
    sheet.dataset.requestId = recommendations?.requestId ?? "";
    if (!job) {
      sheet.replaceChildren(h("h2", {}, "Recommendations"), h("p", { class: "hint" }, "Select a job."));
      return;
    }
    const button = h("button", { "data-testid": "get-recommendations" }, "Get recommendations");
    button.addEventListener("click", async () => {
      button.disabled = true;
      try {
        const { requestId } = await api.requestRecommendations(job.jobId);
        // The sheet refreshes when RecommendationReady for this job arrives. The backend
        // publishes before it answers, so the event (and the fetch it starts) may already have
        // loaded this very request; and the user may have selected another job meanwhile.
        if (selected !== job.jobId || sheet.dataset.requestId === requestId) return;
        if (sheet.dataset.state !== "loaded") renderSheet("requested");
        else sheet.dataset.state = "requested";
      } catch (e) {
        shell.showError(e);
      } finally {
        button.disabled = false;
      }
    });
    const body: Node[] = [];
    if (state === "loaded" && recommendations) {
      body.push(
        h(
          "ol",
          { class: "ranked" },
          ...recommendations.ranked.map((r) => {
            const assign = h("button", { "data-testid": "assign", "data-contractor-id": r.contractorId }, "Assign");
            assign.addEventListener("click", async () => {
              assign.disabled = true;
              assign.textContent = "Assigning…";
              try {
                await api.assign(job.jobId, r.contractorId);
              } catch (e) {
                shell.showError(e);
              } finally {
                assign.disabled = false;
                assign.textContent = "Assign";
              }
            });
            return h(
              "li",
              { "data-testid": "ranked-contractor", "data-contractor-id": r.contractorId },
              h("span", { class: "name" }, r.name),
              h("span", { class: "score" }, String(r.score)),
              assign,
            );
          }),
        ),
      );
    } else {
      const text: Record<SheetState, string> = {
        empty: "No recommendations yet.",
        requested: "Computing recommendations…",
        loading: "Loading…",
        loaded: "",
        error: `Could not load recommendations: ${error instanceof Error ? error.message : String(error)}`,
      };
      body.push(h("p", { class: "hint" }, text[state]));
    }
    sheet.replaceChildren(h("h2", {}, "Recommendations"), h("p", { class: "job-title" }, job.title, " ", button), ...body);
  }

  // --- Events -----------------------------------------------------------------------------------

  const batch = new FrameBatch<RealtimeEvent>((events) => {
    batches += 1;
    const changed = new Set<string>();
    let refresh = false;
    for (const event of events) {
      if (event.type === "JobAssigned") {
        if (applyAssigned(event)) changed.add(event.jobId);
      } else if (event.jobId === selected) {
        refresh = true;
      }
    }
    for (const jobId of changed) {
      touched.set(jobId, batches);
      const job = jobs.get(jobId);
      if (job) renderRow(job);
    }
    if (refresh) void refreshSheet();
  }, shell.counter);

  function applyAssigned(event: JobAssigned): boolean {
    const job = jobs.get(event.jobId);
    if (!job) {
      // A job this page has not loaded yet (created after the last fetch): reload the list.
      if (regions.includes(event.region)) void loadJobs();
      return false;
    }
    jobs.set(event.jobId, {
      ...job,
      status: "assigned",
      contractorId: event.contractorId,
      assignmentId: event.assignmentId,
      startUtc: event.startUtc,
      endUtc: event.endUtc,
    });
    return true;
  }

  client.on("JobAssigned", (event) => batch.push(event));
  client.on("RecommendationReady", (event) => batch.push(event));
  client.onResyncRequired(() => {
    void loadJobs();
    void refreshSheet();
  });

  // --- Start ------------------------------------------------------------------------------------

  renderSheet("empty");
  void api.contractors().then(
    (all) => {
      for (const c of all) names.set(c.contractorId, c.name);
      renderList();
    },
    (e: unknown) => shell.showError(e),
  );
  void loadJobs();
  const joined = Promise.all(regions.map((region) => client.joinDispatch(region)));
  client.start().catch((e: unknown) => shell.showError(e));
  // Events flow from the join position on; reload once so nothing between the first fetch and
  // the join is missed.
  joined.then(() => loadJobs(), (e: unknown) => shell.showError(e));
}
