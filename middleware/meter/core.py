"""The live meter: requests and batch steps in, final per-request records out.

The request path only appends a tuple to a deque (a few hundred nanoseconds,
no lock, no I/O). One background thread drains those events, and every
``period_s`` attributes the stretch of time the sensors have covered since the
last pass (``[cursor, latest sample - lag]``) with :func:`wattspan.attribute`,
adding each request's share to its running total. A request whose end lies
before the cut is final: its :class:`RequestRecord` goes to the sinks
(:class:`~wattspan.meter.sinks.RecordSink`: the span processor, metrics, the
ledger, a user's callbacks) from that thread; the meter knows no exporter. A sensor that
stops (a lost GPU) cannot hold records back for ever: after ``max_delay_s``
the cut moves on with the clock, and the record's ``coverage`` says how much of
the request the trace covered.

The idle baseline and the batch-step model are re-estimated over the last
``history_s`` of trace, so short passes (and the provisional per-request figure,
:mod:`wattspan.meter.provisional`) use a model fitted on enough readings. When: a
device's first model as soon as the sensor's readings cover ``min_fit_steps``
(20) of its batch steps, retried while new steps arrive until one is accepted
(after 1 s, then 2, 4, ... up to ``refit_s``); then every ``refit_s`` (5 s)
while the device has new steps or requests in flight. The model is fitted over the stretch the steps
span (with as much time before them; the idle baseline over the whole
history), and accepted when it used at least 20 readings and ``min_fit_steps``
steps and predicts held-out readings better than their mean (``cv_r2 > 0``);
otherwise the device keeps the model it had. ``counters["step_model_fits"]``
and ``["step_model_rejected"]`` count the outcomes.
"""

from __future__ import annotations

import functools
import math
from itertools import chain, repeat
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

from ..logs import get_logger
from ..devices import group_key as _group_key

_str_group_key = functools.lru_cache(maxsize=1024)(_group_key)


def _device_key(device: str | int | Sequence[str | int]) -> str:
    """The canonical device or group name (``"gpu0, gpu1"`` and ``"gpu0+gpu1"`` -> ``"gpu0,gpu1"``)."""
    return _str_group_key(device) if isinstance(device, str) else _group_key(device)
from ..attribution import BatchStep, Requests, StepModel, Steps, attribute
from ..attribution.inputs import TraceError, check_board_lag
from ..carbon.records import request_batch
from ..records import RequestLabels, RequestRecord
from ..samples import DeviceInfo, SampleKind
from .context import MAX_TOKENS
from .sinks import DeviceFigures, FlushableSink, RecordSink, SpanSink

if TYPE_CHECKING:
    from ..carbon.model import CarbonModel
    from ..sampler import Sampler
    from ..sources._base import PowerSource

__all__ = ["Balance", "Meter"]

log = get_logger(__name__)

_BEGIN, _END, _STEP, _MARK = 0, 1, 2, 3
_END_FIELDS = 4  # an end whose labels follow as plain values (Meter.end_fields); sent to peers as an _END
_new_tuple = tuple.__new__  # _new_tuple(RequestLabels, values): the labels from their nine fields in order, no keyword handling
_LABEL_ORDER = ("route", "http_method", "status_code", "model", "tenant", "prompt_tokens", "output_tokens", "trace_id", "span_id")
if RequestLabels._fields != _LABEL_ORDER:  # end_fields' values are taken positionally: fail at import, never mislabel
    raise ImportError(f"wattspan.meter builds RequestLabels in the order {_LABEL_ORDER}, but its fields are {RequestLabels._fields}")
_QUALITY_RANK = {"good": 1, "coarse": 2, "misfit": 3}
_NS_MIN, _NS_MAX = -(2**63) + 1, 2**63 - 1  # a time the columns (int64) hold
#: a time further ahead of time.monotonic_ns() than this is on another clock (time.time_ns(): decades ahead)
_AHEAD_NS = 86_400 * 1_000_000_000
_MAX_SECONDS = 1e6  # the meter's periods and delays (s) at most: 11 days


def _as_ns(t: Any) -> int | None:
    """``t`` as an int of nanoseconds when it is a time: an integer (numpy's too) or a finite real
    number, in int64's range; otherwise None (NaN, inf, 2**70, a string, None)."""
    if type(t) is int:
        return t if _NS_MIN <= t <= _NS_MAX else None
    if isinstance(t, bool) or not isinstance(t, (int, float, np.integer, np.floating)):
        return None
    try:
        v = int(t)
    except (ValueError, OverflowError):  # NaN, inf
        return None
    return v if _NS_MIN <= v <= _NS_MAX else None


def _parts_json(device: str, parts: dict[str, float] | None) -> str:
    """A group request's energy per member device, every member named (0 J where none was metered)."""
    import json

    parts = parts or {}
    return json.dumps({m: float(parts.get(m, 0.0)) for m in device.split(",")}, separators=(",", ":"))


class Balance(NamedTuple):
    """Where the energy the meter measured has gone, in joules, as of one attribution pass.

    ``measured_j == attributed_j + pending_j + peers_j + unattributed_j`` up to float
    rounding, on the accelerators this meter's sources read (host energy is apart).
    """

    measured_j: float  #: read from the sensors over every pass so far
    attributed_j: float  #: carried by this process's final records (handed to the sinks)
    pending_j: float  #: carried by requests not final yet (in flight, or waiting for the sensor)
    peers_j: float  #: carried by requests of other worker processes sharing the device (their records are theirs)
    unattributed_j: float  #: what no request could carry


class _Table:
    """The requests in flight, as columns: one row per request, the rows of final requests reused.

    Per request nothing the cyclic garbage collector tracks (an object per request, alive the half
    second or so a request waits for the sensor, was one more for every collection to scan and
    promote), and a pass adds its requests' shares to whole columns at once (numpy). Only the
    meter's thread writes; :meth:`Meter.flush` (any thread) reads the ``ended`` count alone.

    Per row: ``rid`` (None: a free row), ``device``, ``start``/``end`` (monotonic ns; end None
    while in flight), ``meta`` (what its end event carried), ``method``, ``quality``, ``parts``
    (a device group's energy per member device, J), ``peer`` (pid of the peer process serving it;
    0 = this process); and the sums ``dyn``, ``idle``, ``dev_s``, ``host``, ``band`` (J, s; band:
    the half-width of the 90 % band, summed over periods) and ``cov`` (ns covered by the trace).
    """

    __slots__ = ("row", "free", "rid", "device", "start", "end", "meta", "method", "quality", "parts", "peer",
                 "dyn", "idle", "dev_s", "host", "band", "cov", "ended", "peers", "alias")

    def __init__(self) -> None:
        self.row: dict[str, int] = {}  # request id -> its row
        self.free: list[int] = []
        self.rid: list[str | None] = []
        self.device: list[str] = []
        self.start: list[int] = []
        self.end: list[int | None] = []
        self.meta: list[RequestLabels | Mapping[str, Any] | tuple[Any, ...] | None] = []
        self.method: list[str] = []
        self.quality: list[str] = []
        self.parts: list[dict[str, float] | None] = []
        self.peer: list[int] = []
        self.dyn = self.idle = self.dev_s = self.host = self.band = np.zeros(0)
        self.cov = np.zeros(0, dtype=np.int64)
        self.ended = 0  # rows of this process whose request has ended (not final yet)
        self.peers = 0  # rows of peers' requests
        #: row key -> the caller's id, for an ended request kept under another key: its id was begun again
        self.alias: dict[str, str] = {}

    def __len__(self) -> int:
        return len(self.row)

    def _grow(self) -> None:
        n = len(self.rid)
        k = max(1024, n)
        self.free.extend(range(n + k - 1, n - 1, -1))  # the lowest rows first
        for col in (self.device, self.method, self.quality):
            col.extend([""] * k)
        for ocol in (self.rid, self.end, self.meta, self.parts):
            ocol.extend([None] * k)
        for icol in (self.start, self.peer):
            icol.extend([0] * k)
        z = np.zeros(k)
        self.dyn, self.idle, self.dev_s, self.host, self.band = (np.concatenate((a, z)) for a in
                                                                  (self.dyn, self.idle, self.dev_s, self.host, self.band))
        self.cov = np.concatenate((self.cov, np.zeros(k, dtype=np.int64)))

    def add(self, rid: str, device: str, start: int, peer: int = 0) -> None:
        """A request begins (one already in flight under ``rid`` is replaced)."""
        old = self.row.get(rid)
        if old is not None:
            self.remove((old,))
        free = self.free
        if not free:
            self._grow()
        r = free.pop()
        self.row[rid] = r
        self.rid[r] = rid
        self.device[r] = device
        self.start[r] = start
        self.end[r] = None
        self.meta[r] = None
        self.method[r] = ""
        self.quality[r] = ""
        self.parts[r] = None
        self.peer[r] = peer
        if peer:
            self.peers += 1

    def set_end(self, r: int, t: int) -> None:
        """Row ``r``'s request ended at ``t`` (never before it began)."""
        if self.end[r] is None and not self.peer[r]:
            self.ended += 1
        s = self.start[r]
        self.end[r] = t if t > s else s

    def remove(self, rows: Sequence[int]) -> None:
        """Forget these rows' requests (final, or a peer's gone); their rows are free again."""
        if not rows:
            return
        row, rid, end, peer, meta, parts = self.row, self.rid, self.end, self.peer, self.meta, self.parts
        freed: list[int] = []
        for r in rows:
            k = rid[r]
            if k is None:
                continue  # free already (or named twice): freeing it again would hand it to two requests
            freed.append(r)
            del row[k]
            rid[r] = None
            if self.alias:
                self.alias.pop(k, None)
            if peer[r]:
                self.peers -= 1
            elif end[r] is not None:
                self.ended -= 1
            meta[r] = None
            parts[r] = None
        idx = np.asarray(freed, dtype=np.intp)
        for a in (self.dyn, self.idle, self.dev_s, self.host, self.band, self.cov):
            a[idx] = 0
        self.free.extend(freed)

    def energy(self, r: int) -> float:
        """Row ``r``'s energy so far (J)."""
        return float(self.dyn[r]) + float(self.idle[r])

    def rename(self, r: int) -> None:
        """Keep row ``r`` under a key of its own (its id is begun again before its record is made):
        the caller's id is given back to its record (``alias``)."""
        k = self.rid[r]
        assert k is not None
        key = f"{k}\x00{r}"  # the row's index: no other row in the table has it
        del self.row[k]
        self.row[key] = r
        self.rid[r] = key
        self.alias[key] = self.alias.pop(k, k)


def _steps_spans(steps_rows: list[BatchStep], span: dict[str, list[int]]) -> None:
    """Widen ``span`` (request id -> [start, end] ns) to every step naming the request, in one pass at C
    speed: a thousand requests in flight name a million entries a minute, where a loop per entry held
    the GIL for up to a second each refit (the server's own requests stalled 100 ms)."""
    starts = np.fromiter((r[0] for r in steps_rows), dtype=np.int64, count=len(steps_rows))
    ends = np.fromiter((r[1] for r in steps_rows), dtype=np.int64, count=len(steps_rows))
    if bool(np.all(starts[1:] >= starts[:-1])) and bool(np.all(ends[1:] >= ends[:-1])):
        # steps in time order (the rule: one device's steps one after another): a request's span runs from
        # its first step's start to its last step's end, each a dict built from pairs (later pairs win)
        last = dict(zip(chain.from_iterable(r[3] for r in steps_rows),
                        chain.from_iterable(repeat(r[1], len(r[3])) for r in steps_rows)))
        back = steps_rows[::-1]
        first = dict(zip(chain.from_iterable(r[3] for r in back), chain.from_iterable(repeat(r[0], len(r[3])) for r in back)))
        for k, b in last.items():
            a = first[k]
            ab = span.get(k)
            if ab is None:
                span[k] = [a, b]
            else:
                ab[0], ab[1] = min(ab[0], a), max(ab[1], b)
        return
    counts = np.fromiter((len(r[3]) for r in steps_rows), dtype=np.int64, count=len(steps_rows))
    ids = list(chain.from_iterable(r[3] for r in steps_rows))
    if not ids:
        return
    uniq = list(dict.fromkeys(ids))  # each request once, in first-seen order
    pos = dict(zip(uniq, range(len(uniq))))
    inv = np.fromiter(map(pos.__getitem__, ids), dtype=np.int64, count=len(ids))
    st = np.repeat(np.fromiter((r[0] for r in steps_rows), dtype=np.int64, count=len(steps_rows)), counts)
    en = np.repeat(np.fromiter((r[1] for r in steps_rows), dtype=np.int64, count=len(steps_rows)), counts)
    order = np.argsort(inv, kind="stable")
    cuts = np.flatnonzero(np.r_[True, np.diff(inv[order]) != 0])
    lo = np.minimum.reduceat(st[order], cuts).tolist()
    hi = np.maximum.reduceat(en[order], cuts).tolist()
    for k, a, b in zip(uniq, lo, hi):  # per request, not per entry
        ab = span.get(k)
        if ab is None:
            span[k] = [a, b]
        else:
            ab[0], ab[1] = min(ab[0], a), max(ab[1], b)


class Meter:
    """Meters a serving process: one per process (see :func:`wattspan.defaults.get_default_meter`).

    ``sources``: power sources to sample (default: NVML if a GPU answers, RAPL
    if readable, otherwise the labelled simulated source). ``carbon``: a
    :class:`wattspan.carbon.CarbonModel` (default: from ``WATTSPAN_REGION`` /
    ``WATTSPAN_PUE``, else the world average). ``idle_w``: a fixed idle
    baseline in watts (default: estimated and tracked). ``sinks``:
    :class:`~wattspan.meter.sinks.RecordSink` s given each pass's final records
    and each device's figures (from the meter's thread; they must be quick and
    should not raise - if one does it is logged and counted); more with
    :meth:`add_sink`. ``period_s``: seconds between attribution passes while
    requests are in flight; ``idle_period_s``: between passes while none is and
    none ended (a request's begin is seen at the next ``period_s`` tick).
    With no sink, a pass counts its final requests and their energy
    (``counters``, :meth:`balance`) and builds no record. ``lag_s``: how far
    behind a sensor's newest reading each pass stops, for its readings still to
    come (default 0.3 s, or half an averaging sensor's window). ``board_lag_s``:
    the boards' electrical lag (power trails the work; s from 0 to 1, one value or
    per device), measured once on fine readings: the step models are fitted
    through it, as ``attribute(..., board_lag_s=...)`` does (the default meter
    reads ``WATTSPAN_BOARD_LAG_MS``; none given: searched where the readings are
    50 ms apart or closer).
    """

    def __init__(
        self,
        *,
        sources: Iterable[PowerSource] | None = None,
        sampler: Sampler | None = None,
        carbon: CarbonModel | None = None,
        idle_w: float | None = None,
        period_s: float = 0.5,
        lag_s: float | None = None,
        board_lag_s: float | Mapping[str, float] | None = None,
        max_delay_s: float = 5.0,
        history_s: float = 60.0,
        refit_s: float = 5.0,
        max_inflight: int = 100_000,
        max_events: int = 1_000_000,
        max_step_ids: int = 4096,
        max_steps_per_s: int = 2000,
        sinks: Iterable[RecordSink] = (),
        peers: Any = None,
        sample_interval_s: float | None = None,
        idle_period_s: float = 2.0,
        autostart: bool = True,
    ) -> None:
        # finite and bounded: inf or NaN here failed every pass (int(inf * 1e9)) or ended the meter's thread (wait(inf))
        for name, v, least in (("period_s", period_s, 0.0), ("max_delay_s", max_delay_s, 0.0), ("history_s", history_s, 0.0),
                               ("refit_s", refit_s, None), ("idle_period_s", idle_period_s, 0.0), ("lag_s", lag_s, None)):
            if v is None and name == "lag_s":
                continue
            if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)) or not (
                    0 <= v <= _MAX_SECONDS and (least is None or v > least)):
                raise ValueError(f"{name} must be a number of seconds {'> 0' if least is not None else '>= 0'} and at most "
                                 f"{_MAX_SECONDS:g}, got {v!r}")
        for name, n in (("max_inflight", max_inflight), ("max_events", max_events), ("max_step_ids", max_step_ids),
                        ("max_steps_per_s", max_steps_per_s)):
            if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {n!r}")
        from ..logs import setup_logging

        setup_logging()  # the meter's warnings must be visible in a process with no log handler
        if idle_w is not None and not (math.isfinite(idle_w) and idle_w >= 0):
            raise ValueError(f"idle_w must be a finite number of watts >= 0, got {idle_w!r}")
        # The sources are opened (NVML initialised, GPUs probed) on the meter's own
        # thread, never on the caller's: the default meter is created lazily by
        # the middleware, on the event loop.
        self.sampler = sampler
        self._own_sampler = False  # True once _setup made the sampler (then the meter sets its idle pace)
        self._sources = list(sources) if sources is not None else None
        from ..settings import MAX_SAMPLE_INTERVAL_S, MIN_SAMPLE_INTERVAL_S, get_settings

        if sample_interval_s is None:
            sample_interval_s = get_settings().sample_interval_s
        if not (math.isfinite(sample_interval_s) and MIN_SAMPLE_INTERVAL_S <= sample_interval_s <= MAX_SAMPLE_INTERVAL_S):
            raise ValueError(f"sample_interval_s must be between {MIN_SAMPLE_INTERVAL_S:g} and {MAX_SAMPLE_INTERVAL_S:g} seconds, got {sample_interval_s!r}")
        self.sample_interval_s = float(sample_interval_s)
        self._ready = threading.Event()
        self.carbon = carbon if carbon is not None else _carbon_from_env()
        self.idle_w = idle_w
        self.period_s = float(period_s)
        #: with nothing in flight and no event since the last pass, passes come this rarely (s); the device
        #: totals (``device_energy_j``, the sinks' ``on_device``, :meth:`balance`) then move at this pace
        self.idle_period_s = max(float(idle_period_s), self.period_s)
        self.lag_s = lag_s
        #: the boards' electrical lag (s; one value, or per device), measured once on fine readings: each
        #: device's step model is fitted through it (``attribute(..., board_lag_s=...)``), not searched
        self.board_lag_s = check_board_lag(board_lag_s)
        self.max_delay_s = float(max_delay_s)
        self.history_s = float(history_s)
        self.refit_s = float(refit_s)
        self.max_inflight = int(max_inflight)
        self.max_events = int(max_events)
        # ends are taken past max_events (each begun request's end must arrive, or it stayed in flight
        # for ever), up to twice it: beyond that a stalled thread's queue holds only ends of dropped begins
        self._max_queued = 2 * self.max_events
        #: requests one batch step may name, and batch steps per second (beyond: dropped, counted)
        self.max_step_ids = int(max_step_ids)
        self.max_steps_per_s = int(max_steps_per_s)
        self._step_sec, self._step_n = -1, 0
        #: ids held in the step history at most (memory bound: about 100 bytes each)
        self.max_history_ids = 2_000_000
        self._hist_ids = 0
        self._queued_step_ids = 0  # ids in steps not yet attributed (approximate: two threads update it)
        self._sinks: list[RecordSink] = []
        self._span_sinks: list[SpanSink] = []
        for sink in sinks:
            self.add_sink(sink)
        #: called with each batch step as record_step gets it (start_ns, end_ns,
        #: device, tokens), on the reporting thread: e.g. wattspan's provisional
        #: per-request estimate (wattspan.meter.provisional); must be quick
        self.step_observers: list[Callable[[int, int, str, Mapping[str, float]], None]] = []
        #: the provisional estimate, once wattspan.usage_energy() attached one
        self.provisional: Any = None  # a wattspan.meter.provisional.Provisional (typed loosely: no import cycle)
        self.device_unattributed_j: dict[str, float] = {}
        # True or a directory: join the peer group of the devices metered, once the
        # sources are open (see _join_peers); a Peers-like object is used as it is
        self._peer_conf = peers if peers not in (None, False) and not hasattr(peers, "broadcast") else None
        self.peers = peers if hasattr(peers, "broadcast") else None
        #: (peer pid, from ns, to ns, datagrams lost): stretches where a peer's messages went missing
        self.peer_gaps: deque[tuple[int, int, int, int]] = deque(maxlen=100)

        self._events: deque[tuple[Any, ...]] = deque()
        # True while the meter's thread drains the queue: an end taken off it is counted in
        # table.ended a moment later, and flush() must see it in one place or the other
        self._draining = False
        self._activity: list[Any] = []  # sources that follow the load (on_step, on_request_start/end)
        self._table = _Table()  # the requests in flight
        self._steps: list[BatchStep] = []
        # bounded history for re-estimating idle and the step model (see _refit)
        self._hist_steps: deque[BatchStep] = deque(maxlen=200_000)
        self._hist_reqs: deque[tuple[str, int, int, str]] = deque(maxlen=100_000)
        self._cursor: dict[str, int] = {}
        self._models: dict[str, StepModel] = {}
        self._peer_marks: dict[int, int] = {}  # pid -> time up to which that peer's events have arrived
        self._idle: dict[str, float] = {}
        #: batch steps (with sensor readings over them) a step-model fit needs to be used
        self.min_fit_steps = 20
        # per device: batch steps seen, steps seen at its last refit, when that was (monotonic s),
        # and the end of its min_fit_steps-th step (the first fit waits for the cut to pass it)
        self._dev_steps: dict[str, int] = {}
        self._fit_steps: dict[str, int] = {}
        self._fit_at: dict[str, float] = {}
        self._first_fit_ns: dict[str, int] = {}
        self._fit_wait: dict[str, float] = {}  # device -> seconds before its next try at a first model
        self._stop = threading.Event()
        self._idle_pass = threading.Event()
        self._thread: threading.Thread | None = None
        self.counters = {
            "requests": 0,
            "records": 0,
            "dropped_events": 0,
            "dropped_inflight": 0,
            "sink_errors": 0,
            "pass_errors": 0,
            "late_records": 0,  # made final by the clock: the sensor had stalled (a lost GPU)
            "dropped_steps": 0,  # batch steps beyond the bounds (ids per step, steps per second, token counts)
            "peer_requests": 0,
            "unattributed_j": 0.0,
            "step_model_fits": 0,  # refits whose step model was accepted (see _refit)
            "step_model_rejected": 0,  # refits on steps whose model was not (too few steps or readings, cv_r2 <= 0)
        }
        self.device_energy_j: dict[str, float] = {}
        self._final_j = 0.0  # energy of the records handed to the sinks
        self._peers_j = 0.0  # energy of peers' requests no longer in flight here
        self._balance = Balance(0.0, 0.0, 0.0, 0.0, 0.0)
        if autostart:
            self.start()

    # ------------------------------------------------------------------ sinks

    def add_sink(self, sink: RecordSink) -> None:
        """Give ``sink`` (a :class:`~wattspan.meter.sinks.RecordSink`) every final record and device figure from now on."""
        if not isinstance(sink, RecordSink):
            raise TypeError(
                f"a meter sink implements on_records(records) and on_device(figures), got {type(sink).__name__}; "
                "wrap a function in wattspan.meter.RecordCallback or BatchCallback"
            )
        self._sinks = [*self._sinks, sink]  # copy on write: the meter's thread iterates without a lock
        if isinstance(sink, SpanSink):
            self._span_sinks = [*self._span_sinks, sink]

    def remove_sink(self, sink: RecordSink) -> None:
        """Stop giving ``sink`` records (no error if it was not added)."""
        self._sinks = [s for s in self._sinks if s is not sink]
        self._span_sinks = [s for s in self._span_sinks if s is not sink]

    @property
    def sinks(self) -> tuple[RecordSink, ...]:
        """The sinks, in the order they get each pass's records."""
        return tuple(self._sinks)

    @property
    def holds_spans(self) -> bool:
        """True when a sink holds tracing spans until their record (see :meth:`expect_span`)."""
        return bool(self._span_sinks)

    def expect_span(self, span_id: int) -> None:
        """At request start: tell the span-holding sinks that span ``span_id`` will get a record."""
        for sink in self._span_sinks:
            try:
                sink.expect(span_id)
            except Exception:
                self.counters["sink_errors"] += 1
                log.exception("a span sink failed to mark a span")

    def _to_sinks(self, records: Sequence[RequestRecord]) -> None:
        for sink in self._sinks:
            try:
                sink.on_records(records)
            except Exception:
                self.counters["sink_errors"] += 1
                log.exception("a record sink failed")

    # ------------------------------------------------------------------ hot path

    def begin(self, request_id: str, device: str, t_ns: int) -> None:
        """A request started on ``device`` at ``t_ns`` (monotonic). ``device``: a name
        (``"gpu0"``) or a device group (``"gpu0,gpu1"`` or a list, see wattspan.attribution.groups)."""
        if type(device) is not str or "," in device or "+" in device or " " in device:
            device = _device_key(device)  # a group's members once each (a repeat would be a row twice in a pass)
        ev = self._events
        if len(ev) >= self.max_events:
            self.counters["dropped_events"] += 1
            return
        ev.append((_BEGIN, request_id, device, t_ns))
        if self._activity:
            try:
                for s in self._activity:
                    for d in (device.split(",") if "," in device else (device,)):  # a group: active on each member
                        s.on_request_start(d)
            except Exception:  # a source's hook never reaches the server's request
                self._hook_failed()

    def end(self, request_id: str, device: str, t_ns: int, meta: RequestLabels | Mapping[str, Any] | None = None) -> None:
        """The request ended (last body chunk, error or disconnect). ``meta``: its
        :class:`~wattspan.records.RequestLabels` (or a dict with those field names:
        route, http_method, status_code, model, tenant, prompt_tokens,
        output_tokens, trace_id, span_id), read on the meter's thread."""
        ev = self._events
        if len(ev) >= self._max_queued:  # the meter's thread stalled: bounded all the same (see begin)
            self.counters["dropped_events"] += 1
            return
        ev.append((_END, request_id, t_ns, meta))
        if self._activity:
            self._ended_on(device)

    def end_fields(self, request_id: str, device: str, t_ns: int, route: str, http_method: str, status_code: int, model: str,
                   tenant: str, prompt_tokens: int, output_tokens: int, trace_id: int, span_id: int) -> None:
        """:meth:`end` with the :class:`~wattspan.records.RequestLabels` fields given one by one, in
        their order: the middleware's hand-off. One flat tuple of plain values goes to the meter's
        thread (which builds the labels only if a sink takes records): the event loop allocates one
        object per request end, and the cyclic GC stops tracking it at its first look."""
        ev = self._events
        if len(ev) >= self._max_queued:  # the meter's thread stalled: bounded all the same (see begin)
            self.counters["dropped_events"] += 1
            return
        ev.append((_END_FIELDS, request_id, t_ns, route, http_method, status_code, model, tenant, prompt_tokens,
                   output_tokens, trace_id, span_id))
        if self._activity:
            self._ended_on(device)

    def _ended_on(self, device: str) -> None:
        """Tell the sources that follow the load (the simulator) that a request ended on ``device``
        (each member of a group); a hook that raises never reaches the server's request."""
        try:
            if not isinstance(device, str) or "+" in device or " " in device:
                device = _device_key(device)
            for s in self._activity:
                for d in (device.split(",") if "," in device else (device,)):
                    s.on_request_end(d)
        except Exception:
            self._hook_failed()

    def record_step(self, start_ns: int, end_ns: int, device: str, tokens: Mapping[str, float]) -> None:
        """A batch step ran on ``device`` over ``[start_ns, end_ns)`` processing
        ``tokens[request_id]`` tokens for each request in it.

        Bounded where steps enter: at most ``max_step_ids`` requests per step and
        ``max_steps_per_s`` steps per second (of step time); token counts must be
        finite numbers in ``0..MAX_TOKENS``. A step beyond a bound is dropped and
        counted in ``counters["dropped_steps"]`` (logged once), as is one whose times are
        not integers of nanoseconds. ``device`` may be a
        device group (``"gpu0,gpu1"`` or a list): the step ran on each member."""
        if type(start_ns) is not int or type(end_ns) is not int or not (_NS_MIN <= start_ns and end_ns <= _NS_MAX):
            a, b = _as_ns(start_ns), _as_ns(end_ns)
            if a is None or b is None:
                self._drop_step(f"its times ({start_ns!r}, {end_ns!r}) are not integers of ns (time.monotonic_ns())")
                return
            start_ns, end_ns = a, b
        if end_ns > time.monotonic_ns() + _AHEAD_NS:  # would wait for the sensor for ever
            self._drop_step(f"it ends more than a day ahead of time.monotonic_ns() ({end_ns} ns: another clock?)")
            return
        if not isinstance(tokens, Mapping):  # a generator, a list of pairs: taken if it makes a mapping, else dropped
            try:
                tokens = dict(tokens)
            except (TypeError, ValueError):
                self._drop_step(f"its tokens are a {type(tokens).__name__}, not a mapping {{request id: tokens}}")
                return
        if not tokens:
            return  # a step that served no request: nothing to split
        if end_ns <= start_ns:
            self._drop_step(f"it does not end after it starts ({start_ns} .. {end_ns} ns)")
            return
        if not isinstance(device, str) or "+" in device or " " in device:
            device = _device_key(device)
        if len(self._events) >= self.max_events:
            self.counters["dropped_events"] += 1
            return
        if len(tokens) > self.max_step_ids:
            self._drop_step(f"{len(tokens)} requests in one step (at most {self.max_step_ids})")
            return
        sec = end_ns // 1_000_000_000
        if sec != self._step_sec:
            self._step_sec, self._step_n = sec, 0
        self._step_n += 1
        if self._step_n > self.max_steps_per_s:
            self._drop_step(f"more than {self.max_steps_per_s} steps in one second")
            return
        if self._queued_step_ids > self.max_history_ids:
            self._drop_step(f"more than {self.max_history_ids} request ids in steps waiting for attribution")
            return
        try:
            tokens = dict(tokens)
            if not all(0 <= v <= MAX_TOKENS for v in tokens.values()):  # NaN fails too
                raise ValueError
            try:
                "".join(tokens)  # every key a string (in C: a TypeError names the first that is not)
            except TypeError:
                tokens = {k if type(k) is str else _as_id(k): v for k, v in tokens.items()}  # ids as the drain takes them
        except (TypeError, ValueError):
            self._drop_step(f"token counts must be numbers in 0..{MAX_TOKENS}")
            return
        self._queued_step_ids += len(tokens)
        self._events.append((_STEP, start_ns, end_ns, device, tokens))
        for obs in self.step_observers:
            try:
                obs(start_ns, end_ns, device, tokens)
            except Exception:
                self.counters["sink_errors"] += 1
        if self._activity:
            try:
                n = sum(tokens.values())
                prefill = sum(v for v in tokens.values() if v > 1)
                for s in self._activity:
                    for d in (device.split(",") if "," in device else (device,)):
                        s.on_step(d, start_ns, end_ns, int(n), int(prefill))
            except Exception:
                self._hook_failed()

    def _hook_failed(self) -> None:
        """A source's load hook (on_request_start/end, on_step) raised: counted in
        ``counters["source_hook_errors"]``, logged at the first and every 1000th, never raised to the caller."""
        if (n := self._tally("source_hook_errors", every=1000)):
            log.exception("wattspan: a power source's load hook failed (%d times; counters source_hook_errors)", n)

    def _tally(self, key: str, every: int = 100) -> int:
        """One more ``key`` in ``counters``: its new count when it is to be logged (the first and every
        ``every``-th, so a fault that repeats does not flood the log), else 0."""
        n = self.counters[key] = int(self.counters.get(key, 0)) + 1
        return n if n == 1 or n % every == 0 else 0

    def _drop_step(self, why: str) -> None:
        self.counters["dropped_steps"] += 1
        if self.counters["dropped_steps"] in (1, 100, 10_000):
            log.warning("wattspan: batch step dropped: %s (%d dropped so far)", why, self.counters["dropped_steps"])

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        if self._thread is not None:
            return
        self._thread = threading.Thread(target=self._run, name="wattspan-meter", daemon=True)
        self._thread.start()

    def _setup(self) -> None:
        from ..sampler import Sampler
        from .discovery import default_sources

        try:
            if self.sampler is None:
                self._own_sampler = True
                self.sampler = Sampler(self._sources if self._sources is not None else default_sources(), interval_s=self.sample_interval_s)
            self._activity = [s for s in self.sampler.sources if hasattr(s, "on_step")]
            self.sampler.start()
            if self._peer_conf is not None:
                self._join_peers()
        finally:
            self._ready.set()

    def _join_peers(self) -> None:
        """Share with the meters of the same physical devices (see :mod:`wattspan.meter.peers`)."""
        from .peers import Peers, group_key
        from ..settings import get_settings

        infos = self._live().devices()
        main = [i for i in infos if i.kind == "gpu"] or infos
        ids = [i.extra.get("identity") or f"{i.sensor}:{i.id}" for i in main]
        conf = self._peer_conf
        try:
            group = get_settings().peer_group
        except ValueError:
            group = None
        try:
            self.peers = Peers(None if conf is True else conf, key=group_key(ids, group))
        except OSError as exc:  # PermissionError: a directory another user can reach
            self.counters["peers_refused"] = 1
            log.error("wattspan: not sharing the device with other worker processes: %s. Each worker now counts "
                      "the whole device's energy; fix the directory or set WATTSPAN_PEERS=0", exc)

    def wait_ready(self, timeout: float = 30.0) -> bool:
        """Wait until the power sources are open and sampling."""
        return self._ready.wait(timeout)

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until every request that has ended has its final record (or ``timeout`` s)."""
        deadline = time.monotonic() + timeout
        self._ready.wait(timeout)
        while time.monotonic() < deadline:
            self._idle_pass.clear()
            # in this order: an end is in the queue, or being drained, or counted in ended (see _drain)
            if not self._events and not self._draining and not self._table.ended:
                return True
            self._idle_pass.wait(self.period_s * 2)
        return False

    def drain(self, timeout: float = 10.0) -> dict[str, int]:
        """Make every ended request's record final and hand it to the sinks, then flush
        the sinks that buffer (:class:`~wattspan.meter.sinks.FlushableSink`: the
        ledger, the span processor), all within ``timeout`` s.

        Called at server shutdown (the middleware does it on the ASGI lifespan's
        shutdown). What could not be finished in time is counted
        (``counters["shutdown_unfinished"]``) and logged, never silently lost.
        Returns ``{"unfinished": n, "sinks_unflushed": m}``: ``n`` ended requests of this process
        whose record was not made, ``m`` sinks that had not written everything.
        """
        deadline = time.monotonic() + timeout
        self.flush(timeout)
        unfinished = self._unfinished()
        unflushed = 0
        for sink in self._sinks:
            if isinstance(sink, FlushableSink):
                try:
                    if sink.flush(max(0.1, deadline - time.monotonic())) is False:
                        unflushed += 1
                except Exception:
                    unflushed += 1
                    log.exception("a sink failed to flush at shutdown")
        if unfinished:
            self.counters["shutdown_unfinished"] = self.counters.get("shutdown_unfinished", 0) + unfinished
            log.error("wattspan: at shutdown %d ended requests were not final within %.1f s; their records are lost "
                      "(the power sensor or a peer did not answer)", unfinished, timeout)
        if unflushed:
            log.error("wattspan: at shutdown %d sinks had not written everything within %.1f s (see their own counts)", unflushed, timeout)
        return {"unfinished": unfinished, "sinks_unflushed": unflushed}

    def _unfinished(self) -> int:
        """Requests of this process that have ended and have no record yet: those the table holds
        ended, and those whose end is still queued (each once; a queued begin or step, or the end of a
        request never begun, is none). Any thread: the queue is copied first (the meter's may pop)."""
        table = self._table
        queued: tuple[tuple[Any, ...], ...] = ()
        for _ in range(10):
            try:
                queued = tuple(self._events)
                break
            except RuntimeError:  # "deque mutated during iteration": the meter's thread popped meanwhile
                continue
        begun = {e[1] for e in queued if e[0] == _BEGIN}
        row_of, end_of, peer_of = table.row.get, table.end, table.peer
        ended: set[Any] = set()
        for e in queued:
            if e[0] == _END or e[0] == _END_FIELDS:
                rid = e[1]
                r = row_of(rid)
                if rid in begun or (r is not None and end_of[r] is None and not peer_of[r]):
                    ended.add(rid)
        return table.ended + len(ended)

    def close(self, timeout: float = 10.0) -> None:
        """Finalise what can be, stop the thread and the sampler."""
        self.flush(timeout)
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
        if self.sampler is not None:
            self.sampler.close()
        if self.peers is not None:
            self.peers.close()

    def balance(self) -> Balance:
        """Where the measured energy went (a :class:`Balance`), as of the last pass.

        One consistent view, published by the meter's thread at the end of each pass:
        reading ``device_energy_j`` and ``counters`` one after the other can straddle a pass.
        """
        return self._balance

    def _publish_balance(self) -> None:
        pending = peers = 0.0
        t = self._table
        if t.row:
            rows = np.fromiter(t.row.values(), dtype=np.intp, count=len(t.row))
            e = t.dyn[rows] + t.idle[rows]
            if t.peers:
                mask = np.array([t.peer[r] != 0 for r in rows.tolist()], dtype=bool)
                peers = float(e[mask].sum())
                pending = float(e[~mask].sum())
            else:
                pending = float(e.sum())
        self._balance = Balance(sum(self.device_energy_j.values()), self._final_j, pending, self._peers_j + peers,
                                self.counters["unattributed_j"])

    def stats(self) -> dict[str, Any]:
        return dict(self.counters, inflight=len(self._table), queued_events=len(self._events), sampler=self.sampler.health() if self.sampler is not None else None,
                    peers=self.peers.stats() if self.peers is not None and hasattr(self.peers, "stats") else None)

    # ------------------------------------------------------------------ the pass

    def _run(self) -> None:
        try:
            self._setup()
        except Exception:
            log.exception("could not open the power sources; requests are not metered")
            # nothing will take the events: from now on they are dropped (counted), never queued for a thread gone
            self.max_events = self._max_queued = 0
            ev = self._events
            n = 0
            while ev:
                ev.popleft()
                n += 1
            self.counters["dropped_events"] += n
            return
        last = time.monotonic()
        # the sampler this meter made (not one handed in, maybe shared) polls rarely while the meter idles
        pace = getattr(self.sampler, "set_idle", None) if self._own_sampler else None
        idle = False
        failed = 0  # passes failed in a row
        while not self._stop.wait(self.period_s):
            # idle: nothing queued or in flight here, nor in the other workers sharing the device (their events are
            # taken and our watermark sent on every tick all the same); passes then come every idle_period_s
            if not self._events and not self._table.row and not self._steps and self._peers_quiet():
                if not idle and pace is not None:
                    idle = True
                    pace(True)
                if time.monotonic() - last < self.idle_period_s:
                    self._idle_pass.set()  # nothing in flight, nothing arrived: the pass can wait (a begin is seen next tick)
                    continue
            elif idle and pace is not None:
                idle = False
                pace(False)  # a request: fresh readings from now (the sampler polls at once)
            last = time.monotonic()
            try:
                self._pass()
                failed = 0
            except Exception:  # never let the meter thread die
                self.counters["pass_errors"] += 1
                failed += 1
                if failed == 1 or failed % 100 == 0:  # a streak of failures is logged at its start, then rarely
                    log.exception("attribution pass failed; records will be retried")
                if failed % _PASS_RETRIES == 0:
                    self._settle_on_errors()
            self._publish_balance()
            self._idle_pass.set()

    def _settle_on_errors(self) -> None:
        """After ``_PASS_RETRIES`` failed passes in a row: the requests that have ended are made
        final with the energy attributed to them so far (counted in ``counters["settled_on_errors"]``), and where
        even that fails they are dropped (``counters["dropped_on_errors"]``), each logged: one request
        or reading the pass cannot handle must not hold every other record back for ever."""
        table = self._table
        done = [r for r in table.row.values() if table.end[r] is not None and not table.peer[r]]
        if not done:
            return
        counters = self.counters
        before = counters["records"]
        try:
            self._finalise([r for r in done if "," not in table.device[r]], max(table.end[r] or 0 for r in done), None)
        except Exception:
            log.exception("wattspan: settling requests after failed passes failed too")
        settled = counters["records"] - before
        left = [r for r in done if table.rid[r] is not None]
        counters["settled_on_errors"] = counters.get("settled_on_errors", 0) + settled
        if left:
            self._unbook(left)
            table.remove(left)
            counters["dropped_on_errors"] = counters.get("dropped_on_errors", 0) + len(left)
        log.error("wattspan: %d attribution passes failed in a row; %d ended requests made final with the energy so far, "
                  "%d dropped (counters settled_on_errors, dropped_on_errors)", _PASS_RETRIES, settled, len(left))

    def _peers_quiet(self) -> bool:
        """No peer has anything in flight on the device: true without peers; with them, after taking
        their events and sending our watermark (what a pass's drain does), no peer request is in flight."""
        if self.peers is None:
            return True
        try:
            self._drain()
        except Exception:
            self.counters["pass_errors"] += 1
            log.exception("taking the peers' events failed")
            return False
        return not self._table.row and not self._steps and not self._events

    def _drain(self) -> None:
        peers = self.peers
        out: list[Any] | None = [] if peers is not None else None
        self._draining = True  # before the first pop, cleared once the last end taken is counted (flush() reads it)
        try:
            self._take_events(out)
        finally:
            self._draining = False
        if peers is not None and out is not None:
            # a watermark: every event of ours up to this time is in this message
            out.append((_MARK, time.monotonic_ns()))
            peers.broadcast(out)
            self._take_peer_events()

    def _take_events(self, out: list[Any] | None) -> None:
        """The queued events into the table and the steps (and ``out``, for the peers)."""
        ev = self._events
        table = self._table
        row = table.row
        row_of, free = row.get, table.free
        rid_of, dev_of, start_of, end_of, meta, method_of, quality_of, peer_of = (
            table.rid, table.device, table.start, table.end, table.meta, table.method, table.quality, table.peer)
        popleft = ev.popleft
        begun = 0
        # a time's check, on locals (a look-up per event less): an int in int64's range, not a day ahead of now
        lo, hi, int_ = _NS_MIN, min(_NS_MAX, time.monotonic_ns() + _AHEAD_NS), int
        for _ in range(len(ev)):  # what is there now; later events wait for the next pass (only this thread pops)
            e = popleft()
            kind = e[0]
            if kind == _END_FIELDS or kind == _END:
                rid = e[1]
                if type(rid) is not str:
                    rid = _as_id(rid)
                r = row_of(rid)
                t = e[2]
                if type(t) is not int_ or not lo <= t <= hi:
                    t = self._event_time(t, rid, hi)
                if r is not None:  # table.set_end, inline
                    if end_of[r] is None and not peer_of[r]:
                        table.ended += 1
                    s = start_of[r]
                    end_of[r] = t if t > s else s
                    meta[r] = e if kind == _END_FIELDS else e[3]  # the flat event itself: labels built in _finalise
                if out is not None:
                    out.append((_END, rid, t))
                continue
            if kind == _BEGIN:
                if len(table.row) >= self.max_inflight:
                    if (n := self._tally("dropped_inflight", every=1000)):  # an overload: no flood of log lines
                        log.warning("more than %d requests in flight; request %s not metered (%d so far; counters "
                                    "dropped_inflight)", self.max_inflight, e[1], n)
                    continue
                rid = e[1]
                t = e[3]
                if type(rid) is not str or type(t) is not int_ or not lo <= t <= hi:
                    if type(rid) is not str:  # an id of another type (an int, a list): its text, one key for begin and end
                        rid = _as_id(rid)
                    if type(t) is not int_ or not lo <= t <= hi:
                        t = self._event_time(t, rid, hi)
                    e = (_BEGIN, rid, e[2], t)
                if free and rid not in row:  # table.add, inline (a free row's meta and parts are None already)
                    r = free.pop()
                    row[rid] = r
                    rid_of[r] = rid
                    dev_of[r] = e[2]
                    start_of[r] = t
                    end_of[r] = None
                    method_of[r] = quality_of[r] = ""
                    peer_of[r] = 0
                else:
                    if rid in row:
                        self._begin_again(row[rid])
                    table.add(rid, e[2], t)
                begun += 1
            else:
                st = BatchStep(e[1], e[2], e[3], e[4])
                self._steps.append(st)
                self._hist_add(st)
            if out is not None:
                out.append(e)
        self.counters["requests"] += begun

    def _begin_again(self, r: int) -> None:
        """A begin under the id of row ``r``'s request, not final yet. Ended (the caller reuses its ids): the
        row is kept under a key of its own and gets its record. In flight: it is replaced (counted in
        ``counters["replaced_requests"]``, logged at the first and every 100th), its energy so far
        unattributed, so the books still close."""
        table = self._table
        if table.end[r] is not None and not table.peer[r]:
            table.rename(r)
            return
        if table.peer[r]:
            self._peers_j += table.energy(r)
        else:
            self._unbook([r])
            if (n := self._tally("replaced_requests")):
                log.warning("wattspan: request id %r was begun again while in flight; the earlier request under it has "
                            "no record (%d such; counters replaced_requests): give each request its own id",
                            table.alias.get(table.rid[r] or "", table.rid[r]), n)
        table.remove((r,))

    def _unbook(self, rows: Sequence[int]) -> None:
        """Rows of this process forgotten without a record: their energy so far becomes unattributed."""
        table = self._table
        for r in rows:
            e = table.energy(r)
            if not e:
                continue
            self.counters["unattributed_j"] += e
            parts = table.parts[r] if "," in table.device[r] else {table.device[r]: e}
            for d, j in (parts or {}).items():
                self.device_unattributed_j[d] = self.device_unattributed_j.get(d, 0.0) + j

    def _event_time(self, t: Any, rid: Any, hi: int) -> int:
        """A request's begin or end time as an int: a number converted; what is not a time on the
        monotonic clock (NaN, inf, 2**70, a string, or more than a day ahead of it: ``time.time_ns()``)
        is replaced by the meter's clock now (counted in ``counters["bad_times"]``, logged at the first
        and every 100th), so the request still gets its record."""
        v = _as_ns(t)
        if v is not None and v <= hi:
            return v
        if (n := self._tally("bad_times")):
            log.warning("wattspan: request %r was given the time %r, not an integer of ns on time.monotonic_ns()'s clock; "
                        "the meter's clock is used instead (%d such times; counters bad_times)", rid, t, n)
        return time.monotonic_ns()

    def _take_peer_events(self) -> None:
        """What the other worker processes on this host serve (see :mod:`wattspan.meter.peers`)."""
        table = self._table
        peers = self.peers
        if peers is None:
            return
        for pid, events, lost in peers.receive():
            if lost:
                self._peer_lost(pid, lost)
            for e in events:
                try:
                    kind = e[0]
                    if kind == _BEGIN:
                        if len(table.row) < self.max_inflight:
                            rid = str(e[1])
                            if rid in table.row:
                                self._begin_again(table.row[rid])
                            table.add(rid, str(e[2]), _peer_ns(e[3]), peer=pid or -1)
                            self.counters["peer_requests"] += 1
                    elif kind == _END:
                        r = table.row.get(str(e[1]))
                        if r is not None and table.peer[r]:
                            table.set_end(r, _peer_ns(e[2]))
                    elif kind == _MARK:
                        self._peer_marks[pid] = _peer_ns(e[1])
                    elif kind == _STEP:
                        if len(e[4]) > self.max_step_ids:
                            self._drop_step(f"a peer's step names {len(e[4])} requests")
                            continue
                        st = BatchStep(_peer_ns(e[1]), _peer_ns(e[2]), str(e[3]), {str(k): float(v) for k, v in e[4].items()})
                        if st[1] <= st[0] or not all(0 <= v <= MAX_TOKENS for v in st[3].values()):
                            raise ValueError
                        self._steps.append(st)
                        self._hist_add(st)
                except (IndexError, TypeError, ValueError, AttributeError):
                    self.counters["pass_errors"] += 1
        gone = peers.take_gone()
        for pid in gone:
            self._peer_marks.pop(pid, None)
        if gone:  # a dead worker's requests no longer share the device
            for rid in [rid for rid, r in table.row.items() if table.peer[r] in gone]:
                self._forget_peer(rid)

    def _hist_add(self, step: BatchStep) -> None:
        """Keep ``step`` for re-estimation, within the history's id budget."""
        h = self._hist_steps
        if len(h) == h.maxlen:
            self._hist_ids -= len(h[0][3])
        h.append(step)
        self._hist_ids += len(step[3])
        d = step[2]
        for m in d.split(",") if "," in d else (d,):  # a group's step ran on each member
            n = self._dev_steps.get(m, 0) + 1
            self._dev_steps[m] = n
            if n == self.min_fit_steps:
                self._first_fit_ns[m] = step[1]
        while self._hist_ids > self.max_history_ids and h:
            self._hist_ids -= len(h.popleft()[3])

    def _peer_lost(self, pid: int, lost: int) -> None:
        """Messages of peer ``pid`` went missing: an END among them would leave a
        phantom request in flight for ever. Forget what that peer had in flight
        (its requests no longer share the device) and flag the stretch."""
        table = self._table
        gone = [rid for rid, r in table.row.items() if table.peer[r] == pid]
        for rid in gone:
            self._forget_peer(rid)
        now = time.monotonic_ns()
        self.counters["peer_gaps"] = self.counters.get("peer_gaps", 0) + 1
        self.counters["peer_messages_lost"] = self.counters.get("peer_messages_lost", 0) + lost
        self.peer_gaps.append((pid, self._peer_marks.get(pid, now), now, lost))
        if self.counters["peer_gaps"] in (1, 10, 100) or self.counters["peer_gaps"] % 1000 == 0:
            log.warning("wattspan: %d messages from worker %d were lost (its socket buffer was full); its %d requests in "
                        "flight are no longer shared with (the records overlapping this stretch may be over-billed); "
                        "%d such gaps so far", lost, pid, len(gone), self.counters["peer_gaps"])

    def _forget_peer(self, rid: str) -> None:
        table = self._table
        r = table.row[rid]
        self._peers_j += table.energy(r)
        table.remove((r,))

    def _peer_watermark(self, now: int) -> int:
        """The time up to which every live peer's events have arrived. A peer
        silent for ``max_delay_s`` (hung, or gone) no longer holds the cut back."""
        floor = now - int(self.max_delay_s * 1e9)
        marks = [t for t in self._peer_marks.values() if t > floor]
        return min(marks) if marks else now - int(2 * self.period_s * 1e9)

    def _live(self) -> Sampler:
        """The sampler, on the meter's thread once :meth:`_setup` has made or started it."""
        sampler = self.sampler
        assert sampler is not None, "the meter's sampler is set up before its first pass"
        return sampler

    def _lag_ns(self, info: DeviceInfo | None) -> int:
        if self.lag_s is not None:
            return int(self.lag_s * 1e9)
        lag = 0.3
        if info is not None and info.power_kind == SampleKind.AVERAGE:
            lag = max(lag, info.window_ns / 1e9 * 0.5)
        return int(lag * 1e9)

    def _pass(self) -> None:
        self._drain()
        now = time.monotonic_ns()
        sampler = self._live()
        infos = {d.id: d for d in sampler.devices()}
        by_dev: dict[str, list[int]] = {}  # device -> the rows of the requests in flight on it
        table = self._table
        rows_all = list(table.row.values())
        dev_of = table.device
        devices = set(map(dev_of.__getitem__, rows_all))
        if len(devices) == 1 and "," not in next(iter(devices)):  # one device (a server's usual case): no loop
            by_dev[devices.pop()] = rows_all
        else:
            for r in rows_all:
                d = dev_of[r]
                if "," in d:  # a device group: in flight on each member (see wattspan.attribution.groups)
                    for m in d.split(","):
                        by_dev.setdefault(m, []).append(r)
                else:
                    by_dev.setdefault(d, []).append(r)
        self._metered = infos
        gpu_devs = [d for d, i in infos.items() if i.kind == "gpu"]
        host_devs = [d for d, i in infos.items() if i.kind != "gpu"]
        one_device = len(by_dev) == 1
        live_rows = rows_all if host_devs and not one_device else []  # the host's split: every request in flight

        if infos:  # requests on a device no source meters: settled at once with no energy, not held back
            for dev in [d for d in by_dev if d not in infos]:
                # a group's member no source meters adds nothing; its metered members settle it (a group
                # with none metered: settled here, on its first member's turn, or it were in flight for ever)
                self._unmetered(dev, [r for r in by_dev.pop(dev) if "," not in (d := dev_of[r])
                                      or (d.startswith(dev + ",") and not any(m in infos for m in d.split(",")))], infos)
        for dev in gpu_devs + [d for d in by_dev if d not in infos]:
            info = infos.get(dev)
            latest = sampler.latest_ns(dev) if info is not None else None
            cut_sensor = (latest - self._lag_ns(info)) if latest is not None else None
            cut_clock = now - int(self.max_delay_s * 1e9)
            cut = max(cut_sensor or cut_clock, cut_clock)
            stalled = cut_sensor is None or cut_clock > cut_sensor
            if self.peers is not None:  # wait for what the peers served up to the cut
                cut = min(cut, self._peer_watermark(now))
            cur = self._cursor.get(dev)
            rows = by_dev.get(dev, [])
            start_of, rid_of = table.start, table.rid
            if cur is None:
                starts = [start_of[r] for r in rows]
                cur = min(starts) if starts else (latest or now)
                self._cursor[dev] = cur
            if cut <= cur:
                continue
            # (a group's row another member's turn made final this pass is free now: not in it)
            rows = [r for r in rows if start_of[r] < cut and rid_of[r] is not None]
            if info is not None:
                if self._refit_due(dev, cut, bool(rows)):
                    try:
                        self._refit(dev, cut)
                    except Exception:  # the model is an improvement: without a new one, the device keeps what it had
                        if (n := self._tally("refit_errors")):
                            log.exception("wattspan: re-estimating %s's idle baseline and step model failed (%d times; "
                                          "counters refit_errors); it keeps the ones it had", dev, n)
                # with nothing in flight too: the measured energy is then all unattributed,
                # and the device's totals reach the device sinks on every pass
                self._attribute(dev, info, cur, cut, rows)
                # the stretch is attributed: from here on nothing may have a retried pass attribute it again
                self._cursor[dev] = cut
                if host_devs and rows:
                    # The host is one meter shared by every device's requests: its energy over this
                    # stretch is split among all requests in flight on any device, and each request
                    # takes its part on one device's turn only (a group's, its first member's).
                    # Before: split among this device's requests alone, on every device's turn, so
                    # with requests on two GPUs the host's joules were counted twice.
                    if one_device:
                        everyone, mine = rows, rows
                    else:
                        everyone = [r for r in live_rows if start_of[r] < cut]
                        mine = [r for r in rows if "," not in (d := dev_of[r])
                                or next((m for m in d.split(",") if m in infos), None) == dev]  # a group: its first metered member
                    for host in host_devs if mine else ():
                        try:
                            self._attribute_host(host, cur, cut, everyone, mine)
                        except Exception:  # the device's share stands: its records are made, without this host part
                            if (n := self._tally("host_errors")):
                                log.exception("wattspan: the host's energy over a pass could not be split (%d such "
                                              "passes; counters host_errors); those requests' host_j leave it out", n)
            self._cursor[dev] = cut
            self._finalise(rows, cut, info, stalled)
        # drop steps wholly before every cursor
        if self._steps and self._cursor:
            low = min(self._cursor.values())
            self._steps = [s for s in self._steps if s[1] > low]
        self._queued_step_ids = sum(len(s[3]) for s in self._steps)

    def _unmetered(self, dev: str, rows: list[int], infos: dict[str, DeviceInfo]) -> None:
        """Requests on ``dev``, which none of the sources meters (a wrong ``WATTSPAN_DEVICE``):
        each ended one gets its record now (no energy, sensor ``none``, coverage 0), counted
        in ``counters["unmetered_device"]``; one log line per such device."""
        table = self._table
        end_of = table.end
        done = [r for r in rows if end_of[r] is not None]
        if not done:
            return
        warned = self.__dict__.setdefault("_unmetered_warned", set())
        if dev not in warned and len(warned) < 100:
            warned.add(dev)
            log.error("wattspan: requests run on device %r, which no power source meters (metered: %s); their records "
                      "carry no energy. Set the middleware's device (or WATTSPAN_DEVICE) to one of those.", dev, ", ".join(sorted(infos)))
        self.counters["unmetered_device"] = self.counters.get("unmetered_device", 0) + sum(1 for r in done if not table.peer[r])
        self._finalise(done, max(end_of[r] or 0 for r in done), None)

    def _period_inputs(self, dev: str, rows: list[int], cut: int) -> tuple[Requests, Steps | None, np.ndarray, Steps | None]:
        """The requests (clipped to ``cut``) of these rows and the batch steps of one pass, columnar;
        the requests' ends (``cut`` for those in flight), unclipped; and the steps other devices ran
        for them (a pipeline's other stages: they own this device's waits)."""
        table = self._table
        n = len(rows)
        end = (np.array([cut if e is None else e for e in map(table.end.__getitem__, rows)], dtype=np.int64) if n
               else np.zeros(0, np.int64))
        req = Requests(
            ids=np.array(list(map(table.rid.__getitem__, rows)), dtype=object),
            start_ns=np.fromiter(map(table.start.__getitem__, rows), dtype=np.int64, count=n),
            end_ns=np.minimum(end, cut),
            device=np.full(n, dev, dtype=object),
            weight=np.ones(n),
        )
        steps = Steps.from_batches(self._steps, req, dev) if self._steps else None
        # only a group's requests have steps elsewhere (a single device's requests: skip the scan)
        grouped = steps is not None and any("," in d for d in map(table.device.__getitem__, rows))
        owners = Steps.from_batches(self._steps, req, dev, elsewhere=True) if grouped else None
        return req, steps, end, owners

    def _attribute(self, dev: str, info: DeviceInfo, cur: int, cut: int, rows: list[int]) -> None:
        trace = self._live().trace(dev, since_ns=cur - 2_000_000_000)
        if len(trace) < 2:
            return
        req, steps, end, owners = self._period_inputs(dev, rows, cut)
        idle = self.idle_w if self.idle_w is not None else self._idle.get(dev)
        models = {dev: self._models[dev]} if dev in self._models else None
        try:
            res = attribute({dev: trace}, req, steps, idle_w=idle, t0_ns=cur, t1_ns=cut, models=models,
                             board_lag_s=self.board_lag_s, wait_owners=owners)
        except TraceError as exc:  # readings it cannot use (none finite, a counter going back): like no trace
            if (n := self._tally("bad_traces")):
                log.warning("wattspan: %s's readings over a pass could not be attributed (%d such passes; counters "
                            "bad_traces); that stretch is not measured and its requests' coverage says so: %s", dev, n, exc)
            return
        d = res.devices.get(dev)
        if d is None:
            return
        self.counters["unattributed_j"] += d.unattributed_j
        self.device_energy_j[dev] = self.device_energy_j.get(dev, 0.0) + d.measured_j
        self.device_unattributed_j[dev] = self.device_unattributed_j.get(dev, 0.0) + d.unattributed_j
        if self._sinks:
            p = trace.power_w
            power = float(p[np.isfinite(p)][-1]) if p is not None and np.isfinite(p).any() else None
            fig = DeviceFigures(dev, info.kind, self.device_energy_j[dev], power, self.device_unattributed_j[dev])
            for sink in self._sinks:
                try:
                    sink.on_device(fig)
                except Exception:
                    self.counters["sink_errors"] += 1
                    log.exception("a device sink failed")
        lo, hi = d.t0_ns, d.t1_ns
        if not rows:
            return
        table = self._table
        idx = np.asarray(rows, dtype=np.intp)  # each row once: the sums add column-wise
        if res.energy_j_low is not None and res.energy_j_high is not None:
            table.band[idx] += (res.energy_j_high - res.energy_j_low) / 2  # a request's periods share one model: errors add
        table.dyn[idx] += res.dynamic_j
        table.idle[idx] += res.idle_j
        table.dev_s[idx] += res.device_s
        # the stretch of each request the trace covered in this pass (a group's request: its share on this member)
        covered = np.maximum(np.minimum(end, hi) - np.maximum(req.start_ns, lo), 0)
        dev_of = table.device
        groups = [i for i, r in enumerate(rows) if dev_of[r] != dev]  # device groups: each member's part kept
        if groups:
            members = np.ones(len(rows), dtype=np.int64)
            dyn_l, idle_l = res.dynamic_j.tolist(), res.idle_j.tolist()
            parts_of = table.parts
            for i in groups:
                r = rows[i]
                parts = parts_of[r]
                if parts is None:
                    parts = parts_of[r] = {}
                parts[dev] = parts.get(dev, 0.0) + dyn_l[i] + idle_l[i]  # hw.id per device
                members[i] = dev_of[r].count(",") + 1
            covered = covered // members
        table.cov[idx] += covered
        method_of = table.method
        for r, meth in zip(rows, res.method.tolist()):
            if method_of[r] != "batch-fit":  # a request any of whose steps were fitted is batch-fit
                method_of[r] = meth
        if res.quality is not None:
            quality_of = table.quality
            for r, q in zip(rows, res.quality.tolist()):
                if q and (quality_of[r] == "" or _QUALITY_RANK.get(q, 0) > _QUALITY_RANK.get(quality_of[r], 0)):
                    quality_of[r] = q  # the worst quality of its periods

    def _attribute_host(self, host: str, cur: int, cut: int, everyone: list[int], mine: list[int]) -> None:
        """The host's energy over ``[cur, cut)`` split among ``everyone`` in flight; the parts of
        ``mine`` (a subset) added to their rows."""
        trace = self._live().trace(host, since_ns=cur - 2_000_000_000)
        if len(trace) < 2:
            return
        table, n = self._table, len(everyone)
        # ids by position: a row another device's turn made final this pass (free now, no id) was in
        # flight over this stretch all the same, and keeps its place in the split
        req = Requests(
            ids=np.arange(n).astype(object),
            start_ns=np.fromiter(map(table.start.__getitem__, everyone), dtype=np.int64, count=n),
            end_ns=np.fromiter((cut if e is None else min(e, cut) for e in map(table.end.__getitem__, everyone)),
                               dtype=np.int64, count=n),
            device=np.full(n, host, dtype=object),
            weight=np.ones(n),
        )
        res = attribute({host: trace}, req, None, t0_ns=cur, t1_ns=cut, idle_w=self._idle.get(host))
        if not mine:
            return
        if mine is everyone:
            self._table.host[np.asarray(mine, dtype=np.intp)] += res.energy_j
        else:  # mine is a subset of everyone (both: rows begun before the cut)
            at = {r: i for i, r in enumerate(everyone)}
            self._table.host[np.asarray(mine, dtype=np.intp)] += res.energy_j[np.asarray([at[r] for r in mine], dtype=np.intp)]

    def _refit_due(self, dev: str, cut: int, busy: bool) -> bool:
        """Whether to refit ``dev`` in this pass (the rule is in the module's docstring); notes it if so."""
        if self.idle_w is not None and not self._dev_steps.get(dev):
            return False  # a fixed idle baseline and no batch step ever on this device: a refit could change nothing
        now = time.monotonic()
        last = self._fit_at.get(dev)
        seen = self._dev_steps.get(dev, 0)
        new_steps = seen > self._fit_steps.get(dev, 0)
        if dev not in self._models and new_steps and seen >= self.min_fit_steps:
            # no model yet: as soon as the readings cover enough steps; a rejected fit is retried after
            # 1 s, then 2, 4, ... up to refit_s (a sensor that never resolves the steps costs no more)
            wait = self._fit_wait.get(dev, 0.0)
            due = cut >= self._first_fit_ns.get(dev, cut) and (last is None or now - last >= wait)
            if due:
                self._fit_wait[dev] = min(self.refit_s, max(1.0, 2 * wait))
        else:
            due = (new_steps or busy) and (last is None or now - last >= self.refit_s)
        if due:
            self._fit_at[dev] = now
            self._fit_steps[dev] = seen
        return due

    def _refit(self, dev: str, cut: int) -> None:
        """Re-estimate idle and the step model over the recent history."""
        lo = cut - int(self.history_s * 1e9)
        trace = self._live().trace(dev, since_ns=lo)
        if len(trace) < 10:
            return
        def on(d: str) -> bool:  # a group runs on each member
            return d == dev or ("," in d and dev in d.split(","))

        steps_rows = [s for s in self._hist_steps if on(s[2]) and s[1] > lo]
        span: dict[str, list[int]] = {}
        for rid, a, b_ns, dname in self._hist_reqs:
            if on(dname) and b_ns > lo:
                span[rid] = [a, b_ns]
        table = self._table
        for rid, r in table.row.items():
            a, b = table.start[r], table.end[r]
            if on(table.device[r]) and a < cut:
                span[rid] = [a, min(b if b is not None else cut, cut)]
        if steps_rows:  # a step may name a request we never saw begin: its span is its steps'
            _steps_spans(steps_rows, span)
        n = len(span)
        bounds = np.array(list(span.values()), dtype=np.int64).reshape(n, 2)
        req = Requests(np.array(list(span), dtype=object), bounds[:, 0], bounds[:, 1], np.full(n, dev, dtype=object), np.ones(n))
        steps = Steps.from_batches(steps_rows, req, dev) if steps_rows else None
        # The step model over the stretch the steps span, with as much time before them: readings far
        # from any step say nothing about the step terms, yet in a mostly idle history they would fill
        # the cross-validation's time blocks (a burst in one block: its held-out error is meaningless).
        # The idle baseline is still estimated over the whole history.
        first = min(s[0] for s in steps_rows) if steps_rows else lo
        fit_lo = max(lo, 2 * first - cut)
        idle_w = self.idle_w
        if fit_lo > lo and idle_w is None:
            d0 = attribute({dev: trace}, req, None, t0_ns=lo, t1_ns=cut).devices.get(dev)
            if d0 is not None and d0.idle_source == "idle-periods":
                self._idle[dev] = d0.idle_w
            idle_w = self._idle.get(dev)
        res = attribute({dev: trace}, req, steps, idle_w=idle_w, t0_ns=fit_lo, t1_ns=cut, board_lag_s=self.board_lag_s)
        d = res.devices.get(dev)
        if d is None:
            return
        if self.idle_w is None and (d.idle_source == "idle-periods" or (d.idle_source == "fit-intercept" and dev not in self._idle)):
            self._idle[dev] = d.idle_w
        if d.model is None:
            return  # no steps here: nothing to model
        used = sum(1 for s in steps_rows if s[1] <= cut)  # steps the readings cover
        # cv_r2 <= 0: held-out readings predicted no better than by their mean, so its family was not
        # chosen on evidence (a burst or two in a mostly idle window); the current model stays
        if d.model.rows >= 20 and used >= self.min_fit_steps and d.model.cv_r2 > 0:
            self._models[dev] = d.model
            self.counters["step_model_fits"] += 1
        else:
            self.counters["step_model_rejected"] += 1

    def _group_done(self, r: int) -> bool:
        """Whether every metered member of row ``r``'s device group has passed its (set) end."""
        metered = getattr(self, "_metered", None) or {}
        end = self._table.end[r] or 0
        return all(self._cursor.get(m, end - 1) >= end for m in self._table.device[r].split(",") if m in metered)

    def _finalise(self, rows: list[int], cut: int, info: DeviceInfo | None, stalled: bool = False) -> None:
        table = self._table
        rid_of, end_of, dev_of, start_of = table.rid, table.end, table.device, table.start
        ended = [r for r in rows if rid_of[r] is not None and (e := end_of[r]) is not None and e <= cut]
        if not ended:
            return
        # (a pass's requests are on one device, as a rule: one look at each distinct device, not at each request)
        grouped = any("," in d for d in set(map(dev_of.__getitem__, ended)))
        self._hist_reqs.extend([(rid_of[r] or "", start_of[r], end_of[r] or 0, dev_of[r]) for r in ended  # (ended: both set)
                                if "," not in dev_of[r] or self._group_done(r)] if grouped else
                               [(rid_of[r] or "", start_of[r], end_of[r] or 0, dev_of[r]) for r in ended])
        peer_of = table.peer
        if (table.peers and any(map(peer_of.__getitem__, ended))) or grouped:
            done = []
            for r in ended:
                if "," in dev_of[r] and not self._group_done(r):
                    continue  # a device group: final once every metered member has passed its end
                if peer_of[r]:
                    self._forget_peer(rid_of[r] or "")
                else:
                    done.append(r)  # removed once emitted, so flush() waits for the sinks
            if not done:
                return
        else:
            done = ended
        if stalled:
            if not self.counters["late_records"]:
                log.warning("the power sensor stopped answering; records are made final on the clock, with coverage < 1")
            self.counters["late_records"] += len(done)
        idx = np.asarray(done, dtype=np.intp)
        dyn = table.dyn[idx]
        idle = table.idle[idx]
        energy = dyn + idle
        if not self._sinks:  # nobody takes records: count them and their energy, build none
            self.counters["records"] += len(done)
            self._final_j += math.fsum(energy.tolist())
            table.remove(done)
            return
        sensor = info.sensor if info is not None else "none"
        simulated = bool(info.simulated) if info is not None else False
        n = len(done)
        band = table.band[idx]
        start = np.fromiter(map(start_of.__getitem__, done), dtype=np.int64, count=n)
        end = np.array([end_of[r] for r in done], dtype=np.int64)
        # each request at the intensity of the hour it ran (its mid-point on the wall clock)
        wall = (start + end) * 0.5e-9 + (time.time() - time.monotonic())
        life = end - start
        covered = table.cov[idx].astype(float)
        devices = [dev_of[r] for r in done]
        metas = [table.meta[r] for r in done]
        # the labels: straight from the columns of the middleware's flat end events when every request has one
        label_columns = None
        if set(map(type, metas)) == {tuple} and set(map(len, metas)) == {len(_LABEL_ORDER) + 3}:  # type: ignore[arg-type]
            cols = list(zip(*metas))
            if cols[0].count(_END_FIELDS) == n:
                label_columns = cols[3:]
        method_of, quality_of = table.method, table.quality
        # carbon once, for the whole batch (see wattspan.carbon.records for the host rule)
        ids = [rid_of[r] or "" for r in done]
        if table.alias:  # an ended request kept under a key of its own: its record has the caller's id
            alias = table.alias
            ids = [alias.get(k, k) for k in ids]
        batch = request_batch(
            self.carbon, ids=ids, device=devices, start_ns=start, end_ns=end,
            dynamic_j=dyn, idle_j=idle, device_s=table.dev_s[idx], host_j=table.host[idx],
            wall_s=wall, energy_j_low=np.maximum(energy - band, 0.0), energy_j_high=energy + band,
            method=[method_of[r] or "no-trace" for r in done], sensor=sensor,
            coverage=np.minimum(1.0, np.divide(covered, life, out=np.ones(n), where=life > 0)),
            simulated=simulated, quality=[quality_of[r] for r in done],
            labels=None if label_columns is not None else [m if type(m) is RequestLabels else _labels(m) for m in metas],
            label_columns=label_columns,
            device_energy=([_parts_json(dev_of[r], table.parts[r]) if "," in dev_of[r] else "" for r in done]
                           if grouped else ""),
        )
        self.counters["records"] += len(batch)
        self._final_j += float(energy.sum())
        self._to_sinks(batch)
        table.remove(done)  # removed only now, so flush() waits for every sink


_PASS_RETRIES = 8  # failed passes in a row (4 s at the default 0.5 s period) before the ended requests are settled


def _as_id(rid: Any) -> str:
    """A request id that is not a string, as one (its ``str``; a type name if even that fails)."""
    try:
        return str(rid)
    except Exception:
        return f"<{type(rid).__name__} id>"


def _peer_ns(t: Any) -> int:
    """A time in a peer's message: ValueError unless it is one (the message is then counted as a pass error, skipped)."""
    v = _as_ns(t)
    if v is None:
        raise ValueError(f"not a time: {t!r}")
    return v


def _labels(meta: Any) -> RequestLabels:
    """A request's labels from what its end event carried: the flat event of :meth:`Meter.end_fields`, or a mapping (or None)."""
    if type(meta) is tuple and meta and meta[0] == _END_FIELDS:
        return _new_tuple(RequestLabels, meta[3:])
    return RequestLabels.from_mapping(meta)


def _carbon_from_env() -> CarbonModel:
    from ..carbon import CarbonModel
    from ..carbon.intensity import hourly_from_env
    from ..settings import get_settings

    s = get_settings()
    model: CarbonModel = hourly_from_env(CarbonModel.for_region(s.region, pue=s.pue))
    return model
