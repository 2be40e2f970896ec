"""BTF, the kernel's type format: the running kernel's (/sys/kernel/btf/vmlinux), an object file's
and a loaded BPF object's (maps.program_btf) read the same way.

    Btf(raw)                          parse a standalone BTF blob (linux/btf.h)
      .find(name, kind) -> type id    first complete struct / union by name
      .member_offset(struct, member)  byte offset, through anonymous structs and unions
      .enumerator(name, enum)         value of an enum constant (of that enum)
      .layout(type id or name)        [(member, byte offset, byte size)] of a struct
      .size(type id)

Layouts are what the probes' Python mirrors (ctypes keys, numpy ring records) are checked
against when a probe loads (loader.check_layouts), so a record or key struct changed in C and not in
Python turns the probe off with the difference instead of decoding garbage.
"""
from __future__ import annotations

import struct
from typing import Optional, Union


INT, PTR, ARRAY, STRUCT, UNION, ENUM, FWD, TYPEDEF, VOLATILE, CONST, RESTRICT = range(1, 12)
FUNC, FUNC_PROTO, VAR, DATASEC, FLOAT, DECL_TAG, TYPE_TAG, ENUM64 = range(12, 20)
# bytes following the 12-byte btf_type header: fixed, and per vlen entry
_EXTRA = {INT: 4, ARRAY: 12, VAR: 4, DECL_TAG: 4}
_PER_VLEN = {STRUCT: 12, UNION: 12, ENUM: 8, FUNC_PROTO: 8, DATASEC: 12, ENUM64: 12}
_QUALIFIERS = frozenset({TYPEDEF, VOLATILE, CONST, RESTRICT, TYPE_TAG})
_TYPE = struct.Struct("<III")
MAX_BTF = 64 << 20            # bound on BTF read from the kernel (vmlinux BTF is ~5 MB)
BTF_VMLINUX = "/sys/kernel/btf/vmlinux"     # the running kernel's


class BtfError(Exception):
    pass


class Btf:
    def __init__(self, data: bytes):
        if len(data) < 24:
            raise BtfError("not BTF (too short)")
        magic, _version, _flags, hdr_len, type_off, type_len, str_off, str_len = \
            struct.unpack_from("<HBBIIIII", data, 0)
        if magic != 0xEB9F:
            raise BtfError(f"not BTF (magic {magic:#x})")
        self.data = data
        self._strings = hdr_len + str_off
        self._strings_end = self._strings + str_len
        self.offsets = [0]                  # type id -> position; id 0 is void
        # names are kept as string-section offsets (BTF strings are deduplicated) and only the
        # names asked for are looked up: decoding every name would triple the parse time
        self._by_name: dict = {}            # (name offset, kind) -> first struct/union type id
        self._enums: list = []              # (position, vlen, kind) of every enum
        self._enumerators: Optional[dict] = None
        pos, end = hdr_len + type_off, hdr_len + type_off + type_len
        if end > len(data) or self._strings_end > len(data):
            raise BtfError("BTF sections run past its end")
        unpack, offsets, by_name, enums = _TYPE.unpack_from, self.offsets, self._by_name, self._enums
        extra = [12 + _EXTRA.get(k, 0) for k in range(32)]
        per_vlen = [_PER_VLEN.get(k, 0) for k in range(32)]
        while pos < end:
            name_off, info, _ = unpack(data, pos)
            kind, vlen = (info >> 24) & 0x1F, info & 0xFFFF
            offsets.append(pos)
            if kind == STRUCT or kind == UNION:
                if name_off and (name_off, kind) not in by_name:
                    by_name[(name_off, kind)] = len(offsets) - 1
            elif kind == ENUM or kind == ENUM64:
                enums.append((pos, vlen, kind))
            pos += extra[kind] + per_vlen[kind] * vlen

    def _name_offsets(self, name: str) -> list:
        """Where `name` sits in the string section (a NUL-terminated string)."""
        found, needle = [], b"\0" + name.encode() + b"\0"
        at = self.data.find(needle, self._strings - 1, self._strings_end)
        while at >= 0:
            found.append(at + 1 - self._strings)
            at = self.data.find(needle, at + 1, self._strings_end)
        if self.data[self._strings:self._strings + len(needle) - 1] == needle[1:]:
            found.append(0)
        return found

    @classmethod
    def from_file(cls, path: str) -> "Btf":
        with open(path, "rb") as f:
            return cls(f.read(MAX_BTF))

    def name_at(self, off: int) -> str:
        start = self._strings + off
        return self.data[start:self.data.index(b"\0", start, self._strings_end)].decode()

    def _header(self, tid: int) -> tuple:
        if not 0 < tid < len(self.offsets):
            raise BtfError(f"no type {tid}")
        name_off, info, size_or_type = _TYPE.unpack_from(self.data, self.offsets[tid])
        return name_off, (info >> 24) & 0x1F, info, size_or_type

    def find(self, name: str, kind: int = STRUCT) -> Optional[int]:
        ids = [self._by_name[(off, kind)] for off in self._name_offsets(name) if (off, kind) in self._by_name]
        return min(ids) if ids else None

    def enumerator(self, name: str, enum: Optional[str] = None) -> Optional[int]:
        """Value of the enum constant `name` (of `enum enum` when given; else the first one)."""
        if enum is not None:
            owners = set(self._name_offsets(enum))
            for pos, vlen, kind in self._enums:
                if _TYPE.unpack_from(self.data, pos)[0] in owners:
                    value = self._enum_values(pos, vlen, kind).get(name)
                    if value is not None:
                        return value
            return None
        if self._enumerators is None:           # {name offset: value}, first definition wins
            self._enumerators = {}
            for pos, vlen, kind in self._enums:
                for e_name, value in self._enum_entries(pos, vlen, kind):
                    self._enumerators.setdefault(e_name, value)
        values = [self._enumerators[off] for off in self._name_offsets(name) if off in self._enumerators]
        return values[0] if values else None

    def _enum_entries(self, pos: int, vlen: int, kind: int):
        """(name offset, value) of each constant of the enum at `pos`."""
        for i in range(vlen):
            if kind == ENUM:
                yield struct.unpack_from("<Ii", self.data, pos + 12 + 8 * i)
            else:
                e_name, lo, hi = _TYPE.unpack_from(self.data, pos + 12 + 12 * i)
                yield e_name, hi << 32 | lo

    def _enum_values(self, pos: int, vlen: int, kind: int) -> dict:
        return {self.name_at(off): value for off, value in self._enum_entries(pos, vlen, kind)}

    def resolve(self, tid: int) -> int:
        """`tid` with typedefs and qualifiers stripped."""
        for _ in range(64):
            _, kind, _, ref = self._header(tid)
            if kind not in _QUALIFIERS:
                return tid
            tid = ref
        raise BtfError("typedef loop")

    def size(self, tid: int, depth: int = 0) -> int:
        if depth > 32:
            raise BtfError("arrays nest too deep")
        tid = self.resolve(tid)
        _, kind, _, size = self._header(tid)
        if kind == PTR:
            return 8
        if kind == ARRAY:
            elem, _index, nelems = struct.unpack_from("<III", self.data, self.offsets[tid] + 12)
            return nelems * self.size(elem, depth + 1)
        return size

    def _members(self, tid: int):
        _, kind, info, _ = self._header(tid)
        if kind not in (STRUCT, UNION):
            raise BtfError(f"type {tid} is not a struct or union")
        pos = self.offsets[tid]
        for i in range(info & 0xFFFF):
            name_off, mtype, moff = _TYPE.unpack_from(self.data, pos + 12 + 12 * i)
            bit = moff & 0xFFFFFF if info >> 31 else moff       # kind_flag: bitfield size in the top byte
            yield (self.name_at(name_off) if name_off else ""), mtype, bit // 8

    def member_offset(self, struct_name: str, member: str) -> Optional[int]:
        tid = self.find(struct_name)
        return None if tid is None else self._find_member(tid, member, 0, 0)

    def _find_member(self, tid: int, member: str, base: int, depth: int) -> Optional[int]:
        if depth > 32:                      # anonymous members nest a few levels; a cycle is broken BTF
            raise BtfError("anonymous members nest too deep")
        for name, mtype, off in self._members(tid):
            if name == member:
                return base + off
            if not name:
                inner = self.resolve(mtype)
                if self._header(inner)[1] in (STRUCT, UNION):
                    found = self._find_member(inner, member, base + off, depth + 1)
                    if found is not None:
                        return found
        return None

    def layout(self, type_: Union[int, str]) -> list:
        """[(member name, byte offset, byte size)] of a struct (by type id or name)."""
        tid = self.find(type_) if isinstance(type_, str) else self.resolve(type_)
        if tid is None:
            raise BtfError(f"no struct {type_}")
        return [(name, off, self.size(mtype)) for name, mtype, off in self._members(tid)]
