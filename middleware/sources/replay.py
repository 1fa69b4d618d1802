"""Replaying a recorded power trace onto the live monotonic clock.

A trace CSV has a header ``time_ns,gpu,power_w`` and optionally ``energy_j``:
``time_ns`` an integer of nanoseconds on the recording's own clock, ``gpu`` the
device (an index ``0`` becomes ``"gpu0"``, anything else is used as is),
``power_w`` the sensor's reading in watts at that time, ``energy_j`` a
cumulative energy counter in joules. Rows of several GPUs may be interleaved;
each GPU's rows must be in increasing time order.
"""

from __future__ import annotations

import itertools
import math
import operator
import os
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import numpy as np

from ..samples import COUNTER_MAX_W, DeviceInfo, DeviceTrace, SampleBatch, SampleKind, counter_leap, trace_times_problem
from ..devices import device_key
from ..errors import InputError

__all__ = ["ReplaySource", "read_trace_csv"]

_REQUIRED = ("time_ns", "gpu", "power_w")
_OPTIONAL = ("energy_j",)
_FORMAT = "time_ns,gpu,power_w[,energy_j]"
_INT64_MAX = 2**63 - 1
_count_commas = operator.methodcaller("count", ",")
_MAX_LAPS = 1000  # a poll that is further behind than this many laps jumps to the current one


# --------------------------------------------------------------------------- reading


def read_trace_csv(path: str | os.PathLike[str], *, power_kind: SampleKind = SampleKind.INSTANT, window_ns: int = 0) -> dict[str, DeviceTrace]:
    """Read and validate a trace CSV into one :class:`DeviceTrace` per device, in order of first appearance.

    ``power_kind``/``window_ns`` say what ``power_w`` means (default: INSTANT
    readings; use ``SampleKind.AVERAGE`` and the window in ns for, e.g.,
    ``nvidia-smi``'s ``power.draw`` on Hopper, a 1 s average).

    An empty ``power_w`` cell is allowed only on a row that has ``energy_j``;
    an empty ``energy_j`` cell means the counter was not read then.

    Raises :class:`wattspan.errors.InputError` naming the file and 1-based line
    (the header is line 1) for a missing or unknown column, a row with the wrong
    number of fields, a value that is not a number, a NaN/inf/negative reading,
    a timestamp that repeats or goes back in time for its GPU, or an energy
    counter that decreases. Parses about a million rows a second.
    """
    p = Path(path)
    try:
        raw = p.read_bytes()
    except OSError as exc:
        raise InputError(p, 0, f"cannot open: {exc.strerror or exc}") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise InputError(p, raw[: exc.start].count(b"\n") + 1, "is not UTF-8 text") from None
    del raw
    # lines end at LF, CRLF or a lone CR only (str.splitlines also breaks at a form feed, U+0085, U+2028...:
    # an error would then name the wrong line, and a cell holding one would split its row)
    lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    del text
    if not any(line.strip() for line in lines):
        raise InputError(p, 0, f"is empty: expected a header line {_FORMAT} and one row per reading")
    header = [h.strip() for h in lines[0].split(",")]
    ncols = len(header)
    _check_header(p, header)

    body = lines[1:]
    del lines
    counts = np.fromiter(map(_count_commas, body), dtype=np.int64, count=len(body))
    wrong = np.flatnonzero(counts != ncols - 1)
    lineno: np.ndarray | None = None  # line of each kept row, when blank lines were skipped
    if wrong.size:
        for i in wrong.tolist():
            if body[i].strip():
                raise InputError(p, i + 2, f"has {int(counts[i]) + 1} fields, the header has {ncols} ({','.join(header)})")
        keep = np.ones(len(body), dtype=bool)
        keep[wrong] = False
        lineno = np.flatnonzero(keep) + 2
        body = [body[i] for i in (lineno - 2).tolist()]
    n = len(body)
    if n == 0:
        raise InputError(p, 0, f"has a header but no rows: expected one row per reading ({_FORMAT})")

    def line_of(i: int) -> int:
        return int(lineno[i]) if lineno is not None else i + 2

    flat = ",".join(body).split(",")
    del body
    cols = {name: flat[j::ncols] for j, name in enumerate(header)}
    del flat

    t = _parse_times(p, cols["time_ns"], n, line_of)
    power, p_empty = _parse_floats(p, "power_w", cols["power_w"], n, line_of, allow_empty="energy_j" in cols)
    energy: np.ndarray | None = None
    e_empty: np.ndarray | None = None
    if "energy_j" in cols:
        energy, e_empty = _parse_floats(p, "energy_j", cols["energy_j"], n, line_of, allow_empty=True)
        if p_empty is not None:
            both = p_empty & e_empty if e_empty is not None else np.zeros(n, dtype=bool)
            if both.any():
                raise InputError(p, line_of(int(np.argmax(both))), "has neither power_w nor energy_j: every row needs a reading")

    # devices, in order of first appearance; "0", " 0" and "gpu0" are one device
    seen: dict[str, int] = {}
    first = np.fromiter(map(seen.setdefault, cols["gpu"], itertools.count()), dtype=np.int64, count=n)
    uniq_first = np.unique(first)
    names: dict[str, int] = {}
    remap = {}
    for f in uniq_first.tolist():
        name = device_key(cols["gpu"][f])
        if not name:
            raise InputError(p, line_of(f), "gpu is empty: name the device by index (0) or id (gpu0)")
        remap[f] = names.setdefault(name, len(names))
    dev_of_first = np.zeros(int(first.max()) + 1, dtype=np.int64)
    dev_of_first[uniq_first] = [remap[f] for f in uniq_first.tolist()]
    dev = dev_of_first[first]
    order = np.argsort(dev, kind="stable")
    bounds = np.concatenate(([0], np.cumsum(np.bincount(dev, minlength=len(names)))))

    out: dict[str, DeviceTrace] = {}
    problems: list[tuple[int, str]] = []
    for name, k in names.items():
        idx = order[bounds[k] : bounds[k + 1]]
        td = t[idx]
        step = np.diff(td)
        bad = np.flatnonzero(step <= 0)
        if bad.size:
            i, j = int(idx[bad[0] + 1]), int(idx[bad[0]])
            if td[bad[0] + 1] == td[bad[0]]:
                msg = f"duplicate time_ns {int(t[i])} for {name} (also on line {line_of(j)})"
            else:
                msg = (f"time_ns {int(t[i])} for {name} is before the previous reading of that device "
                       f"({int(t[j])} on line {line_of(j)}): sort each device's rows by time")
            problems.append((line_of(i), msg))
            continue
        far = trace_times_problem(td)
        if far is not None:
            i = int(idx[far[0]])
            problems.append((line_of(i), f"time_ns {int(t[i])} for {name}: {far[1]}"))
            continue
        ed: np.ndarray | None = None
        if energy is not None:
            ed = energy[idx]
            fin = np.flatnonzero(np.isfinite(ed))
            dec = np.flatnonzero(np.diff(ed[fin]) < 0)
            if dec.size:
                i, j = int(idx[fin[dec[0] + 1]]), int(idx[fin[dec[0]]])
                problems.append((line_of(i), f"energy_j {energy[i]:g} for {name} is less than the previous reading "
                                             f"({energy[j]:g} on line {line_of(j)}): energy_j must be a cumulative counter"))
                continue
            leap = counter_leap(td[fin], ed[fin])
            if leap is not None:
                k, rise, dt_s = leap
                i, j = int(idx[fin[k + 1]]), int(idx[fin[k]])
                problems.append((line_of(i), f"energy_j for {name} rises by {rise:g} J from line {line_of(j)} in {dt_s:.3g} s, "
                                             f"more than {COUNTER_MAX_W:g} W could draw: a unit error (mJ for J?) or "
                                             "a glitch; fix or drop the row"))
                continue
        pd: np.ndarray | None = power[idx]
        if not np.isfinite(power[idx]).any():
            pd = None
        out[name] = DeviceTrace(name, td, power_w=pd, energy_j=ed, power_kind=SampleKind(power_kind),
                                window_ns=int(window_ns), sensor=f"trace:{p.name}")
    if problems:
        line, msg = min(problems)
        raise InputError(p, line, msg)
    return out


def _check_header(p: Path, header: list[str]) -> None:
    seen = set()
    for h in header:
        if h in seen:
            raise InputError(p, 1, f"column {h!r} appears twice in the header (expected {_FORMAT})")
        seen.add(h)
    missing = [c for c in _REQUIRED if c not in seen]
    unknown = [h for h in header if h not in _REQUIRED and h not in _OPTIONAL]
    if missing or unknown:
        parts = []
        if missing:
            parts.append("missing column " + ", ".join(repr(c) for c in missing))
        if unknown:
            parts.append("unknown column " + ", ".join(repr(c) for c in unknown))
        raise InputError(p, 1, f"{'; '.join(parts)}: the header must be {_FORMAT} (found {','.join(header)!r})")


def _plain(p: Path, name: str, col: list[str], line_of: Callable[[int], int]) -> None:
    """Refuse what Python's int() and float() read but a CSV reader elsewhere would not (or would
    read otherwise): digit separators (``1_000``) and digits of other scripts (``١٢٣``)."""
    joined = "".join(col)
    if joined.isascii() and "_" not in joined:
        return
    for i, s in enumerate(col):
        if not s.isascii() or "_" in s:
            raise InputError(p, line_of(i), f"{name} {s.strip()!r} is not a plain number (ASCII digits, no '_')")


def _parse_times(p: Path, col: list[str], n: int, line_of: Callable[[int], int]) -> np.ndarray:
    _plain(p, "time_ns", col, line_of)
    try:
        t = np.fromiter(map(int, col), dtype=np.int64, count=n)
    except (ValueError, OverflowError):
        for i, s in enumerate(col):
            try:
                v = int(s)
            except ValueError:
                raise InputError(p, line_of(i), f"time_ns {s.strip()!r} is not an integer number of nanoseconds") from None
            if not -_INT64_MAX <= v <= _INT64_MAX:
                raise InputError(p, line_of(i), f"time_ns {v} is outside 0..2**63-1")
        raise  # pragma: no cover - the loop finds what fromiter refused
    neg = np.flatnonzero(t < 0)
    if neg.size:
        raise InputError(p, line_of(int(neg[0])), f"time_ns {int(t[neg[0]])} is negative: use nanoseconds from 0 or from an epoch")
    return t


#: the largest reading a trace may hold: far above any accelerator (about 1 kW today) or its
#: lifetime's energy, below what would overflow the arithmetic downstream
_MAX_READING = {"power_w": 1e6, "energy_j": 1e15}


def _parse_floats(p: Path, name: str, col: list[str], n: int, line_of: Callable[[int], int], *,
                  allow_empty: bool) -> tuple[np.ndarray, np.ndarray | None]:
    """Values (NaN where empty) and the mask of empty cells (None when there are none)."""
    _plain(p, name, col, line_of)
    empty: np.ndarray | None = None
    try:
        v = np.fromiter(map(float, col), dtype=np.float64, count=n)
    except ValueError:
        v = np.empty(n)
        empty = np.zeros(n, dtype=bool)
        for i, s in enumerate(col):
            try:
                v[i] = float(s)
            except ValueError:
                if s.strip():
                    raise InputError(p, line_of(i), f"{name} {s.strip()!r} is not a number") from None
                if not allow_empty:
                    raise InputError(p, line_of(i), f"{name} is empty: every row needs a reading "
                                                    "(or add an energy_j column for counter-only rows)") from None
                v[i] = math.nan
                empty[i] = True
    bad = ~np.isfinite(v) | (v < 0)
    if empty is not None:
        bad &= ~empty
    if bad.any():
        i = int(np.argmax(bad))
        x = v[i]
        what = "NaN" if math.isnan(x) else ("inf" if x > 0 else "-inf") if math.isinf(x) else f"negative ({x:g})"
        hint = " (leave the cell empty when the counter was not read)" if name == "energy_j" and math.isnan(x) else ""
        raise InputError(p, line_of(i), f"{name} is {what}{hint}")
    big = v > _MAX_READING.get(name, math.inf)
    if big.any():
        i = int(np.argmax(big))
        raise InputError(p, line_of(i), f"{name} is {v[i]:g}, above the plausible {_MAX_READING[name]:g} (check the unit: watts, joules)")
    return v, empty


# --------------------------------------------------------------------------- replaying


class _Track:
    """One device's trace on the replay clock: times relative to the trace start, ns."""

    __slots__ = ("info", "rel", "power", "energy", "lap", "i", "energy_per_lap", "power_finite", "energy_finite")

    def __init__(self, info: DeviceInfo, rel: np.ndarray, power: np.ndarray | None, energy: np.ndarray | None,
                 energy_per_lap: float) -> None:
        self.info = info
        self.rel = rel
        self.power = power
        self.energy = energy
        self.lap = 0
        self.i = 0
        self.energy_per_lap = energy_per_lap
        #: every reading finite: a poll's batch needs no mask (and power and energy share one time array)
        self.power_finite = power is None or bool(np.isfinite(power).all())
        self.energy_finite = energy is None or bool(np.isfinite(energy).all())


class ReplaySource:
    """A :class:`~wattspan.sources.PowerSource` that plays recorded traces back in real time.

    ``path_or_traces``: a trace CSV path (see :func:`read_trace_csv`), a
    :class:`DeviceTrace`, a mapping ``{device: DeviceTrace}`` or an iterable of
    traces. The earliest reading of all traces is put at the replay's start
    (the first :meth:`poll`, or :meth:`start`), and each poll returns the
    readings whose trace time, divided by ``speed``, has elapsed since then,
    on ``time.monotonic_ns()``'s clock. With ``loop=True`` the traces repeat
    without end (one median sampling step between laps, the energy counter
    carried on), otherwise :attr:`done` turns true after the last reading.
    """

    name = "replay"
    #: its readings carry the trace's (or grid's) own times and every one since the last poll comes back:
    #: the sampler may poll it this rarely (seconds) and get the same readings (see wattspan.sampler.Sampler)
    poll_every_s = 0.5  # the meter's default period: a pass finds the readings of the last poll at most a period old

    def __init__(self, path_or_traces: str | os.PathLike[str] | DeviceTrace | Mapping[str, DeviceTrace] | Iterable[DeviceTrace],
                 *, speed: float = 1.0, loop: bool = False) -> None:
        if not (isinstance(speed, (int, float)) and math.isfinite(speed) and speed > 0):
            raise ValueError(f"ReplaySource speed must be a finite number > 0 (1.0 = real time), got {speed!r}")
        origin = ""
        if isinstance(path_or_traces, (str, os.PathLike)):
            origin = Path(path_or_traces).name
            traces = read_trace_csv(path_or_traces)
        elif isinstance(path_or_traces, DeviceTrace):
            traces = {path_or_traces.device: path_or_traces}
        elif isinstance(path_or_traces, Mapping):
            traces = dict(path_or_traces)
        elif isinstance(path_or_traces, Iterable):
            traces = {}
            for tr in path_or_traces:
                if not isinstance(tr, DeviceTrace):
                    raise TypeError(f"ReplaySource: expected DeviceTrace objects, got {type(tr).__name__}")
                if tr.device in traces:
                    raise ValueError(f"ReplaySource: two traces for device {tr.device!r}")
                traces[tr.device] = tr
        else:
            raise TypeError("ReplaySource needs a trace CSV path, a DeviceTrace, a {device: DeviceTrace} mapping or a list of traces")
        if not traces:
            raise ValueError("ReplaySource: no traces to replay")
        for dev, tr in traces.items():
            if not isinstance(tr, DeviceTrace):
                raise TypeError(f"ReplaySource: trace for {dev!r} is a {type(tr).__name__}, not a DeviceTrace")
            if len(tr) == 0:
                raise ValueError(f"ReplaySource: trace {dev!r} has no readings")

        self.speed = float(speed)
        self.loop = bool(loop)
        self.errors = 0
        self.skipped_laps = 0
        self._lock = threading.Lock()
        self._start_ns: int | None = None
        t0 = min(int(tr.t_ns[0]) for tr in traces.values())
        t1 = max(int(tr.t_ns[-1]) for tr in traces.values())
        steps = [float(np.median(np.diff(tr.t_ns))) for tr in traces.values() if len(tr) > 1]
        gap = max(1, int(min(steps))) if steps else 1_000_000
        self.period_ns = (t1 - t0) + gap  # one lap of the trace clock
        self._tracks: list[_Track] = []
        for dev, tr in traces.items():
            rel = tr.t_ns - t0
            per_lap = 0.0
            if tr.energy_j is not None:
                fin = np.flatnonzero(np.isfinite(tr.energy_j))
                if fin.size >= 2:
                    a, b = fin[0], fin[-1]
                    e_span = float(tr.energy_j[b] - tr.energy_j[a])
                    t_span = float(tr.t_ns[b] - tr.t_ns[a])
                    per_lap = e_span + (e_span / t_span) * (self.period_ns - t_span) if t_span > 0 else e_span
            info = DeviceInfo(
                id=dev,
                name=f"replayed trace {origin}".rstrip() if origin else "replayed trace",
                kind=_kind_of(dev),
                sensor=f"replay:{tr.sensor or origin or 'trace'}",
                simulated=tr.simulated,
                power_kind=tr.power_kind,
                window_ns=tr.window_ns,
                extra={"rows": len(tr), "speed": self.speed, "loop": self.loop, "trace_start_ns": int(tr.t_ns[0])},
            )
            self._tracks.append(_Track(info, rel, tr.power_w, tr.energy_j, per_lap))

    @property
    def start_ns(self) -> int | None:
        """Monotonic time the trace's first reading is mapped to (None before the first poll)."""
        return self._start_ns

    @property
    def done(self) -> bool:
        """True once every reading has been returned (never, with ``loop=True``)."""
        return not self.loop and all(tr.i >= tr.rel.shape[0] for tr in self._tracks)

    def start(self, at_ns: int | None = None) -> None:
        """Anchor the replay: the trace's earliest reading plays at ``at_ns`` (default now)."""
        with self._lock:
            self._start_ns = time.monotonic_ns() if at_ns is None else int(at_ns)

    def devices(self) -> list[DeviceInfo]:
        return [tr.info for tr in self._tracks]

    def poll(self) -> list[SampleBatch]:
        """The readings due since the previous poll."""
        now = time.monotonic_ns()
        with self._lock:
            if self._start_ns is None:
                self._start_ns = now
            start = self._start_ns
            elapsed = now - start
            if elapsed < 0:
                return []
            due = elapsed if self.speed == 1.0 else int(elapsed * self.speed)  # trace ns since the start
            out: list[SampleBatch] = []
            for tr in self._tracks:
                try:
                    out.extend(self._due(tr, start, due))
                except Exception:  # a poll never raises
                    self.errors += 1
            return out

    def close(self) -> None:
        with self._lock:
            for tr in self._tracks:
                tr.i = tr.rel.shape[0]
                tr.lap = 0
            self.loop = False

    # ------------------------------------------------------------------ internals

    def _due(self, tr: _Track, start: int, due: int) -> list[SampleBatch]:
        n = tr.rel.shape[0]
        parts_t: list[np.ndarray] = []
        parts_p: list[np.ndarray] = []
        parts_e: list[np.ndarray] = []
        if self.loop and due // self.period_ns - tr.lap > _MAX_LAPS:  # far behind (a huge speed): skip laps
            tr.lap, tr.i = due // self.period_ns - 1, 0
            self.skipped_laps += 1
        while True:
            base = tr.lap * self.period_ns
            k = int(np.searchsorted(tr.rel, due - base, side="right"))
            if k > tr.i:
                sl = slice(tr.i, k)
                parts_t.append(tr.rel[sl] + base)
                if tr.power is not None:
                    parts_p.append(tr.power[sl])
                if tr.energy is not None:
                    parts_e.append(tr.energy[sl] + tr.lap * tr.energy_per_lap)
                tr.i = k
            if tr.i >= n and self.loop and due >= base + self.period_ns:
                tr.lap += 1
                tr.i = 0
                continue
            break
        if not parts_t:
            return []
        # one stretch of one lap, as a rule: no concatenation; every reading finite: no masks, and the power and the
        # energy batch share one time array (the sampler then merges them without comparing their times)
        rel = parts_t[0] if len(parts_t) == 1 else np.concatenate(parts_t)  # a fresh array either way
        if self.speed == 1.0:
            rel += start
            t = rel
        else:
            t = (rel.astype(np.float64) / self.speed).astype(np.int64) + start
        info = tr.info
        out = []
        if tr.power is not None:
            p = parts_p[0].copy() if len(parts_p) == 1 else np.concatenate(parts_p)  # never a view of the trace
            if tr.power_finite:
                out.append(SampleBatch(info.id, info.power_kind, t, p, info.window_ns))
            else:
                ok = np.isfinite(p)
                if ok.any():
                    out.append(SampleBatch(info.id, info.power_kind, t[ok], p[ok], info.window_ns))
        if tr.energy is not None:
            e = parts_e[0] if len(parts_e) == 1 else np.concatenate(parts_e)
            if tr.energy_finite:
                out.append(SampleBatch(info.id, SampleKind.ENERGY, t, e))
            else:
                ok = np.isfinite(e)
                if ok.any():
                    out.append(SampleBatch(info.id, SampleKind.ENERGY, t[ok], e[ok]))
        return out


def _kind_of(device: str) -> str:
    if device.startswith("cpu"):
        return "dram" if device.endswith("dram") else "cpu"
    return "gpu"
