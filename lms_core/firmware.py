"""The configuration file the firmware reads (``lms_config.json`` on the board), built from a
device's credentials: what ``lms device create --firmware-config`` prints and what the API
returns with a new device's credentials (``firmware_config``).

It holds the device's MQTT password, so it exists only where the credentials do: in the
answer that creates the device or rotates its credentials. It is never stored.
"""

from __future__ import annotations

from typing import Any

from lms_core.provisioning import DeviceCredentials
from lms_core.settings import MqttUrl

#: Placeholders the user replaces before copying the file to the board.
WIFI_SSID = "YOUR-WIFI-NAME"
WIFI_PASSWORD = "YOUR-WIFI-PASSWORD"

#: The firmware's defaults, written out so the file shows what can be changed.
DEFAULTS: dict[str, Any] = {
    "ntp_host": "pool.ntp.org",
    "sensor": {"type": "chip"},
    "interval_s": 10,
    "led_pin": 2,
    "buffer_max": 200,
    "backoff_max_s": 60,
    "watchdog_s": 60,
}


def firmware_config(creds: DeviceCredentials, **overrides: Any) -> dict[str, Any]:
    """``lms_config.json`` for the device of ``creds``; ``overrides`` replace top-level
    entries (the demo and tests use them for the sensor, the interval, Wi-Fi)."""
    url = MqttUrl.parse(creds.mqtt_url, var="the device MQTT URL")
    doc: dict[str, Any] = {
        "wifi": {"ssid": WIFI_SSID, "password": WIFI_PASSWORD},
        "mqtt": {"host": url.host, "port": url.port, "tls": url.tls, "username": creds.username,
                 "password": creds.password, "client_id": creds.client_id, "keepalive": 60},
        "topic_prefix": creds.topic_prefix,
        **DEFAULTS,
    }
    doc.update(overrides)
    return doc
