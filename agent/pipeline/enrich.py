"""Enrichment and cardinality limits, applied by the batcher thread to every batch it takes in.

ProcessEnricher: a kernel event says "pid 4711"; this adds who that is -- executable, command
line, owner, parent, cgroup, container.id, systemd unit -- to every log record that carries
process.pid. Identities come from the process probe's exec records (read in the kernel at exec,
so even a process that lived a millisecond is known) and, for processes that exec'd before the
agent started, from /proc. They are kept in a two-level cache (agent/procfs/cache.py) keyed by pid:
- an exec record stores its identity (replacing whatever the pid had);
- an exit record takes the identity and removes it at once, so a recycled pid can never be given
  a dead process's identity;
- every identity carries the process's creation time, and a record that names one is only
  given an identity with the same creation time: a late or lost record cannot mix two
  processes that shared a pid. A /proc answer is checked the same way (start time in clock
  ticks), and re-read to make sure the pid did not change hands while it was being read.

CardinalityLimiter: per metric and resource, at most `limit` attribute sets per collection; the
rest are merged into one series with otel.metric.overflow=true (as the OpenTelemetry SDKs do) and
counted in hostagent.pipeline.cardinality_overflow.
"""
from __future__ import annotations

import datetime
from typing import Optional

from agent.model import (Batch, ExponentialHistogramPoint, HistogramPoint, LogRecord, Metric, MetricKind,
                         NumberPoint)
from agent.procfs.cache import TwoLevelCache
from agent.procfs.identity import (CLOCK_TICK_NS, Redactor, boot_to_wall_ns, proc_cgroup_attributes, proc_stat,
                                   read_process)

# what an identity holds: the attributes a record gains when it has only the pid
IDENTITY_KEYS = ("process.parent_pid", "process.executable.name", "process.executable.path",
                 "process.command_line", "process.owner", "process.linux.cgroup", "container.id",
                 "linux.systemd.unit")
CREATED = "process.creation.time"
EXEC, EXIT = "process.exec", "process.exit"
CGROUP_KEYS = ("process.linux.cgroup", "container.id", "linux.systemd.unit")
V2_ROOT = "0::/"


def _iso_to_ns(text: str) -> int:
    return int(datetime.datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp() * 1e9)


class ProcessEnricher:
    def __init__(self, cfg, telemetry):
        """`cfg`: EnrichmentConfig; `telemetry`: the agent's own metrics."""
        self.cache = TwoLevelCache("process", cfg.cache_l1_size, cfg.cache_l2_size, telemetry)
        self.redact = Redactor(cfg.redaction) if cfg.command_line else None
        self._results = telemetry.counter(
            "hostagent.enrichment.records", "{record}",
            "Records with a process.pid, by where their process's identity came from: cache, procfs, "
            "or none (the process was gone and unknown).")
        self._counts = {"cache": 0, "procfs": 0, "none": 0}

    def __call__(self, batch: Batch) -> None:
        for group in batch.logs:
            group.records = [self._record(r) for r in group.records]
        for result, n in self._counts.items():
            if n:
                self._results.add(n, (("source", result),))
                self._counts[result] = 0
        self.cache.publish()

    def _record(self, record: LogRecord) -> LogRecord:
        attrs = dict(record.attributes)
        pid = attrs.get("process.pid")
        if pid is None:
            return record
        created = attrs.get(CREATED)
        if record.event_name == EXEC:
            if attrs.get("process.linux.cgroup", V2_ROOT) == V2_ROOT:
                self._cgroup_v1(record, attrs, pid, created)
            self.cache.put(pid, (created, tuple((k, attrs[k]) for k in IDENTITY_KEYS if k in attrs)))
            return record
        entry = self.cache.get(pid)
        source = "cache"
        if entry is not None and created is not None and entry[0] is not None and entry[0] != created:
            entry = None                      # the cached identity is another process that had this pid
        elif entry is not None and record.event_name == EXIT:
            self.cache.invalidate(pid)
        if entry is None:
            entry = self._from_proc(pid, created, attrs.get("process.executable.name"))
            source = "procfs" if entry is not None else "none"
            if entry is not None and record.event_name != EXIT:
                self.cache.put(pid, entry)
        self._counts[source] += 1
        if entry is None:
            return record
        known = entry[1]
        if attrs.get("process.linux.cgroup") == V2_ROOT and any(k == "process.linux.cgroup" for k, _ in known):
            # the identity has the cgroup /proc named (v1 hierarchies); the record only the v2 root
            record.attributes = tuple(kv for kv in record.attributes if kv[0] not in CGROUP_KEYS)
            attrs = dict(record.attributes)
        extra = tuple(kv for kv in known if kv[0] not in attrs)
        if extra:
            record.attributes = record.attributes + extra
        return record

    def _cgroup_v1(self, record: LogRecord, attrs: dict, pid: int, created: Optional[str]) -> None:
        """The kernel side reports the cgroup v2 id only; in the v2 root (cgroup v1 and hybrid
        hosts) the cgroup that names a container may be a v1 one: ask /proc while the process lives."""
        start = self._same_process(pid, created, None)
        if start is None:
            return
        cgroup = proc_cgroup_attributes(pid)
        if cgroup and self._still(pid, start):
            record.attributes = tuple(kv for kv in record.attributes if kv[0] not in CGROUP_KEYS) + cgroup
            attrs.update(cgroup)

    def _from_proc(self, pid: int, created: Optional[str], comm: Optional[str]):
        """The identity of the process now at `pid`, if it is the one the record is about."""
        start = self._same_process(pid, created, comm)
        if start is None:
            return None
        found = read_process(pid, self.redact)
        if found is None or found[0] != start or not self._still(pid, start):
            return None
        return created, found[1]

    @staticmethod
    def _same_process(pid: int, created: Optional[str], comm: Optional[str]) -> Optional[int]:
        """The start time (boot-clock ticks) of the process now at `pid` if it is the one a
        record is about: same creation time (to a clock tick) when the record has one, else the
        same command name; None otherwise."""
        stat = proc_stat(pid)
        if stat is None:
            return None
        name, _, start = stat
        if created is not None:
            if abs(boot_to_wall_ns() + start * CLOCK_TICK_NS - _iso_to_ns(created)) > CLOCK_TICK_NS + 1_000_000:
                return None
        elif comm is not None and name != comm:
            return None
        return start

    @staticmethod
    def _still(pid: int, start: int) -> bool:
        """Is the process that started at `start` still the one at `pid` (after reading it)?"""
        stat = proc_stat(pid)
        return stat is not None and stat[2] == start


# --- cardinality ---------------------------------------------------------------------------------

OVERFLOW_ATTRIBUTES = (("otel.metric.overflow", True),)


class CardinalityLimiter:
    def __init__(self, limit: int, telemetry):
        self.limit = limit
        self._overflow = telemetry.counter(
            "hostagent.pipeline.cardinality_overflow", "{point}",
            "Data points merged into the otel.metric.overflow=true series of their metric because it "
            "had more attribute sets in one collection than cardinality_limit.")

    def __call__(self, batch: Batch) -> None:
        for group in batch.metrics:
            for metric in group.metrics:
                if len(metric.points) > self.limit:
                    self._limit(metric)

    def _limit(self, metric: Metric) -> None:
        kept: dict = {}
        excess = []
        for p in metric.points:
            if p.attributes in kept or len(kept) < self.limit:
                kept.setdefault(p.attributes, []).append(p)
            else:
                excess.append(p)
        if not excess:
            return
        points = [p for group in kept.values() for p in group]
        points.append(merge(metric.kind, excess))
        metric.points = points
        self._overflow.add(len(excess), (("metric", metric.name),))


def merge(kind: MetricKind, points: list):
    """One overflow point standing for `points`: sums add, gauges keep the last value,
    histograms add bucket by bucket."""
    start = min(p.start_time_ns for p in points)
    end = max(p.time_ns for p in points)
    first = points[0]
    if isinstance(first, NumberPoint):
        value = points[-1].value if kind == MetricKind.GAUGE else sum(p.value for p in points)
        return NumberPoint(OVERFLOW_ATTRIBUTES, value, start, end)
    if isinstance(first, HistogramPoint):
        counts = [0] * len(first.counts)
        for p in points:
            if p.bounds != first.bounds:
                raise ValueError("cannot merge histograms with different bounds")
            counts = [a + b for a, b in zip(counts, p.counts)]
        return HistogramPoint(OVERFLOW_ATTRIBUTES, start, end, sum(p.count for p in points),
                              sum(p.sum for p in points), first.bounds, counts)
    if isinstance(first, ExponentialHistogramPoint):
        buckets: dict = {}
        for p in points:
            if p.scale != first.scale:
                raise ValueError("cannot merge exponential histograms with different scales")
            for i, n in enumerate(p.positive_counts):
                buckets[p.positive_offset + i] = buckets.get(p.positive_offset + i, 0) + n
        offset = min(buckets) if buckets else 0
        counts = [buckets.get(i, 0) for i in range(offset, max(buckets) + 1)] if buckets else []
        mins = [p.min for p in points if p.min is not None]
        maxs = [p.max for p in points if p.max is not None]
        return ExponentialHistogramPoint(
            OVERFLOW_ATTRIBUTES, start, end, sum(p.count for p in points), sum(p.sum for p in points),
            first.scale, sum(p.zero_count for p in points), offset, counts,
            min(mins) if len(mins) == len(points) else None, max(maxs) if len(maxs) == len(points) else None)
    raise TypeError(f"cannot merge {type(first).__name__}")
