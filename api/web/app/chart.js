// A small time-series line chart on <canvas>: the bucket averages as a line, each bucket's
// min..max as a band behind it, live points appended as they arrive. It redraws at most
// once per animation frame, only when something changed, and keeps only the points of its
// window. Colours come from CSS custom properties, so light and dark mode need nothing here.

const PAD = { left: 48, right: 10, top: 10, bottom: 22 };

function css(el, name, fallback) {
  const v = getComputedStyle(el).getPropertyValue(name).trim();
  return v || fallback;
}

function niceStep(span, target) {
  const raw = span / target;
  const mag = 10 ** Math.floor(Math.log10(raw));
  for (const m of [1, 2, 2.5, 5, 10]) if (raw <= m * mag) return m * mag;
  return 10 * mag;
}

function label(v, step) {
  const digits = Math.max(0, Math.min(6, -Math.floor(Math.log10(step)) + (step < 1 ? 1 : 0)));
  return v.toFixed(Number.isFinite(digits) ? digits : 0);
}

export class LineChart {
  /** span: the window in ms (the chart shows [now - span, now]). */
  constructor(canvas, span) {
    this.canvas = canvas;
    this.span = span;
    this.history = []; // {t, v, lo, hi}
    this.live = []; // {t, v}
    this.pending = false;
    this.draws = 0; // for the benchmark and the tests
    this.drawMs = 0;
    this.resize = new ResizeObserver(() => this.request());
    this.resize.observe(canvas);
    this.media = window.matchMedia("(prefers-color-scheme: dark)");
    this.onScheme = () => this.request();
    this.media.addEventListener("change", this.onScheme);
  }

  setHistory(points, span) {
    this.span = span;
    this.history = points;
    // Live points newer than the last bucket stay; older ones are in the history now.
    const last = points.length ? points[points.length - 1].t : -Infinity;
    this.live = this.live.filter((p) => p.t > last);
    this.request();
  }

  add(t, v) {
    this.live.push({ t, v });
    if (this.live.length > 1 && this.live[this.live.length - 2].t > t) this.live.sort((a, b) => a.t - b.t);
    const start = Date.now() - this.span;
    if (this.live.length > 4096 || (this.live.length && this.live[0].t < start)) {
      this.live = this.live.filter((p) => p.t >= start).slice(-4096);
    }
    this.request();
  }

  request() {
    if (this.pending) return;
    this.pending = true;
    requestAnimationFrame(() => {
      this.pending = false;
      this.draw();
    });
  }

  draw() {
    const t0 = performance.now();
    const c = this.canvas;
    const dpr = window.devicePixelRatio || 1;
    const w = c.clientWidth;
    const hgt = c.clientHeight;
    if (!w || !hgt) return;
    if (c.width !== Math.round(w * dpr) || c.height !== Math.round(hgt * dpr)) {
      c.width = Math.round(w * dpr);
      c.height = Math.round(hgt * dpr);
    }
    const g = c.getContext("2d");
    g.setTransform(dpr, 0, 0, dpr, 0, 0);
    g.clearRect(0, 0, w, hgt);
    const line = css(c, "--chart-line", "#1d6fd8");
    const band = css(c, "--chart-band", "rgba(29,111,216,.15)");
    const grid = css(c, "--chart-grid", "rgba(128,128,128,.25)");
    const text = css(c, "--muted", "#666");

    const lastLive = this.live.length ? this.live[this.live.length - 1].t : 0;
    const x1 = Math.max(Date.now(), lastLive);
    const x0 = x1 - this.span;
    const hist = this.history.filter((p) => p.t >= x0 - this.span / 100);
    const live = this.live.filter((p) => p.t >= x0);
    let lo = Infinity;
    let hi = -Infinity;
    for (const p of hist) {
      lo = Math.min(lo, p.lo ?? p.v);
      hi = Math.max(hi, p.hi ?? p.v);
    }
    for (const p of live) {
      lo = Math.min(lo, p.v);
      hi = Math.max(hi, p.v);
    }
    const pw = w - PAD.left - PAD.right;
    const ph = hgt - PAD.top - PAD.bottom;
    g.font = "11px system-ui, sans-serif";
    g.fillStyle = text;
    if (!Number.isFinite(lo)) {
      g.textAlign = "center";
      g.fillText("no data in this range yet", PAD.left + pw / 2, PAD.top + ph / 2);
      this.finish(t0);
      return;
    }
    if (lo === hi) {
      lo -= 1;
      hi += 1;
    }
    const margin = (hi - lo) * 0.08;
    lo -= margin;
    hi += margin;
    const X = (t) => PAD.left + ((t - x0) / (x1 - x0)) * pw;
    const Y = (v) => PAD.top + (1 - (v - lo) / (hi - lo)) * ph;

    // grid and value labels
    const step = niceStep(hi - lo, 4);
    g.strokeStyle = grid;
    g.lineWidth = 1;
    g.textAlign = "right";
    g.textBaseline = "middle";
    for (let v = Math.ceil(lo / step) * step; v <= hi; v += step) {
      const y = Math.round(Y(v)) + 0.5;
      g.beginPath();
      g.moveTo(PAD.left, y);
      g.lineTo(w - PAD.right, y);
      g.stroke();
      g.fillText(label(v, step), PAD.left - 6, y);
    }
    // time labels
    g.textAlign = "center";
    g.textBaseline = "top";
    const long = this.span > 2 * 86400e3;
    const fmt = long
      ? { month: "short", day: "numeric" }
      : { hour: "2-digit", minute: "2-digit" };
    const ticks = Math.max(2, Math.min(6, Math.floor(pw / 90)));
    for (let i = 0; i <= ticks; i++) {
      const t = x0 + ((x1 - x0) * i) / ticks;
      g.textAlign = i === 0 ? "left" : i === ticks ? "right" : "center";
      g.fillText(new Date(t).toLocaleString(undefined, fmt), X(t), hgt - PAD.bottom + 6);
    }

    g.save();
    g.beginPath();
    g.rect(PAD.left, PAD.top, pw, ph);
    g.clip();
    // min..max band of the buckets
    if (hist.length > 1 && hist[0].lo !== undefined) {
      g.fillStyle = band;
      g.beginPath();
      hist.forEach((p, i) => (i ? g.lineTo(X(p.t), Y(p.hi)) : g.moveTo(X(p.t), Y(p.hi))));
      for (let i = hist.length - 1; i >= 0; i--) g.lineTo(X(hist[i].t), Y(hist[i].lo));
      g.closePath();
      g.fill();
    }
    // the line: bucket averages, then live points
    const pts = hist.map((p) => [X(p.t), Y(p.v)]).concat(live.map((p) => [X(p.t), Y(p.v)]));
    g.strokeStyle = line;
    g.lineWidth = 2;
    g.lineJoin = "round";
    g.beginPath();
    pts.forEach(([x, y], i) => (i ? g.lineTo(x, y) : g.moveTo(x, y)));
    g.stroke();
    // the newest point
    if (pts.length) {
      const [x, y] = pts[pts.length - 1];
      g.fillStyle = line;
      g.beginPath();
      g.arc(x, y, 3.5, 0, 2 * Math.PI);
      g.fill();
    }
    g.restore();
    if (hist.length && !this.drawnHistory) {
      // What bench/dashboard.py measures: the first chart drawn with its history.
      this.drawnHistory = true;
      performance.mark("lms:chart-drawn");
    }
    this.finish(t0);
  }

  finish(t0) {
    this.draws += 1;
    this.drawMs += performance.now() - t0;
    this.canvas.dataset.draws = String(this.draws);
    this.canvas.dataset.drawMs = this.drawMs.toFixed(2);
  }

  destroy() {
    this.resize.disconnect();
    this.media.removeEventListener("change", this.onScheme);
  }
}
