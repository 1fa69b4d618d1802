"""wattspan alone (middleware + meter, no exporter): CPU per request of each thread, A/B against a base revision.

    python benchmarks/alone_cpu.py [--requests 5000] [--work-requests 500] [--rounds 5] [--base REV] [--with-sink] [--record]

Per-thread CPU time (``time.pthread_getcpuclockid``), so a loaded machine moves the
figures much less than wall time or the whole-process benchmark (``overhead.py``) do:
the variants of ``benchmarks/overhead_app.py`` (``bare``; ``wattspan``: EnergyMiddleware
and a live meter on a replayed constant 300 W trace) are called in process as ASGI apps,
each (tree, variant, endpoint) in a fresh interpreter, in ``--rounds`` interleaved
rounds (order rotated). ``--requests`` requests to the trivial ``/`` and
``--work-requests`` to ``/work`` (~1 ms of Python). For each run: the event loop's
thread CPU over the requests; the meter's and the sampler's thread CPU from before
the first request until every record is final (``Meter.drain``); the whole process's
(``time.process_time``) over the same stretch; all divided by the requests. Then each
thread's CPU per wall-second over 1 s with nothing in flight (the idle cost). The ``/work``
capacity is given measured (bare's process CPU over the variant's, within each round: blurred by
the endpoint's own CPU, which varies by several per cent between runs on a shared machine) and
from the threads' figures (bare's ``/work`` CPU over itself plus the event loop's extra per
request on ``/`` and the meter's and the sampler's CPU per ``/work`` request).

``--with-sink``: also ``wattspan+sink``, the same meter with a sink that takes the records and
drops them (``BatchCallback``): the records are built (without a sink the meter counts the final
requests and their energy and builds none).

``--base REV``: the same runs with the ``wattspan`` package of git revision ``REV``
(``git archive``d into a temporary directory), interleaved with this tree's; the
table gives this tree over the base as a ratio within each round (median, range).
Extra: the wattspan variant minus bare within each round (median). Prints the
table; ``--record`` writes ``benchmarks/results/alone_cpu.md``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FIELDS = ("loop_us", "meter_us", "sampler_us", "process_us", "idle_meter_ms_s", "idle_sampler_ms_s")


def _thread_clock(name: str):
    for t in threading.enumerate():
        if t.name == name and t.ident is not None:
            cid = time.pthread_getcpuclockid(t.ident)
            return lambda: time.clock_gettime(cid)
    return lambda: 0.0


def child(variant: str, n: int, path: str) -> dict:
    from benchmarks.overhead_app import create

    app = create("wattspan" if variant == "wattspan+sink" else variant)
    if variant == "wattspan+sink":
        from wattspan.meter import BatchCallback

        app.state.meter.add_sink(BatchCallback(lambda records: None))
    from benchmarks._common import empty_receive as receive, http_scope, ignore_send as send

    scope_base = http_scope(path, headers=((b"user-agent", b"bench"), (b"accept", b"*/*")))

    async def run(k):
        for _ in range(k):
            await app(dict(scope_base), receive, send)

    asyncio.run(run(min(500, n)))  # warm up (and start the meter)
    meter = app.state.meter
    if meter is not None:
        meter.wait_ready(10)
        meter.flush(10)
    mclock, sclock = _thread_clock("wattspan-meter"), _thread_clock("wattspan-sampler")
    m0, s0, c0 = mclock(), sclock(), time.process_time()
    l0 = time.thread_time()
    asyncio.run(run(n))
    l1 = time.thread_time()
    if meter is not None:
        meter.drain(60)
        assert meter.counters["records"] >= n, meter.counters
    m1, s1, c1 = mclock(), sclock(), time.process_time()
    out = {"loop_us": (l1 - l0) / n * 1e6, "meter_us": (m1 - m0) / n * 1e6, "sampler_us": (s1 - s0) / n * 1e6,
           "process_us": (c1 - c0) / n * 1e6}
    w0, m0, s0 = time.monotonic(), mclock(), sclock()
    time.sleep(1.0)
    w = time.monotonic() - w0
    out["idle_meter_ms_s"] = (mclock() - m0) / w * 1e3
    out["idle_sampler_ms_s"] = (sclock() - s0) / w * 1e3
    if meter is not None:
        meter.close()
    return out


def _base_tree(rev: str) -> str:
    d = tempfile.mkdtemp(prefix="wattspan-base-")
    tar = subprocess.run(["git", "archive", rev, "middleware"], cwd=ROOT, capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", d], input=tar, check=True)
    os.rename(os.path.join(d, "middleware"), os.path.join(d, "wattspan"))
    return d


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=5000)
    ap.add_argument("--work-requests", type=int, default=500)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--base", default=None, help="git revision to compare this tree's wattspan with")
    ap.add_argument("--with-sink", action="store_true", help="also the meter with a sink that takes the records")
    sys.path.insert(0, str(ROOT))
    from benchmarks._common import add_output_args, progress, write_results

    add_output_args(ap, "alone_cpu.md")
    a = ap.parse_args()
    trees = {"this": None}
    if a.base:
        trees["base"] = _base_tree(a.base)
    runs = [("bare", None)] + [("wattspan", t) for t in trees] + ([("wattspan+sink", t) for t in trees] if a.with_sink else [])
    res: dict = {(v, t, p): [] for v, t in runs for p in ("/", "/work")}
    for r in range(a.rounds):
        order = runs[r % len(runs):] + runs[: r % len(runs)]
        for v, t in order:
            for p, n in (("/", a.requests), ("/work", a.work_requests)):
                cmd = [sys.executable, __file__, "--_child", v, str(n), p]
                if t is not None and trees[t] is not None:
                    cmd += ["--tree", trees[t]]
                out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
                if out.returncode:
                    raise SystemExit(out.stderr)
                d = json.loads(out.stdout.strip().splitlines()[-1])
                res[(v, t, p)].append(d)
                progress(f"round {r + 1}/{a.rounds} {v}{'@' + t if t else ''} {p}: " + ", ".join(f"{k} {d[k]:.1f}" for k in FIELDS))

    med = statistics.median
    lines = ["# wattspan alone: CPU per request by thread", "",
             f"Command: `python benchmarks/alone_cpu.py --requests {a.requests} --work-requests {a.work_requests} --rounds {a.rounds}"
             f"{' --base ' + a.base if a.base else ''}{' --with-sink' if a.with_sink else ''} --record`",
             f"Machine: {os.cpu_count()} cores, load average at the end {os.getloadavg()[0]:.1f}. Each run in a fresh interpreter, "
             "interleaved rounds; medians over rounds. us/request: thread CPU (`pthread_getcpuclockid`) over the requests "
             "(event loop) or until every record is final (meter, sampler, whole process); idle: CPU per wall-second with "
             "nothing in flight, ms/s.", ""]
    for p in ("/", "/work"):
        lines += [f"## `{p}`", "", "| run | event loop us/req | meter thread us/req | sampler us/req | process us/req | "
                  "extra vs bare (process) | extra vs bare (loop) | idle meter ms/s | idle sampler ms/s |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        bare = res[("bare", None, p)]
        for v, t in runs:
            xs = res[(v, t, p)]
            name = v if v == "bare" else f"{v} ({t} tree)"
            ex = "-" if v == "bare" else f"{med(x['process_us'] - b['process_us'] for x, b in zip(xs, bare)):+.1f}"
            exl = "-" if v == "bare" else f"{med(x['loop_us'] - b['loop_us'] for x, b in zip(xs, bare)):+.1f}"
            lines.append(f"| {name} | {med(x['loop_us'] for x in xs):.1f} | {med(x['meter_us'] for x in xs):.1f} | "
                         f"{med(x['sampler_us'] for x in xs):.2f} | {med(x['process_us'] for x in xs):.1f} | {ex} | {exl} | "
                         f"{med(x['idle_meter_ms_s'] for x in xs):.2f} | {med(x['idle_sampler_ms_s'] for x in xs):.2f} |")
        if p == "/work":
            for v, t in runs[1:]:
                cap = [b["process_us"] / x["process_us"] for x, b in zip(res[(v, t, p)], bare)]
                # the same from the per-thread figures, which the 1 ms endpoint's own CPU (varying by several
                # per cent from run to run on a shared machine) does not blur: bare's /work CPU over it plus the
                # event loop's extra per request on / and the meter's and sampler's CPU per /work request
                est = [b["process_us"] / (b["process_us"] + (xs["loop_us"] - bs["loop_us"]) + x["meter_us"] + x["sampler_us"])
                       for x, b, xs, bs in zip(res[(v, t, p)], bare, res[(v, t, "/")], res[("bare", None, "/")])]
                lines.append(f"\n`/work` capacity, {v} ({t} tree) vs bare (bare's process CPU over the variant's, "
                             f"per round): measured {med(cap):.3f}x ({min(cap):.3f}x to {max(cap):.3f}x); from the threads' "
                             f"figures {med(est):.3f}x ({min(est):.3f}x to {max(est):.3f}x)")
        lines.append("")
        for v in (("wattspan", "wattspan+sink") if a.with_sink else ("wattspan",)) if a.base else ():
            lines += [f"{v}: this tree over the base, `{p}`, within each round (median, range):", ""]
            this, base = res[(v, "this", p)], res[(v, "base", p)]
            for k in ("loop_us", "meter_us", "sampler_us", "process_us"):
                rs = [x[k] / y[k] for x, y in zip(this, base) if y[k] > 0]
                if rs:
                    lines.append(f"- {k}: {med(rs):.2f}x ({min(rs):.2f}x to {max(rs):.2f}x)")
            for k, name in (("process_us", "whole-process"), ("loop_us", "event-loop")):
                xb = [(x[k] - b[k]) / (y[k] - b[k]) for x, y, b in zip(this, base, bare) if y[k] - b[k] > 0]
                if xb:
                    lines.append(f"- {name} extra over bare: {med(xb):.2f}x ({min(xb):.2f}x to {max(xb):.2f}x)")
            lines.append("")
    text = "\n".join(lines) + "\n"
    print(text)
    write_results(a, "alone_cpu.md", text)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--_child":
        if "--tree" in sys.argv:
            sys.path.insert(0, sys.argv[sys.argv.index("--tree") + 1])
        sys.path.insert(1, str(ROOT))
        import wattspan  # noqa: F401  (from --tree when given)

        if "--tree" in sys.argv:
            assert wattspan.__file__.startswith(sys.argv[sys.argv.index("--tree") + 1]), wattspan.__file__
        print(json.dumps(child(sys.argv[2], int(sys.argv[3]), sys.argv[4])))
    else:
        main()
