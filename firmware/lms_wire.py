# MQTT 3.1.1 packets, encoded and decoded without I/O: what lms_mqtt.py sends on the board
# and what the asyncio simulator (lms simulate) sends for thousands of devices.
# MicroPython 1.2x: no typing, no dataclasses, bytes built once per packet.

CONNECT = 0x10
CONNACK = 0x20
PUBLISH = 0x30
PUBACK = 0x40
SUBSCRIBE = 0x82
SUBACK = 0x90
PINGREQ = b"\xc0\x00"
PINGRESP = 0xD0
DISCONNECT = b"\xe0\x00"

# CONNACK return codes (3.1.1, section 3.2.2.3)
CONNACK_REASONS = {
    1: "unacceptable protocol version",
    2: "client id rejected",
    3: "server unavailable",
    4: "bad user name or password",
    5: "not authorized",
}


def varlen(n):
    """The remaining-length field: 7 bits a byte, high bit = more."""
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def field(s):
    """A length-prefixed UTF-8 string or binary field."""
    if isinstance(s, str):
        s = s.encode()
    return bytes((len(s) >> 8, len(s) & 0xFF)) + s


def packet(first, body):
    return bytes((first,)) + varlen(len(body)) + body


def connect(client_id, user=None, password=None, keepalive=60, clean=False, will=None):
    """CONNECT. ``will`` is (topic, message, qos, retain) or None."""
    flags = 0x02 if clean else 0
    payload = field(client_id)
    if will is not None:
        topic, msg, qos, retain = will
        flags |= 0x04 | (qos << 3) | (0x20 if retain else 0)
        payload += field(topic) + field(msg)
    if user is not None:
        flags |= 0x80
        payload += field(user)
    if password is not None:
        flags |= 0x40
        payload += field(password)
    body = b"\x00\x04MQTT\x04" + bytes((flags, keepalive >> 8, keepalive & 0xFF)) + payload
    return packet(CONNECT, body)


def parse_connack(body):
    """(session_present, return_code) of a CONNACK's two bytes."""
    if len(body) != 2:
        raise ValueError("bad CONNACK")
    return body[0] & 1 == 1, body[1]


def publish_header(topic, size, qos=0, retain=False, pid=0, dup=False):
    """Everything of a PUBLISH before its payload of ``size`` bytes: the payload is written
    after it as it is, never copied into a bigger buffer."""
    t = field(topic)
    first = PUBLISH | (0x08 if dup else 0) | (qos << 1) | (1 if retain else 0)
    rest = len(t) + size + (2 if qos else 0)
    head = bytes((first,)) + varlen(rest) + t
    if qos:
        head += bytes((pid >> 8, pid & 0xFF))
    return head


def publish(topic, msg, qos=0, retain=False, pid=0):
    if isinstance(msg, str):
        msg = msg.encode()
    return publish_header(topic, len(msg), qos, retain, pid) + msg


def subscribe(pid, topics):
    """SUBSCRIBE for a list of (filter, qos)."""
    body = bytes((pid >> 8, pid & 0xFF))
    for t, q in topics:
        body += field(t) + bytes((q,))
    return packet(SUBSCRIBE, body)


def puback(pid):
    return bytes((PUBACK, 2, pid >> 8, pid & 0xFF))


def parse_publish(first, body):
    """(topic, payload, qos, pid) of a PUBLISH's variable part and payload."""
    if len(body) < 2:
        raise ValueError("short PUBLISH")
    n = (body[0] << 8) | body[1]
    if 2 + n > len(body):
        raise ValueError("bad topic length")
    topic = bytes(body[2:2 + n]).decode()
    qos = (first >> 1) & 3
    pos = 2 + n
    pid = 0
    if qos:
        if pos + 2 > len(body):
            raise ValueError("short PUBLISH")
        pid = (body[pos] << 8) | body[pos + 1]
        pos += 2
    return topic, bytes(body[pos:]), qos, pid


def pid_of(body):
    """The packet id of a PUBACK or SUBACK."""
    if len(body) < 2:
        raise ValueError("short acknowledgement")
    return (body[0] << 8) | body[1]
