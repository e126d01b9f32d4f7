// The organization's alerts, live: every alert change is published on {device}/alerts, so the
// feed watches +/alerts and rereads the list (the REST list is the truth: acknowledgements
// and resolutions of other users included). Acknowledge; filter by severity and state.
import * as api from "../api.js";
import { badge, field, fill, h, notice, num, select, timeEl } from "../dom.js";

export const SEVERITIES = ["critical", "major", "minor", "warning", "info"];
const LIMIT = 100;
const SETTLE_MS = 150; // a burst of alert messages causes one reread

export function renderAlerts(ctx) {
  const severity = select([["", "any severity"], ...SEVERITIES.map((s) => [s, s])], "", { id: "alert-severity" });
  const stateSel = select([["firing", "firing"], ["", "all (newest first)"], ["resolved", "resolved"]], "firing",
    { id: "alert-state" });
  const msg = h("div");
  const list = h("ul", { class: "alerts", "aria-label": "Alerts" });
  const summary = h("p", { class: "muted", "aria-live": "polite" });
  const el = h("section", { class: "stack alerts-page", "aria-labelledby": "alerts-title", dataset: { live: "false" } },
    h("h1", { id: "alerts-title" }, "Alerts"),
    h("form", { class: "filters", onsubmit: (ev) => ev.preventDefault() },
      field("Severity", severity), field("State", stateSel)),
    summary, msg, list);
  let generation = 0;
  let timer = null;

  function item(a) {
    const canAck = ctx.can("alerts.acknowledge");
    const ack = a.acknowledged_at
      ? h("span", { class: "ack" }, "acknowledged by ", a.acknowledged_by || "someone", " ", timeEl(a.acknowledged_at, true))
      : canAck
        ? h("button", { type: "button", class: "ack-button", onclick: () => acknowledge(a.id),
          "aria-label": `Acknowledge ${a.rule} on ${a.device}` }, "Acknowledge")
        : h("span", { class: "muted" }, "not acknowledged");
    return h("li", { class: `alert sev-${a.severity}`, dataset: { alertId: String(a.id), state: a.state } },
      h("div", { class: "alert-head" },
        badge(a.severity, a.severity), " ", badge(a.state, a.state), " ",
        h("strong", {}, a.rule), " on ",
        h("a", { href: `#/o/${encodeURIComponent(ctx.org)}/devices/${encodeURIComponent(a.device)}` }, a.device)),
      h("div", { class: "alert-body" },
        a.metric ? [h("code", {}, a.metric), " = ", num(a.value), " · "] : [a.kind, " · "],
        "fired ", timeEl(a.fired_at, true),
        a.resolved_at ? [" · resolved ", timeEl(a.resolved_at, true), a.resolved_reason ? ` (${a.resolved_reason})` : ""] : null),
      h("div", { class: "alert-ack" }, ack));
  }

  async function load() {
    generation += 1;
    const gen = generation;
    try {
      const alerts = await api.get(api.orgPath(ctx.org, "alerts"),
        { state: stateSel.value, severity: severity.value, limit: LIMIT });
      if (gen !== generation) return;
      fill(msg);
      fill(list, alerts.map(item));
      const firing = alerts.filter((a) => a.state === "firing").length;
      summary.textContent = alerts.length
        ? `${alerts.length} alert${alerts.length === 1 ? "" : "s"}${stateSel.value === "" ? `, ${firing} firing` : ""}`
        : "No alerts match.";
      el.dataset.loaded = "true";
    } catch (exc) {
      if (gen === generation) fill(msg, notice("error", `Could not load the alerts: ${exc.message}`));
    }
  }

  function soon() {
    clearTimeout(timer);
    timer = setTimeout(load, SETTLE_MS);
  }

  async function acknowledge(id) {
    try {
      await api.post(api.orgPath(ctx.org, "alerts", String(id), "acknowledge"));
      await load();
      const next = list.querySelector("button.ack-button");
      (next || list).focus?.();
    } catch (exc) {
      fill(msg, notice("error", exc.message));
    }
  }

  severity.addEventListener("change", load);
  stateSel.addEventListener("change", load);
  const stop = ctx.stream.subscribe("+/alerts", soon, soon);
  const stopState = ctx.stream.onState(() => { el.dataset.live = String(ctx.stream.isLive(["+/alerts"])); });
  el.dataset.live = String(ctx.stream.isLive(["+/alerts"]));
  load();
  return {
    el,
    dispose() {
      stop();
      stopState();
      clearTimeout(timer);
    },
  };
}
