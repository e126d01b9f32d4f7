"""Slow export readers against a real ``lms api``: exports that are never read must not take
the connections ordinary requests need, are limited per user and per process, and are
cut off by the server after the stall time."""

from __future__ import annotations

import socket
import time
from typing import Any

import httpx

from tests.harness import Stack, wait_until
from tests.test_api_access import User

ROWS = 300_000  # ~15 MB of CSV: far more than the socket buffers of a reader that never reads
STALL_S = 5
USERS = 5
PER_USER = 4  # 20 exports in all


def big_device(stack: Stack, owner: User, org: str, rows: int) -> str:
    """A device ``big`` in ``org`` with ``rows`` readings written straight into the table (the
    bridge is not what these tests are about); returns its export path."""
    assert owner.call("POST", f"/api/v1/orgs/{org}/devices", {"slug": "big"}).status_code == 201
    dev_id = stack.scalar("SELECT d.id FROM devices d JOIN organizations o ON o.id = d.org_id "
                          "WHERE o.slug = $1 AND d.slug = 'big'", org)
    stack.query("""INSERT INTO readings (time, device_id, metric, value)
                   SELECT now() - interval '2 hours' + i * interval '10 ms', $1, 'm' || (i % 3), i
                   FROM generate_series(1, $2) i""", dev_id, rows)
    return f"/api/v1/orgs/{org}/devices/big/export?format=csv"


def open_export(port: int, path: str, token: str) -> socket.socket:
    """A raw HTTP export request on a socket with a small receive window; nothing is read."""
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connect: a small window
    s.settimeout(15)
    s.connect(("127.0.0.1", port))
    s.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {token}\r\n\r\n".encode())
    return s


def _closed_by_server(s: socket.socket, deadline: float) -> bool:
    """Whether the server drops the connection before the deadline, without our reading a
    byte: a graceful close would wait behind the unread data, so only an abort (a reset,
    TCP state CLOSE) or an end of stream (CLOSE_WAIT) counts."""
    while time.monotonic() < deadline:
        state = s.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1)[0]
        if state in (7, 8):  # TCP_CLOSE, TCP_CLOSE_WAIT (include/net/tcp_states.h)
            return True
        time.sleep(0.1)
    return False


def _timed(client: httpx.Client, path: str, headers: dict[str, str] | None = None) -> tuple[int, float]:
    started = time.monotonic()
    r = client.get(path, headers=headers)
    return r.status_code, time.monotonic() - started


def test_stalled_exports_neither_starve_requests_nor_live_forever(stack: Stack) -> None:
    api = stack.start_api(LMS_API_EXPORT_STALL_SECONDS=str(STALL_S), LMS_API_EXPORT_CONCURRENCY="4",
                          LMS_API_EXPORTS_PER_USER="2")
    org = "exports"
    users = [User(api, f"exporter{i}@example.com") for i in range(USERS)]
    owner = users[0]
    assert owner.call("POST", "/api/v1/orgs", {"slug": org}).status_code == 201
    for u in users[1:]:
        assert owner.call("PUT", f"/api/v1/orgs/{org}/members/{u.email}", {"role": "viewer"}).status_code == 200
    big_device(stack, owner, org, ROWS)
    base = f"/api/v1/orgs/{org}/devices/big"

    sockets: list[tuple[int, socket.socket]] = []
    try:
        for i, u in enumerate(users):
            token = u.client.headers["Authorization"].split(" ", 1)[1]
            sockets.extend((i, open_export(api.port, f"{base}/export?format=csv", token)) for _ in range(PER_USER))
        # Every export gets an answer at once: streaming, or refused with 429 and Retry-After.
        streaming: list[tuple[int, socket.socket]] = []
        for i, s in sockets:
            head = s.recv(4096)
            assert head.startswith((b"HTTP/1.1 200", b"HTTP/1.1 429")), head[:200]
            if head.startswith(b"HTTP/1.1 200"):
                streaming.append((i, s))
            else:
                while not head.endswith(b"}"):  # the JSON body may come in a segment of its own
                    more = s.recv(4096)
                    assert more, head
                    head += more
                assert b"retry-after:" in head.lower() and b'"code":"rate_limited"' in head, head
        assert len(streaming) == 4, "at most LMS_API_EXPORT_CONCURRENCY exports stream at once"
        per_user = [sum(1 for i, _ in streaming if i == n) for n in range(USERS)]
        assert max(per_user) <= 2, per_user

        # Ordinary requests of every user answer quickly while the exports stall.
        with httpx.Client(base_url=api.url, timeout=30) as client:
            for u in users:
                for path in ("/ready", base, f"{base}/latest", f"{base}/readings?limit=10"):
                    status, took = _timed(client, path, dict(u.client.headers))
                    assert status == 200 and took < 2, (path, status, took)

        # The server cuts the stalled readers off, and their places are free again.
        deadline = time.monotonic() + STALL_S + 30
        for _, s in streaming:
            assert _closed_by_server(s, deadline), api.log.read_text(errors="replace")[-3000:]

        def export_again() -> bool:
            with httpx.Client(base_url=api.url, timeout=30, headers=owner.client.headers) as client, \
                    client.stream("GET", f"{base}/export?format=json&metric=m0") as r:
                if r.status_code == 429:
                    return False
                assert r.status_code == 200, r.read()
                assert b'"metric": "m0"' in next(r.iter_bytes())
                return True

        wait_until(export_again, 15, "an export slot to be free again", interval=0.5)
    finally:
        for _, s in sockets:
            s.close()
        for u in users:
            u.client.close()
        api.stop()
    log: Any = api.log.read_text(errors="replace")
    assert "Traceback" not in log, log[-3000:]
    assert "export cut off" in log
