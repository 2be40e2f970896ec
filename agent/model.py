"""The internal telemetry model every source produces and every encoder consumes.

Plain slotted dataclasses, close to OTLP's shape so encoding is a straight walk:
a Batch holds MetricGroups and LogGroups, each tied to one Resource and one Scope.
Attributes are tuples of (key, value) pairs so they hash and compare cheaply.
"""
from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import Union

AttrValue = Union[str, bool, int, float]
Attributes = tuple  # tuple[tuple[str, AttrValue], ...]


def attrs(**kwargs: AttrValue) -> Attributes:
    """Attributes from keyword arguments (for names that are valid identifiers)."""
    return tuple(kwargs.items())


def now_ns() -> int:
    return time.time_ns()


class MetricKind(enum.Enum):
    GAUGE = "gauge"
    SUM = "sum"
    HISTOGRAM = "histogram"
    EXPONENTIAL_HISTOGRAM = "exponential_histogram"


class Temporality(enum.IntEnum):
    # values are OTLP's AggregationTemporality
    DELTA = 1
    CUMULATIVE = 2


@dataclass(frozen=True, slots=True)
class Resource:
    attributes: Attributes

    def merged(self, extra: Attributes) -> "Resource":
        """This resource with `extra` added; keys in `extra` win."""
        keys = {k for k, _ in extra}
        return Resource(tuple(kv for kv in self.attributes if kv[0] not in keys) + tuple(extra))


@dataclass(frozen=True, slots=True)
class Scope:
    name: str
    version: str = ""


@dataclass(slots=True)
class NumberPoint:
    attributes: Attributes
    value: Union[int, float]
    start_time_ns: int
    time_ns: int


@dataclass(slots=True)
class HistogramPoint:
    """Explicit-bucket histogram: counts has len(bounds) + 1 entries."""
    attributes: Attributes
    start_time_ns: int
    time_ns: int
    count: int
    sum: float
    bounds: tuple
    counts: list


@dataclass(slots=True)
class ExponentialHistogramPoint:
    """Base-2 exponential histogram. Bucket i of `positive_counts` covers
    (2**((offset+i) * 2**-scale), 2**((offset+i+1) * 2**-scale)]; scale 0 is a log2 histogram."""
    attributes: Attributes
    start_time_ns: int
    time_ns: int
    count: int
    sum: float
    scale: int
    zero_count: int
    positive_offset: int
    positive_counts: list
    min: Union[float, None] = None
    max: Union[float, None] = None


@dataclass(slots=True)
class Metric:
    name: str
    description: str
    unit: str
    kind: MetricKind
    points: list = field(default_factory=list)
    monotonic: bool = False
    temporality: Temporality = Temporality.CUMULATIVE


class Severity(enum.IntEnum):
    # OTLP SeverityNumber values
    DEBUG = 5
    INFO = 9
    WARN = 13
    ERROR = 17
    FATAL = 21


@dataclass(slots=True)
class LogRecord:
    time_ns: int
    body: str
    attributes: Attributes = ()
    severity: Severity = Severity.INFO
    event_name: str = ""
    observed_time_ns: int = 0


@dataclass(slots=True)
class MetricGroup:
    resource: Resource
    scope: Scope
    metrics: list


@dataclass(slots=True)
class LogGroup:
    resource: Resource
    scope: Scope
    records: list


@dataclass(slots=True)
class Batch:
    metrics: list = field(default_factory=list)  # list[MetricGroup]
    logs: list = field(default_factory=list)  # list[LogGroup]

    def point_count(self) -> int:
        return sum(len(m.points) for g in self.metrics for m in g.metrics)

    def log_count(self) -> int:
        return sum(len(g.records) for g in self.logs)

    def __len__(self) -> int:
        return self.point_count() + self.log_count()
