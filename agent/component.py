"""What a component is: a type name, a config class and a factory (bottom layer).

`config` is a frozen dataclass with defaults and an optional `validate(self, key)`;
`create(config, telemetry, ...)` builds the component, recording into `telemetry` (the agent's
own metrics, agent.selfmetrics.SelfMetrics)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable


@dataclass(frozen=True)
class Factory:
    type: str
    config: type
    create: Callable
