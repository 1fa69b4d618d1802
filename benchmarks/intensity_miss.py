"""What a live-intensity cache miss costs the meter's pass: blocking against background mode, side by side.

    python benchmarks/intensity_miss.py [--delay-s 1.0] [--misses 5] [--record]

A loopback stand-in for Electricity Maps' ``/v3/carbon-intensity/latest`` answers each
request after ``--delay-s`` seconds (a slow API). Each trial builds a fresh provider (so
its first lookup is a miss) and times ``CarbonModel.per_request`` on one request, the call
the meter makes for every batch of records: with the provider blocking (the default, what
``wattspan attribute`` uses) and in background mode (what the live meter uses,
``hourly_from_env``). Reports the wall time of that call and which value it used.
``--record`` writes ``benchmarks/results/intensity_miss.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import threading
import time
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks._common import add_output_args, progress, write_results  # noqa: E402

TOKEN = "bench-token-0123456789"


def serve(delay_s: float) -> ThreadingHTTPServer:
    class H(BaseHTTPRequestHandler):
        def log_message(self, *a):
            pass

        def do_GET(self):  # noqa: N802
            time.sleep(delay_s)
            now = datetime.now(timezone.utc).replace(minute=0, second=0, microsecond=0)
            raw = json.dumps({"zone": "DE", "carbonIntensity": 321, "datetime": now.strftime("%Y-%m-%dT%H:%M:%S.000Z"),
                              "emissionFactorType": "lifecycle"}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(raw)))
            self.end_headers()
            self.wfile.write(raw)

    srv = ThreadingHTTPServer(("127.0.0.1", 0), H)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return srv


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--delay-s", type=float, default=1.0, help="seconds the stand-in API takes to answer")
    ap.add_argument("--misses", type=int, default=5, help="trials per mode (each a fresh provider: a miss)")
    add_output_args(ap, "intensity_miss.md")
    args = ap.parse_args()
    os.environ["ELECTRICITYMAPS_API_TOKEN"] = TOKEN
    import numpy as np

    from wattspan.carbon import CarbonModel
    from wattspan.carbon.intensity import ElectricityMapsProvider

    srv = serve(args.delay_s)
    url = f"http://127.0.0.1:{srv.server_address[1]}"
    rows = []
    for mode in ("blocking", "background"):
        times, used = [], set()
        for _ in range(args.misses):
            p = ElectricityMapsProvider(base_url=url, timeout_s=args.delay_s + 5, background=mode == "background")
            model = CarbonModel.for_region("DE").with_hourly("profile")
            model = type(model)(**{**model.__dict__, "hourly": p, "zone": "DE"})
            t0 = time.perf_counter()
            c = model.per_request(np.array([3.6e6]), np.array([1.0]), np.array([time.time()]))
            times.append(time.perf_counter() - t0)
            used.add(c.fields()[0]["intensity_provider"])
            if mode == "background":
                p.settle(args.delay_s + 10)
        times.sort()
        rows.append((mode, times[len(times) // 2] * 1e3, times[-1] * 1e3, ", ".join(sorted(used))))
        progress(f"{mode}: median {rows[-1][1]:.2f} ms")
    srv.shutdown()
    base = rows[0][1]
    lines = [
        "# A live-intensity cache miss in the meter's pass",
        "",
        f"Command: `python benchmarks/intensity_miss.py --delay-s {args.delay_s:g} --misses {args.misses} --record` "
        f"({platform.python_implementation()} {platform.python_version()}, {os.cpu_count()} CPUs, shared).",
        "",
        f"Wall time of one `CarbonModel.per_request` call (what the meter runs per batch of records) whose "
        f"hourly lookup misses the cache, against a loopback API that answers after {args.delay_s:g} s; "
        f"{args.misses} fresh providers per mode.",
        "",
        "| mode | median, ms | worst, ms | vs blocking | intensity used on the miss |",
        "|---|---:|---:|---:|---|",
    ]
    for mode, med, worst, used in rows:
        lines.append(f"| {mode} | {med:.2f} | {worst:.2f} | {med / base:.4f} | `{used}` |")
    lines += ["", "Background mode answers the miss from the offline profile (flagged `fallback`, counted in "
              "`misses`) and uses the API's value from the next pass on, once the background fetch has landed."]
    text = "\n".join(lines) + "\n"
    print(text)
    write_results(args, "intensity_miss.md", text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
