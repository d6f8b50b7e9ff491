// Tiny DOM helpers shared by the views: element creation and the page shell.

import type { ConnectionState } from "@smartscheduler/realtime";

type Attrs = Record<string, string | undefined>;

/** Creates `<tag>` with attributes (`data-*` included; undefined ones skipped) and children. */
export function h<K extends keyof HTMLElementTagNameMap>(
  tag: K,
  attrs: Attrs = {},
  ...children: (Node | string)[]
): HTMLElementTagNameMap[K] {
  const element = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (value !== undefined) element.setAttribute(name, value);
  }
  element.append(...children);
  return element;
}

/** The parts every view shares: a header with the connection indicator and the event counter. */
export interface Shell {
  main: HTMLElement;
  counter: HTMLElement;
  setState(state: ConnectionState): void;
  showError(error: unknown): void;
}

export function mountShell(root: HTMLElement, title: string): Shell {
  const indicator = h("span", { class: "indicator", "data-testid": "connection-indicator", "data-state": "disconnected" }, "disconnected");
  const counter = h("span", { "data-testid": "events-applied", "data-count": "0" }, "0");
  const error = h("div", { class: "error", "data-testid": "error", hidden: "" });
  const main = h("main");
  root.replaceChildren(
    h("header", {}, h("h1", {}, title), h("span", { class: "spacer" }), h("span", { class: "counter" }, "events applied: ", counter), indicator),
    error,
    main,
  );
  return {
    main,
    counter,
    setState(state) {
      indicator.dataset.state = state;
      indicator.textContent = state;
    },
    showError(e) {
      error.hidden = false;
      error.textContent = e instanceof Error ? e.message : String(e);
    },
  };
}

export function formatSlot(startUtc?: string, endUtc?: string): string {
  if (!startUtc || !endUtc) return "";
  const start = new Date(startUtc);
  const end = new Date(endUtc);
  const day = start.toLocaleDateString(undefined, { weekday: "short", month: "short", day: "numeric" });
  const time = (d: Date) => d.toLocaleTimeString(undefined, { hour: "2-digit", minute: "2-digit" });
  return `${day} ${time(start)}–${time(end)}`;
}
