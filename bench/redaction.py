"""Command-line redaction (agent/procfs/identity.Redactor, the default rules) against the input's size.

Redaction runs on every command line the agent exports, and a command line is whatever a local
user makes it. Its cost must grow with the size of the input and no faster, whatever the input.

Inputs, each scaled to 1 KiB, 16 KiB, 256 KiB and 1 MiB:
  typical   a command line made of real words (options, --password x, KEY=value, URLs with userinfo
            and queries, Authorization headers, sh -c scripts), repeated
  hostile   one argument of what made the previous rules quadratic: a run of name characters with
            no `=`, `://` without an `@`, a long run of `:`
Baselines, measured in the same run on the same inputs:
  str.split  `" ".join(word for a in argv for word in a.split())`: the least a pass over each word
             costs (the floor a linear redactor is compared with)
  previous   the rules before RE2 and the word scanner (Python re: `name=value` and URL patterns),
             on an argument of 4 KiB of name characters only (0.1 s there, 0.5 s at 8 KiB, 10 s at
             32 KiB, 161 s at 128 KiB: quadratic)

Metric: CPU ns per KiB of command line (best of several runs). Cases:
  <input>-<size>     ratio = str.split's ns/KiB / ours (flat across sizes when redaction is linear)
  flatness-<input>   ratio = ours at 1 KiB / ours at 1 MiB, in ns/KiB (1.0: linear; quadratic: ~0.001)
  previous-4KiB      ratio = the previous rules' ns/KiB / ours, 4 KiB of name characters

    python bench/redaction.py [--quick] [--json FILE]
"""
from __future__ import annotations

import os
import re
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from bench.common import finish, parser  # noqa: E402

CATEGORY = "redaction"
KIB = 1024
SIZES = {"1KiB": KIB, "16KiB": 16 * KIB, "256KiB": 256 * KIB, "1MiB": KIB * KIB}
QUICK_SIZES = ("1KiB", "16KiB", "256KiB")

TYPICAL = ["java", "-Xmx2g", "-jar", "app.jar", "--db-password=s3cret", "--token", "abc123", "-v",
           "API_KEY=k", "https://user:pw@host.example.com/path?x=1&token=t", "--name", "worker-7",
           "sh -c 'mysql -uroot -pX -e \"select 1\"'", "Authorization: Bearer eyJ0", "/var/lib/app/data",
           "jdbc:sqlserver://db;user=sa;password=x", "--keyboard", "us", "--threads=8"]


def typical(size: int) -> list:
    """Real words, repeated until the command line is `size` bytes."""
    argv, n = [], 0
    while n < size:
        word = TYPICAL[len(argv) % len(TYPICAL)]
        argv.append(word)
        n += len(word) + 1
    return argv


def hostile(size: int) -> list:
    """Arguments of the shapes the previous rules backtracked on: a run of name characters with no
    `=`, then `://` with no `@` and a run of `:`."""
    half = size // 2
    return ["app", "n" * half, "a://" * (half // 8) + ":" * (half // 2)]


def previous_rules():
    """The rules the agent had before: Python re, per argument."""
    assignment = re.compile(r"(?P<name>[A-Za-z0-9_.\-]+)=(?P<value>[^\s&]+)")
    patterns = [re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^:/@\s]*:(?P<secret>[^@/\s]+)@"),
                re.compile(r"(?i)authorization:\s*\w+\s+(?P<secret>\S+)")]

    def redact(argv) -> str:
        out = []
        for arg in argv:
            arg = assignment.sub(lambda m: m.group(0), arg)
            for p in patterns:
                arg = p.sub(lambda m: m.group(0), arg)
            out.append(arg)
        return " ".join(out)
    return redact


def split_scan(argv) -> str:
    return " ".join(word for a in argv for word in a.split())


def best_ns_per_kib(fn, argv, repeats: int, budget: int = 256 * KIB) -> float:
    """`budget`: bytes redacted per timed run (the input as many times as fits, at least once)."""
    size = sum(len(a) + 1 for a in argv)
    runs = max(1, budget // size)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.process_time_ns()
        for _ in range(runs):
            fn(argv)
        best = min(best, (time.process_time_ns() - t0) / runs)
    return best / (size / KIB)


def run(quick: bool = False) -> list[dict]:
    from agent.procfs.identity import RedactionConfig, Redactor
    redact = Redactor(RedactionConfig())
    repeats = 3 if quick else 7
    sizes = [s for s in SIZES if not quick or s in QUICK_SIZES]
    results, ours_at = [], {}
    for name, build in (("typical", typical), ("hostile", hostile)):
        for size in sizes:
            argv = build(SIZES[size])
            ours = best_ns_per_kib(redact, argv, repeats)
            theirs = best_ns_per_kib(split_scan, argv, repeats)
            ours_at[(name, size)] = ours
            results.append({"case": f"{name}-{size}", "baseline": "str.split over the same words",
                            "metric": "CPU ns per KiB", "ours": ours, "theirs": theirs, "ratio": theirs / ours,
                            "details": {"bytes": SIZES[size], "arguments": len(argv)}})
        last = sizes[-1]
        first, far = ours_at[(name, sizes[0])], ours_at[(name, last)]
        results.append({"case": f"flatness-{name}", "baseline": f"hostagent at {sizes[0]}",
                        "metric": f"CPU ns per KiB at {sizes[0]} / at {last}", "ours": far, "theirs": first,
                        "ratio": first / far, "details": {"sizes": [sizes[0], last]}})
    argv = ["app", "n" * (4 * KIB)]
    ours, theirs = best_ns_per_kib(redact, argv, repeats), best_ns_per_kib(previous_rules(), argv, 1, budget=0)
    results.append({"case": "previous-4KiB", "baseline": "the previous rules (Python re), 4 KiB of name characters",
                    "metric": "CPU ns per KiB", "ours": ours, "theirs": theirs, "ratio": theirs / ours,
                    "details": {"bytes": 4 * KIB}})
    return results


def print_table(results: list) -> None:
    print(f"{'case':<18}{'baseline':<48}{'hostagent ns':>14}{'baseline ns':>14}{'ratio':>10}")
    for r in results:
        print(f"{r['case']:<18}{r['baseline']:<48}{r['ours']:>14.0f}{r['theirs']:>14.0f}{r['ratio']:>9.3g}x")


def main(argv=None) -> int:
    args = parser(__doc__, "up to 256 KiB, fewer rounds (a few seconds)").parse_args(argv)
    return finish(args, CATEGORY, run(args.quick), print_table)


if __name__ == "__main__":
    sys.exit(main())
