"""What wattspan costs the server it measures, side by side with a bare app and OpenTelemetry.

    python benchmarks/overhead.py [--requests 20000] [--seconds 5] [--rounds 5] [--work-requests N] [--work-pairs 2]
                                  [--variants bare,wattspan] [--record]

1. CPU per request, in process: each variant of ``benchmarks/overhead_app.py``
   is called directly as an ASGI app ``--requests`` times, in a fresh
   interpreter; the CPU time of the whole process (every thread: the meter's
   background attribution and the exporters included, until every record is
   final and handed to its sinks) is divided by the requests, and so is the CPU
   time of the thread running the event loop alone. ``--rounds`` interleaved
   rounds (every variant once per round, the order rotated); extra = variant
   minus its baseline (bare; OpenTelemetry for OpenTelemetry + wattspan) within
   each round; the table gives the median and the range over rounds. Then the
   endpoint doing about a millisecond of CPU work (``--work-requests``, default
   ``--requests`` / 10), whose baseline CPU over the variant's is the capacity
   left to a CPU-bound server: each variant in ``--work-pairs`` pairs a round,
   its run and its baseline's back to back (which first alternating), one ratio
   per pair; the table gives the median over pairs and the sign-test interval of
   the median (order statistics: distribution-free). The endpoint's own CPU
   moves by several per cent from one interpreter to the next and with the
   machine's load, far more than wattspan's share: adjacent pairs put both runs
   of a ratio on the same machine state, and the interval says how sure the
   median is. The meter's and the sampler's thread CPU on ``/work`` (from
   ``/proc/self/task/*/schedstat``) is printed too, and the capacity those
   threads and the event loop's extra on ``/`` alone would give. After each request the driver lets the event loop
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
import math
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


def _thread_ns() -> dict[str, int]:
    """CPU ns of each named thread of this process so far (``/proc/self/task/<tid>/schedstat``; empty elsewhere)."""
    import threading

    out: dict[str, int] = {}
    for t in threading.enumerate():
        try:
            with open(f"/proc/self/task/{t.native_id}/schedstat") as f:
                out[t.name] = out.get(t.name, 0) + int(f.read().split()[0])
        except (OSError, ValueError, IndexError):
            pass
    return out


def cpu_per_request(variant: str, n: int, path: str = "/", poll: bool = True) -> tuple[float, float, float, float]:
    """us per request: the whole process, the event loop's thread, the meter's thread and the sampler's thread
    (the last two from before the first request until every record is final; 0 where absent)."""
    os.environ["WATTSPAN_BENCH_VARIANT"] = variant
    mod = importlib.import_module("benchmarks.overhead_app")
    app = mod.create(variant)
    from benchmarks._common import empty_receive as receive, http_scope, ignore_send as send

    scope_base = http_scope(path)

    async def run(k):
        for _ in range(k):
            await app(dict(scope_base), receive, send)
            if poll:  # one turn of the event loop, as a server's loop takes one (its selector polled) per request
                await asyncio.sleep(0)

    asyncio.run(run(min(500, n)))  # warm up (and start the meter)
    meter = app.state.meter
    if meter is not None:
        meter.flush(10)
    t0 = _thread_ns()
    c0, l0 = time.process_time(), time.thread_time()
    asyncio.run(run(n))
    l1 = time.thread_time()  # this thread ran the event loop: its CPU is what the loop paid
    if meter is not None:
        meter.drain(30)  # every record final and handed to the sinks, the buffering ones flushed
    c1 = time.process_time()
    t1 = _thread_ns()
    if meter is not None:
        assert meter.counters["records"] >= n, meter.counters
        meter.close()
    provider = getattr(app.state, "tracer_provider", None)
    if provider is not None and meter is None:  # OpenTelemetry alone: its batch export finished too
        provider.force_flush(30_000)
        c1 = time.process_time()
    meter_us, sampler_us = ((t1.get(k, 0) - t0.get(k, 0)) / n / 1e3 for k in ("wattspan-meter", "wattspan-sampler"))
    return (c1 - c0) / n * 1e6, (l1 - l0) / n * 1e6, meter_us, sampler_us


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
    ap.add_argument("--work-requests", type=int, default=None, help="requests to /work per run (default --requests / 10)")
    ap.add_argument("--work-pairs", type=int, default=2,
                    help="adjacent (baseline, variant) pairs of /work runs per variant and round")
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
    n_work = a.work_requests if a.work_requests is not None else max(200, a.requests // 10)
    work_runs = sum(2 * a.work_pairs if base[v] is not None else (0 if any(base[u] == v for u in VARIANTS) else 1) for v in VARIANTS)
    est = rounds * (len(VARIANTS) * (a.requests / 2000 + 3) + work_runs * (n_work / 700 + 3)) + (rounds * len(VARIANTS) * 2 * (a.seconds + 3) if has_wrk else 0)
    progress(f"{len(VARIANTS)} variants: {rounds} rounds of CPU per request, then {rounds if has_wrk else 0} rounds of wrk; about {est / 60:.0f} min")

    cpu = {v: [] for v in VARIANTS}  # per round: (process, event loop, meter thread, sampler thread) us/request on /
    cpu_work = {v: [] for v in VARIANTS}  # per run: the same on /work (a baseline runs once per pair it is in)
    pairs_work = {v: [] for v in VARIANTS}  # per adjacent (baseline, variant) pair on /work: (baseline's run, variant's run)

    def child(v: str, n: int, path: str) -> tuple[float, ...]:
        out = subprocess.run([sys.executable, __file__, "--_cpu", v, "--requests", str(n), "--path", path]
                             + (["--no-poll"] if a.no_poll else []), capture_output=True, text=True, cwd=ROOT, check=True)
        got = tuple(map(float, out.stdout.strip().splitlines()[-1].split()))
        progress(f"CPU round {r + 1}/{rounds}, {v} {path}: {got[0]:.1f} us/request, {got[1]:.1f} on the event loop")
        return got

    for r in range(rounds):  # interleaved, each in a fresh interpreter, the order rotated each round
        order = VARIANTS[r % len(VARIANTS):] + VARIANTS[: r % len(VARIANTS)]
        for v in order:
            cpu[v].append(child(v, a.requests, "/"))
        for v in order:  # /work: adjacent pairs, baseline and variant back to back, which runs first alternating
            if base[v] is None:
                if not any(base[u] == v for u in VARIANTS):  # a baseline with no variant here: once a round
                    cpu_work[v].append(child(v, n_work, "/work"))
                continue
            for k in range(a.work_pairs):
                first_base = (r + k) % 2 == 0
                got = {}
                for u in ((base[v], v) if first_base else (v, base[v])):
                    got[u] = child(u, n_work, "/work")
                    cpu_work[u].append(got[u])
                pairs_work[v].append((got[base[v]], got[v]))
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
        """Per adjacent pair on /work: baseline CPU / variant CPU (the throughput ratio of a CPU-bound server)."""
        return [b[0] / x[0] for b, x in pairs_work[v]]

    def cap_cell(v):
        """The /work capacity: median of the pairs' ratios and its distribution-free interval (or the range, too few pairs)."""
        xs = capacity(v)
        ci = median_interval(xs)
        if ci is None:
            return med_range(xs, times) + f", {len(xs)} pairs"
        return f"{times(statistics.median(xs))} ({times(ci[0])} to {times(ci[1])}, {ci[2]:.0%}; {len(xs)} pairs)"

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
        f"{'' if a.work_requests is None else f' --work-requests {a.work_requests}'}"
        f"{'' if a.work_pairs == 2 else f' --work-pairs {a.work_pairs}'}"
        f"{' --variants ' + a.variants if a.variants else ''}{' --no-poll' if a.no_poll else ''} --record`",
        f"Machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}; load average at the end "
        f"{load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} (1 / 5 / 15 min); a Starlette app (`benchmarks/overhead_app.py`).",
        "",
        f"CPU per request, in process: {a.requests:,} requests to the trivial `/` and {n_work:,} to `/work` (~1 ms of Python)",
        f"per variant and round, {rounds} interleaved rounds, each run in a fresh interpreter. Extra: the variant minus its",
        "baseline within each round, median (range over rounds), microseconds. `/work`: each variant in "
        f"{a.work_pairs} adjacent pairs a round",
        "with its baseline (run back to back, which first alternating), so both of a pair see the same machine; capacity: the",
        "baseline's CPU per `/work` request over the variant's, within each pair (the throughput ratio of a server bound by",
        "its CPU): the median over pairs, with the order-statistic interval that holds the true median with at least the",
        "probability given (distribution-free: the pairs' ratios are only assumed independent).",
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
                         f"{wproc:,.0f} | {cap_cell(v)} |")
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
    for v in VARIANTS:
        if base[v] is None or not any(x[2] or x[3] for _, x in pairs_work[v]):
            continue
        caps = capacity(v)
        meter_us = statistics.median(x[2] for _, x in pairs_work[v])
        sampler_us = statistics.median(x[3] for _, x in pairs_work[v])
        loop_d = [x[1] - b[1] for b, x in pairs_work[v]]
        bw = statistics.median(b[0] for b, _ in pairs_work[v])
        own = meter_us + sampler_us + statistics.median(extra(v, 1))
        lines.append(f"`/work`, {v}, per request (medians over pairs): the meter's thread {meter_us:.1f} us, the sampler's "
                     f"{sampler_us:.1f} us; the event loop's CPU minus its baseline's {statistics.median(loop_d):+.1f} us "
                     f"({min(loop_d):+.1f} to {max(loop_d):+.1f}), of which the middleware's own work is about its extra on "
                     f"`/`; the pairs' ratios {min(caps):.3f}x to {max(caps):.3f}x. The threads' own CPU and the loop's extra "
                     f"on `/` ({own:.1f} us on {bw:,.0f}) would leave {bw / (bw + own):.3f}x: the rest of the measured gap, if "
                     f"any, is the event loop running slower beside wattspan's threads (their wake-ups and data in the "
                     f"caches it shares), and the endpoint's own CPU moving by several per cent between interpreters.")
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
        lines.append(f"| `/work`, wattspan alone >= 0.97x bare (CPU capacity) | {cap_cell('wattspan')} | {met(capacity('wattspan'), 0.97)} |")
    if cx is not None:
        lines.append(f"| `/work`, OpenTelemetry + wattspan exporting >= 0.9x OpenTelemetry (CPU capacity) | {cap_cell('otel+wattspan')} | "
                     f"{met(capacity('otel+wattspan'), 0.9)} |")
    text = "\n".join(lines) + "\n"
    print(text)
    write_results(a, _record_name(VARIANTS), text)


def median_interval(xs: list[float], level: float = 0.95) -> tuple[float, float, float] | None:
    """``(lo, hi, coverage)``: order statistics ``x(k)``, ``x(n+1-k)`` of ``xs`` that hold the true median with
    probability ``coverage >= level`` (the binomial sign-test interval: distribution-free, for independent
    draws); None when ``xs`` has too few values for that level (fewer than 6 at 95 %)."""
    ys = sorted(xs)
    n = len(ys)
    tail, k = 0.0, 0  # tail = P(Bin(n, 1/2) <= k - 1): the chance the median lies below x(k)
    while k < n:
        p = math.comb(n, k) / 2**n
        if tail + p > (1 - level) / 2:
            break
        tail += p
        k += 1
    if k == 0:
        return None
    return ys[k - 1], ys[n - k], 1 - 2 * tail


def met(xs: list[float], target: float) -> str:
    """Whether the median of ``xs`` reaches ``target``, and whether its interval says so beyond the noise."""
    m = statistics.median(xs)
    ci = median_interval(xs)
    if ci is None:
        return "yes" if m >= target else "no"
    if ci[0] >= target:
        return "yes"
    if ci[1] < target:
        return "no"
    return f"{'yes' if m >= target else 'no'} (median; the interval spans {target}x)"


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
