# A small MQTT 3.1.1 client for the main loop: it never blocks waiting for an
# acknowledgement. publish() returns the packet id at once; poll() reads what has arrived,
# hands each PUBLISH to the callback, then acknowledges it, and reports PUBACKs through
# on_ack. So the loop keeps sampling, blinking and feeding the watchdog while the network
# is slow, and the firmware decides what to resend (its telemetry buffer and outbox).
#
# Why not umqtt.simple: its publish() waits for the PUBACK with no timeout, and the
# releases on PyPI that take a user name, password and Last Will (1.2-1.3.4) cannot be
# installed by pip there; this file is the same bytes on the board and on CPython.
import lms_wire
import usocket as socket
import utime

# Incoming messages larger than this are read and dropped (the callback gets None as the
# payload, so the firmware can answer an error): 16 KiB is the platform's largest desired
# config (LMS_CONFIG_MAX_BYTES); a command's params are at most 8 KiB.
MAX_IN = 16384 + 512
# Any other packet a broker sends is tiny (CONNACK and PUBACK 2 bytes, SUBACK 2 + one per
# filter): a larger length is a broken or hostile broker, refused before reading it (it
# would otherwise be allocated whole: a MemoryError on a board without PSRAM).
MAX_OTHER = 64


class MQTTError(Exception):
    pass


class Client:
    def __init__(self, client_id, host, port=1883, user=None, password=None, keepalive=60,
                 tls=False, ca_file=None, timeout_ms=10000):
        self.client_id = client_id
        self.host = host
        self.port = port
        self.user = user
        self.password = password
        self.keepalive = keepalive
        self.tls = tls
        self.ca_file = ca_file
        self.timeout_ms = timeout_ms
        self.will = None
        self.sock = None
        self.pid = 0
        self.on_message = None  # (topic, payload or None when too large)
        self.on_ack = None  # (pid)
        self.suback = {}  # pid -> list of granted QoS (0x80 = refused)
        self._rx = 0
        self._tx = 0
        self._ping_at = 0

    def set_will(self, topic, msg, qos=1, retain=True):
        self.will = (topic, msg, qos, retain)

    def _next_pid(self):
        self.pid = self.pid % 65535 + 1
        return self.pid

    # -- connection -----------------------------------------------------------------

    def connect(self, clean=False):
        """Connect (blocking, at most timeout_ms per step); return session_present."""
        self.close()
        addr = socket.getaddrinfo(self.host, self.port, 0, socket.SOCK_STREAM)[0][-1]
        s = socket.socket()
        self.sock = s
        s.settimeout(self.timeout_ms / 1000)
        s.connect(addr)
        if self.tls:
            s = self._wrap_tls(s)
            self.sock = s
        s.setblocking(False)
        self._write(lms_wire.connect(self.client_id, self.user, self.password, self.keepalive, clean, self.will))
        first = self._read_exact(1, self.timeout_ms)
        if first[0] != lms_wire.CONNACK:
            raise MQTTError("expected CONNACK")
        present, code = lms_wire.parse_connack(self._read_exact(self._read_len(MAX_OTHER), self.timeout_ms))
        if code:
            self.close()
            raise MQTTError("refused: " + lms_wire.CONNACK_REASONS.get(code, str(code)))
        self._rx = self._tx = utime.ticks_ms()
        self._ping_at = 0
        return present

    def _wrap_tls(self, s):
        import ssl  # only when TLS is on: it costs heap

        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        if self.ca_file:
            ctx.load_verify_locations(cafile=self.ca_file)
            ctx.verify_mode = ssl.CERT_REQUIRED
        else:
            print("lms: TLS without ca_file: the broker's certificate is not checked")
            ctx.verify_mode = ssl.CERT_NONE
        return ctx.wrap_socket(s, server_hostname=self.host)

    def close(self):
        if self.sock is not None:
            try:
                self.sock.close()
            except OSError:
                pass
            self.sock = None

    def disconnect(self):
        """A clean DISCONNECT: the broker drops the Last Will."""
        if self.sock is not None:
            try:
                self._write(lms_wire.DISCONNECT)
            except OSError:
                pass
        self.close()

    # -- sending ----------------------------------------------------------------------

    def _write(self, data):
        mv = memoryview(data)
        off = 0
        deadline = utime.ticks_add(utime.ticks_ms(), self.timeout_ms)
        while off < len(mv):
            n = self.sock.write(mv[off:])
            if n:
                off += n
            elif utime.ticks_diff(deadline, utime.ticks_ms()) < 0:
                raise OSError(116)  # ETIMEDOUT: the broker takes nothing
            else:
                utime.sleep_ms(2)
        self._tx = utime.ticks_ms()

    def publish(self, topic, msg, qos=0, retain=False):
        """Send a PUBLISH; return its packet id (0 at QoS 0). Raises OSError when the
        connection is gone; the caller keeps what it has to resend."""
        if self.sock is None:
            raise OSError(128)  # ENOTCONN
        if isinstance(msg, str):
            msg = msg.encode()
        pid = self._next_pid() if qos else 0
        self._write(lms_wire.publish_header(topic, len(msg), qos, retain, pid))
        self._write(msg)
        return pid

    def subscribe(self, topics):
        """SUBSCRIBE to a list of (filter, qos); the SUBACK shows up in ``suback``."""
        pid = self._next_pid()
        self._write(lms_wire.subscribe(pid, topics))
        return pid

    # -- receiving --------------------------------------------------------------------

    def _read_exact(self, n, timeout_ms):
        buf = bytearray(n)
        mv = memoryview(buf)
        got = 0
        deadline = utime.ticks_add(utime.ticks_ms(), timeout_ms)
        while got < n:
            chunk = self.sock.read(n - got)
            if chunk is None:
                if utime.ticks_diff(deadline, utime.ticks_ms()) < 0:
                    raise OSError(116)
                utime.sleep_ms(1)
                continue
            if not chunk:
                raise OSError(104)  # ECONNRESET: the broker closed the connection
            mv[got:got + len(chunk)] = chunk
            got += len(chunk)
        return buf

    def _read_len(self, limit=None):
        """The remaining length; more than ``limit`` (when given) is refused."""
        n = self._read_varlen()
        if limit is not None and n > limit:
            raise MQTTError("packet of %d bytes where at most %d fit" % (n, limit))
        return n

    def _read_varlen(self):
        n = 0
        shift = 0
        while True:
            b = self._read_exact(1, self.timeout_ms)[0]
            n |= (b & 0x7F) << shift
            if not b & 0x80:
                return n
            shift += 7
            if shift > 21:
                raise MQTTError("bad remaining length")

    def _discard(self, n):
        while n > 0:
            k = min(n, 512)
            self._read_exact(k, self.timeout_ms)
            n -= k

    def poll(self, max_packets=10):
        """Handle what has arrived (at most ``max_packets``) and keep the connection alive.
        Raises OSError when the connection is lost."""
        if self.sock is None:
            raise OSError(128)
        for _ in range(max_packets):
            first = self.sock.read(1)
            if first is None:
                break
            if not first:
                raise OSError(104)
            self._rx = utime.ticks_ms()
            self._packet(first[0])
        now = utime.ticks_ms()
        ka = self.keepalive * 1000
        if ka:
            if self._ping_at and utime.ticks_diff(now, self._ping_at) > ka // 2 and \
                    utime.ticks_diff(self._rx, self._ping_at) < 0:
                raise OSError(116)  # no PINGRESP: the connection is dead
            if utime.ticks_diff(now, self._tx) > ka // 2 and not self._ping_at:
                self._write(lms_wire.PINGREQ)
                self._ping_at = now

    def _packet(self, first):
        kind = first & 0xF0
        size = self._read_len(None if kind == lms_wire.PUBLISH else MAX_OTHER)
        if kind == lms_wire.PUBLISH:
            self._publish(first, size)
        elif kind == lms_wire.PUBACK:
            pid = lms_wire.pid_of(self._read_exact(size, self.timeout_ms))
            if self.on_ack is not None:
                self.on_ack(pid)
        elif kind == lms_wire.SUBACK:
            body = self._read_exact(size, self.timeout_ms)
            self.suback[lms_wire.pid_of(body)] = list(body[2:])
        elif kind == lms_wire.PINGRESP:
            self._discard(size)
            self._ping_at = 0
        else:
            self._discard(size)

    def _publish(self, first, size):
        if size <= MAX_IN:
            topic, msg, qos, pid = lms_wire.parse_publish(first, self._read_exact(size, self.timeout_ms))
        else:
            # Too large for this device: read the topic and packet id, drop the rest.
            head = self._read_exact(2, self.timeout_ms)
            n = (head[0] << 8) | head[1]
            if n + 2 > size:
                raise MQTTError("bad topic length")
            topic = bytes(self._read_exact(n, self.timeout_ms)).decode()
            qos = (first >> 1) & 3
            used = 2 + n
            pid = 0
            if qos:
                pid = lms_wire.pid_of(self._read_exact(2, self.timeout_ms))
                used += 2
            self._discard(size - used)
            msg = None
        try:
            if self.on_message is not None:
                self.on_message(topic, msg)
        except Exception as e:  # a handler bug must not make the broker redeliver forever
            print("lms: message handler failed:", repr(e))
        if qos == 1:
            self._write(lms_wire.puback(pid))
