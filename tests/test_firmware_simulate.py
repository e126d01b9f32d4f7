"""``lms simulate``: the asyncio fleet speaks the firmware's protocol to the real broker and
bridge; every reading the broker acknowledged is stored."""

from __future__ import annotations

import re
import subprocess
import sys

from tests.harness import REPO, Stack, wait_until
from tests.test_firmware import device_replies, platform_publish


def test_lms_simulate_runs_a_fleet_whose_readings_are_all_stored(stack: Stack, unique: str) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "lms_cli.main", "simulate", "--devices", "20", "--rate", "0.5", "--seconds", "5",
         "--org", unique],
        env=stack.env(), cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == f"created organization {unique} for the simulated devices"
    assert any(line.startswith("connected 20/20 · readings") for line in lines), proc.stdout
    final = re.search(r"stopped: connected \d+/20 · readings (\d+) made, (\d+) acknowledged", lines[-1])
    assert final, lines[-1]
    acked = int(final.group(2))
    assert acked >= 20 * 8

    def stored() -> list[tuple[str, int]]:
        return [(r["slug"], r["n"]) for r in stack.query(
            """SELECT d.slug, count(*) AS n FROM readings r JOIN devices d ON d.id = r.device_id
               JOIN organizations o ON o.id = d.org_id WHERE o.slug = $1 GROUP BY d.slug ORDER BY d.slug""",
            unique)]

    # Two metrics a reading; a reading the broker acknowledged is stored once.
    wait_until(lambda: sum(n for _, n in stored()) >= 2 * acked, 20, "every acknowledged reading stored")
    assert [s for s, _ in stored()] == [f"sim-{i:05d}" for i in range(1, 21)]

    # A second run reuses the devices and their credentials (nothing refused), and the fleet
    # answers commands with the firmware's code.
    proc = subprocess.Popen(
        [sys.executable, "-m", "lms_cli.main", "simulate", "--devices", "3", "--rate", "1", "--seconds", "20",
         "--org", unique], env=stack.env(), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_until(lambda: stack.scalar(
            """SELECT count(*) FROM events e JOIN devices d ON d.id = e.device_id JOIN organizations o
               ON o.id = d.org_id WHERE o.slug = $1 AND e.data->>'status' = 'online'""", unique) >= 23, 20,
                   "the second run online")
        platform_publish(stack, f"lms/{unique}/sim-00001/commands/900000031",
                         b'{"id": 900000031, "name": "fly", "params": {}}')
        reply = wait_until(lambda: device_replies(stack, unique, "sim-00001").get(900000031), 10, "the answer")
        assert reply["status"] == "error" and "unknown command 'fly'" in reply["error"]
    finally:
        proc.terminate()
        out, err = proc.communicate(30)
    assert proc.returncode == 0, err
    assert "refused" not in out
