"""MicroPython's ``esp32`` on CPython: the chip temperature is the host's, if it has a
thermal zone, else a steady 45 degC."""


def mcu_temperature() -> float:
    try:
        with open("/sys/class/thermal/thermal_zone0/temp") as f:
            return round(int(f.read()) / 1000, 1)
    except (OSError, ValueError):
        return 45.0


def raw_temperature() -> int:
    return round(mcu_temperature() * 1.8 + 32)
