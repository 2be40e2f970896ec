"""Start order, the collection schedule, signals, health and shutdown.

Start: logging -> resource -> the eBPF probes start loading in the background -> exporter ->
pipeline -> host scrapers -> scheduler; the probes join the schedule once loaded and the pipeline
runs, so host metrics never wait for bcc's clang, and CO-RE probes attach while the rest starts.
SIGTERM/SIGINT: sources stop, one last flush, delivery for at most shutdown_timeout, exit 0.
SIGHUP: the config file is read again; a bad one is logged and the running config stays; a good
one replaces sources and pipeline, and undelivered payloads move to the new pipeline.
"""
from __future__ import annotations

import ctypes
import logging
import os
import signal
import socket
import threading
import time
from typing import Optional

from agent import __version__
from agent.components import SOURCES, Config, build_scrapers
from agent.config import ConfigError, load
from agent.export.factory import build_exporter
from agent.health import HealthServer
from agent.logs import setup_logging
from agent.model import Batch
from agent.pipeline import build_pipeline
from agent.resource import detect
from agent.selfmetrics import SelfMetrics
from agent.sources import Source
from agent.sources.ebpf.early import Early, config_digest

log = logging.getLogger("hostagent.runtime")




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


class Agent:
    def __init__(self, cfg: Config, telemetry: Optional[SelfMetrics] = None):
        """`telemetry`: the agent's own metrics, handed to every component and kept across reloads
        (default: a new registry)."""
        self.cfg = cfg
        self.telemetry = telemetry if telemetry is not None else SelfMetrics()
        self.stopping = threading.Event()
        self.sources: list[Source] = []
        self._sources_lock = threading.Lock()
        self._started: Optional[_Started] = None      # the current start's; sources of an earlier one never join
        self.collect_errors = self.telemetry.counter("hostagent.source.errors", "{errors}",
                                                     "Collections of a source that raised, by source.")
        self.reloads = self.telemetry.counter("hostagent.config.reloads", "{reloads}",
                                              "Reloads on SIGHUP, by result (applied, rejected).")

    def start(self, backlog=(), early: Optional[Early] = None) -> None:
        """`early`: probes attached before the agent was imported, for this config (early.py); the
        eBPF source takes those it would load, the rest are closed."""
        cfg, telemetry = self.cfg, self.telemetry
        self.stopping.clear()
        self.resource = telemetry.resource = detect(cfg.resource)
        # sources load first, in the background (bcc compiles for seconds; CO-RE probes attach
        # the sooner, the sooner they start), and join once the pipeline runs
        pipeline = self._started = _Started()
        loading = [name for name in SOURCES if getattr(cfg, name).enabled]
        for name in loading:
            threading.Thread(target=self._start_source, args=(name, SOURCES[name], pipeline, early),
                             name=f"{name}-loader", daemon=True).start()
        if early is not None and not loading:
            early.close()
        try:
            self.pipeline = build_pipeline(cfg, build_exporter(cfg.exporter, telemetry), telemetry, backlog)
            self.pipeline.start()
            self.sources = [*build_scrapers(cfg.scrapers, telemetry, self.resource, cfg.enrichment), telemetry]
        except BaseException:
            pipeline.set(False)         # the sources loading for it close again
            raise
        pipeline.set(True)
        self._scheduler = threading.Thread(target=self._schedule, name="scheduler", daemon=True)
        self._scheduler.start()
        log.info("started version=%s interval=%s exporter=%r", __version__, cfg.collection_interval,
                 describe_destination(cfg))

    def _start_source(self, name: str, factory, pipeline: "_Started", early: Optional[Early]) -> None:
        try:
            source = factory.create(getattr(self.cfg, name), self.telemetry, resource=self.resource,
                                    enrichment=self.cfg.enrichment, state_dir=self.cfg.state_dir, early=early)
        except Exception:
            log.exception("%s_unavailable", name)
            return
        finally:
            if early is not None:       # what the source did not take
                early.close()
        if not pipeline.wait():
            source.close()
            return
        try:
            with self._sources_lock:
                if self.stopping.is_set() or pipeline is not self._started:    # stopped, or reloaded since
                    source.close()
                    return
                source.start(self.pipeline.emit)
                self.sources.insert(len(self.sources) - 1, source)
        except Exception:
            log.exception("%s_unavailable", name)
            source.close()

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

    def reload(self, cfg: Config, early: Optional[Early] = None) -> bool:
        """Restart sources and pipeline on `cfg`, carrying over everything not yet delivered.
        If `cfg` cannot start (an exporter or queue it describes fails to open, or anything else),
        the running config starts again instead and False is returned."""
        old = self.cfg
        self._stop_sources()
        backlog = self.pipeline.handover()
        try:
            self._restart(cfg, backlog, early)
        except Exception as e:
            self.reload_rejected(e)
            self._restart(old, backlog)
            return False
        self.reloads.add(1, (("result", "applied"),))
        log.info("reloaded carried_over_payloads=%d", len(backlog))
        return True

    def _restart(self, cfg: Config, backlog, early: Optional[Early] = None) -> None:
        self.cfg = cfg
        setup_logging(cfg.logging.level)
        self.start(backlog, early)


class _Started:
    """Whether one start's pipeline came up: its sources wait for the answer."""

    def __init__(self):
        self._event, self.ok = threading.Event(), False

    def set(self, ok: bool) -> None:
        self.ok = ok
        self._event.set()

    def wait(self) -> bool:
        self._event.wait()
        return self.ok


M_ARENA_MAX = -8


def limit_malloc_arenas(arenas: int = 2) -> None:
    """glibc gives threads that allocate at once malloc arenas of their own (up to 8 per core), and
    each keeps what its thread freed: ~12 MB of an idle agent's RSS. Its threads mostly wait, so
    two arenas cost no contention. Must run before the threads start."""
    try:
        ctypes.CDLL(None).mallopt(M_ARENA_MAX, arenas)
    except (OSError, AttributeError):   # not glibc
        pass


def run(config_path: Optional[str], cfg: Config, early: Optional[Early] = None) -> int:
    """The daemon: run until SIGTERM or SIGINT, reload on SIGHUP, exit 0 after a drain. `early`:
    the probes attached before the agent was imported (agent/main.py); each start keeps the
    recipes of its CO-RE probes for the next `hostagent run` of its config (early.py)."""
    limit_malloc_arenas()
    signals: list = []
    wake = threading.Event()

    def on_signal(signum, frame):
        signals.append(signum)
        wake.set()

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, on_signal)
    agent = Agent(cfg)
    agent.start(early=early if early is not None else Early(config_digest(config_path, os.environ)))
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
                    new_cfg = load(config_path, None, Config)
                except Exception as e:  # whatever a new file holds, the running config stays
                    agent.reload_rejected(e)
                else:
                    if agent.reload(new_cfg, Early(config_digest(config_path, os.environ))):
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
        server = HealthServer(*cfg.health.address(), agent.healthy, agent.telemetry)
    except OSError as e:
        log.error("health_endpoint_failed endpoint=%s error=%r", cfg.health.endpoint, e.strerror)
        return None
    log.info("health_endpoint address=%s", server.address)
    return server
