"""The `hostagent` command: run, check-config, probes, version.

Errors a user can cause print one line and exit 2; nothing they can cause prints a traceback.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Optional

from agent import __version__, profiling
from agent.components import Config
from agent.config import ConfigError, dump, load
from agent.logs import setup_logging
from agent.runtime import run
from agent.sources.ebpf.early import Early
from agent.sources.ebpf.source import check, format_table

USAGE_ERROR = 2


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line instead of usage + message
        self.exit(USAGE_ERROR, f"{self.prog}: {message} (see --help)\n")


def _fail(message: str) -> int:
    print(f"hostagent: {message}", file=sys.stderr)
    return USAGE_ERROR


def cmd_run(args) -> int:
    """`args.early`: the probes main.py attached before the agent was imported (or None)."""
    profile = profiling.profile_path(args.profile)
    if profile:
        try:
            profile = profiling.check_path(profile)
        except profiling.ProfileError as e:
            return _fail(f"{'--profile' if args.profile else profiling.ENV}: {e}")
    cfg = load(args.config, None, Config)
    setup_logging(cfg.logging.level)
    if not profile:
        return run(args.config, cfg, args.early)
    with profiling.profiling(profile):
        return run(args.config, cfg, args.early)


def cmd_check_config(args) -> int:
    cfg = load(args.file, None, Config)
    sys.stdout.write(dump(cfg))
    return 0


def cmd_probes(args) -> int:
    cfg = load(args.config, None, Config)
    statuses = check(cfg.ebpf)
    if args.json:
        print(json.dumps([s.as_dict() for s in statuses], indent=2))
    else:
        print(format_table(statuses))
    return 0


def cmd_version(args) -> int:
    print(f"hostagent {__version__}")
    return 0


def parser() -> argparse.ArgumentParser:
    p = _Parser(prog="hostagent", description="Linux host telemetry (eBPF + /proc) as OpenTelemetry metrics and logs.")
    p.add_argument("--version", action="version", version=f"hostagent {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    run = sub.add_parser("run", help="collect and export until SIGTERM/SIGINT",
                         description="Collect host telemetry and export it until SIGTERM or SIGINT. "
                                     "Without --config, the embedded defaults apply (OTLP-JSON files under "
                                     "/var/lib/hostagent/otlp), changed by OTEL_* environment variables.")
    run.add_argument("--config", "-c", metavar="FILE", help="YAML config file (docs/configuration.md)")
    run.add_argument("--profile", metavar="FILE",
                     help="profile every thread with cProfile (CPU time) and write the merged profile to "
                          "FILE when the agent exits (SIGTERM/SIGINT); read it with `python -m pstats FILE`. "
                          "Also set by the HOSTAGENT_PROFILE environment variable. Slows the agent down")
    run.set_defaults(func=cmd_run)

    check = sub.add_parser("check-config", help="validate a config file and print the effective config",
                           description="Validate FILE (with OTEL_* environment variables applied) and print "
                                       "the effective config. Exit 2 with one line naming the key if invalid.")
    check.add_argument("file", metavar="FILE")
    check.set_defaults(func=cmd_check_config)

    probes = sub.add_parser("probes", help="show each eBPF probe, its tracepoints and whether it can run",
                            description="Show every eBPF probe, its tracepoints, and whether it is on or off "
                                        "on this host and why. Exits 0 even when probes are off.")
    probes.add_argument("--config", "-c", metavar="FILE", help="YAML config file")
    probes.add_argument("--json", action="store_true", help="print JSON instead of a table")
    probes.set_defaults(func=cmd_probes)

    version = sub.add_parser("version", help="print the version", description="Print the version.")
    version.set_defaults(func=cmd_version)
    return p


def main(argv=None, early: Optional[Early] = None) -> int:
    """`early`: what `hostagent run` attached before importing this (agent/main.py)."""
    args = parser().parse_args(argv)
    args.early = early
    try:
        return args.func(args)
    except ConfigError as e:
        return _fail(f"config: {e}")
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # whoever read our output went away (`hostagent probes | head`): nothing left to say, and
        # Python's flush at exit must not fail on the closed pipe again
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


if __name__ == "__main__":
    sys.exit(main())
