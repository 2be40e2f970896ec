"""The command line every benchmark module shares: `--quick`, `--json FILE`, and a readable
table of its cases (each module's own print_table). Import after the module has put the
repository root on sys.path."""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess


def parser(doc: str, quick_help: str) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help=quick_help)
    ap.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    return ap


def write_json(path: str, data) -> None:
    """Write through a temp file renamed over `path`: a reader never sees half a report."""
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=2)
        f.write("\n")
    os.replace(tmp, path)


def finish(args, category: str, results: list, print_table) -> int:
    """Print the cases, write them to --json FILE if asked; the exit status of main()."""
    print_table(results)
    if args.json:
        write_json(args.json, {"category": category, "results": results})
    return 0


def stop(proc: subprocess.Popen, timeout: float) -> int:
    """SIGTERM, then SIGKILL after `timeout` seconds; the exit status."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode
