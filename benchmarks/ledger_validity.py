"""What checking every ledger row's values costs the readers (``aggregate``, the dashboard's scan).

    python benchmarks/ledger_validity.py [--rows 1000000] [--rounds 3] [--record]

``wattspan.export.ledger.valid_sql`` leaves out of every sum a row holding a value no wattspan
writer stores (an infinity, a negative energy, text in a number column). This writes ``--rows``
rows with the real writer, then times, in one run, each reader with the check and with it
replaced by ``1`` (the baseline: no check), and the check written the first way it was (``typeof``
and arithmetic per column) and, for the dashboard, as a flattened subquery (the check evaluated at
every use of its result). Wall seconds, min over ``--rounds``; ratio to the baseline.
"""

from __future__ import annotations

import argparse
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from wattspan import RequestRecord  # noqa: E402
from wattspan import dashboard  # noqa: E402
from wattspan.export.ledger import Ledger, schema  # noqa: E402


def _typeof_sql(have=None) -> str:  # the first form of the check
    cols = [c for c in schema.SUMMED if have is None or c in have]
    return "IFNULL(" + " AND ".join(f"(typeof({c}) IN ('integer', 'real') AND {c} - {c} = 0 AND {c} >= 0)" for c in cols) + ", 0)"


def _write(path: Path, n: int) -> None:
    with Ledger(path) as led:
        for k in range(0, n, 50_000):
            led.write([RequestRecord(id=f"r{i}", device="gpu0", start_ns=i, end_ns=i + 10**8, energy_j=2.0, dynamic_j=1.5, idle_j=0.5,
                                     device_s=0.1, co2e_g=0.001, method="batch-fit", sensor="nvml:energy-counter", coverage=1.0,
                                     route=f"/v1/r{i % 7}", model=f"m{i % 3}", tenant=f"t{i % 13}", prompt_tokens=10, output_tokens=5,
                                     host_j=0.25) for i in range(k, min(n, k + 50_000))])
            assert led.flush()


def _best(fn, rounds: int) -> float:
    out = []
    for _ in range(rounds):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return min(out)


def main() -> None:
    from benchmarks._common import add_output_args, progress, write_results

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--rounds", type=int, default=3)
    add_output_args(ap, "ledger_validity.md")
    a = ap.parse_args()
    real = schema.valid_sql
    variants = {"no check (baseline)": lambda have=None: "1", "the check (range test)": real, "typeof + arithmetic": _typeof_sql}
    with tempfile.TemporaryDirectory() as tmp:
        db = Path(tmp) / "w.sqlite"
        progress(f"writing {a.rows:,} rows")
        _write(db, a.rows)
        res: dict[str, dict[str, float]] = {}
        import sqlite3

        conn = sqlite3.connect(db)
        cols = {r[1] for r in conn.execute("PRAGMA table_info(requests)")}
        for name, fn in variants.items():
            schema.valid_sql = fn
            dashboard.valid_sql = fn
            res[name] = {"aggregate by route": _best(lambda: schema.aggregate(db, "route"), a.rounds),
                         "dashboard scan": _best(lambda: dashboard._scan(conn, cols, 0.0, 1e12, 60.0), a.rounds)}
            progress(f"{name}: {res[name]}")
        # the dashboard's scan as first written: a subquery SQLite flattens, the check at each use of ok
        def flattened(conn, cols, lo, hi, b):
            ok = real(cols)
            sums = ", ".join(f"TOTAL(CASE WHEN ok THEN {c} END)" for c in ("energy_j", "host_j", "co2e_g", "embodied_g", "prompt_tokens", "output_tokens"))
            q = (f"SELECT CAST(recorded_at / ? AS INTEGER), {', '.join(dashboard._KEYS)}, quality, TOTAL(ok), {sums}, TOTAL(ok AND coverage < 0.9), "
                 f"MAX(recorded_at), TOTAL(CASE WHEN ok THEN energy_j_low END), TOTAL(CASE WHEN ok THEN energy_j_high END), TOTAL(NOT ok) "
                 f"FROM (SELECT *, {ok} AS ok FROM requests WHERE recorded_at >= ? AND recorded_at < ?) GROUP BY 1, 2, 3, 4, 5, 6, 7, 8, 9")
            return conn.execute(q, (b, lo, hi)).fetchall()

        schema.valid_sql = real
        dashboard.valid_sql = real
        res["the check, flattened subquery"] = {"dashboard scan": _best(lambda: flattened(conn, cols, 0.0, 1e12, 60.0), a.rounds)}
        assert sorted(flattened(conn, cols, 0.0, 1e12, 60.0)) == sorted(dashboard._scan(conn, cols, 0.0, 1e12, 60.0))
        conn.close()
    base = res["no check (baseline)"]
    lines = ["# What the ledger readers' validity check costs", "",
             f"Command: `python benchmarks/ledger_validity.py --rows {a.rows} --rounds {a.rounds}` "
             f"({platform.machine()}, Python {platform.python_version()}, SQLite {sqlite3.sqlite_version}; wall s, min of {a.rounds}).", "",
             f"{a.rows:,} rows written by the real writer, every one valid. Baseline: the check replaced by `1`.", "",
             "| variant | aggregate by route (s) | ratio | dashboard scan (s) | ratio |", "|---|---:|---:|---:|---:|"]
    for name, r in res.items():
        ag = r.get("aggregate by route")
        sc = r["dashboard scan"]
        ag_s, ag_r = (f"{ag:.3f}", f"{ag / base['aggregate by route']:.2f}") if ag else ("-", "-")
        lines.append(f"| {name} | {ag_s} | {ag_r} | {sc:.3f} | {sc / base['dashboard scan']:.2f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    write_results(a, "ledger_validity.md", text)


if __name__ == "__main__":
    main()
