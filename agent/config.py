"""YAML -> typed, validated, frozen config: the generic machinery, at the bottom of the imports.

The schema is dataclasses: each component's config sits beside its code, the root `Config` and
the tables of components in agent/components.py, and load()/build() are handed the root class.
One generic builder walks them, so a new key is a new field with a default and a line in
docs/configuration.md (a test checks the two agree).
Layers, lowest first: defaults, the standard OTEL_* environment variables, the config file.
Every error names the key and the fix, and is raised as ConfigError (exit status 2 in the CLI).
"""
from __future__ import annotations

import collections.abc
import dataclasses
import difflib
import math
import os
import re
import stat
import types
import typing
from dataclasses import field
from typing import Any, Literal, Mapping, Optional
from urllib.parse import unquote

import re2
import yaml


MAX_MESSAGE = 1000  # characters of an error message: a hostile key or value is cut, never printed whole


def _one_line(text: str) -> str:
    """`text` as one printable line of at most MAX_MESSAGE characters (control characters,
    line separators and lone surrogates escaped)."""
    text = "".join(c if c.isprintable() else repr(c)[1:-1] for c in text[:2 * MAX_MESSAGE])
    return text if len(text) <= MAX_MESSAGE else text[:MAX_MESSAGE - 3] + "..."


class ConfigError(Exception):
    def __init__(self, key: str, message: str):
        super().__init__(_one_line(f"{key}: {message}" if key else message))
        self.key = key


# --- value types -----------------------------------------------------------------------------

class Duration(float):
    """Seconds, written in config as "250ms", "10s", "5m", "1h"."""
    UNITS = {"ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}

    @classmethod
    def parse(cls, value: Any, key: str) -> "Duration":
        if isinstance(value, str):
            m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)\s*", value, re.ASCII)
            if m:
                seconds = float(m.group(1)) * cls.UNITS[m.group(2)]
                if not math.isfinite(seconds):
                    raise ConfigError(key, f"expected a duration like 10s, 500ms or 5m, got {value.strip()[:20]}... "
                                           "(too large)")
                return cls(seconds)
        raise ConfigError(key, f"expected a duration like 10s, 500ms or 5m, got {value!r}")

    def __str__(self) -> str:
        if self == 0:
            return "0s"
        for unit, scale in (("h", 3600.0), ("m", 60.0), ("s", 1.0)):
            if self >= scale and (self / scale).is_integer():
                return f"{int(self / scale)}{unit}"
        return f"{round(self * 1000, 3):g}ms"


class Size(int):
    """Bytes, written as "256MiB", "1GB", "64KiB" or a plain integer."""
    UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
             "KiB": 2**10, "MiB": 2**20, "GiB": 2**30, "TiB": 2**40}

    @classmethod
    def parse(cls, value: Any, key: str) -> "Size":
        if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
            return cls(value)
        if isinstance(value, str):
            m = re.fullmatch(r"\s*(\d{1,30})\s*(B|KB|MB|GB|TB|KiB|MiB|GiB|TiB)?\s*", value, re.ASCII)
            if m:
                return cls(int(m.group(1)) * cls.UNITS[m.group(2) or ""])
        raise ConfigError(key, f"expected a size like 256MiB, 64KiB or a number of bytes, got {value!r}")

    def __str__(self) -> str:
        for unit in ("TiB", "GiB", "MiB", "KiB"):
            if self and self % self.UNITS[unit] == 0:
                return f"{self // self.UNITS[unit]}{unit}"
        return f"{int(self)}B"


# User regular expressions run on what the host hands us (command lines, process and device
# names), so they run on RE2: time linear in the text whatever the pattern. The bounds keep
# compiling one cheap too (RE2 turns a{1000}{1000} into a million states).
PATTERN_MAX_LENGTH = 1024
PATTERN_MAX_NESTING = 32
PATTERN_MAX_REPEAT = 1000
_REPEAT = re.compile(r"\{(\d*)(?:,(\d*))?\}")


def compile_pattern(pattern: Any):
    """`pattern` compiled with RE2 (google-re2); ValueError saying why if it is not a string, is
    longer, more nested or repeats more than the bounds above, or RE2 rejects it."""
    if not isinstance(pattern, str):
        raise ValueError(f"expected a regular expression as a string, got {type(pattern).__name__}")
    if len(pattern) > PATTERN_MAX_LENGTH:
        raise ValueError(f"longer than {PATTERN_MAX_LENGTH} characters")
    depth = deepest = 0
    escaped = False
    for c in pattern:
        if escaped:
            escaped = False
        elif c == "\\":
            escaped = True
        elif c == "(":
            depth += 1
            deepest = max(deepest, depth)
        elif c == ")":
            depth -= 1
    if deepest > PATTERN_MAX_NESTING:
        raise ValueError(f"groups nested more than {PATTERN_MAX_NESTING} deep")
    for m in _REPEAT.finditer(pattern):
        if any(n and int(n) > PATTERN_MAX_REPEAT for n in m.groups()):
            raise ValueError(f"a repetition count above {PATTERN_MAX_REPEAT}: {m.group(0)[:20]}")
    options = re2.Options()
    options.log_errors = False                     # the error is ours to report, in one line
    try:
        return re2.compile(pattern, options)
    except re2.error as e:
        reason = e.args[0] if e.args else ""
        raise ValueError(reason.decode(errors="replace") if isinstance(reason, bytes) else str(reason)) from None


def show_number(value) -> str:
    """A number as config and docs write it: durations and sizes with their unit."""
    if isinstance(value, (Duration, Size)):
        return str(value)
    if isinstance(value, float):
        return f"{value:g}"
    return str(value) if abs(value) < 10**18 else "a number of more than 18 digits"


def check_ranges(obj, key: str) -> None:
    """Every key of obj.RANGES lies between its bounds (inclusive); an unset optional key passes.
    Each config class owns the ranges of its numeric keys; docs/configuration.md shows them."""
    for name, (low, high) in obj.RANGES.items():
        value = getattr(obj, name)
        if value is not None and not low <= value <= high:
            raise ConfigError(f"{key}.{name}" if key else name, f"must be at least {show_number(low)} and at "
                              f"most {show_number(high)}, got {show_number(value)}")


def check_patterns(patterns, key: str) -> None:
    """Each of `patterns` is one compile_pattern() takes; the error names `key[i]`."""
    if isinstance(patterns, (str, bytes)) or not isinstance(patterns, collections.abc.Iterable):
        raise ConfigError(key, f"expected a list of regular expressions, got {type(patterns).__name__}")
    for i, pattern in enumerate(patterns):
        try:
            compile_pattern(pattern)
        except ValueError as e:
            raise ConfigError(f"{key}[{i}]", f"invalid regular expression {str(pattern)[:80]!r}: {e}") from None


# --- schema ------------------------------------------------------------------------------------

def frozen_dict(**kw) -> Any:
    return field(default_factory=lambda: dict(kw))


MAX_FILE_BYTES = 2**20  # a config file, headers file or PEM file


def read_regular_file(path: str, key: str, limit: int = MAX_FILE_BYTES) -> bytes:
    """The bytes of `path`, a regular file of at most `limit` bytes. Anything else (a FIFO, a device,
    a directory, a bigger file) is a ConfigError naming `key`: reading never blocks, and never takes
    more than `limit` bytes of memory."""
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):  # before opening: opening a FIFO or device has effects
            raise ConfigError(key, f"{path} is not a regular file")
        with open(os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC), "rb") as f:
            if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                raise ConfigError(key, f"{path} is not a regular file")
            data = f.read(limit + 1)
    except OSError as e:
        raise ConfigError(key, f"cannot read {path}: {e.strerror}") from None
    if len(data) > limit:
        raise ConfigError(key, f"{path} is larger than {Size(limit)}")
    return data


def check_writable_dir(path: str, key: str) -> None:
    probe = path
    while not os.path.exists(probe):  # the nearest existing ancestor must let us create the rest
        probe = os.path.dirname(probe)
    if (not os.path.isdir(probe) or not os.access(probe, os.W_OK | os.X_OK)
            or os.statvfs(probe).f_flag & os.ST_RDONLY):
        raise ConfigError(key, f"{path} is not a writable directory")


# --- the generic builder --------------------------------------------------------------------

def did_you_mean(name: str, choices) -> str:
    close = difflib.get_close_matches(name, list(choices), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _convert(tp, value, key: str):
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return None if value is None else _convert(args[0], value, key)
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(key, f"must be one of {', '.join(map(str, choices))}, got {value!r}"
                              + (did_you_mean(str(value), choices) if isinstance(value, str) else ""))
        return value
    if tp in (Duration, Size):
        return tp.parse(value, key)
    if dataclasses.is_dataclass(tp):
        return build(tp, value, key)
    if tp is tuple or origin is tuple:
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ConfigError(key, f"expected a list of strings, got {value!r}")
        return tuple(_text(v, f"{key}[{i}]") for i, v in enumerate(value))
    if origin in (collections.abc.Mapping, dict):
        vtype = typing.get_args(tp)[1]
        if not isinstance(value, dict):
            raise ConfigError(key, f"expected a mapping, got {value!r}")
        return types.MappingProxyType({_text(str(k), f"{key}.{k}"): _convert(vtype, v, f"{key}.{k}")
                                       for k, v in value.items()})
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(key, f"expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(key, f"expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(key, f"expected a number, got {value!r}")
        if isinstance(value, int) and abs(value) > 10**18 or not math.isfinite(value):
            raise ConfigError(key, f"expected a finite number of at most 18 digits, got {show_number(value)}")
        return float(value)
    if tp is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(key, f"expected a string, got {value!r}")
        return _text(str(value), key)
    raise TypeError(f"unsupported config type {tp!r} at {key}")


def _text(value: str, key: str) -> str:
    """A config string: Unicode text (no lone surrogates, e.g. from non-UTF-8 environment bytes)
    without NUL, which no path, name or header can hold."""
    if "\0" in value:
        raise ConfigError(key, "must not contain a NUL character")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ConfigError(key, "must be valid Unicode text (the value holds bytes that are not UTF-8)") from None
    return value


def _hints(cls) -> dict:
    return typing.get_type_hints(cls)  # resolved in the module that defines cls


def _convert_field(f: dataclasses.Field, tp, value, key: str):
    try:
        return _convert(tp, value, key)
    except ConfigError as e:
        if "secret" not in f.metadata:
            raise
        raise ConfigError(e.key, f"expected {f.metadata['secret']}; the value is not shown") from None


def build(cls, raw: Any, key: str = ""):
    """Build dataclass `cls` from a raw mapping, rejecting unknown keys, then validate it."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(key or "config", f"expected a mapping, got {raw!r}")
    hints = _hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for name in raw:
        if name not in fields:
            where = f"{key}.{name}" if key else str(name)
            raise ConfigError(where, "unknown key" + did_you_mean(str(name), fields))
    values = {name: _convert_field(fields[name], hints[name], raw[name], f"{key}.{name}" if key else name)
              for name in raw}
    obj = cls(**values)
    if hasattr(obj, "validate"):
        try:
            obj.validate(key)
        except ConfigError:
            raise
        except Exception as e:
            # a check that fails on a hostile value (a regex engine's limits, an OS call) is still the
            # user's error: one line naming the section, never a traceback
            raise ConfigError(key or "config", f"invalid value ({type(e).__name__}: {e})") from None
    return obj


def schema_keys(cls, prefix: str = ""):
    """(dotted key, default) for every leaf key of the schema `cls` (the root config class), for the
    docs check."""
    hints = _hints(cls)
    for f in dataclasses.fields(cls):
        tp, key = hints[f.name], f"{prefix}{f.name}"
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        if dataclasses.is_dataclass(tp):
            yield from schema_keys(tp, key + ".")
        else:
            yield key, default


# --- environment ------------------------------------------------------------------------------

_ENV_REF = re.compile(r"\$\{env:([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")

# bounds of a YAML document, the file's or an environment variable's: values after every alias is
# expanded (a billion-laughs document stays small on disk) and nesting depth; a real config has
# a few hundred values nested 6 deep
MAX_VALUES = 10_000
MAX_DEPTH = 32
_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def _count_values(text: str, key: str, origin: str) -> int:
    """The values of the YAML `text` with aliases expanded, checked against MAX_VALUES and
    MAX_DEPTH from the parser's events alone (nothing is built); a recursive alias is an error."""
    loader = _Loader(text)
    try:
        open_nodes: list = []  # (anchor, count at its start) of each collection being read
        sizes: dict = {}       # anchor -> values it stands for
        count = 0
        while loader.check_event():
            event = loader.get_event()
            if isinstance(event, (yaml.SequenceStartEvent, yaml.MappingStartEvent)):
                count += 1
                open_nodes.append((event.anchor, count))
                if len(open_nodes) > MAX_DEPTH:
                    raise ConfigError(key, f"{origin}: nested deeper than {MAX_DEPTH} levels")
            elif isinstance(event, (yaml.SequenceEndEvent, yaml.MappingEndEvent)):
                anchor, start = open_nodes.pop()
                if anchor is not None:
                    sizes[anchor] = count - start + 1
            elif isinstance(event, yaml.ScalarEvent):
                count += 1
                if event.anchor is not None:
                    sizes[event.anchor] = 1
            elif isinstance(event, yaml.AliasEvent):
                if any(anchor == event.anchor for anchor, _ in open_nodes):
                    raise ConfigError(key, f"{origin}: the alias *{event.anchor} is inside its own anchor")
                count += sizes.get(event.anchor, 1)  # an undefined alias: the loader says so
            if count > MAX_VALUES:
                raise ConfigError(key, f"{origin}: more than {MAX_VALUES} values with aliases expanded")
        return count
    finally:
        loader.dispose()


def _parse_yaml(text: str, key: str, origin: str):
    """(value, number of values) of the YAML `text`, bounded (see _count_values); any failure is a
    ConfigError naming `key` and `origin` (a file, an environment variable)."""
    try:
        count = _count_values(text, key, origin)
        return yaml.load(text, Loader=_Loader), count
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(key, f"{origin}:{where} invalid YAML: {getattr(e, 'problem', None) or e}") from None
    except (ValueError, OverflowError, UnicodeError) as e:  # e.g. an integer of more than 4300 digits
        raise ConfigError(key, f"{origin}: invalid value: {str(e).split(';')[0]}") from None


def _substitute(tree, environ: Mapping[str, str]):
    """Replace ${env:VAR} and ${env:VAR:-default} in every string of the YAML tree. What the
    variables add is bounded like the file: MAX_VALUES values and MAX_FILE_BYTES characters."""
    budget = {"values": MAX_VALUES, "chars": MAX_FILE_BYTES}

    def spend(key: str, values: int = 0, chars: int = 0) -> None:
        budget["values"] -= values
        budget["chars"] -= chars
        if budget["values"] < 0 or budget["chars"] < 0:
            raise ConfigError(key, f"environment variables expand the config past {MAX_VALUES} values "
                                   f"or {Size(MAX_FILE_BYTES)}")

    def lookup(m, key: str) -> str:
        value = environ.get(m.group(1), m.group(2))
        if value is None:
            raise ConfigError(key, f"environment variable {m.group(1)} is not set "
                                   f"(use ${{env:{m.group(1)}:-default}} for a fallback)")
        spend(key, chars=len(value))
        return value

    def walk(node, key: str):
        if isinstance(node, dict):
            return {k: walk(v, f"{key}.{k}" if key else str(k)) for k, v in node.items()}
        if isinstance(node, list):
            return [walk(v, key) for v in node]
        if isinstance(node, str):
            whole = _ENV_REF.fullmatch(node)
            if whole:  # a whole-value reference keeps YAML typing: "${env:PORT}" -> 4317
                text = lookup(whole, key)
                if text == "":
                    return ""
                value, count = _parse_yaml(text, key, f"environment variable {whole.group(1)}")
                spend(key, values=count)
                return value
            return _ENV_REF.sub(lambda m: lookup(m, key), node)
        return node

    return walk(tree, "")


def parse_kv_list(text: str, var: str, secret: bool = False) -> dict:
    out = {}
    for i, item in enumerate(filter(None, (s.strip() for s in text.split(","))), 1):
        if "=" not in item:
            shown = f"item {i} (not shown)" if secret else repr(item)
            raise ConfigError(var, f"expected key=value pairs separated by commas, got {shown}")
        k, v = item.split("=", 1)
        out[unquote(k.strip())] = unquote(v.strip())
    return out


def env_millis(var: str, value: str) -> str:
    try:
        ms = float(value)
    except ValueError:
        ms = math.nan
    if not 0 <= ms < 1e15:
        raise ConfigError(var, f"expected milliseconds, got {value!r}")
    return f"{ms:f}ms"


def env_layer(environ: Mapping[str, str]) -> dict:
    """The standard OpenTelemetry environment variables of the agent as a whole (interval and
    resource), as a raw config tree; each section adds its own (the root class's `env_layer`)."""
    raw: dict = {}
    get = lambda name: (environ.get(name) or "").strip()  # noqa: E731 - empty means unset, per spec
    if get("OTEL_METRIC_EXPORT_INTERVAL"):
        raw["collection_interval"] = env_millis("OTEL_METRIC_EXPORT_INTERVAL", get("OTEL_METRIC_EXPORT_INTERVAL"))
    resource: dict = {}
    if get("OTEL_RESOURCE_ATTRIBUTES"):
        resource["attributes"] = parse_kv_list(get("OTEL_RESOURCE_ATTRIBUTES"), "OTEL_RESOURCE_ATTRIBUTES")
    if get("OTEL_SERVICE_NAME"):
        resource["service_name"] = get("OTEL_SERVICE_NAME")
    if resource:
        raw["resource"] = resource
    return raw


def merge(low: dict, high: dict) -> dict:
    out = dict(low)
    for k, v in high.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load(path: Optional[str], environ: Optional[Mapping[str, str]], schema: type):
    """The effective config, an instance of the root class `schema`: defaults < OTEL_* environment
    (`schema.env_layer(environ)`) < the file at `path`."""
    environ = os.environ if environ is None else environ
    file_raw: Any = {}
    if path is not None:
        data = read_regular_file(path, "config file")
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ConfigError("config file", f"{path} is not UTF-8 text (byte {e.start})") from None
        file_raw, _ = _parse_yaml(text, "", path)
        if file_raw is None:
            file_raw = {}
        if not isinstance(file_raw, dict):
            raise ConfigError("", f"{path}: the top level must be a mapping of keys")
        file_raw = _substitute(file_raw, environ)
    return build(schema, merge(schema.env_layer(environ), file_raw))


def to_plain(obj) -> Any:
    """The config as plain YAML-able values (durations and sizes as their strings); the value of a
    field marked `secret` is never shown (a mapping keeps its keys)."""
    if dataclasses.is_dataclass(obj):
        return {f.name: _hidden(getattr(obj, f.name)) if "secret" in f.metadata else to_plain(getattr(obj, f.name))
                for f in dataclasses.fields(obj)}
    if isinstance(obj, Mapping):
        return {k: to_plain(v) for k, v in obj.items()}
    if isinstance(obj, tuple):
        return [to_plain(v) for v in obj]
    if isinstance(obj, (Duration, Size)):
        return str(obj)
    return obj


def _hidden(value) -> Any:
    return {k: "<redacted>" for k in value} if isinstance(value, Mapping) else "<redacted>"


def dump(cfg) -> str:
    return yaml.safe_dump(to_plain(cfg), sort_keys=False)
