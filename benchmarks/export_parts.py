"""The exporting path's parts, each alone: the meter's pass and its sinks, the ledger's writer, a held span's packing.

    python benchmarks/export_parts.py [--rounds 3] [--base REV] [--record]

``benchmarks/export_threads.py`` measures the threads of a live process, where the machine's
load and the threads' interplay move a figure by tens of microseconds. This drives the parts
by hand, in a fresh interpreter per tree and round (``--base REV``: the wattspan package of git
revision ``REV`` as well, interleaved, as in export_threads.py), with no background thread
running while a part is timed:

* ``pass``: 2,000 requests served in process through OpenTelemetry's ASGI middleware and
  wattspan (``benchmarks/overhead_app.py``'s otel+wattspan app, its meter not started), then one
  meter pass made by hand (``Meter._pass``: attribution, the records, the span processor, the
  metrics, the ledger), timed with ``time.thread_time``, the garbage collector off for it; three
  passes per run after a first left out. Columns: the whole pass and each sink's
  ``on_records``, us per request; ``writer``: the ledger's writer thread committing that pass's
  rows (its CPU from ``/proc/self/task/<tid>/schedstat``), us per row.
* ``pack``: ``EnergySpanProcessor._pack`` of an ended server span (what the event loop does for
  each held span), ns per span, the least of 30 times 3,000 spans.
* ``window``, ``window_otel``: what ``EnergyMiddleware`` adds to the event loop's CPU per request, the
  same app with and without it in one process (its meter not started), the least of 12 runs of
  1,000 requests each: on bare Starlette, and under OpenTelemetry's ASGI middleware.

Prints the median over rounds of each tree's figures (``pack``: the least), and the ratio
within rounds; ``--record`` writes ``benchmarks/results/export_parts.md``.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
N = 2000
ATTRS = {"http.scheme": "http", "http.host": "127.0.0.1:8000", "net.host.port": 8000, "http.flavor": "1.1",
         "http.target": "/", "http.url": "http://127.0.0.1:8000/", "http.method": "GET", "http.server_name": "127.0.0.1",
         "net.peer.ip": "127.0.0.1", "net.peer.port": 5000, "http.status_code": 200, "http.route": "/"}


def _task_ns(tid: int) -> int:
    with open(f"/proc/self/task/{tid}/schedstat") as f:
        return int(f.read().split()[0])


def _passes() -> list[dict[str, float]]:
    import numpy as np
    from opentelemetry.instrumentation.asgi import OpenTelemetryMiddleware
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader

    import benchmarks.overhead_app as mod
    from wattspan import DeviceTrace, EnergyMiddleware, Meter
    from wattspan.carbon import CarbonModel
    from wattspan.export import otel
    from wattspan.export.ledger import Ledger
    from wattspan.sources.replay import ReplaySource

    t = np.arange(0, 3600 * 10**9, 5 * 10**6, dtype=np.int64)
    trace = DeviceTrace("gpu0", t, np.full(len(t), 300.0), energy_j=300.0 * t * 1e-9, sensor="constant")
    provider = mod._tracer_provider(True)
    proc = provider._wattspan_processor
    bp = proc.downstream._batch_processor
    bp._queue = collections.deque([], 1_000_000)  # room for every span: none waits in the outbox
    metrics = otel.EnergyMetrics(MeterProvider(metric_readers=[InMemoryMetricReader()]))
    ledger = Ledger(os.path.join(tempfile.mkdtemp(), "parts.sqlite"))
    m = Meter(sources=[ReplaySource([trace], loop=True)], carbon=CarbonModel(intensity_g_per_kwh=400.0), idle_w=100.0,
              autostart=False, lag_s=0.0, sinks=[proc, metrics, ledger])
    m._setup()
    m.sampler.stop()
    m.sampler.poll_now()
    time.sleep(0.01)
    m.sampler.poll_now()
    m._pass()
    app = mod.create("bare")
    app.add_middleware(EnergyMiddleware, meter=m)
    app.add_middleware(OpenTelemetryMiddleware, tracer_provider=provider)
    from benchmarks._common import empty_receive as receive, http_scope, ignore_send as send

    scope = http_scope()

    async def run(k):
        for _ in range(k):
            await app(dict(scope), receive, send)

    from benchmarks._common import time_sinks

    sink_ns = time_sinks(m)
    out = []
    for rep in range(4):
        asyncio.run(run(N))
        time.sleep(0.05)
        m.sampler.poll_now()
        sink_ns.clear()
        writer = ledger._thread.native_id
        w0 = _task_ns(writer)
        gc.disable()
        c0 = time.thread_time_ns()
        m._pass()
        c1 = time.thread_time_ns()
        gc.enable()
        assert ledger.flush(30)
        w1 = _task_ns(writer)
        if rep:  # the first pass after the warm-up left out
            row = {"pass": (c1 - c0) / N / 1e3, **{k: v / N / 1e3 for k, v in sink_ns.items()}, "writer": (w1 - w0) / N / 1e3}
            out.append(row)
    assert m.counters["records"] >= 4 * N and proc.stats()["final"] >= 4 * N
    m.sampler.close()
    ledger.close()
    return out


def _pack() -> float:
    from opentelemetry.trace import SpanKind

    import benchmarks.overhead_app as mod

    provider = mod._tracer_provider(True)
    proc = provider._wattspan_processor
    tracer = provider.get_tracer("parts")
    spans = [tracer.start_span("GET /", kind=SpanKind.SERVER, attributes=ATTRS) for _ in range(3000)]
    ended = [s._readable_span() for s in spans]
    pack, best = proc._pack, float("inf")
    for _ in range(30):
        t0 = time.thread_time_ns()
        for s in ended:
            pack(s, 1.0)
        best = min(best, (time.thread_time_ns() - t0) / len(ended))
    return best


def _window(otel: bool, reps: int = 12, n: int = 1000) -> float:
    """What EnergyMiddleware adds to the event loop's CPU per request (us): the same app with and without it,
    alternating in this process, the least of ``reps`` runs of ``n`` requests each; its meter not started
    (no thread runs; its queued events are cleared between runs). ``otel``: both under OpenTelemetry's ASGI
    middleware (no span processor of wattspan's)."""
    import benchmarks.overhead_app as mod
    from wattspan import EnergyMiddleware, Meter
    from wattspan.carbon import CarbonModel

    meter = Meter(sources=[], carbon=CarbonModel(intensity_g_per_kwh=400.0), idle_w=100.0, autostart=False)
    apps = []
    for with_mw in (False, True):
        app = mod.create("bare")
        if with_mw:
            app.add_middleware(EnergyMiddleware, meter=meter)
        if otel:
            from opentelemetry.instrumentation.asgi import OpenTelemetryMiddleware

            app.add_middleware(OpenTelemetryMiddleware, tracer_provider=mod._tracer_provider(False))
        apps.append(app)
    from benchmarks._common import empty_receive as receive, http_scope, ignore_send as send

    scope = http_scope()

    async def run(app, k):
        for _ in range(k):
            await app(dict(scope), receive, send)

    best = [float("inf"), float("inf")]
    for _ in range(reps):
        for j, app in enumerate(apps):
            meter._events.clear()
            gc.collect()
            t0 = time.thread_time_ns()
            asyncio.run(run(app, n))
            best[j] = min(best[j], (time.thread_time_ns() - t0) / n / 1e3)
    return best[1] - best[0]


def child() -> dict[str, float]:
    sys.path.insert(0, str(ROOT))
    rows = _passes()
    out = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
    out["pack"] = _pack()
    out["window"] = _window(False)
    out["window_otel"] = _window(True)
    out["wattspan"] = __import__("wattspan").__file__  # type: ignore[assignment]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--base", default="", help="a git revision whose wattspan runs beside this checkout's")
    sys.path.insert(0, str(ROOT))
    from benchmarks._common import add_output_args, write_results
    from benchmarks.export_threads import _extract

    add_output_args(ap, "export_parts.md")
    a = ap.parse_args()

    trees: dict[str, str | None] = {"this": None}
    if a.base:
        trees[a.base] = _extract(a.base)
    res: dict[str, list[dict[str, float]]] = {k: [] for k in trees}
    keys = list(trees)
    for r in range(a.rounds):
        for k in keys[r % len(keys):] + keys[: r % len(keys)]:
            env = dict(os.environ)
            if trees[k]:
                env["PYTHONPATH"] = str(trees[k]) + os.pathsep + env.get("PYTHONPATH", "")
            p = subprocess.run([sys.executable, __file__, "--_child"], capture_output=True, text=True, cwd=ROOT, env=env)
            if p.returncode:
                raise SystemExit(p.stderr[-3000:])
            res[k].append(json.loads(p.stdout.strip().splitlines()[-1]))
            print(f"round {r + 1}/{a.rounds} {k}: pass {res[k][-1]['pass']:.2f} us/request", file=sys.stderr, flush=True)
    cols = [c for c in res["this"][0] if c != "wattspan"]
    lines = ["# The exporting path's parts, each alone", "",
             f"Command: `python benchmarks/export_parts.py --rounds {a.rounds}{' --base ' + a.base if a.base else ''} --record`",
             f"Machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}; load average at the end "
             f"{os.getloadavg()[0]:.1f} (1 min). What each column is: the script's docstring. Median over {a.rounds} rounds, "
             "each tree in a fresh interpreter per round (`pack`: the least).", "",
             "| tree | " + " | ".join(f"{c} ({'ns/span' if c == 'pack' else 'us/row' if c == 'writer' else 'us/request'})"
                                     for c in cols) + " |",
             "|---|" + "---:|" * len(cols)]
    for k in keys:
        vals = [min(x[c] for x in res[k]) if c == "pack" else statistics.median(x[c] for x in res[k]) for c in cols]
        lines.append(f"| {k} | " + " | ".join(f"{v:.0f}" if c == "pack" else f"{v:.2f}" for c, v in zip(cols, vals)) + " |")
    if a.base:
        lines += ["", f"This tree over {a.base}, within each round, median (range):", ""]
        for c in cols:
            rs = [x[c] / y[c] for x, y in zip(res["this"], res[a.base]) if y[c]]
            lines.append(f"* {c}: {statistics.median(rs):.2f}x ({min(rs):.2f}x to {max(rs):.2f}x)")
    text = "\n".join(lines) + "\n"
    print(text)
    write_results(a, "export_parts.md", text)


if __name__ == "__main__":
    if "--_child" in sys.argv:
        print(json.dumps(child()))
    else:
        main()
