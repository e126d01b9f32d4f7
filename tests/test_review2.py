"""Review R2 (issues 9 and 10): attacks from outside on streams, rules, alerts and webhooks,
against a real API, bridge, broker and database. Each test names the finding it pins."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness import ApiProcess, Device, Stack, wait_until
from tests.test_api_rules import THRESHOLD, insert_alert
from tests.test_api_stream import Org as StreamOrg
from tests.test_api_stream import api_metric, open_stream, request


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


@pytest.fixture
def stream_api(stack: Stack) -> Iterator[ApiProcess]:
    """An API of its own (its memory is measured), default stream settings."""
    api = stack.start_api()
    yield api
    api.stop()
    stack.apis.remove(api)


def test_an_unread_stream_does_not_hold_megabytes_of_frames(stream_api: ApiProcess, stack: Stack,
                                                            unique: str) -> None:
    """Finding: a client's queue was bounded in frames only (1000), not in bytes. A message may
    be as large as the broker takes (max_packet_size, 260 KiB), so one member whose stream
    reads slowly (or not at all, until the ping timeout) made the API hold 1000 x 260 KiB
    = 260 MB — 20 such streams per user, each watching its own device, several GB: one tenant
    could take the API process (and every other tenant's dashboards) down."""
    api = stream_api
    org = StreamOrg(api, stack, unique)
    try:
        dev = org.device("big")
        # A reader that takes nothing: its library stops reading the socket after 4 frames, and
        # its kernel buffers little, so the server's sends stall at once.
        tiny = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        tiny.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        tiny.connect(("127.0.0.1", api.port))
        with open_stream(api, unique, org.token, query="overflow=drop", max_queue=4, sock=tiny) as ws:
            assert request(ws, type="subscribe", filter="+/#")["type"] == "subscribed"
            time.sleep(0.5)
            assert api.proc is not None
            before = rss_bytes(api.proc.pid)
            frames_before = api_metric(api, "lms_api_ws_frames_total")
            n = 300
            pad = "x" * 200_000
            dev.publish_many([json.dumps({"seq": i, "pad": pad}).encode() for i in range(n)], kind="events",
                             window=20)
            wait_until(lambda: api_metric(api, "lms_api_ws_frames_total") >= frames_before + n, 30,
                       "the relay to take every message")
            grown = rss_bytes(api.proc.pid) - before
            assert grown < 30 * 2**20, f"the API grew by {grown / 2**20:.0f} MiB for one unread stream"
    finally:
        org.close()
