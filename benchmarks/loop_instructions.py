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
export_threads.py). ``--no-sinks`` also counts ``otel+wattspan`` with the meter given no
sink and no span processor (export_threads' ``--_sinks ""``): what the middleware and the
meter alone add to OpenTelemetry's loop. ``--cache`` runs callgrind's cache simulation
(``--cache-sim=yes``, its model of the host's caches; slower) and adds, per
request, the loop's first-level instruction and data cache misses (``I1``, ``D1``: reads
and writes): where CPU goes that instructions do not (a miss costs the time of several).
Each figure is also split into the cyclic garbage collector's part (``gc_collect_main``
with all it calls, from ``callgrind_annotate``) and the rest: one full collection more or
less in one of the two runs moves the total by some 10-30k instructions per request, the
rest by far less. (Last-level misses are left out: on this child they are mostly one numpy
subtraction on the main thread whose size follows the run's wall time, valgrind's slowdown
included, not the number of requests.)
``--record`` writes ``benchmarks/results/loop_instructions.md``.
Needs ``valgrind`` (``apt-get install valgrind``); takes a few minutes (``--cache``: more).
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


EVENTS = ("Ir", "I1mr", "D1mr", "D1mw", "ILmr", "DLmr", "DLmw")


def main_thread_counts(variant: str, n: int, tree: str | None, cache: bool = False,
                       sinks: str | None = None) -> dict[str, int]:
    """callgrind's counts for the main thread of one ``export_threads`` child of ``n`` requests:
    ``Ir`` (instructions) and, with ``cache``, the simulated cache misses (EVENTS); each also
    as ``gc.<event>``: the part of it in the cyclic garbage collector (``gc_collect_main`` inclusive)."""
    env = dict(os.environ)
    if tree:
        env["PYTHONPATH"] = tree + os.pathsep + env.get("PYTHONPATH", "")
    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "cg")
        subprocess.run(["valgrind", "--tool=callgrind", "--separate-threads=yes", f"--callgrind-out-file={out}",
                        *(["--cache-sim=yes"] if cache else []),
                        sys.executable, str(ROOT / "benchmarks" / "export_threads.py"), "--_child", variant,
                        "--requests", str(n), *(["--_sinks", sinks] if sinks is not None else [])],
                        cwd=ROOT, env=env, check=True, capture_output=True)
        main = [f for f in glob.glob(out + "-*") if f.endswith("-01")]
        if not main:
            raise SystemExit("callgrind wrote no per-thread output")
        counts: dict[str, int] = {}
        names: list[str] = []
        with open(main[0]) as fh:
            for line in fh:
                if line.startswith("events:"):
                    names = line.split()[1:]
                m = re.match(r"(?:summary|totals):((?: \d+)+)", line)
                if m:
                    counts = dict(zip(names, map(int, m.group(1).split())))
                    break
        if "Ir" not in counts:
            raise SystemExit("no instruction count in callgrind's output")
        for k, v in _inclusive(main[0], "gcmodule.c:gc_collect_main", names).items():
            counts["gc." + k] = v
        return counts


def _inclusive(path: str, function: str, names: list[str]) -> dict[str, int]:
    """The inclusive counts (each of ``names``) of ``function`` (its outermost calls: the collector
    ``gc_collect_main``, with all it calls), from callgrind_annotate; zeros if it never ran."""
    out = subprocess.run(["callgrind_annotate", "--inclusive=yes", "--threshold=100", path],
                         capture_output=True, text=True, check=True).stdout.splitlines()
    got = dict.fromkeys(names, 0)
    cell = re.compile(r"\s+(?:([\d,]+) \(\s*[\d.]+%\)|(\.))")
    for line in out:
        name = next((t for t in line.split() if "/" in t), "")
        if not name.endswith("/" + function):  # not its recursive calls (function'2): counted in these
            continue
        values, pos = [], 0
        while (m := cell.match(line, pos)) is not None:
            values.append(int(m.group(1).replace(",", "")) if m.group(1) else 0)
            pos = m.end()
        if len(values) == len(names):
            for k, v in zip(names, values):
                got[k] += v
    return got


def main_thread_instructions(variant: str, n: int, tree: str | None) -> int:
    """Instructions of the main thread of one ``export_threads`` child of ``n`` requests."""
    return main_thread_counts(variant, n, tree)["Ir"]


def main() -> None:
    from benchmarks._common import add_output_args, need_tool, progress, write_results
    from benchmarks.export_threads import _extract

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--requests", type=int, nargs=2, default=[1000, 3000], metavar=("N1", "N2"))
    ap.add_argument("--base", default="", help="a git revision whose wattspan is counted beside this checkout's")
    ap.add_argument("--no-sinks", action="store_true", help="also count otel+wattspan with no sink and no span processor")
    ap.add_argument("--cache", action="store_true", help="also the simulated cache misses per request (callgrind --cache-sim=yes)")
    add_output_args(ap, "loop_instructions.md")
    a = ap.parse_args()
    if not need_tool("valgrind", "the instruction count", "apt-get install valgrind"):
        raise SystemExit(2)
    n1, n2 = a.requests
    runs: list[tuple[str, str, str | None, str | None]] = [("otel (OpenTelemetry alone)", "otel", None, None)]
    if a.no_sinks:
        runs.append(("otel+wattspan, no sink, this tree", "otel+wattspan", None, ""))
    runs.append(("otel+wattspan, this tree", "otel+wattspan", None, None))
    if a.base:
        runs.append((f"otel+wattspan, {a.base}", "otel+wattspan", _extract(a.base), None))
    per: dict[str, dict[str, float]] = {}
    for name, variant, tree, sinks in runs:
        counts = []
        for n in (n1, n2):
            counts.append(main_thread_counts(variant, n, tree, a.cache, sinks))
            progress(f"{name}, {n} requests: {counts[-1]['Ir']:,} instructions on the main thread")
        per[name] = {k: (counts[1][k] - counts[0][k]) / (n2 - n1) for k in counts[1]}
    otel = per[runs[0][0]]["Ir"]
    flags = (" --no-sinks" if a.no_sinks else "") + (" --cache" if a.cache else "") + (" --base " + a.base if a.base else "")
    base = per[runs[0][0]]
    lines = [
        "# The event loop's instructions per request",
        "",
        f"Command: `python benchmarks/loop_instructions.py --requests {n1} {n2}{flags} --record`",
        f"Machine: {platform.machine()}, Python {platform.python_version()}, {shutil.which('valgrind') and 'valgrind callgrind'}; "
        f"the main thread of `benchmarks/export_threads.py`'s child (the trivial `/` of `benchmarks/overhead_app.py`), "
        f"(I({n2}) - I({n1})) / {n2 - n1} (see the script's docstring); `gc`: the part in the cyclic garbage collector.",
        "",
        "| run | instructions per request | over OpenTelemetry alone | share of OpenTelemetry's | of it gc | less gc, over OpenTelemetry alone |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, *_ in runs:
        x = per[name]["Ir"]
        gc_ = per[name].get("gc.Ir", 0.0)
        rest = (x - gc_) - (otel - base.get("gc.Ir", 0.0))
        lines.append(f"| {name} | {x / 1000:,.1f} k | {(x - otel) / 1000:+,.1f} k | {(x - otel) / otel:+.1%} | "
                     f"{gc_ / 1000:,.1f} k | {rest / 1000:+,.1f} k |")
    if a.cache:
        cols = (("I1mr", "I1 misses"), ("D1mr", "D1 read misses"), ("D1mw", "D1 write misses"))
        lines += ["", "Simulated cache misses per request on the loop (callgrind `--cache-sim=yes`): all, and less the "
                  "garbage collector's (change over OpenTelemetry alone):", "",
                  "| run | " + " | ".join(c for _, c in cols) + " | " + " | ".join(f"{c}, less gc" for _, c in cols) + " |",
                  "|---|" + "---:|" * (2 * len(cols))]
        for name, *_ in runs:
            x = per[name]
            cells = []
            for less in (False, True):
                for k, _ in cols:
                    v = x.get(k, 0.0) - (x.get("gc." + k, 0.0) if less else 0.0)
                    b = base.get(k, 0.0) - (base.get("gc." + k, 0.0) if less else 0.0)
                    cells.append(f"{v:,.0f}" if name == runs[0][0] else f"{v:,.0f} ({v - b:+,.0f})")
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    text = "\n".join(lines) + "\n"
    print(text)
    write_results(a, "loop_instructions.md", text)


if __name__ == "__main__":
    main()
