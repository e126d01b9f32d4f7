"""No loss, no duplicates: tens of thousands of messages in flight while parts fail for real."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import pytest

from tests.harness import BridgeProcess, Device, Stack, stamped, wait_until

DEVICES = 3
PER_DEVICE = 10_000  # 30,000 messages in flight across each fault
#: Both ways the bridge reads MQTT (LMS_BRIDGE_RECEIVER): paho and lms_core/mqtt_fast.py.
RECEIVERS = pytest.mark.parametrize("receiver", ["paho", "asyncio"])


def _stream(s: Stack, org: str, devices: int, per_device: int) -> tuple[list[Device], list[threading.Thread],
                                                                         list[BaseException]]:
    devs = []
    for i in range(devices):
        # Persistent sessions: after a broker restart paho resends what was not acknowledged.
        d = Device(s.mq.port, s.create_device(org, f"d{i}"), persistent=True)
        assert d.connect().value == 0
        devs.append(d)
    errors: list[BaseException] = []
    base = int(time.time() * 1000) - 3_600_000

    def run(d: Device) -> None:
        try:
            d.publish_many([stamped(i, base) for i in range(per_device)], window=100, timeout=240)
        except BaseException as exc:  # reported by the test thread
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(d,), name=f"publisher {d.creds.username}") for d in devs]
    for t in threads:
        t.start()
    return devs, threads, errors


def _count(s: Stack) -> int:
    return int(s.scalar("SELECT count(*) FROM readings"))


def _run_with_fault(s: Stack, org: str, fault: Callable[[], None], bridges: list[BridgeProcess]) -> None:
    total = DEVICES * PER_DEVICE
    devs, threads, errors = _stream(s, org, DEVICES, PER_DEVICE)
    wait_until(lambda: _count(s) >= 3000, 60, "the first rows")
    stored_at_fault = _count(s)
    fault()
    for t in threads:
        t.join(300)
    assert not errors, errors
    assert stored_at_fault < total - 20_000, "the fault did not hit 20,000 messages in flight"
    try:
        wait_until(lambda: _count(s) >= total, 180, f"{total} rows", interval=0.5)
    except AssertionError:
        alive = [b.proc is not None and b.proc.poll() is None for b in bridges]
        raise AssertionError(f"{_count(s)} of {total} rows; bridges alive: {alive}; last bridge log:\n"
                             + bridges[-1].log_text()[-4000:]) from None
    time.sleep(2)  # anything extra (a duplicate) would arrive now
    assert _count(s) == total
    # Every published message exactly once: one row per (device, seq).
    per_device = s.query("SELECT device_id, count(*) AS n, count(DISTINCT value) AS distinct_values, "
                         "min(value) AS lo, max(value) AS hi FROM readings GROUP BY device_id")
    assert len(per_device) == DEVICES
    for r in per_device:
        assert (r["n"], r["distinct_values"], r["lo"], r["hi"]) == (PER_DEVICE, PER_DEVICE, 0, PER_DEVICE - 1)
    assert s.scalar("SELECT count(*) FROM quarantine") == 0
    for b in bridges:
        assert b.proc is not None and b.proc.poll() is None, b.log_text()[-2000:]
    for d in devs:
        d.close()


@pytest.mark.slow
@RECEIVERS
def test_bridge_killed_with_sigkill_mid_stream_loses_nothing(own_stack: Stack, unique: str, receiver: str) -> None:
    bridge = own_stack.start_bridge(LMS_BRIDGE_RECEIVER=receiver)

    def fault() -> None:
        bridge.kill()
        time.sleep(1)
        bridge.start()

    _run_with_fault(own_stack, unique, fault, [bridge])


@pytest.mark.slow
@RECEIVERS
def test_postgres_stopped_for_ten_seconds_mid_stream_loses_nothing(own_stack: Stack, unique: str,
                                                                  receiver: str) -> None:
    bridge = own_stack.start_bridge(LMS_BRIDGE_RECEIVER=receiver)

    def fault() -> None:
        own_stack.pg.stop()
        time.sleep(10)
        own_stack.pg.start()

    _run_with_fault(own_stack, unique, fault, [bridge])
    assert bridge.metric("lms_bridge_db_errors_total") > 0, "the outage never reached the bridge"


@pytest.mark.slow
@RECEIVERS
def test_mosquitto_restarted_mid_stream_loses_nothing(own_stack: Stack, unique: str, receiver: str) -> None:
    bridge = own_stack.start_bridge(LMS_BRIDGE_RECEIVER=receiver)

    def fault() -> None:
        own_stack.mq.stop()
        own_stack.mq.start()

    _run_with_fault(own_stack, unique, fault, [bridge])
    assert '"bridge: connected to' in bridge.log_text().split("disconnected", 1)[-1]


@pytest.mark.slow
def test_two_bridges_share_the_load_and_store_each_message_once(own_stack: Stack, unique: str) -> None:
    b1 = own_stack.start_bridge("lms-bridge-a", LMS_BRIDGE_SUBSCRIPTION="shared")
    b2 = own_stack.start_bridge("lms-bridge-b", LMS_BRIDGE_SUBSCRIPTION="shared")
    total = 4 * 5000
    devs, threads, errors = _stream(own_stack, unique, 4, 5000)
    for t in threads:
        t.join(300)
    assert not errors, errors
    wait_until(lambda: _count(own_stack) >= total, 120, f"{total} rows", interval=0.5)
    time.sleep(1)
    assert _count(own_stack) == total
    s1, s2 = b1.metric("lms_bridge_messages_stored_total"), b2.metric("lms_bridge_messages_stored_total")
    assert s1 > 0 and s2 > 0, (s1, s2)
    assert s1 + s2 == total  # no message was delivered to both
    for d in devs:
        d.close()


@pytest.mark.slow
def test_sigterm_commits_and_acknowledges_before_exiting(own_stack: Stack, unique: str) -> None:
    s = own_stack
    bridge = s.start_bridge()
    total = 2 * 10_000
    devs, threads, errors = _stream(s, unique, 2, 10_000)
    wait_until(lambda: _count(s) >= 3000, 60, "the first rows")
    assert bridge.stop(timeout=30) == 0  # SIGTERM in the middle of the stream
    assert '"bridge stopped"' in bridge.log_text()
    stopped_at = _count(s)
    assert stopped_at < total
    for t in threads:
        t.join(300)
    assert not errors, errors
    bridge.start()
    wait_until(lambda: _count(s) >= total, 120, f"{total} rows", interval=0.5)
    time.sleep(1)
    assert _count(s) == total
    # Everything the stopped bridge committed was acknowledged before it exited: nothing
    # came back as a redelivery, so the de-duplicating path never ran.
    assert bridge.metric("lms_bridge_dedup_batches_total") == 0
    for d in devs:
        d.close()
