"""The agent's own metrics (hostagent.*): drops, queue sizes, export results, probe health.

The runtime creates one SelfMetrics and hands it to every component (`telemetry`); components
create their instruments from it once at construction (`telemetry.counter(...)`, one instrument
per name) and add to them; hot paths add once per batch, not per item. The registry is itself a
pull source, so these metrics travel the same pipeline as everything else.
"""
from __future__ import annotations

import bisect
import threading
from typing import Callable

from agent.model import (Attributes, HistogramPoint, Metric, MetricGroup, MetricKind, NumberPoint, Resource,
                         Scope, now_ns)

SCOPE = Scope("hostagent/self")


class Counter:
    """A monotonic cumulative sum per attribute set."""

    def __init__(self, name: str, unit: str, description: str):
        self.name, self.unit, self.description = name, unit, description
        self._values: dict = {}
        self._lock = threading.Lock()

    def add(self, amount: int | float = 1, attributes: Attributes = ()) -> None:
        with self._lock:
            self._values[attributes] = self._values.get(attributes, 0) + amount

    def value(self, attributes: Attributes = ()) -> int | float:
        return self._values.get(attributes, 0)

    def total(self) -> int | float:
        return sum(self._values.values())

    def _metric(self, start: int, now: int) -> Metric:
        with self._lock:
            items = list(self._values.items())
        return Metric(self.name, self.description, self.unit, MetricKind.SUM,
                      [NumberPoint(a, v, start, now) for a, v in items], monotonic=True)


class Gauge:
    """Values read at collection time, one callback per attribute set."""

    def __init__(self, name: str, unit: str, description: str):
        self.name, self.unit, self.description = name, unit, description
        self._reads: dict = {}

    def observe(self, attributes: Attributes, read: Callable[[], int | float]) -> None:
        """Read this attribute set's value through `read` (replacing an earlier callback)."""
        self._reads[attributes] = read

    def _metric(self, start: int, now: int) -> Metric:
        return Metric(self.name, self.description, self.unit, MetricKind.GAUGE,
                      [NumberPoint(a, read(), now, now) for a, read in list(self._reads.items())])


# request duration buckets, seconds: 1ms .. 30s
DURATION_BOUNDS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class Histogram:
    """An explicit-bucket histogram per attribute set, cumulative."""

    def __init__(self, name: str, unit: str, description: str, bounds: tuple = DURATION_BOUNDS):
        self.name, self.unit, self.description, self.bounds = name, unit, description, bounds
        self._values: dict = {}  # attributes -> [count, sum, bucket counts]
        self._lock = threading.Lock()

    def record(self, value: float, attributes: Attributes = ()) -> None:
        with self._lock:
            v = self._values.get(attributes)
            if v is None:
                v = self._values[attributes] = [0, 0.0, [0] * (len(self.bounds) + 1)]
            v[0] += 1
            v[1] += value
            v[2][bisect.bisect_left(self.bounds, value)] += 1

    def count(self, attributes: Attributes = ()) -> int:
        v = self._values.get(attributes)
        return v[0] if v else 0

    def _metric(self, start: int, now: int) -> Metric:
        with self._lock:
            points = [HistogramPoint(a, start, now, c, s, self.bounds, list(b))
                      for a, (c, s, b) in self._values.items()]
        return Metric(self.name, self.description, self.unit, MetricKind.HISTOGRAM, points)


class SelfMetrics:
    """The registry, and a pull source for the runtime (name, collect(), close(), as
    agent.sources.Source has them; every source records into it, so it sits below them)."""
    name = "self"

    def __init__(self) -> None:
        self._instruments: dict = {}
        self._lock = threading.Lock()
        self.start_ns = now_ns()
        self.resource = Resource(())

    def _instrument(self, cls, name: str, unit: str, description: str):
        with self._lock:
            inst = self._instruments.get(name)
            if inst is None:
                inst = self._instruments[name] = cls(name, unit, description)
            return inst

    def counter(self, name: str, unit: str, description: str) -> Counter:
        return self._instrument(Counter, name, unit, description)

    def gauge(self, name: str, unit: str, description: str) -> Gauge:
        return self._instrument(Gauge, name, unit, description)

    def histogram(self, name: str, unit: str, description: str) -> Histogram:
        """Durations in seconds, in DURATION_BOUNDS buckets."""
        return self._instrument(Histogram, name, unit, description)

    def collect(self) -> list[MetricGroup]:
        now = now_ns()
        with self._lock:
            instruments = list(self._instruments.values())
        metrics = [m for m in (i._metric(self.start_ns, now) for i in instruments) if m.points]
        return [MetricGroup(self.resource, SCOPE, metrics)] if metrics else []

    def close(self) -> None:
        pass

