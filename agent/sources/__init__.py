"""Producers of telemetry. A source knows nothing of batching or export.

Two shapes, one base class:
- pull: `collect()` is called once per collection interval by the runtime's scheduler thread
  and returns the metrics of that moment;
- push: `start(emit)` starts the source's own threads, which call `emit(batch)` with what they
  saw (log records from kernel events); `close()` stops them.
A source raises nothing out of collect()/start() for conditions of the host (missing files,
vanished processes): it logs, counts and degrades. The runtime still guards each call.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:       # kept out of the import: `hostagent run` attaches its probes before loading the model
    from agent.model import Batch, MetricGroup

Emit = Callable[["Batch"], None]


class Source:
    name: str = ""

    def collect(self) -> list[MetricGroup]:
        return []

    def start(self, emit: Emit) -> None:
        pass

    def close(self) -> None:
        pass
