"""A slow but steady export reader against a real ``lms api``: it is never stalled (it takes
something every few milliseconds), so only the total deadline (LMS_API_EXPORT_MAX_SECONDS)
stops it from holding its export slot, a pool connection and an open transaction for as
long as it likes."""

from __future__ import annotations

import socket
import time

import httpx

from tests.harness import Stack, wait_until
from tests.test_api_access import User
from tests.test_api_export_limits import big_device, open_export

ROWS = 200_000  # ~10 MB of CSV: at ~100 kB/s, far longer than the deadline
MAX_S = 3


def test_a_steady_trickle_is_cut_off_at_the_deadline_and_frees_its_slot(stack: Stack) -> None:
    api = stack.start_api(LMS_API_EXPORT_MAX_SECONDS=str(MAX_S), LMS_API_EXPORT_CONCURRENCY="1")
    org = "deadline"
    owner = User(api, "deadline-owner@example.com")
    s: socket.socket | None = None
    try:
        assert owner.call("POST", "/api/v1/orgs", {"slug": org}).status_code == 201
        path = big_device(stack, owner, org, ROWS)
        token = owner.client.headers["Authorization"].split(" ", 1)[1]
        s = open_export(api.port, path, token)
        started = time.monotonic()
        received = b""
        checked_busy = False
        cut_off = False
        while time.monotonic() - started < 60:
            try:
                chunk = s.recv(2048)
            except ConnectionResetError:
                cut_off = True
                break
            if not chunk:
                cut_off = True
                break
            received += chunk
            if not checked_busy and time.monotonic() - started > 1:
                # The one export slot is taken while the trickle lasts.
                assert owner.client.get(path).status_code == 429
                checked_busy = True
            time.sleep(0.02)  # at most ~100 kB/s: steady, never a stall
        took = time.monotonic() - started
        assert received.startswith(b"HTTP/1.1 200"), received[:200]
        assert cut_off, f"the export still streamed after {took:.0f} s ({len(received)} bytes)"
        assert checked_busy
        assert MAX_S - 0.5 < took < MAX_S + 30, took
        assert len(received) < ROWS * 30, "the export was cut off, not finished"

        def export_again() -> bool:
            with httpx.Client(base_url=api.url, timeout=30, headers=owner.client.headers) as client, \
                    client.stream("GET", path) as r:
                if r.status_code == 429:
                    return False
                assert r.status_code == 200, r.read()
                assert next(r.iter_bytes()).startswith(b"time,metric,value,text")
                return True

        wait_until(export_again, 15, "the export slot to be free again", interval=0.5)
        # No export transaction is left open (pinning the xmin horizon).
        wait_until(lambda: not stack.query(
            "SELECT 1 FROM pg_stat_activity WHERE application_name = 'lms-api-export' "
            "AND state LIKE 'idle in transaction%'"), 15, "the export transactions to end")
    finally:
        if s is not None:
            s.close()
        owner.client.close()
        api.stop()
    log = api.log.read_text(errors="replace")
    assert "Traceback" not in log, log[-3000:]
    assert "still streaming after" in log, log[-3000:]
