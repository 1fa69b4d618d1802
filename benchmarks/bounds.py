"""What one hostile batch step costs the meter, with the bounds and with them lifted (the baseline).

    python benchmarks/bounds.py [--ids 1000000]

In a fresh process each: a Meter on a replayed 100 W GPU takes one ``record_step``
naming ``--ids`` requests, then runs for two passes; reported: the call's time and the
process's resident memory (VmRSS) growth, kept after the passes. Baseline: the same with
``max_step_ids`` and the ids budget raised above ``--ids`` (the behaviour before the bounds).
``--record`` writes ``benchmarks/results/bounds.md`` (else the results are printed only).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHILD = r"""
import json, sys, time
sys.path.insert(0, sys.argv[3])
from tests.conftest import constant_trace
from wattspan import Meter
from wattspan.sources.replay import ReplaySource

def rss():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
n, bounded = int(sys.argv[1]), sys.argv[2] == "1"
kw = {} if bounded else {"max_step_ids": n + 1}
m = Meter(sources=[ReplaySource([constant_trace(100.0)], loop=True)], idle_w=40.0, period_s=0.1, peers=None, **kw)
if not bounded:
    m.max_history_ids = 10 * n
m.wait_ready(10)
time.sleep(0.3)
base = rss()
tokens = {f"req-{i:012d}": 1 for i in range(n)}
t = time.monotonic_ns()
t0 = time.perf_counter()
m.record_step(t - 50_000_000, t, "gpu0", tokens)
call_ms = (time.perf_counter() - t0) * 1e3
del tokens
time.sleep(1.0)
print(json.dumps({"call_ms": call_ms, "rss_growth_mb": rss() - base, "dropped_steps": m.counters["dropped_steps"], "pass_errors": m.counters["pass_errors"]}))
m.close()
"""


def run(n: int, bounded: bool) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, str(n), "1" if bounded else "0", str(ROOT)], capture_output=True, text=True, timeout=600, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ids", type=int, default=1_000_000)
    sys.path.insert(0, str(ROOT))
    from benchmarks._common import add_output_args, write_results

    add_output_args(ap, "bounds.md")
    args = ap.parse_args()
    base, now = run(args.ids, False), run(args.ids, True)
    lines = [
        "# One batch step naming many requests: the meter with its bounds, and with them lifted",
        "",
        f"Command: `python benchmarks/bounds.py --ids {args.ids}`",
        f"Machine: {platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}; shared with other jobs while it ran.",
        "",
        "| meter | record_step call (ms) | RSS growth kept after 1 s, the caller's dict freed (MiB) | dropped_steps |",
        "|---|---|---|---|",
        f"| bounds lifted (baseline) | {base['call_ms']:.1f} | {base['rss_growth_mb']:.0f} | {base['dropped_steps']} |",
        f"| bounded (max_step_ids=4096) | {now['call_ms']:.3f} | {now['rss_growth_mb']:.0f} | {now['dropped_steps']} |",
        "",
        f"Ratio of the call's time, bounded / baseline: {now['call_ms'] / base['call_ms']:.4f}. Memory: the baseline keeps its copy "
        "of the step (and the history's); the bounded meter drops the step (counted) and keeps nothing.",
        "",
    ]
    print("\n".join(lines))
    write_results(args, "bounds.md", "\n".join(lines))


if __name__ == "__main__":
    main()
