"""The retained-message janitor: devices may retain only their ``status``.

A device may publish with the retain flag on any of its device->cloud topics, and the
broker keeps one retained message per topic, replayed to every new subscriber: one device
could fill the broker's memory (``commands/<anything>/result`` gives it unbounded topics).
Mosquitto 2.0's dynamic-security ACL types (publishClientSend/Receive, subscribe*,
unsubscribe*) do not look at the retain flag, and ``retain_available false`` switches
retained messages off for everyone, which would take away ``status`` (retained by design,
the device's Last Will) and ``config`` (cloud->device, retained by design).

The broker refuses them first: the plugin lms_retain (mosquitto/plugin/lms_retain.c, loaded
before dynamic-security by ``lms up`` and the tests) denies a device's retained PUBLISH or
Will anywhere but ``status`` at publish time, so none is ever stored and memory stays
bounded. This janitor stays behind it as defence in depth: it clears what a broker without
the plugin took (compose.yaml when its plugin build is not used, an older broker's
persistence file), which bounds how long such a message lives, not how much memory one
device can take while it does.

How: every ``LMS_BRIDGE_RETAINED_SWEEP_S`` seconds (and once at start, for what was
retained while no bridge ran) a short connection of the service account subscribes to the
device->cloud topics except ``status``. The broker replays each retained message there
with the retain flag set; the janitor answers each with an empty retained message, which
deletes it. Then it unsubscribes and disconnects.

Why a periodic sweep and not a standing subscription with retain-as-published: a standing
subscription would deliver the whole telemetry stream a second time to this process, on
the same event loop that ingests it, and paho's parser is most of what a message costs the
bridge (lms_core/mqtt.py); the sweep sees live traffic only for the fraction of a second it
is subscribed. The price: a retained message lives at most one sweep interval. MQTT 3.1.1
is enough here: the broker sets the retain flag on the replay to a new subscription in
every MQTT version (retain-as-published matters only for live messages).

An empty message is also delivered, live, to the bridge's own subscription. The ingest
path would quarantine it as an empty payload; the janitor therefore records each topic it
cleared in :attr:`Store.cleared`, and the store drops an empty message on such a topic
(only on its rejection path, so the hot path pays nothing).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from bridge.metrics import BridgeMetrics
from bridge.store import Store
from lms_core.broker import clear_retained
from lms_core.errors import BrokerError
from lms_core.settings import Settings
from lms_core.topics import DEVICE_PUBLISHES

log = logging.getLogger("lms.bridge.retained")

#: The replay of retained messages follows the SUBACK at once; this long without one more
#: ends the sweep (live messages keep coming, so it cannot wait for silence).
QUIET_S = 0.5
#: A sweep never holds its subscription (and so a copy of the live stream) longer than this.
MAX_SWEEP_S = 30.0
#: How long an empty message on a topic just cleared is recognised as the clearing echo.
ECHO_S = 120.0


class RetainedJanitor:
    """Clears retained messages devices left on topics other than ``status``."""

    def __init__(self, settings: Settings, store: Store, metrics: BridgeMetrics) -> None:
        self.settings = settings
        self.store = store
        self.metrics = metrics
        self.interval = settings.bridge.retained_sweep_s
        root = settings.topic_root
        self.filters = [f"{root}/+/+/{kind}" for kind in DEVICE_PUBLISHES if kind != "status"]
        self.client_id = f"{settings.bridge.client_id}-janitor"

    async def run(self, stop: asyncio.Event) -> None:
        """Sweep at once, then every interval, until ``stop``; a failed sweep is retried at
        the next interval (it must never take the ingest down with it)."""
        if self.interval <= 0:
            return
        while not stop.is_set():
            try:
                n = await self.sweep()
                if n:
                    log.warning("cleared %d retained message(s) devices left outside 'status'", n)
            except (BrokerError, OSError) as exc:
                log.warning("retained-message sweep failed (%s); retrying in %d s", exc, self.interval)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.interval)

    async def sweep(self) -> int:
        """One sweep; returns how many retained messages were cleared."""
        cleared = self.store.cleared
        now = time.time()
        for topic, until in list(cleared.items()):
            if until < now:
                del cleared[topic]

        def remember(topic: str) -> None:
            cleared[topic] = time.time() + ECHO_S  # before the publish: its echo may come at once
            self.metrics.retained_cleared.inc()

        topics = await clear_retained(self.settings.mqtt, self.filters, client_id=self.client_id,
                                      before_clear=remember, quiet=QUIET_S, limit=MAX_SWEEP_S)
        return len(topics)
