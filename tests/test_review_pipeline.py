"""Review of the two-batches-in-flight ingest (bridge/subscribe.py, bridge/store.py), the
5-minute rollup level and the asyncio MQTT session: one test per finding (each failed before
its fix)."""

from __future__ import annotations

import asyncio

import asyncpg

from lms_core.settings import Settings
from tests.harness import Stack
from tests.test_bridge_lifecycle import drain_backlog_in_process


def test_one_failed_commit_does_not_turn_every_later_batch_into_a_rollback_and_a_retry(
        own_stack: Stack, unique: str) -> None:
    """One batch whose commit fails once (a transient error: a deadlock PostgreSQL broke, a
    connection blip) makes the batch after it roll back and retry: expected. The retry used
    to run without a Turn, so that batch's Turn stayed failed; the batch after it then failed
    at once, was retried without a Turn, and so on: under a backlog every later batch was
    decoded twice and the two-in-flight pipeline never came back. Each attempt now has a
    fresh Turn."""
    faults, _metrics = drain_backlog_in_process(own_stack, unique, "lms-bridge-review1", 800, fail=3)  # 20 batches
    # One failure: the batch after it rolls back once (maybe the one after that too).
    assert faults.lost <= 3, (f"{faults.lost} TurnLost rollbacks for one failed commit (20 batches, "
                              f"{faults.builds} decodes of a batch)")


def test_a_subscribe_refused_for_want_of_a_connection_leaves_no_pending_request() -> None:
    """lms_core/mqtt_fast.py subscribe/unsubscribe register the request's future in
    ``_pending`` before ``_send`` raises BrokerUnavailable ("not connected"); nobody awaits
    it. The next ``_fail_pending`` (connection lost, close) sets an exception on it that is
    never retrieved ("Future exception was never retrieved"), and its packet id stays taken.
    Reached by the stream relay's ``_resubscribe`` (a second batch after the connection
    dropped) and the bridge's ``_subscribe`` (the UNSUBSCRIBE after a SUBACK, connection lost
    between). Publish registers only after a successful send: the order these two miss."""
    from lms_core.errors import BrokerUnavailable
    from lms_core.mqtt_fast import FastMqttClient
    from lms_core.settings import MqttUrl

    async def run() -> int:
        client = FastMqttClient(MqttUrl.parse("mqtt://127.0.0.1:1"), name="probe")
        for call in (client.subscribe(["a/#"], qos=0), client.unsubscribe(["a/#"])):
            try:
                await call
            except BrokerUnavailable:
                pass
        return len(client._pending)  # a packet id not pending is free again

    pending = asyncio.run(run())
    assert pending == 0, f"{pending} request(s) left pending"


def test_retention_and_a_device_purge_do_not_deadlock(own_stack: Stack) -> None:
    """readings_retention (migration 0010, as 0009) deletes minutes, then 5 minutes, then
    hours; purge_device and every bridge lock hours, then 5 minutes, then minutes (the order
    lms_core/rollups.py promises "so two transactions never wait on each other in a cycle").
    A purge of a device with rows older than the cutoff, while the daily retention runs,
    takes that device's old hour rows, then waits for a 5-minute row retention deleted;
    retention then waits for the hour rows: PostgreSQL breaks the cycle by failing one (the
    retention job, or the API's delete with a 503)."""
    from lms_core import rollups

    s = own_stack
    url = Settings.from_env(s.env()).database_url
    dev = 987_654_321
    old = "2020-01-01 00:00:00+00"

    async def run() -> list[BaseException | None]:
        setup = await asyncpg.connect(url)
        try:
            # Two hours of old readings and their rollups, as a bridge writes them.
            await setup.execute(rollups.add_sql(
                f"""INSERT INTO readings (time, device_id, metric, value)
                    SELECT t, {dev}, 'm', 1.0 FROM generate_series(TIMESTAMPTZ '{old}',
                        TIMESTAMPTZ '{old}' + interval '2 hours', interval '1 minute') AS t
                    RETURNING time, device_id, metric, value"""))
        finally:
            await setup.close()
        purge, retention = await asyncpg.connect(url), await asyncpg.connect(url)
        try:
            tx = purge.transaction()
            await tx.start()
            # purge_device's first steps, as lms_core/rollups.py runs them: the shared lock, the hours.
            await purge.execute(rollups.LOCK_SHARED_SQL)
            await purge.execute(f"""DELETE FROM readings_1h WHERE (device_id, metric, bucket) IN (
                                        SELECT device_id, metric, bucket FROM readings_1h WHERE device_id = {dev}
                                        ORDER BY device_id, metric, bucket FOR UPDATE)""")
            ret = asyncio.create_task(retention.fetchval("SELECT readings_retention(now() - interval '400 days')"))
            await asyncio.sleep(0.5)  # retention deleted the minutes and 5 minutes; waits for the hours
            errors: list[BaseException | None] = []
            try:
                for table in ("readings_5m", "readings_1m"):  # the rest of purge_device
                    await purge.execute(f"""DELETE FROM {table} WHERE (device_id, metric, bucket) IN (
                                                SELECT device_id, metric, bucket FROM {table} WHERE device_id = {dev}
                                                ORDER BY device_id, metric, bucket FOR UPDATE)""")
                await tx.commit()
                errors.append(None)
            except asyncpg.PostgresError as exc:
                await tx.rollback()
                errors.append(exc)
            try:
                await asyncio.wait_for(ret, 10)
                errors.append(None)
            except asyncpg.PostgresError as exc:
                errors.append(exc)
            return errors
        finally:
            await purge.close()
            await retention.close()

    errors = asyncio.run(run())
    assert errors == [None, None], errors
