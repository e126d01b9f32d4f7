// The dashboard's entry point: who is signed in, which organization, which view.
// Views live in views/*.js; each one is `render(ctx) -> {el, dispose?}`.
//
// Routes (the part after #):
//   /login                      sign in
//   /account                    change password, sign out, create an organization
//   /o/{org}/devices            devices, live status and values
//   /o/{org}/devices/{device}   one device: charts, commands, config, events, alerts
//   /o/{org}/alerts             alerts feed
//   /o/{org}/admin/{section}    members, API keys, technicians, rules, webhooks, devices

import * as api from "./api.js";
import { fill, h, notice, select } from "./dom.js";
import { LiveStream } from "./stream.js";
import { renderLogin } from "./views/login.js";
import { renderAccount } from "./views/account.js";
import { renderDevices } from "./views/devices.js";
import { renderDevice } from "./views/device.js";
import { renderAlerts } from "./views/alerts.js";
import { ADMIN_SECTIONS, renderAdmin } from "./views/admin.js";

/** permission -> roles, the API's own table (api/access.py), from the page's data block. */
const MATRIX = JSON.parse(document.getElementById("lms-permissions").textContent);

const state = {
  me: null, // {id, email, is_superuser}
  orgs: [], // [{slug, name, role}]
  org: null,
  stream: null,
  view: null,
};

function can(perm) {
  const org = state.orgs.find((o) => o.slug === state.org);
  if (!org) return false;
  if (org.role === "superuser") return true;
  return (MATRIX[perm] || []).includes(org.role);
}

function roleOf(slug) {
  const org = state.orgs.find((o) => o.slug === slug);
  return org ? org.role : null;
}

export function go(hash) {
  if (location.hash === `#${hash}`) route();
  else location.hash = hash;
}

function parse() {
  const parts = location.hash.replace(/^#\/?/, "").split("/").filter(Boolean).map(decodeURIComponent);
  return parts;
}

function streamFor(org) {
  if (state.stream && state.stream.org === org) return state.stream;
  if (state.stream) state.stream.close();
  state.stream = new LiveStream(org, { onSessionEnded: () => signedOut() });
  return state.stream;
}

function signedOut() {
  state.me = null;
  if (state.stream) state.stream.close();
  state.stream = null;
  if (parse()[0] !== "login") {
    sessionStorage.setItem("lms-after-login", location.hash);
    go("/login");
  } else {
    route();
  }
}

api.onUnauthorized(() => {
  if (state.me) signedOut();
});

async function loadMe() {
  try {
    // Both at once: one round trip less before the first view.
    const [me, orgs] = await Promise.all([api.request("GET", "/auth/me", undefined, { quiet401: true }),
      api.request("GET", "/orgs", undefined, { quiet401: true })]);
    state.me = me;
    state.orgs = orgs;
  } catch (exc) {
    if (exc.status !== 401) throw exc;
    state.me = null;
  }
}

function header() {
  const top = document.getElementById("top");
  if (!state.me) {
    fill(top, h("span", { class: "brand" }, "LMS Core"));
    return;
  }
  const org = state.org;
  const picker = select(state.orgs.map((o) => [o.slug, o.name && o.name !== o.slug ? `${o.name} (${o.slug})` : o.slug]),
    org, {
      id: "org-picker",
      onchange: (ev) => go(`/o/${encodeURIComponent(ev.target.value)}/devices`),
    });
  const current = parse();
  const here = (name) => (current[0] === "o" && current[2] === name ? "page" : null);
  const links = org
    ? [
      h("a", { href: `#/o/${encodeURIComponent(org)}/devices`, "aria-current": here("devices") }, "Devices"),
      h("a", { href: `#/o/${encodeURIComponent(org)}/alerts`, "aria-current": here("alerts") }, "Alerts"),
      ADMIN_SECTIONS.some((s) => can(s.perm))
        ? h("a", { href: `#/o/${encodeURIComponent(org)}/admin`, "aria-current": here("admin"), id: "nav-admin" },
          "Admin")
        : null,
    ]
    : [];
  fill(top,
    h("a", { class: "brand", href: org ? `#/o/${encodeURIComponent(org)}/devices` : "#/account" }, "LMS Core"),
    state.orgs.length
      ? h("div", { class: "org" }, h("label", { for: "org-picker", class: "visually-hidden" }, "Organization"), picker,
        org ? h("span", { class: "role", title: "your role" }, roleOf(org)) : null)
      : null,
    h("nav", { "aria-label": "Main" }, links),
    h("div", { class: "me" },
      h("a", { href: "#/account", "aria-current": current[0] === "account" ? "page" : null, title: "Account" },
        state.me.email),
      h("button", { type: "button", class: "link", id: "sign-out", onclick: signOut }, "Sign out")));
}

async function signOut() {
  try {
    await api.post("/auth/logout");
  } catch {
    // The session may already be gone; signing out locally is what matters.
  }
  state.me = null;
  state.orgs = [];
  if (state.stream) state.stream.close();
  state.stream = null;
  go("/login");
}

function show(view) {
  if (state.view && state.view.dispose) state.view.dispose();
  state.view = view;
  const main = document.getElementById("main");
  fill(main, view.el);
}

async function route() {
  const parts = parse();
  if (!state.me) {
    if (parts[0] !== "login") {
      if (location.hash && location.hash !== "#/login") sessionStorage.setItem("lms-after-login", location.hash);
      go("/login");
      return;
    }
    header();
    show(renderLogin({
      signedIn: async () => {
        await loadMe();
        const after = sessionStorage.getItem("lms-after-login");
        sessionStorage.removeItem("lms-after-login");
        go(after && after !== "#/login" ? after.slice(1) : home());
      },
    }));
    return;
  }
  if (parts[0] === "login" || parts.length === 0) {
    go(home());
    return;
  }
  if (parts[0] === "account") {
    state.org = state.org || (state.orgs[0] && state.orgs[0].slug) || null;
    header();
    show(renderAccount({ me: state.me, signOut, orgsChanged: async (slug) => {
      state.orgs = await api.get("/orgs");
      go(`/o/${encodeURIComponent(slug)}/devices`);
    } }));
    return;
  }
  if (parts[0] === "o" && parts[1]) {
    const org = parts[1];
    if (!roleOf(org)) {
      state.orgs = await api.get("/orgs");
    }
    if (!roleOf(org)) {
      header();
      show({ el: notice("error", `There is no organization “${org}” for you. `, h("a", { href: "#/account" }, "Account")) });
      return;
    }
    state.org = org;
    header();
    const ctx = { org, role: roleOf(org), can, stream: streamFor(org), me: state.me, go };
    const view = parts[2] || "devices";
    if (view === "devices" && parts[3]) show(renderDevice(ctx, parts[3]));
    else if (view === "devices") show(renderDevices(ctx));
    else if (view === "alerts") show(renderAlerts(ctx));
    else if (view === "admin") show(renderAdmin(ctx, parts[3]));
    else show({ el: notice("error", "No such page.") });
    document.getElementById("main").focus({ preventScroll: true });
    return;
  }
  show({ el: notice("error", "No such page. ", h("a", { href: `#${home()}` }, "Home")) });
}

function home() {
  const org = state.org || (state.orgs[0] && state.orgs[0].slug);
  return org ? `/o/${encodeURIComponent(org)}/devices` : "/account";
}

async function start() {
  window.addEventListener("hashchange", () => route().catch(failed));
  await loadMe();
  await route();
}

function failed(exc) {
  console.error(exc);
  fill(document.getElementById("main"), notice("error", `Something went wrong: ${exc.message}`));
}

start().catch(failed);
