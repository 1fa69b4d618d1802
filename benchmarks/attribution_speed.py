"""Attribution throughput: requests/s and samples/s on one core, side by side with a baseline.

    python benchmarks/attribution_speed.py [--requests 1000000] [--samples 10000000]

The baseline is the plainest vectorised pass over the same arrays (one
``np.interp`` of the cumulative energy at every request's start and end): the
ratio says what wattspan's bookkeeping costs on top of reading the trace.
Prints the results; ``--record`` writes ``benchmarks/results/attribution_speed.md``.
"""

from __future__ import annotations

import argparse
import os
import platform
import time
import tracemalloc
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")  # one core
import numpy as np  # noqa: E402

from wattspan import DeviceTrace, Requests, SampleKind, Steps, attribute  # noqa: E402

S = 10**9


def make(n_req: int, n_samp: int, seed: int = 0, steps_per_req: int = 0):
    rng = np.random.default_rng(seed)
    span = 3600 * S
    t = np.linspace(10**12, 10**12 + span, n_samp).astype(np.int64)
    p = 90 + 400 * rng.random(n_samp)
    start = 10**12 + np.sort(rng.integers(0, span - 10 * S, n_req))
    end = start + rng.integers(10**7, 5 * S, n_req)
    ids = np.array([str(i) for i in range(n_req)], dtype=object)
    req = Requests(ids, start, end, np.full(n_req, "gpu0", dtype=object), np.ones(n_req))
    steps = None
    if steps_per_req:
        ns = n_req * steps_per_req // 4
        st = np.linspace(10**12, 10**12 + span - S, ns).astype(np.int64)
        en = st + (span // ns) * 9 // 10
        e_step = np.repeat(np.arange(ns), 4)
        e_req = np.clip(np.searchsorted(start, st[e_step]) - 1 - np.tile(np.arange(4), ns), 0, n_req - 1)
        tok = np.where(rng.random(len(e_step)) < 0.1, 256.0, 1.0)
        steps = Steps(st, en, np.full(ns, "gpu0", dtype=object), e_step, e_req, tok)
    return DeviceTrace("gpu0", t, p, power_kind=SampleKind.INSTANT), req, steps


_CPU: list[float] = []  # CPU seconds of each call best_of timed last


def best_of(fn, repeat=3):
    best = float("inf")
    _CPU.clear()
    for _ in range(repeat):
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        best = min(best, time.perf_counter() - t0)
        _CPU.append(time.process_time() - c0)
    return best


def cpu_and_peak(fn):
    """The least CPU seconds of the calls ``best_of`` just timed and of one more (this process's,
    so other jobs on the machine count less than in the wall time; a single call's is at the mercy
    of the machine's other jobs and of page faults), and the peak MiB it allocated (tracemalloc, in
    a further call)."""
    c0 = time.process_time()
    fn()
    cpu = min([time.process_time() - c0, *_CPU])
    tracemalloc.start()
    fn()
    peak = tracemalloc.get_traced_memory()[1] / 2**20
    tracemalloc.stop()
    return cpu, peak


def baseline(trace, req):
    e = np.concatenate(([0.0], np.cumsum((trace.power_w[1:] + trace.power_w[:-1]) * 0.5 * np.diff(trace.t_ns) * 1e-9)))
    tf = trace.t_ns.astype(np.float64)
    return np.interp(req.end_ns.astype(np.float64), tf, e) - np.interp(req.start_ns.astype(np.float64), tf, e)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=1_000_000)
    ap.add_argument("--samples", type=int, default=10_000_000)
    ap.add_argument("--batch-requests", type=int, default=1_000_000, help="requests in the batch-fit cases (2 steps each)")
    ap.add_argument("--batch-samples", type=int, default=360_000, help="sensor readings in the batch-fit cases (1 h at 10 ms)")
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from benchmarks._common import add_output_args, write_results

    add_output_args(ap, "attribution_speed.md")
    a = ap.parse_args()
    rows = []
    trace, req, _ = make(a.requests, a.samples)
    tb = best_of(lambda: baseline(trace, req))
    fn = lambda: attribute([trace], req, idle_w=90.0)  # noqa: E731
    rows.append(("time-share, idle given", a.requests, a.samples, best_of(fn), tb, *cpu_and_peak(fn)))
    fn = lambda: attribute([trace], req)  # noqa: E731
    rows.append(("time-share, idle estimated", a.requests, a.samples, best_of(fn), tb, *cpu_and_peak(fn)))
    # batch-fit: 2 steps per request (4 requests a step), the step model chosen by cross-validation,
    # the window by held-out readings, a 90 % band per request; a sensor read every 10 ms
    n_bf = a.batch_requests
    trace, req, steps = make(n_bf, a.batch_samples, steps_per_req=2)
    tb2 = best_of(lambda: baseline(trace, req))
    fn = lambda: attribute([trace], req, steps, idle_w=90.0)  # noqa: E731
    rows.append((f"batch-fit, {len(steps):,} steps, model selection + bands", len(req), len(trace), best_of(fn, repeat=2), tb2,
                 *cpu_and_peak(fn)))
    fn = lambda: attribute([trace], req, steps)  # noqa: E731
    rows.append((f"batch-fit, {len(steps):,} steps, idle estimated too", len(req), len(trace), best_of(fn, repeat=2), tb2,
                 *cpu_and_peak(fn)))
    lines = [
        "# Attribution throughput",
        "",
        f"Command: `python benchmarks/attribution_speed.py --requests {a.requests} --samples {a.samples} --batch-requests {a.batch_requests} --batch-samples {a.batch_samples}`",
        f"Machine: {platform.machine()}, {os.cpu_count()} cores ({platform.processor() or 'cpu'}), Python {platform.python_version()}, numpy {np.__version__}, OMP_NUM_THREADS=1. Best of 3 (batch-fit: of 2). The machine was shared with other jobs while this ran.",
        "",
        "| case | requests | samples | wattspan s | requests/s | samples/s | baseline s | ratio | CPU s | peak MiB |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, nr, nsamp, tw, tb, cpu, peak in rows:
        lines.append(f"| {name} | {nr:,} | {nsamp:,} | {tw:.3f} | {nr / tw:,.0f} | {nsamp / tw:,.0f} | {tb:.3f} | {tw / tb:.1f}x | {cpu:.3f} | {peak:,.0f} |")
    lines += ["", "Baseline: cumulative trapezoid of the trace and one `np.interp` at each request's start and end (no sharing, no idle, no conservation).",
              "CPU s: this process's least CPU time over the timed calls and one more (`time.process_time`; other jobs on the machine inflate it less than the wall time). "
              "Peak MiB: the most memory that call held at once beyond its inputs (`tracemalloc`, numpy's arrays included)."]
    text = "\n".join(lines) + "\n"
    print(text)
    write_results(a, "attribution_speed.md", text)


if __name__ == "__main__":
    main()
