"""What `wattspan.phase`, the dashboard's data and the audit cost, side by side with a baseline.

    python benchmarks/run_dashboard_cost.py [--sizes 10000,100000,500000] [--phases 20000]

* Phase markers: one ``with wattspan.phase("x"):`` block inside a run (two appends
  to the marker file) and outside one (no-op), against an empty class-based context manager.
* Dashboard data: ``wattspan.dashboard.data(db, 3600)`` (what the page fetches every
  refresh) on ledgers of N requests all in the window, against the plainest read of
  the same rows (``wattspan.export.ledger.aggregate(db, "route")``, what ``wattspan report``
  runs), best of 3.
* Audit: ``from_ledger`` + ``build_report`` + Markdown (no charts) on the same ledgers.

Writes ``benchmarks/results/run_dashboard_cost.md``.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import wattspan
from wattspan import RequestRecord
from wattspan.audit import build_report, carbon_for, from_ledger, render_markdown
from wattspan.dashboard import DataCache, data
from wattspan.export.ledger import Ledger, aggregate



def best(fn, n=3):
    ts = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return min(ts)


def phase_cost(n: int, tmp: Path) -> list[tuple[str, float]]:
    class empty:  # the cheapest context manager a job could write itself
        __slots__ = ()

        def __init__(self, _name):
            pass

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return None

    rows = []
    os.environ.pop("WATTSPAN_RUN_PHASES", None)
    for label, cm in (("empty context manager (baseline)", empty), ("wattspan.phase, outside a run", wattspan.phase)):
        def loop(cm=cm):
            for _ in range(n):
                with cm("epoch"):
                    pass
        rows.append((label, best(loop) / n * 1e9))
    os.environ["WATTSPAN_RUN_PHASES"] = str(tmp / "phases.tsv")

    def loop_in():
        for _ in range(n):
            with wattspan.phase("epoch"):
                pass
    rows.append(("wattspan.phase, inside a run (2 appends)", best(loop_in) / n * 1e9))
    os.environ.pop("WATTSPAN_RUN_PHASES", None)
    return rows


def make_ledger(path: Path, n: int) -> None:
    routes = ["/v1/embeddings", "/v1/completions", "/v1/chat/completions", "/v1/rerank"]
    with Ledger(path, max_queue=n + 1) as led:
        led.write([RequestRecord(id=f"r{i}", device="gpu0", start_ns=i, end_ns=i + 10**8, energy_j=1.0 + i % 7, dynamic_j=1.0,
                                 idle_j=i % 7, device_s=0.1, co2e_g=1e-4 * (1 + i % 7), method="batch-fit", sensor="nvml",
                                 route=routes[i % 4], model=f"m{i % 3}", tenant=f"team-{i % 20}", prompt_tokens=50, output_tokens=i % 200)
                   for i in range(n)])
        led.flush(600)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="10000,100000,500000")
    ap.add_argument("--phases", type=int, default=20000)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from benchmarks._common import add_output_args, write_results

    add_output_args(ap, "run_dashboard_cost.md")
    args = ap.parse_args(argv)
    sizes = [int(x) for x in args.sizes.split(",")]
    lines = ["# Cost of phase markers, the dashboard's data and the audit", "",
             f"Command: `python benchmarks/run_dashboard_cost.py --sizes {args.sizes} --phases {args.phases}`",
             f"Machine: {platform.machine()}, {os.cpu_count()} cores shared with other work while measured, Python "
             f"{platform.python_version()}. Best of 3.", ""]
    with tempfile.TemporaryDirectory() as td:
        tmp = Path(td)
        lines += ["## One phase block", "", "| case | ns per `with` block | ratio to baseline |", "|---|---:|---:|"]
        rows = phase_cost(args.phases, tmp)
        base = rows[0][1]
        lines += [f"| {label} | {ns:,.0f} | {ns / base:.1f}x |" for label, ns in rows]
        lines += ["", "## One dashboard refresh and one audit, by ledger size (all records in the window)", "",
                  "| requests | first load: `data(db, 3600)` ms | baseline `aggregate(db, 'route')` ms | ratio | "
                  "refresh with the page's cache ms | audit (no charts) ms | file MB |",
                  "|---:|---:|---:|---:|---:|---:|---:|"]
        for n in sizes:
            db = tmp / f"l{n}.sqlite"
            make_ledger(db, n)
            t_data = best(lambda: data(db, 3600))
            t_base = best(lambda: aggregate(db, "route"))
            cache, later = DataCache(), time.time() + 200  # the records are minutes old: their buckets are held
            data(db, 3600, now=later, cache=cache)
            t_cached = best(lambda: data(db, 3600, now=later, cache=cache))

            def audit():
                b = from_ledger(db, time.time() - 3600)
                render_markdown(build_report(b, carbon_for(b)), {})
            t_audit = best(audit)
            lines.append(f"| {n:,} | {t_data * 1e3:,.0f} | {t_base * 1e3:,.0f} | {t_data / t_base:.1f}x | {t_cached * 1e3:,.1f} | {t_audit * 1e3:,.0f} | "
                         f"{db.stat().st_size / 1e6:.0f} |")
            print(lines[-1], file=sys.stderr)
    lines += ["", "`data()` reads the window in one grouped pass (per minute-bucket, endpoint, model, tenant, method, "
              "sensor), in SQLite, in the server's threadpool. The page's cache keeps the sums of buckets that ended more "
              "than 30 s ago (re-read every 5 minutes), so a refresh reads only the newest records: its cost follows the "
              "request rate, not the window. The first load of a large window costs the full pass.", ""]
    print("\n".join(lines))
    write_results(args, "run_dashboard_cost.md", "\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
