"""signals: fatal signals generated, counted in the kernel by signal (bpf/signals.bpf.c).

Which signals count: a signal is counted when signal:signal_generate reports it queued to its
target (result = delivered: not ignored by the target, not already pending) and it is one of
FATAL_SIGNALS -- SIGKILL, which cannot be caught, and the signals whose default action ends the
process by a fault, an abort or a termination request (signal(7) "Term" or "Core"). Signals with
a terminating default that are conventionally used as notifications (SIGUSR1, SIGUSR2, SIGALRM,
SIGVTALRM, SIGPROF, SIGIO, SIGPWR) and the real-time signals are left out. The tracepoint does not
say whether the target has a handler, so apart from SIGKILL a counted signal may have been caught;
processes that a signal actually ended are counted by the process probe
(system.linux.process.exits {exit.class: signal}).
"""
from __future__ import annotations

import signal as _signal

from agent.model import Metric, MetricKind, NumberPoint
from agent.sources.ebpf.probe import Probe

FATAL_SIGNALS = (
    _signal.SIGHUP, _signal.SIGINT, _signal.SIGQUIT, _signal.SIGILL, _signal.SIGTRAP,
    _signal.SIGABRT, _signal.SIGBUS, _signal.SIGFPE, _signal.SIGKILL, _signal.SIGSEGV,
    _signal.SIGPIPE, _signal.SIGTERM, _signal.SIGSTKFLT, _signal.SIGXCPU, _signal.SIGXFSZ,
    _signal.SIGSYS,
)

METRIC = "system.linux.signals.fatal"


def signal_name(sig: int) -> str:
    """SIGKILL for 9; SIGRTMIN+n for real-time signals; SIG<n> for anything else."""
    try:
        return _signal.Signals(sig).name
    except ValueError:
        pass
    if _signal.SIGRTMIN <= sig <= _signal.SIGRTMAX:
        return f"SIGRTMIN+{sig - _signal.SIGRTMIN}"
    return f"SIG{sig}"


def signal_mask(signals) -> int:
    mask = 0
    for sig in signals:
        if not 0 < int(sig) < 64:
            raise ValueError(f"signal {sig} is outside 1..63")
        mask |= 1 << int(sig)
    return mask


class SignalsProbe(Probe):
    name = "signals"
    description = "fatal signals generated, by signal (counter)"
    tracepoints = ("signal:signal_generate",)
    default_enabled = True
    metrics = (METRIC,)

    def __init__(self, signals=FATAL_SIGNALS):
        self.signals = tuple(sorted(int(s) for s in signals))

    def params(self, tracepoints: tuple) -> dict:
        return {"HA_FATAL_SIGNALS": signal_mask(self.signals)}

    def setup(self, obj) -> None:
        super().setup(obj)
        self.table = obj.map("fatal_signals")

    def counts(self) -> dict:
        """{signal number: signals counted since load}."""
        return {sig: self.table.sum(sig) for sig in self.signals}

    def collect(self, now_ns: int, start_ns: int) -> list[Metric]:
        counts = self.counts()
        points = [NumberPoint((("signal", signal_name(sig)),), n, start_ns, now_ns)
                  for sig, n in counts.items() if n or sig == _signal.SIGKILL]
        if not points:
            return []
        return [Metric(METRIC, "Fatal signals generated (queued to their target), by signal.",
                       "{signal}", MetricKind.SUM, points, monotonic=True)]
