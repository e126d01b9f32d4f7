"""lms_core/mqtt.py reaches into private parts of paho-mqtt, where measured: the packet
queue (one write for a whole batch of PUBACKs, ~7% of the bridge's CPU) and the unused
wake-up socket pair it closes; and its queue of outgoing messages, to withdraw one it could
not send (there is no public way). pyproject.toml pins paho to the minor version these were read
from; this test fails loudly, before any message is lost, if an upgrade changes them."""

from __future__ import annotations

import inspect

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion


def test_paho_is_the_minor_version_the_internals_were_read_from() -> None:
    import paho.mqtt as pkg

    assert pkg.__version__.startswith("2.2."), (
        f"paho-mqtt {pkg.__version__}: re-read Client._packet_queue and the socket pair, then move the pin")


def test_packet_queue_and_socket_pair_are_as_read() -> None:
    params = list(inspect.signature(paho.Client._packet_queue).parameters)
    assert params[:5] == ["self", "command", "packet", "mid", "qos"], params
    source = inspect.getsource(paho.Client._packet_queue)
    # Queued packets go out through the write callback we register with the event loop.
    assert "_out_packet.append" in source and "_call_socket_register_write" in source
    client = paho.Client(CallbackAPIVersion.VERSION2, client_id="probe")
    try:
        assert hasattr(client, "_sockpairR") and hasattr(client, "_sockpairW")
        assert paho.PUBACK == 0x40
    finally:
        for name in ("_sockpairR", "_sockpairW"):
            pair = getattr(client, name, None)
            if pair is not None:
                pair.close()


def test_a_publish_without_connection_is_kept_where_it_is_withdrawn_from() -> None:
    """AsyncMqttClient.publish_nowait withdraws a publish paho could not send (not connected)
    from ``_out_messages``, under ``_out_message_mutex``: paho would send it on reconnecting."""
    client = paho.Client(CallbackAPIVersion.VERSION2, client_id="probe")
    try:
        info = client.publish("t", b"x", qos=1)
        assert info.rc == paho.MQTT_ERR_NO_CONN
        with client._out_message_mutex:
            assert info.mid in client._out_messages
            client._out_messages.pop(info.mid)
    finally:
        for name in ("_sockpairR", "_sockpairW"):
            pair = getattr(client, name, None)
            if pair is not None:
                pair.close()
