"""The `exporter:` section and the tables that build its parts: EXPORTERS (type -> Factory) and
QUEUES (kind -> Factory). A new exporter is its module (config class beside its code), a line
here, its test and its row in docs/configuration.md."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Literal, Mapping, Optional

from agent.component import Factory
from agent.export import Exporter
from agent.export.file import FileExporter, FileExporterConfig
from agent.export.otlp import OtlpExporterConfig, otlp_env_layer
from agent.export.queue import ExportQueue, MemoryQueue, QueueConfig, QueueError, settings
from agent.export.retry import RetryConfig

log = logging.getLogger("hostagent.export.queue")


def _create_otlp(cfg: OtlpExporterConfig, telemetry) -> Exporter:
    # the transport is loaded when used: grpcio alone costs an agent about 16 MB of RSS
    if cfg.protocol == "grpc":
        from agent.export.otlp_grpc import GrpcExporter
        return GrpcExporter(cfg, telemetry)
    from agent.export.otlp_http import HttpExporter
    return HttpExporter(cfg, telemetry)


def _create_persistent(cfg: QueueConfig, telemetry, directory: str = "") -> ExportQueue:
    # loaded when used, as the transports are: its checksum and compression libraries cost about
    # 5 MB of RSS that an agent with a memory queue never needs
    from agent.export.wal import PersistentQueue
    return PersistentQueue(settings(cfg, "persistent", directory), telemetry)


EXPORTERS = {
    "file": Factory("file", FileExporterConfig, lambda cfg, telemetry: FileExporter(cfg)),
    "otlp": Factory("otlp", OtlpExporterConfig, _create_otlp),
}

QUEUES = {
    "memory": Factory("memory", QueueConfig, lambda cfg, telemetry, directory="": MemoryQueue(
        settings(cfg, "memory", directory), telemetry)),
    "persistent": Factory("persistent", QueueConfig, _create_persistent),
}


@dataclass(frozen=True)
class ExporterConfig:
    # file: OTLP-JSON lines on local disk (no backend needed); otlp: an OTLP gRPC/HTTP receiver
    type: Literal["file", "otlp"] = "file"
    file: FileExporterConfig = FileExporterConfig()
    otlp: OtlpExporterConfig = OtlpExporterConfig()
    queue: QueueConfig = QueueConfig()
    retry: RetryConfig = RetryConfig()

    def validate(self, key: str) -> None:
        # only the selected exporter's paths must be writable
        if self.type == "file":
            self.file.check_paths(f"{key}.file")

    def check_state_dir(self, state_dir: str, key: str = "exporter") -> None:
        """What the section needs of the agent's state directory (the persistent queue's)."""
        self.queue.check_directory(state_dir, f"{key}.queue")

    def queue_kind(self) -> str:
        """memory or persistent: `auto` is persistent for the otlp exporter."""
        if self.queue.type == "auto":
            return "persistent" if self.type == "otlp" else "memory"
        return self.queue.type

    def senders(self) -> int:
        """Requests in flight at once."""
        return self.otlp.connections if self.type == "otlp" else 1


def env_layer(environ: Mapping[str, str]) -> dict:
    """The OTEL_EXPORTER_OTLP_* variables as a raw `exporter` tree; an endpoint variable selects the
    otlp exporter."""
    raw = otlp_env_layer(environ)
    if not raw:
        return {}
    section: dict = {"otlp": raw}
    if any(k.endswith("endpoint") for k in raw):
        section["type"] = "otlp"
    return {"exporter": section}


def build_exporter(cfg: ExporterConfig, telemetry) -> Exporter:
    return EXPORTERS[cfg.type].create(getattr(cfg, cfg.type), telemetry)


def open_queue(cfg: ExporterConfig, state_dir: str, telemetry, reuse: Optional[ExportQueue] = None) -> ExportQueue:
    """The export queue `cfg` asks for. `reuse`, the queue of the pipeline being replaced on a
    reload, is kept when it is the same kind (and directory); otherwise its content is moved over.
    With `auto`, a persistent queue that cannot be opened falls back to memory (logged)."""
    kind, directory = cfg.queue_kind(), cfg.queue.path(state_dir)
    wanted = settings(cfg.queue, kind, directory)
    if reuse is not None and reuse.kind == kind and (kind == "memory" or reuse.settings.directory == directory):
        reuse.reconfigure(wanted)
        return reuse
    try:
        queue = QUEUES[kind].create(cfg.queue, telemetry, directory=directory)
    except QueueError as e:
        if cfg.queue.type == "persistent":
            raise
        log.warning("queue_fallback type=memory reason=%r", str(e))
        queue = QUEUES["memory"].create(cfg.queue, telemetry, directory=directory)
    if reuse is not None:
        moved = 0
        for payload in reuse.drain():
            queue.put(payload)
            moved += 1
        reuse.close()
        log.info("queue_moved payloads=%d from=%s to=%s", moved, reuse.kind, queue.kind)
    return queue
