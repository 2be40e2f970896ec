"""hostagent: Linux host telemetry as OpenTelemetry metrics and logs."""

__version__ = "0.1.0"
