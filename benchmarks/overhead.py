"""What wattspan costs the server it measures, side by side with a bare app and OpenTelemetry.

    python benchmarks/overhead.py [--requests 20000] [--seconds 5] [--record]

1. CPU per request, in process: each variant of ``benchmarks/overhead_app.py``
   is called directly as an ASGI app ``--requests`` times; the CPU time of the
   whole process (the meter's background thread included, until every record
   is final) is divided by the requests. Extra = variant minus bare.
2. Throughput on loopback: each variant served by uvicorn (one worker) in its
   own process (BLAS on one thread), loaded by ``wrk`` (Debian's package) from
   another; five interleaved rounds, on the trivial endpoint and on one doing
   about a millisecond of CPU work. Ratio = variant / bare within each round;
   the table gives the median and the range over rounds.

Prints the table and its progress; ``--record`` writes ``benchmarks/results/overhead.md``
(``--out PATH`` elsewhere). Without ``wrk`` the throughput columns are n/a, and it says so.
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


def cpu_per_request(variant: str, n: int) -> float:
    os.environ["WATTSPAN_BENCH_VARIANT"] = variant
    mod = importlib.import_module("benchmarks.overhead_app")
    app = mod.create(variant)
    scope_base = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "GET", "scheme": "http",
                  "path": "/", "raw_path": b"/", "query_string": b"", "root_path": "", "headers": [(b"host", b"127.0.0.1")],
                  "client": ("127.0.0.1", 5000), "server": ("127.0.0.1", 8000)}

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message):
        pass

    async def run(k):
        for _ in range(k):
            await app(dict(scope_base), receive, send)

    asyncio.run(run(500))  # warm up (and start the meter)
    meter = app.state.meter
    if meter is not None:
        meter.flush(10)
    c0 = time.process_time()
    asyncio.run(run(n))
    if meter is not None:
        meter.flush(30)
    c1 = time.process_time()
    if meter is not None:
        assert meter.counters["records"] >= n, meter.counters
        meter.close()
    return (c1 - c0) / n * 1e6


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
    from benchmarks._common import add_output_args, need_tool, progress, write_results

    add_output_args(ap, "overhead.md")
    a = ap.parse_args()
    from benchmarks.overhead_app import VARIANTS

    has_wrk = need_tool("wrk", "the throughput columns", "apt-get install wrk")
    rounds = 5
    est = len(VARIANTS) * (a.requests / 2000 + 3) + (rounds * len(VARIANTS) * 2 * (a.seconds + 3) if has_wrk else 0)
    progress(f"{len(VARIANTS)} variants: CPU per request, then {rounds if has_wrk else 0} rounds of wrk; about {est / 60:.0f} min")

    cpu = {}
    for v in VARIANTS:  # each in a fresh interpreter: no state shared between variants
        out = subprocess.run([sys.executable, __file__, "--_cpu", v, "--requests", str(a.requests)], capture_output=True, text=True, cwd=ROOT, check=True)
        cpu[v] = float(out.stdout.strip().splitlines()[-1])
        progress(f"CPU per request, {v}: {cpu[v]:.1f} us")
    rps = {v: [] for v in VARIANTS}
    work = {v: [] for v in VARIANTS}
    if has_wrk:
        for r in range(rounds):  # interleaved, so drifts of a shared machine hit every variant alike
            for v in VARIANTS:
                rps[v].append(throughput(v, a.seconds))
                work[v].append(throughput(v, a.seconds, "/work"))
                progress(f"round {r + 1}/{rounds}, {v}: {rps[v][-1]:,.0f} req/s trivial, {work[v][-1]:,.0f} req/s /work")

    def cell(d, v):
        if not d["bare"]:
            return "n/a (no wrk)", "n/a"
        ratios = [x / b for x, b in zip(d[v], d["bare"])]
        med = statistics.median(ratios)
        return f"{statistics.median(d[v]):,.0f}", f"{med:.2f}x ({min(ratios):.2f}-{max(ratios):.2f})"

    lines = [
        "# Overhead on the server being measured",
        "",
        f"Command: `python benchmarks/overhead.py --requests {a.requests} --seconds {a.seconds} --record`",
        f"Machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}; a trivial Starlette endpoint returning `ok`.",
        "",
        "| variant | CPU us/request | extra vs bare | trivial `/`: req/s (wrk -c16) | vs bare, median (range) | `/work` (~1 ms of Python): req/s | vs bare, median (range) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for v in VARIANTS:
        r, ratio = cell(rps, v)
        w, wratio = cell(work, v)
        lines.append(f"| {v} | {cpu[v]:.1f} | {cpu[v] - cpu['bare']:+.1f} | {r} | {ratio} | {w} | {wratio} |")
    w = cpu["wattspan"] - cpu["bare"]
    wx = cpu["otel+wattspan"] - cpu["otel"]
    o = cpu["otel"] - cpu["bare"]
    lines += [
        "",
        f"wattspan adds {w:.1f} us of CPU per request without export and {wx:.1f} us with export (spans held and completed,",
        f"metrics, ledger) on top of OpenTelemetry's ASGI instrumentation, which itself adds {o:.1f} us.",
        "CPU is the whole process's (`time.process_time`), the meter's background attribution included.",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    write_results(a, "overhead.md", text)


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--_cpu":
        n = int(sys.argv[sys.argv.index("--requests") + 1])
        print(cpu_per_request(sys.argv[2], n))
    else:
        main()
