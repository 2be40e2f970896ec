"""OTLP-JSON lines on local disk: the embedded default, readable by the Collector's otlpjsonfile
receiver. Metrics and logs go to separate files so each line parses as one request type."""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import ClassVar

from agent.config import ConfigError, Size, check_ranges
from agent.export import Exporter, RetryableError
from agent.export.encoding import Payload, to_json_line


@dataclass(frozen=True)
class FileExporterConfig:
    path: str = "/var/lib/hostagent/otlp/metrics.jsonl"
    logs_path: str = "/var/lib/hostagent/otlp/logs.jsonl"
    # a file is rotated to <path>.1 when it reaches max_size; max_backups rotated files are kept
    max_size: Size = Size(100 * 2**20)
    max_backups: int = 3

    RANGES: ClassVar[dict] = {"max_size": (Size(4 * 2**10), Size(2**40)), "max_backups": (0, 1000)}

    def check_paths(self, key: str) -> None:
        for name in ("path", "logs_path"):
            _check_writable(getattr(self, name), f"{key}.{name}")

    def validate(self, key: str) -> None:
        check_ranges(self, key)
        for name in ("path", "logs_path"):
            if not getattr(self, name):
                raise ConfigError(f"{key}.{name}", "must be a file path, got ''")


def _check_writable(path: str, key: str) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    probe = directory
    while not os.path.exists(probe):  # the nearest existing ancestor must let us create the rest
        probe = os.path.dirname(probe)
    if os.path.isdir(path):
        raise ConfigError(key, f"{path} is a directory, expected a file path")
    target = path if os.path.exists(path) else probe
    if (not os.path.isdir(probe) or not os.access(target, os.W_OK)
            or os.statvfs(probe).f_flag & os.ST_RDONLY):
        raise ConfigError(key, f"{path} is not writable")


class RotatingFile:
    """Appends lines; at max_size renames path -> path.1 -> ... -> path.<max_backups>. The lines
    hold what the host runs (command lines): the directory it creates is 0700, its files 0600, as
    the persistent queue's."""

    def __init__(self, path: str, max_size: int, max_backups: int):
        self.path, self.max_size, self.max_backups = path, max_size, max_backups
        os.makedirs(os.path.dirname(os.path.abspath(path)), mode=0o700, exist_ok=True)
        self._f = self._open()

    def _open(self):
        return open(os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600), "ab")

    def write(self, line: bytes) -> None:
        if self._f.tell() and self._f.tell() + len(line) > self.max_size:
            self._rotate()
        self._f.write(line)
        self._f.flush()

    def _rotate(self) -> None:
        self._f.close()
        if self.max_backups == 0:
            os.unlink(self.path)
        else:
            for i in range(self.max_backups - 1, 0, -1):
                if os.path.exists(f"{self.path}.{i}"):
                    os.replace(f"{self.path}.{i}", f"{self.path}.{i + 1}")
            os.replace(self.path, f"{self.path}.1")
        self._f = self._open()

    def close(self) -> None:
        self._f.close()


class FileExporter(Exporter):
    name = "file"

    def __init__(self, cfg: FileExporterConfig):
        self.files = {signal: RotatingFile(path, cfg.max_size, cfg.max_backups)
                      for signal, path in (("metrics", cfg.path), ("logs", cfg.logs_path))}

    def send(self, payload: Payload) -> None:
        try:
            self.files[payload.signal].write(to_json_line(payload))
        except OSError as e:  # a full disk may heal: let the retry layer decide
            raise RetryableError(f"writing {self.files[payload.signal].path}: {e.strerror}") from None

    def close(self) -> None:
        for f in self.files.values():
            f.close()
