"""The `hostagent` command's entry point. `hostagent run` first attaches the CO-RE probes its last
start kept recipes for (agent/sources/ebpf/early.py), then imports the agent (some 150 ms: every
component's module, numpy, protobuf) and runs it (cli.py), which takes those probes over."""
from __future__ import annotations

import os
import sys
from typing import Optional

from agent.sources.ebpf import early


def run_config(argv: list) -> tuple[bool, Optional[str]]:
    """(whether `argv` is a `run` command written as this knows it, its --config file or None). A
    command line argparse may read otherwise (abbreviated options, more arguments) is not one:
    no early start then, rather than one for another config."""
    if argv[:1] != ["run"]:
        return False, None
    config, args = None, iter(argv[1:])
    for arg in args:
        name, eq, value = arg.partition("=")
        if name in ("--config", "-c", "--profile") and not eq:
            value = next(args, None)
            if value is None:
                return False, None
        elif name not in ("--config", "-c", "--profile"):
            if arg.startswith("-c") and len(arg) > 2:
                name, value = "-c", arg[2:]
            else:
                return False, None
        if not value or value.startswith("-"):     # argparse reads it as an option, or no file
            return False, None
        if name != "--profile":
            config = value
    return True, config


def main(argv: Optional[list] = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    is_run, config = run_config(argv)
    attached = early.attach(config, os.environ) if is_run else None
    from agent import cli       # after the early start: the imports are what it does not wait for
    return cli.main(argv, early=attached)
