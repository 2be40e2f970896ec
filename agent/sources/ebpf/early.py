"""CO-RE objects loaded from a recipe, and the probes `hostagent run` attaches before it imports
the rest of the agent.

    recipe(object, kernel_btf, programs, params, max_entries, unused_maps) -> dict
                                  everything a CO-RE load depends on, as JSON-able data
    load_object(recipe) -> libbpf.BpfObject
                                  the one way a CO-RE object is opened, set up, loaded and attached
    attach(config_path, environ) -> Early
                                  the recipes of the last start's CO-RE probes, loaded at once

A start keeps its CO-RE probes' recipes in the state directory, beside the kernel's BTF subset
they relocate against (corebtf.Cache.save_plan), with a digest of the config file they came
from. The next `hostagent run` of an unchanged config loads them before the agent's modules, its
config or its probes' modules are imported (agent/main.py): the probes count and queue events
some 150 ms sooner, which at boot are the exec and exit events of every service starting beside
the agent. The probes' loader (loader.load) then takes each early object whose recipe is the one
it would load, and loads the others itself; what nobody took is closed (Early.close). So an early
object is only ever one the agent would have loaded, and a plan that is stale, missing or not
ours costs the early start, never a probe.

This path imports no numpy and no probe module; the state directory is found without the config
loader (state_dir_of), and a plan is trusted only where the agent's user alone can write it.
"""
from __future__ import annotations

import hashlib
import os
import re
import stat
import threading
import time
from typing import Mapping, Optional

from agent import STATE_DIR
from agent.sources.ebpf import corebtf, libbpf

MAX_CONFIG = 1 << 20                    # bytes of config file hashed; a larger one starts without the plan
LOAD_THREADS = 2    # CO-RE objects loaded at once, at most (here and by loader.load): libbpf and the
                    # verifier run without the GIL; without the kept subset each load parses the
                    # kernel's BTF, some MB of RSS while it lasts: 4 threads added 17-20 MB at the peak

_STATE_DIR_LINE = re.compile(rb"^state_dir[ \t]*:[ \t]*(/[^\s#'\"{}\[\],&*!|>%@`$]*)[ \t]*(?:#[^\n]*)?$", re.M)
_ENV_REF = re.compile(rb"\$\{env:([A-Za-z_][A-Za-z0-9_]*)")


def load_threads() -> int:
    """Threads that load CO-RE objects at once: one per CPU, at most LOAD_THREADS."""
    return min(os.cpu_count() or 1, LOAD_THREADS)


def recipe(object_file: str, kernel_btf: str, programs, params: Mapping, max_entries: Mapping,
           unused_maps) -> dict:
    """A CO-RE load as data: the object file, the BTF it relocates against, the programs kept (the
    others are not loaded), its parameters (.rodata, set where the object has them), map sizes and
    the maps not created. Two loads of equal recipes put the same programs into the kernel."""
    return {"object": object_file, "kernel_btf": kernel_btf, "programs": sorted(programs),
            "params": {k: int(v) for k, v in params.items()}, "max_entries": {k: int(v) for k, v in max_entries.items()},
            "unused_maps": sorted(unused_maps)}


def load_object(r: Mapping, messages: bool = False) -> libbpf.BpfObject:
    """Open, set up, load and attach the object of recipe `r`; `messages`: libbpf's messages logged
    and kept for the error (libbpf.py). Raises LibbpfError, or RuntimeError for a program the
    object lacks."""
    obj = libbpf.BpfObject.open(r["object"], kernel_btf=r["kernel_btf"], messages=messages)
    try:
        programs = obj.programs()
        missing = [name for name in r["programs"] if name not in programs]
        if missing:
            raise RuntimeError(f"{os.path.basename(r['object'])} has no program " + ", ".join(missing))
        for name in programs:
            if name not in r["programs"]:
                obj.set_autoload(name, False)
        # parameters a CO-RE program has no use for (struct offsets: it relocates its own reads;
        # tracepoint field checks: bpf_core_field_exists) are bcc's alone
        layout = obj.rodata_layout()
        obj.set_rodata({k: v for k, v in r["params"].items() if k in layout})
        for name, entries in r["max_entries"].items():
            obj.set_max_entries(name, entries)
        for name in r["unused_maps"]:
            obj.set_autocreate(name, False)
        obj.load()
        obj.attach()
    except BaseException:
        obj.close()
        raise
    return obj


# --- the early start -----------------------------------------------------------------------------

def _config_bytes(path: Optional[str]) -> Optional[bytes]:
    """The config file's bytes (b"": no file given), None when it cannot be read whole or is no
    regular file (the config loader says why, after)."""
    if not path:
        return b""
    try:
        return corebtf.read_file(path, MAX_CONFIG)
    except (OSError, corebtf.SubsetError):
        return None


def _digest(data: Optional[bytes], environ: Mapping[str, str]) -> str:
    if data is None:
        return ""
    h = hashlib.sha256(data)
    for name in sorted(set(_ENV_REF.findall(data))):
        value = environ.get(name.decode())
        h.update(b"\0" + name + (b"=" + value.encode("utf-8", "surrogateescape") if value is not None else b""))
    return h.hexdigest()


def config_digest(path: Optional[str], environ: Mapping[str, str]) -> str:
    """Names a config as `hostagent run` would read it: the file's bytes and the environment
    variables it refers to (${env:NAME}). "" when the file cannot be read whole."""
    return _digest(_config_bytes(path), environ)


def state_dir_of(data: bytes) -> Optional[str]:
    """The state directory a config file's bytes name, without the config loader: its top-level
    `state_dir: /an/absolute/path` line, else STATE_DIR when no line sets it; None when a line sets
    it in a way this does not read (quoted, ${env:...}, flow style): no early start then."""
    lines = _STATE_DIR_LINE.findall(data)
    if len(lines) == 1:
        return lines[0].decode("utf-8", "surrogateescape")
    if not lines and b"state_dir" not in data:
        return STATE_DIR
    return None


def _ours(path: str) -> bool:
    """Whether only this process's user can have written `path`: owned by it (no symbolic link),
    writable by no group or other user."""
    try:
        st = os.lstat(path)
    except OSError:
        return False
    return not stat.S_ISLNK(st.st_mode) and st.st_uid == os.geteuid() and not st.st_mode & 0o022


class Early:
    """CO-RE objects attached before the agent's modules were imported, by probe name, for the
    start of the config with digest `config` (""; none); `attached_at`: the wall-clock time the
    last of them was attached, `seconds` after attach() began; `note`: why there are none, or
    which failed (for the log)."""

    def __init__(self, config: str = "", objects: Optional[dict] = None, attached_at: float = 0.0,
                 seconds: float = 0.0, note: str = ""):
        self.config, self.attached_at, self.seconds, self.note = config, attached_at, seconds, note
        self._objects = dict(objects or {})       # {probe: (recipe, BpfObject)}
        self._lock = threading.Lock()

    def take(self, probe: str, r: Mapping) -> Optional[libbpf.BpfObject]:
        """The early object of `probe` if it was loaded from recipe `r`, once; else None."""
        with self._lock:
            kept = self._objects.get(probe)
            if kept is None or kept[0] != r:
                return None
            del self._objects[probe]
            return kept[1]

    def close(self) -> list:
        """Close the objects nobody took; their probe names."""
        with self._lock:
            objects, self._objects = self._objects, {}
        for _, obj in objects.values():
            obj.close()
        return sorted(objects)


def attach(config_path: Optional[str], environ: Mapping[str, str], threads: int = 0) -> Early:
    """Load the recipes the last start kept for the config at `config_path` (config_digest), `threads`
    at a time (default: load_threads()). Raises nothing: whatever is missing,
    stale or failing leaves its probe to the loader."""
    started, digest = time.monotonic(), ""
    try:
        data = _config_bytes(config_path)
        digest = _digest(data, environ)
        if data is None:
            return Early(digest, note="the config file cannot be read whole")
        state_dir = state_dir_of(data)
        if state_dir is None:
            return Early(digest, note="the config's state_dir is not a plain absolute path")
        plan = corebtf.Cache(state_dir, "").plan()
        if plan is None or plan["config"] != digest:
            return Early(digest, note="no plan kept for this config")
        cache = corebtf.Cache(state_dir, plan["object_dir"])
        for path in (cache.root, cache.dir, cache.plan_path, cache.core_path):
            if not _ours(path):
                return Early(digest, note=f"{path} is not the agent's alone")
        subset = cache.core_btf()
        recipes = {name: r for name, r in plan["probes"].items() if subset and r["kernel_btf"] == subset}
        if not recipes:
            return Early(digest, note="the plan is for other objects or another kernel")
        return _load(digest, recipes, threads or load_threads(), started)
    except Exception as e:      # an early start is a head start, never a reason to fail
        return Early(digest, note=f"{type(e).__name__}: {e}")


def _load(digest: str, recipes: dict, threads: int, started: float) -> Early:
    objects, failed = {}, []

    def load(item):
        name, r = item
        try:
            objects[name] = (r, load_object(r))
        except Exception as e:
            failed.append(f"{name}: {e}")

    in_threads(load, sorted(recipes.items()), threads, "ebpf-early")
    return Early(digest, objects, time.time(), time.monotonic() - started, "; ".join(sorted(failed)))


def in_threads(fn, items: list, threads: int, name: str) -> None:
    """fn(item) for every item, `threads` at a time, this thread one of them (CO-RE loads: libbpf
    and the verifier run without the GIL). `fn` raises nothing."""
    pending, lock = iter(items), threading.Lock()

    def work():
        while True:
            with lock:
                item = next(pending, pending)
            if item is pending:
                return
            fn(item)

    workers = [threading.Thread(target=work, name=name, daemon=True) for _ in range(min(threads, len(items)) - 1)]
    for w in workers:
        w.start()
    work()
    for w in workers:
        w.join()
