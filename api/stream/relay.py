"""The relay of one API process: one MQTT connection (the platform account, clean session,
QoS 0), holding exactly the broker subscriptions its WebSocket clients watch.

Subscriptions are reference-counted by absolute filter: the first client watching a filter
subscribes, the last one leaving unsubscribes, so a process with no clients receives nothing
and ten processes don't each take the whole firehose. Each received message is encoded into
one frame, once, and offered to every client with a matching filter (a trie walk, and a set:
a client whose filters overlap gets it once). Each client has a bounded queue: a client that
does not keep up is disconnected (or, if it asked for it, loses its oldest frames and is told
how many), so it never holds the server's memory nor delays anyone else — the relay never
waits for a client. If the broker connection drops, the relay reconnects, subscribes again to
everything its clients hold, and sends each client a ``gap`` frame with the span it missed.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import logging
import secrets
import time
from typing import Any

import msgspec

from api.stream.filters import FilterTrie
from lms_core.errors import BrokerError
from lms_core.mqtt_fast import FastMessage, FastMqttClient
from lms_core.settings import Settings

log = logging.getLogger("lms.api.stream")

_encode = msgspec.json.Encoder().encode
_check_json = msgspec.json.Decoder().decode

#: Close codes (the 4000-4999 range is the application's), with what they mean.
CLOSE_SESSION_ENDED = 4001   # token revoked or expired, API key revoked
CLOSE_FORBIDDEN = 4003       # no longer a member / role lost; a foreign Origin
CLOSE_TOO_SLOW = 4008        # the client's queue overflowed
CLOSE_LIMIT = 4029           # too many connections (per user or per process)


def kind_of(rest: str) -> str:
    """The topic's kind: what follows the device, a command's id replaced by ``+``."""
    parts = rest.split("/")
    if parts[0] == "commands" and len(parts) >= 2:
        parts[1] = "+"
    return "/".join(parts)


def message_frame(topic: str, prefix_len: int, payload: bytes | bytearray, received_at: float) -> str:
    """One message as the frame every watcher gets. ``payload`` is the device's JSON as is
    (checked, not re-encoded), else ``payload_text`` (UTF-8) or ``payload_base64``."""
    relative = topic[prefix_len:]
    device, _, rest = relative.partition("/")
    frame: dict[str, Any] = {"type": "message", "topic": relative, "device": device, "kind": kind_of(rest),
                             "received_at": int(received_at * 1000)}
    try:
        _check_json(payload)
        frame["payload"] = msgspec.Raw(payload)
    except (msgspec.DecodeError, RecursionError):
        try:
            frame["payload_text"] = payload.decode("utf-8")
        except UnicodeDecodeError:
            frame["payload_base64"] = base64.b64encode(payload).decode()
    return _encode(frame).decode()


class StreamClient:
    """One WebSocket client: its organization, filters and bounded queue of frames."""

    def __init__(self, relay: Relay, org: str, user_id: int, *, drop_oldest: bool) -> None:
        self.relay = relay
        self.org = org
        self.user_id = user_id
        self.prefix = f"{relay.root}/{org}/"
        self.drop_oldest = drop_oldest
        self.limit = relay.queue_frames
        self.limit_chars = relay.queue_chars
        self.queue: collections.deque[str] = collections.deque()
        self.queued_chars = 0  # of the frames in the queue: frames alone do not bound memory
        self.filters: dict[str, str] = {}  # relative -> absolute
        self.ready = asyncio.Event()       # frames queued, or the client must end
        self.dropped = 0
        self.end_code: int | None = None
        self.end_reason = ""
        self.ended = asyncio.Event()

    def offer(self, frame: str) -> None:
        """Queue a frame without ever waiting (called from the relay's message callback)."""
        if self.end_code is not None:
            return
        # A frame too large for the queue alone still goes to a client that has nothing waiting.
        while self.queue and (len(self.queue) >= self.limit or self.queued_chars + len(frame) > self.limit_chars):
            if not self.drop_oldest:
                self.relay.metrics.ws_slow.inc()
                self.end(CLOSE_TOO_SLOW, f"too slow: {len(self.queue)} frames ({self.queued_chars} characters) "
                                         "waiting; read faster or connect with ?overflow=drop")
                return
            self.queued_chars -= len(self.queue.popleft())
            self.dropped += 1
            self.relay.metrics.ws_dropped.inc()
        self._append(frame)

    def _append(self, frame: str) -> None:
        self.queue.append(frame)
        self.queued_chars += len(frame)
        self.ready.set()

    def take(self) -> str | None:
        """The next frame to send, or None when none waits."""
        if not self.queue:
            return None
        frame = self.queue.popleft()
        self.queued_chars -= len(frame)
        return frame

    def send_control(self, frame: dict[str, Any]) -> None:
        """Queue a frame of the protocol (answers, gaps): never dropped, but bounded too — a
        client that sends requests and reads no answers is too slow like any other."""
        if self.end_code is not None:
            return
        if len(self.queue) >= self.limit + 100:
            self.relay.metrics.ws_slow.inc()
            self.end(CLOSE_TOO_SLOW, "too slow: the answers to its own requests are not read")
            return
        self._append(_encode(frame).decode())

    def end(self, code: int, reason: str) -> None:
        if self.end_code is None:
            self.end_code, self.end_reason = code, reason
            self.ended.set()
            self.ready.set()


class Relay:
    def __init__(self, settings: Settings, metrics: Any) -> None:
        self.settings = settings
        self.metrics = metrics
        self.root = settings.topic_root
        api = settings.api
        self.queue_frames = api.ws_queue_frames
        self.queue_chars = api.ws_queue_bytes
        self.max_clients = api.ws_max_clients
        self.max_per_user = api.ws_max_per_user
        self.max_filters = api.ws_max_filters
        self.trie = FilterTrie()
        self.refs: dict[str, int] = {}
        self.clients: set[StreamClient] = set()
        self.per_user: collections.Counter[int] = collections.Counter()
        self._mqtt: FastMqttClient | None = None
        self._lock = asyncio.Lock()
        self._lost_at: float | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        #: absolute filter -> the broker's answer to its first subscription, while awaited
        self._subscribing: dict[str, asyncio.Future[None]] = {}

    # -- clients ---------------------------------------------------------------------

    def join(self, org: str, user_id: int, *, drop_oldest: bool) -> StreamClient | str:
        """A new client, or why it may not connect (a limit)."""
        if len(self.clients) >= self.max_clients:
            return f"this API process serves at most {self.max_clients} streams; try again later"
        if self.per_user[user_id] >= self.max_per_user:
            return f"at most {self.max_per_user} streams per user at once; close another first"
        client = StreamClient(self, org, user_id, drop_oldest=drop_oldest)
        self.clients.add(client)
        self.per_user[user_id] += 1
        self.metrics.ws_clients.set(len(self.clients))
        return client

    async def leave(self, client: StreamClient) -> None:
        for relative in list(client.filters):
            await self.unsubscribe(client, relative)
        if client in self.clients:
            self.clients.discard(client)
            self.per_user[client.user_id] -= 1
            if self.per_user[client.user_id] <= 0:
                del self.per_user[client.user_id]
        self.metrics.ws_clients.set(len(self.clients))

    async def subscribe(self, client: StreamClient, relative: str) -> None:
        """Returns once the broker holds the filter; raises BrokerError when the broker cannot
        be reached or refuses it (nothing changes for this client then)."""
        if relative in client.filters:
            return
        if len(client.filters) >= self.max_filters:
            raise ValueError(f"at most {self.max_filters} filters per stream")
        absolute = client.prefix + relative
        mqtt = await self._connection()
        client.filters[relative] = absolute
        self.trie.add(absolute, client)
        n = self.refs.get(absolute, 0)
        self.refs[absolute] = n + 1
        pending = self._subscribing.get(absolute)
        if n == 0:
            self.metrics.ws_broker_filters.set(len(self.refs))
            if mqtt.connected:  # else the next connection subscribes to every held filter
                # Whoever joins the filter while the broker has not answered waits for the same
                # answer, and shares its outcome (a refusal fails them all).
                pending = asyncio.get_running_loop().create_future()
                self._subscribing[absolute] = pending
                try:
                    await mqtt.subscribe([absolute], qos=0)
                except BrokerError as exc:
                    pending.set_exception(exc)
                    pending.exception()  # retrieved: the joiners may be none
                else:
                    pending.set_result(None)
                finally:
                    self._subscribing.pop(absolute, None)
        if pending is not None:
            try:
                await asyncio.shield(pending)
            except BrokerError:
                await self.unsubscribe(client, relative, broker=False)
                raise

    async def unsubscribe(self, client: StreamClient, relative: str, *, broker: bool = True) -> bool:
        absolute = client.filters.pop(relative, None)
        if absolute is None:
            return False
        self.trie.remove(absolute, client)
        n = self.refs.get(absolute, 0) - 1
        if n > 0:
            self.refs[absolute] = n
            return True
        self.refs.pop(absolute, None)
        self.metrics.ws_broker_filters.set(len(self.refs))
        mqtt = self._mqtt
        if broker and mqtt is not None and mqtt.connected:
            try:
                await mqtt.unsubscribe([absolute], timeout=5)
            except BrokerError as exc:
                log.warning("could not unsubscribe %s: %s", absolute, exc)
        return True

    # -- the broker connection -------------------------------------------------------

    async def _connection(self) -> FastMqttClient:
        if self._mqtt is not None:
            return self._mqtt  # connected, or reconnecting by itself
        async with self._lock:
            if self._mqtt is None:
                # The asyncio session (lms_core/mqtt_fast.py): a read of the socket is parsed in
                # one pass, at a few µs per message where paho spends ~20 (issue 14).
                client = FastMqttClient(self.settings.mqtt, client_id=f"lms-api-stream-{secrets.token_hex(6)}",
                                        reconnect=True, on_message=self._on_message,
                                        on_connect=self._on_connect, on_disconnect=self._on_disconnect,
                                        name="api-stream")
                await client.__aenter__()  # BrokerUnavailable: the caller answers with an error frame
                self._mqtt = client
            return self._mqtt

    def _on_message(self, msg: FastMessage) -> None:
        if msg.retain:
            return  # a retained replay to a new subscription: current state is REST's (see README)
        topic = msg.topic
        clients = self.trie.match(topic)
        if not clients:
            return
        org_end = topic.index("/", len(self.root) + 1) + 1
        frame = message_frame(topic, org_end, msg.payload, time.time())
        for client in clients:
            client.offer(frame)  # type: ignore[attr-defined]
        self.metrics.ws_frames.inc(len(clients))

    def _on_disconnect(self) -> None:
        self._lost_at = time.time()
        self.metrics.ws_broker_connected.set(0)

    def _on_connect(self, session_present: bool) -> None:
        self.metrics.ws_broker_connected.set(1)
        lost, self._lost_at = self._lost_at, None
        if lost is None:
            return
        task = asyncio.create_task(self._restore(lost), name="stream resubscribe")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _restore(self, lost: float) -> None:
        """After a reconnect: every held filter again (retried while the connection lasts),
        then tell every client what it missed."""
        mqtt = self._mqtt
        delay = 1.0
        while mqtt is not None and mqtt.connected:
            try:
                await self._resubscribe(mqtt)
                break
            except BrokerError as exc:
                log.warning("could not restore the stream subscriptions (%s); again in %.0f s", exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 30.0)
        else:
            return  # lost again: the next connection restores
        back = time.time()
        for client in list(self.clients):
            client.send_control({"type": "gap", "from": int(lost * 1000), "to": int(back * 1000),
                                 "reason": "the API's connection to the broker was lost; fetch this span over REST"})
        log.info("stream subscriptions restored: %d filter(s), %d client(s) told of the gap", len(self.refs),
                 len(self.clients))

    async def _resubscribe(self, mqtt: FastMqttClient) -> None:
        """Subscribe to the filters held now, in batches; a filter its last client left while
        a batch was on its way (its UNSUBSCRIBE may have gone first) is unsubscribed after."""
        sent: set[str] = set()
        while True:
            todo = [f for f in self.refs if f not in sent]
            if not todo:
                break
            batch = todo[:100]
            await mqtt.subscribe(batch, qos=0)
            sent.update(batch)
        stale = [f for f in sent if f not in self.refs]
        if stale:
            await mqtt.unsubscribe(stale, timeout=5)

    async def close(self) -> None:
        for client in list(self.clients):
            client.end(1001, "the API is shutting down")
        for task in list(self._tasks):
            task.cancel()
        if self._mqtt is not None:
            await self._mqtt.close()
            self._mqtt = None
