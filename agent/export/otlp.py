"""The OTLP exporters' shared part: their config section (`exporter.otlp`), endpoints, headers
and TLS as the OpenTelemetry specification has them, the OTEL_EXPORTER_OTLP_* environment
variables, and the base class of the gRPC (otlp_grpc.py) and HTTP (otlp_http.py) exporters."""
from __future__ import annotations

import ipaddress
import logging
import re
from dataclasses import dataclass, field
from typing import ClassVar, Literal, Mapping, Optional
from urllib.parse import urlsplit

from agent.config import ConfigError, Duration, check_ranges, env_millis, parse_kv_list, read_regular_file
from agent.export import Exporter
from agent.export.encoding import rejected_items
from agent.urls import is_loopback, redact_url

log = logging.getLogger("hostagent.export")

# The most of an answer read: a status and a partial success fit many times over. An answer that
# goes on (larger, or still arriving at the request timeout) is cut there, never held in memory.
MAX_RESPONSE = 64 * 2**10
LOGGED_MESSAGE = 256  # characters of a server's message in a log line

DEFAULT_ENDPOINTS = {"grpc": "http://localhost:4317", "http/protobuf": "http://localhost:4318"}

# Content-Encoding names as the Collector's confighttp accepts them; gRPC (grpcio) compresses with
# gzip or deflate only. The level ranges are those of zlib, zstd and lz4 frames.
COMPRESSION_LEVELS = {"gzip": (1, 9), "zlib": (1, 9), "deflate": (1, 9), "zstd": (1, 22), "lz4": (0, 16)}
GRPC_COMPRESSIONS = ("gzip", "deflate", "none")


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
        import ssl  # loaded when TLS is configured: it costs a few MB of RSS a file-exporting agent never needs
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
        check_ranges(self, key)
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


_HOSTNAME = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9_.-]{0,251}[A-Za-z0-9_])?", re.ASCII)


def parse_endpoint(value: str, protocol: str, key: str, insecure: Optional[bool] = None):
    """Validate an endpoint and return it as a SplitResult with a scheme. A scheme given wins; a gRPC
    endpoint without one is http:// when `insecure` (unset: for a loopback host), https:// otherwise,
    as the OpenTelemetry specification applies OTEL_EXPORTER_OTLP_INSECURE to those only."""
    shown = redact_url(value)
    if "://" in value:
        text = value
    else:
        plain = is_loopback(value.rsplit(":", 1)[0].strip("[]")) if insecure is None else insecure
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


def otlp_env_layer(environ: Mapping[str, str]) -> dict:
    """The standard OTEL_EXPORTER_OTLP_* environment variables, as a raw `exporter.otlp` tree."""
    otlp: dict = {}
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
        otlp["headers"] = parse_kv_list(get("OTEL_EXPORTER_OTLP_HEADERS"), "OTEL_EXPORTER_OTLP_HEADERS", secret=True)
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
        otlp["timeout"] = env_millis("OTEL_EXPORTER_OTLP_TIMEOUT", get("OTEL_EXPORTER_OTLP_TIMEOUT"))
    return otlp


class OtlpExporter(Exporter):
    """An exporter to an OTLP receiver, whose success answers may carry a partial success."""

    def __init__(self, headers: dict, telemetry):
        self.rejected = telemetry.counter("hostagent.exporter.rejected", "{items}",
                                          "Items the receiver rejected in a partial success.")
        self.oversized = telemetry.counter("hostagent.exporter.oversized_responses", "{responses}",
                                           "Success answers cut unread: larger than 64 KiB, or still arriving "
                                           "at the request timeout. The request counts as delivered, once.")
        self._secrets = sorted({v.strip() for v in headers.values() if len(v.strip()) >= 4}, key=len, reverse=True)

    def scrub(self, text: str) -> str:
        """`text` (a server's or a library's words) without any header value it may echo."""
        for secret in self._secrets:
            text = text.replace(secret, "<redacted>")
        return text

    def answered_oversized(self, signal: str, url: str) -> None:
        self.oversized.add(1, (("exporter", self.name), ("signal", signal)))
        log.warning("response_cut exporter=%s endpoint=%s signal=%s read_at_most=%d delivered=true",
                    self.name, url, signal, MAX_RESPONSE)

    def partial_success(self, signal: str, body: bytes, items: int) -> None:
        """Log and count what a success answer says was rejected; it is never retried. A body
        that is not an OTLP response (some backends answer 2xx with anything) is a plain success.
        The count is taken as at most the `items` sent, the message logged only in part."""
        try:
            rejected, message = rejected_items(signal, body)
        except Exception:
            return
        if rejected or message:
            rejected = min(max(rejected, 0), items)
            message = self.scrub(message)
            if len(message) > LOGGED_MESSAGE:
                message = message[:LOGGED_MESSAGE] + f"... ({len(message)} characters)"
            log.warning("partial_success exporter=%s signal=%s rejected=%d message=%r", self.name,
                        signal, rejected, message)
            self.rejected.add(rejected, (("signal", signal),))
