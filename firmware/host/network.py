"""MicroPython's ``network`` on CPython: the station interface is the host's network."""

from __future__ import annotations

STA_IF = 0
AP_IF = 1
STAT_IDLE = 0
STAT_CONNECTING = 1
STAT_GOT_IP = 1010


class WLAN:
    def __init__(self, interface: int = STA_IF) -> None:
        self.interface = interface
        self._active = False
        self._connected = False

    def active(self, on: bool | None = None) -> bool:
        if on is not None:
            self._active = bool(on)
            if not on:
                self._connected = False
        return self._active

    def connect(self, ssid: str | None = None, key: str | None = None) -> None:
        if not self._active:
            raise OSError("Wi-Fi Internal Error")  # as on the ESP32 when not active
        self._connected = True

    def disconnect(self) -> None:
        self._connected = False

    def isconnected(self) -> bool:
        return self._connected

    def status(self, param: str | None = None) -> int:
        if param == "rssi":
            return -55
        return STAT_GOT_IP if self._connected else STAT_IDLE

    def ifconfig(self) -> tuple[str, str, str, str]:
        return ("127.0.0.1", "255.0.0.0", "127.0.0.1", "127.0.0.1")
