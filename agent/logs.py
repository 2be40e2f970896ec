"""The agent's own log: its config (`logging`) and one key=value line per event on stderr, with
the syslog priority journald reads when stderr is the journal."""
from __future__ import annotations

import logging
import os
import sys
import time
from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class LoggingConfig:
    level: Literal["debug", "info", "warning", "error"] = "info"


# syslog priorities, which journald reads from a "<N>" prefix on each line of a service's stderr
JOURNAL_PRIORITY = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3, logging.CRITICAL: 2}


def timestamp(t: float) -> str:
    """Wall-clock time `t` as the log lines' ts= writes it (UTC, milliseconds)."""
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t * 1000) % 1000:03d}Z"


class KeyValueFormatter(logging.Formatter):
    """One line per event: ts=... level=... logger=... <message>, messages being `event k=v ...`.
    With `journal`, each line starts with its syslog priority, so `journalctl -p warning` works."""

    def __init__(self, journal: bool = False):
        super().__init__()
        self.journal = journal

    def format(self, record: logging.LogRecord) -> str:
        line = f"ts={timestamp(record.created)} level={record.levelname.lower()} logger={record.name} {record.getMessage()}"
        if record.exc_info:
            line += " exception=" + repr(self.formatException(record.exc_info))
        if self.journal:
            line = f"<{JOURNAL_PRIORITY.get(record.levelno, 6)}>{line}"
        return line


def stderr_is_journal() -> bool:
    """Is stderr the journal's stream? systemd says so in JOURNAL_STREAM ("device:inode")."""
    try:
        st = os.fstat(sys.stderr.fileno())
    except (OSError, ValueError, AttributeError):
        return False
    return os.environ.get("JOURNAL_STREAM") == f"{st.st_dev}:{st.st_ino}"


def setup_logging(level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(KeyValueFormatter(journal=stderr_is_journal()))
    root = logging.getLogger("hostagent")
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    root.propagate = False
