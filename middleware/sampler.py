"""The one background thread that polls every power source into per-device ring buffers.

Sources are polled only from this thread (never from an asyncio event loop),
every ``interval_s``; a source whose readings carry their own times on a grid of
its own (a replayed trace, the simulator, a driver's sample buffer) says so with
``poll_every_s`` and is polled that rarely instead, which gives the same readings
with fewer wakeups (see :class:`Sampler`). Each device's readings go into a :class:`RingBuffer`:
one row per timestamp, NaN in the column (power or energy) that a reading
lacks; rows that do not move time forward for their device are rejected, so
:meth:`Sampler.trace` always gives strictly increasing timestamps. What a source
gets wrong is counted and logged once, never stored as it came: a reading stamped
more than a minute ahead of the monotonic clock, or with no finite value, is
refused; negative watts are stored as 0 W; an energy counter that goes back is
carried on from its last value (see :meth:`Sampler.health`).
"""

from __future__ import annotations

import math
import os
import threading
import time
import weakref
from collections.abc import Iterable
from typing import Any, cast

import numpy as np

from .logs import LogOnce, get_logger
from .samples import COUNTER_MAX_W, DeviceInfo, DeviceTrace, RingBuffer, SampleBatch, SampleKind
from .sources._base import PowerSource

__all__ = ["Sampler"]

log = get_logger(__name__)

_ENERGY = SampleKind.ENERGY
_isfinite = math.isfinite
#: seconds between polls of a source that times its own readings while the sampler is idle (Sampler.set_idle)
IDLE_EVERY_S = 1.0
_IDLE_EVERY_NS = int(IDLE_EVERY_S * 1e9)


#: a reading stamped further ahead of time.monotonic_ns() than this is refused (a source on another clock, the
#: wall clock's ns: stored, it would have shut out every later reading as "not after it")
MAX_AHEAD_NS = 60 * 1_000_000_000


class _Device:
    __slots__ = ("info", "buf", "last_t", "rejected", "clamped", "e_last", "e_offset", "resets", "jumps")

    def __init__(self, info: DeviceInfo, capacity: int) -> None:
        self.info = info
        self.buf = RingBuffer(capacity)
        self.last_t = -(2**63)
        self.rejected = 0  # rows that did not move time forward, were stamped far ahead, or had no finite reading
        self.clamped = 0  # negative power readings stored as 0 W
        self.e_last = -math.inf  # the last counter value stored (J, carried on over resets)
        self.e_offset = 0.0  # added to the source's counter: what it lost going back
        self.resets = 0  # times the counter went back
        self.jumps = 0  # times it leapt further than any board draws (COUNTER_MAX_W)


def _ahead(st: "_State", src_name: str, dev: _Device, t: int) -> None:
    st.once.warning((src_name, "ahead", dev.info.id), "wattspan: source %s stamped a reading of %s %.3g s ahead of "
                    "time.monotonic_ns() (timestamps must be on that clock); such readings are refused (counted in "
                    "health()['rejected_rows']; logged once)", src_name, dev.info.id, (t - time.monotonic_ns()) / 1e9)


def _counter(st: "_State", src_name: str, dev: _Device, v: float, t: int) -> float:
    """One counter reading to store: carried on from the last one where the source's counter went back
    or leapt (see :data:`COUNTER_MAX_W`)."""
    v += dev.e_offset
    if v < dev.e_last:
        _reset(st, src_name, dev, 1, dev.e_last - v)
        v = dev.e_last
    elif dev.e_last > -math.inf and v - dev.e_last > COUNTER_MAX_W * ((t - dev.last_t) * 1e-9 + 1.0):
        _jump(st, src_name, dev, 1, v - dev.e_last)
        v = dev.e_last
    dev.e_last = v
    return v


def _jump(st: "_State", src_name: str, dev: _Device, k: int, leapt: float) -> None:
    dev.e_offset -= leapt
    dev.jumps += k
    st.once.warning((src_name, "jump", dev.info.id), "wattspan: the energy counter of %s (source %s) leapt by %g J, "
                    "more than %g W could draw in the interval (a glitch?); it is carried on from its last value, the "
                    "interval counted as 0 J (counted in health()['counter_jumps']; logged once)", dev.info.id, src_name,
                    leapt, COUNTER_MAX_W)


def _reset(st: "_State", src_name: str, dev: _Device, k: int, lost: float) -> None:
    dev.e_offset += lost
    dev.resets += k
    st.once.warning((src_name, "reset", dev.info.id), "wattspan: the energy counter of %s (source %s) went back by %g J "
                    "(a driver reset?); it is carried on from its last value, the interval counted as 0 J (counted in "
                    "health()['counter_resets']; logged once)", dev.info.id, src_name, lost)


def _clamp(st: "_State", src_name: str, dev: _Device, k: int, v: float) -> None:
    """``k`` negative power readings of ``dev`` (the first ``v`` W) are stored as 0 W: counted, logged once per device."""
    dev.clamped += k
    st.once.warning((src_name, "negative", dev.info.id), "wattspan: source %s gave negative power for %s (%g W); "
                    "such readings are stored as 0 W (counted in health()['clamped_rows']; logged once)", src_name, dev.info.id, v)


def _implausible(st: "_State", src_name: str, dev: _Device, k: int, v: float, count: bool = True) -> None:
    """``k`` power readings of ``dev`` above any board's draw (:data:`COUNTER_MAX_W`; the first ``v`` W: NVML's
    "not available" sentinel, 4.29 MW, read as milliwatts) are no reading: counted, logged once per device."""
    if count:  # (a row left with no finite value is counted where rows are taken)
        dev.rejected += k
    st.once.warning((src_name, "implausible", dev.info.id), "wattspan: source %s gave %g W for %s, more than any board "
                    "draws; such readings are left out (counted in health()['rejected_rows']; logged once)", src_name, v, dev.info.id)


class _State:
    """Everything the thread touches; the thread holds this, never the Sampler, so the
    Sampler can be garbage-collected (its finaliser then stops the thread)."""

    def __init__(self, sources: list[PowerSource], names: list[str], devices: dict[str, _Device], interval_ns: int,
                 every_ns: list[int] | None = None) -> None:
        self.sources = sources
        self.names = names
        self.devices = devices
        self.interval_ns = interval_ns
        #: per source: poll it every this many ns (interval_ns, or the source's own poll_every_s when longer)
        self.every_ns = every_ns if every_ns is not None else [interval_ns] * len(sources)
        #: the thread's wakeup period: the shortest of the sources' periods
        self.tick_ns = min(self.every_ns)
        #: while idle (Sampler.set_idle): a source that times its own readings is polled every IDLE_EVERY_S at most
        own = [e > interval_ns for e in self.every_ns]
        self.idle_every_ns = [max(e, _IDLE_EVERY_NS) if o else e for e, o in zip(self.every_ns, own)]
        self.idle_tick_ns = min(self.idle_every_ns)
        self.idle = False
        self.kick = False  # leaving idle: poll every source at once
        self.due_ns = [0] * len(sources)  # per source: monotonic ns of its next poll (0: at once)
        self.pid = os.getpid()
        self.stop = threading.Event()
        self.wake = threading.Event()  # set with stop, and to end an idle wait early
        self.thread: threading.Thread | None = None
        self.lock = threading.Lock()  # start/stop/close
        self.close_sources = False
        self.sources_closed = False
        self.closed = False
        self.polls = 0
        self.overruns = 0
        self.poll_errors = dict.fromkeys(names, 0)
        self.once = LogOnce(log, max_keys=1000)  # bounds the memory a flood of distinct messages can take
        self.cost_sum_ns = 0
        self.cost_max_ns = 0
        self.cpu_sum_ns = 0
        self.last_poll_ns: int | None = None


_Rows = tuple[np.ndarray, "np.ndarray | None", "np.ndarray | None"]


def _rows(batches: list[SampleBatch]) -> _Rows:
    """Merge one device's batches into time-ordered rows ``(t, power, energy)``, one row per timestamp."""
    if len(batches) == 1:
        b = batches[0]
        t = b.t_ns
        if t.shape[0] < 2 or (np.diff(t) > 0).all():
            v = b.value
            return (t, None, v) if b.kind is _ENERGY else (t, v, None)
    elif len(batches) == 2:
        a, b = batches
        if (a.kind is _ENERGY) != (b.kind is _ENERGY) and (a.t_ns is b.t_ns or np.array_equal(a.t_ns, b.t_ns)):
            t = a.t_ns
            if t.shape[0] < 2 or (np.diff(t) > 0).all():
                return (t, b.value, a.value) if a.kind is _ENERGY else (t, a.value, b.value)
    t_all = np.concatenate([np.asarray(b.t_ns, dtype=np.int64) for b in batches])
    t, inv = np.unique(t_all, return_inverse=True)
    p = np.full(t.shape[0], np.nan)
    e = np.full(t.shape[0], np.nan)
    i = 0
    for b in batches:
        k = b.t_ns.shape[0]
        (e if b.kind is _ENERGY else p)[inv[i : i + k]] = b.value
        i += k
    return t, p, e


def _ingest(st: _State, src_name: str, batches: list[SampleBatch]) -> None:
    horizon = time.monotonic_ns() + MAX_AHEAD_NS
    groups: dict[str, list[SampleBatch]]
    if len(batches) == 1:
        groups = {batches[0].device: batches}
    else:
        groups = {}
        for b in batches:
            groups.setdefault(b.device, []).append(b)
    for device, bs in groups.items():
        dev = st.devices.get(device)
        if dev is None:
            st.poll_errors[src_name] += 1
            st.once.warning((src_name, "unknown", device), "wattspan: source %s returned readings for %r, which its "
                      "devices() does not list; ignored", src_name, device)
            continue
        if all(b.t_ns.shape[0] == 1 for b in bs):  # the common case: one reading of each kind
            if len(bs) == 1:
                b = bs[0]
                t = int(b.t_ns[0])
                v = float(b.value[0])
                if t <= dev.last_t or not _isfinite(v) or t > horizon:
                    if t > horizon:
                        _ahead(st, src_name, dev, t)
                    dev.rejected += 1
                    continue
                if b.kind is _ENERGY:
                    dev.buf.append(t, math.nan, _counter(st, src_name, dev, v, t))
                else:
                    if v < 0.0:
                        _clamp(st, src_name, dev, 1, v)
                        v = 0.0
                    elif v > COUNTER_MAX_W:
                        _implausible(st, src_name, dev, 1, v)
                        continue
                    dev.buf.append(t, v, math.nan)
                dev.last_t = t
                continue
            rows: dict[int, list[float]] = {}
            for b in bs:
                v = float(b.value[0])
                if not _isfinite(v):
                    dev.rejected += 1
                    continue
                if v < 0.0 and b.kind is not _ENERGY:
                    _clamp(st, src_name, dev, 1, v)
                    v = 0.0
                elif v > COUNTER_MAX_W and b.kind is not _ENERGY:
                    _implausible(st, src_name, dev, 1, v)  # as a non-finite value: the row keeps its counter
                    continue
                r = rows.setdefault(int(b.t_ns[0]), [math.nan, math.nan])
                r[1 if b.kind is _ENERGY else 0] = v
            for t in sorted(rows):
                if t <= dev.last_t or t > horizon:
                    if t > horizon:
                        _ahead(st, src_name, dev, t)
                    dev.rejected += 1
                    continue
                p, e = rows[t]
                if e == e:
                    e = _counter(st, src_name, dev, e, t)
                dev.buf.append(t, p, e)
                dev.last_t = t
            continue
        ts, ps, es = _rows(bs)
        # inf is no reading (NaN: the row may still hold the other kind); negative watts are stored as 0 W
        if ps is not None:
            if np.isinf(ps).any():
                ps = np.where(np.isinf(ps), np.nan, ps)
            neg = ps < 0
            if neg.any():
                _clamp(st, src_name, dev, int(np.count_nonzero(neg)), float(ps[np.argmax(neg)]))
                ps = np.where(neg, 0.0, ps)
            over = ps > COUNTER_MAX_W
            if over.any():
                _implausible(st, src_name, dev, int(np.count_nonzero(over)), float(ps[np.argmax(over)]), count=False)
                ps = np.where(over, np.nan, ps)
        if es is not None and np.isinf(es).any():
            es = np.where(np.isinf(es), np.nan, es)
        if ps is not None and es is not None:
            ok = np.isfinite(ps) | np.isfinite(es)
        else:
            col = ps if ps is not None else es
            assert col is not None  # _rows gives a power or an energy column, or both
            ok = np.isfinite(col)
        ok &= ts > dev.last_t
        if ts.shape[0] and ts[-1] > horizon:
            _ahead(st, src_name, dev, int(ts[-1]))
            ok &= ts <= horizon
        if not ok.all():
            dev.rejected += int(ok.shape[0] - np.count_nonzero(ok))
            ts = ts[ok]
            ps = None if ps is None else ps[ok]
            es = None if es is None else es[ok]
        if es is not None and ts.shape[0]:
            es = _counters(st, src_name, dev, ts, es)
        if ts.shape[0]:
            dev.buf.extend(ts, ps, es)
            dev.last_t = int(ts[-1])


def _counters(st: _State, src_name: str, dev: _Device, ts: np.ndarray, es: np.ndarray) -> np.ndarray:
    """A batch's counter column (NaN: not read) to store: carried on wherever the source's counter went back."""
    fin = np.flatnonzero(np.isfinite(es))
    if not fin.size:
        return es
    v = es[fin] + dev.e_offset
    rise = v - np.concatenate(([dev.e_last], v[:-1]))  # each reading's change (the first's: +inf if none before)
    drop = np.maximum(-rise, 0.0)  # what each reading lost (0: none)
    t = ts[fin].astype(np.float64)
    slack_s = (t - np.concatenate(([float(dev.last_t)], t[:-1]))) * 1e-9 + 1.0
    leap = np.where(np.isfinite(rise) & (rise > COUNTER_MAX_W * slack_s), rise, 0.0)  # glitches forward (0: none)
    back = int(np.count_nonzero(drop))
    ahead = int(np.count_nonzero(leap))
    if back or ahead or dev.e_offset:
        if back or ahead:
            fix = np.cumsum(drop - leap)
            v = v + fix
            if back:
                _reset(st, src_name, dev, back, float(drop.sum()))
            if ahead:
                _jump(st, src_name, dev, ahead, float(leap.sum()))
        es = es.copy()
        es[fin] = v
    dev.e_last = float(v[-1])
    return es


def _check_info(src_name: str, info: Any) -> None:
    """A device a source lists, checked where it enters: ``TypeError``/``ValueError`` naming the source (one
    the sampler cannot serve would fail every trace of it later, far from the cause)."""
    if not isinstance(info, DeviceInfo):
        raise TypeError(f"source {src_name} listed {info!r} among its devices(); each must be a DeviceInfo")
    if not isinstance(info.id, str) or not info.id:
        raise ValueError(f"source {src_name} listed a device whose id is {info.id!r}; an id is a non-empty string like 'gpu0'")
    if info.power_kind == SampleKind.AVERAGE and not info.window_ns > 0:
        raise ValueError(f"source {src_name}: device {info.id!r} gives AVERAGE power readings, which need window_ns > 0 "
                         f"(the averaging window), got {info.window_ns!r}")


def _poll_once(st: _State, now_ns: int | None = None) -> None:
    """Poll every source once (``now_ns`` None), or only those due at ``now_ns`` (the thread's ticks)."""
    w0 = time.perf_counter_ns()
    c0 = time.thread_time_ns()
    every, tick = (st.idle_every_ns, st.idle_tick_ns) if st.idle else (st.every_ns, st.tick_ns)
    for i, (src, name) in enumerate(zip(st.sources, st.names)):
        if now_ns is not None:
            if now_ns < st.due_ns[i]:
                continue
            # its next poll a period on, less half a tick: it lands on the tick nearest its period
            st.due_ns[i] = now_ns + every[i] - tick // 2
        try:
            batches = src.poll()
        except Exception as exc:
            st.poll_errors[name] += 1
            st.once.warning((name, type(exc).__name__, str(exc)), "wattspan: polling %s failed: %s: %s "
                      "(counted in health()['poll_errors']; logged once)", name, type(exc).__name__, exc)
            continue
        if not batches:
            continue
        try:
            _ingest(st, name, batches)
        except Exception as exc:  # a malformed batch from a buggy source
            st.poll_errors[name] += 1
            st.once.warning((name, "ingest", type(exc).__name__, str(exc)), "wattspan: readings from %s could not "
                      "be stored: %s: %s", name, type(exc).__name__, exc)
    cost = time.perf_counter_ns() - w0
    st.cpu_sum_ns += time.thread_time_ns() - c0
    st.cost_sum_ns += cost
    if cost > st.cost_max_ns:
        st.cost_max_ns = cost
    st.polls += 1
    st.last_poll_ns = time.monotonic_ns()


def _run(st: _State) -> None:
    next_t = time.monotonic_ns()
    try:
        while True:
            if st.kick:  # out of idle: every source is due now
                st.kick = False
                st.due_ns = [0] * len(st.sources)
            try:
                _poll_once(st, time.monotonic_ns())
            except Exception:  # never let the thread die
                log.exception("wattspan: sampler poll failed")
            interval = st.idle_tick_ns if st.idle else st.tick_ns
            next_t += interval
            now = time.monotonic_ns()
            if next_t <= now:  # the poll overran: skip the missed ticks rather than catch up
                st.overruns += 1
                next_t = now + interval
            if st.wake.wait((next_t - now) / 1e9):
                st.wake.clear()  # before the look at stop: a stop() after it sets wake again, never lost
                if st.stop.is_set():
                    break
                next_t = time.monotonic_ns()  # woken (out of idle): poll now, ticks from here
    finally:
        if st.close_sources:
            _close_sources(st)


def _close_sources(st: _State) -> None:
    with st.lock:
        if st.sources_closed:
            return
        st.sources_closed = True
    for src, name in zip(st.sources, st.names):
        try:
            src.close()
        except Exception as exc:
            log.warning("wattspan: closing %s failed: %s: %s", name, type(exc).__name__, exc)


def _shutdown(st: _State, timeout: float) -> bool:
    """Stop the thread and close the sources (from the thread, so that NVML is only ever
    called from there). True when both are done within ``timeout`` seconds."""
    if st.pid != os.getpid():  # a forked child: the thread is not here, the drivers belong to the parent
        st.closed = True
        return True
    with st.lock:
        st.closed = True
        st.close_sources = True
        th = st.thread
        st.stop.set()
        st.wake.set()
    if th is not None and th.is_alive() and th is not threading.current_thread():
        th.join(timeout)
        if th.is_alive():
            log.warning("wattspan: the sampler thread did not stop within %.1f s (a source is blocking)", timeout)
            return False
    _close_sources(st)  # no-op when the thread already did it
    return True


class Sampler:
    """Polls ``sources`` every ``interval_s`` seconds from one daemon thread.

    Each device keeps its last ``capacity`` readings in a :class:`RingBuffer`
    (24 bytes a row: 1.5 MiB per device for the default 65536 rows, which is
    about 11 minutes at 100 Hz or 65 s at 1 kHz). The thread never keeps the
    interpreter alive: it is a daemon, and a finaliser stops it and closes the
    sources when the Sampler is garbage-collected or at exit.

    A source whose ``poll()`` raises is logged once per distinct error, counted
    in ``health()["poll_errors"]``, and polled again next time.

    ``interval_s`` is the sampling interval of the sources that read a sensor
    when polled (RAPL, NVML's instant power): each poll is one reading. A source
    with a ``poll_every_s`` attribute (seconds, > ``interval_s``) times its own
    readings on a grid of its own and returns every reading since the last poll
    (the replayed trace, the simulator's 1 ms grid, NVML's sample buffer), so it is
    polled only every ``poll_every_s``: the same readings, from fewer wakeups. The
    thread wakes at the shortest period among its sources (``health()["tick_s"]``).
    """

    def __init__(self, sources: PowerSource | Iterable[PowerSource], *, interval_s: float = 0.01, capacity: int = 65536) -> None:
        if not (isinstance(interval_s, (int, float)) and math.isfinite(interval_s) and interval_s > 0):
            raise ValueError(f"Sampler interval_s must be a number of seconds > 0, got {interval_s!r}")
        if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 2:
            raise ValueError(f"Sampler capacity must be an integer >= 2 rows, got {capacity!r}")
        srcs: list[PowerSource]
        if hasattr(sources, "poll"):
            srcs = [cast(PowerSource, sources)]  # duck-typed: checked method by method below
        elif isinstance(sources, Iterable):
            srcs = list(sources)
        else:
            raise TypeError("Sampler needs a power source or a list of them")
        if not srcs:
            raise ValueError("Sampler needs at least one power source")
        names: list[str] = []
        devices: dict[str, _Device] = {}
        for src in srcs:
            for attr in ("poll", "devices", "close"):
                if not callable(getattr(src, attr, None)):
                    raise TypeError(f"{src!r} is not a power source: it has no {attr}() method")
            base = str(getattr(src, "name", type(src).__name__))
            name, k = base, 2
            while name in names:
                name, k = f"{base}#{k}", k + 1
            names.append(name)
            for info in src.devices():
                _check_info(name, info)
                if info.id in devices:
                    raise ValueError(f"device {info.id!r} is metered by two sources ({devices[info.id].info.sensor} "
                                     f"and {info.sensor}): give each source distinct devices")
                devices[info.id] = _Device(info, capacity)
        self.sources: tuple[PowerSource, ...] = tuple(srcs)
        self.interval_s = float(interval_s)
        self.capacity = int(capacity)
        interval_ns = max(1, int(round(interval_s * 1e9)))
        every_ns = []
        for src in srcs:
            own = getattr(src, "poll_every_s", None)
            every = interval_ns
            if isinstance(own, (int, float)) and not isinstance(own, bool) and math.isfinite(own) and own > 0:
                every = max(interval_ns, int(round(own * 1e9)))
            every_ns.append(every)
        self._st = _State(srcs, names, devices, interval_ns, every_ns)
        self._finalizer = weakref.finalize(self, _shutdown, self._st, 1.0)

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> "Sampler":
        """Start the thread (no-op if running). Returns self."""
        st = self._st
        if st.pid != os.getpid():
            raise RuntimeError("this Sampler was created in the parent process: after fork, create a new one "
                               "(wattspan.defaults.get_default_sampler() does)")
        with st.lock:
            if st.closed:
                raise RuntimeError("Sampler is closed: create a new one")
            if st.thread is not None and st.thread.is_alive():
                return self
            st.stop.clear()
            st.wake.clear()
            st.thread = threading.Thread(target=_run, args=(st,), name="wattspan-sampler", daemon=True)
            st.thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> bool:
        """Stop polling (the sources stay open; :meth:`start` resumes). True if the thread ended in time."""
        st = self._st
        with st.lock:
            th = st.thread
            st.stop.set()
            st.wake.set()
        if th is None or th is threading.current_thread():
            return True
        th.join(timeout)
        return not th.is_alive()

    def close(self, timeout: float = 5.0) -> bool:
        """Stop the thread and close every source (idempotent). True if done within ``timeout`` s."""
        return _shutdown(self._st, timeout)

    @property
    def running(self) -> bool:
        th = self._st.thread
        return th is not None and th.is_alive() and not self._st.stop.is_set()

    @property
    def closed(self) -> bool:
        return self._st.closed

    def __enter__(self) -> "Sampler":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ reading

    def devices(self) -> list[DeviceInfo]:
        """Every metered device, in source order."""
        return [d.info for d in self._st.devices.values()]

    def _device(self, device: str) -> _Device:
        try:
            return self._st.devices[device]
        except KeyError:
            raise KeyError(f"unknown device {device!r}: this sampler meters {list(self._st.devices)}") from None

    def trace(self, device: str, since_ns: int | None = None) -> DeviceTrace:
        """A copy of ``device``'s held readings (at or after ``since_ns``, monotonic ns).

        ``power_w`` is ``None`` when the device only gives energy; NaN marks a row
        without that reading. Kind, window, sensor and simulated come from its DeviceInfo.
        """
        d = self._device(device)
        t, p, e = d.buf.snapshot(since_ns)
        power: np.ndarray | None = p
        if t.shape[0] and not np.isfinite(p).any() and np.isfinite(e).any():
            power = None
        info = d.info
        return DeviceTrace(device, t, power_w=power, energy_j=e, power_kind=info.power_kind,
                           window_ns=info.window_ns, sensor=info.sensor, simulated=info.simulated)

    def latest_ns(self, device: str) -> int | None:
        """Time of ``device``'s newest reading (monotonic ns), or None before the first."""
        return self._device(device).buf.last_time()

    def set_idle(self, idle: bool) -> None:
        """Whether fresh readings are wanted (the meter says so: nothing in flight). While idle, a
        source that times its own readings (``poll_every_s``) is polled every ``IDLE_EVERY_S``
        (1 s) at most: the same readings, arriving later, from fewer wakeups. Sources read when
        polled (RAPL, NVML's instant power) keep ``interval_s``. ``set_idle(False)`` polls every
        source at once."""
        st = self._st
        idle = bool(idle)
        if idle == st.idle:
            return
        st.idle = idle
        if not idle:
            st.kick = True
            st.wake.set()

    def poll_now(self) -> None:
        """Poll every source once in the calling thread (for tests and tools; not while running)."""
        if self.running:
            raise RuntimeError("poll_now() is for a stopped sampler; the thread is polling")
        _poll_once(self._st)

    def health(self) -> dict[str, Any]:
        """Counters: ``running``, ``interval_s``, ``polls``, ``overruns`` (polls that took longer
        than the interval), ``poll_errors`` and ``source_errors`` (the sources' own ``errors``) per
        source, per device ``rows``, ``dropped_rows`` (overwritten when the buffer was full) and
        ``rejected_rows`` (not after the previous reading, stamped more than ``MAX_AHEAD_NS`` ahead of the
        monotonic clock, or no finite value), ``clamped_rows`` (negative watts, stored as 0 W),
        ``counter_resets`` (times the energy counter went back: it is carried on from its last value),
        ``counter_jumps`` (times it leapt further than :data:`COUNTER_MAX_W` could draw: carried on likewise), ``poll_cost_mean_us``/``poll_cost_max_us``
        (wall time of a poll), ``poll_cpu_mean_us`` (CPU time of a poll), and ``last_poll_age_s``."""
        st = self._st
        n = st.polls
        last = st.last_poll_ns
        return {
            "running": self.running,
            "interval_s": self.interval_s,
            "tick_s": (st.idle_tick_ns if st.idle else st.tick_ns) / 1e9,
            "idle": st.idle,
            "polls": n,
            "overruns": st.overruns,
            "poll_errors": dict(st.poll_errors),
            "source_errors": {name: int(getattr(s, "errors", 0)) for s, name in zip(st.sources, st.names)},
            "rows": {k: len(d.buf) for k, d in st.devices.items()},
            "dropped_rows": {k: d.buf.dropped for k, d in st.devices.items()},
            "rejected_rows": {k: d.rejected for k, d in st.devices.items()},
            "clamped_rows": {k: d.clamped for k, d in st.devices.items()},
            "counter_resets": {k: d.resets for k, d in st.devices.items()},
            "counter_jumps": {k: d.jumps for k, d in st.devices.items()},
            "poll_cost_mean_us": st.cost_sum_ns / n / 1e3 if n else 0.0,
            "poll_cost_max_us": st.cost_max_ns / 1e3,
            "poll_cpu_mean_us": st.cpu_sum_ns / n / 1e3 if n else 0.0,
            "last_poll_age_s": (time.monotonic_ns() - last) / 1e9 if last is not None else None,
        }


# --------------------------------------------------------------------------- the process's sampler
