// The contractor view: the contractor's schedule as cards. `JobAssigned` for this contractor adds
// or moves a card at once (from the event's own fields), then the schedule is refetched over HTTP
// for the details the event does not carry (the job's title).

import type { JobAssigned, RealtimeClient } from "@smartscheduler/realtime";
import { api, type Job } from "./api.js";
import { FrameBatch } from "./batch.js";
import { formatSlot, h, type Shell } from "./dom.js";

export function mountContractor(shell: Shell, client: RealtimeClient, contractorId: string): void {
  const cards = new Map<string, Job>();
  const list = h("section", { class: "cards", "data-testid": "schedule" });
  const heading = h("h2", {}, "Schedule");
  shell.main.replaceChildren(heading, list);

  function render(): void {
    const ordered = [...cards.values()].sort((a, b) => (a.startUtc ?? "").localeCompare(b.startUtc ?? ""));
    list.replaceChildren(
      ...(ordered.length === 0
        ? [h("p", { class: "hint", "data-testid": "schedule-empty" }, "Nothing assigned yet.")]
        : ordered.map((job) =>
            h(
              "article",
              { class: "card", "data-testid": "schedule-card", "data-job-id": job.jobId, "data-assignment-id": job.assignmentId },
              h("h3", {}, job.title),
              h("p", { class: "slot" }, formatSlot(job.startUtc, job.endUtc)),
              h("p", { class: "region" }, job.region),
            ),
          )),
    );
  }

  let loading: Promise<void> | undefined;
  let loadAgain = false;
  /** Refetches the schedule; calls made meanwhile coalesce into one more fetch. */
  async function load(): Promise<void> {
    if (loading) {
      loadAgain = true;
      return loading;
    }
    loading = (async () => {
      try {
        const schedule = await api.schedule(contractorId);
        // Cards added by events stay until the backend's answer includes them.
        const fromEvents = [...cards.values()].filter((job) => !schedule.some((s) => s.jobId === job.jobId));
        cards.clear();
        for (const job of [...schedule, ...fromEvents]) cards.set(job.jobId, job);
        render();
      } catch (error) {
        shell.showError(error);
      }
    })();
    await loading;
    loading = undefined;
    if (loadAgain) {
      loadAgain = false;
      await load();
    }
  }

  const batch = new FrameBatch<JobAssigned>((events) => {
    let unknown = false;
    for (const event of events) {
      // The group carries only this contractor's assignments; the check guards a misrouted event.
      if (event.contractorId.toLowerCase() !== contractorId) continue;
      const known = cards.get(event.jobId);
      unknown ||= !known;
      cards.set(event.jobId, {
        jobId: event.jobId,
        region: event.region,
        title: known?.title ?? "New assignment",
        status: "assigned",
        contractorId: event.contractorId,
        assignmentId: event.assignmentId,
        startUtc: event.startUtc,
        endUtc: event.endUtc,
      });
    }
    render();
    if (unknown) void load();
  }, shell.counter);

  client.on("JobAssigned", (event) => batch.push(event));
  client.onResyncRequired(() => void load());

  void api.contractors().then(
    (all) => {
      const me = all.find((c) => c.contractorId === contractorId);
      heading.textContent = me ? `Schedule · ${me.name} (${me.region})` : "Schedule";
    },
    (e: unknown) => shell.showError(e),
  );
  void load();
  const joined = client.joinContractor(contractorId);
  client.start().catch((e: unknown) => shell.showError(e));
  joined.then(() => load(), (e: unknown) => shell.showError(e));
}
