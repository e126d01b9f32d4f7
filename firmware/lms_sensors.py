# Sensor drivers behind one small interface: read(ts) -> {"metric": number, ...} (raises
# OSError when the sensor does not answer). make() builds one from the "sensor" entry of
# lms_config.json:
#   {"type": "chip"}                                  the ESP32's own temperature
#   {"type": "dht22", "pin": 4}                       a DHT22 on a GPIO
#   {"type": "bme280", "sda": 21, "scl": 22, "addr": 118}   a BME280 on I2C (0x76)
#   {"type": "sim", "base": 21.0, "amp": 3.0, "noise": 0.2, "spike_chance": 0.0}
import math
import random


class Chip:
    """The chip's own sensor: mcu_temperature() on the S2/S3/C3, raw_temperature() (deg F,
    uncalibrated) on the original ESP32."""

    def __init__(self, spec):
        import esp32

        self.esp32 = esp32

    def read(self, ts):
        f = getattr(self.esp32, "mcu_temperature", None)
        if f is not None:
            return {"chip_temp": f()}
        return {"chip_temp": round((self.esp32.raw_temperature() - 32) / 1.8, 1)}


class DHT22:
    """A DHT22 (AM2302) on one GPIO; it needs 2 s between two measurements."""

    def __init__(self, spec):
        import dht
        import machine

        self.dev = dht.DHT22(machine.Pin(spec.get("pin", 4)))

    def read(self, ts):
        self.dev.measure()
        return {"temp": self.dev.temperature(), "hum": self.dev.humidity()}


def _s16(lo, hi):
    v = lo | (hi << 8)
    return v - 65536 if v > 32767 else v


def _s12(v):
    return v - 4096 if v > 2047 else v


class BME280:
    """A Bosch BME280 over I2C: temperature (deg C), humidity (%), pressure (hPa), with the
    datasheet's floating-point compensation (section 8.1)."""

    def __init__(self, spec):
        import machine

        self.i2c = machine.I2C(spec.get("bus", 0), scl=machine.Pin(spec.get("scl", 22)),
                               sda=machine.Pin(spec.get("sda", 21)))
        self.addr = spec.get("addr", 0x76)
        if self.i2c.readfrom_mem(self.addr, 0xD0, 1)[0] != 0x60:
            raise OSError(19)  # ENODEV: not a BME280
        c = self.i2c.readfrom_mem(self.addr, 0x88, 26)
        self.t = (c[0] | (c[1] << 8), _s16(c[2], c[3]), _s16(c[4], c[5]))
        self.p = [c[6] | (c[7] << 8)] + [_s16(c[i], c[i + 1]) for i in range(8, 24, 2)]
        h = self.i2c.readfrom_mem(self.addr, 0xE1, 7)
        # H1 u8 (0xA1), H2 s16, H3 u8, H4 and H5 signed 12 bits sharing 0xE5, H6 s8
        self.h = (c[25], _s16(h[0], h[1]), h[2], _s12((h[3] << 4) | (h[4] & 0x0F)),
                  _s12((h[5] << 4) | (h[4] >> 4)), h[6] - 256 if h[6] > 127 else h[6])
        # humidity x1, then temperature x1, pressure x1, normal mode; 1 s standby
        self.i2c.writeto_mem(self.addr, 0xF2, b"\x01")
        self.i2c.writeto_mem(self.addr, 0xF4, b"\x27")
        self.i2c.writeto_mem(self.addr, 0xF5, b"\xa0")

    def read(self, ts):
        d = self.i2c.readfrom_mem(self.addr, 0xF7, 8)
        adc_p = (d[0] << 12) | (d[1] << 4) | (d[2] >> 4)
        adc_t = (d[3] << 12) | (d[4] << 4) | (d[5] >> 4)
        adc_h = (d[6] << 8) | d[7]
        t1, t2, t3 = self.t
        v1 = (adc_t / 16384.0 - t1 / 1024.0) * t2
        v2 = (adc_t / 131072.0 - t1 / 8192.0) ** 2 * t3
        fine = v1 + v2
        out = {"temp": round(fine / 5120.0, 2)}
        p1, p2, p3, p4, p5, p6, p7, p8, p9 = self.p
        v1 = fine / 2.0 - 64000.0
        v2 = v1 * v1 * p6 / 32768.0 + v1 * p5 * 2.0
        v2 = v2 / 4.0 + p4 * 65536.0
        v1 = (p3 * v1 * v1 / 524288.0 + p2 * v1) / 524288.0
        v1 = (1.0 + v1 / 32768.0) * p1
        if v1:
            p = (1048576.0 - adc_p - v2 / 4096.0) * 6250.0 / v1
            p += (p9 * p * p / 2147483648.0 + p * p8 / 32768.0 + p7) / 16.0
            out["pressure"] = round(p / 100.0, 2)
        h1, h2, h3, h4, h5, h6 = self.h
        h = fine - 76800.0
        h = (adc_h - (h4 * 64.0 + h5 / 16384.0 * h)) * (h2 / 65536.0 * (1.0 + h6 / 67108864.0 * h * (
            1.0 + h3 / 67108864.0 * h)))
        h = h * (1.0 - h1 * h / 524288.0)
        out["hum"] = round(min(100.0, max(0.0, h)), 2)
        return out


class Simulated:
    """A plausible room: temperature on a daily curve (warmest at 15:00 UTC) plus noise,
    humidity moving against it; with ``spike_chance``, now and then a warm spell of
    ``spike_len`` readings ``spike`` degrees higher (something for an alert rule)."""

    def __init__(self, spec):
        self.base = spec.get("base", 21.0)
        self.amp = spec.get("amp", 3.0)
        self.noise = spec.get("noise", 0.2)
        self.chance = spec.get("spike_chance", 0.0)
        self.spike = spec.get("spike", 6.0)
        self.spike_len = spec.get("spike_len", 12)
        self.left = 0
        seed = spec.get("seed")
        if seed is not None:
            random.seed(seed)

    def _gauss(self):
        # Irwin-Hall: the sum of 12 uniforms minus 6 is close to a standard normal
        # (MicroPython's random has no gauss()).
        s = 0.0
        for _ in range(12):
            s += random.getrandbits(16) / 65536.0
        return s - 6.0

    def read(self, ts):
        hours = (ts // 1000 % 86400) / 3600.0
        temp = self.base + self.amp * math.sin(2 * math.pi * (hours - 9) / 24) + self.noise * self._gauss()
        if self.left:
            self.left -= 1
            temp += self.spike
        elif self.chance and random.getrandbits(16) / 65536.0 < self.chance:
            self.left = self.spike_len
        hum = 45.0 - 1.5 * (temp - self.base) + 2 * self.noise * self._gauss()
        return {"temp": round(temp, 2), "hum": round(min(100.0, max(0.0, hum)), 1)}


KINDS = {"chip": Chip, "dht22": DHT22, "bme280": BME280, "sim": Simulated}


def make(spec):
    kind = KINDS.get(spec.get("type", "chip"))
    if kind is None:
        raise ValueError("unknown sensor type %r; known: %s" % (spec.get("type"), ", ".join(KINDS)))
    return kind(spec)
