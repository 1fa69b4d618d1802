"""What the live meter's step-model refit costs the server's interpreter at a thousand requests in flight.

    python benchmarks/refit_cost.py [--in-flight 1024] [--seconds 40] [--record]

A load thread keeps ``--in-flight`` requests open on one simulated-trace GPU (each 3 s long) and reports a
decode step naming all of them every 20 ms, through the public ``Meter.begin`` / ``end`` / ``record_step``;
the meter refits its step model every 5 s over its 60 s history (up to a million entries). The main thread
sleeps 1 ms at a time and counts how late it wakes (a stall: the GIL held elsewhere); the refits' CPU
seconds are read around each call. Prints; ``--record`` writes ``benchmarks/results/refit_cost.md``.
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def run(in_flight: int, seconds: float) -> dict:
    from wattspan import Meter
    from wattspan.meter import core
    from wattspan.testing import RecordCollector, ReplaySource, constant_trace

    cpu: list[float] = []
    orig = core.Meter._refit

    def timed(self, *a, **k):
        t = time.thread_time()
        try:
            return orig(self, *a, **k)
        finally:
            cpu.append(time.thread_time() - t)

    core.Meter._refit = timed
    try:
        meter = Meter(sources=[ReplaySource([constant_trace(300.0)], loop=True)], sinks=[RecordCollector()], peers=False)
        meter.wait_ready(30)

        def load() -> None:
            seq, live, t_end = 0, {}, time.monotonic() + seconds
            while time.monotonic() < t_end:
                now = time.monotonic_ns()
                for rid, t0 in list(live.items()):
                    if now - t0 > 3e9:
                        meter.end(rid, "gpu0", now, {"route": "/v1/chat", "status_code": 200})
                        del live[rid]
                while len(live) < in_flight:
                    seq += 1
                    live[f"r{seq}"] = now
                    meter.begin(f"r{seq}", "gpu0", now)
                t0 = time.monotonic_ns()
                time.sleep(0.02)
                meter.record_step(t0, time.monotonic_ns(), "gpu0", dict.fromkeys(live, 1))

        th = threading.Thread(target=load)
        th.start()
        late: list[float] = []
        while th.is_alive():
            t = time.perf_counter()
            time.sleep(0.001)
            late.append(time.perf_counter() - t - 0.001)
        meter.close()
    finally:
        core.Meter._refit = orig
    late.sort()
    cpu.sort()
    return {"refits": len(cpu), "cpu_total": sum(cpu), "cpu_median": cpu[len(cpu) // 2] if cpu else 0.0,
            "cpu_max": cpu[-1] if cpu else 0.0, "stalls_30ms": sum(x > 0.03 for x in late), "stall_max": late[-1] if late else 0.0}


def main() -> None:
    from benchmarks._common import add_output_args, write_results

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--in-flight", type=int, default=1024)
    ap.add_argument("--seconds", type=float, default=40.0)
    add_output_args(ap, "refit_cost.md")
    a = ap.parse_args()
    r = run(a.in_flight, a.seconds)
    text = "\n".join([
        "# The live meter's refit at a thousand requests in flight", "",
        f"Command: `python benchmarks/refit_cost.py --in-flight {a.in_flight} --seconds {a.seconds:g}` (a shared 2-core CPU).", "",
        "| refits | refit CPU, total | median | max | main-thread wake-ups > 30 ms late | latest wake-up |",
        "|---:|---:|---:|---:|---:|---:|",
        f"| {r['refits']} | {r['cpu_total']:.2f} s | {r['cpu_median'] * 1e3:.0f} ms | {r['cpu_max'] * 1e3:.0f} ms | "
        f"{r['stalls_30ms']} | {r['stall_max'] * 1e3:.0f} ms |", ""])
    print(text, end="")
    write_results(a, "refit_cost.md", text)


if __name__ == "__main__":
    main()
