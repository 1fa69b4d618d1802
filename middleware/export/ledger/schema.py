"""The ledger's file format (SQLite, schema versioned) and its read side.

Readers open the file read-only, from any process, while a server writes to it.
Public through :mod:`wattspan.export.ledger`.
"""

from __future__ import annotations

import math
import os
import sqlite3
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from ...errors import InputError

__all__ = ["GROUP_BY", "SCHEMA_VERSION", "aggregate", "check_ledger", "excluded", "find", "query", "valid_sql"]

SCHEMA_VERSION = 1
PAGE_SIZE = 16384  # bytes per page of a new ledger file (see create_schema)
_APP_ID = 0x57415453  # "WATS": marks the file as a wattspan ledger
# One column per RequestRecord field (tests check they match). trace_id/span_id are
# 128/64-bit: stored as hex text, as OpenTelemetry writes them.
_FIELDS = (
    ("id", "TEXT"), ("device", "TEXT"), ("start_ns", "INTEGER"), ("end_ns", "INTEGER"),
    ("energy_j", "REAL"), ("dynamic_j", "REAL"), ("idle_j", "REAL"), ("device_s", "REAL"),
    ("co2e_g", "REAL"), ("embodied_g", "REAL"), ("method", "TEXT"), ("sensor", "TEXT"),
    ("coverage", "REAL"), ("simulated", "INTEGER"), ("route", "TEXT"), ("http_method", "TEXT"),
    ("status_code", "INTEGER"), ("model", "TEXT"), ("tenant", "TEXT"), ("prompt_tokens", "INTEGER"),
    ("output_tokens", "INTEGER"), ("trace_id", "TEXT"), ("span_id", "TEXT"), ("host_j", "REAL"),
    # added after schema 1 shipped (older files gain them on open; readers fill in defaults):
    # the error band and quality flag, and which intensity each record used
    ("energy_j_low", "REAL"), ("energy_j_high", "REAL"), ("co2e_g_low", "REAL"), ("co2e_g_high", "REAL"),
    ("quality", "TEXT"),
    ("intensity_g_per_kwh", "REAL"), ("intensity_provider", "TEXT"), ("intensity_zone", "TEXT"),
    ("intensity_hour", "TEXT"), ("intensity_basis", "TEXT"), ("market_g_per_kwh", "REAL"),
    ("co2e_market_g", "REAL"), ("marginal_g_per_kwh", "REAL"), ("co2e_marginal_g", "REAL"),
    ("device_energy", "TEXT"),  # a device group's energy per member device (JSON)
)
#: columns added after schema 1 shipped: ``ALTER TABLE ... ADD COLUMN`` with this default
_ADDED = {n: ("''" if t == "TEXT" else "0") for n, t in _FIELDS[_FIELDS.index(("host_j", "REAL")) + 1:]}
NAMES = tuple(n for n, _ in _FIELDS)
COLUMNS = (*NAMES, "recorded_at", "run_id")
_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS requests ("
    + ", ".join(f"{n} {t} NOT NULL" for n, t in _FIELDS)
    + ", recorded_at REAL NOT NULL, run_id TEXT NOT NULL)",
    "CREATE INDEX IF NOT EXISTS requests_recorded_at ON requests (recorded_at)",
)
# Indexes older files have and no query needs: ``route`` and ``tenant`` are never searched by equality
# alone (budgets filter a recorded_at range first; a route budget matches a prefix), and a GROUP BY
# walked through either index reads the table in random order: slower than a scan and a sort.
# Each costs every insert a B-tree update, so the writer drops them (upgrade_schema).
# ``python benchmarks/ledger_indexes.py`` (200,000 rows): inserts 8.6 -> 7.1 us of CPU per row,
# ``aggregate(by="route")`` 390 -> 297 ms, a tenant budget's query 39 -> 16 ms (the planner chose
# the tenant index over the recorded_at range).
_UNUSED_INDEXES = ("requests_route", "requests_tenant")
INSERT = f"INSERT INTO requests ({', '.join(COLUMNS)}) VALUES ({', '.join('?' * len(COLUMNS))})"
GROUP_BY = ("route", "tenant", "model", "device", "http_method", "run_id")


def create_schema(conn: sqlite3.Connection, path: Path) -> None:
    """Create the table and indexes in an empty file (autocommit ``conn``); on an existing
    ledger, add the columns it lacks (see ``_ADDED``)."""
    if schema_version(conn, path):
        upgrade_schema(conn)
        return
    # both take only before the first table: larger pages (16 KiB, SQLite's default is 4) cut the writer's
    # CPU per row by about 15 % (fewer pages to fill, split and log: ``python benchmarks/ledger_indexes.py``
    # rows, 4.5 -> 3.8 us); incremental vacuum lets retention shrink the file. An older file keeps its own.
    conn.execute(f"PRAGMA page_size={PAGE_SIZE}")
    conn.execute("PRAGMA auto_vacuum=INCREMENTAL")
    conn.execute("BEGIN IMMEDIATE")  # on failure the caller closes conn, which rolls back
    if schema_version(conn, path) == 0:  # another process may have won the race
        for stmt in _SCHEMA:
            conn.execute(stmt)
        conn.execute(f"PRAGMA application_id={_APP_ID}")
        conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
    conn.execute("COMMIT")


def _present(conn: sqlite3.Connection) -> set[str]:
    return {r[1] for r in conn.execute("PRAGMA table_info(requests)")}


def upgrade_schema(conn: sqlite3.Connection) -> None:
    """Add the columns a file written by an older wattspan lacks, and drop the indexes no query
    uses (``_UNUSED_INDEXES``) (autocommit ``conn``)."""
    for name in _UNUSED_INDEXES:  # IF EXISTS: another process may have dropped it first
        conn.execute(f"DROP INDEX IF EXISTS {name}")
    missing = [n for n in _ADDED if n not in _present(conn)]
    for n in missing:
        t = dict(_FIELDS)[n]
        try:
            conn.execute(f"ALTER TABLE requests ADD COLUMN {n} {t} NOT NULL DEFAULT {_ADDED[n]}")
        except sqlite3.OperationalError as exc:
            if "duplicate column" not in str(exc):  # another process added it first
                raise


def _select(conn: sqlite3.Connection) -> str:
    """The select list: an older file's missing columns read as their defaults."""
    have = _present(conn)
    return ", ".join(c if (c in have or c not in _ADDED) else f"{_ADDED[c]} AS {c}" for c in COLUMNS)


def query(path: str | os.PathLike[str], *, since: float | None = None, until: float | None = None,
          run_id: str | None = None) -> list[dict[str, Any]]:
    """Records with ``since <= recorded_at < until`` (unix seconds), oldest first.

    Each dict has the RequestRecord fields (same types: ``RequestRecord(**{f: d[f] ...})``
    rebuilds it) plus ``recorded_at`` and ``run_id``.
    """
    where, args = _where(since, until, run_id)
    with _reading(path) as conn:
        if conn is None:
            return []
        rows = conn.execute(f"SELECT {_select(conn)} FROM requests{where} ORDER BY recorded_at, rowid", args)
        return [_as_dict(r) for r in rows]


def _as_dict(row: tuple[Any, ...]) -> dict[str, Any]:
    """A row of :data:`COLUMNS` as the dict :func:`query` gives (flags as bool, ids as ints)."""
    d = dict(zip(COLUMNS, row))
    d["simulated"], d["trace_id"], d["span_id"] = bool(d["simulated"]), int(d["trace_id"], 16), int(d["span_id"], 16)
    return d


def find(path: str | os.PathLike[str], request_id: str) -> dict[str, Any] | None:
    """The newest record with this ``id`` (a dict as :func:`query` gives), or ``None``."""
    with _reading(path) as conn:
        if conn is None:
            return None
        # an older file's missing columns read as their defaults, as in query()
        row = conn.execute(f"SELECT {_select(conn)} FROM requests WHERE id = ? ORDER BY rowid DESC LIMIT 1", (str(request_id),)).fetchone()
    return None if row is None else _as_dict(row)


#: the columns sums are made of: a wattspan writer stores each as a finite number >= 0 (non-finite as 0)
SUMMED = ("energy_j", "dynamic_j", "idle_j", "host_j", "device_s", "co2e_g", "embodied_g", "prompt_tokens", "output_tokens",
          "coverage", "energy_j_low", "energy_j_high", "co2e_g_low", "co2e_g_high", "intensity_g_per_kwh")


def valid_sql(have: set[str] | None = None) -> str:
    """SQL that is 1 for a record whose :data:`SUMMED` values (those of them in ``have``, the
    file's columns) are all numbers in ``[0, VALUE_MAX]``, and 0 otherwise: a row no meter
    makes (an infinity, a negative energy, a text in a REAL column: a hand-edited or foreign
    file; 1e308 J handed to the writer) is left out of the sums, and counted (:func:`excluded`),
    never summed into them: one inf made every total inf (and the JSON of a report invalid),
    one text read as 0 J, two finite 1e308 J summed past float's range."""
    cols = [c for c in SUMMED if have is None or c in have]
    if not cols:
        return "1"
    # SQLite orders every number before every text and blob, so one range test per column is the
    # whole check (a third of the cost of typeof() and arithmetic); NULL (NaN is stored as NULL) is 0
    return "IFNULL(" + " AND ".join(f"{c} BETWEEN 0 AND {VALUE_MAX!r}" for c in cols) + ", 0)"


#: the largest value a summed column holds: 2**63 (the writer's integer range; in joules a
#: megawatt for 290,000 years): 2**63 such records sum to 8.5e37, far inside float's range
VALUE_MAX = float(2**63)


def excluded(path: str | os.PathLike[str], *, since: float | None = None, until: float | None = None,
             run_id: str | None = None) -> int:
    """How many records with ``since <= recorded_at < until`` :func:`aggregate` leaves out (see :func:`valid_sql`)."""
    where, args = _where(since, until, run_id)
    with _reading(path) as conn:
        if conn is None:
            return 0
        row = conn.execute(f"SELECT TOTAL(NOT {valid_sql(_present(conn))}) FROM requests{where}", args).fetchone()
    return int(row[0])


def aggregate(path: str | os.PathLike[str], by: str = "route", *, since: float | None = None,
              until: float | None = None) -> list[dict[str, Any]]:
    """Totals per value of ``by`` (one of :data:`GROUP_BY`), most energy first.

    Each row: ``{by: value, requests, energy_j, dynamic_j, idle_j, host_j, co2e_g,
    energy_j_per_1k, total_j_per_1k, co2e_g_per_1k`` (per 1000 requests), ``mean_duration_s``,
    ``simulated`` (any record simulated), ``methods`` (sorted list)``}``.
    ``energy_j`` is the accelerator's, ``host_j`` the host's (kept apart), ``total_j_per_1k``
    both: the energy ``co2e_g`` prices (see :mod:`wattspan.carbon.records`).
    Records with a value no wattspan writer stores are left out (:func:`valid_sql`; :func:`excluded` counts them).
    """
    if by not in GROUP_BY:
        raise ValueError(f"cannot aggregate by {by!r}: choose one of {', '.join(GROUP_BY)}")
    where, args = _where(since, until, None)
    with _reading(path) as conn:
        if conn is None:
            return []
        ok = valid_sql(_present(conn))
        where = f"{where} AND {ok}" if where else f" WHERE {ok}"
        sql = (f"SELECT {by}, COUNT(*), TOTAL(energy_j), TOTAL(dynamic_j), TOTAL(idle_j), TOTAL(host_j), TOTAL(co2e_g), "  # by is whitelisted
               f"AVG((end_ns - start_ns) / 1e9), MAX(simulated), GROUP_CONCAT(DISTINCT method) "
               f"FROM requests{where} GROUP BY {by} ORDER BY TOTAL(energy_j) DESC, {by}")
        rows = conn.execute(sql, args).fetchall()
    return [
        {by: key, "requests": n, "energy_j": e, "dynamic_j": dyn, "idle_j": idle, "host_j": host, "co2e_g": c,
         "energy_j_per_1k": e / n * 1000,
         "total_j_per_1k": (e + (host or 0.0)) / n * 1000, "co2e_g_per_1k": c / n * 1000, "mean_duration_s": dur,
         "simulated": bool(sim), "methods": sorted(m for m in (methods or "").split(",") if m)}
        for key, n, e, dyn, idle, host, c, dur, sim, methods in rows
    ]


def _where(since: float | None, until: float | None, run_id: str | None) -> tuple[str, list[float | str]]:
    terms: list[str] = []
    args: list[float | str] = []
    for name, value, op in (("since", since, ">="), ("until", until, "<")):
        if value is not None:
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"{name} must be unix seconds (a finite number), got {value!r}")
            terms.append(f"recorded_at {op} ?")
            args.append(float(value))
    if run_id is not None:
        terms.append("run_id = ?")
        args.append(str(run_id))
    return (" WHERE " + " AND ".join(terms)) if terms else "", args


def connect_ro(path: str | os.PathLike[str], timeout: float = 5.0) -> sqlite3.Connection:
    """A read-only connection to the ledger at ``path``. A ledger is in WAL mode, whose readers
    make a ``-shm`` file beside it: in a folder this reader cannot write (another user's, a
    read-only mount, an archive) SQLite cannot, and refuses to open it. Where no write is pending
    in a ``-wal`` file (its writer closed, or none is running) the file alone holds every record:
    it is then read as immutable."""
    p = Path(path)
    uri = p.resolve().as_uri()
    conn = sqlite3.connect(uri + "?mode=ro", uri=True, timeout=timeout)
    try:
        conn.execute("PRAGMA user_version").fetchone()
    except sqlite3.OperationalError as exc:
        wal = Path(str(p) + "-wal")
        if "unable to open" in str(exc) and not (wal.exists() and wal.stat().st_size > 0):
            conn.close()
            return sqlite3.connect(uri + "?mode=ro&immutable=1", uri=True, timeout=timeout)
    except sqlite3.DatabaseError:  # not a database: the caller's schema check says so in its own words
        pass
    return conn


@contextmanager
def _reading(path: str | os.PathLike[str]) -> Iterator[sqlite3.Connection | None]:
    """A read-only connection, or None for a file with no ledger table yet."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no wattspan ledger at {path} (is the path right? has a server written to it yet?)")
    conn = connect_ro(path)
    conn.row_factory = _text_row  # wattspan writes no BLOB: one another writer left reads as text
    try:
        yield conn if schema_version(conn, path) else None
    finally:
        conn.close()


def _text_row(cursor: sqlite3.Cursor, row: tuple[Any, ...]) -> tuple[Any, ...]:
    """A row with any BLOB value as text (replacement characters for bytes that are not UTF-8)."""
    return tuple(v.decode("utf-8", "replace") if isinstance(v, bytes) else v for v in row)


def check_ledger(path: str | os.PathLike[str]) -> None:
    """Refuse (:class:`InputError`) a file at ``path`` that is not a ledger this wattspan can write:
    damaged, foreign, or newer. No file yet is fine. Read-only: a check before a long job, so its end
    is not where the ledger fails."""
    p = Path(path)
    if not p.is_file():
        return
    conn = connect_ro(p)
    try:
        schema_version(conn, p)
    except sqlite3.OperationalError:  # locked or busy now: the writer's own retries deal with that
        pass
    finally:
        conn.close()


def schema_version(conn: sqlite3.Connection, path: Path) -> int:
    """The ledger schema version of ``conn``'s file (0: empty file); refuse foreign or newer files."""
    try:
        app = conn.execute("PRAGMA application_id").fetchone()[0]
        version: int = conn.execute("PRAGMA user_version").fetchone()[0]
        tables = conn.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]
    except sqlite3.DatabaseError as exc:
        if isinstance(exc, sqlite3.OperationalError):  # I/O, locking: the caller retries
            raise
        raise InputError(path, 0, f"is not a wattspan ledger ({exc}); give the path of a ledger, or a new one (this file is left as it is)") from None
    if app != _APP_ID and (app or version or tables):
        raise InputError(path, 0, "is a SQLite database but not a wattspan ledger; give a new path")
    if version > SCHEMA_VERSION:
        raise InputError(path, 0, f"ledger schema version {version} is newer than this wattspan reads "
                                  f"({SCHEMA_VERSION}); upgrade wattspan, or give a new path")
    return version
