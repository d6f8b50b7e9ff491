// Entry point: picks the view from the URL hash and connects it to the hub.
//
//   #/dispatcher?regions=west,east
//   #/contractor?id=<contractor uuid>
//
// Anything else shows a landing page with links to both views.

import { RealtimeClient } from "@smartscheduler/realtime";
import { api } from "./api.js";
import { mountContractor } from "./contractor.js";
import { mountDispatcher } from "./dispatcher.js";
import { h, mountShell } from "./dom.js";

async function main(): Promise<void> {
  const root = document.getElementById("app");
  if (!root) throw new Error("index.html has no #app element");
  // A different view needs a different token and groups: start over.
  window.addEventListener("hashchange", () => location.reload());

  const [path = "", query = ""] = location.hash.replace(/^#/, "").split("?");
  const params = new URLSearchParams(query);

  if (path === "/dispatcher") {
    const regions = (params.get("regions") ?? "").split(",").map((r) => r.trim()).filter(Boolean);
    const shell = mountShell(root, `Dispatcher · ${regions.join(", ") || "no region"}`);
    if (regions.length === 0) return shell.showError("add ?regions=west,east to the URL");
    const client = await connect(shell, () => api.dispatcherToken(regions));
    mountDispatcher(shell, client, regions);
  } else if (path === "/contractor") {
    const id = (params.get("id") ?? "").toLowerCase();
    const shell = mountShell(root, "Contractor");
    if (!id) return shell.showError("add ?id=<contractor id> to the URL");
    const client = await connect(shell, () => api.contractorToken(id));
    mountContractor(shell, client, id);
  } else {
    await landing(root);
  }
}

/** A client for the hub named by the backend, with the indicator and error banner wired. */
async function connect(shell: ReturnType<typeof mountShell>, token: () => Promise<string>): Promise<RealtimeClient> {
  const { hubUrl } = await api.config();
  const client = new RealtimeClient({ url: hubUrl, accessTokenFactory: token, logLevel: "warning" });
  client.onStateChange((state, error) => {
    shell.setState(state);
    if (error) console.warn("realtime:", state, error);
  });
  client.onError((error) => {
    console.error("realtime:", error);
    shell.showError(error);
  });
  shell.setState(client.state);
  // For browser tests and debugging.
  (window as unknown as { realtime: RealtimeClient }).realtime = client;
  return client;
}

async function landing(root: HTMLElement): Promise<void> {
  const contractors = await api.contractors();
  const regions = [...new Set(contractors.map((c) => c.region))];
  root.replaceChildren(
    h("header", {}, h("h1", {}, "SmartScheduler console")),
    h(
      "main",
      { class: "landing" },
      h("h2", {}, "Dispatcher"),
      h("ul", {}, ...[regions.join(","), ...regions].map((r) => h("li", {}, h("a", { href: `#/dispatcher?regions=${r}` }, r)))),
      h("h2", {}, "Contractor"),
      h(
        "ul",
        {},
        ...contractors.map((c) => h("li", {}, h("a", { href: `#/contractor?id=${c.contractorId}` }, `${c.name} (${c.region})`))),
      ),
    ),
  );
}

main().catch((error: unknown) => {
  console.error(error);
  const root = document.getElementById("app");
  root?.append(h("div", { class: "error", "data-testid": "error" }, error instanceof Error ? error.message : String(error)));
});
