"""What each secondary index of the ledger's ``requests`` table costs an insert, and what it buys a query.

    python benchmarks/ledger_indexes.py [--rows 200000] [--rounds 5]

Inserts ``--rows`` synthetic rows (40 columns, as the writer's INSERT) in transactions of the
writer's batch size, WAL and ``synchronous=NORMAL`` as the writer sets them, once with the
indexes older ledgers had (recorded_at, route, tenant) and once with the schema's (recorded_at
only); CPU of this thread per row (``time.thread_time``: holds on a loaded machine), min and
median over ``--rounds``. Then times the queries that read the table (``aggregate`` by route and
by tenant, a tenant budget's period query) on the last file of each, wall ms (the machine's
load moves these), with SQLite's plan.
"""

from __future__ import annotations

import argparse
import os
import random
import sqlite3
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from wattspan.export.ledger import schema  # noqa: E402
from wattspan.export.ledger.writer import _BATCH  # noqa: E402

OLD = ("CREATE INDEX requests_route ON requests (route)", "CREATE INDEX requests_tenant ON requests (tenant)")


def rows(n: int) -> list[tuple[object, ...]]:
    rng = random.Random(0)
    cols = schema.COLUMNS
    route, tenant, rec, rid = (cols.index(c) for c in ("route", "tenant", "recorded_at", "id"))
    now, out = time.time(), []
    for i in range(n):
        r: list[object] = [rng.random() for _ in cols]
        r[route] = rng.choice(["/", "/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/health"])
        r[tenant] = rng.choice(["", "acme", "globex", "initech"])
        r[rec] = now + i * 1e-3
        r[rid] = f"{rng.getrandbits(128):032x}"
        out.append(tuple(r))
    return out


def insert(path: str, data: list[tuple[object, ...]], old: bool) -> float:
    for s in ("", "-wal", "-shm"):
        if os.path.exists(path + s):
            os.remove(path + s)
    c = sqlite3.connect(path, isolation_level=None)
    c.execute("PRAGMA auto_vacuum=INCREMENTAL")
    for stmt in schema._SCHEMA + (OLD if old else ()):
        c.execute(stmt)
    c.execute("PRAGMA journal_mode=WAL")
    c.execute("PRAGMA synchronous=NORMAL")
    t = time.thread_time()
    for i in range(0, len(data), _BATCH):
        c.execute("BEGIN IMMEDIATE")
        c.executemany(schema.INSERT, data[i:i + _BATCH])
        c.execute("COMMIT")
    dt = time.thread_time() - t
    c.close()
    return dt / len(data) * 1e6


def queries(path: str, t0: float) -> list[str]:
    c = sqlite3.connect(path)
    out = []
    for by in ("route", "tenant"):
        sql = (f"SELECT {by}, COUNT(*), SUM(energy_j), SUM(dynamic_j), SUM(idle_j), SUM(host_j), SUM(co2e_g), "
               f"AVG((end_ns - start_ns) / 1e9), MAX(simulated), GROUP_CONCAT(DISTINCT method) "
               f"FROM requests GROUP BY {by} ORDER BY SUM(energy_j) DESC, {by}")  # schema.aggregate's
        out.append((f"aggregate by {by}", sql, ()))
    out.append(("tenant budget, 60 s period", "SELECT COUNT(*), TOTAL(co2e_g) FROM requests WHERE recorded_at >= ? "
                "AND recorded_at < ? AND tenant = ?", (t0, t0 + 60, "acme")))  # budgets.LedgerSpend's
    lines = []
    for name, sql, args in out:
        t = time.perf_counter()
        c.execute(sql, args).fetchall()
        ms = (time.perf_counter() - t) * 1e3
        plan = "; ".join(p[-1] for p in c.execute("EXPLAIN QUERY PLAN " + sql, args))
        lines.append(f"  {name}: {ms:.0f} ms ({plan})")
    c.close()
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=200_000)
    ap.add_argument("--rounds", type=int, default=5)
    a = ap.parse_args()
    data = rows(a.rows)
    with tempfile.TemporaryDirectory() as d:
        res: dict[bool, list[float]] = {True: [], False: []}
        for _ in range(a.rounds):
            for old in (True, False):
                res[old].append(insert(os.path.join(d, f"{old}.sqlite"), data, old))
        for old in (True, False):
            v = res[old]
            label = "recorded_at, route, tenant (before)" if old else "recorded_at only (now)"
            print(f"{label}: {min(v):.2f} us per row (min), {statistics.median(v):.2f} (median), CPU of the writing thread")
            print("\n".join(queries(os.path.join(d, f"{old}.sqlite"), float(data[0][schema.COLUMNS.index('recorded_at')]))))  # type: ignore[arg-type]


if __name__ == "__main__":
    main()
