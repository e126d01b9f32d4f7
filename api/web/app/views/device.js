// One device: a live chart per metric (history from readings/aggregate for 1 h / 24 h / 7 d
// / 30 d, then points from the stream; a gap refetches), the command panel, desired vs
// reported config, recent events and the alert history. One stream filter, `{device}/#`.
import * as api from "../api.js";
import { badge, field, fill, h, jsonText, notice, num, select, timeEl, when } from "../dom.js";
import { LineChart } from "../chart.js";
import { telemetryPoints } from "../stream.js";
import { credentialsBox } from "./common.js";

/** Range -> [span ms, bucket]: about 120-290 buckets each, so every range draws alike. */
export const RANGES = {
  "1h": [3600e3, "30s"],
  "24h": [86400e3, "5m"],
  "7d": [7 * 86400e3, "1h"],
  "30d": [30 * 86400e3, "4h"],
};
const UNIT_MS = { s: 1e3, m: 60e3, h: 3600e3, d: 86400e3 };
/** "5m" -> 300000. */
const bucketMs = (bucket) => Number(bucket.slice(0, -1)) * UNIT_MS[bucket.slice(-1)];
const CHARTS_AT_ONCE = 4;
const BUILTIN_COMMANDS = ["ping", "reboot"];
const EVENTS_SHOWN = 20;
const OPEN_STATES = new Set(["pending", "delivered"]);
const POLL_MS = 3000;

export function renderDevice(ctx, slug) {
  const base = api.orgPath(ctx.org, "devices", slug);
  const filter = `${slug}/#`;
  let range = sessionStorage.getItem("lms-range") || "24h";
  if (!RANGES[range]) range = "24h";
  let generation = 0; // a newer load makes an older one's answers stale
  const charts = new Map(); // metric -> {chart, fig, caption}
  const disposers = [];

  const head = h("div", { class: "device-header" });
  const headMsg = h("div");
  const chartsEl = h("div", { class: "charts", "aria-live": "off" });
  const chartsMsg = h("div");
  const rangeName = "range";
  const rangeGroup = h("fieldset", { class: "segmented" },
    h("legend", { class: "visually-hidden" }, "Time range"),
    Object.keys(RANGES).map((r) => {
      const id = `range-${r}`;
      return [h("input", { type: "radio", name: rangeName, id, value: r, checked: r === range,
        onchange: () => { range = r; sessionStorage.setItem("lms-range", r); loadCharts(); } }),
      h("label", { for: id }, r)];
    }));
  const commandsEl = h("section", { class: "card", "aria-labelledby": "cmd-title" });
  const configEl = h("section", { class: "card", "aria-labelledby": "cfg-title" });
  const eventsEl = h("section", { class: "card", "aria-labelledby": "ev-title" });
  const alertsEl = h("section", { class: "card", "aria-labelledby": "al-title" });
  const el = h("article", { class: "stack device-page", dataset: { device: slug, live: "false" } },
    head, headMsg,
    h("section", { "aria-labelledby": "charts-title", class: "stack" },
      h("div", { class: "title-row" }, h("h2", { id: "charts-title" }, "Telemetry"), rangeGroup),
      chartsMsg, chartsEl),
    h("div", { class: "grid2" }, commandsEl, configEl, eventsEl, alertsEl));

  // -- header ---------------------------------------------------------------------------
  let device = null;
  async function loadDevice() {
    try {
      device = await api.get(base);
      drawHead();
    } catch (exc) {
      fill(head, notice("error", exc.status === 404 ? `There is no device “${slug}”.` : exc.message));
    }
  }

  function drawHead() {
    const d = device;
    const admin = ctx.can("devices.write");
    fill(head,
      h("div", { class: "title-row" },
        h("h1", {}, h("span", { class: `dot ${d.enabled && d.status === "online" ? "on" : "off"}`, "aria-hidden": "true" }),
          d.name || d.slug),
        admin
          ? h("div", { class: "actions" },
            h("button", { type: "button", id: "rotate", onclick: rotate }, "Rotate credentials"),
            h("button", { type: "button", id: "toggle-enabled", class: d.enabled ? "danger" : "", onclick: toggle },
              d.enabled ? "Disable" : "Enable"))
          : null),
      h("p", { class: "meta" },
        h("span", { class: "muted" }, d.slug), " · ",
        d.enabled ? badge(d.status, d.status) : badge("disabled"), " · last seen ",
        d.last_seen_at ? timeEl(d.last_seen_at, true) : "never", " · topics ", h("code", {}, `${d.topic_prefix}/…`)),
      d.tags.length ? h("ul", { class: "tags", "aria-label": "tags" }, d.tags.map((t) => h("li", {}, t))) : null);
  }

  async function rotate() {
    if (!window.confirm(`Give ${slug} a new MQTT password? The old one stops working at once.`)) return;
    try {
      const creds = await api.post(`${base}/credentials`);
      fill(headMsg, credentialsBox(`New credentials of ${slug}`, creds));
    } catch (exc) {
      fill(headMsg, notice("error", exc.message));
    }
  }

  async function toggle() {
    const disabling = device.enabled;
    if (disabling && !window.confirm(`Disable ${slug}? The broker disconnects it and refuses it until enabled.`)) return;
    try {
      device = await api.post(`${base}/${disabling ? "disable" : "enable"}`);
      drawHead();
      fill(headMsg, notice("ok", disabling ? "Disabled." : "Enabled."));
    } catch (exc) {
      fill(headMsg, notice("error", exc.message));
    }
  }

  // -- charts ---------------------------------------------------------------------------
  function chartFor(metric) {
    let c = charts.get(metric);
    if (c) return c;
    const caption = h("figcaption", {}, h("span", { class: "metric" }, metric), h("span", { class: "last" }));
    const canvas = h("canvas", { role: "img", "aria-label": `${metric} over the last ${range}` });
    const fig = h("figure", { class: "chart", dataset: { metric, points: "0" } }, caption, canvas);
    // Keep the figures in metric order.
    const after = [...charts.keys()].sort().find((m) => m > metric);
    chartsEl.insertBefore(fig, after ? charts.get(after).fig : null);
    c = { chart: new LineChart(canvas, RANGES[range][0]), fig, caption, last: null };
    charts.set(metric, c);
    return c;
  }

  function setLast(c, t, v) {
    if (c.last && c.last.t > t) return;
    c.last = { t, v };
    fill(c.caption.querySelector(".last"), num(v), " ", h("time", { datetime: new Date(t).toISOString() },
      new Date(t).toLocaleTimeString()));
    c.fig.dataset.last = String(v);
  }

  async function loadMetric(metric, gen) {
    const [span, bucket] = RANGES[range];
    const to = new Date();
    // `from` on a bucket boundary: the server answers whole buckets from its rollups
    // (README "Rollups"); from any instant it reads raw rows around every boundary.
    const width = bucketMs(bucket);
    const from = new Date(Math.floor((to.getTime() - span) / width) * width);
    const buckets = await api.get(`${base}/readings/aggregate`, {
      metric, bucket, fn: ["avg", "min", "max"], from: from.toISOString(), to: to.toISOString(),
    });
    if (gen !== generation) return;
    const c = chartFor(metric);
    const points = buckets.filter((b) => b.avg !== null && b.avg !== undefined)
      .map((b) => ({ t: Date.parse(b.bucket), v: b.avg, lo: b.min, hi: b.max }));
    c.chart.setHistory(points, span);
    c.fig.querySelector("canvas").setAttribute("aria-label", `${metric} over the last ${range}: ${points.length} buckets` +
      (points.length ? `, from ${num(Math.min(...points.map((p) => p.lo ?? p.v)))} to ${num(Math.max(...points.map((p) => p.hi ?? p.v)))}` : ""));
    c.fig.dataset.points = String(points.length);
    c.fig.dataset.ready = "true";
  }

  async function loadCharts() {
    generation += 1;
    const gen = generation;
    fill(chartsMsg);
    for (const { chart, fig } of charts.values()) {
      chart.destroy();
      fig.remove();
    }
    charts.clear();
    el.dataset.chartsReady = "false";
    try {
      const latest = await api.get(`${base}/latest`);
      if (gen !== generation) return;
      const numeric = latest.filter((r) => r.value !== null && r.value !== undefined);
      const texts = latest.filter((r) => r.value === null || r.value === undefined);
      for (const r of numeric) setLast(chartFor(r.metric), Date.parse(r.time), r.value);
      if (texts.length) {
        chartsMsg.appendChild(h("dl", { class: "values text-values", "aria-label": "text values" },
          texts.map((r) => h("div", {}, h("dt", {}, r.metric), h("dd", {}, r.text ?? "")))));
      }
      if (!latest.length) chartsMsg.appendChild(notice("info", "No readings yet: charts appear with the first value."));
      // The first chart alone (it is what a person waits for), then the others, a few at once:
      // the database aggregates on the same cores either way.
      const metrics = numeric.map((r) => r.metric).sort();
      if (metrics.length) await loadMetric(metrics[0], gen);
      firstChart();
      await api.pool(metrics.slice(1), CHARTS_AT_ONCE, (m) => loadMetric(m, gen));
      if (gen === generation) {
        el.dataset.chartsReady = "true";
        performance.mark("lms:charts-loaded");
      }
    } catch (exc) {
      if (gen === generation) fill(chartsMsg, notice("error", `Could not load the readings: ${exc.message}`));
    } finally {
      firstChart();
    }
  }

  function telemetry(frame) {
    for (const [t, metric, v] of telemetryPoints(frame)) {
      const known = charts.has(metric);
      const c = chartFor(metric);
      if (!known) c.fig.dataset.ready = "true";
      c.chart.add(t, v);
      c.fig.dataset.points = String(Number(c.fig.dataset.points || 0) + 1);
      setLast(c, t, v);
    }
    if (device) {
      device.last_seen_at = new Date(frame.received_at).toISOString();
    }
  }

  // -- commands -------------------------------------------------------------------------
  const commandRows = new Map(); // id -> {cmd, el}
  const commandList = h("ul", { class: "commands", "aria-label": "Recent commands" });
  const commandMsg = h("div");

  function commandRow(cmd) {
    const reply = cmd.reply;
    return h("li", { class: "command", dataset: { commandId: String(cmd.id), state: cmd.state } },
      h("div", { class: "command-head" },
        h("code", {}, cmd.name), " ", badge(cmd.state, cmd.state), " ",
        h("span", { class: "muted" }, `#${cmd.id} · `, timeEl(cmd.created_at, true))),
      Object.keys(cmd.params || {}).length ? h("pre", { class: "params" }, jsonText(cmd.params)) : null,
      reply && reply.result !== null && reply.result !== undefined
        ? h("div", { class: "result" }, h("span", { class: "muted" }, "result "), h("pre", {}, jsonText(reply.result)))
        : null,
      cmd.error ? h("p", { class: "error-text" }, cmd.error) : null);
  }

  function showCommand(cmd) {
    const old = commandRows.get(cmd.id);
    const row = commandRow(cmd);
    if (old) old.el.replaceWith(row);
    else commandList.prepend(row);
    commandRows.set(cmd.id, { cmd, el: row });
  }

  async function loadCommands() {
    try {
      const cmds = await api.get(`${base}/commands`, { limit: 10 });
      commandRows.clear();
      commandList.replaceChildren();
      for (const cmd of cmds.reverse()) showCommand(cmd);
    } catch (exc) {
      fill(commandMsg, notice("error", exc.message));
    }
  }

  async function refreshCommand(id) {
    try {
      showCommand(await api.get(`${base}/commands/${id}`));
    } catch (exc) {
      if (exc.status !== 404) fill(commandMsg, notice("error", exc.message));
    }
  }

  function drawCommands() {
    const parts = [h("h2", { id: "cmd-title" }, "Commands")];
    if (ctx.can("commands.send")) {
      const name = select([...BUILTIN_COMMANDS.map((c) => [c, c]), ["", "other…"]], "ping", { id: "command-name" });
      const other = h("input", { type: "text", id: "command-other", pattern: "[A-Za-z0-9_.:-]{1,64}", autocomplete: "off" });
      const otherField = field("Command name", other);
      otherField.hidden = true;
      name.addEventListener("change", () => { otherField.hidden = name.value !== ""; });
      const params = h("textarea", { id: "command-params", rows: 2, spellcheck: "false" }, "{}");
      const ttl = h("input", { type: "number", id: "command-ttl", min: 1, max: 86400, value: 60 });
      const form = h("form", { class: "command-form", "aria-label": "Send a command" },
        field("Command", name), otherField, field("Parameters (JSON object)", params), field("Time to live (s)", ttl),
        h("button", { type: "submit", class: "primary", id: "send-command" }, "Send"));
      form.addEventListener("submit", async (ev) => {
        ev.preventDefault();
        fill(commandMsg);
        let p;
        try {
          p = JSON.parse(params.value || "{}");
          if (!p || typeof p !== "object" || Array.isArray(p)) throw new Error("not an object");
        } catch {
          fill(commandMsg, notice("error", "Parameters must be a JSON object, e.g. {\"n\": 1}."));
          return;
        }
        try {
          const cmd = await api.post(`${base}/commands`,
            { name: name.value || other.value.trim(), params: p, ttl_seconds: Number(ttl.value) || 60 });
          showCommand(cmd);
        } catch (exc) {
          const id = exc.body && exc.body.error && exc.body.error.details && exc.body.error.details.command_id;
          fill(commandMsg, notice("error", exc.message));
          if (id) refreshCommand(id);
        }
      });
      parts.push(form);
    }
    parts.push(commandMsg, commandList);
    fill(commandsEl, ...parts);
  }

  // -- config ---------------------------------------------------------------------------
  async function loadConfig() {
    try {
      const cfg = await api.get(`${base}/config`);
      drawConfig(cfg);
    } catch (exc) {
      fill(configEl, h("h2", { id: "cfg-title" }, "Configuration"), notice("error", exc.message));
    }
  }

  function drawConfig(cfg) {
    const msg = h("div");
    const parts = [
      h("h2", { id: "cfg-title" }, "Configuration ",
        cfg.desired ? (cfg.in_sync ? badge("in sync", "ok") : badge("not in sync", "warning")) : null),
      h("div", { class: "cfg-cols" },
        h("div", {}, h("h3", {}, `Desired${cfg.desired ? ` (v${cfg.desired_version})` : ""}`),
          cfg.desired ? h("pre", { class: "json", id: "config-desired" }, jsonText(cfg.desired)) : h("p", { class: "muted" }, "none"),
          cfg.desired_at ? h("p", { class: "muted" }, when(cfg.desired_at)) : null),
        h("div", {}, h("h3", {}, `Reported${cfg.reported_version !== null ? ` (v${cfg.reported_version})` : ""}`),
          cfg.reported ? h("pre", { class: "json", id: "config-reported" }, jsonText(cfg.reported)) : h("p", { class: "muted" }, "nothing reported"),
          cfg.reported_at ? h("p", { class: "muted" }, when(cfg.reported_at)) : null)),
    ];
    if (cfg.differences.length) {
      parts.push(h("table", { class: "diff" },
        h("caption", {}, "Differences"),
        h("thead", {}, h("tr", {}, h("th", { scope: "col" }, "key"), h("th", { scope: "col" }, "desired"),
          h("th", { scope: "col" }, "reported"))),
        h("tbody", {}, cfg.differences.map((d) => h("tr", {}, h("td", {}, h("code", {}, d.key)),
          h("td", {}, jsonText(d.desired)), h("td", {}, jsonText(d.reported)))))));
    }
    if (ctx.can("devices.write")) {
      const text = h("textarea", { id: "config-edit", rows: 6, spellcheck: "false" }, jsonText(cfg.desired || {}));
      const form = h("form", { "aria-label": "Edit the desired configuration" },
        field("Desired configuration (JSON object)", text, "saved as a new version and sent to the device (retained)"),
        h("button", { type: "submit", id: "save-config" }, "Save desired configuration"));
      form.addEventListener("submit", async (ev) => {
        ev.preventDefault();
        let doc;
        try {
          doc = JSON.parse(text.value);
          if (!doc || typeof doc !== "object" || Array.isArray(doc)) throw new Error("not an object");
        } catch {
          fill(msg, notice("error", "The configuration must be a JSON object."));
          return;
        }
        try {
          drawConfig(await api.put(`${base}/config`, doc));
          configEl.querySelector(".cfg-msg").replaceWith(h("div", { class: "cfg-msg" }, notice("ok", "Saved.")));
        } catch (exc) {
          fill(msg, notice("error", exc.message));
        }
      });
      parts.push(form);
    }
    msg.className = "cfg-msg";
    parts.push(msg);
    fill(configEl, ...parts);
  }

  // -- events ---------------------------------------------------------------------------
  let events = [];
  const eventList = h("ol", { class: "events", "aria-label": "Recent events" });

  async function loadEvents() {
    // The API lists events oldest first within a window: widen the window until it holds
    // enough, and page through it to the newest.
    try {
      let got = [];
      for (const hours of [1, 24, 24 * 7, 24 * 30]) {
        got = [];
        let cursor = null;
        const from = new Date(Date.now() - hours * 3600e3).toISOString();
        for (let page = 0; page < 10; page++) {
          const res = await api.get(`${base}/events`, { from, limit: 1000, cursor });
          got = got.concat(res.items).slice(-EVENTS_SHOWN);
          if (!res.next) break;
          cursor = res.next;
        }
        if (got.length >= EVENTS_SHOWN) break;
      }
      events = got.reverse();
      drawEvents();
    } catch (exc) {
      fill(eventsEl, h("h2", { id: "ev-title" }, "Recent events"), notice("error", exc.message));
    }
  }

  function drawEvents() {
    fill(eventList, events.map((e) => h("li", {},
      h("div", {}, h("strong", {}, e.type), " ", h("span", { class: "muted" }, timeEl(e.time))),
      e.data && Object.keys(e.data).length ? h("pre", {}, jsonText(e.data)) : null)));
    fill(eventsEl, h("h2", { id: "ev-title" }, "Recent events"),
      events.length ? eventList : h("p", { class: "muted" }, "No events."));
  }

  function eventMessage(frame) {
    const p = frame.payload;
    if (!p || typeof p !== "object" || typeof p.type !== "string") return;
    const t = typeof p.ts === "number" ? p.ts : (typeof p.ts === "string" ? Date.parse(p.ts) : frame.received_at);
    events.unshift({ time: new Date(Number.isNaN(t) ? frame.received_at : t).toISOString(), type: p.type,
      data: p.data && typeof p.data === "object" ? p.data : {} });
    events = events.slice(0, EVENTS_SHOWN);
    drawEvents();
  }

  // -- alerts ---------------------------------------------------------------------------
  async function loadAlerts() {
    try {
      const alerts = await api.get(`${base}/alerts`, { limit: 20 });
      fill(alertsEl, h("h2", { id: "al-title" }, "Alert history"),
        alerts.length
          ? h("ul", { class: "alerts history", "aria-label": "Alert history" }, alerts.map((a) => h("li", {
            class: `alert sev-${a.severity}`, dataset: { alertId: String(a.id), state: a.state } },
          h("div", { class: "alert-head" }, badge(a.severity, a.severity), " ", badge(a.state, a.state), " ",
            h("strong", {}, a.rule)),
          h("div", { class: "alert-body" },
            a.metric ? [h("code", {}, a.metric), " = ", num(a.value), " · "] : [a.kind, " · "],
            "fired ", timeEl(a.fired_at),
            a.resolved_at ? [" · resolved ", timeEl(a.resolved_at)] : null,
            a.acknowledged_at ? [" · acknowledged by ", a.acknowledged_by || "someone"] : null))))
          : h("p", { class: "muted" }, "No alerts."));
    } catch (exc) {
      fill(alertsEl, h("h2", { id: "al-title" }, "Alert history"), notice("error", exc.message));
    }
  }

  // -- live -----------------------------------------------------------------------------
  function onMessage(frame) {
    const rest = frame.topic.slice(slug.length + 1);
    if (rest === "telemetry") telemetry(frame);
    else if (rest === "status") {
      const word = frame.payload_text;
      if (device && (word === "online" || word === "offline")) {
        device.status = word;
        drawHead();
      }
    } else if (rest === "events") eventMessage(frame);
    else if (rest === "alerts") loadAlerts();
    else if (rest === "config/reported") loadConfig();
    else if (rest.startsWith("commands/") && rest.endsWith("/result")) refreshCommand(rest.split("/")[1]);
  }

  function onGap() {
    loadAll();
  }

  // The sections below the charts load once the first chart is in (or failed), so they do
  // not compete with it for the API and the database.
  let firstChart = () => {};

  function loadAll() {
    let started = false;
    firstChart = () => {
      if (started) return;
      started = true;
      loadCommands();
      loadConfig();
      loadEvents();
      loadAlerts();
    };
    loadDevice();
    loadCharts();
  }

  disposers.push(ctx.stream.subscribe(filter, onMessage, onGap));
  disposers.push(ctx.stream.onState(() => { el.dataset.live = String(ctx.stream.isLive([filter])); }));
  el.dataset.live = String(ctx.stream.isLive([filter]));
  // Commands without a final state: read them now and then, whatever the stream says
  // (an expiry has no message of its own).
  const poll = setInterval(() => {
    for (const { cmd } of commandRows.values()) if (OPEN_STATES.has(cmd.state)) refreshCommand(cmd.id);
  }, POLL_MS);
  disposers.push(() => clearInterval(poll));
  drawCommands();
  loadAll();
  return {
    el,
    dispose() {
      disposers.forEach((d) => d());
      for (const { chart } of charts.values()) chart.destroy();
    },
  };
}
