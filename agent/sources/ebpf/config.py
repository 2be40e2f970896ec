"""The `ebpf` config section: the probes on or off, by name (the names of registry.PROBES)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

from agent.config import ConfigError, did_you_mean, frozen_dict
from agent.sources.ebpf.registry import PROBES


@dataclass(frozen=True)
class ProbeConfig:
    enabled: bool = True


@dataclass(frozen=True)
class EbpfConfig:
    enabled: bool = True
    # per-probe switches; a probe not listed keeps its default (see docs/probes.md)
    probes: Mapping[str, ProbeConfig] = frozen_dict()

    def validate(self, key: str) -> None:
        for name in self.probes:
            if name not in PROBES:
                raise ConfigError(f"{key}.probes.{name}", "unknown probe" + did_you_mean(name, PROBES))
