"""Alert rules, alerts and webhooks through REST (issue 9, the API's half), against the real
API, database and broker. Alerts are inserted with SQL where a test needs them: the rule
engine that raises them lives in the bridge (bridge/rules.py) and has tests of its own."""

from __future__ import annotations

import json
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from tests.harness import ApiProcess, Stack, stop_client, wait_until
from tests.test_api_access import User
from tests.test_api_commands import Org

THRESHOLD = {"name": "hot", "metric": "temp", "comparison": ">", "threshold": 30, "scope": {"org": True}}
#: A public address, taken without a name lookup; webhooks made with it stay disabled, so
#: nothing ever tries to reach it.
PUBLIC_URL = "http://93.184.216.34/hook"


@pytest.fixture
def org(api: ApiProcess, stack: Stack, unique: str) -> Iterator[Org]:
    o = Org(api, stack, unique)
    yield o
    o.close()


def member(org: Org, role: str) -> User:
    user = User(org.api, f"{org.slug}-{role}@example.com")
    assert org.call("PUT", f"/members/{user.email}", {"role": role}).status_code == 200
    return user


def insert_alert(stack: Stack, org: str, device: str, *, rule_id: int | None = None, state: str = "firing",
                 severity: str = "warning", fired_at: datetime | None = None, value: float = 31.0,
                 rule_name: str = "hot") -> int:
    """An alert row as the bridge writes one."""
    return int(stack.scalar(
        """INSERT INTO alerts (org_id, rule_id, device_id, rule_name, kind, severity, metric, state, value, fired_at,
                               fired_evaluated_at, resolved_at, resolved_evaluated_at, resolved_reason)
           SELECT o.id, $3, d.id, $8, 'threshold', $4, 'temp', $5, $6, $7::timestamptz, now(),
                  CASE WHEN $5::text = 'resolved' THEN $7::timestamptz END,
                  CASE WHEN $5::text = 'resolved' THEN now() END,
                  CASE WHEN $5::text = 'resolved' THEN 'condition cleared' END
           FROM organizations o JOIN devices d ON d.org_id = o.id WHERE o.slug = $1 AND d.slug = $2
           RETURNING id""",
        org, device, rule_id, severity, state, value, fired_at or datetime.now(UTC), rule_name))


def audit_actions(stack: Stack, org: str, prefix: str) -> list[str]:
    return [r["action"] for r in stack.query(
        """SELECT a.action FROM audit_log a JOIN organizations o ON o.id = a.org_id
           WHERE o.slug = $1 AND a.action LIKE $2 ORDER BY a.id""", org, prefix + "%")]


class AlertWatcher:
    """The platform's alert messages of one organization: a subscriber on
    ``lms/{org}/+/alerts``, and the ``mqtt_outbox`` rows a bridge has not published yet —
    whichever shows a message first (this branch's bridge has no outbox publisher)."""

    def __init__(self, stack: Stack, org: str) -> None:
        self.stack, self.org = stack, org
        url = stack.mqtt_url
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"watch-{org}", protocol=paho.MQTTv5)
        self.client.username_pw_set(url.username, url.password)
        self.received: list[tuple[str, dict[str, Any]]] = []
        self.client.on_message = lambda c, u, m: self.received.append((m.topic, json.loads(m.payload)))
        subscribed: list[int] = []
        self.client.on_subscribe = lambda c, u, mid, rc, p: subscribed.append(mid)
        self.client.connect("127.0.0.1", stack.mq.port)
        self.client.loop_start()
        self.client.subscribe(f"lms/{org}/+/alerts", qos=1)
        wait_until(lambda: subscribed, 10, "the alert watcher's subscription")

    def messages(self) -> list[tuple[str, dict[str, Any]]]:
        queued = [(r["topic"], json.loads(r["payload"])) for r in self.stack.query(
            "SELECT topic, payload FROM mqtt_outbox WHERE topic LIKE $1 ORDER BY id", f"lms/{self.org}/%")]
        return queued + self.received

    def close(self) -> None:
        self.client.disconnect()
        stop_client(self.client)


# -- rules -------------------------------------------------------------------------------

def rule(**changes: Any) -> dict[str, Any]:
    return {k: v for k, v in {**THRESHOLD, **changes}.items() if v is not ...}


@pytest.mark.parametrize(("body", "says"), [
    (rule(comparison="=>"), "comparison"),
    (rule(severity="fatal"), "severity"),
    (rule(kind="anomaly"), "kind"),
    (rule(clear_threshold=35), "wrong side"),
    (rule(comparison=">=", clear_threshold=30.5), "wrong side"),
    (rule(comparison="<", threshold=10, clear_threshold=5), "wrong side"),
    (rule(comparison="<=", threshold=10, clear_threshold=9.99), "wrong side"),
    (rule(comparison="==", threshold=1, clear_threshold=1), "takes no clear_threshold"),
    (rule(comparison="!=", threshold=1, clear_threshold=0), "takes no clear_threshold"),
    (rule(duration_s=-1), "duration_s"),
    (rule(cooldown_s=-5), "cooldown_s"),
    (rule(duration_s=10**10), "duration_s"),
    (rule(metric=...), "needs a metric"),
    (rule(metric=None), "needs a metric"),
    (rule(comparison=...), "needs a comparison"),
    (rule(threshold=...), "needs a threshold"),
    (rule(metric="bad metric!"), "not a metric name"),
    (rule(metric="temp\u00e9"), "not a metric name"),
    (rule(metric="x" * 129), "not a metric name"),
    (rule(metric=""), "metric"),
    (rule(scope={}), "exactly one"),
    (rule(scope={"device": "a", "tag": "b"}), "exactly one"),
    (rule(scope={"org": False}), "org"),
    (rule(scope={"site": "x"}), "site"),
    (rule(scope=...), "scope"),
    (rule(scope={"device": "no-such-device"}), "not found in this organization"),
    (rule(scope={"asset": "no-such-asset"}), "not found in this organization"),
    (rule(scope={"device": "Bad Slug"}), "device"),
    (rule(kind="no_data", metric=..., comparison=..., threshold=..., duration_s=0), "duration_s of at least 1"),
    (rule(kind="no_data", duration_s=60), "takes no metric"),
    (rule(kind="offline", metric=..., comparison=..., threshold=..., clear_threshold=1, duration_s=60),
     "takes no clear_threshold"),
    (rule(name=""), "name"),
    (rule(unknown=1), "unknown"),
])
def test_a_bad_rule_is_422_saying_what_is_wrong(org: Org, body: dict[str, Any], says: str) -> None:
    r = org.call("POST", "/rules", body)
    assert r.status_code == 422, r.text
    error = r.json()["error"]
    assert says in (error["message"] + json.dumps(error.get("details", ""))), error
    assert org.call("GET", "/rules").json() == []


@pytest.mark.parametrize("threshold", [b"NaN", b"Infinity", b"-Infinity", b"1e999"])
def test_a_threshold_that_is_not_a_finite_number_is_refused(org: Org, threshold: bytes) -> None:
    body = json.dumps({**THRESHOLD, "threshold": 0}).replace('"threshold": 0', '"threshold": %s')
    r = org.owner.client.post(f"{org.base}/rules", content=body.encode() % threshold,
                              headers={"Content-Type": "application/json"})
    assert r.status_code in (400, 422), r.text
    assert org.call("GET", "/rules").json() == []


def test_a_clear_threshold_equal_to_the_threshold_is_no_hysteresis_and_allowed(org: Org) -> None:
    for comparison in (">", ">=", "<", "<="):
        r = org.call("POST", "/rules", rule(comparison=comparison, clear_threshold=30))
        assert r.status_code == 201, r.text
    r = org.call("POST", "/rules", rule(clear_threshold=28, name="hysteresis"))
    assert r.status_code == 201 and r.json()["clear_threshold"] == 28


def test_a_scope_naming_another_organizations_device_or_asset_is_422_like_a_missing_one(
        org: Org, api: ApiProcess, stack: Stack, unique: str) -> None:
    other = Org(api, stack, f"{unique}-b")
    try:
        other.device("their-pump")
        assert other.call("POST", "/assets", {"slug": "their-site"}).status_code == 201
        for scope, missing in (({"device": "their-pump"}, {"device": "nothing-here"}),
                               ({"asset": "their-site"}, {"asset": "nothing-here"})):
            r = org.call("POST", "/rules", rule(scope=scope))
            m = org.call("POST", "/rules", rule(scope=missing))
            assert r.status_code == m.status_code == 422, r.text
            name = next(iter(scope.values()))
            assert r.json()["error"]["message"].replace(name, "X") == \
                m.json()["error"]["message"].replace("nothing-here", "X")
        # Nor by changing a rule of one's own.
        rid = org.call("POST", "/rules", THRESHOLD).json()["id"]
        assert org.call("PATCH", f"/rules/{rid}", {"scope": {"device": "their-pump"}}).status_code == 422
        assert org.call("GET", f"/rules/{rid}").json()["scope"] == {"org": True}
    finally:
        other.close()


def test_rules_crud_scopes_pages_and_audit(org: Org, stack: Stack) -> None:
    org.device("pump-1", ["pumps"])
    assert org.call("POST", "/assets", {"slug": "north"}).status_code == 201
    version = stack.scalar("SELECT n FROM rules_version")
    made = []
    for scope in ({"device": "pump-1"}, {"tag": "pumps"}, {"asset": "north"}, {"org": True}):
        r = org.call("POST", "/rules", rule(name=f"on {scope}", scope=scope, clear_threshold=28, duration_s=60,
                                            cooldown_s=300, severity="critical"))
        assert r.status_code == 201, r.text
        body = r.json()
        assert body["scope"] == scope and body["firing"] == 0 and body["enabled"] is True
        assert (body["metric"], body["comparison"], body["threshold"], body["clear_threshold"]) == \
            ("temp", ">", 30, 28)
        made.append(body)
    no_data = org.call("POST", "/rules", {"name": "silent", "kind": "no_data", "duration_s": 120,
                                          "scope": {"tag": "pumps"}, "severity": "major"})
    assert no_data.status_code == 201 and no_data.json()["metric"] is None, no_data.text
    assert stack.scalar("SELECT n FROM rules_version") > version  # the bridge reloads on it

    listed = org.call("GET", "/rules").json()
    assert [r["id"] for r in listed] == [r["id"] for r in made] + [no_data.json()["id"]]
    page = org.call("GET", f"/rules?limit=2&after={listed[1]['id']}").json()
    assert [r["id"] for r in page] == [r["id"] for r in listed[2:4]]
    assert org.call("GET", f"/rules/{made[0]['id']}").json() == made[0]

    # An update is merged over the rule and checked whole.
    rid = made[0]["id"]
    r = org.call("PATCH", f"/rules/{rid}", {"threshold": 25})
    assert r.status_code == 422 and "wrong side" in r.text  # clear 28 > threshold 25
    r = org.call("PATCH", f"/rules/{rid}", {"threshold": 25, "clear_threshold": None, "name": "warm"})
    assert r.status_code == 200, r.text
    assert (r.json()["threshold"], r.json()["clear_threshold"], r.json()["name"]) == (25, None, "warm")
    assert r.json()["duration_s"] == 60 and r.json()["scope"] == {"device": "pump-1"}
    assert org.call("PATCH", f"/rules/{rid}", {"comparison": "=="}).status_code == 200
    assert org.call("PATCH", f"/rules/{rid}", {"clear_threshold": 1}).status_code == 422
    assert org.call("PATCH", f"/rules/{rid}", {"bogus": 1}).status_code == 422
    assert org.call("PATCH", "/rules/999999", {"name": "x"}).status_code == 404

    assert org.call("DELETE", f"/rules/{rid}").status_code == 204
    assert org.call("GET", f"/rules/{rid}").status_code == 404
    assert org.call("DELETE", f"/rules/{rid}").status_code == 404
    assert audit_actions(stack, org.slug, "rule.") == ["rule.created"] * 5 + ["rule.updated"] * 2 + ["rule.deleted"]


def test_rules_per_organization_are_limited(stack: Stack, unique: str) -> None:
    api = stack.start_api(LMS_RULES_MAX_PER_ORG="2")
    org = Org(api, stack, unique)
    try:
        # A burst of creates at once cannot overshoot the limit.
        with ThreadPoolExecutor(8) as pool:
            statuses = sorted(pool.map(lambda i: org.call("POST", "/rules", rule(name=f"r{i}")).status_code,
                                       range(8)))
        assert statuses == [201, 201] + [422] * 6
        r = org.call("POST", "/rules", rule(name="one too many"))
        assert r.status_code == 422 and "LMS_RULES_MAX_PER_ORG" in r.text
        assert len(org.call("GET", "/rules").json()) == 2
    finally:
        org.close()
        api.stop()
        stack.apis.remove(api)


def test_deleting_a_rule_resolves_its_firing_alerts_with_their_notifications(org: Org, stack: Stack) -> None:
    org.device("pump-1")
    org.device("pump-2")
    rid = org.call("POST", "/rules", rule(severity="major")).json()["id"]
    keep = org.call("POST", "/rules", rule(name="other")).json()["id"]
    firing = [insert_alert(stack, org.slug, d, rule_id=rid, severity="major") for d in ("pump-1", "pump-2")]
    old = insert_alert(stack, org.slug, "pump-1", rule_id=rid, state="resolved", severity="major",
                       fired_at=datetime.now(UTC) - timedelta(hours=1))
    other = insert_alert(stack, org.slug, "pump-1", rule_id=keep)
    # Webhooks (rows, so that the shared bridge's sender refuses them without a request: 192.0.2.1
    # is a documentation address): one takes major alerts, one only critical ones, one is off.
    hooks = [stack.scalar(
        """INSERT INTO webhooks (org_id, url, secret, severities, enabled)
           SELECT id, 'http://192.0.2.1/hook', 's', $2, $3 FROM organizations WHERE slug = $1 RETURNING id""",
        org.slug, sev, on) for sev, on in ((["major", "critical"], True), (["critical"], True), (["major"], False))]
    watcher = AlertWatcher(stack, org.slug)
    try:
        assert org.call("GET", f"/rules/{rid}").json()["firing"] == 2
        assert org.call("DELETE", f"/rules/{rid}").status_code == 204

        for aid in firing:
            a = org.call("GET", f"/alerts/{aid}").json()
            assert a["state"] == "resolved" and a["resolved_reason"] == "rule deleted", a
            assert a["rule_id"] is None and a["rule"] == "hot" and a["resolved_at"]
        assert org.call("GET", f"/alerts/{old}").json()["resolved_reason"] == "condition cleared"
        assert org.call("GET", f"/alerts/{other}").json()["state"] == "firing"

        got = wait_until(lambda: len(m := watcher.messages()) >= 2 and m, 10, "the alert messages")
        assert sorted((t, p["alert_id"], p["state"], p["severity"]) for t, p in got) == sorted(
            (f"lms/{org.slug}/pump-{i + 1}/alerts", aid, "resolved", "major") for i, aid in enumerate(firing))
        deliveries = stack.query("SELECT webhook_id, alert_id, body FROM webhook_deliveries WHERE webhook_id = ANY($1)",
                                 hooks)
        assert sorted((d["webhook_id"], d["alert_id"]) for d in deliveries) == [(hooks[0], a) for a in firing]
        event = json.loads(deliveries[0]["body"])
        assert event["event"] == "alert.resolved"
        assert event["alert"]["org"] == org.slug and event["alert"]["resolved_reason"] == "rule deleted"
        assert event["alert"]["severity"] == "major" and event["alert"]["rule"] == "hot"
        detail = json.loads(stack.scalar(
            """SELECT a.detail FROM audit_log a JOIN organizations o ON o.id = a.org_id
               WHERE o.slug = $1 AND a.action = 'rule.deleted'""", org.slug))
        assert detail == {"rule_id": rid, "resolved_alerts": 2}
        assert stack.scalar("SELECT count(*) FROM rule_state WHERE rule_id = $1", rid) == 0
    finally:
        watcher.close()


def test_disabling_or_changing_what_a_rule_watches_resolves_its_alerts(org: Org, stack: Stack) -> None:
    org.device("pump-1")
    rid = org.call("POST", "/rules", THRESHOLD).json()["id"]
    first = insert_alert(stack, org.slug, "pump-1", rule_id=rid)
    assert org.call("PATCH", f"/rules/{rid}", {"name": "renamed", "severity": "critical"}).status_code == 200
    assert org.call("GET", f"/alerts/{first}").json()["state"] == "firing"  # what it watches is unchanged
    assert org.call("PATCH", f"/rules/{rid}", {"threshold": 40}).status_code == 200
    assert org.call("GET", f"/alerts/{first}").json()["resolved_reason"] == "rule changed"
    second = insert_alert(stack, org.slug, "pump-1", rule_id=rid)
    assert org.call("PATCH", f"/rules/{rid}", {"enabled": False}).json()["firing"] == 0
    assert org.call("GET", f"/alerts/{second}").json()["resolved_reason"] == "rule disabled"


# -- alerts ------------------------------------------------------------------------------

def test_alerts_filter_page_and_acknowledge(org: Org, stack: Stack) -> None:
    org.device("pump-1")
    org.device("pump-2")
    t0 = datetime(2026, 1, 1, tzinfo=UTC)
    rows = [("pump-1", "firing", "critical", 0), ("pump-1", "resolved", "warning", 1),
            ("pump-2", "firing", "warning", 2), ("pump-2", "resolved", "critical", 3),
            ("pump-1", "firing", "info", 4)]
    ids = [insert_alert(stack, org.slug, d, state=s, severity=sev, fired_at=t0 + timedelta(hours=h))
           for d, s, sev, h in rows]
    newest_first = ids[::-1]

    def listed(query: str = "", path: str = "/alerts") -> list[int]:
        r = org.call("GET", f"{path}{query}")
        assert r.status_code == 200, r.text
        return [a["id"] for a in r.json()]

    assert listed() == newest_first
    assert listed("?state=firing") == [ids[4], ids[2], ids[0]]
    assert listed("?severity=critical") == [ids[3], ids[0]]
    assert listed("?device=pump-2") == [ids[3], ids[2]]
    assert listed("?state=resolved&device=pump-1") == [ids[1]]
    assert listed("?from=2026-01-01T01:00:00Z&to=2026-01-01T03:00:00Z") == [ids[2], ids[1]]
    assert listed("?from=2026-01-01T03:00:00%2B01:00") == newest_first[:3]  # 02:00 UTC on
    assert listed("", "/devices/pump-1/alerts") == [ids[4], ids[1], ids[0]]
    assert listed("?state=firing", "/devices/pump-2/alerts") == [ids[2]]
    # Keyset pages: newest first, then on from the last id seen.
    pages, before = [], ""
    while page := listed(f"?limit=2{before}"):
        pages.append(page)
        before = f"&before={page[-1]}"
    assert pages == [newest_first[:2], newest_first[2:4], newest_first[4:]]
    for bad in ("?state=open", "?severity=fatal", "?from=yesterday", "?limit=0", "?limit=1001", "?before=0"):
        assert org.call("GET", f"/alerts{bad}").status_code in (400, 422), bad
    assert org.call("GET", "/alerts?device=no-such-device").status_code == 404
    assert org.call("GET", "/devices/no-such-device/alerts").status_code == 404
    a = org.call("GET", f"/alerts/{ids[0]}").json()
    assert a["device"] == "pump-1" and a["severity"] == "critical" and a["value"] == 31.0
    assert a["acknowledged_at"] is None and a["acknowledged_by"] is None

    # Acknowledging: operator and up; recorded and audited once; again is the same answer.
    viewer, operator = member(org, "viewer"), member(org, "operator")
    try:
        assert viewer.call("POST", f"{org.base}/alerts/{ids[0]}/acknowledge").status_code == 403
        assert viewer.call("GET", f"{org.base}/alerts/{ids[0]}").status_code == 200
        r = operator.call("POST", f"{org.base}/alerts/{ids[0]}/acknowledge")
        assert r.status_code == 200, r.text
        acked = r.json()
        assert acked["acknowledged_by"] == operator.email and acked["acknowledged_at"]
        assert acked["state"] == "firing"  # acknowledged, still firing
        again = org.call("POST", f"/alerts/{ids[0]}/acknowledge")
        assert again.status_code == 200 and again.json() == acked
        assert org.call("POST", f"/alerts/{ids[1]}/acknowledge").json()["acknowledged_by"] == org.owner.email
        assert org.call("POST", "/alerts/999999/acknowledge").status_code == 404
        audited = stack.query(
            """SELECT a.target, a.detail, u.email FROM audit_log a JOIN organizations o ON o.id = a.org_id
               JOIN users u ON u.id = a.actor_user_id WHERE o.slug = $1 AND a.action = 'alert.acknowledged'
               ORDER BY a.id""", org.slug)
        assert [(r["target"], json.loads(r["detail"])["alert_id"], r["email"]) for r in audited] == [
            ("pump-1", ids[0], operator.email), ("pump-1", ids[1], org.owner.email)]
    finally:
        viewer.client.close()
        operator.client.close()


def test_another_organization_sees_and_changes_nothing_of_ours(org: Org, api: ApiProcess, stack: Stack,
                                                               unique: str) -> None:
    org.device("pump-1")
    rid = org.call("POST", "/rules", THRESHOLD).json()["id"]
    aid = insert_alert(stack, org.slug, "pump-1", rule_id=rid)
    wid = org.call("POST", "/webhooks", {"url": PUBLIC_URL, "enabled": False}).json()["webhook"]["id"]
    did = stack.scalar("INSERT INTO webhook_deliveries (webhook_id, alert_id, body, state) "
                       "VALUES ($1, $2, '{}', 'failed') RETURNING id", wid, aid)
    stack.query("INSERT INTO webhook_attempts (delivery_id, webhook_id, error, duration_ms) VALUES ($1, $2, 'x', 1)",
                did, wid)
    other = Org(api, stack, f"{unique}-b")
    other.device("pump-1")  # the same device slug in their organization
    try:
        for method, path, body in [
            ("GET", f"/rules/{rid}", None), ("PATCH", f"/rules/{rid}", {"name": "mine"}),
            ("DELETE", f"/rules/{rid}", None),
            ("GET", f"/alerts/{aid}", None), ("POST", f"/alerts/{aid}/acknowledge", None),
            ("GET", f"/webhooks/{wid}", None), ("PATCH", f"/webhooks/{wid}", {"enabled": True}),
            ("POST", f"/webhooks/{wid}/rotate-secret", None), ("DELETE", f"/webhooks/{wid}", None),
            ("GET", f"/webhooks/{wid}/deliveries", None), ("GET", f"/webhooks/{wid}/deliveries/{did}/attempts", None),
        ]:
            r = other.call(method, path, body)
            assert r.status_code == 404, (method, path, r.text)
            # And through our organization's path: not a member, so no such organization.
            r = other.owner.call(method, org.base + path, body)
            assert r.status_code == 404 and "organization" in r.text, (method, path, r.text)
        assert other.call("GET", "/rules").json() == []
        assert other.call("GET", "/alerts").json() == []
        assert other.call("GET", "/devices/pump-1/alerts").json() == []
        assert other.call("GET", "/webhooks").json() == []
        # Our rule, alert and webhook are as they were.
        assert org.call("GET", f"/rules/{rid}").json()["name"] == "hot"
        assert org.call("GET", f"/alerts/{aid}").json()["acknowledged_at"] is None
        assert org.call("GET", f"/webhooks/{wid}").json()["enabled"] is False
        assert [d["id"] for d in org.call("GET", f"/webhooks/{wid}/deliveries").json()] == [did]
    finally:
        other.close()


# -- webhooks ----------------------------------------------------------------------------

@pytest.mark.parametrize("url", [
    "http://127.0.0.1/hook", "http://127.1.2.3:8080/", "http://localhost/hook", "http://LOCALHOST./hook",
    "http://[::1]/hook", "http://[::ffff:127.0.0.1]/hook", "http://2130706433/", "http://0x7f.1/",
    "http://10.1.2.3/hook", "http://172.16.0.1/", "http://192.168.1.1/", "http://100.64.0.1/",
    "http://169.254.169.254/latest/meta-data/", "http://[fe80::1]/", "http://0.0.0.0/", "http://[::]/",
    "http://224.0.0.1/", "http://240.0.0.1/", "http://192.0.2.1/",
    "file:///etc/passwd", "ftp://93.184.216.34/", "gopher://93.184.216.34/", "93.184.216.34/hook",
    "http://user:pw@93.184.216.34/hook", "http://user@93.184.216.34/", "http://93.184.216.34@127.0.0.1/",
    "http:///hook", "http://93.184.216.34:99999/", "http://93.184.216.34/a b", "",
    "http://no-such-host.invalid/hook",
])
def test_a_webhook_url_the_platform_must_not_call_is_422(org: Org, url: str) -> None:
    r = org.call("POST", "/webhooks", {"url": url})
    assert r.status_code == 422, (url, r.text)
    assert org.call("GET", "/webhooks").json() == []
    # Nor by changing a webhook's URL.
    wid = org.call("POST", "/webhooks", {"url": PUBLIC_URL, "enabled": False}).json()["webhook"]["id"]
    assert org.call("PATCH", f"/webhooks/{wid}", {"url": url}).status_code == 422
    assert org.call("GET", f"/webhooks/{wid}").json()["url"] == PUBLIC_URL


def test_webhooks_crud_with_a_secret_shown_once(org: Org, stack: Stack) -> None:
    r = org.call("POST", "/webhooks", {"url": PUBLIC_URL, "severities": ["minor", "critical"], "enabled": False})
    assert r.status_code == 201, r.text
    created = r.json()
    secret, hook = created["secret"], created["webhook"]
    assert len(secret) > 30 and secret not in json.dumps(hook)
    assert hook["severities"] == ["critical", "minor"] and hook["enabled"] is False
    assert hook["failing"] is False and hook["consecutive_failures"] == 0 and hook["last_error"] is None
    wid = hook["id"]
    for body in (org.call("GET", "/webhooks").text, org.call("GET", f"/webhooks/{wid}").text):
        assert secret not in body and "secret" not in body
    assert stack.scalar("SELECT secret FROM webhooks WHERE id = $1", wid) == secret
    assert org.call("POST", "/webhooks", {"url": PUBLIC_URL}).json()["webhook"]["severities"] == [
        "critical", "major", "minor", "warning", "info"]

    rotated = org.call("POST", f"/webhooks/{wid}/rotate-secret")
    assert rotated.status_code == 200 and rotated.json()["secret"] != secret
    assert stack.scalar("SELECT secret FROM webhooks WHERE id = $1", wid) == rotated.json()["secret"]
    r = org.call("PATCH", f"/webhooks/{wid}", {"url": PUBLIC_URL + "2", "severities": ["info"]})
    assert r.status_code == 200 and r.json()["url"] == PUBLIC_URL + "2" and r.json()["severities"] == ["info"]
    for bad in ({"severities": []}, {"severities": ["fatal"]}, {"secret": "mine"}, {"url": 5}):
        assert org.call("PATCH", f"/webhooks/{wid}", bad).status_code == 422, bad
    assert org.call("POST", "/webhooks", {"url": PUBLIC_URL, "secret": "mine"}).status_code == 422
    assert org.call("GET", f"/webhooks/{wid}/deliveries").json() == []
    assert org.call("GET", f"/webhooks/{wid}/deliveries/999999/attempts").status_code == 404
    assert org.call("DELETE", f"/webhooks/{wid}").status_code == 204
    assert org.call("GET", f"/webhooks/{wid}").status_code == 404
    assert audit_actions(stack, org.slug, "webhook.") == ["webhook.created", "webhook.created",
                                                          "webhook.secret_rotated", "webhook.updated",
                                                          "webhook.deleted"]
    # Admins manage webhooks; operators and viewers do not even read them.
    for role, status in (("admin", 200), ("operator", 403), ("viewer", 403)):
        user = member(org, role)
        assert user.call("GET", f"{org.base}/webhooks").status_code == status
        user.client.close()


def test_disabling_a_webhook_gives_up_its_queued_deliveries(org: Org, stack: Stack) -> None:
    wid = org.call("POST", "/webhooks", {"url": PUBLIC_URL, "enabled": False}).json()["webhook"]["id"]
    did = stack.scalar("INSERT INTO webhook_deliveries (webhook_id, body) VALUES ($1, '{}') RETURNING id", wid)
    assert org.call("PATCH", f"/webhooks/{wid}", {"enabled": False}).status_code == 200
    d = org.call("GET", f"/webhooks/{wid}/deliveries").json()
    assert [(x["id"], x["state"]) for x in d] == [(did, "failed")] and d[0]["finished_at"]


def test_the_openapi_document_names_the_new_routes(api: ApiProcess) -> None:
    paths = httpx.get(api.url + "/schema/openapi.json", timeout=10).json()["paths"]
    base = "/api/v1/orgs/{org}"
    for path in ("/rules", "/rules/{rule_id}", "/alerts", "/alerts/{alert_id}", "/alerts/{alert_id}/acknowledge",
                 "/devices/{device}/alerts", "/webhooks", "/webhooks/{webhook_id}",
                 "/webhooks/{webhook_id}/rotate-secret", "/webhooks/{webhook_id}/deliveries",
                 "/webhooks/{webhook_id}/deliveries/{delivery_id}/attempts"):
        assert base + path in paths, path
