"""What a probe is: a BPF program in bpf/<name>.bpf.c plus a subclass of Probe that says what its
maps and records mean. The loader (loader.py) owns compiling, attaching and feature checks; a
probe module only describes and decodes.
"""
from __future__ import annotations

import os
from typing import Callable, Optional

from agent.model import LogRecord, Metric

BPF_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))))), "bpf")


class Probe:
    name: str = ""
    description: str = ""
    # tracepoints as "category:event"; all must exist unless select_tracepoints() says otherwise
    tracepoints: tuple = ()
    default_enabled: bool = True

    @classmethod
    def create(cls, options, telemetry=None, enrichment=None) -> "Probe":
        """The probe as configured: `options` is its ebpf.probes.<name> section (ProbeConfig), None
        when the config does not list it; `telemetry` (the agent's own metrics) and `enrichment`
        (EnrichmentConfig) for the probes that need them, None for a probe only described."""
        return cls()

    @property
    def source_file(self) -> str:
        return os.path.join(BPF_DIR, f"{self.name}.bpf.c")

    def select_tracepoints(self, available: Callable[[str], bool]) -> Optional[tuple]:
        """The tracepoints this probe will use on this kernel, or None if it cannot run.
        Probes with alternatives (e.g. block_io_start vs block_rq_issue) override this."""
        return self.tracepoints if all(available(tp) for tp in self.tracepoints) else None

    def cflags(self, tracepoints: tuple) -> list:
        """-D flags for the chosen tracepoints and parameters; never edit the BPF text."""
        return []

    def setup(self, bpf) -> None:
        """Called once after the program is loaded and attached: look up maps, open readers."""
        self.bpf = bpf

    def collect(self, now_ns: int, start_ns: int) -> list[Metric]:
        """Read in-kernel aggregates once per collection interval."""
        return []

    def poll(self) -> list[LogRecord]:
        """Drain discrete events (ring buffer records) as log records; called by the reader thread."""
        return []

    def close(self) -> None:
        pass
