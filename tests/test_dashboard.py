"""The dashboard (issue 13) in a real headless Chromium (Debian's ``chromium``, driven by
Playwright for Python) against the real stack: `lms api`, a bridge, Mosquitto, PostgreSQL
and devices that are real MQTT clients on credentials from the API.

Playwright's sync API runs its own event loop; pytest-asyncio keeps a session loop for the
async tests of this suite (asyncio_mode = auto). So each browser runs in a thread of its
own (:func:`in_browser`), never in the thread pytest-asyncio's loop belongs to, and
everything the stack needs that uses asyncio (the harness's queries) happens outside it.

Screenshots land in ``tests/screenshots/`` (README, "Dashboard"); no test sleeps for
correctness: Playwright's ``expect`` waits for what the page must show.
"""

from __future__ import annotations

import json
import os
import re
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from playwright.sync_api import Browser, Page, ViewportSize, expect, sync_playwright

from lms_core.provisioning import DeviceCredentials
from tests.harness import REPO, ApiProcess, Stack, wait_until
from tests.test_api_access import PASSWORD, User
from tests.test_api_commands import Org, Responder, answer_ok

CHROMIUM = os.environ.get("LMS_CHROMIUM", "/usr/bin/chromium")
SHOTS = REPO / "tests" / "screenshots"
DESKTOP: ViewportSize = {"width": 1280, "height": 860}
PHONE: ViewportSize = {"width": 390, "height": 844}
HOSTILE = "<img src=x onerror=alert(1)>"
#: How long the page may take for what the bridge must first store and evaluate.
STORED_S = 15_000


def in_browser(body: Callable[[Browser], None], timeout: float = 180) -> None:
    """Run ``body(browser)`` with a fresh headless Chromium in a thread of its own, and
    re-raise whatever it raised."""
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing: ./lms installs it (apt-get install chromium)")
    failure: list[BaseException] = []

    def run() -> None:
        try:
            with sync_playwright() as p:
                browser = p.chromium.launch(executable_path=CHROMIUM)
                try:
                    body(browser)
                finally:
                    browser.close()
        except BaseException as exc:  # handed to the test's thread below
            failure.append(exc)

    thread = threading.Thread(target=run, name="playwright")
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        raise AssertionError(f"the browser did not finish within {timeout} s")
    if failure:
        raise failure[0]


def new_page(browser: Browser, **kw: Any) -> Page:
    page = browser.new_context(viewport=kw.pop("viewport", DESKTOP), **kw).new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.errors = errors  # type: ignore[attr-defined]
    return page


def sign_in(page: Page, api: ApiProcess, email: str, remember: bool = False) -> None:
    page.goto(api.url + "/")
    page.get_by_label("Email").fill(email)
    page.get_by_label("Password").fill(PASSWORD)
    if remember:
        page.get_by_label("Remember me for 30 days").check()
    page.get_by_role("button", name="Sign in").click()
    expect(page.locator("#sign-out")).to_be_visible()


def open_device(page: Page, api: ApiProcess, org: str, device: str) -> None:
    page.goto(f"{api.url}/#/o/{org}/devices")
    page.locator(f"li.device[data-device='{device}'] a.device-name").click()
    expect(page.locator("article.device-page")).to_have_attribute("data-live", "true")


def no_page_errors(page: Page) -> None:
    assert page.errors == [], page.errors  # type: ignore[attr-defined]


@pytest.fixture
def org(api: ApiProcess, stack: Stack, unique: str) -> Iterator[Org]:
    o = Org(api, stack, unique)
    yield o
    o.close()


def stamped(metric: str, value: float, ago_s: float = 60) -> str:
    return json.dumps({"ts": int((time.time() - ago_s) * 1000), "values": {metric: value}})


def stored(org: Org, device: str, metric: str) -> bool:
    r = org.call("GET", f"/devices/{device}/latest")
    return r.status_code == 200 and any(x["metric"] == metric for x in r.json())


# -- 1 ----------------------------------------------------------------------------------

def test_a_value_published_through_the_broker_appears_on_the_chart_within_two_seconds(
        org: Org, api: ApiProcess) -> None:
    dev = org.responder("pump-1")
    for i in range(5):
        dev.publish_wait("telemetry", stamped("temp", 20 + i, ago_s=600 - 60 * i))
    wait_until(lambda: stored(org, "pump-1", "temp"), 15, "the history to be stored")

    def body(browser: Browser) -> None:
        page = new_page(browser)
        sign_in(page, api, org.owner.email)
        open_device(page, api, org.slug, "pump-1")
        fig = page.locator("figure.chart[data-metric='temp']")
        expect(fig).to_have_attribute("data-ready", "true")
        assert int(fig.get_attribute("data-points") or 0) >= 1  # the history, from readings/aggregate
        page.evaluate("window.__sameDocument = true")
        draws = int(page.locator("figure[data-metric='temp'] canvas").get_attribute("data-draws") or 0)
        started = time.monotonic()
        dev.publish("telemetry", json.dumps({"temp": 42.75}))
        expect(fig).to_have_attribute("data-last", "42.75", timeout=2000)
        elapsed = time.monotonic() - started
        expect(fig.locator("figcaption .last")).to_contain_text("42.75")
        # Drawn on the canvas, without reloading the page.
        expect(fig.locator("canvas")).not_to_have_attribute("data-draws", str(draws))
        assert page.evaluate("window.__sameDocument") is True
        assert elapsed < 2, elapsed
        # A new metric gets its own chart, live too.
        dev.publish("telemetry", json.dumps({"hum": 55}))
        expect(page.locator("figure.chart[data-metric='hum']")).to_have_attribute("data-last", "55", timeout=2000)
        no_page_errors(page)

    in_browser(body)


# -- 2 ----------------------------------------------------------------------------------

def slow_ping(cmd: dict[str, Any]) -> list[tuple[float, dict[str, Any]]]:
    """Answer a ping after a while, so the page shows it pending first."""
    if cmd["name"] == "ping":
        return [(1.5, {"status": "ok", "result": {"pong": True, "uptime_s": 1234}})]
    return answer_ok(cmd)


def test_ping_from_the_command_panel_goes_pending_then_succeeded_with_its_result(
        org: Org, api: ApiProcess) -> None:
    dev = org.responder("pump-1", script=slow_ping)

    def body(browser: Browser) -> None:
        page = new_page(browser)
        sign_in(page, api, org.owner.email)
        open_device(page, api, org.slug, "pump-1")
        expect(page.get_by_label("Command", exact=True)).to_have_value("ping")
        page.get_by_role("button", name="Send").click()
        row = page.locator("li.command").first
        expect(row).to_have_attribute("data-state", "pending")
        expect(row.locator(".badge")).to_have_text("pending")
        expect(row).to_have_attribute("data-state", "succeeded", timeout=10_000)
        expect(row.locator(".badge")).to_have_text("succeeded")
        expect(row.locator(".result")).to_contain_text('"uptime_s": 1234')
        no_page_errors(page)

    in_browser(body)
    assert [c["name"] for c in dev.commands] == ["ping"]
    cmd = org.call("GET", "/devices/pump-1/commands").json()[0]
    assert cmd["state"] == "succeeded" and cmd["reply"]["result"] == {"pong": True, "uptime_s": 1234}


# -- 3 ----------------------------------------------------------------------------------

def test_a_threshold_crossing_shows_a_firing_alert_in_the_feed_and_it_is_acknowledged(
        org: Org, api: ApiProcess) -> None:
    dev = org.responder("pump-1")
    r = org.call("POST", "/rules", {"name": "hot pump", "metric": "temp", "comparison": ">", "threshold": 30,
                                    "severity": "critical", "scope": {"device": "pump-1"}})
    assert r.status_code == 201, r.text

    def body(browser: Browser) -> None:
        page = new_page(browser)
        sign_in(page, api, org.owner.email)
        page.goto(f"{api.url}/#/o/{org.slug}/alerts")
        feed = page.locator("section.alerts-page")
        expect(feed).to_have_attribute("data-live", "true")
        expect(feed).to_have_attribute("data-loaded", "true")
        expect(page.locator("li.alert")).to_have_count(0)
        dev.publish("telemetry", json.dumps({"temp": 35.5}))
        alert = page.locator("li.alert", has_text="hot pump")
        expect(alert).to_have_attribute("data-state", "firing", timeout=STORED_S)
        expect(alert).to_contain_text("35.5")
        expect(alert).to_contain_text("critical")
        # Severity filter: another severity hides it, its own shows it.
        page.get_by_label("Severity").select_option("minor")
        expect(page.locator("li.alert")).to_have_count(0)
        page.get_by_label("Severity").select_option("critical")
        expect(alert).to_be_visible()
        alert.get_by_role("button", name="Acknowledge").click()
        expect(alert.locator(".ack")).to_contain_text(f"acknowledged by {org.owner.email}")
        no_page_errors(page)

    in_browser(body)
    alerts = org.call("GET", "/alerts").json()
    assert len(alerts) == 1 and alerts[0]["acknowledged_by"] == org.owner.email


# -- 4 ----------------------------------------------------------------------------------

#: What a viewer's page must not offer: (path after the org, selector).
ADMIN_CONTROLS = [
    ("devices", "#nav-admin"), ("devices", "#add-device"),
    ("devices/pump-1", "#rotate"), ("devices/pump-1", "#toggle-enabled"), ("devices/pump-1", "#send-command"),
    ("devices/pump-1", "#config-edit"), ("alerts", "button.ack-button"),
]

#: Admin calls a viewer's page forces through fetch (cookie + CSRF header, as the page would).
FORCED = """async ([org, alertId, email]) => {
  const csrf = document.cookie.split('; ').find((c) => c.startsWith('lms_csrf=')).split('=')[1];
  const call = async (method, path, body) => {
    const r = await fetch('/api/v1/orgs/' + org + path, {method, credentials: 'same-origin',
      headers: {'X-CSRF-Token': csrf, 'Content-Type': 'application/json'},
      body: body === undefined ? undefined : JSON.stringify(body)});
    return [method + ' ' + path, r.status];
  };
  return Promise.all([
    call('POST', '/devices', {slug: 'forced'}),
    call('POST', '/devices/pump-1/disable'),
    call('POST', '/devices/pump-1/credentials'),
    call('PUT', '/devices/pump-1/config', {interval_s: 1}),
    call('POST', '/devices/pump-1/commands', {name: 'reboot'}),
    call('POST', '/alerts/' + alertId + '/acknowledge'),
    call('PUT', '/members/' + encodeURIComponent(email), {role: 'owner'}),
    call('POST', '/api-keys', {name: 'k', role: 'viewer'}),
    call('POST', '/rules', {name: 'r', metric: 'temp', comparison: '>', threshold: 1, scope: {org: true}}),
    call('POST', '/webhooks', {url: 'https://hooks.example.com/x'}),
    call('POST', '/mqtt-credentials', {label: 'x'}),
  ]);
}"""


def test_a_viewer_sees_no_admin_controls_and_the_api_refuses_them_when_forced(
        org: Org, api: ApiProcess, unique: str) -> None:
    dev = org.responder("pump-1")
    viewer = User(api, f"viewer-{unique}@example.com")
    viewer.client.close()
    assert org.call("PUT", f"/members/{viewer.email}", {"role": "viewer"}).status_code == 200
    assert org.call("POST", "/rules", {"name": "hot", "metric": "temp", "comparison": ">", "threshold": 30,
                                       "scope": {"org": True}}).status_code == 201
    dev.publish_wait("telemetry", json.dumps({"temp": 31}))
    alert_id = wait_until(lambda: [a["id"] for a in org.call("GET", "/alerts").json()], 15, "the alert")[0]

    def body(browser: Browser) -> None:
        # The owner's page has them (so their absence below means something).
        owner = new_page(browser)
        sign_in(owner, api, org.owner.email)
        for path, selector in ADMIN_CONTROLS:
            owner.goto(f"{api.url}/#/o/{org.slug}/{path}")
            expect(owner.locator(selector).first).to_be_visible()

        page = new_page(browser)
        sign_in(page, api, viewer.email)
        expect(page.locator(".role")).to_have_text("viewer")
        for path, selector in ADMIN_CONTROLS:
            page.goto(f"{api.url}/#/o/{org.slug}/{path}")
            if path == "alerts":
                expect(page.locator("li.alert")).to_have_count(1)
                expect(page.locator("li.alert")).to_contain_text("not acknowledged")
            elif path.startswith("devices/"):
                expect(page.locator("article.device-page")).to_have_attribute("data-live", "true")
                expect(page.get_by_role("heading", name="Commands")).to_be_visible()
            else:
                expect(page.locator("li.device")).to_have_count(1)
            expect(page.locator(selector)).to_have_count(0)
        page.goto(f"{api.url}/#/o/{org.slug}/admin/members")
        expect(page.locator("main")).to_contain_text("The viewer role has no administration here.")
        answers = page.evaluate(FORCED, [org.slug, alert_id, viewer.email])
        assert all(status == 403 for _, status in answers), answers
        no_page_errors(page)

    in_browser(body)
    device = org.call("GET", "/devices/pump-1").json()
    assert device["enabled"] is True
    assert org.call("GET", "/devices/forced").status_code == 404
    assert org.call("GET", "/alerts").json()[0]["acknowledged_at"] is None
    assert org.call("GET", "/devices/pump-1/commands").json() == []


# -- 5 ----------------------------------------------------------------------------------

#: Elements hostile strings would have become if parsed as HTML.
INJECTED = "img, script:not([src]), svg, iframe, b, marquee, [onerror], [onload]"


def test_hostile_names_and_payload_strings_render_as_text(org: Org, api: ApiProcess) -> None:
    r = org.owner.call("POST", f"/api/v1/orgs/{org.slug}/devices", {"slug": "evil", "name": HOSTILE})
    assert r.status_code == 201, r.text
    dev = Responder(org.stack.mq.port, DeviceCredentials(**r.json()["credentials"]))
    org.devices.append(dev)
    assert dev.connect().value == 0
    script = "<script>alert(2)</script>"
    dev.publish_wait("telemetry", json.dumps({"temp": 99, "note": script}))
    dev.publish_wait("events", json.dumps({"type": "boot", "data": {"msg": "<svg onload=alert(3)>"}}))
    dev.publish_wait("config/reported", json.dumps({"version": 0, "label": "<iframe src=javascript:alert(4)>"}))
    assert org.call("POST", "/rules", {"name": "<b onmouseover=alert(5)>hot</b>", "metric": "temp", "comparison": ">",
                                       "threshold": 50, "scope": {"org": True}}).status_code == 201
    dev.publish_wait("telemetry", json.dumps({"temp": 100}))
    wait_until(lambda: org.call("GET", "/alerts").json(), 15, "the alert")
    wait_until(lambda: stored(org, "evil", "note"), 15, "the text value")

    # The page: a strict policy, no inline script, nothing of the data in it.
    page_answer = httpx.get(api.url + "/", timeout=10)
    csp = page_answer.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "unsafe" not in csp and "default-src 'none'" in csp, csp
    assert re.search(r"connect-src 'self' ws://127\.0\.0\.1:(\d+) wss://127\.0\.0\.1:\1;", csp), csp
    # A Host header that is not a plain host[:port] never reaches the policy.
    forged = httpx.get(api.url + "/", headers={"Host": "x'*"}, timeout=10)
    assert forged.status_code == 200, forged.status_code
    assert "connect-src 'self'; " in forged.headers["content-security-policy"]
    assert page_answer.headers["x-content-type-options"] == "nosniff"
    assert not re.search(r"<script(?![^>]*(src=|type=\"application/json\"))", page_answer.text)

    def body(browser: Browser) -> None:
        page = new_page(browser)
        dialogs: list[str] = []

        def dialog(d: Any) -> None:
            dialogs.append(d.message)
            d.dismiss()

        page.on("dialog", dialog)
        sign_in(page, api, org.owner.email)
        page.goto(f"{api.url}/#/o/{org.slug}/devices")
        expect(page.locator("li.device[data-device='evil'] .device-name")).to_have_text(HOSTILE)
        expect(page.locator("li.device[data-device='evil']")).to_contain_text(script)
        assert page.locator(f"main :is({INJECTED})").count() == 0
        open_device(page, api, org.slug, "evil")
        expect(page.locator("h1")).to_contain_text(HOSTILE)
        expect(page.locator("dl.text-values")).to_contain_text(script)
        expect(page.locator("ol.events")).to_contain_text("<svg onload=alert(3)>")
        expect(page.locator("#config-reported")).to_contain_text("<iframe src=javascript:alert(4)>")
        expect(page.locator("main")).to_contain_text("<b onmouseover=alert(5)>hot</b>")
        # Live frames too: an event arriving over the stream.
        dev.publish("events", json.dumps({"type": "note", "data": {"html": "<img src=x onerror=alert(6)>"}}))
        expect(page.locator("ol.events")).to_contain_text("<img src=x onerror=alert(6)>")
        assert page.locator(f"main :is({INJECTED})").count() == 0
        page.goto(f"{api.url}/#/o/{org.slug}/alerts")
        expect(page.locator("li.alert")).to_contain_text("<b onmouseover=alert(5)>hot</b>")
        assert page.locator(f"main :is({INJECTED})").count() == 0
        assert dialogs == []
        no_page_errors(page)

    in_browser(body)


# -- 6 ----------------------------------------------------------------------------------

def test_screenshots_of_the_device_page_and_the_alerts_feed_at_desktop_and_phone_width(
        org: Org, api: ApiProcess) -> None:
    SHOTS.mkdir(parents=True, exist_ok=True)
    dev = org.responder("pump-1", tags=["pumps", "north"])
    org.device("valve-2", tags=["north"])
    now = time.time()
    history = [{"ts": int((now - 3600 * 20 + 300 * i) * 1000),
                "values": {"temp": round(22 + 6 * ((i % 48) / 48), 2), "pressure": 1.2 + (i % 5) / 10}}
               for i in range(240)]
    dev.publish_many([json.dumps(p).encode() for p in history])
    dev.publish_wait("events", json.dumps({"type": "boot", "data": {"firmware": "1.4.2", "reset": "power-on"}}))
    org.call("PUT", "/devices/pump-1/config", {"interval_s": 30, "threshold": 28})
    assert org.call("POST", "/rules", {"name": "hot pump", "metric": "temp", "comparison": ">", "threshold": 30,
                                       "severity": "major", "scope": {"tag": "pumps"}}).status_code == 201
    dev.publish_wait("telemetry", json.dumps({"temp": 31.5, "pressure": 1.4}))
    wait_until(lambda: org.call("GET", "/alerts").json(), 15, "the alert")
    org.call("POST", "/devices/pump-1/commands?wait=10", {"name": "ping"})

    def body(browser: Browser) -> None:
        for scheme in ("light", "dark"):
            for name, viewport in (("desktop", DESKTOP), ("phone", PHONE)):
                page = new_page(browser, viewport=viewport, color_scheme=scheme,
                                is_mobile=name == "phone", has_touch=name == "phone")
                sign_in(page, api, org.owner.email, remember=True)
                open_device(page, api, org.slug, "pump-1")
                expect(page.locator("article.device-page")).to_have_attribute("data-charts-ready", "true")
                expect(page.locator("li.command").first).to_have_attribute("data-state", "succeeded")
                expect(page.locator("#config-desired")).to_contain_text('"interval_s": 30')
                fits(page)
                page.screenshot(path=str(SHOTS / f"device-{name}-{scheme}.png"), full_page=True)
                page.goto(f"{api.url}/#/o/{org.slug}/alerts")
                expect(page.locator("li.alert")).to_have_count(1)
                fits(page)
                page.screenshot(path=str(SHOTS / f"alerts-{name}-{scheme}.png"), full_page=True)
                no_page_errors(page)
                page.context.close()
        for shot in ("device", "alerts"):
            for name in ("desktop", "phone"):
                for scheme in ("light", "dark"):
                    assert (SHOTS / f"{shot}-{name}-{scheme}.png").stat().st_size > 10_000

    in_browser(body)


def fits(page: Page) -> None:
    """Nothing wider than the screen (a phone must not scroll sideways) and every control labelled."""
    overflow = page.evaluate("document.documentElement.scrollWidth - window.innerWidth")
    assert overflow <= 0, f"the page is {overflow} px wider than the screen"
    unlabelled = page.evaluate("""[...document.querySelectorAll('input, select, textarea, button')]
        .filter((e) => !(e.labels && e.labels.length) && !e.getAttribute('aria-label') && !e.textContent.trim())
        .map((e) => e.outerHTML.slice(0, 80))""")
    assert unlabelled == [], unlabelled


def test_keyboard_only_sign_in_and_navigation(org: Org, api: ApiProcess) -> None:
    org.responder("pump-1")

    def body(browser: Browser) -> None:
        page = new_page(browser)
        page.goto(api.url + "/")
        expect(page.get_by_label("Email")).to_be_focused()
        page.keyboard.type(org.owner.email)
        page.keyboard.press("Tab")
        page.keyboard.type(PASSWORD)
        page.keyboard.press("Tab")
        page.keyboard.press("Space")
        expect(page.get_by_label("Remember me for 30 days")).to_be_checked()
        page.keyboard.press("Enter")
        expect(page.locator("li.device[data-device='pump-1']")).to_be_visible()
        # Tab to the device's link and open it with Enter.
        for _ in range(40):
            page.keyboard.press("Tab")
            if page.evaluate("document.activeElement.classList.contains('device-name')"):
                break
        page.keyboard.press("Enter")
        expect(page.locator("article.device-page")).to_have_attribute("data-device", "pump-1")
        # Remember me: the session cookie lasts 30 days.
        cookie = next(c for c in page.context.cookies() if c["name"] == "lms_session")
        assert cookie["expires"] - time.time() > 29 * 86400
        assert cookie["httpOnly"] and cookie["sameSite"] == "Lax"
        no_page_errors(page)

    in_browser(body)
