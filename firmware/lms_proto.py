# The device's side of the platform contract (README "Devices, topics, payloads",
# "Commands", "Desired and reported configuration"), without I/O or clock: the firmware
# and the fleet simulator (lms simulate) both call it, so they speak exactly the same.
import json

COMMANDS = ("ping", "reboot", "set_interval", "read_now", "led")
LED_STATES = ("on", "off", "blink")
MIN_INTERVAL_S = 0.1
MAX_INTERVAL_S = 86400
BATCH_MAX = 20  # entries per batch upload: well under the bridge's LMS_MAX_BATCH_ENTRIES
# What the desired config may hold, besides the platform's "version"; anything else is
# refused whole (reported with an error, the previous config kept).
CONFIG_KEYS = ("interval_s", "led")


class Refused(Exception):
    """A command or config the device will not apply; str() says why."""


# -- topics ------------------------------------------------------------------------------

def subscriptions(prefix):
    return [(prefix + "/commands/+", 1), (prefix + "/config", 1)]


def command_id(prefix, topic):
    """The id of a ``{prefix}/commands/{id}`` topic, else None."""
    head = prefix + "/commands/"
    if not topic.startswith(head):
        return None
    rest = topic[len(head):]
    if not rest or len(rest) > 19 or not rest.isdigit() or rest[0] == "0":
        return None
    return int(rest)


# -- telemetry ---------------------------------------------------------------------------

def stamped(ts, values):
    """One reading, DESIGN.md form 2: ``{"ts": epoch ms, "values": {...}}``."""
    return json.dumps({"ts": ts, "values": values})


def batch(items):
    """A batch (form 3) of already encoded stamped readings; one reading goes alone."""
    if len(items) == 1:
        return items[0]
    return "[" + ",".join(items) + "]"


# -- commands ----------------------------------------------------------------------------

def result(status, result=None, error=None):
    """A ``commands/{id}/result`` payload: status, and result or error, nothing else."""
    doc = {"status": status}
    if result is not None:
        doc["result"] = result
    if error is not None:
        doc["error"] = error[:1000]
    return json.dumps(doc)


def _number(v, lo, hi, what):
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not lo <= v <= hi:
        raise Refused("%s must be a number from %s to %s" % (what, lo, hi))
    return v


def check_interval(v, what="interval_s"):
    return _number(v, MIN_INTERVAL_S, MAX_INTERVAL_S, what)


def check_led(v, what="led"):
    if v not in LED_STATES:
        raise Refused("%s must be one of on, off, blink" % what)
    return v


def _only(params, allowed):
    for k in params:
        if k not in allowed:
            raise Refused("unknown parameter %r" % (k[:40] if isinstance(k, str) else k))


def parse_command(cid, payload, now_ms):
    """(name, params) of a command, its params checked; raises Refused with the reason.

    ``expires_at`` is compared with the device's NTP clock here because MQTT 3.1.1
    clients never see the MQTT 5 message expiry the platform sets."""
    if payload is None:
        raise Refused("command too large for this device")
    try:
        doc = json.loads(payload)
    except ValueError:
        raise Refused("command payload is not JSON") from None
    if not isinstance(doc, dict):
        raise Refused("command payload is not a JSON object")
    if doc.get("id") != cid:
        raise Refused("command id does not match its topic")
    exp = doc.get("expires_at")
    if exp is not None:
        if isinstance(exp, bool) or not isinstance(exp, int):
            raise Refused("expires_at must be epoch milliseconds")
        if exp <= now_ms:
            raise Refused("expired %d ms before the device received it" % (now_ms - exp))
    name = doc.get("name")
    params = doc.get("params")
    if params is None:
        params = {}
    if not isinstance(name, str):
        raise Refused("command name missing")
    if not isinstance(params, dict):
        raise Refused("params must be a JSON object")
    if name not in COMMANDS:
        raise Refused("unknown command %r; this firmware knows %s" % (name[:64], ", ".join(COMMANDS)))
    if name == "set_interval":
        _only(params, ("seconds",))
        if "seconds" not in params:
            raise Refused("set_interval needs params {\"seconds\": n}")
        params = {"seconds": check_interval(params["seconds"], "seconds")}
    elif name == "led":
        _only(params, ("state", "times"))
        state = check_led(params.get("state"), "state")
        times = params.get("times", 3)
        if isinstance(times, bool) or not isinstance(times, int) or not 1 <= times <= 100:
            raise Refused("times must be an integer from 1 to 100")
        params = {"state": state, "times": times}
    else:
        _only(params, ())
    return name, params


# -- desired and reported configuration ----------------------------------------------------

def parse_config(payload):
    """The desired config document, or None when it was cleared (empty payload).

    Raises Refused for a document that has no integer version (nothing can be reported
    for it: the report names the version it answers) and ValueError for one it can name
    but not apply: the caller reports those. ``None`` is a document too large for the
    device (the client dropped it): refused and ignored, never taken for a cleared one."""
    if payload is None:
        raise Refused("desired config too large for this device")
    if not payload:
        return None
    try:
        doc = json.loads(payload)
    except ValueError:
        raise Refused("desired config is not JSON") from None
    if not isinstance(doc, dict):
        raise Refused("desired config is not a JSON object")
    v = doc.get("version")
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
        raise Refused("desired config has no integer version")
    return doc


def effective(defaults, doc):
    """The settings a desired document gives: the defaults, then each of its keys checked.
    Raises Refused naming the first key that cannot be applied."""
    out = dict(defaults)
    for k in doc:
        if k == "version":
            continue
        if k not in CONFIG_KEYS:
            raise Refused("unknown setting %r; this firmware takes %s" % (str(k)[:40], ", ".join(CONFIG_KEYS)))
        if k == "interval_s":
            out[k] = check_interval(doc[k])
        elif k == "led":
            out[k] = check_led(doc[k])
    return out


def reported(version, settings, error=None, kept_version=None):
    """The ``config/reported`` payload: the version it answers and the settings now in
    force; with ``error``, the settings are the previous ones (of ``kept_version``)."""
    doc = dict(settings)
    doc["version"] = version
    if error is not None:
        doc["error"] = error[:500]
        doc["kept_version"] = kept_version
    return json.dumps(doc)
