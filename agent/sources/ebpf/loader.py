"""Loading probes, after checking what the host allows: CO-RE objects through libbpf, or bcc.

For every probe in the registry: is it enabled (config, then the probe's default); may this
process load BPF (root or CAP_BPF + CAP_PERFMON, or CAP_SYS_ADMIN); which loader (`ebpf.loader`):
  - core: the probe's precompiled object bpf/build/<name>.bpf.o (bpf/build.sh), relocated by the
    system libbpf against the running kernel's BTF (/sys/kernel/btf/vmlinux); no compiler, no headers;
  - bcc: bpf/<name>.bpf.c compiled on the host by bcc's clang against the kernel headers;
  - auto (the default): core where the kernel has BTF and the object is there, else bcc.
Is tracefs mounted and does each tracepoint exist. `check()` answers that without loading
anything; `load()` then loads each probe as its own BPF object (so one failing probe never stops
the others), attaches one program per chosen tracepoint, verifies the attachment and calls the
probe's setup() with the loaded object. Whatever fails turns that probe off with the reason, and
nothing raises for conditions of the host. bcc (LLVM, some 45 MB) is imported on the bcc path only.

Also here: the kernel facts probes build their parameters from -- a tracepoint's fields (its
format file) and a kernel struct member's offset or an enum's value from the running kernel's
BTF, parsed by libbpf in C (btf.py parses object BTF, and vmlinux only where libbpf is missing),
or kept from an earlier start with the BTF subset CO-RE objects relocate against (corebtf.py).
"""
from __future__ import annotations

import contextlib
import ctypes
import functools
import json
import logging
import os
import struct
import tempfile
import threading
import time
from dataclasses import dataclass, field, replace
from typing import Mapping, Optional

import numpy as np

from agent.logs import timestamp
from agent.procfs.workload import WorkloadResolver
from agent.sources.ebpf import btf as btf_
from agent.sources.ebpf import corebtf, libbpf
from agent.sources.ebpf import early as early_
from agent.sources.ebpf.btf import BTF_VMLINUX
from agent.sources.ebpf.maps import BpfMap, prog_stats, program_btf
from agent.sources.ebpf.probe import BPF_DIR, Probe

log = logging.getLogger("hostagent.ebpf")

INCLUDE_DIR = os.path.join(BPF_DIR, "include")
TRACEFS_ROOTS = ("/sys/kernel/tracing", "/sys/kernel/debug/tracing")

CAP_SYS_ADMIN = 21
CAP_PERFMON = 38
CAP_BPF = 39

ON, OFF = "on", "off"
AUTO, CORE, BCC = "auto", "core", "bcc"           # ebpf.loader


@dataclass(frozen=True)
class ProbeStatus:
    """One probe on this host: "on" (loaded, or for check(): would load) or "off" and why."""
    name: str
    tracepoints: tuple
    state: str
    reason: str = ""
    description: str = ""
    loader: str = ""          # core or bcc: the loader that loads (or would load) it
    fallback: str = ""        # ebpf.loader auto chose bcc: why not CO-RE

    @property
    def on(self) -> bool:
        return self.state == ON

    def as_dict(self) -> dict:
        return {"name": self.name, "state": self.state, "loader": self.loader, "reason": self.reason,
                "fallback": self.fallback, "tracepoints": list(self.tracepoints), "description": self.description}


# --- host features ---------------------------------------------------------------------------

def _cap_eff() -> Optional[int]:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("CapEff:"):
                    return int(line.split()[1], 16)
    except OSError:
        pass
    return None


def privilege_problem() -> Optional[str]:
    """Why this process may not load tracing BPF programs, or None if it may."""
    caps = _cap_eff()
    if caps is None:
        return "cannot read capabilities from /proc/self/status"
    has = lambda cap: bool(caps >> cap & 1)  # noqa: E731
    if has(CAP_SYS_ADMIN) or (has(CAP_BPF) and has(CAP_PERFMON)):
        return None
    who = "root without capabilities" if os.geteuid() == 0 else f"uid {os.geteuid()}"
    return f"not permitted: running as {who}; needs root or CAP_BPF and CAP_PERFMON (CapEff={caps:#x})"


def bcc_problem() -> Optional[str]:
    try:
        import bcc  # noqa: F401
    except Exception as e:  # ImportError, or OSError when libbcc is missing
        return f"bcc is not importable ({type(e).__name__}: {e}); install python3-bpfcc"
    return None


def kernel_headers() -> Optional[str]:
    """The kernel source/headers directory bcc will compile against, or None."""
    release = os.uname().release
    for path in (os.environ.get("BCC_KERNEL_SOURCE"), f"/lib/modules/{release}/build",
                 f"/lib/modules/{release}/source"):
        if path and os.path.isdir(os.path.join(path, "include")):
            return path
    if os.path.exists("/sys/kernel/kheaders.tar.xz"):
        return "/sys/kernel/kheaders.tar.xz"
    return None


def headers_problem() -> Optional[str]:
    if kernel_headers() is not None:
        return None
    release = os.uname().release
    return (f"no kernel headers: /lib/modules/{release}/build is missing (bcc compiles probes "
            f"against them; install linux-headers for this kernel or the nearest version)")


def btf_problem(path: str = BTF_VMLINUX) -> Optional[str]:
    """Why the running kernel's BTF is not usable for CO-RE relocation, or None."""
    try:
        with open(path, "rb") as f:
            magic = f.read(2)
    except OSError:
        return f"no BTF ({path} is missing: kernel built without CONFIG_DEBUG_INFO_BTF)"
    if magic != b"\x9f\xeb":
        return f"no BTF ({path} is not BTF)"
    return None


def core_problem(probe: Probe, object_dir: str = "") -> Optional[str]:
    """Why `probe` cannot be loaded as a CO-RE object from `object_dir` here, or None."""
    problem = btf_problem()
    if problem is None and not os.path.isfile(probe.object_file(object_dir)):
        problem = "object missing (run bpf/build.sh)"
    return problem or libbpf.problem()


def tracefs_root() -> Optional[str]:
    for root in TRACEFS_ROOTS:
        if os.path.isdir(os.path.join(root, "events")):
            return root
    return None


def tracepoint_available(tp: str) -> bool:
    """`tp` ("category:event") exists in tracefs."""
    root = tracefs_root()
    if root is None or ":" not in tp:
        return False
    category, event = tp.split(":", 1)
    return os.path.isdir(os.path.join(root, "events", category, event))


@dataclass(frozen=True)
class TracepointField:
    name: str
    type: str
    offset: int
    size: int
    signed: bool

    @property
    def data_loc(self) -> bool:
        return self.type.startswith("__data_loc")


@functools.lru_cache(maxsize=None)
def tracepoint_fields(tp: str) -> Mapping[str, TracepointField]:
    """The arguments of tracepoint `tp` on this kernel (its format file), {} if unreadable."""
    root = tracefs_root()
    if root is None:
        return {}
    category, event = tp.split(":", 1)
    try:
        with open(os.path.join(root, "events", category, event, "format")) as f:
            text = f.read()
    except OSError:
        return {}
    fields = {}
    for line in text.splitlines():
        line = line.strip()
        if not line.startswith("field:"):
            continue
        parts = dict(p.strip().split(":", 1) for p in line.rstrip(";").split(";") if ":" in p)
        decl = parts["field"].strip()
        name = decl.split()[-1].split("[")[0]
        if name.startswith("common_"):
            continue
        fields[name] = TracepointField(name, decl[:decl.rfind(name)].strip(), int(parts["offset"]),
                                       int(parts["size"]), parts.get("signed", "0").strip() == "1")
    return fields


# --- BTF: member offsets and enumerator values of the running kernel ------------------------

_kernel_btfs: dict = {}
_kernel_btf_lock = threading.Lock()
_facts_kept: Optional[dict] = None      # {(kind, a, b): answer} for the running kernel, while load() keeps them


def _kernel_btf(path: str):
    """The running kernel's BTF, parsed once per plan or load and dropped when done
    (_drop_kernel_btf): by libbpf, in C, where libbpf.so.1 loads (about 7 ms); else by btf.py
    (about 40 ms; the bcc fallback on a host without libbpf.so.1). Both answer member_offset()
    and enumerator() alike. Probes' threads share it."""
    with _kernel_btf_lock:
        btf = _kernel_btfs.get(path)
        if btf is None:
            btf = libbpf.KernelBtf.open(path) if libbpf.problem() is None else btf_.Btf.from_file(path)
            _kernel_btfs[path] = btf
        return btf


def _drop_kernel_btf() -> None:
    with _kernel_btf_lock:
        for btf in _kernel_btfs.values():
            if isinstance(btf, libbpf.KernelBtf):
                btf.close()
        _kernel_btfs.clear()


def btf_facts(members=(), enumerators=(), path: str = BTF_VMLINUX) -> Optional[dict]:
    """From one parse of the running kernel's BTF, keeping only the answers: {(struct, member):
    byte offset} for each pair in `members` (members of anonymous structs and unions included)
    and {(enum, enumerator): value} for each pair in `enumerators`, None where the kernel has no
    such thing. None as a whole when there is no readable BTF. During load() with a cache, the
    answers kept for this kernel are used and no BTF is parsed when they are all there."""
    keys = [("member", s, m) for s, m in members] + [("enumerator", e, n) for e, n in enumerators]
    with _kernel_btf_lock:
        kept = _facts_kept if path == BTF_VMLINUX else None
        if kept is not None and all(k in kept for k in keys):
            return {k[1:]: kept[k] for k in keys}
    try:
        btf = _kernel_btf(path)
        answers = {k: btf.member_offset(k[1], k[2]) if k[0] == "member" else btf.enumerator(k[2], k[1])
                   for k in keys}
    except (OSError, btf_.BtfError, libbpf.LibbpfError, struct.error, ValueError) as e:
        log.debug("btf_unavailable path=%s error=%s", path, e)
        return None
    with _kernel_btf_lock:
        if kept is not None and kept is _facts_kept:
            kept.update(answers)
    return {k[1:]: v for k, v in answers.items()}


def btf_member_offset(struct_name: str, member: str, path: str = BTF_VMLINUX) -> Optional[int]:
    """Byte offset of `member` in `struct struct_name` of the running kernel, or None when there
    is no BTF or no such member."""
    facts = btf_facts([(struct_name, member)], path=path)
    return None if facts is None else facts[(struct_name, member)]


# --- the registry, filtered by config --------------------------------------------------------

def _probes(cfg, probes, workloads=None) -> dict:
    """{name: Probe}: the given classes created with their config section (and `workloads`, the
    resolver a run would give them), or instances as they are."""
    return {name: (p.create(cfg.probes.get(name), workloads=workloads) if isinstance(p, type) else p)
            for name, p in probes.items()}


def _config_problem(cfg, name: str, probe: Probe) -> Optional[str]:
    if not cfg.enabled:
        return "disabled in config (ebpf.enabled: false)"
    switch = cfg.probes.get(name)
    enabled = probe.default_enabled if switch is None else switch.enabled
    if not enabled:
        if switch is None:
            return f"off by default (enable with ebpf.probes.{name}.enabled: true)"
        return f"disabled in config (ebpf.probes.{name}.enabled: false)"
    return None


@dataclass
class Plan:
    probe: Probe
    status: ProbeStatus
    tracepoints: tuple = ()
    object_dir: str = ""          # ebpf.object_dir, for the CO-RE loader
    params: Optional[dict] = None  # probe.params(tracepoints), when load() asked them already
    kernel_btf: str = BTF_VMLINUX  # what the CO-RE loader relocates against: the kernel's BTF or its subset
    early: Optional[early_.Early] = None    # CO-RE objects loaded before the agent was imported


class HostCheck:
    """The host's answers, each asked once per plan and only when a probe needs it."""

    @functools.cached_property
    def problem(self) -> Optional[str]:
        problem = privilege_problem()
        if problem is None and tracefs_root() is None:
            problem = "tracefs is not mounted (mount -t tracefs tracefs /sys/kernel/tracing)"
        return problem

    @functools.cached_property
    def bcc_problem(self) -> Optional[str]:
        return bcc_problem() or headers_problem()

    def loader(self, mode: str, probe: Probe, object_dir: str = "") -> tuple[str, Optional[str], str]:
        """(loader, why it cannot load `probe`, why not CO-RE when auto falls back to bcc) under
        `ebpf.loader: mode`."""
        if mode == BCC:
            return BCC, self.bcc_problem, ""
        core = core_problem(probe, object_dir)
        if mode == CORE or core is None:
            return CORE, core, ""
        if self.bcc_problem is None:
            return BCC, None, core
        return "", f"{core}; bcc fallback: {self.bcc_problem}", ""


def plan(cfg, probes, workloads=None) -> list[Plan]:
    """Each probe with its loader, the tracepoints it would use and whether it would load."""
    host = HostCheck()
    plans = []
    for name, probe in _probes(cfg, probes, workloads).items():
        tps = tuple(probe.tracepoints)
        loader, fallback = "", ""
        reason = _config_problem(cfg, name, probe) or host.problem
        if reason is None:
            loader, reason, fallback = host.loader(cfg.loader, probe, cfg.object_dir)
        if reason is None:
            chosen = probe.select_tracepoints(tracepoint_available)
            if chosen is None:
                missing = [tp for tp in tps if not tracepoint_available(tp)]
                reason = "tracepoint missing on this kernel: " + ", ".join(missing or tps)
            else:
                tps = tuple(chosen)
        status = ProbeStatus(name, tps, OFF if reason else ON, reason or "", probe.description, loader, fallback)
        plans.append(Plan(probe, status, tps, cfg.object_dir))
    return plans


def check(cfg, probes) -> list[ProbeStatus]:
    """Which probes would load on this host and why the others would not. Loads nothing. The
    probes are made as a run makes them (with a workload resolver under ebpf.attribution:
    workload: the keyed variants may use more tracepoints)."""
    workloads = WorkloadResolver() if cfg.attribution == "workload" else None
    try:
        return [p.status for p in plan(cfg, probes, workloads)]
    finally:
        _drop_kernel_btf()
        if workloads is not None:
            workloads.close()


# --- loading ---------------------------------------------------------------------------------

class LoadedObject:
    """A probe's BPF object in the kernel, whichever loader put it there: its maps by name (the
    map layer, maps.py) and its programs' fds; `directory`: where its object file and what was
    built with it are (bpf/build.sh's output; "" under bcc)."""
    loader = ""
    directory = ""
    attached_at = 0.0       # wall-clock time its programs were attached

    def __init__(self):
        self._maps: dict = {}

    def map(self, name: str) -> BpfMap:
        """The map `name` (KeyError if the object has none)."""
        m = self._maps.get(name)
        if m is None:
            m = self._maps[name] = BpfMap.from_fd(self._map_fd(name), name)
        return m

    def _map_fd(self, name: str) -> int:
        raise NotImplementedError

    def program_fds(self) -> dict:
        """{program name: fd}."""
        raise NotImplementedError

    def btf(self) -> Optional["btf_.Btf"]:
        """The object's BTF (its types), or None where it has none or it cannot be read."""
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError


class CoreObject(LoadedObject):
    """`recipe`: how it was loaded (early.recipe); `attached_at`: when (wall clock); `early`:
    whether before the agent was imported (early.py)."""
    loader = CORE

    def __init__(self, obj: "libbpf.BpfObject", recipe: dict, attached_at: float, early: bool = False):
        super().__init__()
        self.obj, self.recipe, self.attached_at, self.early = obj, recipe, attached_at, early
        self.directory = os.path.dirname(obj.path)

    def _map_fd(self, name: str) -> int:
        return self.obj.map_fd(name)

    def program_fds(self) -> dict:
        return self.obj.program_fds()

    def btf(self) -> Optional["btf_.Btf"]:
        data = self.obj.btf_data()
        return btf_.Btf(data) if data else None

    def close(self) -> None:
        self.obj.close()


class BccObject(LoadedObject):
    loader = BCC

    def __init__(self, bpf):
        super().__init__()
        self.bpf = bpf
        self.attached_at = time.time()

    def _map_fd(self, name: str) -> int:
        return self.bpf[name.encode()].map_fd

    def program_fds(self) -> dict:
        return {name.decode(): fn.fd for name, fn in self.bpf.funcs.items()}

    def btf(self) -> Optional["btf_.Btf"]:
        # bcc keeps its BTF to itself: ask the kernel, which takes CAP_SYS_ADMIN (EPERM under
        # CAP_BPF + CAP_PERFMON alone; then nothing is checked)
        fds = list(self.program_fds().values())
        try:
            return program_btf(fds[0]) if fds else None
        except PermissionError:
            return None

    def close(self) -> None:
        self.bpf.cleanup()


@dataclass
class LoadedProbe:
    probe: Probe
    obj: LoadedObject
    status: ProbeStatus
    tracepoints: tuple = ()
    rings: list = field(default_factory=list)


_stderr_lock = threading.Lock()


class _CapturedStderr:
    """Collect what the compiler writes on fd 2 during a load, then pass it on to the real
    stderr (other threads' output is delayed, not lost) and keep it for the probe's reason."""

    def __enter__(self):
        _stderr_lock.acquire()
        self.text = ""
        self._file = tempfile.TemporaryFile()
        self._saved = os.dup(2)
        os.dup2(self._file.fileno(), 2)
        return self

    def __exit__(self, *exc):
        try:
            os.dup2(self._saved, 2)
            os.close(self._saved)
            self._file.seek(0)
            raw = self._file.read()
            self._file.close()
            if raw:
                os.write(2, raw)
            self.text = raw.decode("utf-8", "replace")
        finally:
            _stderr_lock.release()
        return False


def _first_error(text: str) -> str:
    """The compiler's first error message in `text`, or ""."""
    for line in text.splitlines():
        if "error:" in line:
            return line.split("error:", 1)[1].strip()
    return ""


def cflags(params: Mapping[str, object]) -> list:
    """A probe's parameters as bcc -D flags: True defines the name, False leaves it out."""
    flags = []
    for name, value in params.items():
        if value is True:
            flags.append(f"-D{name}")
        elif value is not False:
            value = int(value)
            flags.append(f"-D{name}={value:#x}ULL" if value > 0x7FFFFFFF else f"-D{name}={value}")
    return flags


def _load_bcc(probe: Probe, tps: tuple, params: Mapping) -> BccObject:
    from bcc import BPF
    flags = [f"-I{INCLUDE_DIR}", *cflags(params)]
    error = None
    with _CapturedStderr() as err:
        try:
            bpf = BPF(src_file=probe.source_file.encode(), cflags=flags)
        except Exception as e:
            error = e
    if error is not None:
        detail = _first_error(err.text)
        if "Failed to compile" in str(error):
            raise RuntimeError(f"compile failed: {detail or error}") from None
        raise RuntimeError(f"load failed: {error}" + (f" ({detail})" if detail else "")) from None
    try:
        attached = {k.decode() if isinstance(k, bytes) else k for k in bpf.tracepoint_fds}
        # raw tracepoints (cheaper per event) are keyed by the bare event name
        raw = {k.decode() if isinstance(k, bytes) else k for k in bpf.raw_tracepoint_fds}
        missing = [tp for tp in tps if tp not in attached and tp.partition(":")[2] not in raw]
        if missing:
            raise RuntimeError("not attached to " + ", ".join(missing))
    except BaseException:
        bpf.cleanup()
        raise
    return BccObject(bpf)


def _libbpf_error(text: str) -> str:
    """The line of libbpf's output that says why: the verifier's last words before its
    "processed N insns" summary, else libbpf's last line."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    for i, line in enumerate(lines):
        if line.startswith("processed ") and " insns " in line and i:
            return "verifier: " + lines[i - 1]
    return lines[-1] if lines else ""


def _load_core(probe: Probe, tps: tuple, params: Mapping, object_dir: str = "",
               kernel_btf: str = BTF_VMLINUX, messages: bool = True, early: Optional[early_.Early] = None) -> CoreObject:
    """Load the probe's object (early.load_object): one program per chosen tracepoint, its
    parameters (.rodata) and map sizes, relocated against `kernel_btf`, attached; `messages`: with
    libbpf's messages logged, and in the error. `early`: where the same load may have been done
    already, before the agent was imported."""
    r = early_.recipe(probe.object_file(object_dir), kernel_btf, probe.programs(tps), params, probe.map_sizes(),
                      probe.unused_maps(tps))
    obj = early.take(probe.name, r) if early is not None else None
    if obj is not None:
        return CoreObject(obj, r, early.attached_at, early=True)
    try:
        obj = early_.load_object(r, messages)
    except libbpf.LibbpfError as e:
        detail = _libbpf_error(e.log)
        raise RuntimeError(f"{e}" + (f" ({detail[:200]})" if detail else "")) from None
    return CoreObject(obj, r, time.time())


def mirror_layout(mirror) -> tuple:
    """(size, [(member, offset, size)]) of a ctypes Structure or a numpy structured dtype."""
    if isinstance(mirror, type) and issubclass(mirror, ctypes.Structure):
        return ctypes.sizeof(mirror), [(n, getattr(mirror, n).offset, getattr(mirror, n).size)
                                   for n, *_ in mirror._fields_]
    dtype = np.dtype(mirror)
    members = sorted(((n, off, dt.itemsize) for n, (dt, off, *_) in dtype.fields.items()), key=lambda m: m[1])
    return dtype.itemsize, members


def layout_problems(probe: Probe, obj: LoadedObject) -> list:
    """Where the probe's Python mirrors (Probe.structs) differ from the structs in the object's
    BTF, or are missing from it. A CO-RE object's BTF has the types of its maps and globals: map
    key and value structs, and ring records through their HA_RECORD global (bpf/include/
    hostagent.h). bcc's BTF keeps only its maps' types: there a struct it lacks is not checked."""
    if not probe.structs:
        return []
    btf = obj.btf()
    if btf is None:
        return [] if obj.loader == BCC else ["the object has no BTF"]
    problems = []
    for name, mirror in probe.structs.items():
        tid = btf.find(name)
        if tid is None:
            if obj.loader != BCC:
                problems.append(f"struct {name} is not in the object's BTF (declare it with HA_RECORD)")
            continue
        c = btf.size(tid), btf.layout(tid)
        py = mirror_layout(mirror)
        if c != py:
            diff = [f"{a} != {b}" for a, b in zip(c[1], py[1]) if a != b][:1] or [f"size {c[0]} != {py[0]}"]
            problems.append(f"struct {name} (C) and its Python mirror differ: {diff[0]}")
    return problems


def load_one(plan_: Plan) -> tuple[Optional[LoadedProbe], ProbeStatus]:
    probe, status, tps = plan_.probe, plan_.status, plan_.tracepoints
    if not status.on:
        return None, status

    def off(reason: str) -> ProbeStatus:
        return ProbeStatus(status.name, tps, OFF, reason, status.description, status.loader, status.fallback)

    try:
        params = plan_.params if plan_.params is not None else probe.params(tps)
        if status.loader == CORE:
            obj = _load_core_once_more_if_it_fails(plan_, params)
        else:
            obj = _load_bcc(probe, tps, params)
    except Exception as e:
        return None, off(str(e))
    try:
        problems = layout_problems(probe, obj)
    except (OSError, btf_.BtfError, struct.error, ValueError) as e:
        problems = [f"cannot read the object's BTF: {e}"]
    if problems:
        obj.close()
        return None, off("layout mismatch: " + "; ".join(problems))
    try:
        probe.setup(obj)
    except Exception as e:
        try:
            probe.close()
        except Exception:
            pass
        obj.close()
        return None, off(f"setup failed: {e}")
    return LoadedProbe(probe, obj, status, tps, list(getattr(probe, "ring_buffers", ()))), status


def _load_core_once_more_if_it_fails(plan_: Plan, params: Mapping) -> CoreObject:
    """_load_core() against the plan's BTF, without libbpf's messages (libbpf.py says why). If
    that fails, once more against the kernel's whole BTF with them, so that a failure says why;
    where the first load was against the kept subset and this one succeeds, the subset is
    dropped, to be made again."""
    probe, tps = plan_.probe, plan_.tracepoints
    try:
        return _load_core(probe, tps, params, plan_.object_dir, plan_.kernel_btf, messages=False, early=plan_.early)
    except Exception as e:
        first = e
    obj = _load_core(probe, tps, params, plan_.object_dir, BTF_VMLINUX)
    if plan_.kernel_btf != BTF_VMLINUX:
        log.warning("ebpf_btf_subset_failed probe=%s path=%s error=%s (loaded against %s; the subset is made "
                    "again)", plan_.status.name, plan_.kernel_btf, json.dumps(str(first)), BTF_VMLINUX)
        with contextlib.suppress(OSError):
            os.unlink(plan_.kernel_btf)
    return obj


def _load_all(plans: list, threads: int) -> list:
    """load_one() of every plan, in plan order. CO-RE objects load `threads` at a time: most of a
    load is libbpf parsing BTF, relocating, and the kernel verifying, all without the GIL. bcc's
    compile one after the other (one LLVM in memory at a time)."""
    results = [None] * len(plans)

    def load(i):
        try:
            results[i] = load_one(plans[i])
        except Exception as e:          # load_one turns what a host can cause into a reason
            log.exception("ebpf_load_failed probe=%s", plans[i].status.name)
            results[i] = (None, replace(plans[i].status, state=OFF, reason=f"load failed: {e}"))

    early_.in_threads(load, [i for i, p in enumerate(plans) if p.status.on and p.status.loader == CORE], threads,
                      "ebpf-load")
    return [r if r is not None else load_one(p) for r, p in zip(results, plans)]


def load(cfg, probes, threads: int = 0, cache: Optional[corebtf.Cache] = None,
         early: Optional[early_.Early] = None) -> tuple[list[LoadedProbe], list[ProbeStatus]]:
    """Load, attach and set up every probe that check() says would load; CO-RE objects by
    `threads` threads at once (default: early.load_threads()). With a `cache` (the
    state directory's, corebtf.Cache), the kernel facts and the subset of the kernel's BTF kept
    for this kernel are used, and what was missing is kept for the next start once every probe
    is attached, with the recipes of the CO-RE loads when `early` names the config (early.py).
    `early`: objects loaded before the agent was imported, taken where their recipe is the one
    this load would use; the others are closed."""
    global _facts_kept
    started = time.monotonic()
    threads = threads or early_.load_threads()
    kept = cache.facts() if cache is not None else None
    subset = cache.core_btf() if cache is not None else None
    try:
        with _kernel_btf_lock:
            _facts_kept = None if kept is None else dict(kept)
        plans = plan(cfg, probes)
        for p in plans:         # the kernel facts they need from one BTF parse, dropped before loading
            p.kernel_btf, p.early = subset or BTF_VMLINUX, early
            if p.status.on:
                try:
                    p.params = p.probe.params(p.tracepoints)
                except Exception:       # load_one asks again and turns the probe off with the error
                    pass
    finally:
        _drop_kernel_btf()
        with _kernel_btf_lock:
            facts, _facts_kept = _facts_kept, None
    try:
        results = _load_all(plans, threads)
    finally:
        unused = early.close() if early is not None else []
    if early is not None and early.note:       # a head start missed: the probes loaded as usual
        log.debug("ebpf_early_start note=%s", json.dumps(early.note))
    if unused:
        log.info("ebpf_early_unused probes=%s (attached before the config was read; this config loads them "
                 "otherwise or not at all)", ",".join(unused))
    loaded = [lp for lp, _ in results if lp is not None]
    statuses = [status for _, status in results]
    core = [lp for lp in loaded if lp.obj.loader == CORE]
    log_statuses(statuses, time.monotonic() - started, "subset" if core and subset else "kernel" if core else "",
                 max((lp.obj.attached_at for lp in loaded), default=0.0), sum(lp.obj.early for lp in core),
                 early.seconds if early is not None else 0.0)
    if cache is not None:
        made = bool(core) and not (subset and os.path.exists(subset))    # none, or dropped by a failed load
        plan_ = {lp.status.name: {**lp.obj.recipe, "kernel_btf": cache.core_path} for lp in core}
        keep_for_next_start(cache, facts if facts != kept else None, made, early.config if early else "", plan_)
    if any(s.loader == BCC for s in statuses):
        release_compiler_memory()
    else:
        malloc_trim()
    return loaded, statuses


def keep_for_next_start(cache: corebtf.Cache, facts: Optional[dict], subset: bool, config: str = "",
                        plan_: Optional[dict] = None) -> None:
    """Write the kernel facts (when new ones were asked), make the BTF subset (when there was
    none) and keep the recipes of the CO-RE loads `plan_` for the config with digest `config`,
    into `cache`; what fails is logged, and the next start parses the kernel's BTF again."""
    started = time.monotonic()
    try:
        if facts is not None:
            cache.save_facts(facts)
        path = cache.build_core_btf() if subset else None
        if config:
            cache.save_plan(config, plan_ or {})
        if path:
            log.info("ebpf_btf_subset_saved path=%s bytes=%d seconds=%.3f", path, os.path.getsize(path),
                     time.monotonic() - started)
    except (OSError, corebtf.SubsetError, btf_.BtfError, struct.error, ValueError) as e:
        log.warning("ebpf_btf_cache_failed dir=%s error=%s (the next start parses the kernel's BTF per probe)",
                    cache.dir, json.dumps(str(e)))


COMPILER_LIBRARIES = ("libLLVM", "libclang")
MADV_DONTNEED, MADV_PAGEOUT = 4, 21


def malloc_trim() -> None:
    """Give the heap's free pages back to the kernel: what libbpf freed after parsing the kernel's
    BTF (some 10 MB a parse, in the loading threads' arenas: once per object on a start without
    the kept subset), or the compiler."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except AttributeError:                    # not glibc
        pass


def release_compiler_memory() -> None:
    """After compiling, give back what only the compiler needed: the heap it freed (malloc_trim)
    and the LLVM/clang library pages it touched, some 80 MB. Their code is dropped from this
    process (MADV_DONTNEED: code is never written, so it is read again from the file if a reload
    compiles); their other pages are paged out where no other process maps them (MADV_PAGEOUT).
    Without this an agent keeps ~110 MB it no longer uses."""
    malloc_trim()
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    try:
        with open("/proc/self/maps") as f:
            maps = f.read().splitlines()
    except OSError:
        return
    for line in maps:
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and os.path.basename(fields[5]).startswith(COMPILER_LIBRARIES):
            start, end = (int(x, 16) for x in fields[0].split("-"))
            advice = MADV_DONTNEED if fields[1] == "r-xp" else MADV_PAGEOUT
            libc.madvise(start, end - start, advice)    # best effort: EINVAL on old kernels


def program_stats(obj: LoadedObject, programs=None) -> tuple[int, int, int]:
    """(run_time_ns, run_cnt, recursion_misses) summed over the object's programs (all, or those
    whose tracepoint event is named in `programs`). Run time and count grow only while BPF stats
    are enabled (maps.enable_stats); recursion_misses are the events skipped because another BPF
    program was running on that CPU."""
    total = [0, 0, 0]
    for name, fd in obj.program_fds().items():
        if programs is None or name.split("__")[-1] in programs:
            try:
                st = prog_stats(fd)
            except OSError:
                continue
            total[0] += st.run_time_ns
            total[1] += st.run_cnt
            total[2] += st.recursion_misses
    return total[0], total[1], total[2]


def recursion_misses(obj: LoadedObject, programs=None) -> int:
    """Events the kernel skipped for this object's programs (all, or those named)."""
    return program_stats(obj, programs)[2]


def unload(loaded: list[LoadedProbe]) -> None:
    for lp in loaded:
        try:
            lp.probe.close()
        except Exception:
            log.exception("probe_close_failed probe=%s", lp.status.name)
        try:
            lp.obj.close()
        except Exception:
            log.exception("bpf_cleanup_failed probe=%s", lp.status.name)


def log_statuses(statuses: list[ProbeStatus], seconds: float, btf: str = "", attached_at: float = 0.0,
                 early: int = 0, early_seconds: float = 0.0) -> None:
    """The load's outcome; `seconds`: from load()'s start to every probe attached and set up;
    `btf`: what CO-RE objects relocated against (`subset`: the state directory's, corebtf.py;
    `kernel`: the kernel's whole BTF); `attached_at`: when the last probe was attached (wall
    clock); `early`: how many were attached before the agent was imported, in `early_seconds`
    (early.py)."""
    on = [s.name for s in statuses if s.on]
    off = [s for s in statuses if not s.on]
    log.info("ebpf_probes on=%s off=%s seconds=%.3f%s%s%s", ",".join(on) or "-", ",".join(s.name for s in off) or "-",
             seconds, f" btf={btf}" if btf else "",
             f" attached={timestamp(attached_at)}" if attached_at else "",
             f" early={early} early_seconds={early_seconds:.3f}" if early else "")
    if off:
        log.warning("ebpf_probes_off %s", " ".join(f"{s.name}={json.dumps(s.reason)}" for s in off))
    fallbacks = [s for s in statuses if s.fallback]
    if fallbacks:       # bcc costs a compile per probe and LLVM's memory: say why CO-RE was not used
        log.info("ebpf_bcc_fallback %s", " ".join(f"{s.name}={json.dumps(s.fallback)}" for s in fallbacks))


def format_table(statuses: list[ProbeStatus]) -> str:
    """The `hostagent probes` table: a probe per line with its state, its loader (core or bcc;
    "-" when none can load it), then its tracepoints when it is on or the reason when it is off
    (`--json` has both)."""
    rows = [("PROBE", "STATE", "LOADER", "TRACEPOINTS / REASON")]
    rows += [(s.name, s.state, s.loader or "-", " ".join(s.tracepoints) if s.on else s.reason)
             for s in statuses]
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    return "\n".join("  ".join([*(f"{r[i]:<{widths[i]}}" for i in range(3)), r[3]]).rstrip() for r in rows)
