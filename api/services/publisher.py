"""The API process's one MQTT connection for cloud-to-device messages (commands, desired
config): MQTT 5, so that a command carries its message expiry; the platform's service
account; a clean session (nothing is ever queued for the API).

Opened on first use, not at start, so that the API starts (and answers health checks)
while the broker is down; then kept, reconnecting by itself. While it is not connected a
publish fails at once with :class:`BrokerUnavailable` (the caller answers 503) rather than
being queued by paho for a connection that may never come.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import Sequence

import paho.mqtt.client as paho

from lms_core.errors import BrokerError, BrokerUnavailable
from lms_core.mqtt import AsyncMqttClient
from lms_core.settings import MqttUrl

log = logging.getLogger("lms.api.publisher")


class Publisher:
    def __init__(self, url: MqttUrl, *, timeout: float = 5) -> None:
        self.url = url
        self.timeout = timeout
        self._client: AsyncMqttClient | None = None
        self._lock = asyncio.Lock()

    async def _connected(self) -> AsyncMqttClient:
        client = self._client
        if client is not None and client.connected:
            return client
        async with self._lock:
            if self._client is not None:
                if self._client.connected:
                    return self._client
                if not self._client.reconnect_enabled or self._client.generation == 0:
                    await self._client.close()
                    self._client = None
                else:
                    # Reconnecting by itself: say so now rather than make the caller wait.
                    raise BrokerUnavailable("the API is not connected to the MQTT broker; try again")
            # Single-use: a new client for each first attempt (lms_core/mqtt.py).
            client = AsyncMqttClient(self.url, client_id=f"lms-api-{secrets.token_hex(6)}", protocol=paho.MQTTv5,
                                     reconnect=True, name="api-publisher")
            await client.__aenter__()
            self._client = client
            return client

    async def publish(self, topic: str, payload: bytes, *, retain: bool = False, expiry: int | None = None) -> None:
        """Publish at QoS 1 and wait for the broker's acknowledgement."""
        client = await self._connected()
        await client.publish(topic, payload, qos=1, retain=retain, expiry=expiry, timeout=self.timeout)

    async def publish_many(self, messages: Sequence[tuple[str, bytes, int | None]]) -> list[BrokerError | None]:
        """Publish ``(topic, payload, expiry)`` messages at QoS 1, all in flight at once;
        per message, None once the broker acknowledged it, else the error."""
        client = await self._connected()
        mids: list[int | BrokerError] = []
        for topic, payload, expiry in messages:
            try:
                mids.append(client.publish_nowait(topic, payload, 1, False, expiry))
            except BrokerError as exc:
                mids.append(exc)

        async def outcome(mid: int | BrokerError) -> BrokerError | None:
            if isinstance(mid, BrokerError):
                return mid
            try:
                await client.wait_published(mid, self.timeout)
            except BrokerError as exc:
                return exc
            return None

        return list(await asyncio.gather(*(outcome(m) for m in mids)))

    async def close(self) -> None:
        if self._client is not None:
            await self._client.close()
            self._client = None
