"""Every probe the agent knows, by name: a probe is bpf/<name>.bpf.c plus its Probe subclass.

Adding a probe is one line in PROBES. The order is the order of `hostagent probes`.
"""
from __future__ import annotations

from agent.sources.ebpf.biolatency import BiolatencyProbe
from agent.sources.ebpf.cgroups import CgroupsProbe
from agent.sources.ebpf.oom import OomProbe
from agent.sources.ebpf.process import ProcessProbe
from agent.sources.ebpf.runqlat import RunqlatProbe
from agent.sources.ebpf.signals import SignalsProbe
from agent.sources.ebpf.syscalls import SyscallsProbe
from agent.sources.ebpf.tcp import TcpProbe

PROBES = {
    "runqlat": RunqlatProbe,
    "biolatency": BiolatencyProbe,
    "syscalls": SyscallsProbe,
    "tcp": TcpProbe,
    "cgroups": CgroupsProbe,
    "process": ProcessProbe,
    "oom": OomProbe,
    "signals": SignalsProbe,
}
