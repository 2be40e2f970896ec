"""eBPF probes as a Source.

    check(cfg) -> list[ProbeStatus]        what would load here, and why not (loads nothing)
    format_table(statuses) -> str          the `hostagent probes` table
    EbpfSource(cfg, telemetry, resource)   loads the probes; collect() for their metrics,
                                           start(emit) for their log records, close()

While the source is open, BPF run-time statistics are on (maps.enable_stats), so every probe's
programs report the time they run and how often: hostagent.ebpf.run_time and .runs.
"""
from __future__ import annotations

import logging
import os
import threading
from typing import Optional

from agent.model import Batch, LogGroup, Metric, MetricGroup, MetricKind, NumberPoint, Resource, Scope, now_ns
from agent.procfs.identity import EnrichmentConfig
from agent.procfs.workload import WorkloadResolver
from agent.sources import Emit, Source
from agent.sources.ebpf import corebtf, loader
from agent.sources.ebpf.early import Early
from agent.sources.ebpf.loader import ProbeStatus, format_table, load, program_stats, unload
from agent.sources.ebpf.maps import enable_stats
from agent.sources.ebpf.probe import OBJECT_DIR
from agent.sources.ebpf.registry import PROBES
from agent.sources.ebpf.ringbuf import Poller, PollSchedule, read_drops

__all__ = ["EbpfSource", "ProbeStatus", "check", "format_table", "SCOPE"]

log = logging.getLogger("hostagent.ebpf")

SCOPE = Scope("hostagent/ebpf")
DROPPED = "hostagent.ebpf.ringbuf.dropped"
READ = "hostagent.ebpf.ringbuf.records"
RING_SKIPPED = "hostagent.ebpf.ringbuf.skipped_records"
SKIPPED = "hostagent.ebpf.skipped_events"
STATS_SYSCTL = "/proc/sys/kernel/bpf_stats_enabled"
RUN_TIME = "hostagent.ebpf.run_time"
RUNS = "hostagent.ebpf.runs"
MAP_OVERFLOW = "hostagent.ebpf.map.overflow"

POLL_INTERVAL = 0.2       # longest wait between passes over the rings (ringbuf.PollSchedule)


def check(cfg, probes=None) -> list[ProbeStatus]:
    """Which probes would load on this host, and why the others would not; `probes` overrides the
    registry ({name: Probe class or instance}). Loads nothing."""
    return loader.check(cfg, PROBES if probes is None else probes)


class EbpfSource(Source):
    """The loaded probes. Loading happens here, in the constructor; `statuses` tells what is on
    and why the rest is off. One reader thread (start()) drains every ring buffer."""
    name = "ebpf"

    def __init__(self, cfg, telemetry, resource: Resource, probes=None, poll_interval: float = POLL_INTERVAL,
                 enrichment: EnrichmentConfig = EnrichmentConfig(), state_dir: Optional[str] = None,
                 early: Optional[Early] = None):
        """`telemetry`: the agent's own metrics; `probes` overrides the registry ({name: Probe class
        or instance}); `enrichment` says whether and how the process probe records command lines;
        `state_dir`: where what the probes need of this kernel's BTF is kept across starts
        (corebtf.py; none: parsed at every start); `early`: the probes `hostagent run` attached
        before the agent was imported, for the config they were attached for (early.py).
        With `ebpf.attribution: workload` one WorkloadResolver serves every probe."""
        self.workloads = WorkloadResolver(telemetry) if cfg.enabled and cfg.attribution == "workload" else None
        if probes is None:
            probes = {name: cls.create(cfg.probes.get(name), telemetry, enrichment, workloads=self.workloads)
                      for name, cls in PROBES.items()}
        self.resource = resource
        self.poll_interval = poll_interval
        self.start_ns = now_ns()
        self._stats_fd = self._enable_stats()
        self._loaded, self.statuses = load(cfg, probes, cache=self._btf_cache(cfg, state_dir), early=early)
        if not self._loaded and self._stats_fd is not None:     # nothing to time
            os.close(self._stats_fd)
            self._stats_fd = None
        self._thread: Optional[threading.Thread] = None
        self._poller = None
        self._closed = False
        self._lock = threading.Lock()       # start/close against each other, not the hot path

    @staticmethod
    def _btf_cache(cfg, state_dir: Optional[str]) -> Optional[corebtf.Cache]:
        if state_dir is None or not cfg.enabled or cfg.loader == loader.BCC:
            return None
        try:
            return corebtf.Cache(state_dir, cfg.object_dir or OBJECT_DIR)
        except OSError:         # no kernel BTF: bcc's fallback, which has no use for it
            return None

    @staticmethod
    def _enable_stats() -> Optional[int]:
        try:
            return enable_stats()
        except OSError as e:    # before Linux 5.8, or without CAP_SYS_ADMIN (the packaged unit)
            log.info("ebpf_stats_unavailable error=\"%s\" (hostagent.ebpf.run_time and .runs are exported "
                     "only while sysctl kernel.bpf_stats_enabled=1)", e.strerror or e)
            return None

    def _stats_on(self) -> bool:
        """Whether the kernel is timing BPF programs: our BPF_ENABLE_STATS fd, or the sysctl."""
        if self._stats_fd is not None:
            return True
        try:
            with open(STATS_SYSCTL) as f:
                return f.read().strip() == "1"
        except OSError:
            return False

    @property
    def probes(self) -> dict:
        """{name: Probe} of the loaded probes."""
        return {lp.status.name: lp.probe for lp in self._loaded}

    # --- push: log records -----------------------------------------------------------------

    def start(self, emit: Emit) -> None:
        with self._lock:
            if self._thread is not None or self._closed:
                return
            readers = [lp for lp in self._loaded if lp.rings]
            if not readers:
                return
            self._poller = Poller(ring.fd for lp in readers for ring in lp.rings)
            self._thread = threading.Thread(target=self._read, args=(emit, readers),
                                            name="ebpf-reader", daemon=True)
            self._thread.start()

    def _read(self, emit: Emit, readers: list) -> None:
        poller = self._poller
        rings = [ring for lp in readers for ring in lp.rings]
        schedule = PollSchedule(self.poll_interval)
        failing: set = set()
        timeout = schedule.min_interval          # learn the rates from a first, early pass
        while poller.wait(timeout):
            records = []
            for lp in readers:
                try:
                    records.extend(lp.probe.poll())
                except Exception:
                    if lp.status.name not in failing:        # say it once per probe
                        failing.add(lp.status.name)
                        log.exception("ebpf_decode_failed probe=%s", lp.status.name)
            if records:
                try:
                    emit(Batch(logs=[LogGroup(self.resource, SCOPE, records)]))
                except Exception:
                    log.exception("ebpf_emit_failed records=%d", len(records))
            timeout = schedule.next_timeout(rings)

    # --- pull: metrics ---------------------------------------------------------------------

    def collect(self) -> list[MetricGroup]:
        if self._closed:
            return []
        now = now_ns()
        metrics: list = []
        dropped, read, ring_skipped, skipped, run_time, runs, overflow = [], [], [], [], [], [], []
        for lp in self._loaded:
            name = lp.status.name
            try:
                metrics.extend(lp.probe.collect(now, self.start_ns))
            except Exception:
                log.exception("ebpf_collect_failed probe=%s", name)
            ns, count, misses = program_stats(lp.obj)
            attrs = (("probe", name),)
            for map_name, n in lp.probe.map_overflows().items():
                overflow.append(NumberPoint(attrs + (("map", map_name),), n, self.start_ns, now))
            skipped.append(NumberPoint(attrs, misses, self.start_ns, now))
            run_time.append(NumberPoint(attrs, ns, self.start_ns, now))
            runs.append(NumberPoint(attrs, count, self.start_ns, now))
            if lp.rings:
                drops = read_drops(lp.obj, len(lp.rings))
                for ring, n in zip(lp.rings, drops):
                    attrs = (("probe", name), ("ring", ring.name))
                    dropped.append(NumberPoint(attrs, n, self.start_ns, now))
                    read.append(NumberPoint(attrs, ring.records, self.start_ns, now))
                    for reason, n in (("discarded", ring.discarded), ("invalid", ring.invalid)):
                        ring_skipped.append(NumberPoint(attrs + (("reason", reason),), n, self.start_ns, now))
        if dropped:
            metrics.append(Metric(DROPPED, "Ring buffer records the kernel side could not reserve "
                                  "because the ring was full.", "{record}", MetricKind.SUM, dropped,
                                  monotonic=True))
            metrics.append(Metric(READ, "Ring buffer records read by the agent.", "{record}",
                                  MetricKind.SUM, read, monotonic=True))
            metrics.append(Metric(RING_SKIPPED, "Ring buffer records the agent skipped, by reason: discarded (a "
                                  "program gave the record up) or invalid (its length is not the record's).",
                                  "{record}", MetricKind.SUM, ring_skipped, monotonic=True))
        if overflow:
            metrics.append(Metric(MAP_OVERFLOW, "Events a probe counted in its overflow series "
                                  "(otel.metric.overflow=true) because its map keyed by cgroup was full.",
                                  "{event}", MetricKind.SUM, overflow, monotonic=True))
        if skipped:
            metrics.append(Metric(SKIPPED, "Events a probe's programs missed because another BPF program "
                                  "was running on that CPU (the kernel's recursion_misses).", "{event}",
                                  MetricKind.SUM, skipped, monotonic=True))
            if self._stats_on():        # else the kernel counts nothing: no zeros that look measured
                metrics.append(Metric(RUN_TIME, "Time a probe's BPF programs ran in the kernel, over all CPUs "
                                      "(counted while BPF stats are on).", "ns", MetricKind.SUM, run_time,
                                      monotonic=True))
                metrics.append(Metric(RUNS, "Times a probe's BPF programs ran (counted while BPF stats are on).",
                                      "{run}", MetricKind.SUM, runs, monotonic=True))
        return [MetricGroup(self.resource, SCOPE, metrics)] if metrics else []

    # --- shutdown --------------------------------------------------------------------------

    def close(self, timeout: float = 1.0) -> None:
        """Stop the reader (it wakes at once) and unload every probe."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            thread, poller = self._thread, self._poller
        if poller is not None:
            poller.stop()
        if thread is not None:
            thread.join(timeout)
            if thread.is_alive():
                log.warning("ebpf_reader_did_not_stop timeout=%.1fs", timeout)
                return            # leave the mappings alone while it may still read them
        if poller is not None:
            poller.close()
        unload(self._loaded)
        self._loaded = []
        if self.workloads is not None:
            self.workloads.close()
        if self._stats_fd is not None:
            os.close(self._stats_fd)
            self._stats_fd = None
