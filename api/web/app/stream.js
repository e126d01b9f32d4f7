// One WebSocket per organization (GET /api/v1/orgs/{org}/stream), shared by the views:
// each view subscribes to the filters it needs and is told when a message matches. The
// socket carries the session cookie (same origin: the stream checks the Origin header).
//
// Anything that may have been missed - the relay's `gap` frame, `dropped` frames (we ask for
// ?overflow=drop so a busy tab loses old frames instead of its connection) or our own
// reconnect - is reported to every subscriber as a gap: views refetch over REST.

const RETRY_MIN_MS = 1000;
const RETRY_MAX_MS = 15000;

/** Whether an MQTT filter (relative to the organization) matches a topic. */
export function matches(filter, topic) {
  const f = filter.split("/");
  const t = topic.split("/");
  for (let i = 0; i < f.length; i++) {
    if (f[i] === "#") return true;
    if (i >= t.length) return false;
    if (f[i] !== "+" && f[i] !== t[i]) return false;
  }
  return f.length === t.length;
}

export class LiveStream {
  constructor(org, { onSessionEnded } = {}) {
    this.org = org;
    this.onSessionEnded = onSessionEnded;
    this.subs = new Map(); // filter -> Set<{onMessage, onGap}>
    this.live = new Set(); // filters the server confirmed
    this.stateListeners = new Set();
    this.ws = null;
    this.closed = false;
    this.retryMs = RETRY_MIN_MS;
    this.nextId = 1;
    this.everOpen = false;
    this.connect();
  }

  connect() {
    if (this.closed) return;
    const scheme = location.protocol === "https:" ? "wss:" : "ws:";
    const url = `${scheme}//${location.host}/api/v1/orgs/${encodeURIComponent(this.org)}/stream?overflow=drop`;
    const ws = new WebSocket(url);
    this.ws = ws;
    ws.addEventListener("message", (ev) => this.frame(ev.data));
    ws.addEventListener("close", (ev) => this.lost(ws, ev.code));
  }

  frame(text) {
    let f;
    try {
      f = JSON.parse(text);
    } catch {
      return;
    }
    if (f.type === "welcome") {
      this.retryMs = RETRY_MIN_MS;
      const reconnected = this.everOpen;
      this.everOpen = true;
      for (const filter of this.subs.keys()) this.send({ type: "subscribe", filter, id: this.nextId++ });
      if (reconnected) this.gap(null);
    } else if (f.type === "subscribed") {
      if (this.subs.has(f.filter)) this.live.add(f.filter);
      this.changed();
    } else if (f.type === "unsubscribed") {
      this.live.delete(f.filter);
      this.changed();
    } else if (f.type === "message") {
      const seen = new Set();
      for (const [filter, set] of this.subs) {
        if (!matches(filter, f.topic)) continue;
        for (const sub of set) {
          if (seen.has(sub)) continue;
          seen.add(sub);
          try {
            sub.onMessage(f);
          } catch (exc) {
            console.error("stream listener failed", exc);
          }
        }
      }
    } else if (f.type === "gap" || f.type === "dropped") {
      this.gap(f);
    }
  }

  gap(frame) {
    const seen = new Set();
    for (const set of this.subs.values()) {
      for (const sub of set) {
        if (seen.has(sub) || !sub.onGap) continue;
        seen.add(sub);
        sub.onGap(frame);
      }
    }
  }

  lost(ws, code) {
    if (ws !== this.ws) return;
    this.live.clear();
    this.changed();
    if (this.closed) return;
    if (code === 4001 || code === 4003) {
      // The session ended or the membership is gone: no point in retrying.
      this.closed = true;
      if (this.onSessionEnded) this.onSessionEnded(code);
      return;
    }
    const wait = this.retryMs;
    this.retryMs = Math.min(RETRY_MAX_MS, this.retryMs * 2);
    setTimeout(() => this.connect(), wait);
  }

  send(frame) {
    if (this.ws && this.ws.readyState === WebSocket.OPEN) this.ws.send(JSON.stringify(frame));
  }

  /**
   * Watch `filter`; onMessage(frame) for each matching message, onGap(frame|null) when
   * messages may have been missed. Returns the function that stops watching.
   */
  subscribe(filter, onMessage, onGap) {
    const sub = { onMessage, onGap };
    let set = this.subs.get(filter);
    if (!set) {
      set = new Set();
      this.subs.set(filter, set);
      this.send({ type: "subscribe", filter, id: this.nextId++ });
    }
    set.add(sub);
    return () => {
      set.delete(sub);
      if (set.size === 0 && this.subs.get(filter) === set) {
        this.subs.delete(filter);
        this.live.delete(filter);
        this.send({ type: "unsubscribe", filter, id: this.nextId++ });
      }
    };
  }

  /** Whether every one of `filters` is confirmed by the server. */
  isLive(filters) {
    return filters.every((f) => this.live.has(f));
  }

  onState(fn) {
    this.stateListeners.add(fn);
    return () => this.stateListeners.delete(fn);
  }

  changed() {
    for (const fn of this.stateListeners) fn();
  }

  close() {
    this.closed = true;
    if (this.ws) this.ws.close(1000);
  }
}

/** Values of a telemetry payload as [timeMs, metric, value] (numbers and booleans only). */
export function telemetryPoints(frame) {
  const out = [];
  const payload = frame.payload;
  const received = frame.received_at;
  const stampOf = (ts) => {
    if (typeof ts === "number") return ts;
    if (typeof ts === "string") {
      const t = Date.parse(ts);
      return Number.isNaN(t) ? received : t;
    }
    return received;
  };
  const flatten = (obj, prefix, t, into) => {
    for (const [k, v] of Object.entries(obj)) {
      const name = prefix ? `${prefix}.${k}` : k;
      if (typeof v === "number" && Number.isFinite(v)) into.push([t, name, v]);
      else if (typeof v === "boolean") into.push([t, name, v ? 1 : 0]);
      else if (v && typeof v === "object" && !Array.isArray(v)) flatten(v, name, t, into);
    }
  };
  const one = (p) => {
    if (!p || typeof p !== "object" || Array.isArray(p)) return;
    if ("values" in p && p.values && typeof p.values === "object") flatten(p.values, "", stampOf(p.ts), out);
    else flatten(p, "", received, out);
  };
  if (Array.isArray(payload)) payload.forEach(one);
  else one(payload);
  return out;
}
