"""Dashboard benchmark: the device page's first load (time to a drawn 24-hour chart) and the
frame rate of a live chart receiving 10 points a second, in headless Chromium.

usage (from the repository root):
    .venv/bin/python bench/dashboard.py [--rows 10000000] [--loads 5] [--seconds 10] [--rate 10]

The data set is bench/api_queries.py's, built by its own code (``Bench.setup`` and
``Bench.load``, then ``Bench.set_rollups``: the rollups built as `lms rollups backfill`
builds them): organization "bench", device "main" with --rows readings (10 metrics, one a
second, ending now; 10M rows = 11.6 days) and ten other devices with a tenth of that, in a
PostgreSQL with default, durable settings, and one `lms api` process. Every load checks
that each chart holds a full day of 5-minute buckets. Then Debian's
``chromium`` (Playwright for Python, ``executable_path``) signs in once and:

1. **first load**, --loads times: a fresh tab opens ``/#/o/bench/devices/main`` (the page,
   its modules, /auth/me, /orgs, the latest values, then one ``readings/aggregate`` of 24 h
   in 5-minute buckets per metric, four at once, each chart drawn as its answer comes). The
   page marks ``lms:chart-drawn`` when a chart's canvas is first drawn with its history and
   ``lms:charts-loaded`` when every metric's history is in; times are from the navigation's
   start (``performance.timeOrigin``), so they include everything a person waits for.
2. **live chart**: with the page open and its stream subscribed, a device client publishes
   ``{"m00": value}`` --rate times a second for --seconds (through Mosquitto; the API's
   relay hands each message to the page). Measured in the page: animation frames per second
   (requestAnimationFrame; the browser's own frame rate while the chart is updating), the
   chart's redraws per second, its mean and worst draw time, long tasks (> 50 ms, the main
   thread blocked) and the points that reached the chart.

The bridge does not run (nothing is stored; the stream relays from the broker). Results are
printed as Markdown and written as JSON to bench/results/. Everything shares this
machine's cores (browser, API, PostgreSQL, publisher).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import argparse
import asyncio
import json
import os
import shlex
import shutil
import signal
import statistics
import tempfile
import threading
import time
from datetime import UTC, datetime
from typing import Any

import asyncpg
import httpx
from playwright.sync_api import Browser, BrowserContext, Page, ViewportSize, expect, sync_playwright
from playwright.sync_api import Error as PlaywrightError

from bench.api_queries import MAIN, METRICS, ORG, PASSWORD, Bench, machine_info
from bench.common import BenchError, say
from lms_core.provisioning import DeviceCredentials
from tests.harness import Device

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
RESULTS = BENCH / "results"
CHROMIUM = os.environ.get("LMS_CHROMIUM", "/usr/bin/chromium")
EMAIL = "bench@example.com"  # the user bench/api_queries.py registers
VIEWPORT: ViewportSize = {"width": 1280, "height": 860}
PAGE_TIMEOUT_MS = 60_000

#: Installed in the page before the live phase: counts animation frames, long tasks, chart draws.
PROBE = """() => {
  const probe = {frames: 0, longTasks: 0, longestTaskMs: 0, running: true};
  const tick = () => { if (!probe.running) return; probe.frames += 1; requestAnimationFrame(tick); };
  requestAnimationFrame(tick);
  new PerformanceObserver((list) => {
    for (const e of list.getEntries()) {
      probe.longTasks += 1;
      probe.longestTaskMs = Math.max(probe.longestTaskMs, e.duration);
    }
  }).observe({type: 'longtask'});
  window.__probe = probe;
  probe.t0 = performance.now();
}"""

STOP_PROBE = """(metric) => {
  const p = window.__probe; p.running = false;
  const fig = document.querySelector(`figure.chart[data-metric="${metric}"]`);
  return {seconds: (performance.now() - p.t0) / 1000, frames: p.frames, longTasks: p.longTasks,
          longestTaskMs: p.longestTaskMs, draws: Number(fig.querySelector('canvas').dataset.draws),
          drawMs: Number(fig.querySelector('canvas').dataset.drawMs), points: Number(fig.dataset.points)};
}"""

CHART_STATS = """(metric) => {
  // The LineChart writes its counters on its canvas (draws, total draw time).
  const fig = document.querySelector(`figure.chart[data-metric="${metric}"]`);
  const c = fig.querySelector('canvas');
  return {draws: Number(c.dataset.draws), drawMs: Number(c.dataset.drawMs), points: Number(fig.dataset.points)};
}"""


#: The page's marks of one load, and the API calls that started before its first chart
#: (device paths shortened to "…"): where the time went.
MARKS = r"""() => {
  const first = performance.getEntriesByName('lms:chart-drawn')[0].startTime;
  return {
    first, loaded: performance.getEntriesByName('lms:charts-loaded')[0].startTime,
    charts: document.querySelectorAll('figure.chart[data-ready="true"]').length,
    dcl: performance.getEntriesByType('navigation')[0].domContentLoadedEventEnd,
    calls: performance.getEntriesByType('resource')
      .filter((e) => e.name.includes('/api/v1/') && e.startTime <= first)
      .map((e) => ({path: new URL(e.name).pathname.replace(/^\/api\/v1\/orgs\/[^/]+\/devices\/[^/]+/, '…'),
                    start: Math.round(e.startTime), end: Math.round(e.responseEnd)})),
  };
}"""


def signed_in(browser: Browser, url: str) -> tuple[BrowserContext, Page]:
    """A new browser context signed in through the page's own form, and its page."""
    # bypass_csp: the page's CSP forbids eval, which the harness's wait_for_function uses.
    context = browser.new_context(viewport=VIEWPORT, bypass_csp=True)
    page = context.new_page()
    page.goto(url + "/")
    page.get_by_label("Email").fill(EMAIL)
    page.get_by_label("Password").fill(PASSWORD)
    page.get_by_role("button", name="Sign in").click()
    expect(page.locator("#sign-out")).to_be_visible(timeout=PAGE_TIMEOUT_MS)
    return context, page


def first_loads(browser: Browser, url: str, n: int) -> list[dict[str, float]]:
    """Open the device page ``n`` times in a fresh tab of one signed-in context."""
    context, page = signed_in(browser, url)
    page.close()
    out = []
    for i in range(n):
        tab = context.new_page()
        tab.goto(f"{url}/#/o/{ORG}/devices/{MAIN}")
        expect(tab.locator("article.device-page")).to_have_attribute("data-charts-ready", "true",
                                                                       timeout=PAGE_TIMEOUT_MS)
        tab.wait_for_function("performance.getEntriesByName('lms:chart-drawn').length >= 1",
                              timeout=PAGE_TIMEOUT_MS)
        marks = tab.evaluate(MARKS)
        points = tab.evaluate("() => [...document.querySelectorAll('figure.chart')]"
                              ".map((f) => Number(f.dataset.points))")
        if len(points) != len(METRICS) or min(points) < 280:
            raise BenchError(f"load {i + 1}: the charts hold {points} points; a day in 5-minute buckets is 289")
        say(f"  load {i + 1}: first 24 h chart drawn at {marks['first']:.0f} ms, all {marks['charts']} "
            f"metrics' histories in at {marks['loaded']:.0f} ms (DOMContentLoaded {marks['dcl']:.0f} ms)")
        say("    before it: " + ", ".join(f"{c['path']} {c['start']}-{c['end']}" for c in marks["calls"]))
        out.append(marks)
        tab.close()
    context.close()
    return out


def live(browser: Browser, url: str, creds: DeviceCredentials, port: int, seconds: float,
         rate: float) -> dict[str, Any]:
    context, page = signed_in(browser, url)
    page.goto(f"{url}/#/o/{ORG}/devices/{MAIN}")
    article = page.locator("article.device-page")
    expect(article).to_have_attribute("data-charts-ready", "true", timeout=PAGE_TIMEOUT_MS)
    expect(article).to_have_attribute("data-live", "true", timeout=PAGE_TIMEOUT_MS)
    metric = METRICS[0]
    before = page.evaluate(CHART_STATS, metric)
    dev = Device(port, creds)
    if dev.connect().value != 0:
        raise BenchError("the device could not connect")
    try:
        page.evaluate(PROBE)
        sent = 0
        start = time.monotonic()
        while (elapsed := time.monotonic() - start) < seconds:
            due = int(elapsed * rate) + 1
            while sent < due:
                dev.publish("telemetry", json.dumps({metric: 20 + (sent % 50) / 10}), qos=0)
                sent += 1
            time.sleep(max(0.0, (sent / rate) - (time.monotonic() - start)))
        # Let the last points arrive (bounded: the page shows them or the bench fails).
        page.wait_for_function(f"Number(document.querySelector('figure.chart[data-metric=\"{metric}\"]')"
                               f".dataset.points) >= {before['points'] + sent}", timeout=10_000)
        res = page.evaluate(STOP_PROBE, metric)
    finally:
        dev.close()
    draws = res["draws"] - before["draws"]
    result = {"points_sent": sent, "points_shown": res["points"] - before["points"],
              "seconds": round(res["seconds"], 2),
              "animation_fps": round(res["frames"] / res["seconds"], 1),
              "chart_redraws_per_s": round(draws / res["seconds"], 1),
              "long_tasks": res["longTasks"], "longest_task_ms": round(res["longestTaskMs"], 1)}
    result["mean_draw_ms"] = round((res["drawMs"] - before["drawMs"]) / draws, 2) if draws else None
    context.close()
    return result


def run(args: argparse.Namespace, bench: Bench) -> dict[str, Any]:
    assert bench.api is not None
    url = bench.api.url
    with httpx.Client(base_url=url, timeout=60, headers={"Authorization": f"Bearer {bench.token}"}) as c:
        r = c.post(f"/api/v1/orgs/{ORG}/devices/{MAIN}/credentials")
        if r.status_code != 200:
            raise BenchError(f"rotate credentials: {r.status_code} {r.text[:300]}")
        creds = DeviceCredentials(**r.json())
    out: dict[str, Any] = {}
    failure: list[BaseException] = []

    def browse() -> None:
        try:
            with sync_playwright() as p:
                browser = p.chromium.launch(executable_path=CHROMIUM)
                try:
                    say(f"first load of the device page, {args.loads} times")
                    out["loads"] = first_loads(browser, url, args.loads)
                    say(f"live chart: {args.rate:g} points/s for {args.seconds:g} s")
                    out["live"] = live(browser, url, creds, bench.stack.mq.port, args.seconds, args.rate)
                    out["chromium"] = browser.version
                finally:
                    browser.close()
        except BaseException as exc:
            failure.append(exc)

    # Playwright's sync API runs its own event loop: a thread of its own, apart from asyncio.run above.
    t = threading.Thread(target=browse, name="playwright")
    t.start()
    t.join()
    if failure:
        raise failure[0]
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=10_000_000, help="readings of the measured device (default 10M)")
    ap.add_argument("--loads", type=int, default=5, help="first loads of the device page (default 5)")
    ap.add_argument("--seconds", type=float, default=10, help="seconds of the live phase (default 10)")
    ap.add_argument("--rate", type=float, default=10, help="live points per second (default 10)")
    ap.add_argument("--keep", action="store_true", help="keep the temporary folder (logs) after the run")
    args = ap.parse_args()
    if min(args.rows, args.loads) < 1 or args.seconds <= 0 or args.rate <= 0:
        ap.error("all numbers must be positive")
    if not Path(CHROMIUM).exists():
        ap.error(f"{CHROMIUM} is missing: apt-get install chromium (./lms test installs it)")
    command = shlex.join(getattr(sys, "orig_argv", [sys.executable, *sys.argv]))

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, interrupt)

    tmp = Path(tempfile.mkdtemp(prefix="lms-bench-dashboard-"))
    # bench/api_queries.py's data set, built by its own code.
    bench = Bench(argparse.Namespace(rows=args.rows), tmp)
    info: dict[str, Any] = machine_info()
    load: dict[str, Any] = {}
    res: dict[str, Any] = {}
    t_all = time.monotonic()
    ok = False
    try:
        bench.setup()
        load = asyncio.run(bench.load())
        # The loader writes readings straight into the table, past the bridge that keeps the
        # rollups: build them, as `lms rollups backfill` would (without this the aggregate
        # answered from empty rollups plus the raw rows they could not cover).
        load["backfill_s"] = bench.set_rollups(True)
        res = run(args, bench)
        ok = True
    except (TimeoutError, BenchError, AssertionError, asyncpg.PostgresError, httpx.HTTPError, PlaywrightError) as exc:
        say(f"FAILED: {type(exc).__name__}: {exc}")
    except KeyboardInterrupt:
        say("interrupted")
    finally:
        say("tearing down the stack")
        def stop_apis() -> None:
            for a in bench.stack.apis:
                a.stop()

        for part, stop in (("api", stop_apis), ("mosquitto", bench.stack.mq.stop), ("postgres", bench.stack.pg.stop)):
            try:
                stop()
            except BaseException as exc:  # keep tearing down the rest
                say(f"cleanup of {part}: {exc!r}")
        if args.keep:
            say(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    if not ok:
        return 1

    firsts = [m["first"] for m in res["loads"]]
    alls = [m["loaded"] for m in res["loads"]]
    lv = res["live"]
    out = [
        "",
        "## Dashboard benchmark",
        "",
        f"`{ORG}/{MAIN}`: {load['rows_main_device']:,} rows ({load['main_metrics']} metrics x 1 s, "
        f"{load['span_days']} days); {load['rows_total']:,} rows in the table. Headless Chromium {res['chromium']}, "
        f"viewport {VIEWPORT['width']}x{VIEWPORT['height']}, one `lms api` process, all on this machine.",
        "",
        "| first load of the device page (24 h, 5-minute buckets) | median ms | min ms | max ms |",
        "|---|---:|---:|---:|",
        f"| first chart drawn with its history | {statistics.median(firsts):.0f} | {min(firsts):.0f} | "
        f"{max(firsts):.0f} |",
        f"| every metric's history in ({res['loads'][0]['charts']} charts) | {statistics.median(alls):.0f} | "
        f"{min(alls):.0f} | {max(alls):.0f} |",
        "",
        f"Live chart, {args.rate:g} points/s for {lv['seconds']} s: {lv['points_shown']} of {lv['points_sent']} "
        f"points shown; {lv['animation_fps']} animation frames/s; the chart redrew {lv['chart_redraws_per_s']} "
        f"times/s at {lv['mean_draw_ms']} ms a draw; {lv['long_tasks']} long tasks (longest "
        f"{lv['longest_task_ms']} ms).",
        "",
        "Machine: " + ", ".join(f"{k} {v}" for k, v in info.items()),
        "",
        f"Command: `{command}`; total time {time.monotonic() - t_all:.0f} s",
    ]
    print("\n".join(out), flush=True)
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"dashboard-{datetime.now(UTC).strftime('%Y%m%dT%H%M%SZ')}.json"
    path.write_text(json.dumps({"command": command, "args": vars(args), "machine": info, "load": load, **res},
                               indent=2, default=str))
    print(f"\nJSON: {path.relative_to(REPO)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
