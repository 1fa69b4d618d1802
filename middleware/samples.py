"""Power samples: what a reading is, and a bounded columnar store of them.

Every timestamp inside wattspan is an ``int`` of nanoseconds on one monotonic
clock (``time.monotonic_ns()`` in a live process, the trace's own clock in a
replay). Conversion to wall time happens at the edges only.
"""

from __future__ import annotations

import enum
import threading
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = ["SampleKind", "SampleBatch", "DeviceInfo", "DeviceTrace", "RingBuffer"]


class SampleKind(str, enum.Enum):
    """What one reading means.

    ``INSTANT``: power in watts at the sample's time (as the sensor saw it; real
    "instant" sensors may average over a few ms, or cover part of each period).
    ``AVERAGE``: mean power in watts over the ``window_ns`` that ends at the
    sample's time (e.g. ``nvmlDeviceGetPowerUsage`` on Hopper: a 1 s window).
    ``ENERGY``: a cumulative energy counter in joules (NVML's total energy, RAPL's
    ``energy_uj``), already unwrapped, so differences are energy.
    """

    INSTANT = "instant"
    AVERAGE = "average"
    ENERGY = "energy"


@dataclass(frozen=True)
class SampleBatch:
    """Readings of one kind from one device: ``t_ns`` (int64, monotonic) and ``value``
    (float64: watts for INSTANT/AVERAGE, cumulative joules for ENERGY)."""

    device: str
    kind: SampleKind
    t_ns: np.ndarray
    value: np.ndarray
    window_ns: int = 0

    def __post_init__(self) -> None:
        if self.t_ns.shape != self.value.shape:
            raise ValueError(
                f"SampleBatch for {self.device!r}: t_ns has shape {self.t_ns.shape}, "
                f"value has shape {self.value.shape}; they must match"
            )


@dataclass(frozen=True)
class DeviceInfo:
    """A metered device.

    ``id`` is the key used everywhere else (``"gpu0"``, ``"cpu0-package"``);
    ``sensor`` says which reading was chosen and why it is trusted
    (``"nvml:energy-counter"``, ``"rapl:energy_uj"``, ``"simulated"``).
    ``power_kind``/``window_ns`` say what the source's power readings mean
    (INSTANT, or AVERAGE over ``window_ns``); energy readings are always ENERGY.
    """

    id: str
    name: str
    kind: str = "gpu"  # gpu | cpu | dram
    sensor: str = ""
    simulated: bool = False
    power_kind: SampleKind = SampleKind.INSTANT
    window_ns: int = 0
    extra: dict[str, Any] = field(default_factory=dict, compare=False)


_SPAN_LIMIT_NS = 1 << 60  # a trace's first to last reading, at most (36 years): attribution tags times in two low bits
_NS_PER_YEAR = 365.25 * 86400e9


def trace_times_problem(t_ns: np.ndarray) -> tuple[int, str] | None:
    """``(index, why)`` of the first of a device's increasing reading times that cannot be one
    clock's nanoseconds of one run: more than 2^60 ns (36 years) after the first reading (any
    clock up to 2^63 - 1 ns is fine); ``None`` where all can."""
    if not len(t_ns) or int(t_ns[-1]) - int(t_ns[0]) <= _SPAN_LIMIT_NS:
        return None
    lo = int(t_ns[0])
    i = int(np.searchsorted(t_ns, lo + _SPAN_LIMIT_NS, side="right"))
    return i, f"is {(int(t_ns[i]) - lo) / _NS_PER_YEAR:.3g} years after the first reading ({lo}): not nanoseconds of one clock"


@dataclass
class DeviceTrace:
    """All readings of one device over a period, ready for attribution.

    ``t_ns`` is strictly increasing. ``power_w`` holds INSTANT or AVERAGE readings
    (``power_kind`` says which, ``window_ns`` the averaging window) or is ``None``;
    ``energy_j`` holds the cumulative counter at the same timestamps, NaN where
    the counter was not read, or is ``None``.
    """

    device: str
    t_ns: np.ndarray
    power_w: np.ndarray | None = None
    energy_j: np.ndarray | None = None
    power_kind: SampleKind = SampleKind.INSTANT
    window_ns: int = 0
    sensor: str = ""
    simulated: bool = False

    def __post_init__(self) -> None:
        self.t_ns = np.asarray(self.t_ns, dtype=np.int64)
        n = self.t_ns.shape[0]
        if self.power_w is not None:
            self.power_w = np.asarray(self.power_w, dtype=np.float64)
            if self.power_w.shape[0] != n:
                raise ValueError(f"trace {self.device!r}: power_w has {self.power_w.shape[0]} values for {n} timestamps")
        if self.energy_j is not None:
            self.energy_j = np.asarray(self.energy_j, dtype=np.float64)
            if self.energy_j.shape[0] != n:
                raise ValueError(f"trace {self.device!r}: energy_j has {self.energy_j.shape[0]} values for {n} timestamps")
            if np.all(np.isnan(self.energy_j)):
                self.energy_j = None
        if self.power_w is None and self.energy_j is None:
            raise ValueError(f"trace {self.device!r} has neither power nor energy readings")
        if n and np.any(np.diff(self.t_ns) <= 0):
            raise ValueError(f"trace {self.device!r}: timestamps must be strictly increasing")
        far = trace_times_problem(self.t_ns)
        if far is not None:
            raise ValueError(f"trace {self.device!r}: time_ns {int(self.t_ns[far[0]])}: {far[1]}")
        if self.power_kind == SampleKind.AVERAGE and self.window_ns <= 0:
            raise ValueError(f"trace {self.device!r}: AVERAGE readings need window_ns > 0")

    def __len__(self) -> int:
        return int(self.t_ns.shape[0])


class RingBuffer:
    """A bounded, thread-safe columnar buffer of one device's readings.

    Three preallocated numpy columns (time, power, energy) of ``capacity`` rows:
    memory is ``capacity * 24`` bytes whatever the run length. When full, the
    oldest rows are overwritten and counted in ``dropped``.
    """

    __slots__ = ("capacity", "_t", "_p", "_e", "_n", "_head", "_lock", "dropped")

    def __init__(self, capacity: int = 1 << 16) -> None:
        if capacity < 2:
            raise ValueError("RingBuffer capacity must be at least 2")
        self.capacity = int(capacity)
        self._t = np.zeros(self.capacity, dtype=np.int64)
        self._p = np.full(self.capacity, np.nan)
        self._e = np.full(self.capacity, np.nan)
        self._n = 0  # rows held
        self._head = 0  # next write position
        self._lock = threading.Lock()
        self.dropped = 0

    @property
    def nbytes(self) -> int:
        return self._t.nbytes + self._p.nbytes + self._e.nbytes

    def __len__(self) -> int:
        return self._n

    def extend(self, t_ns: np.ndarray, power_w: np.ndarray | None = None, energy_j: np.ndarray | None = None) -> None:
        """Append readings (already in time order, after what is held)."""
        t_ns = np.asarray(t_ns, dtype=np.int64)
        k = t_ns.shape[0]
        if k == 0:
            return
        p = np.full(k, np.nan) if power_w is None else np.asarray(power_w, dtype=np.float64)
        e = np.full(k, np.nan) if energy_j is None else np.asarray(energy_j, dtype=np.float64)
        with self._lock:
            if k > self.capacity:
                self.dropped += k - self.capacity
                t_ns, p, e, k = t_ns[-self.capacity :], p[-self.capacity :], e[-self.capacity :], self.capacity
            h, cap = self._head, self.capacity
            first = min(k, cap - h)  # up to the ring's end, then the rest from its start (slices, no index array)
            self._t[h : h + first] = t_ns[:first]
            self._p[h : h + first] = p[:first]
            self._e[h : h + first] = e[:first]
            if first < k:
                self._t[: k - first] = t_ns[first:]
                self._p[: k - first] = p[first:]
                self._e[: k - first] = e[first:]
            self._head = (h + k) % cap
            over = self._n + k - self.capacity
            if over > 0:
                self.dropped += over
            self._n = min(self.capacity, self._n + k)

    def append(self, t_ns: int, power_w: float = np.nan, energy_j: float = np.nan) -> None:
        """Append one reading (the sampler's fast path: no temporary arrays)."""
        with self._lock:
            h = self._head
            self._t[h] = t_ns
            self._p[h] = power_w
            self._e[h] = energy_j
            self._head = (h + 1) % self.capacity
            if self._n == self.capacity:
                self.dropped += 1
            else:
                self._n += 1

    def snapshot(self, since_ns: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Copies of the held rows in time order, optionally only those at or after ``since_ns``.

        Only the rows asked for are copied: the held rows are at most two time-ordered runs
        of the ring, searched for ``since_ns`` before anything is copied.
        """
        with self._lock:
            n, cap = self._n, self.capacity
            start = (self._head - n) % cap
            end = start + n
            runs = [(start, end)] if end <= cap else [(start, cap), (0, end - cap)]
            if since_ns is not None:
                kept: list[tuple[int, int]] = []
                for a, b in runs:
                    if not kept:  # every row of a later run is newer than the first kept one
                        a += int(np.searchsorted(self._t[a:b], since_ns, side="left"))
                    if a < b:
                        kept.append((a, b))
                runs = kept
            if len(runs) == 1:
                a, b = runs[0]
                return self._t[a:b].copy(), self._p[a:b].copy(), self._e[a:b].copy()
            if not runs:
                return np.empty(0, dtype=np.int64), np.empty(0), np.empty(0)
            return tuple(np.concatenate([col[a:b] for a, b in runs]) for col in (self._t, self._p, self._e))  # type: ignore[return-value]

    def last_time(self) -> int | None:
        with self._lock:
            if self._n == 0:
                return None
            return int(self._t[(self._head - 1) % self.capacity])


#: an energy counter rising faster than this (with a second's slack for a counter refreshed less often than
#: it is read) is a glitch or a unit error, not a draw: a megawatt, about a thousand of today's boards
COUNTER_MAX_W = 1e6


def counter_leap(t_ns: np.ndarray, energy_j: np.ndarray) -> tuple[int, float, float] | None:
    """The first rise of a cumulative counter (finite, non-decreasing readings ``energy_j`` at ``t_ns``)
    that no board could draw: more than :data:`COUNTER_MAX_W` over the time since the counter last moved
    plus a second. ``(k, rise in J, seconds)`` for the rise from reading ``k`` to ``k + 1``, or None."""
    if energy_j.shape[0] < 2:
        return None
    d = np.diff(energy_j)
    moved = np.flatnonzero(d > 0)
    if not moved.size:
        return None
    t = t_ns.astype(np.float64)
    since = t[np.concatenate(([0], moved[:-1] + 1))]  # where each rise's counter last moved (or the first reading)
    dt_s = (t[moved + 1] - since) * 1e-9
    bad = np.flatnonzero(d[moved] > COUNTER_MAX_W * (dt_s + 1.0))
    if not bad.size:
        return None
    k = int(moved[bad[0]])
    return k, float(d[k]), float(dt_s[bad[0]])
