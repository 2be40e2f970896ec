"""Block device numbers -> names, for the probes and scrapers that report per device."""
from __future__ import annotations

import os
from typing import Optional

MINOR_BITS = 20     # the kernel's dev_t: major << 20 | minor


class DeviceNames:
    """Block device number -> name (vda, nvme0n1, dm-0), from /sys/dev/block/MAJ:MIN/uevent;
    looked up again on a miss so hot-plugged devices get their names (a miss is not kept, so
    what is kept is bounded by the host's devices)."""

    def __init__(self, sysfs: str = "/sys/dev/block"):
        self.sysfs = sysfs
        self._names: dict = {}

    def name(self, dev: int) -> str:
        """The name of the kernel's dev_t `dev`; "MAJ:MIN" when it has none."""
        return self.number(f"{dev >> MINOR_BITS}:{dev & ((1 << MINOR_BITS) - 1)}")

    def number(self, number: str) -> str:
        """The name of device "MAJ:MIN" (digits only: it is a path component); the number itself
        when it has none."""
        cached = self._names.get(number)
        if cached is not None:
            return cached
        name = self._read(number)
        if name is None:
            return number                   # gone or not yet visible: not kept
        self._names[number] = name
        return name

    def _read(self, number: str) -> Optional[str]:
        try:
            with open(os.path.join(self.sysfs, number, "uevent")) as f:
                for line in f:
                    if line.startswith("DEVNAME="):
                        return line.strip().partition("=")[2]
        except OSError:
            return None
        return None
