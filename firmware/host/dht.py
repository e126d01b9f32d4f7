"""MicroPython's ``dht`` on CPython: nothing is wired, so a measurement times out."""

from typing import Any


class DHT22:
    def __init__(self, pin: Any) -> None:
        self.pin = pin

    def measure(self) -> None:
        raise OSError(116, "ETIMEDOUT")

    def temperature(self) -> float:
        raise OSError(116, "ETIMEDOUT")

    def humidity(self) -> float:
        raise OSError(116, "ETIMEDOUT")


DHT11 = DHT22
