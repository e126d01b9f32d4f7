// Administration, one section per permission of the role matrix: a section a role may not
// use is neither linked nor drawn (and the API refuses its calls anyway).
import * as api from "../api.js";
import { badge, field, fill, h, notice, select, timeEl } from "../dom.js";
import { credentialsBox, secretBox, shq } from "./common.js";
import { SEVERITIES } from "./alerts.js";

const ROLES = ["owner", "admin", "operator", "viewer", "technician"];

export const ADMIN_SECTIONS = [
  { key: "devices", title: "Devices", perm: "devices.write", render: devicesSection },
  { key: "members", title: "Members", perm: "members.manage", render: membersSection },
  { key: "api-keys", title: "API keys", perm: "members.manage", render: keysSection },
  { key: "technicians", title: "Technician logins", perm: "mqtt_credentials.manage", render: techniciansSection },
  { key: "rules", title: "Alert rules", perm: "rules.manage", render: rulesSection },
  { key: "webhooks", title: "Webhooks", perm: "rules.manage", render: webhooksSection },
];

export function renderAdmin(ctx, key) {
  const allowed = ADMIN_SECTIONS.filter((s) => ctx.can(s.perm));
  if (!allowed.length) {
    return { el: notice("error", `The ${ctx.role} role has no administration here.`) };
  }
  const section = allowed.find((s) => s.key === key) || (key ? null : allowed[0]);
  const tabs = h("nav", { class: "tabs", "aria-label": "Administration" },
    allowed.map((s) => h("a", { href: `#/o/${encodeURIComponent(ctx.org)}/admin/${s.key}`,
      "aria-current": section && s.key === section.key ? "page" : null }, s.title)));
  const body = section ? section.render(ctx) : notice("error", `The ${ctx.role} role may not use this section.`);
  return { el: h("section", { class: "stack", "aria-labelledby": "admin-title" },
    h("h1", { id: "admin-title" }, "Administration"), tabs, body) };
}

// -- helpers ----------------------------------------------------------------------------

function table(caption, columns, rows) {
  return h("div", { class: "scroll" }, h("table", {},
    h("caption", { class: "visually-hidden" }, caption),
    h("thead", {}, h("tr", {}, columns.map((c) => h("th", { scope: "col" }, c)))),
    h("tbody", {}, rows)));
}

/** A section: its title, a message area, what the form shows once, the list; load() fills the list. */
function sectionShell(title) {
  const msg = h("div");
  const shown = h("div");
  const listEl = h("div");
  return { msg, shown, listEl, el: (form) => h("section", { class: "stack", "aria-label": title },
    h("h2", {}, title), form, msg, shown, listEl) };
}

function guarded(msg, fn) {
  return async (...args) => {
    fill(msg);
    try {
      await fn(...args);
    } catch (exc) {
      fill(msg, notice("error", exc.message));
    }
  };
}

function onSubmit(form, msg, fn) {
  form.addEventListener("submit", (ev) => {
    ev.preventDefault();
    guarded(msg, fn)();
  });
  return form;
}

// -- devices ----------------------------------------------------------------------------

function devicesSection(ctx) {
  const s = sectionShell("Devices");
  const slug = h("input", { type: "text", id: "new-device-slug", required: true, pattern: "[a-z0-9][a-z0-9_-]{0,62}", autocomplete: "off" });
  const name = h("input", { type: "text", id: "new-device-name", maxlength: 200, autocomplete: "off" });
  const tags = h("input", { type: "text", id: "new-device-tags", autocomplete: "off" });
  const form = onSubmit(h("form", { class: "card inline-form", "aria-label": "Add a device" },
    field("Slug", slug, "lower case, digits, - and _: it is part of the topics"),
    field("Name", name), field("Tags", tags, "separated by commas"),
    h("button", { type: "submit", class: "primary", id: "create-device" }, "Add device")), s.msg, async () => {
    const created = await api.post(api.orgPath(ctx.org, "devices"), {
      slug: slug.value.trim(), name: name.value.trim(),
      tags: tags.value.split(",").map((t) => t.trim()).filter(Boolean),
    });
    fill(s.shown, credentialsBox(`Credentials of ${created.device.slug}`, created.credentials));
    slug.value = "";
    name.value = "";
    tags.value = "";
    await load();
  });

  async function load() {
    const devices = await api.get(api.orgPath(ctx.org, "devices"), { limit: 1000 });
    fill(s.listEl, table("Devices", ["device", "status", "tags", ""], devices.map((d) => h("tr", {},
      h("td", {}, h("a", { href: `#/o/${encodeURIComponent(ctx.org)}/devices/${encodeURIComponent(d.slug)}` }, d.name || d.slug),
        d.name && d.name !== d.slug ? h("span", { class: "muted" }, ` ${d.slug}`) : null),
      h("td", {}, d.enabled ? badge(d.status, d.status) : badge("disabled")),
      h("td", {}, d.tags.join(", ")),
      h("td", { class: "actions" },
        h("button", { type: "button", onclick: guarded(s.msg, async () => {
          if (!window.confirm(`Give ${d.slug} a new MQTT password? The old one stops working at once.`)) return;
          const creds = await api.post(api.orgPath(ctx.org, "devices", d.slug, "credentials"));
          fill(s.shown, credentialsBox(`New credentials of ${d.slug}`, creds));
        }) }, "Rotate"),
        h("button", { type: "button", class: d.enabled ? "danger" : "", onclick: guarded(s.msg, async () => {
          if (d.enabled && !window.confirm(`Disable ${d.slug}? The broker disconnects it.`)) return;
          await api.post(api.orgPath(ctx.org, "devices", d.slug, d.enabled ? "disable" : "enable"));
          await load();
        }) }, d.enabled ? "Disable" : "Enable"))))));
  }
  guarded(s.msg, load)();
  return s.el(form);
}

// -- members ----------------------------------------------------------------------------

function membersSection(ctx) {
  const s = sectionShell("Members and roles");
  const email = h("input", { type: "email", id: "member-email", required: true, autocomplete: "off" });
  const role = select(ROLES.map((r) => [r, r]), "viewer", { id: "member-role" });
  const form = onSubmit(h("form", { class: "card inline-form", "aria-label": "Add a member" },
    field("Email of an existing account", email), field("Role", role),
    h("button", { type: "submit", class: "primary" }, "Add or change")), s.msg, async () => {
    await api.put(api.orgPath(ctx.org, "members", email.value.trim()), { role: role.value });
    fill(s.msg, notice("ok", `${email.value.trim()} is ${role.value}.`));
    email.value = "";
    await load();
  });

  async function load() {
    const members = await api.get(api.orgPath(ctx.org, "members"));
    fill(s.listEl, table("Members", ["email", "role", ""], members.map((m) => {
      const sel = select(ROLES.map((r) => [r, r]), m.role, { "aria-label": `Role of ${m.email}` });
      sel.addEventListener("change", guarded(s.msg, async () => {
        await api.put(api.orgPath(ctx.org, "members", m.email), { role: sel.value });
        fill(s.msg, notice("ok", `${m.email} is ${sel.value}.`));
        await load();
      }));
      return h("tr", {}, h("td", {}, m.email), h("td", {}, sel), h("td", { class: "actions" },
        h("button", { type: "button", class: "danger", "aria-label": `Remove ${m.email}`, onclick: guarded(s.msg, async () => {
          if (!window.confirm(`Remove ${m.email} from ${ctx.org}?`)) return;
          await api.del(api.orgPath(ctx.org, "members", m.email));
          await load();
        }) }, "Remove")));
    })));
  }
  guarded(s.msg, load)();
  return s.el(form);
}

// -- API keys ---------------------------------------------------------------------------

function keysSection(ctx) {
  const s = sectionShell("API keys");
  const name = h("input", { type: "text", id: "key-name", required: true, maxlength: 200, autocomplete: "off" });
  const role = select(ROLES.map((r) => [r, r]), "viewer", { id: "key-role" });
  const form = onSubmit(h("form", { class: "card inline-form", "aria-label": "Create an API key" },
    field("Name", name), field("Role", role),
    h("button", { type: "submit", class: "primary" }, "Create key")), s.msg, async () => {
    const k = await api.post(api.orgPath(ctx.org, "api-keys"), { name: name.value.trim(), role: role.value });
    fill(s.shown, secretBox(`API key “${k.name}” (${k.role})`, [["key", k.key]],
      [["use it:", `curl -H ${shq(`Authorization: Bearer ${k.key}`)} ${location.origin}/api/v1/orgs/${ctx.org}/devices`]]));
    name.value = "";
    await load();
  });

  async function load() {
    const keys = await api.get(api.orgPath(ctx.org, "api-keys"));
    fill(s.listEl, keys.length ? table("API keys", ["name", "role", "prefix", "created", "last used", ""], keys.map((k) => h("tr", {},
      h("td", {}, k.name), h("td", {}, k.role), h("td", {}, h("code", {}, k.prefix)), h("td", {}, timeEl(k.created_at)),
      h("td", {}, k.last_used_at ? timeEl(k.last_used_at, true) : "never"),
      h("td", { class: "actions" }, k.revoked_at ? badge("revoked") : h("button", { type: "button", class: "danger",
        "aria-label": `Revoke key ${k.name}`, onclick: guarded(s.msg, async () => {
          if (!window.confirm(`Revoke the key “${k.name}”? It stops working at once.`)) return;
          await api.del(api.orgPath(ctx.org, "api-keys", String(k.id)));
          await load();
        }) }, "Revoke"))))) : h("p", { class: "muted" }, "No API keys."));
  }
  guarded(s.msg, load)();
  return s.el(form);
}

// -- technician logins ------------------------------------------------------------------

function techniciansSection(ctx) {
  const s = sectionShell("Technician MQTT logins");
  const label = h("input", { type: "text", id: "tech-label", maxlength: 200, autocomplete: "off" });
  const hours = h("input", { type: "number", id: "tech-hours", min: 1, max: 24 * 90, value: 8 });
  const form = onSubmit(h("form", { class: "card inline-form", "aria-label": "Create a technician login" },
    field("Label", label, "e.g. site visit"), field("Valid for (hours)", hours),
    h("button", { type: "submit", class: "primary" }, "Create login")), s.msg, async () => {
    const t = await api.post(api.orgPath(ctx.org, "mqtt-credentials"),
      { label: label.value.trim(), expires_in_hours: Number(hours.value) || 8 });
    fill(s.shown, secretBox(`Technician login ${t.username}`, [["username", t.username], ["password", t.password],
      ["may read", t.topic_filter], ["expires", new Date(t.expires_at).toLocaleString()]],
    [["read everything of the organization:", t.mosquitto_sub]]));
    label.value = "";
    await load();
  });

  async function load() {
    const creds = await api.get(api.orgPath(ctx.org, "mqtt-credentials"));
    fill(s.listEl, creds.length ? table("Technician logins", ["username", "label", "created", "expires", ""], creds.map((c) => h("tr", {},
      h("td", {}, h("code", {}, c.username)), h("td", {}, c.label), h("td", {}, timeEl(c.created_at)),
      h("td", {}, c.expires_at ? timeEl(c.expires_at) : "—"),
      h("td", { class: "actions" }, c.revoked_at ? badge("revoked") : h("button", { type: "button", class: "danger",
        "aria-label": `Revoke ${c.username}`, onclick: guarded(s.msg, async () => {
          if (!window.confirm(`Revoke ${c.username}? Its sessions are disconnected.`)) return;
          await api.del(api.orgPath(ctx.org, "mqtt-credentials", String(c.id)));
          await load();
        }) }, "Revoke"))))) : h("p", { class: "muted" }, "No technician logins."));
  }
  guarded(s.msg, load)();
  return s.el(form);
}

// -- rules ------------------------------------------------------------------------------

function describeRule(r) {
  if (r.kind === "threshold") {
    const clear = r.clear_threshold !== null ? `, clears past ${r.clear_threshold}` : "";
    return `${r.metric} ${r.comparison} ${r.threshold}${clear}${r.duration_s ? ` for ${r.duration_s} s` : ""}`;
  }
  return `${r.kind === "no_data" ? "no data" : "offline"} for ${r.duration_s} s`;
}

function describeScope(scope) {
  if (scope.device) return `device ${scope.device}`;
  if (scope.tag) return `tag ${scope.tag}`;
  if (scope.asset) return `asset ${scope.asset}`;
  return "every device";
}

function rulesSection(ctx) {
  const s = sectionShell("Alert rules");
  const name = h("input", { type: "text", id: "rule-name", required: true, maxlength: 200, autocomplete: "off" });
  const kind = select([["threshold", "threshold"], ["no_data", "no data"], ["offline", "offline"]], "threshold", { id: "rule-kind" });
  const metric = h("input", { type: "text", id: "rule-metric", autocomplete: "off" });
  const comparison = select([">", ">=", "<", "<=", "==", "!="].map((c) => [c, c]), ">", { id: "rule-comparison" });
  const threshold = h("input", { type: "number", id: "rule-threshold", step: "any" });
  const clear = h("input", { type: "number", id: "rule-clear", step: "any" });
  const duration = h("input", { type: "number", id: "rule-duration", min: 0, value: 0 });
  const cooldown = h("input", { type: "number", id: "rule-cooldown", min: 0, value: 0 });
  const severity = select(SEVERITIES.map((v) => [v, v]), "warning", { id: "rule-severity" });
  const scopeKind = select([["org", "every device"], ["device", "one device"], ["tag", "a tag"], ["asset", "an asset"]], "org",
    { id: "rule-scope-kind" });
  const scopeValue = h("input", { type: "text", id: "rule-scope-value", autocomplete: "off" });
  const thresholdFields = h("div", { class: "inline-form" }, field("Metric", metric), field("Comparison", comparison),
    field("Threshold", threshold), field("Clear threshold (optional)", clear));
  const scopeField = field("Device, tag or asset", scopeValue);
  scopeField.hidden = true;
  kind.addEventListener("change", () => { thresholdFields.hidden = kind.value !== "threshold"; });
  scopeKind.addEventListener("change", () => { scopeField.hidden = scopeKind.value === "org"; });
  const form = onSubmit(h("form", { class: "card stack", "aria-label": "Create an alert rule" },
    h("div", { class: "inline-form" }, field("Name", name), field("Kind", kind), field("Severity", severity)),
    thresholdFields,
    h("div", { class: "inline-form" }, field("Held for (s)", duration), field("Cooldown (s)", cooldown),
      field("Watches", scopeKind), scopeField),
    h("button", { type: "submit", class: "primary" }, "Create rule")), s.msg, async () => {
    const body = { name: name.value.trim(), kind: kind.value, severity: severity.value,
      duration_s: Number(duration.value) || 0, cooldown_s: Number(cooldown.value) || 0,
      scope: scopeKind.value === "org" ? { org: true } : { [scopeKind.value]: scopeValue.value.trim() } };
    if (kind.value === "threshold") {
      Object.assign(body, { metric: metric.value.trim(), comparison: comparison.value,
        threshold: threshold.value === "" ? null : Number(threshold.value) });
      if (clear.value !== "") body.clear_threshold = Number(clear.value);
    }
    await api.post(api.orgPath(ctx.org, "rules"), body);
    fill(s.msg, notice("ok", `Rule “${body.name}” created.`));
    name.value = "";
    await load();
  });

  async function load() {
    const rules = await api.get(api.orgPath(ctx.org, "rules"));
    fill(s.listEl, rules.length ? table("Alert rules", ["name", "condition", "watches", "severity", "firing", ""], rules.map((r) => h("tr", {},
      h("td", {}, r.name), h("td", {}, h("code", {}, describeRule(r))), h("td", {}, describeScope(r.scope)),
      h("td", {}, badge(r.severity, r.severity)), h("td", {}, String(r.firing)),
      h("td", { class: "actions" },
        h("button", { type: "button", onclick: guarded(s.msg, async () => {
          await api.patch(api.orgPath(ctx.org, "rules", String(r.id)), { enabled: !r.enabled });
          await load();
        }) }, r.enabled ? "Disable" : "Enable"),
        h("button", { type: "button", class: "danger", "aria-label": `Delete rule ${r.name}`, onclick: guarded(s.msg, async () => {
          if (!window.confirm(`Delete the rule “${r.name}”? Its firing alerts resolve.`)) return;
          await api.del(api.orgPath(ctx.org, "rules", String(r.id)));
          await load();
        }) }, "Delete"))))) : h("p", { class: "muted" }, "No rules."));
  }
  guarded(s.msg, load)();
  return s.el(form);
}

// -- webhooks ---------------------------------------------------------------------------

function webhooksSection(ctx) {
  const s = sectionShell("Webhooks");
  const url = h("input", { type: "url", id: "webhook-url", required: true, placeholder: "https://hooks.example.com/lms" });
  const boxes = SEVERITIES.map((sev) => h("input", { type: "checkbox", id: `webhook-sev-${sev}`, value: sev, checked: true }));
  const form = onSubmit(h("form", { class: "card stack", "aria-label": "Add a webhook" },
    field("URL", url),
    h("fieldset", { class: "checks" }, h("legend", {}, "Severities sent"),
      boxes.map((b) => h("span", { class: "check" }, b, h("label", { for: b.id }, b.value)))),
    h("button", { type: "submit", class: "primary" }, "Add webhook")), s.msg, async () => {
    const created = await api.post(api.orgPath(ctx.org, "webhooks"),
      { url: url.value.trim(), severities: boxes.filter((b) => b.checked).map((b) => b.value) });
    fill(s.shown, secretBox(`Signing secret of ${created.webhook.url}`, [["secret", created.secret]]));
    url.value = "";
    await load();
  });

  async function load() {
    const hooks = await api.get(api.orgPath(ctx.org, "webhooks"));
    fill(s.listEl, hooks.length ? table("Webhooks", ["URL", "severities", "state", ""], hooks.map((w) => h("tr", {},
      h("td", {}, h("code", {}, w.url)), h("td", {}, w.severities.join(", ")),
      h("td", {}, !w.enabled ? badge("disabled") : w.failing ? badge("failing", "warning") : badge("ok", "ok"),
        w.last_error ? h("div", { class: "muted" }, w.last_error) : null),
      h("td", { class: "actions" },
        h("button", { type: "button", onclick: guarded(s.msg, async () => {
          await api.patch(api.orgPath(ctx.org, "webhooks", String(w.id)), { enabled: !w.enabled });
          await load();
        }) }, w.enabled ? "Disable" : "Enable"),
        h("button", { type: "button", onclick: guarded(s.msg, async () => {
          if (!window.confirm("Make a new signing secret? The old one stops being used at once.")) return;
          const r = await api.post(api.orgPath(ctx.org, "webhooks", String(w.id), "rotate-secret"));
          fill(s.shown, secretBox(`New signing secret of ${w.url}`, [["secret", r.secret]]));
        }) }, "New secret"),
        h("button", { type: "button", class: "danger", "aria-label": `Delete webhook ${w.url}`, onclick: guarded(s.msg, async () => {
          if (!window.confirm(`Delete the webhook ${w.url}?`)) return;
          await api.del(api.orgPath(ctx.org, "webhooks", String(w.id)));
          await load();
        }) }, "Delete"))))) : h("p", { class: "muted" }, "No webhooks."));
  }
  guarded(s.msg, load)();
  return s.el(form);
}
