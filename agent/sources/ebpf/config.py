"""The `ebpf` config section: which loader, and the probes on or off by name (the names of
registry.PROBES) with their options."""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Literal, Mapping

from agent.config import ConfigError, did_you_mean, frozen_dict
from agent.sources.ebpf.registry import PROBES


@dataclass(frozen=True)
class ProbeConfig:
    enabled: bool = True
    # syscalls only: count calls and errors, no latency histogram (about half the cost per call)
    counting_only: bool = False
    # tcp only: count only traffic with this local or remote port (0: all)
    port: int = 0


@dataclass(frozen=True)
class EbpfConfig:
    enabled: bool = True
    # auto: CO-RE objects through libbpf where the kernel has BTF and bpf/build has them, else bcc
    loader: Literal["auto", "core", "bcc"] = "auto"
    # where the CO-RE objects are; empty: bpf/build next to the agent's code (bpf/build.sh's output)
    object_dir: str = ""
    # workload: the kernel keys runqlat, biolatency and syscalls by cgroup and the points carry
    # their workload (container, systemd unit or slice); host: host-wide series only
    attribution: Literal["workload", "host"] = "workload"
    # per-probe switches; a probe not listed keeps its default (see docs/probes.md)
    probes: Mapping[str, ProbeConfig] = frozen_dict()

    def validate(self, key: str) -> None:
        if self.object_dir and not os.path.isabs(self.object_dir):
            raise ConfigError(f"{key}.object_dir", f"must be an absolute path, got {self.object_dir!r}")
        for name, probe in self.probes.items():
            if name not in PROBES:
                raise ConfigError(f"{key}.probes.{name}", "unknown probe" + did_you_mean(name, PROBES))
            if probe.counting_only and name != "syscalls":
                raise ConfigError(f"{key}.probes.{name}.counting_only", "only the syscalls probe has this option")
            if probe.port and name != "tcp":
                raise ConfigError(f"{key}.probes.{name}.port", "only the tcp probe has this option")
            if not 0 <= probe.port <= 65535:
                raise ConfigError(f"{key}.probes.{name}.port", f"must be a port number 1..65535 or 0 (all), "
                                  f"got {probe.port}")
