"""Loading one probe in a test the way the agent's loader does, and reading what the kernel skipped."""
import contextlib

from agent.sources.ebpf.loader import (ON, Plan, ProbeStatus, load_one, recursion_misses, tracepoint_available,
                                       unload)


@contextlib.contextmanager
def attached(probe, available=tracepoint_available):
    """`probe` compiled, attached and set up by the loader, on the tracepoints `available` allows;
    always unloaded afterwards."""
    tps = probe.select_tracepoints(available)
    assert tps is not None, f"{probe.name}: its tracepoints are missing on this kernel"
    loaded, status = load_one(Plan(probe, ProbeStatus(probe.name, tps, ON, "", probe.description), tps))
    assert loaded is not None, f"{probe.name} did not load: {status.reason}"
    try:
        yield probe
    finally:
        unload([loaded])


def misses(p, *programs) -> int:
    """Events the kernel skipped for the named programs of probe `p` (another BPF program was running)."""
    return recursion_misses(p.obj, programs)
