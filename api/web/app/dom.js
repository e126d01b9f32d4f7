// Building the page from data without ever parsing data as HTML: every string becomes a
// text node or an attribute value set through the DOM (a device named
// `<img src=x onerror=alert(1)>` is shown as those characters). There is no innerHTML in
// this app; keep it that way.

/**
 * h("button", {class: "primary", onclick: fn, "aria-label": "Send"}, "Send", child, ...)
 * Children: nodes, strings/numbers (text), arrays of children, null/false (skipped).
 */
export function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value === null || value === undefined || value === false) continue;
    if (key.startsWith("on") && typeof value === "function") {
      el.addEventListener(key.slice(2), value);
    } else if (key === "class") {
      el.className = value;
    } else if (key === "dataset") {
      Object.assign(el.dataset, value);
    } else if (key === "value" || key === "checked" || key === "selected" || key === "disabled") {
      el[key] = value;
    } else {
      el.setAttribute(key, value === true ? "" : String(value));
    }
  }
  append(el, children);
  return el;
}

function append(el, children) {
  for (const child of children) {
    if (child === null || child === undefined || child === false) continue;
    if (Array.isArray(child)) append(el, child);
    else if (child instanceof Node) el.appendChild(child);
    else el.appendChild(document.createTextNode(String(child)));
  }
}

/** Replace an element's children. */
export function fill(el, ...children) {
  el.replaceChildren();
  append(el, children);
  return el;
}

let ids = 0;
/** A unique id for label/control pairs. */
export function uid(prefix = "f") {
  ids += 1;
  return `${prefix}-${ids}`;
}

/** A labelled form control: {label, control, hint}. */
export function field(label, control, hint) {
  if (!control.id) control.id = uid();
  const hintEl = hint ? h("small", { class: "hint", id: `${control.id}-hint` }, hint) : null;
  if (hintEl) control.setAttribute("aria-describedby", hintEl.id);
  return h("div", { class: "field" }, h("label", { for: control.id }, label), control, hintEl);
}

/** A <select> of [value, text] pairs. */
export function select(options, value, attrs = {}) {
  return h("select", attrs, options.map(([v, text]) => h("option", { value: v, selected: v === value }, text)));
}

/** Say something to screen-reader users (and keep it visible nowhere). */
export function announce(text) {
  const el = document.getElementById("announce");
  if (el) el.textContent = text;
}

/** A message box: kind is "error", "ok" or "info". */
export function notice(kind, ...children) {
  return h("div", { class: `notice ${kind}`, role: kind === "error" ? "alert" : "status" }, ...children);
}

const rtf = new Intl.RelativeTimeFormat(undefined, { numeric: "auto" });

/** "12 s ago"-style text for a time (Date, ms or ISO string). */
export function ago(t) {
  if (t === null || t === undefined) return "never";
  const ms = toMs(t);
  const s = Math.round((ms - Date.now()) / 1000);
  const abs = Math.abs(s);
  if (abs < 60) return rtf.format(s, "second");
  if (abs < 3600) return rtf.format(Math.round(s / 60), "minute");
  if (abs < 86400) return rtf.format(Math.round(s / 3600), "hour");
  return rtf.format(Math.round(s / 86400), "day");
}

export function toMs(t) {
  if (t instanceof Date) return t.getTime();
  if (typeof t === "number") return t;
  return Date.parse(t);
}

/** A time as the reader's locale writes it. */
export function when(t) {
  if (t === null || t === undefined) return "—";
  return new Date(toMs(t)).toLocaleString();
}

/** A <time> element with the exact time as its title and datetime. */
export function timeEl(t, relative = false) {
  if (t === null || t === undefined) return h("span", { class: "muted" }, "never");
  const d = new Date(toMs(t));
  return h("time", { datetime: d.toISOString(), title: d.toLocaleString() }, relative ? ago(d) : d.toLocaleString());
}

/** A number as text, short but exact enough to read. */
export function num(v) {
  if (v === null || v === undefined) return "—";
  if (typeof v !== "number") return String(v);
  if (Number.isInteger(v)) return String(v);
  const a = Math.abs(v);
  if (a >= 1000 || a === 0) return v.toFixed(1);
  if (a >= 1) return String(Math.round(v * 100) / 100);
  return v.toPrecision(3);
}

/** JSON shown as text (pretty), for payloads, params, results. */
export function jsonText(value) {
  try {
    return JSON.stringify(value, null, 2);
  } catch {
    return String(value);
  }
}

/** A badge for a state word (online, firing, succeeded ...). */
export function badge(text, kind = text) {
  return h("span", { class: `badge b-${String(kind).replace(/[^a-z0-9_-]/gi, "")}` }, text);
}
