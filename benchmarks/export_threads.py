"""Where exporting costs CPU, thread by thread: OpenTelemetry alone vs OpenTelemetry + wattspan exporting.

    python benchmarks/export_threads.py [--requests 10000] [--rounds 5] [--base REV] [--profile N] [--record]

Each round runs, each in a fresh interpreter and in a rotated order, the ``otel`` and
``otel+wattspan`` variants of ``benchmarks/overhead_app.py`` (OpenTelemetry's ASGI
middleware, a tracer provider whose BatchSpanProcessor exports nowhere; wattspan with
its span processor, OTel metrics on an in-memory reader and the SQLite ledger),
calling the app in process ``--requests`` times on the trivial ``/`` after a warm-up,
then draining (every record final and handed to the sinks, the ledger committed, the
span processor flushed).

CPU is read per thread from ``/proc/self/task/<tid>/schedstat`` (nanoseconds on the
CPU, user and system, of that thread alone), so the figures hold on a loaded machine
where wall time and even the whole process's CPU do not: a thread waiting for the GIL
or for a core costs nothing here, what it does when it runs is counted. Columns, us per
request: ``loop`` (the thread running the event loop, while the requests run), ``meter``
(the meter's pass: attribution and the sinks' ``on_records``), ``bsp`` (the SDK's
BatchSpanProcessor worker), ``ledger`` (the ledger's writer thread), ``hold`` (the span
processor's timer thread), ``sampler`` (its cost is per second, not per request: it
varies with the machine's load, and is shown apart), ``drain`` (the main thread's
share after the requests: waiting for and flushing the sinks), ``other`` (any other
thread, and threads that ended during the run: the process's CPU minus the threads
seen). ``total`` is the process's CPU (``time.process_time``); ``gc`` the part of the
loop's CPU spent in the cyclic garbage collector (``gc.callbacks``), ``cs`` the loop
thread's context switches per request (voluntary + involuntary: a GIL hand-off is one); ``tracked``
the objects the garbage collector tracks as the last request ends (thousands: what every full
collection scans, at that moment).
The metrics are read by an in-memory reader (no reader thread), as in overhead_app.

``--base REV`` also runs the ``otel+wattspan`` variant on the wattspan package of git
revision ``REV`` (its ``middleware/`` extracted with ``git archive`` into a temporary
directory, imported ahead of this checkout's), interleaved in the same rounds with the
same app, so that before and after come out of one run, as a ratio within each round.
``--profile N`` profiles the event loop's thread (cProfile) in one ``otel+wattspan``
run of ``N`` requests and prints its top functions; ``--profile-meter N`` does the same
for the meter's passes (attribution and the sinks' ``on_records``, on its thread). ``--record`` writes
``benchmarks/results/export_threads.md``.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

GROUPS = ("loop", "meter", "bsp", "ledger", "hold", "sampler", "drain", "other")


def _group(name: str) -> str:
    if name == "wattspan-meter":
        return "meter"
    if name.startswith("OtelBatchSpan"):
        return "bsp"
    if name.startswith("wattspan-ledger"):
        return "ledger"
    if name == "wattspan-span-hold":
        return "hold"
    if name == "wattspan-sampler":
        return "sampler"
    return "other"


def _task_ns(tid: int) -> int:
    try:
        with open(f"/proc/self/task/{tid}/schedstat") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 0


def _switches(tid: int) -> int:
    n = 0
    try:
        with open(f"/proc/self/task/{tid}/status") as f:
            for line in f:
                if line.startswith(("voluntary_ctxt_switches", "nonvoluntary_ctxt_switches")):
                    n += int(line.split()[1])
    except OSError:
        pass
    return n


def _snapshot() -> dict[int, tuple[str, int]]:
    return {t.native_id: (t.name, _task_ns(t.native_id)) for t in threading.enumerate() if t.native_id is not None}


def _switches_split(tid: int) -> tuple[int, int]:
    """A thread's (voluntary, involuntary) context switches so far: it waited (a lock, the GIL, I/O), or
    it was put off its core."""
    vol = inv = 0
    try:
        with open(f"/proc/self/task/{tid}/status") as f:
            for line in f:
                if line.startswith("voluntary_ctxt_switches"):
                    vol = int(line.split()[1])
                elif line.startswith("nonvoluntary_ctxt_switches"):
                    inv = int(line.split()[1])
    except OSError:
        pass
    return vol, inv


def _switch_counts() -> dict[int, tuple[str, tuple[int, int]]]:
    """Each thread's (voluntary, involuntary) context switches so far."""
    return {t.native_id: (t.name, _switches_split(t.native_id)) for t in threading.enumerate() if t.native_id is not None}


def _app_with(sinks: set[str]):
    """The otel+wattspan app of overhead_app with only these of wattspan's sinks (spans, metrics, ledger)."""
    import benchmarks.overhead_app as mod
    from opentelemetry.instrumentation.asgi import OpenTelemetryMiddleware

    from wattspan import EnergyMiddleware
    from wattspan.export.ledger import Ledger
    from wattspan.export.otel import EnergyMetrics

    app = mod.create("bare")
    provider = mod._tracer_provider("spans" in sinks)
    meter = mod._meter(True, provider if "spans" in sinks else None)
    for sink in meter.sinks:
        if (isinstance(sink, Ledger) and "ledger" not in sinks) or (isinstance(sink, EnergyMetrics) and "metrics" not in sinks):
            meter.remove_sink(sink)
            if isinstance(sink, Ledger):
                sink.close()
    app.add_middleware(EnergyMiddleware, meter=meter)
    app.add_middleware(OpenTelemetryMiddleware, tracer_provider=provider)
    app.state.meter, app.state.tracer_provider = meter, provider
    return app


def child(variant: str, n: int, profile: bool, sinks: str | None = None, profile_meter: bool = False) -> dict:
    sys.path.insert(0, str(ROOT))
    import benchmarks.overhead_app as mod

    app = mod.create(variant) if sinks is None else _app_with(set(sinks.split(",")) - {""})
    from benchmarks._common import empty_receive as receive, http_scope, ignore_send as send

    scope_base = http_scope()

    async def run(k):
        for _ in range(k):
            await app(dict(scope_base), receive, send)

    asyncio.run(run(min(500, n)))  # warm up (and start the meter and the exporters' threads)
    meter = app.state.meter
    provider = app.state.tracer_provider
    if meter is not None:
        meter.drain(30)
    provider.force_flush(30_000)

    main = threading.get_native_id()
    gc_ns = [0]
    gc_at = [0]
    gc_gen = [[0, 0], [0, 0], [0, 0]]  # per generation: collections on the loop, their ns

    gc_other: dict[str, int] = {}  # the collector's CPU on the other threads, by group
    gc_other_at: dict[int, int] = {}
    gc_other_gen: dict[str, list[int]] = {}

    def on_gc(phase, info):  # the collector's CPU, by the thread it ran on
        tid = threading.get_native_id()
        if tid != main:
            if phase == "start":
                gc_other_at[tid] = time.thread_time_ns()
            elif tid in gc_other_at:
                g = _group(threading.current_thread().name)
                d = time.thread_time_ns() - gc_other_at.pop(tid)
                gc_other[g] = gc_other.get(g, 0) + d
                gk = f"{g}.gen{info['generation']}"  # collections of each generation on that thread, and their CPU
                c_ns = gc_other_gen.setdefault(gk, [0, 0])
                c_ns[0] += 1
                c_ns[1] += d
            return
        if phase == "start":
            gc_at[0] = time.thread_time_ns()
        else:
            d = time.thread_time_ns() - gc_at[0]
            gc_ns[0] += d
            g = gc_gen[info["generation"]]
            g[0] += 1
            g[1] += d

    from benchmarks._common import time_sinks

    # each sink's on_records timed on the meter's thread
    sink_ns: dict[str, int] = time_sinks(meter) if meter is not None else {}

    part_ns: dict[str, int] = {}
    if meter is not None:  # the meter pass's parts, timed on its thread (instance attributes over the methods)
        import wattspan.meter.core as core

        def timer(name, fn):
            def timed_part(*args, _fn=fn, **kw):
                t = time.thread_time_ns()
                try:
                    return _fn(*args, **kw)
                finally:
                    part_ns[name] = part_ns.get(name, 0) + time.thread_time_ns() - t
            return timed_part
        for name in ("_pass", "_drain", "_attribute", "_finalise", "_to_sinks", "_publish_balance"):
            if hasattr(meter, name):
                setattr(meter, name, timer(name, getattr(meter, name)))
        for name in ("request_records", "request_batch"):  # building the records (or their columns)
            if hasattr(core, name):
                setattr(core, name, timer("request_records", getattr(core, name)))

    mprof = None
    if profile_meter and meter is not None:  # cProfile of the meter's passes, on its own thread
        import cProfile

        mprof = cProfile.Profile(time.thread_time_ns, 1e-9)  # CPU of the meter thread, not wall (the GIL waits)

        def profiled_pass(_fn=meter._pass):
            mprof.enable()
            try:
                _fn()
            finally:
                mprof.disable()
        meter._pass = profiled_pass

    gc.callbacks.append(on_gc)
    prof = None
    if profile:
        import cProfile

        prof = cProfile.Profile()
    w0 = _switch_counts()
    s0, p0, l0, cs0 = _snapshot(), time.process_time_ns(), time.thread_time_ns(), _switches(main)
    if prof is not None:
        prof.enable()
    asyncio.run(run(n))
    if prof is not None:
        prof.disable()
    l1, cs1, gcl = time.thread_time_ns(), _switches(main), gc_ns[0]
    w1 = _switch_counts()
    gc.callbacks.remove(on_gc)
    objs = gc.get_objects()
    tracked = len(objs)  # what a full collection scans, as the last request ended (counted in drain)
    if os.environ.get("EXPORT_THREADS_TYPES"):  # which types those are (the most common 15)
        from collections import Counter

        types = Counter(type(o).__qualname__ for o in objs).most_common(15)
    del objs
    if meter is not None:
        meter.drain(60)
        assert meter.counters["records"] >= n, meter.counters
    provider.force_flush(60_000)
    s1, p1 = _snapshot(), time.process_time_ns()
    per = dict.fromkeys(GROUPS, 0.0)
    seen = 0
    for tid, (name, ns) in s1.items():
        d = ns - s0.get(tid, (name, 0))[1]
        seen += d
        if tid == main:
            per["loop"] += l1 - l0
            per["drain"] += d - (l1 - l0)
        else:
            per[_group(name)] += d
    per["other"] += max(0, (p1 - p0) - seen)  # threads that ended in the run
    out = {k: v / n / 1e3 for k, v in per.items()}
    out["total"] = (p1 - p0) / n / 1e3
    out["gc"] = gcl / n / 1e3
    out["cs"] = (cs1 - cs0) / n
    out["tracked"] = tracked / 1e3
    if os.environ.get("EXPORT_THREADS_TYPES"):
        out["types"] = types
    # context switches per thread group while the requests ran (per 1,000 requests): "<group>" voluntary
    # (it waited: the GIL, a lock, a condition), "<group>.inv" involuntary (put off its core)
    cs_threads: dict[str, int] = {}
    for tid, (name, (vol, inv)) in w1.items():
        g = "loop" if tid == main else _group(name)
        v0, i0 = w0.get(tid, (name, (0, 0)))[1]
        cs_threads[g] = cs_threads.get(g, 0) + vol - v0
        cs_threads[g + ".inv"] = cs_threads.get(g + ".inv", 0) + inv - i0
    out["cs_threads"] = {k: v / n * 1e3 for k, v in cs_threads.items()}
    out["gc_gen"] = [[c, ns / n / 1e3] for c, ns in gc_gen]
    out["gc_threads"] = {k: v / n / 1e3 for k, v in gc_other.items()}
    out["gc_threads_gen"] = {k: [c, ns / n / 1e3] for k, (c, ns) in gc_other_gen.items()}
    out["sinks"] = {k: v / n / 1e3 for k, v in sink_ns.items()}
    out["meter_parts"] = {k: v / n / 1e3 for k, v in part_ns.items()}
    out["wattspan"] = __import__("wattspan").__file__
    proc = getattr(provider, "_wattspan_processor", None)
    if proc is not None:
        out["spans"] = proc.stats()
    if meter is not None:
        meter.close()
        for sink in meter.sinks:
            if hasattr(sink, "close"):
                sink.close()
    if prof is not None:
        import io
        import pstats

        buf = io.StringIO()
        st = pstats.Stats(prof, stream=buf)
        st.sort_stats("tottime").print_stats(30)
        st.sort_stats("cumtime").print_stats("wattspan|middleware/", 30)  # wattspan's own functions
        out["profile"] = buf.getvalue()
    if mprof is not None:
        import io
        import pstats

        buf = io.StringIO()
        st = pstats.Stats(mprof, stream=buf)
        st.sort_stats("tottime").print_stats(40)
        st.sort_stats("cumtime").print_stats(40)
        out["profile"] = buf.getvalue()
    return out


def _extract(rev: str) -> str:
    """``rev``'s wattspan package (``middleware/``) in a temporary directory, importable as ``wattspan``."""
    d = tempfile.mkdtemp(prefix="wattspan-base-")
    arch = subprocess.run(["git", "archive", rev, "middleware"], cwd=ROOT, capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", d], input=arch, check=True)
    os.symlink(os.path.join(d, "middleware"), os.path.join(d, "wattspan"))
    return d


def _run(variant: str, n: int, tree: str | None, profile: bool = False, sinks: str | None = None,
         profile_meter: bool = False) -> dict:
    env = dict(os.environ)
    if tree:
        env["PYTHONPATH"] = tree + os.pathsep + env.get("PYTHONPATH", "")
    args = [sys.executable, __file__, "--_child", variant, "--requests", str(n)] + (["--_profile"] if profile else []) + (
        ["--_sinks", sinks] if sinks is not None else []) + (["--_profile_meter"] if profile_meter else [])
    out = subprocess.run(args, capture_output=True, text=True, cwd=ROOT, env=env)
    if out.returncode:
        raise SystemExit(f"{variant} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--requests", type=int, default=10000)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--base", default="", help="a git revision whose wattspan runs beside this checkout's (before/after)")
    ap.add_argument("--profile", type=int, default=0, help="profile the event loop in one otel+wattspan run of N requests")
    ap.add_argument("--profile-meter", type=int, default=0,
                    help="profile the meter's thread (its passes: attribution and the sinks) in one otel+wattspan run of N requests")
    sys.path.insert(0, str(ROOT))
    from benchmarks._common import add_output_args, progress, write_results

    add_output_args(ap, "export_threads.md")
    a = ap.parse_args()
    if a.profile:
        print(_run("otel+wattspan", a.profile, None, profile=True)["profile"])
        return
    if a.profile_meter:
        print(_run("otel+wattspan", a.profile_meter, None, profile_meter=True)["profile"])
        return
    runs: dict[str, tuple[str, str | None]] = {"otel": ("otel", None), "this": ("otel+wattspan", None)}
    base_dir = None
    if a.base:
        base_dir = _extract(a.base)
        runs["base"] = ("otel+wattspan", base_dir)
    keys = list(runs)
    res: dict[str, list[dict]] = {k: [] for k in keys}
    for r in range(a.rounds):
        order = keys[r % len(keys):] + keys[: r % len(keys)]
        for k in order:
            variant, tree = runs[k]
            res[k].append(_run(variant, a.requests, tree))
            x = res[k][-1]
            progress(f"round {r + 1}/{a.rounds} {k}: total {x['total']:.1f} us/request, loop {x['loop']:.1f}, "
                     f"meter {x['meter']:.1f}, bsp {x['bsp']:.1f}, ledger {x['ledger']:.1f}")
    if base_dir and "middleware" not in res["base"][0]["wattspan"].replace(base_dir, "middleware"):
        raise SystemExit("the base run did not import the base tree's wattspan")
    cols = (*GROUPS, "total", "gc", "cs", "tracked")
    med = lambda k, c: statistics.median(x[c] for x in res[k])  # noqa: E731
    names = {"otel": "otel (OpenTelemetry alone)", "this": "otel+wattspan, this tree", "base": f"otel+wattspan, {a.base}"}
    lines = [
        "# Exporting: CPU per request, thread by thread",
        "",
        f"Command: `python benchmarks/export_threads.py --requests {a.requests} --rounds {a.rounds}"
        f"{' --base ' + a.base if a.base else ''} {'--out ' + str(a.out) if a.out is not None else '--record'}`",
        f"Machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}; load average at the end "
        f"{os.getloadavg()[0]:.1f} (1 min). Per-thread CPU from `/proc/self/task/*/schedstat` (see the script's docstring);",
        f"{a.requests:,} requests to the trivial `/` of `benchmarks/overhead_app.py` per run, {a.rounds} interleaved rounds,",
        "each run in a fresh interpreter; median over rounds, us of CPU per request (`gc`: the part of `loop` spent in the",
        "cyclic garbage collector; `cs`: the loop's context switches per request; `tracked`: thousands of objects the",
        "garbage collector tracks as the last request ends, what each full collection scans).",
        "",
        "| run | " + " | ".join(cols) + " |",
        "|---|" + "---:|" * len(cols),
    ]
    for k in keys:
        lines.append(f"| {names[k]} | " + " | ".join(f"{med(k, c):.2f}" if c == "cs" else f"{med(k, c):.1f}" for c in cols) + " |")
    lines += ["", "wattspan's part (the otel+wattspan run minus the otel run of the same round), median (range), us per request:", "",
              "| run | " + " | ".join(("loop", "meter", "bsp", "ledger", "total", "total less sampler")) + " |",
              "|---|" + "---:|" * 6]
    extra: dict[str, list[float]] = {}
    for k in keys[1:]:
        cells = []
        for c in ("loop", "meter", "bsp", "ledger", "total", "nosampler"):
            if c == "nosampler":
                xs = [(x["total"] - x["sampler"]) - (y["total"] - y["sampler"]) for x, y in zip(res[k], res["otel"])]
            else:
                xs = [x[c] - y[c] for x, y in zip(res[k], res["otel"])]
            extra[f"{k}.{c}"] = xs
            cells.append(f"{statistics.median(xs):+.1f} ({min(xs):+.1f} to {max(xs):+.1f})")
        lines.append(f"| {names[k]} | " + " | ".join(cells) + " |")
    if a.base:
        lines += ["", f"This tree over {a.base}, within each round (CPU per request, otel+wattspan runs), median (range):", ""]
        for c in ("loop", "gc", "meter", "bsp", "ledger", "total", "tracked"):
            rs = [x[c] / y[c] for x, y in zip(res["this"], res["base"]) if y[c] > 0]
            if rs:
                lines.append(f"* {c}: {statistics.median(rs):.2f}x ({min(rs):.2f}x to {max(rs):.2f}x)")
        xs = [t / b for t, b in zip(extra["this.nosampler"], extra["base.nosampler"]) if b > 0]
        if xs:
            lines.append(f"* wattspan's part (total less sampler, minus otel): {statistics.median(xs):.2f}x "
                         f"({min(xs):.2f}x to {max(xs):.2f}x)")
    # the meter thread's pass, part by part (the child's timers on that thread), and each thread's context switches
    parts = ("_pass", "_drain", "_attribute", "request_records", "_to_sinks")
    sink_names = ("EnergySpanProcessor", "Ledger", "EnergyMetrics")
    lines += ["", "The meter's pass on its thread (the child's timers; `_pass` is all of it; `request_records`: building the",
              "records' columns; `_to_sinks`: the sinks' `on_records`, then each sink's), median over rounds, us per request:", "",
              "| run | " + " | ".join((*parts, *sink_names)) + " |", "|---|" + "---:|" * (len(parts) + len(sink_names))]
    for k in keys[1:]:
        cells = [statistics.median(x.get("meter_parts", {}).get(c, 0.0) for x in res[k]) for c in parts]
        cells += [statistics.median(x.get("sinks", {}).get(c, 0.0) for x in res[k]) for c in sink_names]
        lines.append(f"| {names[k]} | " + " | ".join(f"{v:.2f}" for v in cells) + " |")
    groups = [g for g in ("loop", "meter", "ledger", "bsp", "hold", "sampler") if any(g in x.get("cs_threads", {}) for k in keys for x in res[k])]
    if groups:
        lines += ["", "Context switches per 1,000 requests while the requests ran, by thread: voluntary (it waited: the GIL, a",
                  "lock) / involuntary (put off its core: the machine's other jobs), median over rounds:", "",
                  "| run | " + " | ".join(groups) + " |", "|---|" + "---:|" * len(groups)]
        for k in keys:
            cs = [f"{statistics.median(x.get('cs_threads', {}).get(g, 0.0) for x in res[k]):.1f} / "
                  f"{statistics.median(x.get('cs_threads', {}).get(g + '.inv', 0.0) for x in res[k]):.1f}" for g in groups]
            lines.append(f"| {names[k]} | " + " | ".join(cs) + " |")
    spans = res["this"][-1].get("spans")
    if spans:
        lines += ["", "The span processor's counters in the last run of this tree: "
                  + ", ".join(f"{k} {v}" for k, v in spans.items() if v) + "."]
    text = "\n".join(lines) + "\n"
    print(text)
    write_results(a, "export_threads.md", text)


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--_child":
        n = int(sys.argv[sys.argv.index("--requests") + 1])
        sinks = sys.argv[sys.argv.index("--_sinks") + 1] if "--_sinks" in sys.argv else None
        print(json.dumps(child(sys.argv[2], n, "--_profile" in sys.argv, sinks, "--_profile_meter" in sys.argv)))
    else:
        main()
