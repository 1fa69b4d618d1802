"""The background sampler: one thread, per-device ring buffers, errors counted not raised."""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import subprocess
import sys
import textwrap
import threading
import time
import warnings
from collections import deque
from pathlib import Path

import numpy as np
import pytest

from tests.fakes import A100_TRACE
from wattspan import DeviceInfo, SampleBatch, SampleKind
from wattspan import defaults
from wattspan.defaults import get_default_sampler
from wattspan.sampler import Sampler
from wattspan.sources.replay import ReplaySource

REPO = Path(__file__).resolve().parents[1]
I, A, E = SampleKind.INSTANT, SampleKind.AVERAGE, SampleKind.ENERGY


def batch(dev, kind, t, v, window_ns=0):
    return SampleBatch(dev, kind, np.asarray(t, dtype=np.int64), np.asarray(v, dtype=np.float64), window_ns)


class ScriptedSource:
    """A real, in-memory PowerSource: each poll returns the next scripted list of batches
    (or raises it, if it is an exception), and records which thread called it."""

    def __init__(self, infos, script=(), name="scripted"):
        self.name = name
        self.errors = 0
        self._infos = list(infos)
        self.script = deque(script)
        self.poll_threads: set[str] = set()
        self.close_threads: list[str] = []

    def devices(self):
        return list(self._infos)

    def poll(self):
        self.poll_threads.add(threading.current_thread().name)
        if not self.script:
            return []
        item = self.script.popleft()
        if isinstance(item, BaseException):
            raise item
        return item

    def close(self):
        self.close_threads.append(threading.current_thread().name)


class TickSource:
    """One INSTANT reading of ``device`` per poll at the poll's own time (like NVML power usage)."""

    def __init__(self, device="gpu0", name="tick", kind=I, window_ns=0):
        self.name = name
        self.errors = 0
        self.info = DeviceInfo(device, "tick", power_kind=kind, window_ns=window_ns, sensor="tick")
        self.closed = 0
        self.poll_threads: set[int] = set()

    def devices(self):
        return [self.info]

    def poll(self):
        self.poll_threads.add(threading.get_ident())
        return [batch(self.info.id, self.info.power_kind, [time.monotonic_ns()], [100.0], self.info.window_ns)]

    def close(self):
        self.closed += 1


def wait_for(cond, timeout=5.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.005)
    return False


# --------------------------------------------------------------------------- merging readings


def test_power_and_energy_rows_merge_by_timestamp():
    info = DeviceInfo("gpu0", "g", sensor="test")
    src = ScriptedSource([info], [
        # same timestamps for both kinds (one row each), then different ones (interleaved rows)
        [batch("gpu0", I, [10, 20], [100, 110]), batch("gpu0", E, [10, 20], [1.0, 2.0])],
        [batch("gpu0", E, [25], [2.5]), batch("gpu0", I, [30], [120])],
        [batch("gpu0", I, [40, 50, 60], [130, 140, 150]), batch("gpu0", E, [50], [4.0])],
    ])
    s = Sampler(src)
    for _ in range(3):
        s.poll_now()
    tr = s.trace("gpu0")
    assert tr.t_ns.tolist() == [10, 20, 25, 30, 40, 50, 60]
    assert np.array_equal(tr.power_w, [100, 110, np.nan, 120, 130, 140, 150], equal_nan=True)
    assert np.array_equal(tr.energy_j, [1, 2, 2.5, np.nan, np.nan, 4, np.nan], equal_nan=True)
    assert tr.sensor == "test" and tr.power_kind == I
    assert s.latest_ns("gpu0") == 60
    assert s.trace("gpu0", since_ns=30).t_ns.tolist() == [30, 40, 50, 60]
    s.close()


def test_readings_that_do_not_move_time_forward_are_rejected():
    info = DeviceInfo("gpu0", "g")
    src = ScriptedSource([info], [
        [batch("gpu0", I, [100], [1.0])],
        [batch("gpu0", I, [100], [2.0])],           # a repeat
        [batch("gpu0", I, [50, 150], [3.0, 4.0])],  # half late
        [batch("gpu0", I, [160], [np.nan])],        # not a reading
        [batch("gpu0", I, [180, 170], [6.0, 5.0])],  # out of order within a batch: sorted
    ])
    s = Sampler(src)
    for _ in range(5):
        s.poll_now()
    tr = s.trace("gpu0")
    assert tr.t_ns.tolist() == [100, 150, 170, 180]
    assert tr.power_w.tolist() == [1.0, 4.0, 5.0, 6.0]
    assert s.health()["rejected_rows"] == {"gpu0": 3}


def test_energy_only_device_trace_has_no_power_column():
    info = DeviceInfo("cpu0-package", "rapl", kind="cpu", sensor="rapl:energy_uj")
    src = ScriptedSource([info], [[batch("cpu0-package", E, [i], [i * 0.5])] for i in range(1, 6)])
    s = Sampler(src)
    for _ in range(5):
        s.poll_now()
    tr = s.trace("cpu0-package")
    assert tr.power_w is None and tr.energy_j.tolist() == [0.5, 1.0, 1.5, 2.0, 2.5]


def test_average_kind_and_window_come_from_the_device_info():
    s = Sampler(TickSource(kind=A, window_ns=1_000_000_000))
    s.poll_now()
    s.poll_now()
    tr = s.trace("gpu0")
    assert tr.power_kind == A and tr.window_ns == 1_000_000_000 and len(tr) == 2


def test_capacity_keeps_the_newest_rows_and_counts_the_dropped():
    info = DeviceInfo("gpu0", "g")
    src = ScriptedSource([info], [[batch("gpu0", I, np.arange(i * 10, i * 10 + 10), np.arange(10.0))] for i in range(4)])
    s = Sampler(src, capacity=16)
    for _ in range(4):
        s.poll_now()
    tr = s.trace("gpu0")
    assert tr.t_ns.tolist() == list(range(24, 40))
    assert s.health()["dropped_rows"] == {"gpu0": 24}


def test_empty_trace_before_any_reading():
    s = Sampler(TickSource())
    tr = s.trace("gpu0")
    assert len(tr) == 0 and s.latest_ns("gpu0") is None
    with pytest.raises(KeyError, match="unknown device 'gpu9'"):
        s.trace("gpu9")


# --------------------------------------------------------------------------- the thread


def test_thread_polls_at_the_interval_and_reports_health():
    src = TickSource()
    with Sampler(src, interval_s=0.01) as s:
        assert s.running
        assert wait_for(lambda: s.health()["polls"] >= 20)
        h = s.health()
    assert src.poll_threads and threading.get_ident() not in src.poll_threads
    assert h["running"] and h["rows"]["gpu0"] >= 20 and h["poll_errors"] == {"tick": 0}
    assert 0 < h["poll_cost_mean_us"] <= h["poll_cost_max_us"]
    assert 0 <= h["last_poll_age_s"] < 1.0
    t = s.trace("gpu0").t_ns
    gaps = np.diff(t) / 1e6
    assert np.median(gaps) == pytest.approx(10, abs=4)  # ms, on 2 loaded cores
    assert src.closed == 1 and not s.running


def test_a_raising_source_is_logged_once_per_error_and_the_thread_goes_on(caplog):
    caplog.set_level(logging.WARNING, logger="wattspan")
    bad = ScriptedSource([DeviceInfo("gpu1", "flaky")],
                         [RuntimeError("driver hiccup")] * 5 + [ValueError("other")] * 3 + [[batch("gpu1", I, [1], [5.0])]],
                         name="flaky")
    good = TickSource()
    s = Sampler([bad, good], interval_s=0.005).start()
    try:
        assert wait_for(lambda: s.latest_ns("gpu1") is not None)
        assert wait_for(lambda: len(s.trace("gpu0")) >= 10)
    finally:
        s.close()
    h = s.health()
    assert h["poll_errors"] == {"flaky": 8, "tick": 0}
    msgs = [r.getMessage() for r in caplog.records if "polling flaky failed" in r.getMessage()]
    assert len(msgs) == 2 and "driver hiccup" in msgs[0] and "other" in msgs[1]


def test_readings_for_an_unlisted_device_are_counted_as_errors():
    src = ScriptedSource([DeviceInfo("gpu0", "g")], [[batch("gpu7", I, [1], [5.0]), batch("gpu0", I, [1], [5.0])]])
    s = Sampler(src)
    s.poll_now()
    assert s.health()["poll_errors"] == {"scripted": 1}
    assert len(s.trace("gpu0")) == 1


def test_close_closes_sources_once_from_the_sampler_thread():
    src = ScriptedSource([DeviceInfo("gpu0", "g")])
    s = Sampler(src, interval_s=0.005).start()
    assert wait_for(lambda: bool(src.poll_threads))
    assert s.close() and s.close()
    assert src.close_threads == ["wattspan-sampler"]
    assert src.poll_threads == {"wattspan-sampler"}
    with pytest.raises(RuntimeError, match="closed"):
        s.start()


def test_stop_and_restart():
    src = TickSource()
    s = Sampler(src, interval_s=0.005).start()
    assert wait_for(lambda: s.health()["polls"] >= 3)
    assert s.stop() and not s.running
    n = s.health()["polls"]
    time.sleep(0.03)
    assert s.health()["polls"] == n and src.closed == 0
    s.start()
    assert wait_for(lambda: s.health()["polls"] > n)
    s.close()
    assert src.closed == 1


def test_never_polls_from_an_asyncio_event_loop_thread():
    src = TickSource()

    async def serve():
        loop_thread = threading.get_ident()
        s = Sampler(src, interval_s=0.002).start()
        await asyncio.sleep(0.1)
        s.close()
        return loop_thread

    loop_thread = asyncio.run(serve())
    assert src.poll_threads and loop_thread not in src.poll_threads


def test_garbage_collected_sampler_stops_its_thread_and_closes_sources():
    src = TickSource()
    s = Sampler(src, interval_s=0.005).start()
    st = s._st  # the thread's state: it does not refer back to the Sampler
    assert wait_for(lambda: st.polls >= 2)
    th = st.thread
    del s
    gc.collect()
    th.join(2.0)
    assert not th.is_alive() and src.closed == 1


def test_does_not_keep_the_interpreter_alive(tmp_path):
    code = textwrap.dedent(
        """
        import time
        from wattspan import DeviceInfo
        from wattspan.sampler import Sampler

        class Slow:
            name, errors = "slow", 0
            def devices(self): return [DeviceInfo("gpu0", "slow")]
            def poll(self): time.sleep(0.05); return []
            def close(self): print("closed", flush=True)

        s = Sampler(Slow(), interval_s=0.01).start()
        time.sleep(0.1)
        print("leaving", flush=True)
        """
    )
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=30)
    took = time.monotonic() - t0
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["leaving", "closed"]  # closed by the finaliser at exit
    assert took < 10


def test_validation():
    with pytest.raises(ValueError, match="interval_s"):
        Sampler(TickSource(), interval_s=0)
    with pytest.raises(ValueError, match="capacity"):
        Sampler(TickSource(), capacity=1)
    with pytest.raises(ValueError, match="at least one"):
        Sampler([])
    with pytest.raises(TypeError, match="not a power source"):
        Sampler([object()])
    with pytest.raises(ValueError, match="metered by two sources"):
        Sampler([TickSource(), TickSource()])


def test_duplicate_source_names_are_told_apart():
    s = Sampler([TickSource("gpu0"), TickSource("gpu1")])
    s.poll_now()
    assert s.health()["poll_errors"] == {"tick": 0, "tick#2": 0}


def test_replayed_trace_end_to_end():
    # the real ReplaySource: the recorded A100 readings land in the buffer in order
    src = ReplaySource(A100_TRACE, speed=20.0)
    with Sampler(src, interval_s=0.005) as s:
        assert wait_for(lambda: src.done, timeout=5)
        s.stop()
        tr = s.trace("gpu0")
    raw = np.loadtxt(A100_TRACE, delimiter=",", skiprows=1, usecols=(0, 2))
    assert np.array_equal(tr.power_w, raw[:, 1])
    assert np.all(np.diff(tr.t_ns) > 0)
    assert tr.sensor == "replay:trace:a100_power_instant.csv"


# --------------------------------------------------------------------------- the process's sampler


@pytest.fixture
def fresh_default():
    defaults._reset_after_fork()  # as a new process would start
    yield
    if defaults._sampler is not None:
        defaults._sampler.close()
    defaults._reset_after_fork()


def test_default_sampler_is_one_per_process(fresh_default):
    src = TickSource()
    a = get_default_sampler(sources=[src], interval_s=0.005)
    assert a.running
    assert get_default_sampler() is a
    assert get_default_sampler(sources=[src], interval_s=0.005) is a
    with pytest.raises(ValueError, match="already exists"):
        get_default_sampler(interval_s=0.5)
    # many threads asking at once still get one sampler
    got = []
    ths = [threading.Thread(target=lambda: got.append(get_default_sampler())) for _ in range(8)]
    for th in ths:
        th.start()
    for th in ths:
        th.join()
    assert all(g is a for g in got)
    a.close()
    b = get_default_sampler(sources=[TickSource()], interval_s=0.005)
    assert b is not a  # a closed default is replaced


def test_forked_child_gets_its_own_default_sampler(fresh_default):
    parent = get_default_sampler(sources=[TickSource()], interval_s=0.005)
    r, w = os.pipe()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # fork() with threads, Python >= 3.12
        pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        code = 1
        try:
            os.close(r)
            reset = defaults._sampler is None
            child = get_default_sampler(sources=[TickSource()], interval_s=0.005)
            polled = wait_for(lambda: child.health()["polls"] >= 3, timeout=5)
            try:
                parent.start()
                refused = False
            except RuntimeError:
                refused = True
            child.close()
            os.write(w, f"{reset} {child is not parent} {polled} {refused}".encode())
            code = 0
        finally:
            os._exit(code)
    os.close(w)
    out = os.read(r, 1000).decode()
    os.close(r)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert out == "True True True True"
    assert parent.running  # the parent's sampler is untouched


class _Counting:
    """A source that counts its polls (readings: none needed here)."""

    def __init__(self, name, device, poll_every_s=None):
        self.name, self.errors, self.polls = name, 0, 0
        self._info = DeviceInfo(id=device, name=name, kind="gpu", sensor="test")
        if poll_every_s is not None:
            self.poll_every_s = poll_every_s

    def devices(self):
        return [self._info]

    def poll(self):
        self.polls += 1
        return []

    def close(self):
        pass


def test_a_source_with_its_own_grid_is_polled_at_its_own_period():
    """poll_every_s: the thread ticks at the shortest period; a slower source is polled only when due."""
    from wattspan import sampler as S

    fast, slow = _Counting("fast", "gpu0"), _Counting("slow", "gpu1", poll_every_s=0.05)
    s = Sampler([fast, slow], interval_s=0.01)
    st = s._st
    assert st.tick_ns == 10_000_000 and st.every_ns == [10_000_000, 50_000_000]
    for k in range(100):  # one simulated second of ticks, 10 ms apart
        S._poll_once(st, 1_000_000_000 + k * 10_000_000)
    assert fast.polls == 100
    assert slow.polls == 20
    assert s.health()["tick_s"] == 0.01
    # every source slower than interval_s: the thread wakes at the fastest of them
    only_slow = Sampler([_Counting("a", "gpu0", poll_every_s=0.1), _Counting("b", "gpu1", poll_every_s=0.2)], interval_s=0.01)
    assert only_slow._st.tick_ns == 100_000_000
    # a bad or shorter poll_every_s falls back to interval_s
    odd = Sampler([_Counting("c", "gpu0", poll_every_s=float("nan")), _Counting("d", "gpu1", poll_every_s=0.001)], interval_s=0.01)
    assert odd._st.every_ns == [10_000_000, 10_000_000]
    s.close(); only_slow.close(); odd.close()


def test_an_idle_sampler_polls_self_timed_sources_rarely_and_set_idle_false_polls_at_once():
    """set_idle(True): a source with its own grid (poll_every_s) is polled every IDLE_EVERY_S; one read when
    polled keeps interval_s. set_idle(False): the thread wakes and polls every source at once."""
    from wattspan import sampler as S

    fast, slow = _Counting("fast", "gpu0"), _Counting("slow", "gpu1", poll_every_s=0.05)
    s = Sampler([fast, slow], interval_s=0.01)
    st = s._st
    s.set_idle(True)
    assert s.health()["idle"] and st.idle_every_ns == [10_000_000, S._IDLE_EVERY_NS]
    for k in range(300):  # three simulated seconds of 10 ms ticks
        S._poll_once(st, 1_000_000_000 + k * 10_000_000)
    assert fast.polls == 300 and slow.polls == 3
    s.close()

    only_own = _Counting("own", "gpu0", poll_every_s=0.05)
    s = Sampler([only_own], interval_s=0.01)
    s.set_idle(True)
    s.start()
    try:
        deadline = time.monotonic() + 10
        while only_own.polls < 1 and time.monotonic() < deadline:  # the first poll comes at once
            time.sleep(0.01)
        n = only_own.polls
        assert s.health()["tick_s"] == S.IDLE_EVERY_S
        s.set_idle(False)  # woken: polled again (at once rather than at the next idle tick)
        while only_own.polls == n and time.monotonic() < deadline:
            time.sleep(0.005)
        assert only_own.polls > n and not s.health()["idle"]
    finally:
        s.close()


def test_a_stop_arriving_while_the_thread_handles_a_wake_is_not_lost():
    """set_idle(False) wakes the thread; a stop() landing between the thread's look at ``stop`` and its
    ``wake.clear()`` (forced here: the clear runs the stop first) must still end the thread."""
    src = _Counting("own", "gpu0", poll_every_s=0.05)
    s = Sampler([src], interval_s=0.01)
    st = s._st
    raced = threading.Event()

    class RacyWake(threading.Event):
        def clear(self) -> None:
            if st.kick and not raced.is_set():  # the wake of set_idle(False): stop() arrives right now
                raced.set()
                st.stop.set()
                threading.Event.set(self)
            super().clear()

    st.wake = RacyWake()
    s.set_idle(True)
    s.start()
    try:
        deadline = time.monotonic() + 10
        while src.polls < 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        s.set_idle(False)
        assert raced.wait(10)
        th = st.thread
        assert th is not None
        th.join(5)  # idle ticks are 1 s: a thread that missed the stop keeps polling
        assert not th.is_alive(), "the sampler thread missed a stop that came with a wake"
    finally:
        s.close()
