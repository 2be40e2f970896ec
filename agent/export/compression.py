"""Request body compression for OTLP/HTTP, with the Content-Encoding names the Collector's
confighttp accepts: gzip, zstd, lz4 (frame format), zlib and deflate (both a zlib stream, as the
Collector decodes them). gRPC compresses inside grpcio (gzip or deflate) and does not come here."""
from __future__ import annotations

import threading
import zlib
from typing import Optional

DEFAULT_LEVELS = {"gzip": 6, "zlib": 6, "deflate": 6, "zstd": 3, "lz4": 0}


class Compressor:
    """compress(bytes) -> bytes for one codec and level; `encoding` is the Content-Encoding value
    (None for no compression). Safe to share between sender threads."""

    def __init__(self, name: str, level: Optional[int] = None):
        self.name = name
        self.level = DEFAULT_LEVELS.get(name, 0) if level is None else level
        self.encoding = None if name == "none" else name
        self._local = threading.local()
        self.compress = getattr(self, f"_{name}")

    def _none(self, data: bytes) -> bytes:
        return data

    def _gzip(self, data: bytes) -> bytes:
        c = zlib.compressobj(self.level, zlib.DEFLATED, 31)  # 31: gzip header and trailer
        return c.compress(data) + c.flush()

    def _zlib(self, data: bytes) -> bytes:
        return zlib.compress(data, self.level)

    _deflate = _zlib

    def _zstd(self, data: bytes) -> bytes:
        c = getattr(self._local, "zstd", None)
        if c is None:  # a ZstdCompressor must not be used by two threads at once
            import zstandard
            c = self._local.zstd = zstandard.ZstdCompressor(level=self.level)
        return c.compress(data)

    def _lz4(self, data: bytes) -> bytes:
        import lz4.frame
        return lz4.frame.compress(data, compression_level=self.level)


def decompress(encoding: Optional[str], data: bytes) -> bytes:
    """The inverse, for receivers in tests and benchmarks."""
    if not encoding or encoding == "identity":
        return data
    if encoding == "gzip":
        return zlib.decompress(data, 31)
    if encoding in ("zlib", "deflate"):
        return zlib.decompress(data)
    if encoding == "zstd":
        import zstandard
        return zstandard.ZstdDecompressor().decompress(data)
    if encoding == "lz4":
        import lz4.frame
        return lz4.frame.decompress(data)
    raise ValueError(f"unknown Content-Encoding {encoding!r}")
