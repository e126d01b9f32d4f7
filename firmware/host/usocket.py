"""MicroPython's ``socket`` on CPython: the same calls, plus the stream methods ``read`` and
``write`` MicroPython's sockets have (a non-blocking ``read`` with nothing to read returns
None, not an exception)."""

import socket as _s
from typing import Any

AF_INET = _s.AF_INET
SOCK_STREAM = _s.SOCK_STREAM
SOL_SOCKET = _s.SOL_SOCKET
SO_REUSEADDR = _s.SO_REUSEADDR
IPPROTO_TCP = _s.IPPROTO_TCP


def getaddrinfo(host: str, port: int, af: int = 0, type: int = 0, proto: int = 0, flags: int = 0) -> list[Any]:
    return _s.getaddrinfo(host, port, af or _s.AF_INET, type, proto, flags)


class socket:  # MicroPython's name
    def __init__(self, af: int = AF_INET, type: int = SOCK_STREAM, proto: int = 0) -> None:
        self._s = _s.socket(af, type, proto)

    def connect(self, addr: Any) -> None:
        self._s.connect(addr)

    def settimeout(self, t: float | None) -> None:
        self._s.settimeout(t)

    def setblocking(self, flag: bool) -> None:
        self._s.setblocking(flag)

    def setsockopt(self, level: int, opt: int, value: Any) -> None:
        self._s.setsockopt(level, opt, value)

    def read(self, n: int = 4096) -> bytes | None:
        try:
            return self._s.recv(n)
        except (BlockingIOError, InterruptedError):
            return None
        except TimeoutError:
            return None

    def write(self, data: bytes | memoryview) -> int | None:
        try:
            return self._s.send(data)
        except (BlockingIOError, InterruptedError):
            return None

    recv = read

    def send(self, data: bytes) -> int | None:
        return self.write(data)

    def sendall(self, data: bytes) -> None:
        self._s.sendall(data)

    def close(self) -> None:
        self._s.close()
