"""The agent's components by name, and the root of its config.

Each table maps a name to a Factory (agent/component.py): its config class (a section of the
config file) and how to create it. The `scrapers` section is made from SCRAPERS, so a new scraper
is its module, one line here, its test and its row in docs/configuration.md. `Config` says which
sections exist; agent/config.py loads a file into it (`load(path, environ, Config)`).
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import ClassVar

from agent import STATE_DIR
from agent.component import Factory
from agent import config
from agent.config import ConfigError, Duration, check_ranges
from agent.export.factory import ExporterConfig
from agent.export.factory import env_layer as exporter_env_layer
from agent.health import HealthConfig
from agent.logs import LoggingConfig
from agent.pipeline.batcher import BatchConfig
from agent.procfs.identity import EnrichmentConfig
from agent.resource import ResourceConfig
from agent.sources import cgroups, host
from agent.sources.ebpf.source import EbpfSource
from agent.sources.ebpf.config import EbpfConfig
from agent.sources.process import ProcessScraper, ProcessScraperConfig

# the host scrapers, in the order they are configured, documented and collected
SCRAPERS = {f.type: f for f in (
    Factory("cpu", host.ScraperConfig, host.CpuScraper),
    Factory("disk", host.FilteredScraperConfig, host.DiskScraper),
    Factory("filesystem", host.FilesystemScraperConfig, host.FilesystemScraper),
    Factory("load", host.ScraperConfig, host.LoadScraper),
    Factory("memory", host.ScraperConfig, host.MemoryScraper),
    Factory("network", host.FilteredScraperConfig, host.NetworkScraper),
    Factory("paging", host.ScraperConfig, host.PagingScraper),
    Factory("processes", host.ScraperConfig, host.ProcessesScraper),
    Factory("process", ProcessScraperConfig, ProcessScraper),
    Factory("system", host.ScraperConfig, host.SystemScraper),
    Factory("pressure", cgroups.PressureScraperConfig, cgroups.PressureScraper),
    Factory("cgroups", cgroups.CgroupScraperConfig, cgroups.CgroupUsageScraper),
)}

# sources loaded in the background once the scrapers run, each with a config section of its name
# (`enabled` switches it) and created with create(config, telemetry, resource=, enrichment=, state_dir=)
SOURCES = {f.type: f for f in (
    Factory("ebpf", EbpfConfig, EbpfSource),
)}

ScrapersConfig = dataclasses.make_dataclass(
    "ScrapersConfig", [(name, f.config, f.config()) for name, f in SCRAPERS.items()], frozen=True,
    namespace={"validate": host.check_scrapers, "__module__": __name__})


def build_scrapers(cfg, telemetry, resource, enrichment: EnrichmentConfig = EnrichmentConfig()) -> list:
    """The enabled scrapers of `cfg` (a ScrapersConfig), in table order; `enrichment` tells the
    process scraper how to redact and cache command lines."""
    return [f.create(getattr(cfg, name), telemetry, resource=resource, enrichment=enrichment)
            for name, f in SCRAPERS.items() if getattr(cfg, name).enabled]


@dataclass(frozen=True)
class Config:
    # how often scrapers and in-kernel aggregates are read
    collection_interval: Duration = Duration(10.0)
    # on SIGTERM/SIGINT, time allowed to flush buffered data before exiting
    shutdown_timeout: Duration = Duration(10.0)
    # the agent's own state: the persistent export queue lives under <state_dir>/queue
    state_dir: str = STATE_DIR
    resource: ResourceConfig = ResourceConfig()
    scrapers: ScrapersConfig = ScrapersConfig()
    ebpf: EbpfConfig = EbpfConfig()
    enrichment: EnrichmentConfig = EnrichmentConfig()
    # per metric and resource, the attribute sets kept per collection; the rest are merged into one
    # series with otel.metric.overflow=true and counted in hostagent.pipeline.cardinality_overflow
    cardinality_limit: int = 2000
    batch: BatchConfig = BatchConfig()
    exporter: ExporterConfig = ExporterConfig()
    health: HealthConfig = HealthConfig()
    logging: LoggingConfig = LoggingConfig()

    RANGES: ClassVar[dict] = {"collection_interval": (Duration(0.1), Duration(86400.0)),
                              "shutdown_timeout": (Duration(0.01), Duration(3600.0)),
                              "cardinality_limit": (1, 1_000_000)}

    def validate(self, key: str) -> None:
        check_ranges(self, key)
        if not os.path.isabs(self.state_dir):
            raise ConfigError("state_dir", f"must be an absolute path, got {self.state_dir!r}")
        self.exporter.check_state_dir(self.state_dir)

    @staticmethod
    def env_layer(environ) -> dict:
        """The standard OTEL_* environment variables as a raw config tree, section by section."""
        return config.merge(config.env_layer(environ), exporter_env_layer(environ))
