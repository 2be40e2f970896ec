"""Every probe the agent knows, by name: a probe is bpf/<name>.bpf.c plus its Probe subclass.

Adding a probe is one line in PROBES. The order is the order of `hostagent probes`.
"""
from __future__ import annotations

import importlib
import inspect

from agent.sources.ebpf.oom import OomProbe
from agent.sources.ebpf.probe import Probe
from agent.sources.ebpf.process import ProcessProbe
from agent.sources.ebpf.signals import SignalsProbe


def _optional(name: str):
    """The Probe subclass named `name` in agent/sources/ebpf/<name>.py, or None while that module
    does not exist yet. Any other error in the module is raised."""
    module_name = f"agent.sources.ebpf.{name}"
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name == module_name:
            return None
        raise
    for obj in vars(module).values():
        if inspect.isclass(obj) and issubclass(obj, Probe) and getattr(obj, "name", "") == name:
            return obj
    return None


PROBES = {
    "runqlat": _optional("runqlat"),
    "biolatency": _optional("biolatency"),
    "syscalls": _optional("syscalls"),
    "tcp": _optional("tcp"),
    "process": ProcessProbe,
    "oom": OomProbe,
    "signals": SignalsProbe,
}
PROBES = {name: cls for name, cls in PROBES.items() if cls is not None}
