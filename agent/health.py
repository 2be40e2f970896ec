"""The health endpoint: its config (`health`) and the server answering GET / on loopback."""
from __future__ import annotations

import json
import logging
import re
import selectors
import socket
import threading
import time
from dataclasses import dataclass

from agent import __version__
from agent.config import ConfigError
from agent.urls import is_loopback

log = logging.getLogger("hostagent.runtime")


@dataclass(frozen=True)
class HealthConfig:
    enabled: bool = True
    # loopback host:port answering GET / with 200 while the pipeline runs, 503 otherwise
    endpoint: str = "127.0.0.1:13134"

    def validate(self, key: str) -> None:
        self.address(f"{key}.endpoint")

    def address(self, key: str = "health.endpoint") -> tuple:
        """(host, port) of `endpoint`: a loopback address (127.0.0.0/8, [::1] or localhost) and a port."""
        m = re.fullmatch(r"(?:\[([^\]]*)\]|([^:\[\]]*)):([0-9]{1,5})", self.endpoint)
        if not m or int(m.group(3)) > 65535:
            raise ConfigError(key, f"expected host:port (IPv6 as [::1]:port), got {self.endpoint!r}")
        host = m.group(1) if m.group(1) is not None else m.group(2)
        if not is_loopback(host):
            raise ConfigError(key, f"must be a loopback address (127.0.0.1, [::1] or localhost), got {host!r}")
        return host, int(m.group(3))


class HealthServer:
    """GET / -> 200 {"status": "ok"} while `healthy()` holds, else 503.

    One thread serves every connection (a selector), so no client can make threads: at most
    MAX_CONNECTIONS are open (the oldest is closed for a new one, so a health check always gets
    in), each has TIMEOUT to send a request of at most MAX_REQUEST bytes. A client that resets,
    stalls or sends too much is counted, and only the first such error is logged."""

    MAX_CONNECTIONS = 32
    TIMEOUT = 5.0
    MAX_REQUEST = 8192

    def __init__(self, host: str, port: int, healthy, telemetry):
        self.healthy = healthy
        self.errors = telemetry.counter("hostagent.health.connection_errors", "{connections}",
                                        "Health endpoint connections closed without an answer, or answered "
                                        "503 because the check raised, by reason (reset, timeout, too_large, "
                                        "evicted, accept_failed, check_failed).")
        self._logged = False
        self.sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
        try:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self.sock.bind((host, port))
            self.sock.listen(64)
        except OSError:
            self.sock.close()
            raise
        self.sock.setblocking(False)
        bound = self.sock.getsockname()
        self.address = f"[{bound[0]}]:{bound[1]}" if ":" in bound[0] else f"{bound[0]}:{bound[1]}"
        self._wake_r, self._wake_w = socket.socketpair()
        self._thread = threading.Thread(target=self._serve, name="health", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        sel = selectors.DefaultSelector()
        sel.register(self.sock, selectors.EVENT_READ)
        sel.register(self._wake_r, selectors.EVENT_READ)
        conns: dict = {}  # socket -> [deadline, request bytes]; insertion order: oldest first
        try:
            while True:
                now = time.monotonic()
                wait = min((c[0] for c in conns.values()), default=now + 60) - now
                for key, _ in sel.select(max(wait, 0)):
                    if key.fileobj is self._wake_r:
                        return
                    if key.fileobj is self.sock:
                        self._accept(sel, conns)
                    elif key.fileobj in conns:  # not evicted by an accept of this same round
                        self._read(sel, conns, key.fileobj)
                now = time.monotonic()
                for conn in [c for c, (deadline, _) in conns.items() if deadline <= now]:
                    self._drop(sel, conns, conn, "timeout")
        finally:
            for conn in list(conns):
                self._drop(sel, conns, conn, None)
            sel.close()

    def _accept(self, sel, conns: dict) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:  # out of file descriptors: free one, or let the client wait in the backlog
                self._error("accept_failed", e)
                if conns:
                    self._drop(sel, conns, next(iter(conns)), "evicted")
                else:
                    time.sleep(0.1)  # rather than spin on a listening socket that stays readable
                return
            if len(conns) >= self.MAX_CONNECTIONS:
                self._drop(sel, conns, next(iter(conns)), "evicted")
            conn.setblocking(False)
            conns[conn] = [time.monotonic() + self.TIMEOUT, b""]
            sel.register(conn, selectors.EVENT_READ)

    def _read(self, sel, conns: dict, conn) -> None:
        try:
            data = conn.recv(self.MAX_REQUEST)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as e:
            self._drop(sel, conns, conn, "reset", e)
            return
        if not data:  # closed before asking: a port check
            self._drop(sel, conns, conn, None)
            return
        request = conns[conn][1] = conns[conn][1] + data
        if b"\n\r\n" not in request and b"\n\n" not in request:
            if len(request) > self.MAX_REQUEST:
                self._drop(sel, conns, conn, "too_large")
            return
        try:
            conn.send(self._answer((request.split(None, 1) or [b""])[0]))
        except OSError as e:
            self._drop(sel, conns, conn, "reset", e)
            return
        self._drop(sel, conns, conn, None)

    def _answer(self, method: bytes) -> bytes:
        if method not in (b"GET", b"HEAD"):
            status, body = "405 Method Not Allowed", b""
        else:
            try:
                ok = bool(self.healthy())
            except Exception as e:  # an answer all the same: unhealthy
                self._error("check_failed", e)
                ok = False
            status = "200 OK" if ok else "503 Service Unavailable"
            body = json.dumps({"status": "ok" if ok else "unhealthy", "version": __version__}).encode()
        head = (f"HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n"
                "Connection: close\r\n\r\n").encode()
        return head + (body if method == b"GET" else b"")

    def _drop(self, sel, conns: dict, conn, reason, error=None) -> None:
        """Close `conn`; a `reason` counts it as an error."""
        sel.unregister(conn)
        del conns[conn]
        conn.close()
        if reason:
            self._error(reason, error)

    def _error(self, reason: str, error=None) -> None:
        self.errors.add(1, (("reason", reason),))
        if not self._logged:
            self._logged = True
            log.warning("health_client_error reason=%s error=%r (further ones are only counted in "
                        "hostagent.health.connection_errors)", reason, str(error or reason))

    def close(self) -> None:
        self._wake_w.send(b"x")
        self._thread.join(5)
        for sock in (self.sock, self._wake_r, self._wake_w):
            sock.close()
