"""YAML -> typed, validated, frozen config.

The schema is the dataclasses below; one generic builder walks them, so a new key is a new
field with a default and a line in docs/configuration.md (a test checks the two agree).
Layers, lowest first: defaults, the standard OTEL_* environment variables, the config file.
Every error names the key and the fix, and is raised as ConfigError (exit status 2 in the CLI).
"""
from __future__ import annotations

import collections.abc
import dataclasses
import difflib
import ipaddress
import math
import os
import re
import stat
import types
import typing
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, Mapping, Optional
from urllib.parse import unquote, urlsplit

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
    import re2
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


def _check_ranges(obj, key: str) -> None:
    """Every key of obj.RANGES lies between its bounds (inclusive); an unset optional key passes.
    Each config class owns the ranges of its numeric keys; docs/configuration.md shows them."""
    for name, (low, high) in obj.RANGES.items():
        value = getattr(obj, name)
        if value is not None and not low <= value <= high:
            raise ConfigError(f"{key}.{name}" if key else name, f"must be at least {show_number(low)} and at "
                              f"most {show_number(high)}, got {show_number(value)}")


def _check_patterns(patterns, key: str) -> None:
    """Each of `patterns` is one compile_pattern() takes; the error names `key[i]`."""
    if isinstance(patterns, (str, bytes)) or not isinstance(patterns, collections.abc.Iterable):
        raise ConfigError(key, f"expected a list of regular expressions, got {type(patterns).__name__}")
    for i, pattern in enumerate(patterns):
        try:
            compile_pattern(pattern)
        except ValueError as e:
            raise ConfigError(f"{key}[{i}]", f"invalid regular expression {str(pattern)[:80]!r}: {e}") from None


# --- schema ------------------------------------------------------------------------------------

def _frozen_dict(**kw) -> Any:
    return field(default_factory=lambda: dict(kw))


@dataclass(frozen=True)
class MetricSwitch:
    enabled: bool = True


@dataclass(frozen=True)
class ScraperConfig:
    enabled: bool = True
    # per-metric switches, e.g. {"system.cpu.utilization": {"enabled": true}}
    metrics: Mapping[str, MetricSwitch] = _frozen_dict()


@dataclass(frozen=True)
class FilteredScraperConfig(ScraperConfig):
    # regular expressions matched in full against the scraper's subject: the device for disk and
    # network, the mount point for filesystem, the executable name for process
    include: tuple = ()
    exclude: tuple = ()


PSEUDO_FILESYSTEMS = ("autofs", "binfmt_misc", "bpf", "cgroup", "cgroup2", "configfs", "debugfs",
                      "devpts", "devtmpfs", "fusectl", "hugetlbfs", "mqueue", "nsfs", "overlay",
                      "proc", "procfs", "pstore", "rpc_pipefs", "securityfs", "selinuxfs",
                      "squashfs", "sysfs", "tracefs")


@dataclass(frozen=True)
class FilesystemScraperConfig(FilteredScraperConfig):
    exclude_fs_types: tuple = PSEUDO_FILESYSTEMS


@dataclass(frozen=True)
class ProcessScraperConfig(FilteredScraperConfig):
    enabled: bool = False


@dataclass(frozen=True)
class ScrapersConfig:
    cpu: ScraperConfig = ScraperConfig()
    disk: FilteredScraperConfig = FilteredScraperConfig()
    filesystem: FilesystemScraperConfig = FilesystemScraperConfig()
    load: ScraperConfig = ScraperConfig()
    memory: ScraperConfig = ScraperConfig()
    network: FilteredScraperConfig = FilteredScraperConfig()
    paging: ScraperConfig = ScraperConfig()
    processes: ScraperConfig = ScraperConfig()
    process: ProcessScraperConfig = ProcessScraperConfig()
    system: ScraperConfig = ScraperConfig()

    def validate(self, key: str) -> None:
        from agent.sources.host import METRICS
        for f in dataclasses.fields(self):
            known = METRICS[f.name]
            for metric in getattr(self, f.name).metrics:
                if metric not in known:
                    raise ConfigError(f"{key}.{f.name}.metrics.{metric}",
                                      "unknown metric" + _did_you_mean(metric, known))
            for pattern_key in ("include", "exclude"):
                _check_patterns(getattr(getattr(self, f.name), pattern_key, ()), f"{key}.{f.name}.{pattern_key}")


@dataclass(frozen=True)
class ProbeConfig:
    enabled: bool = True
    # syscalls only: count calls and errors, no latency histogram (about half the cost per call)
    counting_only: bool = False
    # tcp only: count only traffic with this local or remote port (0: all)
    port: int = 0


@dataclass(frozen=True)
class EbpfConfig:
    enabled: bool = True
    # auto: CO-RE objects through libbpf where the kernel has BTF and bpf/build has them, else bcc
    loader: Literal["auto", "core", "bcc"] = "auto"
    # where the CO-RE objects are; empty: bpf/build next to the agent's code (bpf/build.sh's output)
    object_dir: str = ""
    # per-probe switches; a probe not listed keeps its default (see docs/probes.md)
    probes: Mapping[str, ProbeConfig] = _frozen_dict()

    def validate(self, key: str) -> None:
        from agent.sources.ebpf.registry import PROBES
        if self.object_dir and not os.path.isabs(self.object_dir):
            raise ConfigError(f"{key}.object_dir", f"must be an absolute path, got {self.object_dir!r}")
        for name, probe in self.probes.items():
            if name not in PROBES:
                raise ConfigError(f"{key}.probes.{name}", "unknown probe" + _did_you_mean(name, PROBES))
            if probe.counting_only and name != "syscalls":
                raise ConfigError(f"{key}.probes.{name}.counting_only", "only the syscalls probe has this option")
            if probe.port and name != "tcp":
                raise ConfigError(f"{key}.probes.{name}.port", "only the tcp probe has this option")
            if not 0 <= probe.port <= 65535:
                raise ConfigError(f"{key}.probes.{name}.port", f"must be a port number 1..65535 or 0 (all), "
                                  f"got {probe.port}")


@dataclass(frozen=True)
class RedactionConfig:
    # an option, variable, key or header whose name contains one of these (case-insensitive) has a secret
    # value: --password x, --db-pass=x, AWS_SECRET_ACCESS_KEY=x, ?token=x, ;password=x, Authorization: x
    secret_names: tuple = ("pass", "pwd", "secret", "token", "auth", "cred", "cookie")
    # ... or has one of these at the end of one of its words: API_KEY=x, --secretKey=x, X-Api-Key: x
    # (not --keyboard)
    secret_suffixes: tuple = ("key", "keys")
    # a command (glob on a word's base name, wherever it appears: `timeout 5 mysql -px`) -> options whose
    # value is a password, glued (-psecret, --user=x) or next; several separated by spaces
    password_options: Mapping[str, str] = _frozen_dict(**{
        "mysql*": "-p", "mariadb*": "-p", "mongo*": "-p", "sshpass": "-p", "redis-cli": "-a",
        "valkey-cli": "-a", "curl": "-u --user --proxy-user", "login": "-p", "ssh-keygen": "-N -P",
        "sqlcmd": "-P", "ldap*": "-w", "zip": "-P", "unzip": "-P", "7z*": "-p", "smbclient": "-U"})
    # regular expressions (RE2 syntax) searched in the redacted command line; the group named `secret`
    # (else the match) is hidden
    patterns: tuple = ()

    def validate(self, key: str) -> None:
        _check_patterns(self.patterns, f"{key}.patterns")
        for name in ("secret_names", "secret_suffixes"):
            for i, word in enumerate(getattr(self, name)):
                if not isinstance(word, str) or not word.strip():
                    raise ConfigError(f"{key}.{name}[{i}]", f"expected a non-empty name part, got {word!r}")
        for command, options in self.password_options.items():
            if not isinstance(options, str) or not options.split() or not all(
                    o.startswith("-") and len(o) >= 2 for o in options.split()):
                raise ConfigError(f"{key}.password_options.{command}",
                                  f"expected options like -p or \"-u --user\", got {options!r}")


@dataclass(frozen=True)
class EnrichmentConfig:
    # add who a process is (executable, command line, owner, container, unit) to records with process.pid
    enabled: bool = True
    # read and export command lines at all (false: process.command_line is never produced)
    command_line: bool = True
    redaction: RedactionConfig = RedactionConfig()
    # process metadata cache: hot entries (L1) and the rest (L2), each bounded by entry count
    cache_l1_size: int = 256
    cache_l2_size: int = 4096

    # an L2 entry takes up to 2 KiB: at most 512 MiB
    RANGES: ClassVar[dict] = {"cache_l1_size": (1, 65536), "cache_l2_size": (1, 262144)}

    def validate(self, key: str) -> None:
        _check_ranges(self, key)


@dataclass(frozen=True)
class ResourceConfig:
    service_name: str = "hostagent"
    # extra resource attributes; these win over detected ones
    attributes: Mapping[str, str] = _frozen_dict()


@dataclass(frozen=True)
class BatchConfig:
    # flush when this many data points and log records are buffered ...
    max_size: int = 8192
    # ... or when the oldest buffered item is this old
    timeout: Duration = Duration(1.0)
    # collected batches waiting for the batcher; when full the oldest is dropped and counted
    # (the queue in front of the exporter is exporter.queue)
    queue_size: int = 64

    RANGES: ClassVar[dict] = {"max_size": (1, 1_000_000), "timeout": (Duration(0.001), Duration(600.0)),
                              "queue_size": (1, 10_000)}

    def validate(self, key: str) -> None:
        _check_ranges(self, key)


@dataclass(frozen=True)
class FileExporterConfig:
    path: str = "/var/lib/hostagent/otlp/metrics.jsonl"
    logs_path: str = "/var/lib/hostagent/otlp/logs.jsonl"
    # a file is rotated to <path>.1 when it reaches max_size; max_backups rotated files are kept
    max_size: Size = Size(100 * 2**20)
    max_backups: int = 3

    RANGES: ClassVar[dict] = {"max_size": (Size(4 * 2**10), Size(2**40)), "max_backups": (0, 1000)}

    def check_paths(self, key: str) -> None:
        for name in ("path", "logs_path"):
            _check_writable(getattr(self, name), f"{key}.{name}")

    def validate(self, key: str) -> None:
        _check_ranges(self, key)
        for name in ("path", "logs_path"):
            if not getattr(self, name):
                raise ConfigError(f"{key}.{name}", "must be a file path, got ''")


DEFAULT_ENDPOINTS = {"grpc": "http://localhost:4317", "http/protobuf": "http://localhost:4318"}

# Content-Encoding names as the Collector's confighttp accepts them; gRPC (grpcio) compresses with
# gzip or deflate only. The level ranges are those of zlib, zstd and lz4 frames.
COMPRESSION_LEVELS = {"gzip": (1, 9), "zlib": (1, 9), "deflate": (1, 9), "zstd": (1, 22), "lz4": (0, 16)}
GRPC_COMPRESSIONS = ("gzip", "deflate", "none")


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


@dataclass(frozen=True)
class TlsConfig:
    # PEM file of the CAs that sign the server's certificate; empty: the system's CAs
    ca_file: str = ""
    # mTLS: the client's PEM certificate (chain) and its private key, both or neither
    cert_file: str = ""
    key_file: str = ""
    # the name checked against the server's certificate (and sent as SNI) instead of the host
    server_name_override: str = ""

    def validate(self, key: str) -> None:
        import ssl
        for name in ("ca_file", "cert_file", "key_file"):
            if getattr(self, name):
                read_regular_file(getattr(self, name), f"{key}.{name}")
        if bool(self.cert_file) != bool(self.key_file):
            missing = "key_file" if self.cert_file else "cert_file"
            raise ConfigError(f"{key}.{missing}", "cert_file and key_file go together (mTLS); set both or neither")
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        if self.ca_file:
            try:
                ctx.load_verify_locations(cafile=self.ca_file)
            except (ssl.SSLError, ValueError) as e:
                raise ConfigError(f"{key}.ca_file", f"{self.ca_file} holds no PEM certificate ({e})") from None
        if self.cert_file:
            try:
                ctx.load_cert_chain(self.cert_file, self.key_file)
            except (ssl.SSLError, ValueError) as e:
                raise ConfigError(f"{key}.cert_file", f"{self.cert_file} with {self.key_file}: not a PEM "
                                  f"certificate and matching private key ({e})") from None


# RFC 7230: a header name is a token; a value is printable ASCII, spaces and tabs (no CR, LF or NUL,
# which would split the request or be refused by the HTTP and gRPC libraries at every send)
_HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_HEADER_VALUE = re.compile(r"[\t\x20-\x7e]*")
# gRPC metadata is narrower (grpcio refuses anything else at every call): lower case once sent,
# and a -bin name would need a binary value
_GRPC_METADATA_NAME = re.compile(r"[0-9a-z_.-]+(?<!-bin)")


def check_header(name: str, value: str, key: str, where: str) -> None:
    """One header; `where` says which one without showing it (a value is never shown)."""
    if not _HEADER_NAME.fullmatch(name):
        raise ConfigError(key, f"{where}: a header name is letters, digits and !#$%&'*+-.^_`|~ "
                               "(no spaces, no colon); the name is not shown")
    if not _HEADER_VALUE.fullmatch(value):
        raise ConfigError(key, f"{where} {name!r}: a header value is printable ASCII, without CR, LF, NUL or other "
                               "control characters (a YAML block scalar `|` ends with a newline); "
                               "the value is not shown")


def check_headers(headers: Mapping[str, str], key: str) -> None:
    for i, (name, value) in enumerate(headers.items(), 1):
        check_header(name, value, key, f"header {i}")


def read_headers_file(path: str, key: str = "exporter.otlp.headers_file") -> dict:
    """`name: value` or `name=value` lines; blank lines and lines starting with # are skipped."""
    try:
        lines = read_regular_file(path, key).decode("utf-8").split("\n")
    except UnicodeDecodeError:
        raise ConfigError(key, f"{path} is not UTF-8 text") from None
    out = {}
    for n, line in enumerate(lines, 1):
        line = line.strip(" \t\r")
        if not line or line.startswith("#"):
            continue
        sep = min((i for i in (line.find(":"), line.find("=")) if i > 0), default=-1)
        if sep < 0 or not line[:sep].strip():
            # never echo the line: it may hold a secret
            raise ConfigError(key, f"{path} line {n}: expected `name: value` or `name=value`")
        name, value = line[:sep].strip(" \t"), line[sep + 1:].strip(" \t")
        check_header(name, value, key, f"{path} line {n}")
        out[name] = value
    return out


@dataclass(frozen=True)
class OtlpExporterConfig:
    protocol: Literal["grpc", "http/protobuf"] = "grpc"
    # gRPC: host:port or http(s)://host:port; HTTP: base URL, /v1/metrics and /v1/logs are appended
    endpoint: str = ""
    # several receivers taking turns (round robin; one that fails is skipped until it is back);
    # replaces `endpoint` when set
    endpoints: tuple = ()
    # full URLs used as they are (HTTP) or host:port (gRPC); override `endpoint` per signal
    metrics_endpoint: str = ""
    logs_endpoint: str = ""
    # `secret`: an error converting it never shows the value
    headers: Mapping[str, str] = field(default_factory=dict, metadata={"secret": "a mapping of names to strings"})
    # a file of `name: value` lines added to `headers` (and winning over them), read at start and reload
    headers_file: str = ""
    compression: Literal["gzip", "none", "zstd", "lz4", "zlib", "deflate"] = "gzip"
    # unset: the codec's default (gzip/zlib 6, zstd 3, lz4 0)
    compression_level: Optional[int] = None
    # unset: plaintext for http:// endpoints and loopback hosts, TLS otherwise
    insecure: Optional[bool] = None
    tls: TlsConfig = TlsConfig()
    timeout: Duration = Duration(10.0)
    # requests in flight at once, each over its own connection (per endpoint)
    connections: int = 2

    # compression_level: each codec's own range on top (COMPRESSION_LEVELS)
    RANGES: ClassVar[dict] = {"timeout": (Duration(0.001), Duration(600.0)), "connections": (1, 64),
                              "compression_level": (0, 22)}

    def validate(self, key: str) -> None:
        _check_ranges(self, key)
        for name in ("endpoint", "metrics_endpoint", "logs_endpoint"):
            value = getattr(self, name)
            if value:
                parse_endpoint(value, self.protocol, f"{key}.{name}", self.insecure)
        for i, value in enumerate(self.endpoints):
            parse_endpoint(value, self.protocol, f"{key}.endpoints[{i}]", self.insecure)
        check_headers(self.headers, f"{key}.headers")
        if self.protocol == "grpc" and self.compression not in GRPC_COMPRESSIONS:
            raise ConfigError(f"{key}.compression", f"{self.compression} needs protocol http/protobuf; "
                                                    f"gRPC supports {', '.join(GRPC_COMPRESSIONS)}")
        if self.compression_level is not None:
            if self.protocol == "grpc":
                raise ConfigError(f"{key}.compression_level", "applies to http/protobuf only "
                                                              "(gRPC compresses at zlib's default level)")
            if self.compression == "none":
                raise ConfigError(f"{key}.compression_level", "needs a compression other than none")
            low, high = COMPRESSION_LEVELS[self.compression]
            if not low <= self.compression_level <= high:
                raise ConfigError(f"{key}.compression_level",
                                  f"{self.compression} levels go from {low} to {high}, got {self.compression_level}")
        headers = dict(self.headers)
        if self.headers_file:
            headers.update(read_headers_file(self.headers_file, f"{key}.headers_file"))
        if self.protocol == "grpc":
            for i, name in enumerate(headers, 1):
                if not _GRPC_METADATA_NAME.fullmatch(name.lower()):
                    raise ConfigError(f"{key}.headers", f"header {i} (of headers, headers_file and "
                                      "OTEL_EXPORTER_OTLP_HEADERS): a gRPC metadata name is letters, digits, "
                                      "-, _ and ., not ending in -bin; the name is not shown")

    def all_headers(self) -> dict:
        """`headers` with the entries of `headers_file` on top."""
        out = dict(self.headers)
        if self.headers_file:
            out.update(read_headers_file(self.headers_file))
        return out

    def signal_urls(self, signal: Literal["metrics", "logs"]) -> list:
        """Every URL (HTTP) or scheme://host:port (gRPC) one signal is sent to, in config order."""
        specific = self.metrics_endpoint if signal == "metrics" else self.logs_endpoint
        if specific:
            return [parse_endpoint(specific, self.protocol, "", self.insecure).geturl()]
        out = []
        for value in self.endpoints or (self.endpoint or DEFAULT_ENDPOINTS[self.protocol],):
            base = parse_endpoint(value, self.protocol, "", self.insecure)
            out.append(base.geturl() if self.protocol == "grpc" else base.geturl().rstrip("/") + f"/v1/{signal}")
        return out

    def signal_url(self, signal: Literal["metrics", "logs"]) -> str:
        """The (first) full URL (HTTP) or scheme://host:port (gRPC) one signal is sent to."""
        return self.signal_urls(signal)[0]

    def is_insecure(self, url: str) -> bool:
        """gRPC: plaintext? The scheme of `url` decides: parse_endpoint gave one to an endpoint
        written without, from `insecure`."""
        return urlsplit(url).scheme == "http"


@dataclass(frozen=True)
class RetryConfig:
    enabled: bool = True
    # exponential backoff with +-50% jitter; a server's RetryInfo / Retry-After overrides it
    initial_interval: Duration = Duration(5.0)
    max_interval: Duration = Duration(30.0)
    multiplier: float = 1.5
    # give up on a payload (drop and count it) after this long; 0s retries forever;
    # unset: forever with a persistent queue, 5m with a memory queue
    max_elapsed_time: Optional[Duration] = None

    RANGES: ClassVar[dict] = {"initial_interval": (Duration(0.001), Duration(3600.0)),
                              "max_interval": (Duration(0.001), Duration(3600.0)), "multiplier": (1.0, 10.0),
                              "max_elapsed_time": (Duration(0.0), Duration(365 * 86400.0))}

    def validate(self, key: str) -> None:
        _check_ranges(self, key)
        if self.max_interval < self.initial_interval:
            raise ConfigError(f"{key}.max_interval", "must be at least initial_interval")

    def give_up_after(self, persistent: bool) -> float:
        """Seconds after which a payload is dropped; 0 for never."""
        if self.max_elapsed_time is not None:
            return float(self.max_elapsed_time)
        return 0.0 if persistent else 300.0


@dataclass(frozen=True)
class QueueConfig:
    # persistent: an append-only log on disk that survives restarts and outages; memory: lost on
    # exit; auto: persistent for the otlp exporter when the directory is usable, memory otherwise
    type: Literal["auto", "memory", "persistent"] = "auto"
    # empty: <state_dir>/queue/otlp
    directory: str = ""
    # bytes on disk (persistent) or of encoded payloads in memory; unset: 1GiB on disk, 64MiB in memory
    max_size: Optional[Size] = None
    # memory queue: also bound the number of data points and log records; 0: no bound by count
    max_items: int = 0
    # when full: drop the oldest data (and count it) or refuse the new (and count it)
    full_policy: Literal["drop_oldest", "refuse_new"] = "drop_oldest"
    # persistent: the log is cut into files of this size (at most max_size/8); space is
    # reclaimed, and the oldest data dropped, a whole file at a time
    segment_size: Size = Size(16 * 2**20)
    # persistent: fsync every record (and every read-pointer move), or every fsync_interval
    fsync: Literal["record", "interval"] = "interval"
    fsync_interval: Duration = Duration(1.0)

    RANGES: ClassVar[dict] = {"max_size": (Size(2**20), Size(2**40)), "max_items": (0, 10**9),
                              "segment_size": (Size(64 * 2**10), Size(2**30)),
                              "fsync_interval": (Duration(0.001), Duration(3600.0))}

    def validate(self, key: str) -> None:
        _check_ranges(self, key)


@dataclass(frozen=True)
class ExporterConfig:
    # file: OTLP-JSON lines on local disk (no backend needed); otlp: an OTLP gRPC/HTTP receiver
    type: Literal["file", "otlp"] = "file"
    file: FileExporterConfig = FileExporterConfig()
    otlp: OtlpExporterConfig = OtlpExporterConfig()
    queue: QueueConfig = QueueConfig()
    retry: RetryConfig = RetryConfig()

    def validate(self, key: str) -> None:
        # only the selected exporter's paths must be writable
        if self.type == "file":
            self.file.check_paths(f"{key}.file")


@dataclass(frozen=True)
class HealthConfig:
    enabled: bool = True
    # loopback host:port answering GET / with 200 while the pipeline runs, 503 otherwise
    endpoint: str = "127.0.0.1:13134"

    def validate(self, key: str) -> None:
        self.address(f"{key}.endpoint")

    def address(self, key: str = "health.endpoint") -> tuple:
        """(host, port) of `endpoint`: a loopback address (127.0.0.0/8, [::1] or localhost) and a port."""
        m = re.fullmatch(r"(?:\[([^\]]*)\]|([^:\[\]]*)):([0-9]{1,5})", self.endpoint)
        if not m or int(m.group(3)) > 65535:
            raise ConfigError(key, f"expected host:port (IPv6 as [::1]:port), got {self.endpoint!r}")
        host = m.group(1) if m.group(1) is not None else m.group(2)
        if not _is_loopback(host):
            raise ConfigError(key, f"must be a loopback address (127.0.0.1, [::1] or localhost), got {host!r}")
        return host, int(m.group(3))


@dataclass(frozen=True)
class LoggingConfig:
    level: Literal["debug", "info", "warning", "error"] = "info"


@dataclass(frozen=True)
class Config:
    # how often scrapers and in-kernel aggregates are read
    collection_interval: Duration = Duration(10.0)
    # on SIGTERM/SIGINT, time allowed to flush buffered data before exiting
    shutdown_timeout: Duration = Duration(10.0)
    # the agent's own state: the persistent export queue lives under <state_dir>/queue
    state_dir: str = "/var/lib/hostagent"
    resource: ResourceConfig = ResourceConfig()
    scrapers: ScrapersConfig = ScrapersConfig()
    ebpf: EbpfConfig = EbpfConfig()
    enrichment: EnrichmentConfig = EnrichmentConfig()
    # per metric and resource, the attribute sets kept per collection; the rest are merged into one
    # series with otel.metric.overflow=true and counted in hostagent.pipeline.cardinality_overflow
    cardinality_limit: int = 2000
    batch: BatchConfig = BatchConfig()
    exporter: ExporterConfig = ExporterConfig()
    health: HealthConfig = HealthConfig()
    logging: LoggingConfig = LoggingConfig()

    RANGES: ClassVar[dict] = {"collection_interval": (Duration(0.1), Duration(86400.0)),
                              "shutdown_timeout": (Duration(0.01), Duration(3600.0)),
                              "cardinality_limit": (1, 1_000_000)}

    def validate(self, key: str) -> None:
        _check_ranges(self, key)
        if not os.path.isabs(self.state_dir):
            raise ConfigError("state_dir", f"must be an absolute path, got {self.state_dir!r}")
        queue = self.exporter.queue
        if queue.directory and not os.path.isabs(queue.directory):
            raise ConfigError("exporter.queue.directory", f"must be an absolute path, got {queue.directory!r}")
        if queue.type == "persistent":
            key = "exporter.queue.directory" if queue.directory else "state_dir"
            _check_writable_dir(queue_directory(self), key)



# --- endpoints ---------------------------------------------------------------------------------

def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


_USERINFO = re.compile(r"^((?:[A-Za-z][A-Za-z0-9+.-]*:)?//)?.*@", re.S)  # to the last @: a password may hold a /
_HOSTNAME = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9_.-]{0,251}[A-Za-z0-9_])?", re.ASCII)


def redact_url(url: str) -> str:
    """`url` with its userinfo (user:password@, token@) replaced by ***@, for every message that
    shows an endpoint (a valid config has none: see parse_endpoint)."""
    return _USERINFO.sub(lambda m: f"{m.group(1) or ''}***@", url, count=1)


def parse_endpoint(value: str, protocol: str, key: str, insecure: Optional[bool] = None):
    """Validate an endpoint and return it as a SplitResult with a scheme. A scheme given wins; a gRPC
    endpoint without one is http:// when `insecure` (unset: for a loopback host), https:// otherwise,
    as the OpenTelemetry specification applies OTEL_EXPORTER_OTLP_INSECURE to those only."""
    shown = redact_url(value)
    if "://" in value:
        text = value
    else:
        plain = _is_loopback(value.rsplit(":", 1)[0].strip("[]")) if insecure is None else insecure
        text = ("http://" if protocol == "grpc" and plain else "https://") + value
    try:
        parts = urlsplit(text)
        port = parts.port
    except ValueError as e:
        detail = "" if "@" in value else f": {e}"  # the error may quote a piece of a password
        raise ConfigError(key, f"malformed endpoint {shown!r}{detail}") from None
    if parts.scheme not in ("http", "https"):
        raise ConfigError(key, f"endpoint {shown!r} must use http:// or https://")
    if not parts.hostname:
        raise ConfigError(key, f"endpoint {shown!r} has no host")
    if "@" in parts.netloc:  # neither grpcio nor urllib3 would send them: they would only be logged
        raise ConfigError(key, f"endpoint {shown!r}: credentials in an endpoint are never sent; put them in "
                               "exporter.otlp.headers (e.g. authorization: Basic ...)")
    if not _HOSTNAME.fullmatch(parts.hostname):
        try:
            ipaddress.ip_address(parts.hostname)
        except ValueError:
            raise ConfigError(key, f"endpoint {shown!r}: {parts.hostname!r} is not a host name or an IP "
                                   "address") from None
    if protocol == "grpc":
        if port is None:
            raise ConfigError(key, f"gRPC endpoint {shown!r} needs a port, e.g. {parts.hostname}:4317")
        if parts.path not in ("", "/"):
            raise ConfigError(key, f"gRPC endpoint {shown!r} must not have a path")
    return parts


def queue_directory(cfg: "Config") -> str:
    """Where the persistent export queue keeps its log."""
    return cfg.exporter.queue.directory or os.path.join(cfg.state_dir, "queue", "otlp")


def _check_writable_dir(path: str, key: str) -> None:
    probe = path
    while not os.path.exists(probe):  # the nearest existing ancestor must let us create the rest
        probe = os.path.dirname(probe)
    if (not os.path.isdir(probe) or not os.access(probe, os.W_OK | os.X_OK)
            or os.statvfs(probe).f_flag & os.ST_RDONLY):
        raise ConfigError(key, f"{path} is not a writable directory")


def _check_writable(path: str, key: str) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    probe = directory
    while not os.path.exists(probe):  # the nearest existing ancestor must let us create the rest
        probe = os.path.dirname(probe)
    if os.path.isdir(path):
        raise ConfigError(key, f"{path} is a directory, expected a file path")
    target = path if os.path.exists(path) else probe
    if (not os.path.isdir(probe) or not os.access(target, os.W_OK)
            or os.statvfs(probe).f_flag & os.ST_RDONLY):
        raise ConfigError(key, f"{path} is not writable")


# --- the generic builder --------------------------------------------------------------------

def _did_you_mean(name: str, choices) -> str:
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
                              + (_did_you_mean(str(value), choices) if isinstance(value, str) else ""))
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
    return typing.get_type_hints(cls, globalns=globals())


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
            raise ConfigError(where, "unknown key" + _did_you_mean(str(name), fields))
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


def schema_keys(cls=None, prefix: str = ""):
    """(dotted key, default) for every leaf key of the schema, for the docs check."""
    cls = cls or Config
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


def _parse_kv_list(text: str, var: str, secret: bool = False) -> dict:
    out = {}
    for i, item in enumerate(filter(None, (s.strip() for s in text.split(","))), 1):
        if "=" not in item:
            shown = f"item {i} (not shown)" if secret else repr(item)
            raise ConfigError(var, f"expected key=value pairs separated by commas, got {shown}")
        k, v = item.split("=", 1)
        out[unquote(k.strip())] = unquote(v.strip())
    return out


def _env_millis(var: str, value: str) -> str:
    try:
        ms = float(value)
    except ValueError:
        ms = math.nan
    if not 0 <= ms < 1e15:
        raise ConfigError(var, f"expected milliseconds, got {value!r}")
    return f"{ms:f}ms"


def env_layer(environ: Mapping[str, str]) -> dict:
    """The standard OpenTelemetry environment variables, as a raw config tree."""
    otlp: dict = {}
    raw: dict = {}
    get = lambda name: (environ.get(name) or "").strip()  # noqa: E731 - empty means unset, per spec
    if get("OTEL_EXPORTER_OTLP_PROTOCOL"):
        otlp["protocol"] = get("OTEL_EXPORTER_OTLP_PROTOCOL")
        if otlp["protocol"] not in DEFAULT_ENDPOINTS:
            raise ConfigError("OTEL_EXPORTER_OTLP_PROTOCOL", f"must be grpc or http/protobuf, got {otlp['protocol']!r}")
    for var, name in (("OTEL_EXPORTER_OTLP_ENDPOINT", "endpoint"),
                      ("OTEL_EXPORTER_OTLP_METRICS_ENDPOINT", "metrics_endpoint"),
                      ("OTEL_EXPORTER_OTLP_LOGS_ENDPOINT", "logs_endpoint")):
        if get(var):
            otlp[name] = get(var)
    if get("OTEL_EXPORTER_OTLP_HEADERS"):
        otlp["headers"] = _parse_kv_list(get("OTEL_EXPORTER_OTLP_HEADERS"), "OTEL_EXPORTER_OTLP_HEADERS", secret=True)
        check_headers(otlp["headers"], "OTEL_EXPORTER_OTLP_HEADERS")
    if get("OTEL_EXPORTER_OTLP_COMPRESSION"):
        otlp["compression"] = get("OTEL_EXPORTER_OTLP_COMPRESSION").lower()
    if get("OTEL_EXPORTER_OTLP_INSECURE"):
        value = get("OTEL_EXPORTER_OTLP_INSECURE").lower()
        if value not in ("true", "false"):
            raise ConfigError("OTEL_EXPORTER_OTLP_INSECURE", f"must be true or false, got {value!r}")
        otlp["insecure"] = value == "true"
    tls = {name: get(var) for var, name in (("OTEL_EXPORTER_OTLP_CERTIFICATE", "ca_file"),
                                            ("OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE", "cert_file"),
                                            ("OTEL_EXPORTER_OTLP_CLIENT_KEY", "key_file")) if get(var)}
    if tls:
        otlp["tls"] = tls
    if get("OTEL_EXPORTER_OTLP_TIMEOUT"):
        otlp["timeout"] = _env_millis("OTEL_EXPORTER_OTLP_TIMEOUT", get("OTEL_EXPORTER_OTLP_TIMEOUT"))
    if otlp:
        raw["exporter"] = {"otlp": otlp}
        if any(k.endswith("endpoint") for k in otlp):
            raw["exporter"]["type"] = "otlp"
    if get("OTEL_METRIC_EXPORT_INTERVAL"):
        raw["collection_interval"] = _env_millis("OTEL_METRIC_EXPORT_INTERVAL", get("OTEL_METRIC_EXPORT_INTERVAL"))
    resource: dict = {}
    if get("OTEL_RESOURCE_ATTRIBUTES"):
        resource["attributes"] = _parse_kv_list(get("OTEL_RESOURCE_ATTRIBUTES"), "OTEL_RESOURCE_ATTRIBUTES")
    if get("OTEL_SERVICE_NAME"):
        resource["service_name"] = get("OTEL_SERVICE_NAME")
    if resource:
        raw["resource"] = resource
    return raw


def _merge(low: dict, high: dict) -> dict:
    out = dict(low)
    for k, v in high.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load(path: Optional[str] = None, environ: Optional[Mapping[str, str]] = None) -> Config:
    """The effective config: defaults < OTEL_* environment < the file at `path`."""
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
    return build(Config, _merge(env_layer(environ), file_raw))


def to_plain(obj) -> Any:
    """The config as plain YAML-able values (durations and sizes as their strings)."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, Mapping):
        return {k: to_plain(v) for k, v in obj.items()}
    if isinstance(obj, tuple):
        return [to_plain(v) for v in obj]
    if isinstance(obj, (Duration, Size)):
        return str(obj)
    return obj


def dump(cfg: Config) -> str:
    plain = to_plain(cfg)
    headers = plain["exporter"]["otlp"]["headers"]
    plain["exporter"]["otlp"]["headers"] = {k: "<redacted>" for k in headers}  # never print secrets
    return yaml.safe_dump(plain, sort_keys=False)
