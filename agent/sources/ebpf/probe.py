"""What a probe is: a BPF program in bpf/<name>.bpf.c (built to bpf/build/<name>.bpf.o for the
CO-RE loader) plus a subclass of Probe that says what its maps and records mean and which
parameters the program takes. The loader (loader.py) owns loading, attaching and feature checks;
a probe module only describes and decodes, through the loaded object's maps (maps.BpfMap), so it
does not depend on the loader.
"""
from __future__ import annotations

import os
from typing import Callable, Mapping, Optional

from agent.model import LogRecord, Metric

BPF_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))))), "bpf")
OBJECT_DIR = os.path.join(BPF_DIR, "build")       # bpf/build.sh's output


class Probe:
    name: str = ""
    description: str = ""
    # tracepoints as "category:event"; all must exist unless select_tracepoints() says otherwise
    tracepoints: tuple = ()
    default_enabled: bool = True
    # C struct name -> its Python mirror (ctypes Structure for map keys and values, numpy dtype for
    # ring records, which the C declares with HA_RECORD), checked member by member against the
    # loaded object's BTF
    structs: Mapping[str, object] = {}
    # the metrics it exports (docs/probes.md is checked against these and the rest of the class)
    metrics: tuple = ()

    @classmethod
    def create(cls, options, telemetry=None, enrichment=None, workloads=None) -> "Probe":
        """The probe as configured: `options` is its ebpf.probes.<name> section (ProbeConfig), None
        when the config does not list it; `telemetry` (the agent's own metrics) and `enrichment`
        (EnrichmentConfig) for the probes that need them, None for a probe only described;
        `workloads` (agent.procfs.workload.WorkloadResolver) for the probes that attribute their
        data to workloads, None for host-wide series (ebpf.attribution: host)."""
        return cls()

    @property
    def source_file(self) -> str:
        return os.path.join(BPF_DIR, f"{self.name}.bpf.c")

    def select_tracepoints(self, available: Callable[[str], bool]) -> Optional[tuple]:
        """The tracepoints this probe will use on this kernel, or None if it cannot run.
        Probes with alternatives (e.g. block_io_start vs block_rq_issue) override this."""
        return self.tracepoints if all(available(tp) for tp in self.tracepoints) else None

    def object_file(self, directory: str = "") -> str:
        """The CO-RE object in `directory` (ebpf.object_dir; default bpf/build)."""
        return os.path.join(directory or OBJECT_DIR, f"{self.name}.bpf.o")

    def params(self, tracepoints: tuple) -> dict:
        """The program's parameters for the chosen tracepoints, {NAME: int or bool}: `const
        volatile` globals of the same name under CO-RE (those the object declares), -D flags
        under bcc (True defines NAME, False leaves it out). Never edit the BPF text."""
        return {}

    def programs(self, tracepoints: tuple) -> tuple:
        """The CO-RE object's programs that implement the chosen tracepoints (the loader turns
        autoload off for the rest): one `category__event` per tracepoint, unless the probe's
        variant attaches raw tracepoints (`raw_tp__event`)."""
        return tuple(tp.replace(":", "__", 1) for tp in tracepoints)

    def unused_maps(self, tracepoints: tuple) -> tuple:
        """Maps of the CO-RE object that only the variant not chosen uses: not created (an LRU
        hash is preallocated whether used or not)."""
        return ()

    def map_sizes(self) -> dict:
        """{map name: max_entries} set before a CO-RE load (bcc gets them through params())."""
        return {}

    def setup(self, obj) -> None:
        """Called once after the program is loaded and attached: look up maps (obj.map(name)),
        open readers."""
        self.obj = obj

    def collect(self, now_ns: int, start_ns: int) -> list[Metric]:
        """Read in-kernel aggregates once per collection interval."""
        return []

    def map_overflows(self) -> dict:
        """{map name: events counted under the overflow cgroup because the map was full}, for
        the probes whose maps are keyed by cgroup (bpf/include/maps.h)."""
        return {}

    def poll(self) -> list[LogRecord]:
        """Drain discrete events (ring buffer records) as log records; called by the reader thread."""
        return []

    def close(self) -> None:
        pass
