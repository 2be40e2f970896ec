"""OTLP/gRPC: sends encoded payloads as unary Export calls, bytes passed through untouched."""
from __future__ import annotations

import logging
from urllib.parse import urlsplit

import grpc
from google.rpc import error_details_pb2, status_pb2

from agent.config import OtlpExporterConfig
from agent.export import Exporter, PermanentError, RetryableError
from agent.export.encoding import Payload, rejected_items
from agent.selfmetrics import SELF

log = logging.getLogger("hostagent.export")

METHODS = {
    "metrics": "/opentelemetry.proto.collector.metrics.v1.MetricsService/Export",
    "logs": "/opentelemetry.proto.collector.logs.v1.LogsService/Export",
}

# OTLP spec: these codes may succeed on retry; RESOURCE_EXHAUSTED only when the server says when.
RETRYABLE_CODES = frozenset({
    grpc.StatusCode.CANCELLED, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.ABORTED,
    grpc.StatusCode.OUT_OF_RANGE, grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DATA_LOSS,
})


def retry_delay(err: grpc.RpcError):
    """RetryInfo.retry_delay in seconds from the status details, or None."""
    for key, value in (err.trailing_metadata() or ()):
        if key == "grpc-status-details-bin":
            status = status_pb2.Status.FromString(value)
            for detail in status.details:
                if detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
                    info = error_details_pb2.RetryInfo()
                    detail.Unpack(info)
                    return info.retry_delay.seconds + info.retry_delay.nanos / 1e9
    return None


class GrpcExporter(Exporter):
    name = "otlp_grpc"

    def __init__(self, cfg: OtlpExporterConfig):
        self.cfg = cfg
        self.timeout = float(cfg.timeout)
        self.metadata = tuple((k.lower(), v) for k, v in cfg.headers.items())
        self.compression = grpc.Compression.Gzip if cfg.compression == "gzip" else grpc.Compression.NoCompression
        self._channels: dict = {}
        self._calls = {}
        for signal in METHODS:
            url = cfg.signal_url(signal)
            channel = self._channels.get(url)
            if channel is None:
                channel = self._channels[url] = self._open(url)
            self._calls[signal] = channel.unary_unary(
                METHODS[signal], request_serializer=None,
                response_deserializer=None)  # bytes in, bytes out: the payload is already encoded
        self.rejected = SELF.counter("hostagent.exporter.rejected", "{items}",
                                     "Items the receiver rejected in a partial success.")

    def _open(self, url: str) -> grpc.Channel:
        target = urlsplit(url).netloc
        options = [("grpc.max_send_message_length", -1), ("grpc.enable_retries", 0)]
        if self.cfg.is_insecure(url):
            return grpc.insecure_channel(target, options=options, compression=self.compression)
        return grpc.secure_channel(target, grpc.ssl_channel_credentials(), options=options,
                                   compression=self.compression)

    def send(self, payload: Payload) -> None:
        try:
            body = self._calls[payload.signal](payload.body, timeout=self.timeout,
                                               metadata=self.metadata)
        except grpc.RpcError as err:
            code = err.code()
            delay = retry_delay(err)
            message = f"{payload.signal} export failed: {code.name}: {err.details()}"
            if code in RETRYABLE_CODES or (code is grpc.StatusCode.RESOURCE_EXHAUSTED and delay is not None):
                raise RetryableError(message, delay) from None
            raise PermanentError(message) from None
        rejected, message = rejected_items(payload.signal, body)
        if rejected or message:
            log.warning("partial_success signal=%s rejected=%d message=%r", payload.signal, rejected, message)
            self.rejected.add(rejected, (("signal", payload.signal),))

    def close(self) -> None:
        for channel in self._channels.values():
            channel.close()

