"""Carbon-aware deferral of batch work: run each job in the cleanest window before its deadline.

A job says how long it takes (``duration_s``) and by when it must be done (``deadline_s``,
unix seconds). :func:`choose_start` (pure) picks, among the period starts from now to the last
one that still finishes by the deadline, the one whose forecast mean over the job's duration is
lowest (ties: the earliest). :class:`DeferralQueue` applies it to each submitted job with the
forecast of an :class:`~wattspan.carbon.intensity.HourlyIntensityProvider` (default: the offline
profile), starts jobs at their planned time with at most ``max_concurrency`` at once, and keeps
a :class:`Decision` per job: what it chose, the intensity it expected then and now, the
provider and why. A job whose deadline leaves no choice, or whose forecast cannot be had, runs
at once (``reason`` says so). A job that could not start on time because of the concurrency
cap starts as soon as a slot frees.

Library use::

    q = DeferralQueue(zone="GB", max_concurrency=2)
    job = q.submit(my_coroutine_fn, deadline_s=time.time() + 6 * 3600, duration_s=1800)
    await q.run_until_idle()        # or: asyncio.create_task(q.run())
    job.decision.reason, job.result

Synchronous callables run in a worker thread (``asyncio.to_thread``).

Deferred *requests* (:func:`defer_request`, :class:`DeferralMiddleware`, a budget's ``defer``)
survive a restart when the queue has a ``store``: a :class:`DeferralStore` (SQLite; by default
``<ledger>.deferral.sqlite`` beside ``WATTSPAN_LEDGER`` or the proxy's ``--db``). Each is written
there (its decision, the request's method, path, headers and body) before the 202 answer, and
its outcome (status, response) when it has run; the middleware that queued it reloads the
pending ones at its start (:meth:`DeferralQueue.resume`) and runs them at their planned time,
or at once when that has passed. One that was running when the process stopped runs again
(at least once). Library jobs (plain callables) cannot be written down: they stay in memory.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import math
import os
import secrets
import sqlite3
import threading
import time
from collections import OrderedDict
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any, Callable

import numpy as np

from .logs import get_logger

if TYPE_CHECKING:
    from .asgi import ASGIApp, Headers, Message, Receive, Scope, Send
    from .carbon.intensity import HourlyIntensityProvider

__all__ = ["Decision", "Job", "DeferralQueue", "DeferralMiddleware", "DeferralStore", "choose_start", "DeferralFull",
           "defer_request", "store_beside"]

log = get_logger(__name__)


class DeferralFull(RuntimeError):
    """The queue holds ``max_jobs`` pending jobs already."""


def choose_start(values: np.ndarray, latest: int, span: int = 1) -> int:
    """Index of the cleanest start among ``values[0..latest]`` for a job covering ``span``
    consecutive periods: the lowest mean of ``values[i:i+span]``; the earliest on ties.
    ``latest`` < 0 (no room before the deadline) gives 0: run now."""
    v = np.asarray(values, dtype=np.float64)
    latest = min(int(latest), len(v) - max(1, span))
    if latest <= 0:
        return 0
    span = max(1, int(span))
    c = np.concatenate(([0.0], np.cumsum(v)))
    means = (c[span:latest + span + 1] - c[:latest + 1]) / span
    return int(np.argmin(means))  # argmin returns the first minimum: the earliest


def _iso(t: float) -> str:
    return datetime.fromtimestamp(t, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass
class Decision:
    """Why a job runs when it does. Intensities in gCO2e/kWh, times unix seconds (UTC)."""

    job_id: str
    submitted_s: float
    deadline_s: float
    duration_s: float
    planned_start_s: float
    intensity_now_g_per_kwh: float
    intensity_planned_g_per_kwh: float
    provider: str
    zone: str
    reason: str
    started_s: float | None = None
    finished_s: float | None = None

    @property
    def expected_saving(self) -> float:
        """Fraction of operational CO2e the plan expects to save against starting at once."""
        now = self.intensity_now_g_per_kwh
        return 0.0 if now <= 0 else 1.0 - self.intensity_planned_g_per_kwh / now

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.update(planned_start=_iso(self.planned_start_s), deadline=_iso(self.deadline_s),
                 expected_saving=round(self.expected_saving, 4))
        return d


@dataclass
class Job:
    id: str
    fn: Callable[[], Any] | None
    decision: Decision
    name: str = ""
    status: str = "planned"  # planned | running | done | failed
    result: Any = None
    error: str = ""
    _done: asyncio.Event | None = field(default=None, repr=False)

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "name": self.name, "status": self.status, "error": self.error,
                "decision": self.decision.to_dict()}


_SCOPE_KEYS = ("type", "asgi", "http_version", "method", "scheme", "path", "root_path", "client", "server")
_SCHEMA = """
CREATE TABLE IF NOT EXISTS deferred_jobs (
    id TEXT PRIMARY KEY,
    origin TEXT NOT NULL,
    name TEXT NOT NULL,
    status TEXT NOT NULL,
    decision TEXT NOT NULL,
    request TEXT NOT NULL,
    body BLOB,
    result TEXT,
    error TEXT NOT NULL DEFAULT '',
    updated_s REAL NOT NULL
)"""


def _scope_to_json(scope: Scope) -> str:
    """What a deferred request needs to run again: the HTTP scope's plain fields (bytes as latin-1)."""
    out: dict[str, Any] = {k: scope[k] for k in _SCOPE_KEYS if k in scope and scope[k] is not None}
    out["raw_path"] = (scope.get("raw_path") or b"").decode("latin-1")
    out["query_string"] = (scope.get("query_string") or b"").decode("latin-1")
    out["headers"] = [[k.decode("latin-1"), v.decode("latin-1")] for k, v in scope.get("headers", ())]
    return json.dumps(out)


def _scope_from_json(text: str) -> dict[str, Any]:
    d: dict[str, Any] = json.loads(text)
    d["raw_path"] = d.get("raw_path", "").encode("latin-1") or None
    d["query_string"] = d.get("query_string", "").encode("latin-1")
    d["headers"] = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in d.get("headers", [])]
    for k in ("client", "server"):
        if isinstance(d.get(k), list):
            d[k] = tuple(d[k])
    if d["raw_path"] is None:
        del d["raw_path"]
    return d


class DeferralStore:
    """The deferred requests of a :class:`DeferralQueue`, in a SQLite file, so a restart resumes them.

    One row per job: its decision, the request (method, path, query, headers; JSON) and body
    while it waits, then its outcome (status, response, error) without the request or its body.
    The file is made with mode 0600: a waiting request's headers include its credentials. ``keep_done``
    finished rows are kept for their status pages. Thread-safe; every call is short, and the
    queue makes them off the event loop.
    """

    def __init__(self, path: str | os.PathLike[str], *, keep_done: int = 1000) -> None:
        self.path = os.fspath(path)
        self.keep_done = int(keep_done)
        parent = os.path.dirname(os.path.abspath(self.path))
        os.makedirs(parent, exist_ok=True)
        self._lock = threading.Lock()
        try:  # it holds the waiting requests' headers (their credentials too): this user's alone
            os.close(os.open(self.path, os.O_WRONLY | os.O_CREAT, 0o600))
        except OSError as exc:
            raise ValueError(f"cannot create the deferral store {self.path}: {exc.strerror or exc}") from None
        try:
            self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute(_SCHEMA)
        except sqlite3.DatabaseError as exc:
            raise ValueError(f"{self.path} is not a wattspan deferral store ({exc})") from None

    def __repr__(self) -> str:
        return f"DeferralStore({self.path!r})"

    def save(self, job: Job, origin: str, scope: Scope, body: bytes) -> None:
        with self._lock:
            self._db.execute("INSERT OR REPLACE INTO deferred_jobs VALUES (?,?,?,?,?,?,?,?,?,?)",
                             (job.id, origin, job.name, job.status, json.dumps(asdict(job.decision)),
                              _scope_to_json(scope), body, None, "", time.time()))

    def finish(self, job: Job) -> None:
        with self._lock:
            self._db.execute("UPDATE deferred_jobs SET status=?, decision=?, result=?, error=?, body=NULL, request='{}', "
                             "updated_s=? "
                             "WHERE id=?", (job.status, json.dumps(asdict(job.decision)), json.dumps(job.result),
                                            job.error, time.time(), job.id))
            self._db.execute("DELETE FROM deferred_jobs WHERE id IN (SELECT id FROM deferred_jobs WHERE status IN "
                             "('done', 'failed') ORDER BY updated_s DESC LIMIT -1 OFFSET ?)", (self.keep_done,))

    def load(self, origin: str) -> list[tuple[str, str, str, dict[str, Any], dict[str, Any], bytes | None, Any, str]]:
        """``(id, name, status, decision, scope, body, result, error)`` of ``origin``'s jobs, oldest first."""
        with self._lock:
            rows = self._db.execute("SELECT id, name, status, decision, request, body, result, error FROM deferred_jobs "
                                    "WHERE origin=? ORDER BY rowid", (origin,)).fetchall()
        return [(r[0], r[1], r[2], json.loads(r[3]), _scope_from_json(r[4]), r[5],
                 json.loads(r[6]) if r[6] is not None else None, r[7]) for r in rows]

    def close(self) -> None:
        with self._lock:
            self._db.close()


def store_beside(ledger: str | os.PathLike[str] | None) -> DeferralStore | None:
    """The deferral store beside a ledger file (``<ledger>.deferral.sqlite``), or None without a ledger."""
    if ledger is None or os.fspath(ledger) in ("", ":memory:"):
        return None
    return DeferralStore(os.fspath(ledger) + ".deferral.sqlite")


def _default_store() -> DeferralStore | None:
    """Beside ``WATTSPAN_LEDGER`` when it is set."""
    from .settings import get_settings

    return store_beside(get_settings().ledger)


class DeferralQueue:
    """Carbon-aware batch queue (see the module doc). ``provider``: an hourly provider
    (default :class:`~wattspan.carbon.intensity.ProfileProvider`); ``zone``: its zone; ``period_s``:
    the forecast step the plan uses (3600: hourly). ``clock``: unix seconds (``time.time``).
    Finished jobs are kept (bounded: ``keep_done``) so their decisions can be read, without what
    they held; deferred requests' bodies waiting to run hold at most ``max_held_bytes`` in all.
    ``store``: a :class:`DeferralStore` (or its path) that keeps deferred requests across restarts."""

    def __init__(self, provider: HourlyIntensityProvider | None = None, *, zone: str = "world", max_concurrency: int = 2, period_s: float = 3600.0,
                 max_jobs: int = 10_000, keep_done: int = 1000, clock: Callable[[], float] = time.time,
                 poll_s: float = 1.0, max_held_bytes: int = 256 << 20,
                 store: DeferralStore | str | os.PathLike[str] | None = None) -> None:
        from .carbon.intensity import ProfileProvider

        if not (isinstance(max_concurrency, int) and max_concurrency >= 1):
            raise ValueError(f"max_concurrency must be an integer >= 1, got {max_concurrency!r}")
        if not (period_s > 0 and poll_s > 0):
            raise ValueError("period_s and poll_s must be > 0 seconds")
        self.provider = provider or ProfileProvider()
        if hasattr(self.provider, "check_zone"):
            zone = self.provider.check_zone(zone)  # an unknown zone fails here, at start
        self.zone = zone
        self.max_concurrency, self.period_s = max_concurrency, float(period_s)
        self.max_jobs, self.keep_done, self.clock, self.poll_s = max_jobs, keep_done, clock, float(poll_s)
        self.jobs: OrderedDict[str, Job] = OrderedDict()
        self.running = 0
        #: request bodies held by deferred requests waiting to run (bounded by max_held_bytes)
        self.held_bytes, self.max_held_bytes = 0, int(max_held_bytes)
        self._ids = itertools.count(1)
        self._wake: asyncio.Event | None = None
        self.counters = {"submitted": 0, "deferred": 0, "ran": 0, "failed": 0, "late": 0, "resumed": 0, "store_errors": 0}
        self.store = store if isinstance(store, DeferralStore) or store is None else DeferralStore(store, keep_done=keep_done)
        self._persisted: set[str] = set()  # ids of the jobs in the store
        self._saving: set[str] = set()  # ids of the jobs being written to the store: they start once written
        self._resumed: set[str] = set()  # origins already reloaded
        #: the server's lifespan state (what the app's startup put in ``scope["state"]``): a request
        #: resumed from the store gets a shallow copy, as the server gives every live request
        self.lifespan_state: dict[str, Any] | None = None

    def note_state(self, scope: Scope) -> None:
        """Keep the server's lifespan state from a lifespan (or the first HTTP) scope, for resumed requests."""
        if self.lifespan_state is None and isinstance(scope.get("state"), dict):
            # the lifespan's own dict (the app fills it at startup); a request's is its own copy, which the
            # request may write to: keep a copy of that, not the request's dict
            self.lifespan_state = scope["state"] if scope["type"] == "lifespan" else dict(scope["state"])

    # ------------------------------------------------------------- planning
    def plan(self, deadline_s: float, duration_s: float = 0.0, now: float | None = None, job_id: str = "") -> Decision:
        """The decision for a job submitted ``now``, without queueing it."""
        now = self.clock() if now is None else float(now)
        if not (math.isfinite(deadline_s) and math.isfinite(duration_s) and duration_s >= 0):
            raise ValueError("deadline_s and duration_s must be finite, duration_s >= 0")
        if deadline_s < 1e9 <= now:  # 2001: seconds from now, not a unix time (which ran the job at once, silently)
            raise ValueError(f"deadline_s is a unix time (time.time() + seconds), got {deadline_s!r}: "
                             f"for {deadline_s:g} s from now pass time.time() + {deadline_s:g}")
        if deadline_s - now > MAX_DEADLINE_S:  # as the HTTP path: past the forecasts, and past what a plan can name
            raise ValueError(f"deadline_s is at most {MAX_DEADLINE_S:.0f} s ({MAX_DEADLINE_S / 86400:.0f} days) from now, "
                             f"got {deadline_s - now:.3g} s")
        p = self.period_s
        latest_start = deadline_s - duration_s
        # later period starts that still leave the job time to finish by the deadline
        n = int(math.floor(latest_start / p) - math.floor(now / p)) if latest_start >= now else -1
        span = max(1, int(math.ceil(duration_s / p))) if duration_s > 0 else 1
        name = getattr(self.provider, "name", type(self.provider).__name__)
        try:
            fc = self.provider.forecast(self.zone, now, now + (max(n, 0) + span) * p)
            vals = np.array([v.g_per_kwh for v in fc], dtype=np.float64)
            if not len(vals):
                raise ValueError("empty forecast")
            fb = any(v.fallback for v in fc)
        except Exception as exc:  # no forecast: run at once, and say why
            log.warning("no intensity forecast for %r (%s); running the job at once", self.zone, exc)
            return Decision(job_id, now, deadline_s, duration_s, now, math.nan, math.nan, name, self.zone,
                            f"no forecast ({type(exc).__name__}): run at once")
        i = choose_start(vals, n, span)
        start = now if i == 0 else (math.floor(now / p) + i) * p
        planned = float(vals[i:i + span].mean()) if len(vals) >= i + span else float(vals[i])
        at_once = float(vals[:span].mean()) if len(vals) >= span else float(vals[0])
        if n <= 0:
            reason = "deadline leaves no room to wait: run at once"
        elif i == 0:
            reason = f"now is the cleanest of {n + 1} start(s) before the deadline"
        else:
            reason = (f"cleanest of {n + 1} start(s) before the deadline by {name}'s forecast: "
                      f"{planned:.0f} vs {at_once:.0f} gCO2e/kWh now")
        if fb:
            reason += " (forecast from the offline fallback)"
        return Decision(job_id, now, deadline_s, duration_s, start, at_once, planned, name, self.zone, reason)

    # ------------------------------------------------------------- queue
    def submit(self, fn: Callable[[], Any], *, deadline_s: float, duration_s: float = 0.0, name: str = "") -> Job:
        """Plan ``fn`` (a coroutine function or a plain callable) and queue it. The plan may ask a
        live provider for its forecast: on an event loop, use :meth:`submit_async`."""
        self._check_room()
        jid = self._new_id()
        return self._enqueue(jid, fn, self.plan(deadline_s, duration_s, job_id=jid), name)

    async def submit_async(self, fn: Callable[[], Any], *, deadline_s: float, duration_s: float = 0.0, name: str = "") -> Job:
        """:meth:`submit`, with the plan (a live forecast: up to the provider's timeout) off the event loop."""
        self._check_room()
        jid = self._new_id()
        d = await asyncio.to_thread(self.plan, deadline_s, duration_s, job_id=jid)
        return self._enqueue(jid, fn, d, name)

    def _check_room(self) -> None:
        pending = sum(1 for j in self.jobs.values() if j.status in ("planned", "running"))
        if pending >= self.max_jobs:
            raise DeferralFull(f"the deferral queue holds {pending} jobs already (max_jobs)")

    def _new_id(self) -> str:
        return f"{next(self._ids):06d}-{secrets.token_urlsafe(12)}"  # unguessable: the id is what lets one read the result

    def _enqueue(self, jid: str, fn: Callable[[], Any], d: Decision, name: str) -> Job:
        self._check_room()  # again: others may have queued while this one was planned
        job = Job(jid, fn, d, name)
        self.jobs[jid] = job
        self.counters["submitted"] += 1
        if d.planned_start_s > d.submitted_s:
            self.counters["deferred"] += 1
        log.info("job %s %s: start %s (%s)", jid, name, _iso(d.planned_start_s), d.reason)
        self._trim()
        if self._wake is not None:
            self._wake.set()
        return job

    def get(self, job_id: str) -> Job | None:
        return self.jobs.get(job_id)

    def decisions(self) -> list[dict[str, Any]]:
        return [j.decision.to_dict() for j in self.jobs.values()]

    def _trim(self) -> None:
        done = [k for k, j in self.jobs.items() if j.status in ("done", "failed")]
        for k in done[: max(0, len(done) - self.keep_done)]:
            del self.jobs[k]

    def _due(self) -> list[Job]:
        now = self.clock()
        due = [j for j in self.jobs.values() if j.status == "planned" and j.decision.planned_start_s <= now
               and j.id not in self._saving]
        due.sort(key=lambda j: (j.decision.deadline_s, j.decision.planned_start_s))
        return due[: max(0, self.max_concurrency - self.running)]

    async def _run_job(self, job: Job) -> None:
        job.status, job.decision.started_s = "running", self.clock()
        if job.decision.started_s > job.decision.deadline_s - job.decision.duration_s + self.poll_s:
            self.counters["late"] += 1
        try:
            fn = job.fn
            if fn is None:
                raise RuntimeError("the job has already run")
            if asyncio.iscoroutinefunction(fn):
                job.result = await fn()
            else:
                job.result = await asyncio.to_thread(fn)
            job.status = "done"
            self.counters["ran"] += 1
        except Exception as exc:
            job.status, job.error = "failed", f"{type(exc).__name__}: {exc}"
            self.counters["failed"] += 1
            log.warning("deferred job %s failed: %s", job.id, job.error)
        finally:
            job.fn = None  # what it held (a deferred request's body) is not kept with the finished job
            job.decision.finished_s = self.clock()
            self.running -= 1
            if self.store is not None and job.id in self._persisted:
                self._persisted.discard(job.id)
                await self._store_call(self.store.finish, job)
            if self._wake is not None:
                self._wake.set()

    async def _store_call(self, fn: Callable[..., None], *args: Any) -> bool:
        """A store write off the event loop; a failure is logged and counted, never raised into the server."""
        try:
            await asyncio.to_thread(fn, *args)
            return True
        except (sqlite3.Error, OSError, TypeError, ValueError) as exc:
            self.counters["store_errors"] += 1
            log.warning("deferral store %s: %s (%s)", getattr(self.store, "path", "?"), type(exc).__name__, exc)
            return False

    def resume(self, app: ASGIApp, origin: str = "deferral") -> int:
        """Reload ``origin``'s deferred requests from the store, to run through ``app``; the number pending.

        Finished ones come back with their outcome (for their status pages); pending ones (and one
        that was running when the process stopped) run at their planned time, or at once if it has
        passed. Once per origin; without a store, 0.
        """
        if self.store is None or origin in self._resumed:
            return 0
        self._resumed.add(origin)
        try:
            rows = self.store.load(origin)
        except (sqlite3.Error, ValueError) as exc:
            self.counters["store_errors"] += 1
            log.warning("deferral store %s: cannot read the deferred jobs (%s)", self.store.path, exc)
            return 0
        pending = 0
        for jid, name, status, dec, scope, body, result, error in rows:
            if jid in self.jobs:
                continue
            d = Decision(**{k: dec[k] for k in Decision.__dataclass_fields__ if k in dec})
            if status in ("done", "failed"):
                self.jobs[jid] = Job(jid, None, d, name, status, result, error)
                continue
            raw = body or b""
            d.started_s = None
            self.jobs[jid] = Job(jid, _replay(self, app, scope, raw), d, name)
            self.held_bytes += len(raw)
            self._persisted.add(jid)
            pending += 1
        self.counters["resumed"] += pending
        if pending:
            log.info("deferral store %s: resumed %d deferred request(s)", self.store.path, pending)
        self._trim()
        if self._wake is not None:
            self._wake.set()
        return pending

    def _next_wait(self) -> float:
        planned = [j.decision.planned_start_s for j in self.jobs.values() if j.status == "planned"]
        if not planned:
            return self.poll_s
        return max(0.0, min(self.poll_s, min(planned) - self.clock()))

    async def run(self) -> None:
        """Start due jobs forever (cancel the task to stop)."""
        self._wake = asyncio.Event()
        tasks: set[asyncio.Task[None]] = set()
        while True:
            for job in self._due():
                self.running += 1
                t = asyncio.create_task(self._run_job(job))
                tasks.add(t)
                t.add_done_callback(tasks.discard)
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), timeout=self._next_wait() or 0.01)
            except asyncio.TimeoutError:
                pass

    async def run_until_idle(self, timeout_s: float | None = None) -> None:
        """Run until no job is planned or running (for scripts and tests)."""
        task = asyncio.create_task(self.run())
        t0 = time.monotonic()
        try:
            while any(j.status in ("planned", "running") for j in self.jobs.values()):
                if timeout_s is not None and time.monotonic() - t0 > timeout_s:
                    raise TimeoutError(f"deferred jobs still pending after {timeout_s} s")
                await asyncio.sleep(0.01)
        finally:
            task.cancel()


# ----------------------------------------------------------------------------- serving layer

MAX_DEADLINE_S = 366 * 86400.0
CAPTURE_BYTES = 1 << 20  # of a deferred job's response body kept for its status page


def _header(scope: Scope, name: bytes) -> str:
    for k, v in scope.get("headers", ()):
        if k == name:
            value: str = v.decode("latin-1")
            return value
    return ""


async def send_json(send: Send, status: int, body: dict[str, Any], extra: Headers | None = None) -> None:
    import json

    raw = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(raw)).encode()), *(extra or [])]})
    await send({"type": "http.response.body", "body": raw})


async def capture(app: ASGIApp, scope: Scope, body: bytes) -> dict[str, Any]:
    """Run ``app`` on a recorded request; return its response (status, headers, body text).
    A 5xx answer fails the job."""
    sent = False
    out: dict[str, Any] = {"status": 0, "headers": {}, "body": ""}
    parts: list[bytes] = []
    kept = 0  # bytes in parts: a job keeps at most CAPTURE_BYTES of its response in memory

    async def receive() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        await asyncio.sleep(3600)
        return {"type": "http.disconnect"}

    async def send(m: Message) -> None:
        nonlocal kept
        if m["type"] == "http.response.start":
            out["status"] = m["status"]
            out["headers"] = {k.decode("latin-1"): v.decode("latin-1") for k, v in m.get("headers", ())}
        elif m["type"] == "http.response.body" and kept < CAPTURE_BYTES:
            b = m.get("body", b"")[: CAPTURE_BYTES - kept]
            parts.append(b)
            kept += len(b)

    await app(dict(scope), receive, send)
    out["body"] = b"".join(parts).decode("utf-8", "replace")
    if out["status"] >= 500:
        raise RuntimeError(f"the deferred request answered HTTP {out['status']}")
    return out


def _replay(queue: DeferralQueue, app: ASGIApp, job_scope: Scope, body: bytes) -> Callable[[], Any]:
    """The job that runs a recorded request through ``app`` and then frees its body's share of ``held_bytes``."""

    async def run_it() -> dict[str, Any]:
        scope = job_scope
        if "state" not in scope and queue.lifespan_state is not None:  # resumed: the state of this run's startup
            scope = {**scope, "state": dict(queue.lifespan_state)}
        try:
            return await capture(app, scope, body)
        finally:
            queue.held_bytes -= len(body)

    return run_it


async def defer_request(queue: DeferralQueue, app: ASGIApp, scope: Scope, receive: Receive, send: Send, *,
                        default_deadline_s: float = 86400.0, max_body_bytes: int = 8 << 20,
                        extra_headers: Headers | None = None, extra: dict[str, Any] | None = None,
                        origin: str = "deferral") -> None:
    """Read the request, queue it on ``queue`` to run through ``app`` later, answer 202 with the
    job (``status_url``: ``/wattspan/jobs/<id>``). ``x-wattspan-deadline-s``: seconds from now
    (default ``default_deadline_s``); ``x-wattspan-duration-s``: how long it runs (default 0).
    With a store, the job is written there before the answer, under ``origin`` (the middleware
    whose ``app`` runs it after a restart: :meth:`DeferralQueue.resume`)."""
    chunks: list[bytes] = []
    size = 0
    while True:
        m = await receive()
        if m["type"] == "http.disconnect":
            return
        b = m.get("body", b"")
        size += len(b)
        if size > max_body_bytes:
            await send_json(send, 413, {"error": {"type": "request_too_large", "message": f"a deferred request body may be at most {max_body_bytes} bytes"}})
            return
        chunks.append(b)
        if not m.get("more_body", False):
            break
    try:
        deadline_in = float(_header(scope, b"x-wattspan-deadline-s") or default_deadline_s)
        duration = float(_header(scope, b"x-wattspan-duration-s") or 0.0)
        if not (math.isfinite(deadline_in) and 0 <= deadline_in <= MAX_DEADLINE_S and math.isfinite(duration) and 0 <= duration <= deadline_in + 1):
            raise ValueError
    except ValueError:
        await send_json(send, 400, {"error": {"type": "bad_request", "message": f"x-wattspan-deadline-s must be seconds from now, 0 to {MAX_DEADLINE_S:.0f}; x-wattspan-duration-s at most that"}})
        return
    body = b"".join(chunks)
    if queue.held_bytes + len(body) > queue.max_held_bytes:  # the bodies waiting to run are bounded in all
        await send_json(send, 503, {"error": {"type": "deferral_queue_full", "message": f"the deferred requests waiting "
                                              f"hold {queue.held_bytes} bytes already (max_held_bytes)"}}, [(b"retry-after", b"60")])
        return
    job_scope = {k: v for k, v in scope.items() if k not in ("route", "endpoint", "path_params")}  # set again by the router
    job_scope["headers"] = [(k, v) for k, v in scope.get("headers", ()) if not k.startswith(b"x-wattspan-")]

    try:
        job = await queue.submit_async(_replay(queue, app, job_scope, body), deadline_s=queue.clock() + deadline_in,
                                       duration_s=duration, name=f"{scope.get('method', '')} {scope.get('path', '')}")
    except DeferralFull as exc:
        await send_json(send, 503, {"error": {"type": "deferral_queue_full", "message": str(exc)}}, [(b"retry-after", b"60")])
        return
    queue.held_bytes += len(body)
    if queue.store is not None:
        queue._saving.add(job.id)  # no await since it was queued: it cannot have started; it starts once written
        try:
            if await queue._store_call(queue.store.save, job, origin, job_scope, body):
                queue._persisted.add(job.id)  # else kept in memory only (logged, counted)
        finally:
            queue._saving.discard(job.id)
            if queue._wake is not None:
                queue._wake.set()
    d = job.decision
    await send_json(send, 202, {"job": job.id, "status": job.status, "status_url": f"/wattspan/jobs/{job.id}",
                                "planned_start": _iso(d.planned_start_s), "reason": d.reason, "decision": d.to_dict(), **(extra or {})},
                    [(b"location", f"/wattspan/jobs/{job.id}".encode()), *(extra_headers or [])])


async def job_status(queue: DeferralQueue, path: str, send: Send) -> None:
    """``GET /wattspan/jobs``: every kept decision; ``/wattspan/jobs/<id>``: one job (with its
    response once done)."""
    if path.rstrip("/") == "/wattspan/jobs":  # decisions only: no ids, so no one else's results
        jobs = []
        for j in queue.jobs.values():
            d = j.to_dict()
            d.pop("id")
            d["decision"].pop("job_id")
            jobs.append(d)
        await send_json(send, 200, {"jobs": jobs, "counters": queue.counters})
        return
    job = queue.get(path.rsplit("/", 1)[1])
    if job is None:
        await send_json(send, 404, {"error": {"type": "not_found", "message": "no such job (finished jobs are kept a while)"}})
        return
    d = job.to_dict()
    if job.status == "done":
        d["response"] = job.result
    await send_json(send, 200, d)


class DeferralMiddleware:
    """Pure ASGI: a ``POST`` to one of ``paths`` (default the demo's ``/v1/batch``) that carries
    ``x-wattspan-deadline-s`` is queued on ``queue`` and run through the app in the cleanest
    window before its deadline (answer 202 + ``/wattspan/jobs/<id>``); anything else passes
    through. Put it outside :class:`~wattspan.EnergyMiddleware` so the deferred run is metered
    when it runs. ``queue`` default: a :class:`DeferralQueue` on the offline profile for ``zone``
    (default ``$WATTSPAN_REGION``), stored beside ``$WATTSPAN_LEDGER`` when that is set; the
    queue's stored requests are resumed at once."""

    def __init__(self, app: ASGIApp, *, queue: DeferralQueue | None = None, zone: str | None = None,
                 paths: tuple[str, ...] | list[str] = ("/v1/batch",), max_body_bytes: int = 16 << 20) -> None:
        self.app = app
        self.queue = queue or DeferralQueue(zone=zone or _settings_region(), store=_default_store())
        self.queue.resume(app, "deferral")  # the deferred requests a previous run left
        self.paths = tuple(paths)
        self.max_body_bytes = int(max_body_bytes)
        self._runner: asyncio.Task[None] | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            self.queue.note_state(scope)
            await self.app(scope, receive, _on_startup(send, self._start))
            return
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        if self._runner is None:
            self.queue.note_state(scope)
            self._start()
        if path.startswith("/wattspan/jobs") and scope.get("method") == "GET":
            await job_status(self.queue, path, send)
            return
        if scope.get("method") == "POST" and path in self.paths and _header(scope, b"x-wattspan-deadline-s"):
            await defer_request(self.queue, self.app, scope, receive, send, max_body_bytes=self.max_body_bytes)
            return
        await self.app(scope, receive, send)


    def _start(self) -> None:
        """Run the queue (resumed requests included) from the server's startup, or its first request."""
        if self._runner is None:
            self._runner = asyncio.get_running_loop().create_task(self.queue.run())


def _on_startup(send: Send, start: Callable[[], None]) -> Send:
    """The lifespan's ``send``, calling ``start`` once the app's startup has completed."""

    async def wrapped(message: Message) -> None:
        await send(message)
        if message.get("type") == "lifespan.startup.complete":
            start()

    return wrapped


def _settings_region() -> str:
    """``WATTSPAN_REGION``, read and checked once with the other settings."""
    from .settings import get_settings

    return get_settings().region
