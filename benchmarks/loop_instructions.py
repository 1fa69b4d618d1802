"""The event loop's work per request, in instructions: OpenTelemetry alone vs OpenTelemetry + wattspan exporting.

    python benchmarks/loop_instructions.py [--requests 1000 3000] [--base REV] [--record]

CPU time on a shared virtual machine moves by tens of microseconds per request from run to
run (other jobs, the other core's load, the cache); the instructions a thread executes do
not. This runs the child of ``benchmarks/export_threads.py`` (the ``otel`` and
``otel+wattspan`` variants of ``benchmarks/overhead_app.py``, in process, then drained)
under valgrind's callgrind, one output per thread, at two request counts, and takes the
main thread's instructions per request as ``(I(n2) - I(n1)) / (n2 - n1)``: the start-up,
the imports and the warm-up cancel out. The main thread is the one running the event
loop (and, after the requests, waiting for the drain: the same for both counts).

Only the loop is counted: the other threads' work is partly per second of wall time (the
sampler's polls, each pass's fixed part), which valgrind's ~50x slowdown multiplies. Their
CPU is what ``benchmarks/export_threads.py`` reads. What remains in the loop's count from
one run to the next is the cyclic garbage collector: a full collection more or less
between two runs moves a figure by some thousands of instructions per request.

``--base REV`` also counts the wattspan package of git revision ``REV`` (as in
export_threads.py). ``--record`` writes ``benchmarks/results/loop_instructions.md``.
Needs ``valgrind`` (``apt-get install valgrind``); takes a few minutes.
"""

from __future__ import annotations

import argparse
import glob
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main_thread_instructions(variant: str, n: int, tree: str | None) -> int:
    """Instructions of the main thread of one ``export_threads`` child of ``n`` requests."""
    env = dict(os.environ)
    if tree:
        env["PYTHONPATH"] = tree + os.pathsep + env.get("PYTHONPATH", "")
    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "cg")
        subprocess.run(["valgrind", "--tool=callgrind", "--separate-threads=yes", f"--callgrind-out-file={out}",
                        sys.executable, str(ROOT / "benchmarks" / "export_threads.py"), "--_child", variant,
                        "--requests", str(n)], cwd=ROOT, env=env, check=True, capture_output=True)
        main = [f for f in glob.glob(out + "-*") if f.endswith("-01")]
        if not main:
            raise SystemExit("callgrind wrote no per-thread output")
        with open(main[0]) as fh:
            for line in fh:
                m = re.match(r"(?:summary|totals): (\d+)", line)
                if m:
                    return int(m.group(1))
    raise SystemExit("no instruction count in callgrind's output")


def main() -> None:
    from benchmarks._common import add_output_args, need_tool, progress, write_results
    from benchmarks.export_threads import _extract

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--requests", type=int, nargs=2, default=[1000, 3000], metavar=("N1", "N2"))
    ap.add_argument("--base", default="", help="a git revision whose wattspan is counted beside this checkout's")
    add_output_args(ap, "loop_instructions.md")
    a = ap.parse_args()
    if not need_tool("valgrind", "the instruction count", "apt-get install valgrind"):
        raise SystemExit(2)
    n1, n2 = a.requests
    runs: list[tuple[str, str, str | None]] = [("otel (OpenTelemetry alone)", "otel", None),
                                               ("otel+wattspan, this tree", "otel+wattspan", None)]
    if a.base:
        runs.append((f"otel+wattspan, {a.base}", "otel+wattspan", _extract(a.base)))
    per: dict[str, float] = {}
    for name, variant, tree in runs:
        counts = []
        for n in (n1, n2):
            counts.append(main_thread_instructions(variant, n, tree))
            progress(f"{name}, {n} requests: {counts[-1]:,} instructions on the main thread")
        per[name] = (counts[1] - counts[0]) / (n2 - n1)
    otel = per[runs[0][0]]
    lines = [
        "# The event loop's instructions per request",
        "",
        f"Command: `python benchmarks/loop_instructions.py --requests {n1} {n2}{' --base ' + a.base if a.base else ''} --record`",
        f"Machine: {platform.machine()}, Python {platform.python_version()}, {shutil.which('valgrind') and 'valgrind callgrind'}; "
        f"the main thread of `benchmarks/export_threads.py`'s child (the trivial `/` of `benchmarks/overhead_app.py`), "
        f"(I({n2}) - I({n1})) / {n2 - n1} (see the script's docstring).",
        "",
        "| run | instructions per request | over OpenTelemetry alone | share of OpenTelemetry's |",
        "|---|---:|---:|---:|",
    ]
    for name, _, _ in runs:
        x = per[name]
        lines.append(f"| {name} | {x / 1000:,.1f} k | {(x - otel) / 1000:+,.1f} k | {(x - otel) / otel:+.1%} |")
    text = "\n".join(lines) + "\n"
    print(text)
    write_results(a, "loop_instructions.md", text)


if __name__ == "__main__":
    main()
