"""A durable local record of every request's cost: one SQLite file, appended across restarts.

``Ledger(path).write(records)`` hands :class:`~wattspan.RequestRecord` s to one
writer thread that commits them in batches; the caller never waits for the disk.
When the disk misbehaves (full, read-only, file deleted) the writer logs, counts
``errors``, keeps the records in memory (up to ``max_queue``) and retries; when
the queue is full the overflow is counted in ``dropped`` and logged. A record the
database refuses (an integer beyond 64 bits, a NaN in a NOT NULL column) is not a
disk problem: it is stored with the offending values clipped (integers into the
64-bit range, non-finite numbers as 0), counted in ``sanitized`` and logged, and
never holds back the records after it. Nothing is lost without a count and a log line.

The read side (:func:`query`, :func:`aggregate`, or the same methods on a
``Ledger``) opens the file read-only, from any process, while a server writes.
Times in the file are ``recorded_at``: unix seconds (wall clock) when the record
was handed to :meth:`Ledger.write`; a *run* is one ``Ledger`` lifetime (``run_id``).
"""

from __future__ import annotations

import atexit
import math
import os
import sqlite3
import threading
import time
import uuid
from collections import deque
from itertools import chain
from operator import attrgetter, itemgetter
from pathlib import Path
from typing import Any, Iterable, Sequence

from ...logs import LogOnce, get_logger
from ...meter.sinks import DeviceFigures
from ...records import RecordBatch, RequestRecord
from .schema import GROUP_BY, NAMES, SCHEMA_VERSION, aggregate, create_schema, query

__all__ = ["Ledger", "query", "aggregate", "GROUP_BY", "SCHEMA_VERSION"]

_Row = tuple[Any, ...]  # one requests-table row, in the order of _INSERT (or a _Shape's bound values)
log = get_logger(__name__)

# A row is the record's fields that go in as they are (read with one itemgetter), then the three
# that are converted (the flag as 0/1, the 128/64-bit ids as hex text), recorded_at and run_id: the
# INSERT names its columns in that order, so a row is one tuple concatenation, no list in between.
_CONVERTED = ("simulated", "trace_id", "span_id")
_PLAIN = tuple(n for n in NAMES if n not in _CONVERTED)
_ORDER = (*_PLAIN, *_CONVERTED, "recorded_at", "run_id")
_INSERT = f"INSERT INTO requests ({', '.join(_ORDER)}) VALUES ({', '.join('?' * len(_ORDER))})"
_ITEMS = itemgetter(*_PLAIN)
_GET = attrgetter(*_PLAIN)
_BATCH = 2000  # rows per transaction
_RETRY_S = (0.05, 2.0)  # first and longest wait between attempts on a failing disk
_PRUNE_EVERY_S = 3600.0
_LOG_EVERY_S = 60.0  # at most one log line per kind of trouble per minute
_I64 = (-(2**63), 2**63 - 1)
# what a bad value (not a bad disk) raises from sqlite3's executemany
_DATA_ERRORS = (OverflowError, ValueError, TypeError, sqlite3.IntegrityError, sqlite3.InterfaceError, sqlite3.DataError)
_LITERAL_INT = 2**62  # integers below this in magnitude are written into a statement as they are
_LITERAL_STR = 256  # characters at most of a string written into a statement
_SHAPES_KEPT = 64  # statements kept for a pass's constants (a few distinct ones on a server)
_MAX_PARAMS = 999  # parameters one statement may bind (SQLite's limit before 3.32; 32,766 since)
_ROWS_PER_STATEMENT = 100  # rows at most one INSERT carries
# A statement of its own is compiled for each new set of a pass's constants (~30 us one row a statement,
# ~0.7 ms a hundred): smaller passes bind every value, with the one statement every such pass shares,
# and the many-rows statement is made only for a set of constants seen before
_LITERAL_MIN_ROWS = 64


def _literal(v: Any) -> str | None:
    """``v`` as an SQL literal that stores exactly what binding ``v`` stores, or None where that is
    not certain (then it is bound): text without NUL or lone surrogates (short), an int well inside
    64 bits, a float that is a whole number below 2**53 (parsed exactly: 1.0, 0.0, 400.0; not -0.0)."""
    if type(v) is str:  # (a subclass is bound: its str() may differ)
        if len(v) > _LITERAL_STR or "\x00" in v:
            return None
        if not v.isascii():
            try:
                v.encode("utf-8")
            except UnicodeEncodeError:  # a lone surrogate: sqlite3 refuses it, the row goes the sanitising way
                return None
        return "'" + v.replace("'", "''") + "'"
    if type(v) is int:
        return str(v) if -_LITERAL_INT < v < _LITERAL_INT else None
    if type(v) is float:
        if v.is_integer() and abs(v) < 2.0**53 and not (v == 0.0 and math.copysign(1.0, v) < 0):
            return repr(v)
        return None
    return None


class _Shape:
    """How a queued row goes in: ``sql`` binds the columns at ``bound`` (indexes into ``_ORDER``;
    a row holds their values, in that order) and carries the others' values (``const``: index ->
    value) as literals. A meter pass's constant fields (device, sensor, route, run id, ...) are
    thus given to SQLite once per statement, not once per row: what is stored is the same."""

    __slots__ = ("sql", "bound", "const", "per_statement", "multi_sql", "used")

    def __init__(self, literals: dict[int, tuple[Any, str]]) -> None:
        """``literals``: column index -> (value, its literal, from :func:`_literal`)."""
        self.const = {i: v for i, (v, _) in literals.items()}
        self.bound = tuple(i for i in range(len(_ORDER)) if i not in literals)
        values = ", ".join(literals[i][1] if i in literals else "?" for i in range(len(_ORDER)))
        self.sql = f"INSERT INTO requests ({', '.join(_ORDER)}) VALUES ({values})"
        #: rows one statement of ``multi_sql`` inserts: within the 999 parameters any SQLite takes
        self.per_statement = max(1, min(_ROWS_PER_STATEMENT, _MAX_PARAMS // max(1, len(self.bound))))
        self.multi_sql = f"INSERT INTO requests ({', '.join(_ORDER)}) VALUES " + ", ".join([f"({values})"] * self.per_statement)
        self.used = 0  # batches inserted with it (by the writer thread)

    def insert(self, conn: sqlite3.Connection, rows: list[_Row]) -> None:
        """Insert ``rows`` (bound values) in order: ``per_statement`` rows a statement, the rest one a
        statement. sqlite3 lets go of the GIL around each statement it runs: one statement per row
        handed it to the event loop and back for every row."""
        k = self.per_statement
        # (one set of constants seen once, as a pass whose labels all differ from the last ones': its one-row
        # statement only, not a many-rows statement compiled for it alone)
        n = len(rows) // k * k if k > 1 and (self.used or not self.const) else 0
        self.used += 1
        if n:
            flat = chain.from_iterable
            conn.executemany(self.multi_sql, (tuple(flat(rows[i:i + k])) for i in range(0, n, k)))
        if n < len(rows):
            conn.executemany(self.sql, rows[n:] if n else rows)

    def full(self, row: _Row) -> _Row:
        """The whole row (in ``_ORDER``) of a row of bound values."""
        if not self.const:
            return row
        out: list[Any] = [None] * len(_ORDER)
        for i, v in zip(self.bound, row):
            out[i] = v
        for i, v in self.const.items():
            out[i] = v
        return tuple(out)


_ALL_BOUND = _Shape({})  # rows given whole (Ledger.write of a list of records)


class Ledger:
    """Append :class:`RequestRecord` s to the SQLite file at ``path`` from a writer thread.

    ``max_queue``: records held in memory, waiting for the disk, before new ones are
    dropped (counted). ``retention_days``: delete records older than this, on open and
    hourly (``None`` keeps everything). ``run_id``: this run's id (default: a uuid4 hex).

    Raises :class:`~wattspan.InputError` at construction if the file is not a wattspan
    ledger or was written by a newer wattspan. I/O trouble never raises: it is logged,
    counted in ``stats()["errors"]`` and retried.
    """

    def __init__(self, path: str | os.PathLike[str], *, max_queue: int = 100_000,
                 retention_days: float | None = None, run_id: str | None = None) -> None:
        if isinstance(max_queue, bool) or not isinstance(max_queue, int) or max_queue < 1:
            raise ValueError(f"max_queue must be an int >= 1 (records held in memory), got {max_queue!r}")
        if retention_days is not None and not (math.isfinite(retention_days) and retention_days > 0):
            raise ValueError(f"retention_days must be > 0 days, or None to keep everything; got {retention_days!r}")
        self.path = Path(path)
        self.run_id = run_id or uuid.uuid4().hex
        self.max_queue, self.retention_days = max_queue, retention_days
        # queued rows, a write's at a time: [shape, rows, how many of them are committed]; committed rows
        # leave it only after COMMIT (the writer thread alone takes them)
        self._pending: deque[list[Any]] = deque()
        self._queued = 0  # rows in _pending not yet committed
        self._shapes: dict[tuple[tuple[int, str], ...], _Shape] = {}  # by the literals a pass's constants give
        self._cv = threading.Condition()
        self._written = self._dropped = self._errors = self._sanitized = 0
        self._closing, self._deadline = False, math.inf
        self._conn: sqlite3.Connection | None = None
        self._inode: tuple[int, int] | None = None
        self._next_prune = math.inf if retention_days is None else 0.0
        self._once = LogOnce(log, every_s=_LOG_EVERY_S)  # per kind of trouble
        try:  # open now, so a foreign or too-new file is refused here, not in a log line
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._connection()
            self._prune_if_due()
        except (OSError, sqlite3.Error) as exc:
            self._failed(exc)
        self._thread = threading.Thread(target=self._run, name=f"wattspan-ledger-{self.path.name}", daemon=True)
        self._thread.start()
        atexit.register(self.close)

    # -- caller side: never waits for the disk -----------------------------------------
    def write(self, records: Iterable[RequestRecord]) -> None:
        """Queue ``records`` for the writer thread; returns at once.

        Raises ``TypeError`` (before queueing any) if an item is not a RequestRecord.
        """
        now = time.time()
        if type(records) is RecordBatch:
            shape, rows = self._batch_rows(records, now)
        else:
            shape, rows = _ALL_BOUND, self._rows(records, now)
        with self._cv:
            room = 0 if self._closing else max(0, self.max_queue - self._queued)
            kept = rows if room >= len(rows) else rows[:room]
            if kept:
                self._pending.append([shape, kept, 0])
                self._queued += len(kept)
            lost = len(rows) - len(kept)
            self._dropped += lost
            if kept:
                self._cv.notify_all()
            dropped, queued = self._dropped, self._queued
        if lost:
            why = "closed" if self._closing else f"queue full ({queued} records waiting for the disk)"
            self._warn("drop", "wattspan ledger %s: %s; dropped %d records (%d in all)", self.path, why, lost, dropped)

    def on_records(self, records: Sequence[RequestRecord]) -> None:
        """RecordSink: queue a meter pass's final records (see :meth:`write`)."""
        self.write(records)

    def on_device(self, figures: DeviceFigures) -> None:
        """RecordSink: the ledger keeps records only."""

    def flush(self, timeout: float | None = 5.0) -> bool:
        """Wait until every queued record is committed; False if ``timeout`` (s) passed first."""
        with self._cv:
            return self._cv.wait_for(lambda: not self._pending, timeout)

    def close(self, timeout: float = 5.0) -> None:
        """Commit what is queued (trying for up to ``timeout`` s), then stop. Idempotent."""
        with self._cv:
            if not self._closing:
                self._closing, self._deadline = True, time.monotonic() + timeout
            self._cv.notify_all()
        if self._thread is not threading.current_thread():
            self._thread.join()
        atexit.unregister(self.close)

    def stats(self) -> dict[str, int]:
        """Counts since open: ``written`` (committed), ``dropped``, ``errors`` (failed attempts), ``queued``,
        ``sanitized`` (records stored with out-of-range values clipped)."""
        with self._cv:
            return {"written": self._written, "dropped": self._dropped, "errors": self._errors, "queued": self._queued,
                    "sanitized": self._sanitized}

    def query(self, *, since: float | None = None, until: float | None = None, run_id: str | None = None) -> list[dict[str, Any]]:
        """Committed records (see :func:`query`); call :meth:`flush` first to include queued ones."""
        return query(self.path, since=since, until=until, run_id=run_id)

    def aggregate(self, by: str = "route", *, since: float | None = None, until: float | None = None) -> list[dict[str, Any]]:
        """Committed totals per ``by`` (see :func:`aggregate`)."""
        return aggregate(self.path, by, since=since, until=until)

    def __enter__(self) -> Ledger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- writer thread -------------------------------------------------------------------
    def _rows(self, records: Iterable[RequestRecord], now: float) -> list[_Row]:
        """The rows of ``records`` (in _INSERT's column order), all stamped ``now``; TypeError
        before any is queued if one is not a RequestRecord."""
        tail = (now, self.run_id)
        get, rec_type = _ITEMS, RequestRecord
        rows: list[_Row] = []
        append = rows.append
        for rec in records:
            if type(rec) is not rec_type and not isinstance(rec, rec_type):
                raise TypeError(f"Ledger.write takes RequestRecord objects, got {type(rec).__name__}")
            try:  # the fields straight from the instance dict: quicker than 39 attribute lookups
                d = rec.__dict__
                append(get(d) + (int(d["simulated"]), f"{d['trace_id']:032x}", f"{d['span_id']:016x}") + tail)
            except (AttributeError, KeyError):  # a record with a field left to its class default
                append(_GET(rec) + (int(rec.simulated), f"{rec.trace_id:032x}", f"{rec.span_id:016x}") + tail)
        return rows

    def _batch_rows(self, batch: RecordBatch, now: float) -> tuple[_Shape, list[_Row]]:
        """A meter pass's :class:`~wattspan.records.RecordBatch` as rows, from its columns: its
        constant fields in the statement (a :class:`_Shape`, as literals where that stores the same),
        the others one ``zip`` of the columns; no record object read or built. ``shape.full(row)`` is
        :meth:`_rows`' row of the same record."""
        n = len(batch)
        const, columns = batch.const, batch.columns
        literals: dict[int, tuple[Any, str]] = {}
        few = n < _LITERAL_MIN_ROWS  # every value bound (_ALL_BOUND's statement)
        parts: list[Sequence[Any]] = []
        col: Sequence[Any] | None
        v: Any
        for i, name in enumerate(_ORDER):
            if name == "recorded_at":
                parts.append([now] * n)
                continue
            if name == "run_id":
                col, v = None, self.run_id
            else:
                col = columns.get(name)
                v = None if col is not None else const[name]
            if name in _CONVERTED:
                fmt = "%032x" if name == "trace_id" else "%016x" if name == "span_id" else None  # what f"{v:032x}" gives
                if col is not None:
                    col = [int(x) for x in col] if fmt is None else list(map(fmt.__mod__, col))  # (quicker than str.format)
                else:
                    v = int(v) if fmt is None else fmt % v
            if col is None:
                lit = None if few else _literal(v)
                if lit is not None:
                    literals[i] = (v, lit)
                    continue
                col = [v] * n
            parts.append(col)
        if few:
            return _ALL_BOUND, list(zip(*parts))
        key = tuple((i, lit) for i, (_, lit) in literals.items())
        shape = self._shapes.get(key)
        if shape is None:
            if len(self._shapes) >= _SHAPES_KEPT:
                self._shapes.clear()
            shape = self._shapes[key] = _Shape(literals)
        return shape, list(zip(*parts))

    def _run(self) -> None:
        wait = _RETRY_S[0]
        while True:
            with self._cv:
                while not (self._pending or self._closing or time.monotonic() >= self._next_prune):
                    self._cv.wait(min(self._next_prune - time.monotonic(), _PRUNE_EVERY_S))
                if self._closing and (not self._pending or time.monotonic() >= self._deadline):
                    break
                batch = self._take(_BATCH)
            taken = sum(len(rows) for _, rows in batch)
            refused = 0
            try:
                self._prune_if_due()
                if batch:
                    conn = self._connection()
                    conn.execute("BEGIN IMMEDIATE")
                    conn.execute("SAVEPOINT batch")
                    refused = 0
                    try:
                        for shape, rows in batch:
                            shape.insert(conn, rows)
                    except _DATA_ERRORS:  # a bad record, not a bad disk: insert row by row, clipping
                        # executemany stops at the bad row with the rows before it inserted: undo them
                        # first, or they would be stored twice
                        conn.execute("ROLLBACK TO batch")
                        refused = self._insert_rows(conn, [shape.full(row) for shape, rows in batch for row in rows])
                    conn.execute("COMMIT")
            except Exception as exc:  # the writer must outlive any disk trouble
                self._failed(exc)
                time.sleep(min(wait, max(0.0, self._deadline - time.monotonic())))
                wait = min(2 * wait, _RETRY_S[1])
                continue
            wait = _RETRY_S[0]
            with self._cv:
                self._committed(taken)
                self._written += taken - refused  # a refused row is counted in dropped, not here
                self._cv.notify_all()
        with self._cv:
            lost = self._queued
            self._pending.clear()
            self._queued = 0
            self._dropped += lost
            self._cv.notify_all()
        if lost:
            log.error("wattspan ledger %s: closed with the disk still failing; %d records lost", self.path, lost)
        self._disconnect()

    def _take(self, most: int) -> list[tuple[_Shape, list[_Row]]]:
        """Up to ``most`` of the oldest queued rows, each write's with its shape (left queued; with the lock held)."""
        out: list[tuple[_Shape, list[_Row]]] = []
        for shape, rows, done in self._pending:
            if most <= 0:
                break
            part = rows[done:done + most] if done or len(rows) > most else rows
            out.append((shape, part))
            most -= len(part)
        return out

    def _committed(self, n: int) -> None:
        """The oldest ``n`` queued rows are in the file: off the queue (with the lock held)."""
        pending = self._pending
        self._queued -= n
        while n and pending:
            seg = pending[0]
            left = len(seg[1]) - seg[2]
            if left <= n:
                pending.popleft()
                n -= left
            else:
                seg[2] += n
                n = 0

    def _insert_rows(self, conn: sqlite3.Connection, batch: list[_Row]) -> int:
        """Insert ``batch`` one row at a time (inside the open transaction); a row the
        database refuses is stored sanitized (counted, logged). Returns the rows dropped."""
        dropped = 0
        for row in batch:
            try:
                conn.execute(_INSERT, row)
            except _DATA_ERRORS as exc:
                try:
                    conn.execute(_INSERT, _sanitize(row))
                except _DATA_ERRORS:  # cannot happen for a RequestRecord's row; never block the rest
                    with self._cv:
                        self._dropped += 1
                    dropped += 1
                    log.error("wattspan ledger %s: record %.64s cannot be stored (%s); dropped", self.path, row[0], exc)
                    continue
                with self._cv:
                    self._sanitized += 1
                    n = self._sanitized
                self._warn("sanitize", "wattspan ledger %s: record %.64s had values the database refuses (%s); stored "
                           "with them clipped (%d records so far)", self.path, row[0], exc, n)
        return dropped

    def _connection(self) -> sqlite3.Connection:
        """The writer's connection, (re)opened and checked to still be the file at ``path``.

        SQLite keeps writing to a deleted file without complaint: compare inodes.
        """
        if self._conn is not None:
            st = os.stat(self.path)
            if (st.st_dev, st.st_ino) != self._inode:
                raise OSError(f"{self.path} was deleted or replaced while open")
            return self._conn
        conn = sqlite3.connect(self.path, timeout=5.0, isolation_level=None, check_same_thread=False)
        try:
            create_schema(conn, self.path)
            if conn.execute("PRAGMA journal_mode=WAL").fetchone()[0].lower() != "wal":
                self._warn("wal", "wattspan ledger %s: WAL mode unavailable here; readers may wait for the writer", self.path)
            conn.execute("PRAGMA synchronous=NORMAL")
            st = os.stat(self.path)
        except BaseException:
            conn.close()
            raise
        self._conn, self._inode = conn, (st.st_dev, st.st_ino)
        return conn

    def _prune_if_due(self) -> None:
        days = self.retention_days
        if days is None or time.monotonic() < self._next_prune:
            return
        cutoff = time.time() - days * 86400.0
        conn = self._connection()
        n = conn.execute("DELETE FROM requests WHERE recorded_at < ?", (cutoff,)).rowcount
        conn.execute("PRAGMA incremental_vacuum").fetchall()  # give the freed pages back to the disk
        self._next_prune = time.monotonic() + _PRUNE_EVERY_S
        if n:
            log.info("wattspan ledger %s: retention %g days removed %d records", self.path, self.retention_days, n)

    def _failed(self, exc: BaseException) -> None:
        self._disconnect()
        with self._cv:
            self._errors += 1
            errors, queued = self._errors, self._queued
        self._warn("io", "wattspan ledger %s: cannot write (%s); %d records kept in memory, retrying (%d errors so far)",
                   self.path, exc, queued, errors)

    def _disconnect(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                conn.close()  # rolls back an open transaction
            except sqlite3.Error:
                pass

    def _warn(self, kind: str, msg: str, *args: object) -> None:
        self._once.warning(kind, msg, *args)


def _sanitize(row: _Row) -> _Row:
    """``row`` with integers clipped to 64 bits, non-finite floats as 0.0 and other values as text."""
    out: list[object] = []
    for v in row:
        if isinstance(v, bool):
            v = int(v)
        elif isinstance(v, int):
            v = min(max(v, _I64[0]), _I64[1])
        elif isinstance(v, float):
            v = v if math.isfinite(v) else 0.0
        elif isinstance(v, str):
            v = v.encode("utf-8", "backslashreplace").decode("utf-8")  # lone surrogates
        elif v is None:
            v = ""
        else:
            v = str(v)[:256]
        out.append(v)
    return tuple(out)
