"""The OpenTelemetry Collector's hostmetrics receiver, written down as data.

Transcribed from opentelemetry-collector-contrib,
receiver/hostmetricsreceiver/internal/scraper/<scraper>/metadata.yaml (2025-2026 versions, checked
against the generated config.schema.yaml and documentation.md of each scraper), for the scrapers
hostagent implements. Tests use it as the expectation for what our scrapers emit, so it must stay
independent of the code it checks: it imports nothing from agent/.

For each metric: unit, instrument ("sum" or "gauge"), value type ("int" or "double"),
monotonic (sums only), attributes in metadata order with their allowed values (ANY = any string),
and whether the metric is enabled by default. Every sum is cumulative.
"""
from __future__ import annotations

from dataclasses import dataclass

ANY = None  # the attribute takes any string value


@dataclass(frozen=True)
class MetricSpec:
    unit: str
    instrument: str  # "sum" | "gauge"
    value_type: str  # "int" | "double"
    monotonic: bool = False
    attributes: tuple = ()  # ((name, allowed values tuple or ANY), ...)
    enabled: bool = True
    linux: bool = True  # False: the Collector only emits it on other platforms


def _sum(unit, value_type, monotonic, attributes=(), enabled=True, linux=True):
    return MetricSpec(unit, "sum", value_type, monotonic, tuple(attributes), enabled, linux)


def _gauge(unit, value_type, attributes=(), enabled=True, linux=True):
    return MetricSpec(unit, "gauge", value_type, False, tuple(attributes), enabled, linux)


# --- attribute definitions, as in the metadata.yaml `attributes:` sections ------------------------

CPU = ("cpu", ANY)  # "cpu0", "cpu1", ...
CPU_STATE = ("state", ("idle", "interrupt", "nice", "softirq", "steal", "system", "user", "wait"))

DISK_DEVICE = ("device", ANY)
DISK_DIRECTION = ("direction", ("read", "write"))

FS_ATTRS = (("device", ANY), ("mode", ANY), ("mountpoint", ANY), ("type", ANY))
FS_STATE = ("state", ("free", "reserved", "used"))

MEMORY_STATE = ("state", ("buffered", "cached", "inactive", "free", "slab_reclaimable",
                          "slab_unreclaimable", "used"))
HUGEPAGES_STATE = ("system.memory.linux.hugepages.state", ("free", "used"))

NET_DEVICE = ("device", ANY)
NET_DIRECTION = ("direction", ("receive", "transmit"))
NET_PROTOCOL = ("protocol", ("tcp",))
NET_STATE = ("state", ANY)

PAGING_DEVICE = ("device", ANY)
PAGING_DIRECTION = ("direction", ("page_in", "page_out"))
PAGING_STATE = ("state", ("cached", "free", "used"))
PAGING_TYPE = ("type", ("major", "minor"))

PROCESSES_STATUS = ("status", ("blocked", "daemon", "detached", "idle", "locked", "orphan", "paging",
                               "running", "sleeping", "stopped", "system", "unknown", "zombies"))

PROCESS_STATE = ("state", ("system", "user", "wait"))
PROCESS_DIRECTION = ("direction", ("read", "write"))
PROCESS_PAGING_FAULT_TYPE = ("type", ("major", "minor"))
PROCESS_CONTEXT_SWITCH_TYPE = ("type", ("involuntary", "voluntary"))


SCRAPERS: dict = {
    "cpu": {
        "system.cpu.time": _sum("s", "double", True, (CPU, CPU_STATE)),
        "system.cpu.utilization": _gauge("1", "double", (CPU, CPU_STATE), enabled=False),
        "system.cpu.physical.count": _sum("{cpu}", "int", False, enabled=False),
        "system.cpu.logical.count": _sum("{cpu}", "int", False, enabled=False),
        "system.cpu.frequency": _gauge("Hz", "double", (CPU,), enabled=False),
    },
    "disk": {
        "system.disk.io": _sum("By", "int", True, (DISK_DEVICE, DISK_DIRECTION)),
        "system.disk.operations": _sum("{operations}", "int", True, (DISK_DEVICE, DISK_DIRECTION)),
        "system.disk.io_time": _sum("s", "double", True, (DISK_DEVICE,)),
        "system.disk.operation_time": _sum("s", "double", True, (DISK_DEVICE, DISK_DIRECTION)),
        "system.disk.weighted_io_time": _sum("s", "double", True, (DISK_DEVICE,)),
        "system.disk.pending_operations": _sum("{operations}", "int", False, (DISK_DEVICE,)),
        "system.disk.merged": _sum("{operations}", "int", True, (DISK_DEVICE, DISK_DIRECTION)),
    },
    "filesystem": {
        "system.filesystem.usage": _sum("By", "int", False, FS_ATTRS + (FS_STATE,)),
        "system.filesystem.inodes.usage": _sum("{inodes}", "int", False, FS_ATTRS + (FS_STATE,)),
        "system.filesystem.utilization": _gauge("1", "double", FS_ATTRS, enabled=False),
    },
    "load": {
        "system.cpu.load_average.1m": _gauge("{thread}", "double"),
        "system.cpu.load_average.5m": _gauge("{thread}", "double"),
        "system.cpu.load_average.15m": _gauge("{thread}", "double"),
    },
    "memory": {
        "system.memory.usage": _sum("By", "int", False, (MEMORY_STATE,)),
        "system.memory.utilization": _gauge("1", "double", (MEMORY_STATE,), enabled=False),
        "system.memory.limit": _sum("By", "int", False, enabled=False),
        "system.memory.page_size": _gauge("By", "int", enabled=False),
        "system.linux.memory.available": _sum("By", "int", False, enabled=False),
        "system.linux.memory.dirty": _sum("By", "int", False, enabled=False),
        "system.memory.linux.shared": _sum("By", "int", False, enabled=False),
        "system.memory.linux.hugepages.limit": _sum("{page}", "int", False, enabled=False),
        "system.memory.linux.hugepages.page_size": _gauge("By", "int", enabled=False),
        "system.memory.linux.hugepages.reserved": _gauge("{page}", "int", enabled=False),
        "system.memory.linux.hugepages.surplus": _gauge("{page}", "int", enabled=False),
        "system.memory.linux.hugepages.usage": _sum("{page}", "int", False, (HUGEPAGES_STATE,),
                                                    enabled=False),
        "system.memory.linux.hugepages.utilization": _gauge("1", "double", (HUGEPAGES_STATE,),
                                                            enabled=False),
    },
    "network": {
        "system.network.connections": _sum("{connections}", "int", False, (NET_PROTOCOL, NET_STATE)),
        "system.network.dropped": _sum("{packets}", "int", True, (NET_DEVICE, NET_DIRECTION)),
        "system.network.errors": _sum("{errors}", "int", True, (NET_DEVICE, NET_DIRECTION)),
        "system.network.io": _sum("By", "int", True, (NET_DEVICE, NET_DIRECTION)),
        "system.network.packets": _sum("{packets}", "int", True, (NET_DEVICE, NET_DIRECTION)),
        "system.network.conntrack.count": _sum("{entries}", "int", False, enabled=False),
        "system.network.conntrack.max": _sum("{entries}", "int", False, enabled=False),
    },
    "paging": {
        "system.paging.usage": _sum("By", "int", False, (PAGING_DEVICE, PAGING_STATE)),
        "system.paging.operations": _sum("{operations}", "int", True, (PAGING_DIRECTION, PAGING_TYPE)),
        "system.paging.faults": _sum("{faults}", "int", True, (PAGING_TYPE,)),
        "system.paging.utilization": _gauge("1", "double", (PAGING_DEVICE, PAGING_STATE), enabled=False),
    },
    "processes": {
        "system.processes.count": _sum("{processes}", "int", False, (PROCESSES_STATUS,)),
        "system.processes.created": _sum("{processes}", "int", True),
    },
    "system": {
        "system.uptime": _gauge("s", "double"),
    },
    "process": {
        "process.cpu.time": _sum("s", "double", True, (PROCESS_STATE,)),
        "process.cpu.utilization": _gauge("1", "double", (PROCESS_STATE,), enabled=False),
        "process.memory.usage": _sum("By", "int", False),
        "process.memory.virtual": _sum("By", "int", False),
        "process.memory.utilization": _gauge("1", "double", enabled=False),
        "process.disk.io": _sum("By", "int", True, (PROCESS_DIRECTION,)),
        "process.disk.operations": _sum("{operations}", "int", True, (PROCESS_DIRECTION,), enabled=False),
        "process.paging.faults": _sum("{faults}", "int", True, (PROCESS_PAGING_FAULT_TYPE,), enabled=False),
        "process.signals_pending": _sum("{signals}", "int", False, enabled=False),
        "process.threads": _sum("{threads}", "int", False, enabled=False),
        "process.open_file_descriptors": _sum("{count}", "int", False, enabled=False),
        "process.handles": _sum("{count}", "int", False, enabled=False, linux=False),
        "process.context_switches": _sum("{count}", "int", True, (PROCESS_CONTEXT_SWITCH_TYPE,),
                                         enabled=False),
        "process.uptime": _gauge("s", "double", enabled=False),
    },
}

# The process scraper emits each process as its own resource. name -> (value type, enabled by default)
PROCESS_RESOURCE_ATTRIBUTES: dict = {
    "process.pid": ("int", True),
    "process.parent_pid": ("int", True),
    "process.executable.name": ("string", True),
    "process.executable.path": ("string", True),
    "process.command": ("string", True),
    "process.command_line": ("string", True),
    "process.owner": ("string", True),
    "process.cgroup": ("string", False),
}

# Not from metadata.yaml (where `state` is any string): the TCP state names the Collector's network
# scraper reports on Linux (its allTCPStates list); each is reported, with 0 when absent.
LINUX_TCP_STATES = ("CLOSE_WAIT", "CLOSE", "CLOSING", "DELETE", "ESTABLISHED", "FIN_WAIT_1",
                    "FIN_WAIT_2", "LAST_ACK", "LISTEN", "SYN_SENT", "SYN_RECV", "TIME_WAIT")


def default_metrics(scraper: str) -> set:
    return {name for name, spec in SCRAPERS[scraper].items() if spec.enabled}


def optional_metrics(scraper: str) -> set:
    return {name for name, spec in SCRAPERS[scraper].items() if not spec.enabled}
