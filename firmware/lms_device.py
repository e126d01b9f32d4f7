# The device: Wi-Fi, clock, MQTT, sampling, offline buffer, commands and config, in one
# single-threaded loop that feeds the hardware watchdog on every turn and never blocks for
# long (each network step has a timeout well under the watchdog's).
import gc
import json
import os
import random

import lms_mqtt
import lms_proto
import lms_sensors
import machine
import network
import ntptime
import utime
from lms_proto import Refused

VERSION = "1.0.0"
CONFIG_FILE = "lms_config.json"  # written by the platform (lms device create --firmware-config)
DESIRED_FILE = "lms_desired.json"  # the desired config in force, kept across reboots
EPOCH_2000_MS = 946684800000  # ports whose epoch is 2000-01-01 count from here
VALID_AFTER_MS = 1577836800000  # 2020-01-01: a clock before it has not been set yet
TICK_MS = 20  # the loop's pause: commands are answered within a tick or two
ACK_TIMEOUT_MS = 15000  # a telemetry PUBACK slower than this means the connection is dead
OUTBOX_MAX = 16  # command results, config reports, events waiting for their PUBACK
NTP_RESYNC_MS = 6 * 3600 * 1000
WIFI_RETRY_MS = 15000


def log(*args):
    print("lms:", *args)


def load_json(name):
    try:
        with open(name) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def save_json(name, doc):
    """Write through a temporary file, so a reset mid-write leaves the old file whole."""
    tmp = name + ".tmp"
    with open(tmp, "w") as f:
        f.write(json.dumps(doc))
    try:
        os.remove(name)
    except OSError:
        pass
    os.rename(tmp, name)


class Clock:
    """Epoch milliseconds from the RTC (set by NTP). Stamps only go up, so two readings
    never share a ``ts`` (the platform keeps one value per device, metric and time)."""

    def __init__(self):
        self.offset = EPOCH_2000_MS if utime.gmtime(0)[0] == 2000 else 0
        self.last = 0

    def now_ms(self):
        return utime.time_ns() // 1000000 + self.offset

    def valid(self):
        return self.now_ms() > VALID_AFTER_MS

    def stamp(self):
        t = self.now_ms()
        if t <= self.last:
            t = self.last + 1
        self.last = t
        return t


class Backoff:
    """Exponential backoff with jitter: each failure doubles the wait up to ``max_ms``, and
    the wait is drawn from its upper half, so a fleet that lost its broker at the same
    moment does not come back in one wave."""

    def __init__(self, base_ms, max_ms):
        self.base = base_ms
        self.max = max_ms
        self.n = 0
        self.at = 0

    def ready(self, now):
        return self.n == 0 or utime.ticks_diff(now, self.at) >= 0

    def failed(self, now):
        d = min(self.max, self.base << min(self.n, 16))
        d = d // 2 + (d // 2) * random.getrandbits(16) // 65536
        self.at = utime.ticks_add(now, d)
        self.n += 1
        return d

    def reset(self):
        self.n = 0


class Led:
    """The board's LED: steady on/off, blinking, or a few blinks then back to steady."""

    def __init__(self, pin):
        self.pin = machine.Pin(pin, machine.Pin.OUT) if pin is not None else None
        self.steady = "off"
        self.flips = 0
        self.level = 0
        self.next = 0
        self._out(0)

    def _out(self, level):
        self.level = level
        if self.pin is not None:
            self.pin.value(level)

    def set(self, state, now, times=0):
        if state == "blink" and times:
            self.flips = times * 2
            self.next = now
        else:
            self.steady = state
            self.flips = 0
            self._out(1 if state == "on" else 0)

    def state(self):
        return "blink" if self.flips else self.steady

    def tick(self, now):
        if (self.flips or self.steady == "blink") and utime.ticks_diff(now, self.next) >= 0:
            self._out(self.level ^ 1)
            self.next = utime.ticks_add(now, 250 if self.flips else 500)
            if self.flips:
                self.flips -= 1
                if not self.flips:
                    self._out(1 if self.steady == "on" else 0)


class Device:
    def __init__(self, cfg):
        self.cfg = cfg
        self.prefix = cfg["topic_prefix"]
        m = cfg["mqtt"]
        self.defaults = {"interval_s": lms_proto.check_interval(cfg.get("interval_s", 10)), "led": "off"}
        self.settings = dict(self.defaults)
        self.version = None  # version of the desired config in force
        self.reported_version = None  # the last version whose report the broker took (this boot)
        self.sensor = lms_sensors.make(cfg.get("sensor") or {"type": "chip"})
        self.clock = Clock()
        self.buf = []  # encoded stamped readings, oldest first
        self.buf_max = cfg.get("buffer_max", 200)
        self.inflight = 0  # readings at the head of buf sent, PUBACK awaited
        self.tx_pid = 0
        self.tx_at = 0
        self.dropped = 0  # readings lost to a full buffer, told in an event
        self.outbox = []  # [topic, payload, retain, pid or 0, desired version or None]
        self.booted = utime.ticks_ms()
        self.client = lms_mqtt.Client(m["client_id"], m["host"], m.get("port", 1883), m["username"],
                                      m["password"], m.get("keepalive", 60), m.get("tls", False),
                                      m.get("ca_file"))
        self.client.set_will(self.prefix + "/status", "offline", 1, True)
        self.client.on_message = self.on_message
        self.client.on_ack = self.on_ack
        self.connected = False
        self.net_backoff = Backoff(cfg.get("backoff_min_ms", 1000), cfg.get("backoff_max_s", 60) * 1000)
        self.ntp_backoff = Backoff(2000, 60000)
        self.wifi_backoff = Backoff(WIFI_RETRY_MS, 4 * WIFI_RETRY_MS)
        self.ntp_at = None
        self.next_sample = None
        self.interval_ms = 0
        self.reboot_at = None
        self.wlan = network.WLAN(network.STA_IF)
        self.led = Led(cfg.get("led_pin"))
        self.wdt = machine.WDT(timeout=cfg.get("watchdog_s", 60) * 1000)
        doc = load_json(DESIRED_FILE)
        if isinstance(doc, dict):
            try:
                self.apply(lms_proto.effective(self.defaults, doc), utime.ticks_ms())
                self.version = doc["version"]
                log("desired config", self.version, "from flash")
            except (Refused, KeyError):
                pass
        if self.version is None:
            self.apply(self.settings, utime.ticks_ms())

    # -- settings ----------------------------------------------------------------------

    def apply(self, settings, now):
        self.settings = settings
        self.interval_ms = int(settings["interval_s"] * 1000)
        self.next_sample = None  # the new interval counts from now
        self.led.set(settings["led"], now)

    def on_config(self, payload):
        try:
            doc = lms_proto.parse_config(payload)
        except Refused as e:
            log("config ignored:", e)
            return
        now = utime.ticks_ms()
        if doc is None:
            if self.version is not None:
                log("desired config cleared: back to the defaults of", CONFIG_FILE)
                self.version = None
                self.apply(dict(self.defaults), now)
                try:
                    os.remove(DESIRED_FILE)
                except OSError:
                    pass
            return
        v = doc["version"]
        if v == self.reported_version:
            return  # the same version again (a reconnect, the bridge's reconcile): nothing to do
        try:
            new = lms_proto.effective(self.defaults, doc)
        except Refused as e:
            log("config", v, "refused:", e)
            self.send(self.prefix + "/config/reported", lms_proto.reported(v, self.settings, str(e), self.version),
                      version=v)
            return
        if v != self.version:
            self.apply(new, now)
            self.version = v
            save_json(DESIRED_FILE, doc)
            log("config", v, "applied:", new)
        self.send(self.prefix + "/config/reported", lms_proto.reported(v, new), version=v)

    # -- commands ----------------------------------------------------------------------

    def on_command(self, cid, payload):
        topic = self.prefix + "/commands/%d/result" % cid
        try:
            name, params = lms_proto.parse_command(cid, payload, self.clock.now_ms())
        except Refused as e:
            log("command", cid, "refused:", e)
            self.send(topic, lms_proto.result("error", error=str(e)))
            return
        try:
            res = self.run_command(name, params)
        except Exception as e:
            self.send(topic, lms_proto.result("error", error="%s failed: %r" % (name, e)))
            return
        log("command", cid, name, "ok")
        self.send(topic, lms_proto.result("ok", res))

    def run_command(self, name, params):
        now = utime.ticks_ms()
        if name == "ping":
            free = getattr(gc, "mem_free", None)
            return {"pong": True, "firmware": VERSION, "uptime_s": utime.ticks_diff(now, self.booted) // 1000,
                    "interval_s": self.interval_ms / 1000, "buffered": len(self.buf),
                    "mem_free": free() if free else None}
        if name == "reboot":
            self.reboot_at = utime.ticks_add(now, 3000)  # after the result's PUBACK, or in 3 s
            return {"rebooting": True}
        if name == "set_interval":
            # Until the next desired config or reboot; the desired config is the lasting way.
            self.interval_ms = int(params["seconds"] * 1000)
            self.next_sample = utime.ticks_add(now, self.interval_ms)
            return {"interval_s": params["seconds"]}
        if name == "read_now":
            got = self.sample()
            if got is None:
                raise OSError("the sensor did not answer")
            return {"ts": got[0], "values": got[1]}
        # led
        self.led.set(params["state"], now, params["times"] if params["state"] == "blink" else 0)
        return {"led": params["state"]}

    # -- MQTT --------------------------------------------------------------------------

    def on_message(self, topic, payload):
        if topic == self.prefix + "/config":
            self.on_config(payload)
            return
        cid = lms_proto.command_id(self.prefix, topic)
        if cid is not None:
            self.on_command(cid, payload)

    def on_ack(self, pid):
        if self.inflight and pid == self.tx_pid:
            del self.buf[:self.inflight]
            self.inflight = 0
            return
        for i, e in enumerate(self.outbox):
            if e[3] == pid:
                if e[4] is not None:
                    self.reported_version = e[4]
                del self.outbox[i]
                return

    def send(self, topic, payload, retain=False, version=None):
        """Queue a QoS 1 message that must arrive (a result, a report, an event): sent by the
        next pump(), again after every reconnect until the broker acknowledged it."""
        if len(self.outbox) >= OUTBOX_MAX:
            log("outbox full: dropped", self.outbox.pop(0)[0])
        self.outbox.append([topic, payload, retain, 0, version])  # pump() sends it this turn

    def connect(self, now):
        try:
            present = self.client.connect(clean=False)
            # Subscribing again on every connection also hands over the retained config.
            self.client.subscribe(lms_proto.subscriptions(self.prefix))
        except Exception as e:  # not only OSError: a TLS set-up error, a
            # MemoryError in the handshake (no PSRAM) must wait its backoff too, and must not
            # reach the loop's MemoryError handler, which drops half of the offline buffer.
            self.client.close()
            log("MQTT connect failed:", repr(e), "- again in", self.net_backoff.failed(now), "ms")
            return
        log("MQTT connected (session present: %s)" % present)
        self.connected = True
        self.net_backoff.reset()
        for e in self.outbox:
            e[3] = 0
        self.outbox.insert(0, [self.prefix + "/status", "online", True, 0, None])
        self.inflight = 0
        try:
            self.pump(now)
        except OSError as e:
            self.lost(e)

    def lost(self, why):
        self.client.close()
        self.connected = False
        self.inflight = 0
        for e in self.outbox:
            e[3] = 0
        log("MQTT connection lost:", repr(why), "- again in", self.net_backoff.failed(utime.ticks_ms()), "ms")

    def pump(self, now):
        """Send what waits: the outbox, then the oldest readings (one message in flight)."""
        for e in self.outbox:
            if not e[3]:
                e[3] = self.client.publish(e[0], e[1], 1, e[2])
        if self.inflight:
            if utime.ticks_diff(now, self.tx_at) > ACK_TIMEOUT_MS:
                raise OSError(116)  # no PUBACK: reconnect and send again
            return
        if self.dropped:
            n, self.dropped = self.dropped, 0
            self.send(self.prefix + "/events", json.dumps(
                {"type": "buffer_overflow", "ts": self.clock.now_ms(), "data": {"dropped": n}}))
        if self.buf:
            n = min(len(self.buf), lms_proto.BATCH_MAX)
            self.tx_pid = self.client.publish(self.prefix + "/telemetry", lms_proto.batch(self.buf[:n]), 1)
            self.inflight = n
            self.tx_at = now
            if n > 1:
                log("sent a batch of", n, "buffered readings,", len(self.buf) - n, "left")

    # -- sampling ----------------------------------------------------------------------

    def sample(self):
        """Read the sensor, stamp and buffer the reading; (ts, values), or None."""
        ts = self.clock.stamp()
        try:
            values = self.sensor.read(ts)
        except Exception as e:
            log("sensor failed:", repr(e))
            return None
        line = lms_proto.stamped(ts, values)
        log("read", line)
        if len(self.buf) >= self.buf_max:
            self.buf.pop(0)
            if self.inflight:
                self.inflight -= 1  # it was sent; its PUBACK now covers one fewer
            else:
                self.dropped += 1
        self.buf.append(line)
        return ts, values

    # -- the loop ----------------------------------------------------------------------

    def wifi(self, now):
        if self.wlan.isconnected():
            self.wifi_backoff.reset()
            return True
        if self.connected:
            self.lost("Wi-Fi down")
        if self.wifi_backoff.ready(now):
            w = self.cfg.get("wifi") or {}
            log("Wi-Fi: connecting to", w.get("ssid"))
            self.wlan.active(True)
            try:
                self.wlan.connect(w.get("ssid"), w.get("password"))
            except OSError as e:
                log("Wi-Fi:", e)
            self.wifi_backoff.failed(now)
        return False

    def ntp(self, now):
        due = self.ntp_at is None or utime.ticks_diff(now, self.ntp_at) > NTP_RESYNC_MS
        if due and self.ntp_backoff.ready(now):
            try:
                ntptime.host = self.cfg.get("ntp_host", "pool.ntp.org")
                ntptime.settime()
                self.ntp_at = now
                self.ntp_backoff.reset()
                log("clock set by NTP:", self.clock.now_ms())
            except (OSError, OverflowError, IndexError) as e:
                log("NTP failed:", repr(e), "- again in", self.ntp_backoff.failed(now), "ms")
        return self.clock.valid()

    def step(self):
        now = utime.ticks_ms()
        self.wdt.feed()
        self.led.tick(now)
        if self.reboot_at is not None and (not self.outbox or utime.ticks_diff(now, self.reboot_at) >= 0):
            self.reboot()
        if not self.wifi(now) or not self.ntp(now):
            return
        if self.next_sample is None:
            self.next_sample = now
        if utime.ticks_diff(now, self.next_sample) >= 0:
            self.sample()
            gc.collect()
            self.next_sample = utime.ticks_add(self.next_sample, self.interval_ms)
            if utime.ticks_diff(now, self.next_sample) >= 0:  # fell behind: count from now
                self.next_sample = utime.ticks_add(now, self.interval_ms)
        if not self.connected and self.net_backoff.ready(now):
            self.connect(now)
        if self.connected:
            try:
                self.client.poll()
                self.pump(utime.ticks_ms())
            except (OSError, lms_mqtt.MQTTError, ValueError) as e:
                self.lost(e)

    def reboot(self):
        log("rebooting")
        if self.connected:
            try:
                self.client.publish(self.prefix + "/status", "offline", 1, True)
                self.client.disconnect()
            except OSError:
                pass
        machine.reset()

    def run(self):
        log("firmware", VERSION, "device", self.prefix, "interval", self.interval_ms, "ms")
        while True:
            try:
                self.step()
            except MemoryError:
                self.dropped += len(self.buf) // 2
                self.buf = self.buf[len(self.buf) // 2:]
                self.inflight = 0
                gc.collect()
                log("out of memory: dropped half of the buffer")
            except Exception as e:  # the loop outlives any bug; the watchdog covers hangs
                log("loop error:", repr(e))
                utime.sleep_ms(200)
            utime.sleep_ms(TICK_MS)


def main():
    cfg = load_json(CONFIG_FILE)
    if not isinstance(cfg, dict):
        log("no valid", CONFIG_FILE, "- write the one `lms device create ORG DEVICE --firmware-config` prints")
        return
    try:
        dev = Device(cfg)
    except (KeyError, TypeError, ValueError, Refused) as e:
        log("bad", CONFIG_FILE + ":", repr(e))
        return
    except OSError as e:  # a sensor that does not answer at boot: try again after a reset
        log("cannot start:", repr(e), "- resetting in 10 s")
        utime.sleep(10)
        machine.reset()
    dev.run()
