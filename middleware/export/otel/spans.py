"""Each request's energy on its own server span: :class:`EnergySpanProcessor`.

A request's energy is known only some time (up to a second or two) after its
HTTP server span has ended, because power sensors lag; the OpenTelemetry SDK
ignores attributes set on an ended span. :class:`EnergySpanProcessor` therefore
sits in front of the exporting processor: it holds back the server spans that
wattspan meters until their record is final, adds the energy attributes, and
passes them on; a span whose record does not come within ``hold_timeout_s``
goes on without energy, marked ``wattspan.status="pending"``.

Quick start (the SDK's usual setup, one line changed)::

    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from wattspan import Meter
    from wattspan.export.otel import EnergySpanProcessor, EnergyMetrics

    provider = TracerProvider()
    spans = EnergySpanProcessor(BatchSpanProcessor(OTLPSpanExporter()))
    provider.add_span_processor(spans)          # instead of the BatchSpanProcessor itself
    trace.set_tracer_provider(provider)
    metrics = EnergyMetrics()                   # the global MeterProvider
    meter = Meter(sinks=[spans, metrics])       # both are wattspan.RecordSink

or, from the standard ``OTEL_*`` environment variables, :func:`configure_from_env`.

The attributes it adds: :mod:`wattspan.export.otel.attributes`.

Nothing here raises into the request path or the meter's thread: failures are
logged once, counted (``stats()``), and the span goes on unchanged.
"""

from __future__ import annotations

import math
import os
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, TypeAlias

try:
    from opentelemetry import trace as _trace_api
    from opentelemetry.attributes import BoundedAttributes
    from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor
    from opentelemetry.trace import SpanKind, Status, StatusCode
    from opentelemetry.util.types import AttributeValue
except ImportError as exc:  # pragma: no cover - exercised without the otel extra
    raise ImportError("wattspan.export.otel needs the OpenTelemetry SDK: pip install 'wattspan[otel]'") from exc

from ...logs import LogOnce, get_logger
from ...meter.sinks import DeviceFigures
from ...records import RecordBatch, RequestRecord
from ._faults import _Faults
from .attributes import batch_attributes, record_attributes

if TYPE_CHECKING:
    from opentelemetry.context import Context
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import Span
    from opentelemetry.sdk.util.instrumentation import InstrumentationInfo, InstrumentationScope

__all__ = ["EnergySpanProcessor"]

log = get_logger(__name__)

_monotonic = time.monotonic


_PENDING: dict[str, AttributeValue] = {"wattspan.status": "pending"}


_new = object.__new__

# what a held span's record adds: attributes (resolve(), pending), the record to take them from, or
# (a RecordBatch's) its attributes as (name, value) pairs, in record_attributes' order (a zip, used once)
_Extra: TypeAlias = "Mapping[str, AttributeValue] | RequestRecord | zip[tuple[str, AttributeValue]]"


def _with_attributes(span: ReadableSpan, extra: Mapping[str, AttributeValue] | Iterable[tuple[str, AttributeValue]]) -> ReadableSpan:
    """A copy of the ended ``span`` with ``extra`` merged into its attributes.

    Everything else is the original's (events and links keep their dropped
    counts; the attribute dropped count carries over). The copy's attributes
    are not subject to the span's attribute limit: wattspan's are added even
    to a span that was full.

    The SDK's own ReadableSpan (what ``Span.end`` hands the processors) is
    copied by its fields: one dict copy, no constructor, no re-reading of every
    attribute through the read-only mapping. Other span classes go through the
    public constructor.
    """
    src = getattr(span, "_attributes", None)
    if type(src) is dict:  # a span held by _slim
        merged = dict(src)
        dropped = 0
    elif isinstance(src, BoundedAttributes):
        merged = dict(src._dict)  # the span's own values, cleaned by the SDK already
        dropped = src.dropped
    else:
        merged = dict(span.attributes or {})
        dropped = span.dropped_attributes
    merged.update(extra)  # ours are primitives
    attrs: Mapping[str, Any] = merged
    if dropped:  # keep the count, at the cost of re-validating every value
        attrs = BoundedAttributes(None, merged, immutable=True)
        attrs.dropped = dropped
    if type(span) is ReadableSpan:
        copy = _new(ReadableSpan)
        d = copy.__dict__
        d.update(span.__dict__)
        d["_attributes"] = attrs
        return copy
    return ReadableSpan(
        name=span.name,
        context=span.context,
        parent=span.parent,
        resource=span.resource,
        attributes=attrs,
        events=getattr(span, "_events", None) or span.events,
        links=getattr(span, "_links", None) or span.links,
        kind=span.kind,
        instrumentation_info=getattr(span, "_instrumentation_info", None),
        status=span.status,
        start_time=span.start_time,
        end_time=span.end_time,
        instrumentation_scope=span.instrumentation_scope,
    )


_NO_ITEMS: tuple[Any, ...] = ()


def _slim(span: ReadableSpan) -> ReadableSpan:
    """``span`` to hold until its record comes, with less for the garbage collector to scan.

    The SDK's ReadableSpan shares the ended span's event and link lists (a
    BoundedList each: a deque and a lock) and its attributes (a
    BoundedAttributes: a lock and a dict). When the lists are empty and nothing
    was dropped, a shallow copy holds empty tuples and a plain dict of the
    attributes instead, and is all that is held: the objects the cyclic GC
    tracks per held span go from 12 to 5 (about 3,000 spans are held at 3,000
    requests/s, and every full collection scans them). What the copy reads
    back is the same (``events``, ``links``, ``attributes``, their dropped
    counts: 0); other spans are held as they are.
    """
    if type(span) is not ReadableSpan:
        return span
    d = span.__dict__
    ev, ln = d.get("_events"), d.get("_links")
    if ev or ln or getattr(ev, "dropped", 0) or getattr(ln, "dropped", 0):
        return span
    copy = _new(ReadableSpan)
    cd = copy.__dict__
    cd.update(d)
    cd["_events"] = cd["_links"] = _NO_ITEMS
    attrs = d.get("_attributes")
    if type(attrs) is BoundedAttributes and not attrs.dropped:
        cd["_attributes"] = dict(attrs._dict)  # the values cleaned by the SDK already
    return copy




# ---------------------------------------------------------------------------- held spans, packed

# A held span waits about half a second (the meter's lag and a pass) for its record: thousands at
# once on a busy server. As the SDK's objects (ReadableSpan, its attribute dict, SpanContext,
# TraceFlags, TraceState, Status and the holding tuple: 7 objects the cyclic GC tracks per span)
# they made up a third of the heap every full collection scanned, and their promotion into the
# oldest generation brought those collections on sooner; the collections ran on whichever thread
# allocated, mostly the event loop. A plain span (an SDK ReadableSpan without events, links or
# dropped attributes, whose resource and scope are among a few) is therefore held *packed*: one
# flat tuple of numbers, strings and None, and the span's own attribute dict (the SDK's, not copied:
# nothing writes to an ended span's attributes).
# Its record then builds the finished span once (attributes merged, no copy of a copy) for the
# exporter. Other spans are held as they are (a ``(deadline, span)`` pair).
#
# Packed layout: (deadline, name, trace_id, span_id, is_remote, flags, trace_state or None, is_valid,
# parent (None or its context packed alike), kind index, status (None: unset), start_time, end_time,
# index of (resource, scope, info)); the attribute dict is kept apart, by span id (a tuple holding a
# dict is never untracked). Nothing in the entry is tracked (in the common case), so the GC stops
# tracking it at its first look: held spans no longer fill the oldest generation that every full
# collection scans.

_KINDS = tuple(SpanKind)
# a SpanKind's index by the member's identity (its hash is Enum.__hash__: a Python call per held span)
_KIND_BY_ID = {id(k): i for i, k in enumerate(_KINDS)}
_UNSET_CODE = StatusCode.UNSET
_UNSET = Status(StatusCode.UNSET)
_FLAGS: dict[int, _trace_api.TraceFlags] = {}  # flags value -> one shared TraceFlags (immutable ints)
_NOTHING = object()  # matches no resource, scope or info
_MAX_SHARED = 64  # distinct (resource, scope) held packed; beyond, spans are held as they are


def _flags(v: int) -> _trace_api.TraceFlags:
    f = _FLAGS.get(v)
    if f is None:
        f = _FLAGS[v] = _trace_api.TraceFlags(v)
    return f


_SpanContext = _trace_api.SpanContext
_DEFAULT_TS = _trace_api.DEFAULT_TRACE_STATE
_tuple_new = tuple.__new__

# a SpanContext packed: (trace_id, span_id, is_remote, flags, trace_state or None, is_valid)
_PackedContext = tuple[int, int, bool, int, "_trace_api.TraceState | None", bool]


def _pack_context(ctx: object) -> _PackedContext | None:
    """A SpanContext (a tuple: trace_id, span_id, is_remote, trace_flags, trace_state, is_valid) as
    (trace_id, span_id, is_remote, flags as an int, trace_state or None when empty, is_valid);
    None if it is no SpanContext."""
    if type(ctx) is not _SpanContext:
        return None
    tid, sid, remote, flags, ts, valid = ctx
    return (tid, sid, remote, int(flags), None if ts is _DEFAULT_TS or not len(ts) else ts, valid)


def _context(tid: int, sid: int, remote: bool, flags: int, ts: _trace_api.TraceState | None, valid: bool) -> _trace_api.SpanContext:
    """The SpanContext :func:`_pack_context` packed (the constructor's tuple, built as it builds it:
    checked at import)."""
    f = _FLAGS.get(flags)
    return _tuple_new(_SpanContext, (tid, sid, remote, f if f is not None else _flags(flags),
                                     _DEFAULT_TS if ts is None else ts, valid))


def _build(name: str, context: _trace_api.SpanContext, kind: SpanKind, info: InstrumentationInfo | None,
           scope: InstrumentationScope | None, parent: _trace_api.SpanContext | None, start: int | None,
           end: int | None, attributes: Mapping[str, AttributeValue], resource: Resource,
           status: Status) -> ReadableSpan:
    """A finished SDK ReadableSpan with these fields, as its constructor would make it (checked at import)."""
    span = _new(ReadableSpan)
    span._name = name  # in the constructor's order: the instances share one key table
    span._context = context
    span._kind = kind
    span._instrumentation_info = info
    span._instrumentation_scope = scope
    span._parent = parent
    span._start_time = start
    span._end_time = end
    span._attributes = attributes
    span._events = _NO_ITEMS
    span._links = _NO_ITEMS
    span._resource = resource
    span._status = status
    return span


def _fast_build_ok() -> bool:
    """Whether :func:`_build` makes what ReadableSpan's constructor makes, and SpanContexts
    unpack as expected, in the SDK installed (else spans are held and copied as they are)."""
    try:
        from opentelemetry.sdk.resources import Resource

        res = Resource.create({})
        ctx = _trace_api.SpanContext(1, 2, False, _trace_api.TraceFlags(1))
        args: dict[str, Any] = dict(name="n", context=ctx, parent=None, resource=res, attributes={"a": 1}, events=_NO_ITEMS,
                    links=_NO_ITEMS, kind=SpanKind.SERVER, instrumentation_info=None, status=_UNSET,
                    start_time=1, end_time=2, instrumentation_scope=None)
        ref = ReadableSpan(**args)
        got = _build("n", ctx, SpanKind.SERVER, None, None, None, 1, 2, {"a": 1}, res, _UNSET)
        packed = _pack_context(ctx)
        if packed is None:
            return False
        again = _context(*packed)
        return (vars(ref) == vars(got) and packed == (1, 2, False, 1, None, True) and again == ctx
                and (again.trace_id, again.span_id, again.is_remote, again.trace_flags, again.trace_state, again.is_valid)
                == (1, 2, False, 1, _DEFAULT_TS, True) and type(again) is _SpanContext)
    except Exception:  # pragma: no cover - another SDK
        return False


_FAST = _fast_build_ok()


def _bounded_list_ok() -> bool:
    """Whether the SDK's BoundedList (an ended span's events and links) keeps its items in a deque
    ``_dq`` beside its ``dropped`` count, as :meth:`EnergySpanProcessor._pack` reads them."""
    try:
        from opentelemetry.sdk.util import BoundedList

        full: Any = BoundedList(1)
        full.extend((1, 2))
        empty: Any = BoundedList(1)
        return type(empty._dq) is deque and list(full._dq) == [2] and full.dropped == 1 and len(full) == 1
    except Exception:  # pragma: no cover - another SDK
        return False


_BoundedList: Any = None  # another SDK's: every span's lists are read through their public length
if _bounded_list_ok():
    from opentelemetry.sdk.util import BoundedList

    _BoundedList = BoundedList

def _empty_hooks() -> frozenset[object]:
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor

    return frozenset(f for cls in (SpanProcessor, BatchSpanProcessor, SimpleSpanProcessor)
                     for f in (cls.__dict__.get("on_start"), cls.__dict__.get("_on_ending")) if f is not None)


_EMPTY_HOOKS = _empty_hooks()  # the SDK's processors' hooks that do nothing


def _hook(proc: SpanProcessor, name: str) -> Callable[..., None] | None:
    """``proc``'s bound ``name`` method, or None when it has none or it is one of the SDK's empty ones."""
    fn: Callable[..., None] | None = getattr(proc, name, None)  # on_start(span, parent_context=), _on_ending(span)
    if fn is None or getattr(fn, "__func__", None) in _EMPTY_HOOKS:
        return None
    return fn


def _span_id_of(span_or_context: int | _trace_api.SpanContext | _trace_api.Span) -> int:
    """The span id of an int, a SpanContext or a Span (0 when there is none to wait for)."""
    if isinstance(span_or_context, int):
        return span_or_context
    if not isinstance(span_or_context, _trace_api.SpanContext) and hasattr(span_or_context, "get_span_context"):
        if not span_or_context.is_recording():  # on_end is never called for it
            return 0
        span_or_context = span_or_context.get_span_context()
    if isinstance(span_or_context, _trace_api.SpanContext):
        return span_or_context.span_id if span_or_context.is_valid else 0
    raise TypeError(f"expect() takes a span id (int), a SpanContext or a Span, not {type(span_or_context).__name__}")


_RETRY_S = 0.02  # how soon spans waiting for room in the exporter's queue are tried again


def _batch_processor(proc: Any) -> Any:
    """The SDK BatchSpanProcessor ``proc``'s internal BatchProcessor, where it is as expected (a bounded
    queue, its wake-up event, batch size, shutdown flag and pid), else None: spans then go through
    ``proc.on_end`` one at a time. Checked once here; a failure later also falls back (see _forward)."""
    try:
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
    except ImportError:  # pragma: no cover
        return None
    if type(proc) is not BatchSpanProcessor or type(proc).on_end is not _BSP_ON_END:
        return None
    bp = getattr(proc, "_batch_processor", None)
    try:
        q = bp._queue  # type: ignore[union-attr]
        ok = (isinstance(q, deque) and isinstance(bp._max_export_batch_size, int) and isinstance(bp._shutdown, bool)  # type: ignore[union-attr]
              and isinstance(bp._pid, int) and isinstance(bp._worker_awaken, threading.Event))  # type: ignore[union-attr]
    except AttributeError:
        return None
    return bp if ok else None


def _bsp_on_end() -> Any:
    try:
        from opentelemetry.sdk.trace.export import BatchSpanProcessor

        return BatchSpanProcessor.on_end
    except ImportError:  # pragma: no cover
        return None


_BSP_ON_END = _bsp_on_end()  # a subclass overriding on_end gets its own on_end called


# ---------------------------------------------------------------------------- the span processor


class EnergySpanProcessor(SpanProcessor):
    """Holds metered server spans until their energy is known, then passes them on.

    ``downstream``: the processor that exports (``BatchSpanProcessor(exporter)``).
    Add this processor to the ``TracerProvider`` *instead of* ``downstream``.

    * :meth:`expect` at request start marks a span as one wattspan meters;
    * :meth:`on_end` passes unmarked spans straight on, and holds marked ones;
    * :meth:`resolve` (any thread) merges the record's attributes into the held
      span and passes it on; a record that comes before its span ends is kept
      and applied when it ends.

    A span held longer than ``hold_timeout_s`` seconds goes on marked
    ``wattspan.status="pending"`` (a background thread wakes at each deadline),
    as does the oldest held span when more than ``max_held`` are held. At most
    ``max_expected`` spans are marked at once (spans still running); beyond
    that the oldest mark is forgotten and that span goes on without energy.
    ``force_flush`` and ``shutdown`` pass on every held span (pending) and then
    delegate. All operations are O(1) per span and thread-safe; none raises:
    failures are counted in :meth:`stats` and logged.

    With the SDK's own ``BatchSpanProcessor`` downstream, a pass's finished spans go
    into its queue in one step; what its bounded queue has no room for (a burst: a
    pass can finish more than its 2,048) waits here and is handed over as the
    exporter catches up (``export_deferred``), never pushing queued spans out; past
    ``max_held`` waiting, the oldest are dropped, counted (``export_dropped``) and
    logged. Any other downstream gets each span through its ``on_end``.
    """

    def __init__(
        self,
        downstream: SpanProcessor,
        *,
        hold_timeout_s: float = 5.0,
        max_held: int = 10_000,
        max_expected: int = 100_000,
    ) -> None:
        if not callable(getattr(downstream, "on_end", None)):
            raise TypeError(
                f"downstream must be a SpanProcessor (e.g. BatchSpanProcessor(exporter)), not {type(downstream).__name__}"
            )
        if not (isinstance(hold_timeout_s, (int, float)) and math.isfinite(hold_timeout_s) and hold_timeout_s > 0):
            raise ValueError(f"hold_timeout_s must be a finite number of seconds > 0, got {hold_timeout_s!r}")
        for name, v in (("max_held", max_held), ("max_expected", max_expected)):
            if not (isinstance(v, int) and v >= 1):
                raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
        self.downstream = downstream
        self.hold_timeout_s = float(hold_timeout_s)
        self.max_held = max_held
        self.max_expected = max_expected
        self._early_ttl_s = max(60.0, self.hold_timeout_s)
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)  # the timer thread waits on it; everything else takes the lock itself
        self._expected: OrderedDict[int, None] = OrderedDict()
        # deadline order; each (deadline, ...): packed (see _pack) or (deadline, span)
        self._held: OrderedDict[int, tuple[Any, ...]] = OrderedDict()
        # the attribute dicts of the packed ones, by span id: kept out of the entries, which the GC
        # then stops tracking (one container for all instead of one tracked tuple per held span)
        self._held_attrs: dict[int, dict[str, AttributeValue]] = {}
        self._early: OrderedDict[int, tuple[dict[str, AttributeValue], float]] = OrderedDict()
        self._gone: OrderedDict[int, None] = OrderedDict()  # recently passed on as pending
        self._thread: threading.Thread | None = None
        self._closed = False
        # packed spans' resource, scope and instrumentation info, by identity (see _pack)
        self._shared: list[tuple[Any, Any, Any]] = []
        self._shared_index: dict[tuple[int, int, int], int] = {}
        self._last_shared: tuple[Any, Any, Any, int] = (_NOTHING, _NOTHING, _NOTHING, -1)  # the last span's, and its index
        # finished spans the downstream BatchSpanProcessor's queue had no room for: retried by the
        # timer thread (it wakes the exporter first), at most max_held, beyond that dropped, counted
        self._outbox: deque[ReadableSpan] = deque()
        self._out_lock = threading.Lock()
        self._once = LogOnce(log, every_s=60.0)
        self._counts = dict.fromkeys(
            (
                "final",  # passed on with energy
                "pending_timeout",  # passed on without: hold_timeout_s ran out
                "pending_overflow",  # ... more than max_held held
                "pending_flush",  # ... force_flush or shutdown
                "expect_evicted",  # marks forgotten: more than max_expected spans running
                "early",  # records that came before their span ended
                "early_expired",  # ... whose span never ended in time
                "late",  # records for spans already passed on as pending
                "unmatched",  # records for spans never marked
                "export_deferred",  # finished spans the exporter's queue had no room for at once (sent later)
                "export_dropped",  # ... that waited beyond max_held: lost, logged
                "flush_overran",  # the exporter's flush or shutdown ran past its time (a collector that never answers)
                "errors",
            ),
            0,
        )
        self._fault = _Faults(self._counts)

    # -------------------------------------------------------------- marks and records

    def expect(self, span_or_context: int | _trace_api.SpanContext | _trace_api.Span) -> None:
        """Mark a server span (its id, SpanContext or the Span) as metered: hold it at its end."""
        if type(span_or_context) is int:  # what the middleware passes, once per request
            sid = span_or_context
        else:
            try:
                sid = _span_id_of(span_or_context)
            except TypeError:
                self._fault("EnergySpanProcessor.expect got a bad argument")
                return
        if not sid or self._closed:
            return
        # No lock: one insertion into an ordered dict is atomic (called on the event
        # loop at every request start); only evicting the oldest marks takes the lock.
        exp = self._expected
        exp[sid] = None
        if len(exp) > self.max_expected:
            with self._lock:
                while len(exp) > self.max_expected:
                    exp.popitem(last=False)
                    self._counts["expect_evicted"] += 1

    def resolve(self, span_id: int, attributes: Mapping[str, AttributeValue]) -> None:
        """The record of span ``span_id`` is final: pass the span on with ``attributes``."""
        attrs = dict(attributes)
        attrs.setdefault("wattspan.status", "final")
        self._resolve(span_id, attrs)

    def _resolve(self, span_id: int, attrs: dict[str, AttributeValue]) -> None:
        """:meth:`resolve` with ``attrs`` this processor's own to keep (not copied again)."""
        self._resolve_many(((span_id, attrs),))

    def _resolve_many(self, items: Sequence[tuple[int, _Extra]]) -> None:
        """:meth:`resolve` for each (span id, attributes or the RequestRecord to take them
        from) of a pass, under one lock; attribute dicts are this processor's own to keep
        (not copied again)."""
        out: list[ReadableSpan] = []
        found: list[tuple[int, tuple[Any, ...], _Extra]] = []
        try:
            now = _monotonic()
            with self._lock:
                pop, expected, gone, counts = self._held.pop, self._expected, self._gone, self._counts
                closed, ttl = self._closed, now + self._early_ttl_s
                for span_id, attrs in items:
                    item = pop(span_id, None)
                    if item is not None:
                        found.append((span_id, item, attrs))
                    elif span_id in expected and not closed:
                        if isinstance(attrs, RequestRecord):  # a record before its span ended (rare): its attributes kept
                            try:
                                attrs = record_attributes(attrs)
                            except Exception:
                                self._fault("record_attributes failed for a record")
                                continue
                        self._keep_early_locked(span_id, dict(attrs) if type(attrs) is not dict else attrs, ttl)
                    elif span_id in gone:
                        counts["late"] += 1
                    else:
                        counts["unmatched"] += 1
                counts["final"] += len(found)
                self._expire_locked(now, out)
        except Exception:
            self._fault("EnergySpanProcessor.resolve failed")
        finish = self._finish
        for span_id, item, attrs in found:  # built outside the lock: the event loop's on_end never waits for them
            try:
                out.append(finish(span_id, item, attrs))
            except Exception:
                if not isinstance(attrs, Mapping):  # the record's attributes failed: the span goes on pending
                    self._fault("record_attributes failed for a record")
                    try:
                        out.append(finish(span_id, item, _PENDING))
                        continue
                    except Exception:
                        pass
                self._fault("EnergySpanProcessor.resolve failed to build a span")
                out.append(self._original(span_id, item))  # never lose the span: on as it is
        self._forward(out)

    def _keep_early_locked(self, span_id: int, attrs: dict[str, Any], ttl: float) -> None:
        """A record that came before its span ended (rare): its attributes kept until the span ends or
        ``ttl``; the oldest dropped past ``max_held`` (counted). Called with the lock held."""
        early = self._early
        early[span_id] = (attrs, ttl)
        early.move_to_end(span_id)
        self._counts["early"] += 1
        if len(early) > self.max_held:
            early.popitem(last=False)
            self._counts["early_expired"] += 1

    def _resolve_rows(self, sids: Sequence[int], names: Sequence[tuple[str, ...]], rows: Sequence[tuple[Any, ...]]) -> None:
        """:meth:`_resolve_many` of a RecordBatch's records from their attribute columns
        (:func:`~wattspan.export.otel.attributes.batch_attributes`): record ``i`` (span ``sids[i]``, 0 for
        none) has the attributes ``zip(names[i], rows[i])``. The same outcome, counts and spans, with
        the plain held spans built in one loop (no call per span) and, when every span built is sampled,
        handed to the exporter's queue without looking at each again."""
        out: list[ReadableSpan] = []
        found: list[int] = []  # the records whose span was held
        entries: list[tuple[Any, ...]] = []
        try:
            now = _monotonic()
            with self._lock:
                pop, expected, gone, counts = self._held.pop, self._expected, self._gone, self._counts
                closed, ttl = self._closed, now + self._early_ttl_s
                for i, span_id in enumerate(sids):
                    if not span_id:
                        continue
                    item = pop(span_id, None)
                    if item is not None:
                        found.append(i)
                        entries.append(item)
                    elif span_id in expected and not closed:  # a record before its span ended (rare): its attributes kept
                        self._keep_early_locked(span_id, dict(zip(names[i], rows[i])), ttl)
                    elif span_id in gone:
                        counts["late"] += 1
                    else:
                        counts["unmatched"] += 1
                counts["final"] += len(found)
                self._expire_locked(now, out)
        except Exception:
            self._fault("EnergySpanProcessor.resolve failed")
        built: list[ReadableSpan] = []
        sampled = not out  # the spans timed out meanwhile (in out) are the exporter's to check
        shared, held_attrs, flags_of = self._shared, self._held_attrs, _FLAGS
        for i, entry in zip(found, entries):  # built outside the lock: the event loop's on_end never waits for them
            span_id = sids[i]
            try:
                if len(entry) != 14 or not _FAST:
                    span = self._finish(span_id, entry, zip(names[i], rows[i]))
                    sampled = False
                else:  # _finish, _build and _context inline (what they make: test_export_batch compares)
                    _, name, tid, sid, remote, flags, ts, valid, parent, kind, status, start, end, k = entry
                    res, scope, info = shared[k]
                    held = held_attrs.get(span_id)
                    attrs: dict[str, AttributeValue] = held.copy() if held is not None else {}
                    attrs.update(zip(names[i], rows[i]))
                    f = flags_of.get(flags)
                    span = _new(ReadableSpan)
                    span._name = name  # in the constructor's order, as _build
                    span._context = _tuple_new(_SpanContext, (tid, sid, remote, f if f is not None else _flags(flags),
                                                              _DEFAULT_TS if ts is None else ts, valid))
                    span._kind = _KINDS[kind]
                    span._instrumentation_info = info
                    span._instrumentation_scope = scope
                    span._parent = None if parent is None else _context(*parent)
                    span._start_time = start
                    span._end_time = end
                    span._attributes = attrs
                    span._events = _NO_ITEMS
                    span._links = _NO_ITEMS
                    span._resource = res
                    span._status = _UNSET if status is None else status
                    held_attrs.pop(span_id, None)
                    if not flags & 1:
                        sampled = False
                built.append(span)
            except Exception:
                self._fault("record_attributes failed for a record")  # the span goes on pending, as _resolve_many's
                sampled = False
                try:
                    built.append(self._finish(span_id, entry, _PENDING))
                    continue
                except Exception:
                    pass
                self._fault("EnergySpanProcessor.resolve failed to build a span")
                built.append(self._original(span_id, entry))  # never lose the span: on as it is
        out.extend(built)
        self._forward(out, sampled=sampled)

    # -------------------------------------------------------------- wattspan.RecordSink

    def on_records(self, records: Sequence[RequestRecord]) -> None:
        """RecordSink: resolve the held span of each final record that has one."""
        # the records themselves: a held span's attributes are merged with its record's in one dict
        # as the span is built (see _finish), not built apart and merged into a copy
        items: list[tuple[int, _Extra]]
        if type(records) is RecordBatch:  # a meter pass's: the attributes straight from its columns
            sids = records.column("span_id")
            if not any(sids):
                return
            try:
                got = batch_attributes(records)
            except Exception:
                self._fault("batch_attributes failed; taking each record's attributes")
                got = None
            if got is not None:
                self._resolve_rows(sids, *got)
                return
        items = [(rec.span_id, rec) for rec in records if rec.span_id]
        if items:
            self._resolve_many(items)

    def on_device(self, figures: DeviceFigures) -> None:
        """RecordSink: spans carry no per-device figures."""

    def flush(self, timeout: float) -> None:
        """FlushableSink (the meter's drain at shutdown): :meth:`force_flush` within ``timeout`` s.
        Its outcome is in :meth:`stats`; the meter does not count it as a sink left unwritten."""
        self.force_flush(int(max(0.1, timeout) * 1000))

    # -------------------------------------------------------------- SpanProcessor

    @property
    def downstream(self) -> SpanProcessor:
        return self._downstream

    @downstream.setter
    def downstream(self, proc: SpanProcessor) -> None:
        self._downstream = proc
        # its start and ending hooks looked up once, and not called at all when they are the SDK's
        # empty ones (a BatchSpanProcessor's): every span of the process passes through here
        self._down_on_start = _hook(proc, "on_start")
        self._down_on_ending = _hook(proc, "_on_ending")
        self._batch = _batch_processor(proc)

    def on_start(self, span: Span, parent_context: Context | None = None) -> None:
        fn = self._down_on_start
        if fn is None:
            return
        try:
            fn(span, parent_context=parent_context)
        except Exception:
            self._fault("downstream on_start failed")

    def _on_ending(self, span: Span) -> None:
        fn = self._down_on_ending
        if fn is None:
            return
        try:
            fn(span)
        except Exception:
            self._fault("downstream _on_ending failed")

    def on_end(self, span: ReadableSpan) -> None:
        out: list[ReadableSpan] = []
        try:
            try:  # an SDK span's SpanContext tuple (trace_id, span_id, ...), read without its two properties
                sid = span._context[1]  # type: ignore[index]
            except (AttributeError, TypeError, IndexError):
                ctx = span.context
                sid = ctx.span_id if ctx is not None else 0
            if sid not in self._expected:  # not metered (inner spans): straight on, no lock, no copy
                try:
                    self._downstream.on_end(span)
                except Exception:
                    self._fault("downstream on_end failed")
                return
            now = _monotonic()
            entry, attrs = self._pack(span, now + self.hold_timeout_s)  # before the lock: nothing shared is read
            with self._lock:
                if sid in self._expected:
                    del self._expected[sid]
                    early = self._early.pop(sid, None)
                    if early is not None:
                        out.append(_with_attributes(span, early[0]))
                        self._counts["final"] += 1
                    else:
                        if attrs is not None:
                            self._held_attrs[sid] = attrs
                        if self._closed:
                            self._pending(sid, entry, "pending_flush", out)
                        else:
                            held = self._held
                            if not held:  # the timer sleeps until the first held span: wake it (or start it)
                                if self._thread is None or not self._thread.is_alive():
                                    self._start_thread()
                                else:
                                    self._cond.notify()
                            held[sid] = entry
                            if len(held) > self.max_held:
                                osid, oentry = held.popitem(last=False)
                                self._pending(osid, oentry, "pending_overflow", out)
                else:
                    out.append(span)
                # (held spans past their deadline are the timer thread's to pass on: not the event loop's)
        except Exception:
            self._fault("EnergySpanProcessor.on_end failed; passing the span on as it is")
            if not out:
                out.append(span)
        if out:
            self._forward(out, retry=False)

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        """Pass on every held span (``pending``), then flush ``downstream``, within ``timeout_millis``."""
        end = _monotonic() + max(0.0, timeout_millis / 1000)
        self._forward(self._take_all())
        self._drain_outbox(timeout_millis / 1000)
        left = max(0.0, end - _monotonic())
        return bool(self._bounded(lambda: self.downstream.force_flush(int(left * 1000)), left, "force_flush"))

    def _bounded(self, fn: Callable[[], Any], timeout_s: float, what: str) -> Any:
        """``fn()`` (the exporter's flush or shutdown), waited for ``timeout_s`` at most: the SDK's batch
        processor exports every queued batch whatever its timeout, each waiting on a collector that may never
        answer, which held a server's shutdown for minutes. Past the time it goes on in its own thread, counted
        (``flush_overran``) and logged once; None then, and where it raised."""
        box: list[Any] = []

        def run() -> None:
            try:
                box.append(fn())
            except Exception:
                self._fault(f"downstream {what} failed")
                box.append(None)

        th = threading.Thread(target=run, name=f"wattspan-otel-{what}", daemon=True)
        th.start()
        th.join(max(0.0, timeout_s))
        if box:
            return box[0]
        with self._lock:
            self._counts["flush_overran"] += 1
        self._once.warning(("otel", what), "wattspan: the span exporter's %s ran past %.1f s (a collector that does not "
                      "answer?); not waited for any longer (counted in stats()['flush_overran']; logged once)", what, timeout_s)
        return None

    def shutdown(self) -> None:
        """Pass on every held span (``pending``), stop the timer, shut ``downstream`` down."""
        with self._lock:
            self._closed = True
            self._expected.clear()
            self._early.clear()
            self._cond.notify_all()
        self._forward(self._take_all())
        self._drain_outbox(5.0)
        th = self._thread
        if th is not None and th is not threading.current_thread():
            th.join(5.0)
        self._bounded(self.downstream.shutdown, 5.0, "shutdown")
        with self._out_lock:  # what the exporter never had room for by now cannot reach it any more
            left = len(self._outbox)
            self._outbox.clear()
            if left:
                self._counts["export_dropped"] += left
        if left:
            log.error("wattspan: at shutdown %d finished spans were still waiting for room in the exporter's queue "
                      "(it exported too slowly); they are lost (%d dropped in all)", left, self._counts["export_dropped"])

    # -------------------------------------------------------------- introspection

    def stats(self) -> dict[str, int]:
        """Counters (see ``__init__``) and the current ``held``, ``expected``, ``early`` and
        ``export_waiting`` (finished spans waiting for room in the exporter's queue) sizes."""
        with self._lock:
            return dict(self._counts, held=len(self._held), expected=len(self._expected), early=len(self._early),
                        export_waiting=len(self._outbox))

    # -------------------------------------------------------------- internals

    def _pack(self, span: ReadableSpan, deadline: float) -> tuple[tuple[Any, ...], dict[str, AttributeValue] | None]:
        """What to hold of the ended ``span`` until ``deadline``: packed (see the layout above the
        class) and its attribute dict where it is a plain SDK span, else ``(deadline, span)``
        (slimmed where it can be) and None."""
        if not _FAST or type(span) is not ReadableSpan:
            return (deadline, _slim(span)), None
        try:
            ev: Any = span._events
            ln: Any = span._links
            if type(ev) is _BoundedList and type(ln) is _BoundedList:  # the SDK's: their deques read, not
                if ev._dq or ln._dq or ev.dropped or ln.dropped:  # two calls of BoundedList.__len__
                    return (deadline, span), None
            elif ev or ln or getattr(ev, "dropped", 0) or getattr(ln, "dropped", 0):
                return (deadline, span), None
            attrs: Any = span._attributes
            if type(attrs) is BoundedAttributes:
                if attrs.dropped:
                    return (deadline, span), None
                attrs = attrs._dict  # the SDK's values, cleaned already; never written to after the end
            elif attrs is None:
                attrs = {}
            elif type(attrs) is not dict:
                return (deadline, span), None
            kind = _KIND_BY_ID.get(id(span._kind))
            ctx: Any = span._context
            if kind is None or type(ctx) is not _SpanContext:
                return (deadline, _slim(span)), None
            tid, sid, remote, flags, ts, valid = ctx  # _pack_context, inline (one call less per span)
            parent: Any = span._parent
            if parent is not None:
                parent = _pack_context(parent)
                if parent is None:
                    return (deadline, _slim(span)), None
            status: Any = span._status
            if status is None or (status._status_code is _UNSET_CODE and status._description is None):
                status = None
            res, scope, info = span._resource, span._instrumentation_scope, span._instrumentation_info
            last = self._last_shared  # the (resource, scope, info) of the span before: almost always this one's
            k: int | None
            if last[0] is res and last[1] is scope and last[2] is info:
                k = last[3]
            else:
                key = (id(res), id(scope), id(info))
                k = self._shared_index.get(key)
                if k is None:
                    with self._lock:
                        k = self._shared_index.get(key)
                        if k is None:
                            if len(self._shared) >= _MAX_SHARED:
                                return (deadline, _slim(span)), None
                            k = self._shared_index[key] = len(self._shared)
                            self._shared.append((res, scope, info))  # kept: their ids stay theirs
                self._last_shared = (res, scope, info, k)
            # the attribute dict apart (see _held_attrs): a tuple holding a dict, even an untracked one,
            # is never untracked itself
            return (deadline, span._name, tid, sid, remote, int(flags), None if ts is _DEFAULT_TS or not len(ts) else ts,
                    valid, parent, kind, status, span._start_time, span._end_time, k), attrs
        except AttributeError:  # pragma: no cover - the SDK's span is not what it was
            return (deadline, span), None

    def _finish(self, span_id: int, entry: tuple[Any, ...], extra: _Extra) -> ReadableSpan:
        """The finished span of the held ``entry`` of ``span_id`` with ``extra`` (attributes, or a
        RequestRecord's: :func:`record_attributes`) merged into its attributes."""
        if len(entry) == 2:
            return _with_attributes(entry[1], record_attributes(extra) if isinstance(extra, RequestRecord) else extra)
        _, name, tid, sid, remote, flags, ts, valid, parent, kind, status, start, end, k = entry
        res, scope, info = self._shared[k]
        held_attrs = self._held_attrs
        held = held_attrs.get(span_id)
        attrs: dict[str, AttributeValue] = held.copy() if held is not None else {}
        if isinstance(extra, RequestRecord):
            record_attributes(extra, attrs)  # into the copy: one dict, the span's keys first
        else:
            attrs.update(extra)
        span = _build(name, _context(tid, sid, remote, flags, ts, valid), _KINDS[kind], info, scope,
                      None if parent is None else _context(*parent), start, end, attrs, res,
                      _UNSET if status is None else status)
        held_attrs.pop(span_id, None)  # only now: a record that failed leaves them for the pending span
        return span

    def _original(self, span_id: int, entry: tuple[Any, ...]) -> ReadableSpan:
        """The held span as it ended (no attributes of ours): the fallback when building fails."""
        return entry[1] if len(entry) == 2 else self._finish(span_id, entry, {})

    def _pending(self, sid: int, entry: tuple[Any, ...], why: str, out: list[ReadableSpan]) -> None:
        """Append the held ``entry``'s span, marked pending, to ``out``. Never raises: a span that
        cannot be built so goes on as it ended (counted in ``errors``, logged once), so that one
        span's failure loses none of the others a flush, a shutdown or the timer takes with it."""
        self._counts[why] += 1
        gone = self._gone
        gone[sid] = None
        if len(gone) > self.max_held:
            gone.popitem(last=False)
        try:
            out.append(self._finish(sid, entry, _PENDING))
            return
        except Exception:
            self._fault("EnergySpanProcessor: building a pending span failed; passing it on as it ended")
        try:
            out.append(self._original(sid, entry))
        except Exception:  # pragma: no cover - an entry that cannot be rebuilt at all (counted again)
            self._fault("EnergySpanProcessor: a held span could not be rebuilt; it is lost")

    def _expire_locked(self, now: float, out: list[ReadableSpan]) -> None:
        held = self._held
        while held:
            sid, entry = next(iter(held.items()))
            if entry[0] > now:
                break
            del held[sid]
            self._pending(sid, entry, "pending_timeout", out)
        early = self._early
        while early:
            sid, (_, deadline) = next(iter(early.items()))
            if deadline > now:
                break
            del early[sid]
            self._counts["early_expired"] += 1

    def _take_all(self) -> list[ReadableSpan]:
        with self._lock:
            out: list[ReadableSpan] = []
            for sid, entry in self._held.items():  # one by one: a span that fails loses none of the others
                self._pending(sid, entry, "pending_flush", out)
            self._held.clear()  # (each taken span's attribute dict went with it, in _finish; not the
            # others': a resolve builds the spans it took outside the lock, from theirs)
            return out

    def _forward(self, spans: list[ReadableSpan], retry: bool = True, sampled: bool = False) -> None:
        """Hand finished spans to ``downstream``: a BatchSpanProcessor's queue at once (see
        :func:`_batch_processor`), any other processor span by span through ``on_end``.
        ``retry=False`` (the event loop's on_end): while spans wait in the outbox, new ones
        join them there rather than retrying the whole outbox on the loop."""
        batch = self._batch
        if batch is not None and (spans or (retry and self._outbox)):
            try:
                spans = self._to_queue(batch, spans, retry, sampled)
            except Exception:  # the SDK's insides are not what they were: its public on_end from now on
                self._batch = None
                self._fault("EnergySpanProcessor: handing spans to the BatchSpanProcessor's queue failed; using on_end")
        if not spans:
            return
        on_end = self._downstream.on_end
        for s in spans:
            try:
                on_end(s)
            except Exception:
                self._fault("downstream on_end failed")

    def _to_queue(self, bp: Any, spans: list[ReadableSpan], retry: bool = True, sampled: bool = False) -> list[ReadableSpan]:
        """Put ``spans`` (and those waiting in the outbox first) into the BatchProcessor ``bp``'s queue
        in one step, what ``on_end`` would do one span at a time; returns the spans for ``on_end``
        instead (all of them when ``bp`` is shut down or the process forked: the SDK's own handling).

        The SDK's queue is a bounded deque that, when full, silently pushes out its oldest span for
        each new one (``on_end`` logs a warning each time): a pass can finish more spans than it holds.
        So only what fits is queued, leaving room for the spans the event loop ends meanwhile; the
        exporter's thread is woken, and the rest waits in the outbox, retried by the timer thread.
        """
        if bp._shutdown or bp._pid != os.getpid():  # the SDK's on_end handles these (and the outbox's)
            with self._out_lock:
                waiting = list(self._outbox)
                self._outbox.clear()
            return waiting + list(spans)
        queue = bp._queue
        # what BatchSpanProcessor.on_end drops (sampled: the caller built these spans and knows them all sampled)
        new = spans if sampled else [s for s in spans if s.context and s.context.trace_flags.sampled]
        with self._out_lock:
            box = self._outbox
            if box and not retry:
                rest = new
            else:
                if box:
                    box.extend(new)
                    spans = list(box)
                    box.clear()
                else:
                    spans = new
                cap = queue.maxlen
                # keep an eighth free for the loop's spans, but never so much that the queue cannot reach
                # the export batch size (the exporter's thread exports only full batches when woken)
                keep = min(cap // 8, cap - bp._max_export_batch_size) if cap is not None else 0
                room = max(0, cap - keep - len(queue)) if cap is not None else len(spans)
                queue.extendleft(spans[:room])  # newest at the left, as appendleft does
                rest = spans[room:]
            if rest:
                self._counts["export_deferred"] += min(len(rest), len(new))  # each span counted once
                box.extend(rest)
                over = len(box) - self.max_held
                if over > 0:
                    for _ in range(over):
                        box.popleft()
                    self._counts["export_dropped"] += over
                    self._once.warning("export_dropped", "wattspan: the span exporter's queue stayed full (it exports "
                                       "more slowly than spans end); dropped the %d oldest finished spans (%d in all)",
                                       over, self._counts["export_dropped"])
        if len(queue) >= bp._max_export_batch_size or rest:
            bp._worker_awaken.set()
        if rest:
            with self._cond:  # the timer retries soon (it starts if it has not)
                if self._thread is None or not self._thread.is_alive():
                    self._start_thread()
                else:
                    self._cond.notify()
        return []

    def _drain_outbox(self, timeout_s: float) -> None:
        """At a flush: hand every span waiting in the outbox to the exporter, flushing it in
        between, for up to ``timeout_s`` seconds (what is left is still counted in stats())."""
        end = _monotonic() + max(0.0, timeout_s)
        while self._outbox and self._batch is not None:
            self._forward([])
            if not self._outbox:
                break
            before = len(self._outbox)
            left = max(0.0, end - _monotonic())  # the exporter empties its queue now, within the time left
            if self._bounded(lambda: self._downstream.force_flush(int(left * 1000)), left, "force_flush") is None:
                return
            self._forward([])
            if len(self._outbox) >= before or _monotonic() >= end:  # no room made, or out of time: still counted
                return

    def _start_thread(self) -> None:
        th = threading.Thread(target=self._run, name="wattspan-span-hold", daemon=True)
        self._thread = th
        th.start()

    def _run(self) -> None:
        cond = self._cond
        while True:
            out: list[ReadableSpan] = []
            with cond:
                if self._closed:
                    return
                retry = bool(self._outbox)
                if not self._held and not retry:
                    cond.wait()
                    continue
                delay = next(iter(self._held.values()))[0] - _monotonic() if self._held else math.inf
                if retry:  # finished spans wait for room in the exporter's queue: try again soon
                    delay = min(delay, _RETRY_S)
                if delay > 0:
                    cond.wait(delay)
                    if not retry:
                        continue
                try:
                    self._expire_locked(_monotonic(), out)
                except Exception:  # pragma: no cover - defensive: never let the timer die
                    self._fault("span hold timer failed")
            self._forward(out)  # the outbox too, if any
