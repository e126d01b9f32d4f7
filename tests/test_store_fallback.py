"""The one-by-one fallback when PostgreSQL refuses a batch for its content.

Nothing the decoder passes is known to make PostgreSQL refuse a batch, so the refusal is
made real with a trigger that raises for one metric name. COPY and INSERT both fire it.
"""

from __future__ import annotations

import json
import time

from tests.harness import Device, Stack, wait_until

TRIGGER = """
CREATE FUNCTION review_refuse_poison() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.metric = 'poison' THEN
        RAISE EXCEPTION 'review: poison reading refused';
    END IF;
    RETURN NEW;
END $$;
CREATE TRIGGER review_refuse_poison BEFORE INSERT ON readings
    FOR EACH ROW EXECUTE FUNCTION review_refuse_poison();
"""


def _setup(s: Stack, unique: str) -> tuple[Device, Device]:
    s.query(TRIGGER.split("CREATE TRIGGER")[0])
    s.query("CREATE TRIGGER" + TRIGGER.split("CREATE TRIGGER")[1])
    # A long flush interval so the good and the bad messages share one batch.
    s.start_bridge("rv-bridge", LMS_BRIDGE_FLUSH_MS="1500")
    good = Device(s.mq.port, s.create_device(unique, "good"))
    bad = Device(s.mq.port, s.create_device(unique, "bad"))
    assert good.connect().value == 0 and bad.connect().value == 0
    base = int(time.time() * 1000) - 60_000
    for i in range(20):
        good.publish("telemetry", json.dumps({"ts": base + i, "values": {"seq": i}}))
    bad.publish_wait("telemetry", json.dumps({"ts": base, "values": {"poison": 1, "fine": 2}}))
    for i in range(20, 40):
        good.publish("telemetry", json.dumps({"ts": base + i, "values": {"seq": i}}))
    good.publish_wait("events", json.dumps({"type": "boot"}))
    return good, bad


def test_refused_batch_quarantines_only_the_culprit(own_stack: Stack, unique: str) -> None:
    s = own_stack
    good, bad = _setup(s, unique)
    try:
        wait_until(lambda: s.scalar("SELECT count(*) FROM quarantine WHERE topic LIKE $1", f"lms/{unique}/bad/%"),
                   15, "the refused message in quarantine")
        wait_until(lambda: s.scalar("SELECT count(*) FROM readings") >= 40, 10, "the good readings")
        time.sleep(0.5)
    finally:
        good.close()
        bad.close()
    assert s.scalar("SELECT count(*) FROM readings") == 40
    assert s.scalar("SELECT count(*) FROM events WHERE type = 'boot'") == 1
    (q,) = s.query("SELECT reason, payload FROM quarantine WHERE topic LIKE $1", f"lms/{unique}/bad/%")
    assert "poison reading refused" in q["reason"]
    assert json.loads(q["payload"])["values"]["poison"] == 1


def test_database_refused_quarantine_row_names_org_and_device(own_stack: Stack, unique: str) -> None:
    """Every other quarantine row carries org_slug/device_slug (indexed, for per-org views);
    the database-refused ones are written with NULLs, so an organization never sees them."""
    s = own_stack
    good, bad = _setup(s, unique)
    try:
        wait_until(lambda: s.scalar("SELECT count(*) FROM quarantine WHERE topic LIKE $1", f"lms/{unique}/bad/%"),
                   15, "the refused message in quarantine")
    finally:
        good.close()
        bad.close()
    (q,) = s.query("SELECT org_slug, device_slug FROM quarantine WHERE topic LIKE $1", f"lms/{unique}/bad/%")
    assert (q["org_slug"], q["device_slug"]) == (unique, "bad")
