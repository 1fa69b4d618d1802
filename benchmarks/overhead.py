"""What wattspan costs the server it measures, side by side with a bare app and OpenTelemetry.

    python benchmarks/overhead.py [--requests 20000] [--seconds 5] [--rounds 5] [--variants bare,wattspan] [--record]

1. CPU per request, in process: each variant of ``benchmarks/overhead_app.py``
   is called directly as an ASGI app ``--requests`` times, in a fresh
   interpreter; the CPU time of the whole process (every thread: the meter's
   background attribution and the exporters included, until every record is
   final and handed to its sinks) is divided by the requests, and so is the CPU
   time of the thread running the event loop alone. The same for the endpoint
   doing about a millisecond of CPU work (``--requests`` / 5 requests), whose
   baseline CPU over the variant's is the capacity left to a CPU-bound server.
   ``--rounds`` interleaved rounds (every variant once per round, the order
   rotated); extra = variant minus its baseline (bare; OpenTelemetry for
   OpenTelemetry + wattspan) within each round; the table gives the median and
   the range over rounds. After each request the driver lets the event loop
   turn once (``await asyncio.sleep(0)``: the loop polls its selector, as a
   server's loop does between requests, and in that poll the thread lets go
   of the GIL). Called back to back instead (``--no-poll``, the driver before),
   the loop never lets go of the GIL, and every background thread waits the
   interpreter's switch interval (5 ms) each time it let go itself: for every
   numpy call over a large array, for every row SQLite writes. The meter's
   passes then took 160-615 ms of wall time for 17-53 ms of CPU, fell a second
   and more behind, and thousands of held spans and queued rows piled up,
   which the event loop then paid for in cache misses and garbage collection.
   No server runs so: it polls its sockets between requests.
2. Throughput on loopback: each variant served by uvicorn (one worker) in its
   own process (BLAS on one thread), loaded by ``wrk`` (Debian's package) from
   another; ``--rounds`` interleaved rounds, on the trivial endpoint and on one
   doing about a millisecond of CPU work. Ratio = variant / baseline within
   each round; the table gives the median and the range over rounds.

``--variants`` runs only those (each with its baseline: bare for wattspan,
OpenTelemetry for OpenTelemetry + wattspan). Prints the table and its progress; ``--record`` writes ``benchmarks/results/overhead.md``
(``--out PATH`` elsewhere; with ``--variants bare,wattspan``: ``overhead_alone.md``). Without ``wrk`` the throughput columns are n/a, and it says so.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import os
import platform
import re
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def cpu_per_request(variant: str, n: int, path: str = "/", poll: bool = True) -> tuple[float, float]:
    os.environ["WATTSPAN_BENCH_VARIANT"] = variant
    mod = importlib.import_module("benchmarks.overhead_app")
    app = mod.create(variant)
    scope_base = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "GET", "scheme": "http",
                  "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "", "headers": [(b"host", b"127.0.0.1")],
                  "client": ("127.0.0.1", 5000), "server": ("127.0.0.1", 8000)}

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message):
        pass

    async def run(k):
        for _ in range(k):
            await app(dict(scope_base), receive, send)
            if poll:  # one turn of the event loop, as a server's loop takes one (its selector polled) per request
                await asyncio.sleep(0)

    asyncio.run(run(min(500, n)))  # warm up (and start the meter)
    meter = app.state.meter
    if meter is not None:
        meter.flush(10)
    c0, l0 = time.process_time(), time.thread_time()
    asyncio.run(run(n))
    l1 = time.thread_time()  # this thread ran the event loop: its CPU is what the loop paid
    if meter is not None:
        meter.drain(30)  # every record final and handed to the sinks, the buffering ones flushed
    c1 = time.process_time()
    if meter is not None:
        assert meter.counters["records"] >= n, meter.counters
        meter.close()
    provider = getattr(app.state, "tracer_provider", None)
    if provider is not None and meter is None:  # OpenTelemetry alone: its batch export finished too
        provider.force_flush(30_000)
        c1 = time.process_time()
    return (c1 - c0) / n * 1e6, (l1 - l0) / n * 1e6


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def throughput(variant: str, seconds: int, path: str = "/") -> float:
    port = _free_port()
    env = {**os.environ, "WATTSPAN_BENCH_VARIANT": variant, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
    srv = subprocess.Popen([sys.executable, "-m", "uvicorn", "benchmarks.overhead_app:app", "--port", str(port), "--log-level", "warning", "--no-access-log"], env=env, cwd=ROOT)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{variant} server did not start")
                time.sleep(0.1)
        url = f"http://127.0.0.1:{port}{path}"
        subprocess.run(["wrk", "-t1", "-c16", "-d1s", url], capture_output=True, check=True)  # warm up
        out = subprocess.run(["wrk", "-t1", "-c16", f"-d{seconds}s", url], capture_output=True, text=True, check=True).stdout
        return float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    finally:
        srv.terminate()
        srv.wait(10)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=20000)
    ap.add_argument("--seconds", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=5, help="interleaved rounds (CPU and throughput)")
    ap.add_argument("--no-poll", action="store_true",
                    help="call the app back to back, the event loop never turning (the driver before: see the docstring)")
    ap.add_argument("--variants", default="", help="comma-separated subset of the variants (their baselines are added)")
    from benchmarks._common import add_output_args, need_tool, progress, write_results

    add_output_args(ap, "overhead.md")
    a = ap.parse_args()
    from benchmarks.overhead_app import VARIANTS

    base = {"bare": None, "otel": "bare", "wattspan": "bare", "otel+wattspan": "otel"}  # what each variant adds to
    if a.variants:
        wanted = {v.strip() for v in a.variants.split(",") if v.strip()}
        unknown = wanted - set(VARIANTS)
        if unknown:
            raise SystemExit(f"--variants: unknown {sorted(unknown)}; known: {', '.join(VARIANTS)}")
        wanted |= {base[v] for v in wanted if base[v] is not None}
        wanted |= {base[v] for v in wanted if base[v] is not None}
        VARIANTS = tuple(v for v in VARIANTS if v in wanted)
    has_wrk = need_tool("wrk", "the throughput columns", "apt-get install wrk")
    rounds = a.rounds
    est = rounds * len(VARIANTS) * (a.requests / 2000 + 3 + max(200, a.requests // 5) / 700 + 3) + (rounds * len(VARIANTS) * 2 * (a.seconds + 3) if has_wrk else 0)
    progress(f"{len(VARIANTS)} variants: {rounds} rounds of CPU per request, then {rounds if has_wrk else 0} rounds of wrk; about {est / 60:.0f} min")

    cpu = {v: [] for v in VARIANTS}  # per round: (process us/request, event-loop us/request)
    cpu_work = {v: [] for v in VARIANTS}  # per round: process us/request on /work
    n_work = max(200, a.requests // 5)
    for r in range(rounds):  # interleaved, each in a fresh interpreter, the order rotated each round
        order = VARIANTS[r % len(VARIANTS):] + VARIANTS[: r % len(VARIANTS)]
        for v in order:
            for path, n, into in (("/", a.requests, cpu), ("/work", n_work, cpu_work)):
                out = subprocess.run([sys.executable, __file__, "--_cpu", v, "--requests", str(n), "--path", path]
                                     + (["--no-poll"] if a.no_poll else []),
                                     capture_output=True, text=True, cwd=ROOT, check=True)
                proc_us, loop_us = map(float, out.stdout.strip().splitlines()[-1].split())
                into[v].append((proc_us, loop_us))
                progress(f"CPU round {r + 1}/{rounds}, {v} {path}: {proc_us:.1f} us/request, {loop_us:.1f} on the event loop")
    rps = {v: [] for v in VARIANTS}
    work = {v: [] for v in VARIANTS}
    if has_wrk:
        for r in range(rounds):  # interleaved, so drifts of a shared machine hit every variant alike
            for v in VARIANTS:
                rps[v].append(throughput(v, a.seconds))
                work[v].append(throughput(v, a.seconds, "/work"))
                progress(f"round {r + 1}/{rounds}, {v}: {rps[v][-1]:,.0f} req/s trivial, {work[v][-1]:,.0f} req/s /work")

    def med_range(xs, fmt):
        return f"{fmt(statistics.median(xs))} ({fmt(min(xs))} to {fmt(max(xs))})"

    def extra(v, i):
        """Per round: variant minus its baseline (i = 0: whole process, 1: event loop), us/request."""
        return [x[i] - y[i] for x, y in zip(cpu[v], cpu[base[v]])]

    def capacity(v):
        """Per round, on /work: baseline CPU / variant CPU (the throughput ratio of a CPU-bound server)."""
        return [y[0] / x[0] for x, y in zip(cpu_work[v], cpu_work[base[v]])]

    def ratio(d, v):
        if not d["bare"]:
            return "n/a (no wrk)", "n/a"
        if base[v] is None:
            return f"{statistics.median(d[v]):,.0f}", "1.00x"
        rs = [x / y for x, y in zip(d[v], d[base[v]])]
        return f"{statistics.median(d[v]):,.0f}", f"{statistics.median(rs):.2f}x ({min(rs):.2f}-{max(rs):.2f})"

    us = lambda x: f"{x:+.1f}"  # noqa: E731
    times = lambda x: f"{x:.3f}x"  # noqa: E731
    load = os.getloadavg()
    lines = [
        "# Overhead on the server being measured",
        "",
        f"Command: `python benchmarks/overhead.py --requests {a.requests} --seconds {a.seconds} --rounds {rounds}"
        f"{' --variants ' + a.variants if a.variants else ''}{' --no-poll' if a.no_poll else ''} --record`",
        f"Machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}; load average at the end "
        f"{load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} (1 / 5 / 15 min); a Starlette app (`benchmarks/overhead_app.py`).",
        "",
        f"CPU per request, in process: {a.requests:,} requests to the trivial `/` and {n_work:,} to `/work` (~1 ms of Python)",
        f"per variant and round, {rounds} interleaved rounds, each run in a fresh interpreter. Extra: the variant minus its",
        "baseline within each round, median (range over rounds), microseconds; capacity: the baseline's CPU per `/work`",
        "request over the variant's, within each round (the throughput ratio of a server bound by its CPU).",
        ("The app is called back to back, the event loop never turning (`--no-poll`: see the script's docstring)." if a.no_poll
         else "After each request the event loop turns once, its selector polled, as a server's does (see the script's docstring)."),
        "",
        "| variant | baseline | `/`: CPU us/request | extra vs baseline | of which on the event loop | `/work`: CPU us/request | capacity vs baseline |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for v in VARIANTS:
        proc = statistics.median(x[0] for x in cpu[v])
        wproc = statistics.median(x[0] for x in cpu_work[v])
        if base[v] is None:
            lines.append(f"| {v} | - | {proc:.1f} | - | - | {wproc:,.0f} | - |")
        else:
            lines.append(f"| {v} | {base[v]} | {proc:.1f} | {med_range(extra(v, 0), us)} | {med_range(extra(v, 1), us)} | "
                         f"{wproc:,.0f} | {med_range(capacity(v), times)} |")
    lines += [
        "",
        f"Throughput on loopback: uvicorn (one worker) under `wrk -t1 -c16 -d{a.seconds}s` from another process, {rounds if has_wrk else 0}",
        "interleaved rounds, the ratio to the baseline within each round, median (range).",
        "",
        "| variant | baseline | trivial `/`: req/s | vs baseline | `/work`: req/s | vs baseline |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for v in VARIANTS:
        r, rr = ratio(rps, v)
        w, wr = ratio(work, v)
        lines.append(f"| {v} | {base[v] or '-'} | {r} | {rr} | {w} | {wr} |")
    med = lambda v, f: statistics.median(f(v)) if v in VARIANTS else None  # noqa: E731
    w, wl = med("wattspan", lambda v: extra(v, 0)), med("wattspan", lambda v: extra(v, 1))
    wx, o = med("otel+wattspan", lambda v: extra(v, 0)), med("otel", lambda v: extra(v, 0))
    cw, cx = med("wattspan", capacity), med("otel+wattspan", capacity)
    lines.append("")
    if w is not None:
        lines.append(f"wattspan alone adds {w:.1f} us of CPU per request ({wl:.1f} us of it on the event loop); on `/work` it leaves "
                     f"{cw:.3f}x of bare's capacity.")
    if wx is not None:
        lines.append(f"With export (spans held and completed, OTel metrics, the SQLite ledger) wattspan adds {wx:.1f} us on top of "
                     f"OpenTelemetry's ASGI instrumentation, which itself adds {o:.1f} us; on `/work` OpenTelemetry + wattspan "
                     f"exporting leaves {cx:.3f}x of OpenTelemetry's capacity.")
    lines += [
        "CPU is the whole process's (`time.process_time`: the meter's",
        "attribution, the sampler, the span, metrics and ledger threads included, until every record is written); the event",
        "loop's is its thread's (`time.thread_time`).",
        "",
        "| target | measured (median) | met |",
        "|---|---:|---|",
    ]
    if w is not None:
        lines += [
            f"| wattspan alone, event-loop CPU <= 6 us/request | {wl:.1f} us | {'yes' if wl <= 6 else 'no'} |",
            f"| wattspan alone, CPU <= 12 us/request | {w:.1f} us | {'yes' if w <= 12 else 'no'} |",
        ]
    if wx is not None:
        lines.append(f"| exporting, on top of OpenTelemetry <= 40 us/request | {wx:.1f} us | {'yes' if wx <= 40 else 'no'} |")
    if cw is not None:
        lines.append(f"| `/work`, wattspan alone >= 0.97x bare (CPU capacity) | {cw:.3f}x | {'yes' if cw >= 0.97 else 'no'} |")
    if cx is not None:
        lines.append(f"| `/work`, OpenTelemetry + wattspan exporting >= 0.9x OpenTelemetry (CPU capacity) | {cx:.3f}x | {'yes' if cx >= 0.9 else 'no'} |")
    text = "\n".join(lines) + "\n"
    print(text)
    write_results(a, _record_name(VARIANTS), text)


def _record_name(variants: tuple[str, ...]) -> str:
    """Where --record writes: overhead.md for every variant, overhead_alone.md for bare and wattspan only."""
    from benchmarks.overhead_app import VARIANTS as ALL

    if set(variants) == set(ALL):
        return "overhead.md"
    if set(variants) == {"bare", "wattspan"}:
        return "overhead_alone.md"
    return "overhead_" + "_".join(v.replace("+", "-") for v in variants) + ".md"


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--_cpu":
        n = int(sys.argv[sys.argv.index("--requests") + 1])
        path = sys.argv[sys.argv.index("--path") + 1] if "--path" in sys.argv else "/"
        print(*cpu_per_request(sys.argv[2], n, path, poll="--no-poll" not in sys.argv))
    else:
        main()
