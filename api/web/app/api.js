// The REST API, as the page uses it: the session cookie (set by login, HttpOnly) goes with
// every request of this origin; a request that changes something echoes the session's CSRF
// token (the readable lms_csrf cookie) in X-CSRF-Token. Nothing else is private here.

export const BASE = "/api/v1";

export class ApiError extends Error {
  constructor(status, message, body, retryAfter) {
    super(message);
    this.status = status;
    this.body = body;
    this.retryAfter = retryAfter;
  }
}

function cookie(name) {
  for (const part of document.cookie.split(";")) {
    const [k, ...v] = part.trim().split("=");
    if (k === name) return decodeURIComponent(v.join("="));
  }
  return "";
}

const listeners = { unauthorized: [] };

/** Called when any request answers 401 (the session ended): the app shows the sign-in. */
export function onUnauthorized(fn) {
  listeners.unauthorized.push(fn);
}

/**
 * request("GET", "/orgs") -> parsed JSON (or null for 204).
 * Throws ApiError with the API's message for any non-2xx answer.
 */
export async function request(method, path, body, { quiet401 = false, query } = {}) {
  const headers = { Accept: "application/json" };
  if (!["GET", "HEAD", "OPTIONS"].includes(method)) {
    const csrf = cookie("lms_csrf");
    if (csrf) headers["X-CSRF-Token"] = csrf;
  }
  const init = { method, headers, credentials: "same-origin" };
  if (body !== undefined) {
    headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  let url = BASE + path;
  if (query) {
    const q = new URLSearchParams();
    for (const [k, v] of Object.entries(query)) {
      if (v === null || v === undefined || v === "") continue;
      for (const one of Array.isArray(v) ? v : [v]) q.append(k, String(one));
    }
    const s = q.toString();
    if (s) url += (url.includes("?") ? "&" : "?") + s;
  }
  let res;
  try {
    res = await fetch(url, init);
  } catch (exc) {
    throw new ApiError(0, `the API cannot be reached (${exc.message})`, null);
  }
  if (res.status === 204) return null;
  let data = null;
  const text = await res.text();
  if (text) {
    try {
      data = JSON.parse(text);
    } catch {
      data = text;
    }
  }
  if (!res.ok) {
    const message = (data && data.error && data.error.message) || `${res.status} ${res.statusText}`;
    if (res.status === 401 && !quiet401) listeners.unauthorized.forEach((fn) => fn());
    throw new ApiError(res.status, message, data, res.headers.get("Retry-After"));
  }
  return data;
}

export const get = (path, query) => request("GET", path, undefined, { query });
export const post = (path, body, opts) => request("POST", path, body, opts);
export const put = (path, body) => request("PUT", path, body);
export const patch = (path, body) => request("PATCH", path, body);
export const del = (path, query) => request("DELETE", path, undefined, { query });

/** Path of an organization resource, every slug encoded. */
export function orgPath(org, ...parts) {
  return ["/orgs", org, ...parts].map((p, i) => (i === 0 ? p : encodeURIComponent(p))).join("/");
}

/** Run fn over items with at most `limit` at once (a page of devices' latest values). */
export async function pool(items, limit, fn) {
  const out = new Array(items.length);
  let next = 0;
  async function worker() {
    while (next < items.length) {
      const i = next++;
      out[i] = await fn(items[i], i);
    }
  }
  await Promise.all(Array.from({ length: Math.min(limit, items.length) }, worker));
  return out;
}
