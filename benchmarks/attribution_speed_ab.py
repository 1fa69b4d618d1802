"""Batch-fit speed of two checkouts of wattspan, alternated in one run: before and after a change.

    python benchmarks/attribution_speed_ab.py OLD_CHECKOUT NEW_CHECKOUT [--rounds 2]

Each checkout runs the batch-fit case of ``attribution_speed.py`` (1,000,000 requests, 2 steps
each, an hour of 10 ms readings; the step model chosen by cross-validation, a band on every
request) with its own code and its own ``.venv/bin/python`` (or this interpreter when it has
none), in a fresh process, alternating, ``--rounds`` times. Per case it prints the best wall
and CPU seconds over the rounds (2 calls a round) and the tracemalloc peak, and the ratios.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

_SIDE = r"""
import json, os, sys, time, tracemalloc
os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, ".")
from benchmarks.attribution_speed import make
from wattspan import attribute
trace, req, steps = make(1_000_000, 360_000, steps_per_req=2)
out = {}
for case, kw in (("idle given", dict(idle_w=90.0)), ("idle estimated", {})):
    fn = lambda: attribute([trace], req, steps, **kw)
    wall, cpu = [], []
    for _ in range(2):
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    tracemalloc.start()
    fn()
    out[case] = dict(wall=min(wall), cpu=min(cpu), peak=tracemalloc.get_traced_memory()[1] / 2**20)
    tracemalloc.stop()
print(json.dumps(out))
"""


def run(checkout: Path) -> dict:
    py = checkout / ".venv" / "bin" / "python"
    exe = str(py) if py.exists() else sys.executable
    res = subprocess.run([exe, "-c", _SIDE], cwd=checkout, capture_output=True, text=True, check=True)
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("old", type=Path)
    ap.add_argument("new", type=Path)
    ap.add_argument("--rounds", type=int, default=2)
    a = ap.parse_args()
    best: dict = {}
    for r in range(a.rounds):
        for side, d in (("old", a.old), ("new", a.new)):
            got = run(d)
            print(f"round {r + 1} {side}: {json.dumps(got)}", file=sys.stderr, flush=True)
            for case, v in got.items():
                b = best.setdefault((side, case), dict(v))
                for k in ("wall", "cpu", "peak"):
                    b[k] = min(b[k], v[k])
    print("| case | before wall s | after wall s | wall ratio | before CPU s | after CPU s | CPU ratio | before peak MiB | after peak MiB |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for case in ("idle given", "idle estimated"):
        o, n = best[("old", case)], best[("new", case)]
        print(f"| batch-fit, {case} | {o['wall']:.2f} | {n['wall']:.2f} | {o['wall'] / n['wall']:.1f}x | {o['cpu']:.2f} | "
              f"{n['cpu']:.2f} | {o['cpu'] / n['cpu']:.1f}x | {o['peak']:,.0f} | {n['peak']:,.0f} |")


if __name__ == "__main__":
    main()
