// The devices of the organization: live status, last seen, latest values, tags; search and
// filters. Live through the stream (+/status, +/telemetry); a gap refetches everything.
import * as api from "../api.js";
import { ago, badge, field, fill, h, notice, num, select, timeEl } from "../dom.js";
import { telemetryPoints } from "../stream.js";

const PAGE = 1000;
const MAX_DEVICES = 5000; // beyond this the list asks for a search instead (keyset pages of 1000)
const LATEST_AT_ONCE = 6;
const SHOWN_VALUES = 4;
const RELOAD_MS = 5000;

export function renderDevices(ctx) {
  const devices = new Map(); // slug -> {device, latest: Map(metric -> {value, text, time})}
  let lastReload = Date.now();
  const rows = new Map(); // slug -> <li>
  const list = h("ul", { class: "devices", "aria-label": "Devices" });
  const status = h("div");
  const search = h("input", { type: "search", placeholder: "slug, name, tag or metric", autocomplete: "off" });
  const tagFilter = select([["", "any tag"]], "");
  const stateFilter = select([["", "any status"], ["online", "online"], ["offline", "offline"],
    ["disabled", "disabled"]], "");
  const count = h("p", { class: "muted", "aria-live": "polite" });
  const el = h("section", { class: "stack", "aria-labelledby": "devices-title" },
    h("div", { class: "title-row" },
      h("h1", { id: "devices-title" }, "Devices"),
      ctx.can("devices.write")
        ? h("a", { class: "button", href: `#/o/${encodeURIComponent(ctx.org)}/admin/devices`, id: "add-device" },
          "Add device")
        : null),
    h("form", { class: "filters", role: "search", onsubmit: (ev) => ev.preventDefault() },
      field("Search", search), field("Tag", tagFilter), field("Status", stateFilter)),
    count, status, list);

  function matchesFilters(d) {
    const q = search.value.trim().toLowerCase();
    const tag = tagFilter.value;
    const st = stateFilter.value;
    if (tag && !d.device.tags.includes(tag)) return false;
    if (st === "disabled" && d.device.enabled) return false;
    if ((st === "online" || st === "offline") && (d.device.status !== st || !d.device.enabled)) return false;
    if (!q) return true;
    const hay = [d.device.slug, d.device.name, ...d.device.tags, ...d.latest.keys()].join("\n").toLowerCase();
    return hay.includes(q);
  }

  function row(d) {
    const dev = d.device;
    const online = dev.enabled && dev.status === "online";
    const values = [...d.latest.entries()].sort(([a], [b]) => a.localeCompare(b)).slice(0, SHOWN_VALUES);
    const more = d.latest.size - values.length;
    return h("li", { class: "device", dataset: { device: dev.slug, status: dev.enabled ? dev.status : "disabled" } },
      h("div", { class: "device-head" },
        h("span", { class: `dot ${online ? "on" : "off"}`, "aria-hidden": "true" }),
        h("a", { href: `#/o/${encodeURIComponent(ctx.org)}/devices/${encodeURIComponent(dev.slug)}`, class: "device-name" },
          dev.name || dev.slug),
        dev.name && dev.name !== dev.slug ? h("span", { class: "muted slug" }, dev.slug) : null,
        dev.enabled ? badge(dev.status, dev.status) : badge("disabled")),
      h("div", { class: "device-meta" }, "last seen ", dev.last_seen_at ? timeEl(dev.last_seen_at, true) : "never"),
      values.length
        ? h("dl", { class: "values" }, values.map(([m, r]) => h("div", {}, h("dt", {}, m),
          h("dd", {}, r.value !== null && r.value !== undefined ? num(r.value) : r.text ?? "—"))),
        more > 0 ? h("div", { class: "muted" }, `+${more} more`) : null)
        : h("p", { class: "muted" }, "no readings yet"),
      dev.tags.length ? h("ul", { class: "tags", "aria-label": "tags" }, dev.tags.map((t) => h("li", {}, t))) : null);
  }

  function update(slug) {
    const d = devices.get(slug);
    const fresh = row(d);
    const old = rows.get(slug);
    if (old) old.replaceWith(fresh);
    else list.appendChild(fresh);
    rows.set(slug, fresh);
    fresh.hidden = !matchesFilters(d);
  }

  function applyFilters() {
    let shown = 0;
    for (const [slug, d] of devices) {
      const visible = matchesFilters(d);
      rows.get(slug).hidden = !visible;
      if (visible) shown += 1;
    }
    count.textContent = devices.size ? `${shown} of ${devices.size} devices` : "";
  }

  async function load() {
    fill(status);
    try {
      const all = [];
      let after = null;
      for (;;) {
        const page = await api.get(api.orgPath(ctx.org, "devices"), { limit: PAGE, after });
        all.push(...page);
        if (page.length < PAGE || all.length >= MAX_DEVICES) break;
        after = page[page.length - 1].slug;
      }
      devices.clear();
      rows.clear();
      list.replaceChildren();
      for (const dev of all) devices.set(dev.slug, { device: dev, latest: new Map() });
      const tags = [...new Set(all.flatMap((d) => d.tags))].sort();
      const chosen = tagFilter.value;
      fill(tagFilter, h("option", { value: "" }, "any tag"),
        tags.map((t) => h("option", { value: t, selected: t === chosen }, t)));
      for (const slug of devices.keys()) update(slug);
      applyFilters();
      if (!all.length) {
        fill(status, notice("info", "No devices yet.",
          ctx.can("devices.write") ? " Add one with “Add device”." : ""));
      }
      await api.pool(all, LATEST_AT_ONCE, async (dev) => {
        try {
          const latest = await api.get(api.orgPath(ctx.org, "devices", dev.slug, "latest"));
          const d = devices.get(dev.slug);
          if (!d) return;
          for (const r of latest) d.latest.set(r.metric, r);
          update(dev.slug);
        } catch (exc) {
          if (exc.status !== 404) throw exc;
        }
      });
      applyFilters();
      el.dataset.loaded = "true";
    } catch (exc) {
      fill(status, notice("error", `Could not load the devices: ${exc.message}`));
    }
  }

  const stops = [
    ctx.stream.subscribe("+/status", (f) => {
      const d = devices.get(f.device);
      if (!d) return;
      const word = f.payload_text ?? (typeof f.payload === "string" ? f.payload : null);
      if (word === "online" || word === "offline") {
        d.device.status = word;
        d.device.status_changed_at = new Date(f.received_at).toISOString();
        if (word === "online") d.device.last_seen_at = d.device.status_changed_at;
        update(f.device);
      }
    }, () => load()),
    ctx.stream.subscribe("+/telemetry", (f) => {
      const d = devices.get(f.device);
      if (!d) {
        // A device created since (or beyond the first MAX_DEVICES): reread the list, at most
        // once per RELOAD_MS however many such messages arrive.
        if (devices.size < MAX_DEVICES && Date.now() - lastReload > RELOAD_MS) {
          lastReload = Date.now();
          load();
        }
        return;
      }
      d.device.last_seen_at = new Date(f.received_at).toISOString();
      for (const [t, metric, value] of telemetryPoints(f)) {
        const old = d.latest.get(metric);
        if (!old || Date.parse(old.time) <= t) d.latest.set(metric, { metric, value, text: null, time: new Date(t).toISOString() });
      }
      update(f.device);
    }),
  ];
  const timer = setInterval(() => {
    for (const t of list.querySelectorAll("time")) t.textContent = ago(t.getAttribute("datetime"));
  }, 10000);
  for (const control of [search, tagFilter, stateFilter]) control.addEventListener("input", applyFilters);
  load();
  return {
    el,
    dispose() {
      stops.forEach((stop) => stop());
      clearInterval(timer);
    },
  };
}
