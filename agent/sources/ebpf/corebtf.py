"""The part of the running kernel's BTF that our CO-RE objects relocate against, kept per kernel
in the state directory, so that a start does not make libbpf parse the kernel's 5 MB of BTF once
per object (about 7 ms each, and some 10 MB of heap each while it lasts).

    subset(kernel, objects) -> bytes       a standalone BTF with what the objects' CO-RE
                                           relocations can look at in `kernel`, and nothing else
    Cache(state_dir, object_dir)           <state_dir>/kernel-btf/<kernel>/: that subset for the
                                           objects in `object_dir`, the kernel facts the probes
                                           asked for (loader.btf_facts), and the recipes of the
                                           last start's CO-RE loads (early.py), as JSON

The subset is what `bpftool gen min_core_btf` makes, in Python (the host has no bpftool): for every
relocation of every object, each kernel type libbpf would consider as a candidate (same kind, same
name without its ___flavour suffix), and in it the members the relocation's access path names,
followed through anonymous structs and unions as libbpf follows them. Every type these reach is
kept; a struct or union reached only as a member's or pointer's type is kept as a shell (its name
and size, no members): libbpf compares such types by kind and name alone. So libbpf computes the
same relocations from the subset as from the whole BTF, which tests/test_corebtf.py checks on the
loaded programs' tags. Relocations that need the kernel's type ids or its whole types
(bpf_core_type_id_kernel, bpf_core_type_matches) are refused: such an object loads against the
whole BTF.

A cache entry is named after the kernel (release, version and BTF size) and, for the subset,
after the objects' contents and SUBSET_VERSION: a new kernel or a new build makes a new one, and
only the current kernel's entry is kept.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import re
import stat
import struct
import threading
from typing import Iterable, Optional

from agent.sources.ebpf import btf as btf_
from agent.sources.ebpf.btf import (_EXTRA, _PER_VLEN, _QUALIFIERS, ARRAY, BTF_VMLINUX, CONST, ENUM, ENUM64, FLOAT,
                                    FUNC_PROTO, FWD, INT, PTR, RESTRICT, STRUCT, TYPE_TAG, TYPEDEF, UNION, VOLATILE,
                                    Btf)

SUBSET_VERSION = 1                  # bump when subset() changes what it keeps
MAX_CACHE_FILE = 16 << 20           # a subset is some KB; the whole kernel BTF some MB
MAX_OBJECT = 64 << 20

# relocation kinds (enum bpf_core_relo_kind)
FIELD_KINDS = range(0, 6)           # byte offset, byte size, exists, signed, lshift, rshift
TYPE_ID_LOCAL, TYPE_ID_TARGET, TYPE_EXISTS, TYPE_SIZE, ENUMVAL_EXISTS, ENUMVAL_VALUE, TYPE_MATCHES = range(6, 13)
UNSUPPORTED = {TYPE_ID_TARGET: "bpf_core_type_id_kernel", TYPE_MATCHES: "bpf_core_type_matches"}

_HEADER = struct.Struct("<III")
MAX_DEPTH = 64                      # anonymous members nest a few levels


class SubsetError(Exception):
    pass


# --- reading an object file ----------------------------------------------------------------

def elf_sections(data: bytes, wanted: Iterable[str]) -> dict:
    """{name: bytes} of the wanted sections of a 64-bit little-endian ELF file."""
    if len(data) < 64 or data[:6] != b"\x7fELF\x02\x01":
        raise SubsetError("not a 64-bit little-endian ELF file")
    shoff, = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)
    if shentsize < 64 or shoff + shnum * shentsize > len(data) or shstrndx >= shnum:
        raise SubsetError("ELF section headers run past the file")

    def header(i):
        name, _type, _flags, _addr, offset, size = struct.unpack_from("<IIQQQQ", data, shoff + i * shentsize)
        if offset + size > len(data):
            raise SubsetError("an ELF section runs past the file")
        return name, offset, size

    _, str_off, str_size = header(shstrndx)
    wanted, found = set(wanted), {}
    for i in range(shnum):
        name_off, offset, size = header(i)
        end = data.find(b"\0", str_off + name_off, str_off + str_size)
        name = data[str_off + name_off:end].decode("ascii", "replace") if end >= 0 else ""
        if name in wanted:
            found[name] = data[offset:offset + size]
    return found


def core_relocations(ext: bytes) -> list:
    """[(type id, access string offset, kind)] of a .BTF.ext section's CO-RE relocations."""
    if len(ext) < 24:
        raise SubsetError(".BTF.ext too short")
    magic, _version, _flags, hdr_len = struct.unpack_from("<HBBI", ext, 0)
    if magic != 0xEB9F:
        raise SubsetError(f".BTF.ext magic {magic:#x}")
    if hdr_len < 32:                    # written before CO-RE relocations existed
        return []
    relo_off, relo_len = struct.unpack_from("<II", ext, 24)
    pos, end = hdr_len + relo_off, hdr_len + relo_off + relo_len
    if relo_len == 0:
        return []
    if end > len(ext) or relo_len < 4:
        raise SubsetError(".BTF.ext relocations run past the section")
    record_size, = struct.unpack_from("<I", ext, pos)
    if record_size < 16:
        raise SubsetError(f".BTF.ext relocation records of {record_size} bytes")
    pos += 4
    out = []
    while pos + 8 <= end:
        _sec_name, count = struct.unpack_from("<II", ext, pos)
        pos += 8
        if pos + count * record_size > end:
            raise SubsetError(".BTF.ext relocations run past the section")
        for i in range(count):
            _insn, type_id, access, kind = struct.unpack_from("<IIII", ext, pos + i * record_size)
            out.append((type_id, access, kind))
        pos += count * record_size
    return out


# --- the subset ------------------------------------------------------------------------------

def essential_name(name: str) -> str:
    """`name` without a ___flavour suffix (libbpf's bpf_core_essential_name_len)."""
    for i in range(len(name) - 5, -1, -1):
        s = name[i:i + 5]
        if s[0] != "_" and s[1:4] == "___" and s[4] != "_":
            return name[:i + 1]
    return name


def _core_kind(kind: int) -> int:
    return ENUM if kind == ENUM64 else kind     # libbpf matches an enum with an enum64


class _Types:
    """Raw access to a parsed Btf's types."""

    def __init__(self, btf: Btf):
        self.btf, self.data = btf, btf.data

    def header(self, tid: int) -> tuple:
        """(name offset, kind, vlen, kind_flag, size or type) of type `tid`."""
        if not 0 < tid < len(self.btf.offsets):
            raise SubsetError(f"no type {tid}")
        name_off, info, ref = _HEADER.unpack_from(self.data, self.btf.offsets[tid])
        return name_off, (info >> 24) & 0x1F, info & 0xFFFF, info >> 31, ref

    def name(self, tid: int) -> str:
        off = self.header(tid)[0]
        return self.btf.name_at(off) if off else ""

    def skip(self, tid: int) -> int:
        """`tid` with typedefs and modifiers stripped (void stays void)."""
        return self.btf.resolve(tid) if tid else 0

    def members(self, tid: int) -> list:
        """[(name offset, type, raw offset)] of a struct or union."""
        _, _, vlen, _, _ = self.header(tid)
        pos = self.btf.offsets[tid] + 12
        return [_HEADER.unpack_from(self.data, pos + 12 * i) for i in range(vlen)]

    def array(self, tid: int) -> tuple:
        """(element type, index type, element count)."""
        return struct.unpack_from("<III", self.data, self.btf.offsets[tid] + 12)

    def refs(self, tid: int) -> list:
        """The types `tid` refers to, its members' aside."""
        _, kind, vlen, _, ref = self.header(tid)
        if kind in _QUALIFIERS or kind == PTR:
            return [ref]
        if kind == ARRAY:
            elem, index, _ = self.array(tid)
            return [elem, index]
        if kind == FUNC_PROTO:
            pos = self.btf.offsets[tid] + 12
            return [ref] + [struct.unpack_from("<II", self.data, pos + 8 * i)[1] for i in range(vlen)]
        return []


class _Subset:
    def __init__(self, kernel: Btf):
        self.k = _Types(kernel)
        self.keep: set = set()              # kernel type ids kept
        self.members: dict = {}             # struct/union id -> member indices kept
        self._candidates: dict = {}         # (essential name, core kind) -> [kernel type ids]

    # candidates: every kernel type of the kind whose essential name is the local one's
    def index(self, wanted: set) -> None:
        btf = self.k.btf
        names = {}
        for essential, _ in wanted:
            for off in btf._name_offsets(essential):
                names[off] = essential
            needle = b"\0" + essential.encode() + b"___"
            at = btf.data.find(needle, btf._strings - 1, btf._strings_end)
            while at >= 0:                  # kernel names with a flavour suffix match as well
                off = at + 1 - btf._strings
                if essential_name(btf.name_at(off)) == essential:
                    names[off] = essential
                at = btf.data.find(needle, at + 1, btf._strings_end)
        for essential_kind in wanted:
            self._candidates[essential_kind] = []
        unpack, data = _HEADER.unpack_from, btf.data
        for tid in range(1, len(btf.offsets)):
            name_off, info, _ = unpack(data, btf.offsets[tid])
            essential = names.get(name_off)
            if essential is not None:
                found = self._candidates.get((essential, _core_kind((info >> 24) & 0x1F)))
                if found is not None:
                    found.append(tid)

    def candidates(self, essential: str, kind: int) -> list:
        return self._candidates.get((essential, _core_kind(kind)), [])

    def mark_member(self, tid: int, index: int) -> None:
        kept = self.members.setdefault(tid, set())
        kept.add(index)
        ms = self.k.members(tid)
        mtype = self.k.skip(ms[index][1])
        if mtype and self.k.header(mtype)[1] == ARRAY and self.k.array(mtype)[2] == 0:
            kept.add(len(ms) - 1)           # a flexible array only while it stays the last member

    def find_member(self, tid: int, name: str, depth: int = 0) -> Optional[int]:
        """The type of member `name` of composite `tid`, searched through anonymous members as
        libbpf does, with the members on the way marked; None if there is none."""
        if depth > MAX_DEPTH:
            raise SubsetError("anonymous members nest too deep")
        tid = self.k.skip(tid)
        if not tid or self.k.header(tid)[1] not in (STRUCT, UNION):
            return None
        self.keep.add(tid)
        for i, (name_off, mtype, _) in enumerate(self.k.members(tid)):
            if not name_off:
                found = self.find_member(mtype, name, depth + 1)
                if found is not None:
                    self.mark_member(tid, i)
                    return found
            elif self.k.btf.name_at(name_off) == name:
                self.mark_member(tid, i)
                return mtype
        return None

    def follow(self, target: int, local: _Types, local_root: int, access: list) -> None:
        """Walk one candidate along a field relocation's access path (member and array indices of
        the local type), marking what libbpf looks at."""
        ltid = local_root
        for idx in access[1:]:
            lt = local.skip(ltid)
            _, kind, vlen, _, _ = local.header(lt)
            if kind in (STRUCT, UNION):
                if idx >= vlen:
                    raise SubsetError("access index past the local struct")
                name_off, lmtype, _ = local.members(lt)[idx]
                ltid = lmtype
                if not name_off:            # an anonymous local member is not a step of the path
                    continue
                found = self.find_member(target, local.btf.name_at(name_off))
                if found is None:
                    return
                target = found
            elif kind == ARRAY:
                ltid = local.array(lt)[0]
                tt = self.k.skip(target)
                if not tt or self.k.header(tt)[1] != ARRAY:
                    return
                self.keep.add(tt)
                target = self.k.array(tt)[0]
            else:
                raise SubsetError("access path through a scalar")
        self.keep.add(target)

    def close(self) -> list:
        """Every kept type and what it refers to, in kernel order."""
        todo = list(self.keep)
        while todo:
            tid = todo.pop()
            refs = self.k.refs(tid)
            if tid in self.members:
                ms = self.k.members(tid)
                refs += [ms[i][1] for i in self.members[tid]]
            for ref in refs:
                if ref and ref not in self.keep:
                    self.keep.add(ref)
                    todo.append(ref)
        return sorted(self.keep)

    def encode(self) -> bytes:
        ids = self.close()
        new_id = {old: new for new, old in enumerate(ids, 1)}
        new_id[0] = 0
        strings, offsets = bytearray(b"\0"), {"": 0}

        def s(name_off: int) -> int:
            name = self.k.btf.name_at(name_off) if name_off else ""
            if name not in offsets:
                offsets[name] = len(strings)
                strings.extend(name.encode() + b"\0")
            return offsets[name]

        types = bytearray()
        for tid in ids:
            name_off, kind, vlen, kflag, ref = self.k.header(tid)
            pos = self.k.btf.offsets[tid] + 12
            data = self.k.data
            if kind in (STRUCT, UNION):
                kept = sorted(self.members.get(tid, ()))
                body = b"".join(_HEADER.pack(s(m[0]), new_id[m[1]], m[2])
                                for m in (self.k.members(tid)[i] for i in kept))
                vlen, head_ref = len(kept), ref
            elif kind in _QUALIFIERS or kind == PTR:
                body, head_ref = b"", new_id[ref]
            elif kind == ARRAY:
                elem, index, n = self.k.array(tid)
                body, head_ref = struct.pack("<III", new_id[elem], new_id[index], n), ref
            elif kind == FUNC_PROTO:
                params = [struct.unpack_from("<II", data, pos + 8 * i) for i in range(vlen)]
                body, head_ref = b"".join(struct.pack("<II", s(n), new_id[t]) for n, t in params), new_id[ref]
            elif kind == INT:
                body, head_ref = data[pos:pos + 4], ref
            elif kind == ENUM:
                entries = [struct.unpack_from("<Ii", data, pos + 8 * i) for i in range(vlen)]
                body, head_ref = b"".join(struct.pack("<Ii", s(n), v) for n, v in entries), ref
            elif kind == ENUM64:
                entries = [_HEADER.unpack_from(data, pos + 12 * i) for i in range(vlen)]
                body, head_ref = b"".join(_HEADER.pack(s(n), lo, hi) for n, lo, hi in entries), ref
            elif kind in (FWD, FLOAT):
                body, head_ref = b"", ref
            else:                           # FUNC, VAR, DATASEC, DECL_TAG: nothing a relocation reaches
                raise SubsetError(f"unexpected kind {kind} in the subset")
            info = (kflag << 31) | (kind << 24) | vlen
            types += _HEADER.pack(s(name_off), info, head_ref) + body
        header = struct.pack("<HBBIIIII", 0xEB9F, 1, 0, 24, 0, len(types), len(types), len(strings))
        return header + bytes(types) + bytes(strings)


def subset(kernel: Btf, objects: Iterable[bytes]) -> bytes:
    """A standalone BTF of what the CO-RE relocations of `objects` (ELF files' contents) can see
    in `kernel`. SubsetError where an object relocates in a way a subset cannot serve."""
    locals_ = []
    for data in objects:
        sections = elf_sections(data, (".BTF", ".BTF.ext"))
        if ".BTF.ext" not in sections:
            continue
        if ".BTF" not in sections:
            raise SubsetError("relocations without .BTF")
        local = _Types(Btf(sections[".BTF"]))
        locals_.append((local, core_relocations(sections[".BTF.ext"])))
    sub = _Subset(kernel)
    wanted, work = set(), []
    for local, relos in locals_:
        for type_id, access_off, kind in relos:
            if kind in UNSUPPORTED:
                raise SubsetError(f"a relocation by {UNSUPPORTED[kind]}")
            if kind == TYPE_ID_LOCAL:
                continue
            name = local.name(type_id)
            if not name:
                continue                    # libbpf refuses anonymous roots itself
            key = (essential_name(name), _core_kind(local.header(type_id)[1]))
            wanted.add(key)
            work.append((local, type_id, local.btf.name_at(access_off), kind, key))
    sub.index(wanted)
    for local, type_id, access, kind, key in work:
        for cand in sub.candidates(*key):
            sub.keep.add(cand)
            if kind in FIELD_KINDS:
                path = access.split(":")
                if not all(x.isdigit() and len(x) < 10 for x in path):
                    raise SubsetError(f"access string {access[:40]!r}")
                path = [int(x) for x in path]
                sub.follow(cand, local, type_id, path)
    return sub.encode()


# --- checking a kept subset before libbpf sees it --------------------------------------------------

_KINDS = frozenset({INT, PTR, ARRAY, STRUCT, UNION, ENUM, FWD, TYPEDEF, VOLATILE, CONST, RESTRICT, FUNC_PROTO,
                    FLOAT, TYPE_TAG, ENUM64})         # what subset() writes


def check(data: bytes) -> None:
    """SubsetError unless `data` is BTF as subset() writes it, every name and type reference in
    range and no type made of itself but through a pointer. libbpf 1.1 checks less before it
    follows references (a member of a type that does not exist crashes it), and a file in the
    state directory may have been damaged."""
    if len(data) < 24:
        raise SubsetError("too short")
    magic, version, _flags, hdr_len, type_off, type_len, str_off, str_len = struct.unpack_from("<HBBIIIII", data, 0)
    if magic != 0xEB9F or version != 1 or hdr_len != 24:
        raise SubsetError("not BTF version 1")
    types, strings = data[24 + type_off:24 + type_off + type_len], data[24 + str_off:24 + str_off + str_len]
    if len(types) != type_len or len(strings) != str_len or not strings or strings[0] or strings[-1]:
        raise SubsetError("sections out of range or strings not NUL-terminated")
    parsed, pos = [], 0
    while pos < type_len:
        if pos + 12 > type_len:
            raise SubsetError("a type runs past its section")
        name_off, info, ref = _HEADER.unpack_from(types, pos)
        kind, vlen = (info >> 24) & 0x1F, info & 0xFFFF
        if kind not in _KINDS:
            raise SubsetError(f"kind {kind}")
        end = pos + 12 + _EXTRA.get(kind, 0) + _PER_VLEN.get(kind, 0) * vlen
        if end > type_len:
            raise SubsetError("a type runs past its section")
        parsed.append((kind, name_off, ref, types[pos + 12:end], vlen))
        pos = end
    count = len(parsed) + 1
    edges = {}                              # type -> what it is made of, pointers aside

    def ok_name(off):
        if off >= str_len:
            raise SubsetError("a name past the strings")

    def ok_type(tid):
        if tid >= count:
            raise SubsetError(f"a reference to type {tid} of {count - 1}")
        return tid

    for tid, (kind, name_off, ref, body, vlen) in enumerate(parsed, 1):
        ok_name(name_off)
        if kind in _QUALIFIERS:
            edges[tid] = [ok_type(ref)]
        elif kind in (PTR, FUNC_PROTO):
            ok_type(ref)
        elif kind == ARRAY:
            elem, index, _ = struct.unpack_from("<III", body, 0)
            edges[tid] = [ok_type(elem), ok_type(index)]
        for i in range(vlen):
            if kind in (STRUCT, UNION):
                m_name, m_type, _ = _HEADER.unpack_from(body, 12 * i)
                ok_name(m_name)
                ok_type(m_type)
            elif kind == FUNC_PROTO:
                p_name, p_type = struct.unpack_from("<II", body, 8 * i)
                ok_name(p_name)
                ok_type(p_type)
            elif kind in (ENUM, ENUM64):
                ok_name(struct.unpack_from("<I", body, _PER_VLEN[kind] * i)[0])
    state = {}                              # 1: being followed, 2: done
    for root in edges:
        if root in state:
            continue
        stack = [(root, iter(edges[root]))]
        state[root] = 1
        while stack:
            node, refs = stack[-1]
            nxt = next(refs, None)
            if nxt is None:
                state[node] = 2
                stack.pop()
            elif state.get(nxt) == 1:
                raise SubsetError(f"type {nxt} is made of itself")
            elif nxt in edges and nxt not in state:
                state[nxt] = 1
                stack.append((nxt, iter(edges[nxt])))


# --- the cache ---------------------------------------------------------------------------------

def kernel_key(vmlinux: str = BTF_VMLINUX) -> str:
    """Names the running kernel's BTF: its release, build and BTF size."""
    u = os.uname()
    return hashlib.sha256(f"{u.release}\0{u.version}\0{u.machine}\0{os.stat(vmlinux).st_size}".encode()).hexdigest()[:16]


def read_file(path: str, limit: int) -> bytes:
    """A regular file's bytes, at most `limit` of them (SubsetError past that, or for anything but
    a regular file: a FIFO would block the start)."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise SubsetError(f"{path}: not a regular file")
        with open(fd, "rb", closefd=False) as f:
            data = f.read(limit + 1)
    finally:
        os.close(fd)
    if len(data) > limit:
        raise SubsetError(f"{path}: over {limit} bytes")
    return data


def _write(path: str, data: bytes) -> None:
    """All of it or nothing: a crash leaves the old file or none."""
    tmp = os.path.join(os.path.dirname(path), f".tmp-{os.getpid()}-{threading.get_ident()}")
    try:
        with open(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600), "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


class Cache:
    """<state_dir>/kernel-btf/<kernel key>/: `core-<objects key>.btf` (subset() of the kernel for
    the objects in `object_dir`), `facts.json` (loader.btf_facts answers) and `plan.json` (the
    last start's CO-RE recipes, early.py). What cannot be read is treated as absent and written
    again; only the running kernel's directory is kept."""

    def __init__(self, state_dir: str, object_dir: str, vmlinux: str = BTF_VMLINUX):
        self.root = os.path.join(state_dir, "kernel-btf")
        self.object_dir, self.vmlinux = object_dir, vmlinux
        self.dir = os.path.join(self.root, kernel_key(vmlinux))

    def objects(self) -> list:
        return sorted(os.path.join(self.object_dir, n) for n in os.listdir(self.object_dir) if n.endswith(".bpf.o"))

    @functools.cached_property
    def core_path(self) -> str:
        """Where the subset for the objects as they are now is (or would be) kept (their contents
        hashed once per Cache: a start asks before it loads and again when it makes the subset)."""
        h = hashlib.sha256(str(SUBSET_VERSION).encode())
        for path in self.objects():
            h.update(os.path.basename(path).encode() + b"\0")
            h.update(hashlib.sha256(read_file(path, MAX_OBJECT)).digest())
        return os.path.join(self.dir, f"core-{h.hexdigest()[:16]}.btf")

    def core_btf(self) -> Optional[str]:
        """The kept subset's path if there is a readable one for these objects, else None."""
        try:
            path = self.core_path
            check(read_file(path, MAX_CACHE_FILE))
            return path
        except (OSError, SubsetError, struct.error):
            return None

    def build_core_btf(self) -> str:
        """Make the subset from the kernel's whole BTF, keep it, return its path."""
        path = self.core_path
        kernel = Btf(read_file(self.vmlinux, btf_.MAX_BTF))
        data = subset(kernel, (read_file(p, MAX_OBJECT) for p in self.objects()))
        check(data)
        self._prepare()
        for old in os.listdir(self.dir):
            if old.startswith("core-") and os.path.join(self.dir, old) != path:
                with contextlib.suppress(OSError):
                    os.unlink(os.path.join(self.dir, old))
        _write(path, data)
        return path

    def facts(self) -> dict:
        """{[kind, a, b]: answer} kept for this kernel (see loader.btf_facts), or {}."""
        try:
            raw = json.loads(read_file(os.path.join(self.dir, "facts.json"), MAX_CACHE_FILE))
            return {tuple(k): v for k, v in raw if _fact_ok(k, v)}
        except (OSError, SubsetError, ValueError, TypeError, RecursionError):    # RecursionError: nested too deep
            return {}

    def save_facts(self, facts: dict) -> None:
        self._prepare()
        _write(os.path.join(self.dir, "facts.json"), json.dumps(sorted([list(k), v] for k, v in facts.items())).encode())

    @property
    def plan_path(self) -> str:
        return os.path.join(self.dir, "plan.json")

    def plan(self) -> Optional[dict]:
        """The CO-RE recipes kept by the last start (early.py), {"config": its config digest,
        "object_dir": where its objects are, "probes": {name: recipe}}, with only the recipes that
        are well formed; None when there is no readable plan."""
        try:
            raw = json.loads(read_file(self.plan_path, MAX_CACHE_FILE))
            config, object_dir, probes = raw["config"], raw["object_dir"], raw["probes"]
        except (OSError, SubsetError, ValueError, TypeError, KeyError, RecursionError):
            return None
        if not (isinstance(config, str) and isinstance(object_dir, str) and os.path.isabs(object_dir)
                and isinstance(probes, dict)):
            return None
        return {"config": config, "object_dir": object_dir,
                "probes": {name: r for name, r in probes.items() if _recipe_ok(name, r, object_dir)}}

    def save_plan(self, config: str, probes: dict) -> None:
        """Keep `probes` ({name: early.recipe of its load}) for the next start of the config with
        digest `config`, unless they are kept already."""
        plan = {"config": config, "object_dir": self.object_dir, "probes": probes}
        if self.plan() != plan:
            self._prepare()
            _write(self.plan_path, json.dumps(plan, sort_keys=True).encode())

    def _prepare(self) -> None:
        """The kernel's directory, and no other kernel's."""
        os.makedirs(self.dir, mode=0o700, exist_ok=True)
        for name in os.listdir(self.root):
            if os.path.join(self.root, name) != self.dir:
                _remove_tree(os.path.join(self.root, name))


def _remove_tree(path: str) -> None:
    """What a kernel's directory holds: files (a directory in it is another program's: left)."""
    with contextlib.suppress(OSError):
        for name in os.listdir(path):
            with contextlib.suppress(OSError):
                os.unlink(os.path.join(path, name))
        os.rmdir(path)


_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.]{0,127}")


def _recipe_ok(name, r, object_dir: str) -> bool:
    """A kept recipe as early.recipe() writes them, for the object `name` in `object_dir`: names
    as C has them, parameters in 64 bits, map sizes in 32."""
    def names(x):
        return isinstance(x, list) and all(isinstance(n, str) and _NAME.fullmatch(n) for n in x)

    def ints(x, lo, hi):
        return isinstance(x, dict) and names(list(x)) and all(type(v) is int and lo <= v < hi for v in x.values())

    return (isinstance(name, str) and _NAME.fullmatch(name) is not None and isinstance(r, dict)
            and set(r) == {"object", "kernel_btf", "programs", "params", "max_entries", "unused_maps"}
            and r["object"] == os.path.join(object_dir, f"{name}.bpf.o") and isinstance(r["kernel_btf"], str)
            and names(r["programs"]) and names(r["unused_maps"]) and ints(r["params"], -(1 << 63), 1 << 64)
            and ints(r["max_entries"], 1, 1 << 32))


def _fact_ok(key, value) -> bool:
    """A kept fact as btf_facts() answers: a member's byte offset or an enum's value, which BTF
    holds in 64 bits, or None."""
    return (isinstance(key, list) and len(key) == 3 and key[0] in ("member", "enumerator")
            and all(isinstance(x, str) for x in key)
            and (value is None or (type(value) is int and -(1 << 63) <= value < 1 << 64)))
