"""The signals probe on the real kernel: signals this test sends to its own child."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from agent.model import Resource
from agent.selfmetrics import SelfMetrics
from agent.sources.ebpf.source import EbpfSource
from agent.sources.ebpf.config import EbpfConfig
from agent.sources.ebpf.process import ProcessProbe
from agent.sources.ebpf.signals import FATAL_SIGNALS, SignalsProbe, signal_mask, signal_name
from tests.helpers import Events

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="loads BPF programs")

# SIGXFSZ is handled, SIGSYS ignored, SIGUSR1 handled (and not a counted signal)
TARGET = ("import signal, sys, time\n"
          "signal.signal(signal.SIGXFSZ, lambda *a: None)\n"
          "signal.signal(signal.SIGUSR1, lambda *a: None)\n"
          "signal.signal(signal.SIGSYS, signal.SIG_IGN)\n"
          "print('ready', flush=True)\n"
          "time.sleep(60)\n")


def test_signal_set_and_names():
    assert signal.SIGKILL in FATAL_SIGNALS and signal.SIGSEGV in FATAL_SIGNALS
    assert signal.SIGUSR1 not in FATAL_SIGNALS and signal.SIGCHLD not in FATAL_SIGNALS
    assert signal_mask([9, 15]) == (1 << 9) | (1 << 15)
    assert signal_name(9) == "SIGKILL" and signal_name(signal.SIGRTMIN + 2) == "SIGRTMIN+2"
    with pytest.raises(ValueError):
        signal_mask([64])


def fatal(src) -> dict:
    out = {}
    for group in src.collect():
        for m in group.metrics:
            if m.name == "system.linux.signals.fatal":
                out.update({dict(p.attributes)["signal"]: p.value for p in m.points})
    return out


@needs_root
def test_counts_delivered_fatal_signals_exactly():
    src = EbpfSource(EbpfConfig(), SelfMetrics(), Resource(()),
                     probes={"signals": SignalsProbe, "process": ProcessProbe})
    events = Events()
    child = None
    try:
        assert [s.state for s in src.statuses] == ["on", "on"], src.statuses
        src.start(events.emit)
        child = subprocess.Popen([sys.executable, "-c", TARGET], stdout=subprocess.PIPE)
        assert child.stdout.readline() == b"ready\n"
        before = fatal(src)
        for sig in (signal.SIGXFSZ,) * 3 + (signal.SIGSYS,) * 2 + (signal.SIGUSR1,):
            os.kill(child.pid, sig)
            time.sleep(0.05)                  # handled before the next: never "already pending"
        middle = fatal(src)
        child.kill()
        assert child.wait(10) == -signal.SIGKILL
        (exit_,) = events.wait_for("process.exit", [child.pid], 1)
        after = fatal(src)
    finally:
        if child is not None and child.poll() is None:
            child.kill()
            child.wait()
        src.close()
    assert middle.get("SIGXFSZ", 0) - before.get("SIGXFSZ", 0) == 3    # caught, still counted
    assert middle.get("SIGSYS", 0) == before.get("SIGSYS", 0)          # ignored: not counted
    assert "SIGUSR1" not in middle                                      # not a fatal signal
    assert after["SIGKILL"] - middle["SIGKILL"] >= 1                    # others may kill too
    assert dict(exit_.attributes)["linux.process.exit.signal"] == "SIGKILL"
