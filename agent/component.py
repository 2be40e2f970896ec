"""A component as the Collector has one: a type name, a frozen config with its defaults and
`validate(key)`, and a `create(config, telemetry, ...)` that builds it, handed the agent's own
metrics (`telemetry`, a SelfMetrics) and whatever else it needs by keyword (e.g. `resource=`).
The tables of components by name are in agent/components.py."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable


@dataclass(frozen=True)
class Factory:
    type: str
    config: type
    create: Callable
