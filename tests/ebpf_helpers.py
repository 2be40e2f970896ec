"""Loading one probe in a test the way the agent's loader does, and reading what the kernel skipped."""
import contextlib

from agent.sources.ebpf.loader import ON, Plan, ProbeStatus, load_one, tracepoint_available, unload


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
    """Runs the kernel skipped for the named programs because another BPF program (anyone's) was
    running on that CPU: `recursion_misses` in each program's fdinfo (0 on kernels without it)."""
    total = 0
    for name, fn in p.bpf.funcs.items():
        if name.decode().split("__")[-1] in programs:
            with open(f"/proc/self/fdinfo/{fn.fd}") as f:
                for line in f:
                    if line.startswith("recursion_misses:"):
                        total += int(line.split(":")[1])
    return total
