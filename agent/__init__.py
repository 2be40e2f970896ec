"""hostagent: Linux host telemetry as OpenTelemetry metrics and logs."""

__version__ = "0.1.0"

STATE_DIR = "/var/lib/hostagent"        # the default `state_dir` (also read before the config: sources/ebpf/early.py)
