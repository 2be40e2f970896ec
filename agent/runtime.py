"""Start order, the collection schedule, signals, health and shutdown.

Start: logging -> resource -> exporter -> pipeline -> host sources -> scheduler; the eBPF probes
compile in the background and join the schedule when loaded, so host metrics never wait for clang.
SIGTERM/SIGINT: sources stop, one last flush, delivery for at most shutdown_timeout, exit 0.
SIGHUP: the config file is read again; a bad one is logged and the running config stays; a good
one replaces sources and pipeline, and undelivered payloads move to the new pipeline.
"""
from __future__ import annotations

import ctypes
import json
import logging
import os
import selectors
import signal
import socket
import sys
import threading
import time
from typing import Optional

from agent import __version__
from agent.config import Config, ConfigError, load
from agent.export.factory import build_exporter
from agent.model import Batch
from agent.pipeline import build_pipeline
from agent.selfmetrics import SELF
from agent.sources import Source

log = logging.getLogger("hostagent.runtime")


# syslog priorities, which journald reads from a "<N>" prefix on each line of a service's stderr
JOURNAL_PRIORITY = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3, logging.CRITICAL: 2}


class KeyValueFormatter(logging.Formatter):
    """One line per event: ts=... level=... logger=... <message>, messages being `event k=v ...`.
    With `journal`, each line starts with its syslog priority, so `journalctl -p warning` works."""

    def __init__(self, journal: bool = False):
        super().__init__()
        self.journal = journal

    def format(self, record: logging.LogRecord) -> str:
        ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z"
        line = f"ts={ts} level={record.levelname.lower()} logger={record.name} {record.getMessage()}"
        if record.exc_info:
            line += " exception=" + repr(self.formatException(record.exc_info))
        if self.journal:
            line = f"<{JOURNAL_PRIORITY.get(record.levelno, 6)}>{line}"
        return line


def stderr_is_journal() -> bool:
    """Is stderr the journal's stream? systemd says so in JOURNAL_STREAM ("device:inode")."""
    try:
        st = os.fstat(sys.stderr.fileno())
    except (OSError, ValueError, AttributeError):
        return False
    return os.environ.get("JOURNAL_STREAM") == f"{st.st_dev}:{st.st_ino}"


def setup_logging(level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(KeyValueFormatter(journal=stderr_is_journal()))
    root = logging.getLogger("hostagent")
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    root.propagate = False


def describe_destination(cfg: Config) -> str:
    if cfg.exporter.type == "file":
        return f"file metrics={cfg.exporter.file.path} logs={cfg.exporter.file.logs_path}"
    otlp = cfg.exporter.otlp
    return f"otlp protocol={otlp.protocol} metrics={otlp.signal_url('metrics')} logs={otlp.signal_url('logs')}"


def sd_notify(state: str) -> None:
    """Tell systemd about our state when it gave us a notify socket (Type=notify)."""
    path = os.environ.get("NOTIFY_SOCKET")
    if not path:
        return
    addr = "\0" + path[1:] if path.startswith("@") else path
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            s.sendto(state.encode(), addr)
    except OSError as e:
        log.warning("sd_notify_failed state=%s error=%r", state, str(e))


class HealthServer:
    """GET / -> 200 {"status": "ok"} while `healthy()` holds, else 503.

    One thread serves every connection (a selector), so no client can make threads: at most
    MAX_CONNECTIONS are open (the oldest is closed for a new one, so a health check always gets
    in), each has TIMEOUT to send a request of at most MAX_REQUEST bytes. A client that resets,
    stalls or sends too much is counted, and only the first such error is logged."""

    MAX_CONNECTIONS = 32
    TIMEOUT = 5.0
    MAX_REQUEST = 8192

    def __init__(self, host: str, port: int, healthy):
        self.healthy = healthy
        self.errors = SELF.counter("hostagent.health.connection_errors", "{connections}",
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


class Agent:
    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.stopping = threading.Event()
        self.sources: list[Source] = []
        self._sources_lock = threading.Lock()
        self.collect_errors = SELF.counter("hostagent.source.errors", "{errors}",
                                           "Collections of a source that raised, by source.")
        self.reloads = SELF.counter("hostagent.config.reloads", "{reloads}",
                                    "Reloads on SIGHUP, by result (applied, rejected).")

    def start(self, backlog=()) -> None:
        from agent.resource import detect
        from agent.sources.host import build_host_sources

        cfg = self.cfg
        self.stopping.clear()
        self.resource = detect(cfg.resource)
        SELF.resource = self.resource
        self.pipeline = build_pipeline(cfg, build_exporter(cfg.exporter, SELF), SELF, backlog)
        self.pipeline.start()
        self.sources = [*build_host_sources(cfg.scrapers, self.resource, cfg.enrichment), SELF]
        self._scheduler = threading.Thread(target=self._schedule, name="scheduler", daemon=True)
        self._scheduler.start()
        if cfg.ebpf.enabled:
            threading.Thread(target=self._start_ebpf, name="ebpf-loader", daemon=True).start()
        log.info("started version=%s interval=%s exporter=%r", __version__, cfg.collection_interval,
                 describe_destination(cfg))

    def _start_ebpf(self) -> None:
        try:
            from agent.sources.ebpf import EbpfSource
            source = EbpfSource(self.cfg.ebpf, self.resource, enrichment=self.cfg.enrichment)
            source.start(self.pipeline.emit)
        except Exception:
            log.exception("ebpf_unavailable")
            return
        with self._sources_lock:
            if self.stopping.is_set():
                source.close()
                return
            self.sources.insert(len(self.sources) - 1, source)

    def collect_once(self) -> None:
        with self._sources_lock:
            sources = list(self.sources)
        for source in sources:
            try:
                groups = source.collect()
            except Exception:
                log.exception("collect_failed source=%s", source.name)
                self.collect_errors.add(1, (("source", source.name),))
                continue
            if groups:
                self.pipeline.emit(Batch(metrics=groups))

    def _schedule(self) -> None:
        interval = float(self.cfg.collection_interval)
        next_at = time.monotonic()
        while not self.stopping.is_set():
            self.collect_once()
            next_at += interval
            now = time.monotonic()
            if next_at < now:  # a collection overran: skip the missed ticks rather than burst
                next_at = now + interval
            self.stopping.wait(next_at - now)

    def healthy(self) -> bool:
        return self._scheduler.is_alive() and self.pipeline.healthy()

    def _stop_sources(self) -> None:
        self.stopping.set()
        self._scheduler.join()
        with self._sources_lock:
            sources, self.sources = list(self.sources), []
        for source in sources:
            try:
                source.close()
            except Exception:
                log.exception("close_failed source=%s", source.name)

    def stop(self) -> bool:
        """Stop collecting and deliver what was collected; True if nothing was left behind."""
        self._stop_sources()
        clean = self.pipeline.shutdown(float(self.cfg.shutdown_timeout))
        log.info("stopped clean=%s", clean)
        return clean

    def reload_rejected(self, error: BaseException) -> None:
        """Count and log (one line) a new config that could not be read, validated or started."""
        self.reloads.add(1, (("result", "rejected"),))
        message = str(error) if isinstance(error, ConfigError) else f"{type(error).__name__}: {error}"
        log.error("reload_rejected error=%r keeping=running_config", message)

    def reload(self, cfg: Config) -> bool:
        """Restart sources and pipeline on `cfg`, carrying over everything not yet delivered.
        If `cfg` cannot start (an exporter or queue it describes fails to open, or anything else),
        the running config starts again instead and False is returned."""
        old = self.cfg
        self._stop_sources()
        backlog = self.pipeline.handover()
        try:
            self._restart(cfg, backlog)
        except Exception as e:
            self.reload_rejected(e)
            self._restart(old, backlog)
            return False
        self.reloads.add(1, (("result", "applied"),))
        log.info("reloaded carried_over_payloads=%d", len(backlog))
        return True

    def _restart(self, cfg: Config, backlog) -> None:
        self.cfg = cfg
        setup_logging(cfg.logging.level)
        self.start(backlog)


M_ARENA_MAX = -8


def limit_malloc_arenas(arenas: int = 2) -> None:
    """glibc gives threads that allocate at once malloc arenas of their own (up to 8 per core), and
    each keeps what its thread freed: ~12 MB of an idle agent's RSS. Its threads mostly wait, so
    two arenas cost no contention. Must run before the threads start."""
    try:
        ctypes.CDLL(None).mallopt(M_ARENA_MAX, arenas)
    except (OSError, AttributeError):   # not glibc
        pass


def run(config_path: Optional[str], cfg: Config) -> int:
    """The daemon: run until SIGTERM or SIGINT, reload on SIGHUP, exit 0 after a drain."""
    limit_malloc_arenas()
    signals: list = []
    wake = threading.Event()

    def on_signal(signum, frame):
        signals.append(signum)
        wake.set()

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, on_signal)
    agent = Agent(cfg)
    agent.start()
    health = _start_health(cfg, agent)
    sd_notify("READY=1")
    watchdog = int(os.environ.get("WATCHDOG_USEC", "0")) / 2e6 or None
    while True:
        wake.wait(min(watchdog or 1.0, 1.0))
        wake.clear()
        while signals:
            signum = signals.pop(0)
            if signum == signal.SIGHUP:
                sd_notify("RELOADING=1")
                try:
                    new_cfg = load(config_path)
                except Exception as e:  # whatever a new file holds, the running config stays
                    agent.reload_rejected(e)
                else:
                    if agent.reload(new_cfg):
                        if health is None or new_cfg.health != cfg.health:
                            if health:
                                health.close()
                            health = _start_health(new_cfg, agent)
                        cfg = new_cfg
                sd_notify("READY=1")
                continue
            log.info("signal_received signal=%s draining_for=%s", signal.Signals(signum).name, cfg.shutdown_timeout)
            sd_notify("STOPPING=1")
            agent.stop()
            if health:
                health.close()
            return 0
        if agent.healthy():
            if watchdog:
                sd_notify("WATCHDOG=1")
        else:
            log.error("pipeline_failed")
            agent.stop()
            return 1


def _start_health(cfg: Config, agent: Agent) -> Optional[HealthServer]:
    if not cfg.health.enabled:
        return None
    try:
        server = HealthServer(*cfg.health.address(), agent.healthy)
    except OSError as e:
        log.error("health_endpoint_failed endpoint=%s error=%r", cfg.health.endpoint, e.strerror)
        return None
    log.info("health_endpoint address=%s", server.address)
    return server
