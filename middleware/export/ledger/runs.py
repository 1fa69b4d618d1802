"""Runs in the ledger: what ``wattspan run`` measured for one process, start to end.

Two tables, added to a ledger file when the first run is written (additively: a
ledger without them still opens, and reads as having no runs):

* ``runs``: one row per run: ``run_id``, ``started_at``/``ended_at`` (unix s),
  ``command`` (JSON list), ``exit_code``, ``summary`` (JSON, see
  :func:`wattspan.run.measure`'s result);
* ``run_trace``: per run and device, the cumulative energy in joules since the
  run began at ``t`` (unix s): exact at each stored point; power between two
  points is their energy difference over their time difference.
"""

from __future__ import annotations

import json
import os
import sqlite3
from pathlib import Path
from typing import Any

from .schema import _reading, create_schema

__all__ = ["get_run", "list_runs", "run_trace", "write_run"]

_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS runs (run_id TEXT PRIMARY KEY, started_at REAL NOT NULL, ended_at REAL NOT NULL, "
    "command TEXT NOT NULL, exit_code INTEGER NOT NULL, summary TEXT NOT NULL)",
    "CREATE TABLE IF NOT EXISTS run_trace (run_id TEXT NOT NULL, device TEXT NOT NULL, t REAL NOT NULL, "
    "energy_j REAL NOT NULL)",
    "CREATE INDEX IF NOT EXISTS run_trace_run ON run_trace (run_id, device, t)",
)


def write_run(path: str | os.PathLike[str], summary: dict[str, Any], trace: dict[str, tuple[list[float], list[float]]]) -> None:
    """Store one run (``summary`` as made by ``wattspan run``) and its per-device ``trace``
    (``device -> (unix seconds, cumulative J)``) in one transaction."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(path, timeout=10.0, isolation_level=None)
    try:
        create_schema(conn, path)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("BEGIN IMMEDIATE")
        for stmt in _SCHEMA:
            conn.execute(stmt)
        rid = summary["run_id"]
        conn.execute("INSERT OR REPLACE INTO runs VALUES (?, ?, ?, ?, ?, ?)",
                     (rid, summary["started_at"], summary["ended_at"], json.dumps(summary["command"]),
                      int(summary["exit_code"]), json.dumps(summary, separators=(",", ":"))))
        conn.execute("DELETE FROM run_trace WHERE run_id = ?", (rid,))
        conn.executemany("INSERT INTO run_trace VALUES (?, ?, ?, ?)",
                         ((rid, dev, float(t), float(e)) for dev, (ts, es) in trace.items() for t, e in zip(ts, es)))
        conn.execute("COMMIT")
    finally:
        conn.close()


def _has_runs(conn: sqlite3.Connection) -> bool:
    return conn.execute("SELECT 1 FROM sqlite_master WHERE type='table' AND name='runs'").fetchone() is not None


def list_runs(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Every run in the ledger, oldest first: ``run_id, started_at, ended_at, command, exit_code``."""
    with _reading(path) as conn:
        if conn is None or not _has_runs(conn):
            return []
        rows = conn.execute("SELECT run_id, started_at, ended_at, command, exit_code FROM runs ORDER BY started_at, rowid").fetchall()
    return [{"run_id": r, "started_at": s, "ended_at": e, "command": json.loads(c), "exit_code": x} for r, s, e, c, x in rows]


def get_run(path: str | os.PathLike[str], run_id: str = "last") -> dict[str, Any] | None:
    """One run's summary (``"last"``: the newest; a unique prefix of a run id works), or None."""
    with _reading(path) as conn:
        if conn is None or not _has_runs(conn):
            return None
        if run_id == "last":
            row = conn.execute("SELECT summary FROM runs ORDER BY started_at DESC, rowid DESC LIMIT 1").fetchone()
        else:
            ids = [r for (r,) in conn.execute("SELECT run_id FROM runs") if r.startswith(str(run_id))]
            if len(ids) > 1:
                raise ValueError(f"run id prefix {run_id!r} matches several runs: give more of it")
            rows = conn.execute("SELECT summary FROM runs WHERE run_id = ?", (ids[0],)).fetchall() if ids else []
            row = rows[0] if rows else None
    return None if row is None else json.loads(row[0])


def run_trace(path: str | os.PathLike[str], run_id: str) -> dict[str, tuple[list[float], list[float]]]:
    """``device -> (unix seconds, cumulative J since the run began)`` for one run."""
    out: dict[str, tuple[list[float], list[float]]] = {}
    with _reading(path) as conn:
        if conn is None or not _has_runs(conn):
            return out
        for dev, t, e in conn.execute("SELECT device, t, energy_j FROM run_trace WHERE run_id = ? ORDER BY device, t", (run_id,)):
            ts, es = out.setdefault(dev, ([], []))
            ts.append(t)
            es.append(e)
    return out
