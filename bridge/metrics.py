"""Prometheus metrics of one bridge process, in a registry of its own.

What a committed batch did is counted in one place, :meth:`BridgeMetrics.committed`; the
ingest loop sets only its own state (connection, backlog, failed writes) and the janitor
counts what it cleared.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from lms_core.topics import TopicKind

if TYPE_CHECKING:
    from bridge.rules import Evaluated
    from bridge.store import Batch

#: The ``kind`` label of ``lms_bridge_messages_received``: the kinds the bridge subscribes
#: to, and "other" for anything else.
RECEIVED_LABELS: dict[TopicKind, str] = {k: k.value for k in (
    TopicKind.TELEMETRY, TopicKind.STATUS, TopicKind.EVENTS, TopicKind.CONFIG_REPORTED, TopicKind.COMMAND_RESULT)}


class BridgeMetrics:
    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.received = Counter("lms_bridge_messages_received", "MQTT messages received", ["kind"], registry=r)
        self.stored = Counter("lms_bridge_messages_stored", "Messages committed to the database", registry=r)
        self.rows = Counter("lms_bridge_rows_stored", "Reading rows written (before de-duplication)",
                            registry=r)
        self.quarantined = Counter("lms_bridge_messages_quarantined", "Messages sent to quarantine",
                                   ["kind"], registry=r)
        self.batch_size = Histogram("lms_bridge_batch_messages", "Messages per committed batch", registry=r,
                                    buckets=(1, 10, 50, 100, 250, 500, 1000, 2000, 5000, 10000))
        self.flush_seconds = Histogram("lms_bridge_flush_seconds", "Time to write and commit one batch",
                                       registry=r, buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
                                                            0.25, 0.5, 1, 2.5, 5, 10))
        self.backlog = Gauge("lms_bridge_backlog", "Messages received but not yet committed and acknowledged",
                             registry=r)
        self.db_errors = Counter("lms_bridge_db_errors", "Failed batch writes (retried)", registry=r)
        self.dedup_batches = Counter("lms_bridge_dedup_batches",
                                     "Batches written through the de-duplicating path", registry=r)
        self.retained_cleared = Counter("lms_bridge_retained_cleared",
                                        "Retained messages devices left outside 'status', cleared", registry=r)
        self.command_replies = Counter(
            "lms_bridge_command_replies", "Command results from devices, by what they did to their command "
            "(delivered, succeeded, failed, expired, recorded, ignored, unknown_command, other_device)",
            ["outcome"], registry=r)
        self.config_reports = Counter("lms_bridge_config_reports",
                                      "Reported configurations received (one stored unless a newer one is)", registry=r)
        self.connected = Gauge("lms_bridge_mqtt_connected", "1 while connected to the broker", registry=r)
        self.rules_loaded = Gauge("lms_bridge_rules_loaded", "Enabled alert rules in the bridge's cache", registry=r)
        self.alerts_fired = Counter("lms_bridge_alerts_fired", "Alerts fired (batches and the no-data sweep)",
                                    registry=r)
        self.alerts_resolved = Counter("lms_bridge_alerts_resolved", "Alerts resolved (batches and the sweep)",
                                       registry=r)
        self.rule_seconds = Histogram("lms_bridge_rule_evaluation_seconds",
                                      "Time to evaluate the rules of one batch (or one sweep), in its transaction",
                                      registry=r, buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
                                                           0.25, 0.5, 1))
        self.late_readings = Counter("lms_bridge_rule_late_readings",
                                     "Readings older than the newest evaluated for their (rule, device): stored, "
                                     "not evaluated", registry=r)
        self.rule_errors = Counter("lms_bridge_rule_errors", "Rule evaluations or sweeps that failed on a bug "
                                   "(the batch was stored without evaluation)", registry=r)
        self.outbox_published = Counter("lms_bridge_alert_messages_published",
                                        "Alert messages published from the outbox and acknowledged by the broker",
                                        registry=r)

    def committed(self, batch: Batch, messages: int, seconds: float) -> None:
        """Count a batch of ``messages`` committed in ``seconds``: what it received, stored,
        wrote and quarantined."""
        self.flush_seconds.observe(seconds)
        self.batch_size.observe(messages)
        self.stored.inc(messages)
        if batch.readings:
            self.rows.inc(len(batch.readings))
        for kind, n in batch.received.items():
            self.received.labels(RECEIVED_LABELS.get(kind, "other")).inc(n)
        for section in batch.quarantined_kinds:
            self.quarantined.labels(section).inc()
        if batch.dedup_writes:
            self.dedup_batches.inc(batch.dedup_writes)
        for outcome, n in batch.reply_outcomes.items():
            self.command_replies.labels(outcome).inc(n)
        if batch.reported:
            self.config_reports.inc(len(batch.reported))

    def rules_evaluated(self, ev: Evaluated) -> None:
        """Count one committed rule evaluation (a batch's or a sweep's)."""
        self.rule_seconds.observe(ev.seconds)
        if ev.fired:
            self.alerts_fired.inc(ev.fired)
        if ev.resolved:
            self.alerts_resolved.inc(ev.resolved)
        if ev.late:
            self.late_readings.inc(ev.late)
