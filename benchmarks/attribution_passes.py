"""Where the batch-fit case's time goes: per function, the least cumulative time over a few calls.

    python benchmarks/attribution_passes.py [--calls 6] [--idle given|estimated] [--top 32]

The batch-fit case of ``attribution_speed.py`` (1,000,000 requests, 2 steps each, an hour of
10 ms readings; the step model chosen by cross-validation, a band on every request), one
warm-up call, then ``--calls`` calls each under cProfile. Per wattspan function it prints the
least cumulative milliseconds over the calls (the machine's other jobs inflate a call's time,
rarely all of them), and the least total CPU seconds (``time.process_time``). cProfile itself
adds a few per cent. Run it from each of two checkouts to compare them pass by pass.
"""

from __future__ import annotations

import argparse
import cProfile
import linecache
import os
import pstats
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")  # one core

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.attribution_speed import make  # noqa: E402
from wattspan import attribute  # noqa: E402


def _owner(path: str, line: int) -> str:
    """``Class.`` for a method (the nearest class statement above its def), else ''."""
    for i in range(line, 0, -1):
        text = linecache.getline(path, i)
        if text.startswith("class "):
            return text[6:].split("(")[0].split(":")[0].strip() + "."
        if text.startswith("def "):
            return ""
    return ""


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--calls", type=int, default=6)
    ap.add_argument("--idle", choices=("given", "estimated"), default="given")
    ap.add_argument("--top", type=int, default=32)
    a = ap.parse_args()
    trace, req, steps = make(1_000_000, 360_000, steps_per_req=2)
    kw: dict = dict(idle_w=90.0) if a.idle == "given" else {}
    attribute([trace], req, steps, **kw)  # warm-up
    best: dict[str, float] = {}
    cpu = []
    for _ in range(a.calls):
        pr = cProfile.Profile()
        c0 = time.process_time()
        pr.enable()
        attribute([trace], req, steps, **kw)
        pr.disable()
        cpu.append(time.process_time() - c0)
        for (fn, _line, name), (_cc, _nc, _tt, ct, _callers) in pstats.Stats(pr).stats.items():  # type: ignore[attr-defined]
            if "middleware" in fn or "wattspan" in fn:
                key = f"{Path(fn).name}:{_owner(fn, _line)}{name}"
                best[key] = min(best.get(key, float("inf")), ct)
    print(f"batch-fit, idle {a.idle}: least CPU {min(cpu):.3f} s of {a.calls} profiled calls ({' '.join(f'{c:.2f}' for c in cpu)})")
    print("| function | least ms |")
    print("|---|---:|")
    for k, v in sorted(best.items(), key=lambda kv: -kv[1])[: a.top]:
        print(f"| `{k}` | {v * 1e3:.0f} |")


if __name__ == "__main__":
    main()
