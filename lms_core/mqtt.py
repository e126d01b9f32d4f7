"""paho-mqtt driven by the asyncio event loop, in the loop's own thread (only the connect, which
blocks, runs in a worker thread).

Why not aiomqtt: measured on the reference machine, aiomqtt's per-message futures and
queue cap a subscriber at ~10k msg/s, while paho's parser alone does 25k-70k. Why not
paho's own network thread: every acknowledgement sent from another thread wakes paho's
loop through a socket pair and both threads fight over the GIL. Here paho's socket is
registered with the event loop (``add_reader``/``add_writer``), paho's callbacks run in
the loop thread, and a message costs what paho's parser costs plus one list append.

One :class:`AsyncMqttClient` owns one connection. With ``reconnect=True`` it reconnects
with exponential backoff until closed; ``on_connect`` runs after every (re)connection so
the owner can resubscribe, and ``generation`` counts connections so that an owner never
acknowledges, on a new connection, a message received on an old one (the broker reuses
packet ids; a stale PUBACK could acknowledge a different, uncommitted message).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import struct
import threading
from collections.abc import Callable
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from lms_core.errors import BrokerError, BrokerUnavailable, DeliveryUnknown
from lms_core.mqtt_fast import SessionLifecycle
from lms_core.settings import MqttUrl

log = logging.getLogger("lms.mqtt")

MessageHandler = Callable[[paho.MQTTMessage], None]

_puback = struct.Struct(">BBH").pack  # PUBACK: type 0x40, remaining length 2, packet id


class AsyncMqttClient(SessionLifecycle):
    """An MQTT connection whose I/O runs on the asyncio loop. Use ``async with``."""

    def __init__(
        self,
        url: MqttUrl,
        *,
        client_id: str = "",
        protocol: MQTTProtocolVersion = paho.MQTTv311,
        persistent: bool = False,
        manual_ack: bool = False,
        reconnect: bool = False,
        keepalive: int = 30,
        session_expiry: int = 7 * 86400,
        on_message: MessageHandler | None = None,
        on_connect: Callable[[bool], None] | None = None,
        on_disconnect: Callable[[], None] | None = None,
        name: str = "mqtt",
    ) -> None:
        self.url = url
        self.name = name
        self.keepalive = keepalive
        self.protocol = protocol
        self.persistent = persistent
        self.session_expiry = session_expiry
        self.reconnect_enabled = reconnect
        self.generation = 0
        self.connected = False
        self.on_message = on_message
        self.on_connect_cb = on_connect
        self.on_disconnect_cb = on_disconnect
        self._loop: asyncio.AbstractEventLoop | None = None
        self._connect_waiter: asyncio.Future[None] | None = None
        self._pending: dict[int, asyncio.Future[Any]] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._closing = False
        self._entered = False
        self._loop_thread = 0
        self._sock: Any = None
        kwargs: dict[str, Any] = {}
        if protocol != paho.MQTTv5:
            kwargs["clean_session"] = not persistent
        self.client = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=client_id,
            protocol=protocol,
            manual_ack=manual_ack,
            reconnect_on_failure=False,
            **kwargs,
        )
        if url.username is not None:
            self.client.username_pw_set(url.username, url.password)
        if url.tls:
            self.client.tls_set_context(ssl.create_default_context())
        # paho queues unbounded publishes otherwise; the window is managed by callers.
        self.client.max_inflight_messages_set(1000)
        self.client.max_queued_messages_set(0)
        c = self.client
        c.on_socket_open = self._sock_open
        c.on_socket_close = self._sock_close
        c.on_socket_register_write = self._reg_write
        c.on_socket_unregister_write = self._unreg_write
        c.on_connect = self._on_connect
        c.on_disconnect = self._on_disconnect
        c.on_message = self._on_message
        c.on_subscribe = self._on_subscribe
        c.on_unsubscribe = self._on_unsubscribe
        c.on_publish = self._on_publish

    # -- lifecycle -------------------------------------------------------------------

    # -- lifecycle (the rest is SessionLifecycle's) ----------------------------------------

    def _bind_loop(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()

    async def _disconnect(self) -> None:
        if self.connected:
            waiter = self._new_waiter()
            self.client.disconnect()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(asyncio.shield(waiter), 2)
        self._drop_socket()
        # paho opens a loopback socket pair to wake its own network thread, which this
        # class does not run; it never closes it itself.
        for name in ("_sockpairR", "_sockpairW"):
            pair = getattr(self.client, name, None)
            if pair is not None:
                pair.close()
                setattr(self.client, name, None)
        self._fail_pending(BrokerUnavailable("connection closed"))

    async def _connect_once(self) -> None:
        assert self._loop is not None
        waiter = self._new_waiter()
        try:
            # paho resolves, connects and shakes hands (TLS) synchronously: off the loop, so
            # a slow DNS answer or an unanswered SYN never stalls commits and acknowledgements.
            # paho's socket callbacks then arrive from the worker thread (see _on_loop).
            await self._loop.run_in_executor(None, self._connect_blocking)
        except (OSError, ssl.SSLError) as exc:
            self._connect_waiter = None
            raise BrokerUnavailable(f"cannot reach MQTT broker at {self.url.public()}: {exc}") from None
        try:
            await asyncio.wait_for(waiter, 10)
        except TimeoutError:
            self._drop_socket()
            raise BrokerUnavailable(f"MQTT broker at {self.url.public()} did not answer CONNECT") from None

    def _connect_blocking(self) -> None:
        if self.protocol == paho.MQTTv5:
            props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]  # paho leaves it unannotated
            props.SessionExpiryInterval = self.session_expiry if self.persistent else 0
            self.client.connect(self.url.host, self.url.port, self.keepalive,
                                clean_start=not self.persistent, properties=props)
        else:
            self.client.connect(self.url.host, self.url.port, self.keepalive)

    def _on_loop(self, fn: Callable[..., None], *args: Any) -> None:
        """Run ``fn`` now when called on the loop's thread (every hot-path call), else
        hand it to the loop: paho calls its socket callbacks from inside ``connect``,
        which runs in a worker thread, and the loop's reader/writer registry is not
        thread-safe. Hand-offs keep their order, so a socket opened then closed by one
        connect attempt is registered then unregistered."""
        assert self._loop is not None
        if threading.get_ident() == self._loop_thread:
            fn(*args)
        else:
            self._loop.call_soon_threadsafe(fn, *args)

    def _new_waiter(self) -> asyncio.Future[None]:
        assert self._loop is not None
        self._connect_waiter = self._loop.create_future()
        return self._connect_waiter

    async def _keepalive_loop(self) -> None:
        # paho's keepalive pings and its detection of a dead peer live in loop_misc.
        while True:
            await asyncio.sleep(1)
            if self._sock is not None:
                self.client.loop_misc()

    # -- operations --------------------------------------------------------------

    async def subscribe(self, filters: list[str], qos: int = 1, timeout: float = 10) -> list[int]:
        """Subscribe and wait for SUBACK; raise BrokerError for refused filters."""
        result, mid = self.client.subscribe([(f, qos) for f in filters])
        if result != paho.MQTT_ERR_SUCCESS or mid is None:
            raise BrokerUnavailable(f"subscribe failed: {paho.error_string(result)}")
        codes = await self._wait(mid, timeout)
        refused = [f for f, code in zip(filters, codes, strict=False) if code >= 0x80]
        if refused:
            raise BrokerError(f"broker refused subscription to {', '.join(refused)}")
        return [int(c) for c in codes]

    async def unsubscribe(self, filters: list[str], timeout: float | None = 10) -> None:
        """Unsubscribe and wait for UNSUBACK, at most ``timeout`` s (None: while connected)."""
        result, mid = self.client.unsubscribe(filters)
        if result != paho.MQTT_ERR_SUCCESS or mid is None:
            raise BrokerUnavailable(f"unsubscribe failed: {paho.error_string(result)}")
        await self._wait(mid, timeout)

    def publish_nowait(self, topic: str, payload: bytes | str, qos: int = 1, retain: bool = False,
                       expiry: int | None = None) -> int:
        """Queue a publish; ``expiry``: MQTT 5 message expiry in seconds (the broker drops the
        message, queued for an offline session, once it has waited that long)."""
        props = None
        if expiry is not None and self.protocol == paho.MQTTv5:
            props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]  # paho leaves it unannotated
            props.MessageExpiryInterval = expiry
        info = self.client.publish(topic, payload, qos=qos, retain=retain, properties=props)
        if info.rc != paho.MQTT_ERR_SUCCESS:
            # Not connected: paho keeps the message and would send it after reconnecting,
            # long after the caller was told it failed (a command marked "not delivered"
            # then runs on the device). Take it back, so that the failure is the truth.
            c = self.client
            with c._out_message_mutex:  # paho internals: no public way to withdraw a message
                c._out_messages.pop(info.mid, None)
            raise BrokerUnavailable(f"publish failed: {paho.error_string(info.rc)}")
        return info.mid

    async def publish(self, topic: str, payload: bytes | str, qos: int = 1, retain: bool = False,
                      timeout: float = 10, expiry: int | None = None) -> None:
        """Publish and, for QoS 1, wait for the broker's PUBACK; raise BrokerError when the
        broker refused it (an MQTT 5 reason code of 0x80 or more)."""
        mid = self.publish_nowait(topic, payload, qos, retain, expiry)
        if qos:
            await self.wait_published(mid, timeout)

    async def wait_published(self, mid: int, timeout: float = 10) -> None:
        """Wait for the PUBACK of publish ``mid`` (see :meth:`publish`). No PUBACK in time or
        the connection lost meanwhile raise :class:`DeliveryUnknown`: the message was handed
        over and may still be delivered."""
        try:
            reason = await self._wait(mid, timeout)
        except BrokerError as exc:
            raise DeliveryUnknown(f"{exc}; the message may still be delivered") from None
        if getattr(reason, "is_failure", False):
            raise BrokerError(f"broker refused the message: {reason}")

    def pause_reading(self) -> None:
        """Stop reading from the socket (writes, e.g. acknowledgements, still go out).
        Unread messages stay unacknowledged with the broker, which redelivers them."""
        if self._sock is not None and self._loop is not None:
            self._loop.remove_reader(self._sock)

    def ack_many(self, mids: list[int], generation: int) -> int:
        """Acknowledge QoS 1 messages received on connection ``generation``; return how many.

        One write for the whole batch: paho's ``ack`` queues one packet per message, wakes
        its loop through a socket pair and sends each PUBACK with its own system call,
        which cost ~7% of the bridge's CPU in bench/ingest.py. The packets are the same
        4 bytes in MQTT 3.1.1 and 5 (a PUBACK without reason code means success).
        """
        if generation != self.generation or not self.connected or not mids:
            return 0
        queue = getattr(self.client, "_packet_queue", None)
        if queue is None:  # a paho without the internal queue: one call per message
            for mid in mids:
                self.client.ack(mid, 1)
            return len(mids)
        queue(paho.PUBACK, b"".join([_puback(0x40, 2, mid) for mid in mids]), 0, 0)
        return len(mids)

    def resume_reading(self) -> None:
        if self._sock is not None and self._loop is not None:
            self._loop.add_reader(self._sock, self._read)

    async def barrier(self, timeout: float = 5) -> None:
        """Return once the broker has processed everything sent before this call.

        Mosquitto handles a connection's packets in order, so the answer to a request
        sent now (an UNSUBSCRIBE of a filter nobody uses) proves the PUBACKs ahead of it
        were processed. Needed before closing: a socket closed with unread data in it is
        reset, and a reset makes the broker discard what it had not read yet.
        """
        self.resume_reading()
        await self.unsubscribe(["$lms-barrier"], timeout=timeout)

    async def _wait(self, mid: int, timeout: float | None) -> Any:
        assert self._loop is not None
        fut = self._pending.get(mid)
        if fut is None:
            fut = self._pending[mid] = self._loop.create_future()
        try:
            return await asyncio.wait_for(fut, timeout)
        except TimeoutError:
            raise BrokerError(f"broker did not acknowledge within {timeout} s") from None
        finally:
            self._pending.pop(mid, None)

    def _resolve(self, mid: int, value: Any) -> None:
        assert self._loop is not None
        fut = self._pending.get(mid)
        if fut is None:
            # The acknowledgement can arrive before the caller awaits (same loop turn).
            fut = self._pending[mid] = self._loop.create_future()
        if not fut.done():
            fut.set_result(value)

    def _fail_pending(self, exc: Exception) -> None:
        for fut in self._pending.values():
            if not fut.done():
                fut.set_exception(exc)
        self._pending.clear()

    # -- paho callbacks (run in the loop thread) -----------------------------------

    def _sock_open(self, client: paho.Client, userdata: Any, sock: Any) -> None:
        self._on_loop(self._register, sock)

    def _register(self, sock: Any) -> None:
        assert self._loop is not None
        if self._closing:  # closed while a connect attempt was still running in its thread
            with contextlib.suppress(Exception):
                sock.close()
            return
        if sock.fileno() < 0:  # opened and closed again by that attempt before we got here
            return
        self._sock = sock
        self._loop.add_reader(sock, self._read)

    def _read(self) -> None:
        rc = self.client.loop_read()
        if rc != paho.MQTT_ERR_SUCCESS and self._sock is not None:
            # paho reports some failures without closing the socket itself.
            self._drop_socket()

    def _sock_close(self, client: paho.Client, userdata: Any, sock: Any) -> None:
        self._on_loop(self._unregister, sock)

    def _unregister(self, sock: Any) -> None:
        assert self._loop is not None
        self._loop.remove_reader(sock)
        self._loop.remove_writer(sock)
        if sock is self._sock:
            self._sock = None

    def _drop_socket(self) -> None:
        sock = self._sock
        if sock is not None and self._loop is not None:
            self._loop.remove_reader(sock)
            self._loop.remove_writer(sock)
        self._sock = None
        if sock is not None:
            with contextlib.suppress(Exception):
                sock.close()
        if self.connected:
            self.connected = False
            self._after_disconnect()

    def _reg_write(self, client: paho.Client, userdata: Any, sock: Any) -> None:
        self._on_loop(self._add_writer, sock)

    def _add_writer(self, sock: Any) -> None:
        assert self._loop is not None
        if sock.fileno() >= 0:
            self._loop.add_writer(sock, self.client.loop_write)

    def _unreg_write(self, client: paho.Client, userdata: Any, sock: Any) -> None:
        self._on_loop(self._remove_writer, sock)

    def _remove_writer(self, sock: Any) -> None:
        assert self._loop is not None
        self._loop.remove_writer(sock)

    def _on_connect(self, client: paho.Client, userdata: Any, flags: Any, reason: Any,
                    properties: Any) -> None:
        waiter, self._connect_waiter = self._connect_waiter, None
        if reason.is_failure:
            exc = BrokerUnavailable(f"MQTT broker at {self.url.public()} refused the connection: {reason}")
            if waiter is not None and not waiter.done():
                waiter.set_exception(exc)
            return
        self.generation += 1
        self.connected = True
        # Long-lived connections say so; short ones (an admin command) would only add noise.
        log.log(logging.INFO if self.reconnect_enabled else logging.DEBUG, "%s: connected to %s (session present: %s)",
                self.name, self.url.public(), bool(flags.session_present))
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
        if self.on_connect_cb is not None:
            self.on_connect_cb(bool(flags.session_present))

    def _on_disconnect(self, client: paho.Client, userdata: Any, flags: Any, reason: Any,
                       properties: Any) -> None:
        waiter = self._connect_waiter
        if waiter is not None and not waiter.done():
            if self._closing:
                waiter.set_result(None)
            else:
                waiter.set_exception(BrokerUnavailable(f"MQTT broker closed the connection: {reason}"))
            self._connect_waiter = None
        if self.connected:
            self.connected = False
            if not self._closing:
                log.warning("%s: disconnected from %s: %s", self.name, self.url.public(), reason)
            self._after_disconnect()

    def _after_disconnect(self) -> None:
        self._fail_pending(BrokerUnavailable("connection lost"))
        if self.on_disconnect_cb is not None:
            self.on_disconnect_cb()
        self._start_reconnect()

    def _on_message(self, client: paho.Client, userdata: Any, msg: paho.MQTTMessage) -> None:
        if self.on_message is not None:
            self.on_message(msg)

    def _on_subscribe(self, client: paho.Client, userdata: Any, mid: int, reasons: Any,
                      properties: Any) -> None:
        self._resolve(mid, [getattr(r, "value", r) for r in reasons])

    def _on_unsubscribe(self, client: paho.Client, userdata: Any, mid: int, reasons: Any,
                        properties: Any) -> None:
        self._resolve(mid, None)

    def _on_publish(self, client: paho.Client, userdata: Any, mid: int, reason: Any,
                    properties: Any) -> None:
        self._resolve(mid, reason)
