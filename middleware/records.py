"""The per-request record: what wattspan says one request cost, and how it knows.

And :class:`Cardinality`, the bound on the distinct label values records carry.
"""

from __future__ import annotations

import math
import re
import threading
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any, NamedTuple, overload

__all__ = ["Cardinality", "RecordBatch", "RequestLabels", "RequestRecord", "json_safe", "model_label", "printable", "tenant_label"]


_TENANT_DROP = re.compile(r"[^A-Za-z0-9_.:-]")


def tenant_label(raw: str) -> str:
    """The tenant label a record keeps of a raw value (a header's, or a callable's): the characters
    ``[A-Za-z0-9_.:-]`` of its first 256, cut to 64; ``invalid`` when none is left; ``""`` for no tenant.

    One function, so that what a budget or a reader matches is what the ledger holds (the middleware
    then bounds the distinct labels, past which they are ``other``)."""
    if not raw:
        return ""
    return _TENANT_DROP.sub("", raw[:256])[:64] or "invalid"


_MODEL_DROP = re.compile(r"[^\x20-\x7e]")


def model_label(raw: str) -> str:
    """The model label a record keeps of a raw value: printable ASCII, cut to 128; ``invalid`` when none is left."""
    if not raw:
        return ""
    return _MODEL_DROP.sub("", raw[:512])[:128] or "invalid"


class RequestLabels(NamedTuple):
    """What the server says about a request when it ends (the middleware's hand-off to the meter).

    Bounded labels only (the route template, never the raw path; no prompt, no body). A
    NamedTuple: built in a few hundred nanoseconds on the request path.
    """

    route: str = ""
    http_method: str = ""
    status_code: int = 0
    model: str = ""
    tenant: str = ""
    prompt_tokens: int = 0
    output_tokens: int = 0
    trace_id: int = 0
    span_id: int = 0

    @classmethod
    def from_mapping(cls, m: Any) -> "RequestLabels":
        """From a dict with (some of) the field names; missing or empty values read as the defaults.

        What a caller's dict holds is not trusted: a value that is not a number in its field's range
        (a status of ``"abc"``, a trace id of ``-5``, a token count of ``1e300``) reads as the default,
        and text is cut to the middleware's lengths (route 256, model 128, tenant 64 characters), so
        one bad end event cannot fail the meter's pass, and with it every other request's record."""
        if not m:
            return _NO_LABELS
        g = m.get
        return cls(_text(g("route"), 256), _text(g("http_method"), 16), _int(g("status_code"), 999),
                   _text(g("model"), 128), _text(g("tenant"), 64), _int(g("prompt_tokens"), _MAX_TOKENS),
                   _int(g("output_tokens"), _MAX_TOKENS), _int(g("trace_id"), _MAX_TRACE), _int(g("span_id"), _MAX_SPAN))


_MAX_TOKENS = 10**12
_MAX_TRACE = 2**128 - 1
_MAX_SPAN = 2**64 - 1


def _text(v: Any, limit: int) -> str:
    return str(v)[:limit] if v else ""


def _int(v: Any, hi: int) -> int:
    """``v`` as an int in ``[0, hi]``, else 0 (never raises)."""
    if not v:
        return 0
    try:
        i = int(v)
    except (TypeError, ValueError, OverflowError):
        return 0
    return i if 0 <= i <= hi else 0


_NO_LABELS = RequestLabels()


# Not slotted: the meter builds each record with one dict update (``_record``), a
# fraction of what forty frozen-attribute assignments cost per record.
@dataclass(frozen=True)
class RequestRecord:
    """One request's final energy and carbon.

    Units are in the names: joules (``_j``), grams of CO2e (``_g``), seconds
    (``_s``), nanoseconds on the monotonic clock (``_ns``).

    ``energy_j = dynamic_j + idle_j`` is the request's share of what the meter
    measured on its accelerator. ``host_j`` is its share of host (CPU package)
    energy, kept apart from ``energy_j``; 0 where no host source was metered
    (offline ``wattspan attribute`` meters none). ``co2e_g`` is operational
    (``(energy_j + host_j)`` x PUE x grid intensity) plus ``embodied_g``: carbon
    covers the host wherever it was measured or estimated, the same in every
    output (built once, by :func:`wattspan.carbon.records.request_records`). ``method`` says how the energy was split
    (``"batch-fit"``: batch steps and a fitted step-energy model reconciled with
    the meter; ``"time-share"``: shared with the requests in flight at each
    instant), ``sensor`` which reading it rests on, ``coverage`` the fraction of
    the request's lifetime the trace covered (0..1), ``simulated`` whether the
    power came from the simulated source (never a measurement).

    ``energy_j_low``/``energy_j_high`` bound a 90 % interval on ``energy_j`` from the
    step model's held-out errors (``co2e_g_low``/``co2e_g_high`` the same carried to
    carbon); both 0 when no band was computed. ``quality`` is ``good``, ``coarse``
    (a coarse sensor: trust the band) or ``misfit`` (the model fits badly; the band is
    wide), or empty.
    """

    id: str
    device: str
    start_ns: int
    end_ns: int
    energy_j: float
    dynamic_j: float
    idle_j: float
    device_s: float
    co2e_g: float = 0.0
    embodied_g: float = 0.0
    method: str = ""
    sensor: str = ""
    coverage: float = 1.0
    simulated: bool = False
    route: str = ""
    http_method: str = ""
    status_code: int = 0
    model: str = ""
    tenant: str = ""
    prompt_tokens: int = 0
    output_tokens: int = 0
    trace_id: int = 0
    span_id: int = 0
    host_j: float = 0.0
    energy_j_low: float = 0.0
    energy_j_high: float = 0.0
    co2e_g_low: float = 0.0
    co2e_g_high: float = 0.0
    quality: str = ""
    # Which intensity the carbon used (issue 11): gCO2e/kWh, the provider that said it
    # (``profile``, ``table``, ``electricitymaps``, ...; ``electricitymaps:fallback-profile`` when
    # a live one was down), its zone, the hour (``YYYY-MM-DDTHH:MMZ``, UTC) and the basis (``location``).
    # Market-based (a user's contract factor; 0 = none given) and marginal (0 = none) figures
    # are reported beside, operational only; ``co2e_g`` stays location-based.
    intensity_g_per_kwh: float = 0.0
    intensity_provider: str = ""
    intensity_zone: str = ""
    intensity_hour: str = ""
    intensity_basis: str = ""
    market_g_per_kwh: float = 0.0
    co2e_market_g: float = 0.0
    marginal_g_per_kwh: float = 0.0
    co2e_marginal_g: float = 0.0
    # A device group's request: its energy on each member device, as JSON ``{"gpu0": J, ...}``
    # (``device_energy_j`` reads it); empty on one device.
    device_energy: str = ""

    @property
    def device_energy_j(self) -> dict[str, float]:
        """The energy (J) on each device of the request's group: ``{device: J}`` (one device: all of it)."""
        if not self.device_energy:
            return {self.device: self.energy_j - self.host_j}
        import json

        try:
            d = json.loads(self.device_energy)
            return {str(k): float(v) for k, v in d.items()} if isinstance(d, dict) else {}
        except (ValueError, TypeError, AttributeError):
            return {}

    @property
    def duration_s(self) -> float:
        return (self.end_ns - self.start_ns) / 1e9

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class Cardinality:
    """Admits at most ``limit`` distinct values; the rest become ``overflow`` (counted).

    Bounds label cardinality: the middleware's tenants, the metrics' labels.
    """

    __slots__ = ("limit", "seen", "overflow", "overflowed", "_lock")

    def __init__(self, limit: int, overflow: str = "other") -> None:
        self.limit = limit
        self.seen: set[str] = set()
        self.overflow = overflow
        self.overflowed = 0
        self._lock = threading.Lock()

    def reserve(self, values: Iterable[str]) -> None:
        """Always admit ``values`` (a budget's tenants and models: a label that became ``overflow``
        would leave its budget blind), over the limit if need be; the rest still share ``limit``."""
        with self._lock:
            new = set(values) - self.seen
            self.seen = self.seen | new
            self.limit += len(new)  # reserved labels take no place of the others'

    def __call__(self, value: str) -> str:
        if value in self.seen:
            return value
        with self._lock:
            if len(self.seen) < self.limit:
                self.seen.add(value)
                return value
            self.overflowed += 1
        return self.overflow


#: RequestRecord's fields, in order (the order of ``_record``'s values)
FIELDS = tuple(f.name for f in fields(RequestRecord))
_new = object.__new__


def _record(values: Iterable[Any]) -> RequestRecord:
    """A RequestRecord from all its field values in :data:`FIELDS` order, of the
    right types already (the meter's hot path: no per-field ``__init__`` work)."""
    rec = _new(RequestRecord)
    rec.__dict__.update(zip(FIELDS, values))
    return rec


class RecordBatch(Sequence[RequestRecord]):
    """A batch of final records (a meter pass's) held as columns: a ``Sequence[RequestRecord]``
    whose records are built on first use, once.

    ``const``: the fields whose value is the same in every record (name -> that value);
    ``columns``: the others (name -> a list of one value per record, in record order). Every
    field of :class:`RequestRecord` is in exactly one of them. Iterating, indexing or
    :meth:`records` builds the :class:`RequestRecord` objects (the same objects on every later
    use); wattspan's own sinks (spans, metrics, ledger) read the columns instead, so a pass
    whose sinks are only those builds no record object at all.

    Values are of the record's field types already (numbers as Python ``float``/``int``, not
    numpy scalars): made by :func:`wattspan.carbon.records.request_batch`.
    """

    __slots__ = ("_n", "const", "columns", "_built")

    _lock = threading.Lock()  # one build per batch, should sinks on several threads share it

    def __init__(self, n: int, const: dict[str, Any], columns: dict[str, list[Any]]) -> None:
        if set(const) | set(columns) != set(FIELDS) or set(const) & set(columns):
            raise ValueError("a RecordBatch needs every RequestRecord field, each either constant or a column")
        if any(len(c) != n for c in columns.values()):
            raise ValueError(f"every column of a RecordBatch of {n} records has {n} values")
        self._n = n
        self.const = const
        self.columns = columns
        self._built: list[RequestRecord] | None = None

    def __len__(self) -> int:
        return self._n

    @overload
    def __getitem__(self, i: int) -> RequestRecord: ...

    @overload
    def __getitem__(self, i: slice) -> list[RequestRecord]: ...

    def __getitem__(self, i: int | slice) -> RequestRecord | list[RequestRecord]:
        built = self._built
        return (built if built is not None else self.records())[i]

    def __iter__(self) -> Iterator[RequestRecord]:
        built = self._built
        return iter(built if built is not None else self.records())

    def column(self, name: str) -> list[Any]:
        """Field ``name``'s value for each record, in record order (a new list for a constant field)."""
        col = self.columns.get(name)
        return col if col is not None else [self.const[name]] * self._n

    def records(self) -> list[RequestRecord]:
        """The records, built on the first call (a list: the same objects on every call)."""
        built = self._built
        if built is not None:
            return built
        with self._lock:
            if self._built is None:
                self._built = self._build()
            return self._built

    def _build(self) -> list[RequestRecord]:
        # each record's instance dict: a template of every field in order (the varying ones as None,
        # their places kept), updated with its own values; no per-field __init__ work
        const, columns = self.const, self.columns
        tpl = {name: const.get(name) for name in FIELDS}
        names = [name for name in FIELDS if name in columns]
        new, cls = object.__new__, RequestRecord
        out: list[RequestRecord] = []
        append = out.append
        if not names:
            for _ in range(self._n):
                rec = new(cls)
                rec.__dict__.update(tpl)
                append(rec)
            return out
        for row in zip(*(columns[name] for name in names)):
            rec = new(cls)
            d = rec.__dict__
            d.update(tpl)
            d.update(zip(names, row))
            append(rec)
        return out

    def __repr__(self) -> str:
        return f"RecordBatch({self._n} records, {len(self.columns)} varying fields)"


def json_safe(obj: Any, digits: int | None = None) -> Any:
    """``obj`` with every NaN or infinite float (at any depth, in dicts, lists and tuples) as ``None``:
    JSON has neither, and a record or a sum read from an edited file may hold one. ``digits``:
    round every finite float to that many significant digits (a report's figures)."""
    if isinstance(obj, float):
        if not math.isfinite(obj):
            return None
        return obj if digits is None else float(f"{obj:.{digits}g}")
    if isinstance(obj, dict):
        return {k: json_safe(v, digits) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v, digits) for v in obj]
    return obj


def printable(text: Any) -> str:
    """``text`` as a terminal or a report may show it: each control character (an escape sequence that
    would recolour or rewrite a screen, a line break that would forge a row) as Python escapes it."""
    t = "" if text is None else str(text)
    return t if t.isprintable() else "".join(c if c.isprintable() else repr(c)[1:-1] for c in t)
