"""The labelled simulated power source: driven by reported activity, never mistaken for a sensor."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from wattspan import SampleKind
from wattspan.simulate import PowerModel
from wattspan.sources import PowerSource
from wattspan.sources.simulated import SimulatedSource

_MS = 1_000_000


class Clock:
    """A hand-advanced monotonic clock (ns)."""

    def __init__(self, t: int = 5_000 * _MS) -> None:
        self.t = t

    def __call__(self) -> int:
        return self.t


def collect(batches, device="gpu0"):
    inst = [b for b in batches if b.device == device and b.kind == SampleKind.INSTANT]
    energy = [b for b in batches if b.device == device and b.kind == SampleKind.ENERGY]
    cat = np.concatenate
    return (cat([b.t_ns for b in inst]), cat([b.value for b in inst]), cat([b.t_ns for b in energy]),
            cat([b.value for b in energy]))


def drive(src: SimulatedSource, clock: Clock, poll_every_ms: int, *, steps: int = 40):
    """One request with a 2048-token prefill step and decode steps of 32 tokens, then 300 ms idle."""
    out = []
    src.on_request_start("gpu0")
    for i in range(steps):
        start = clock.t + 500_000
        dur = 80 * _MS if i == 0 else 12 * _MS
        clock.t = start + dur
        src.on_step("gpu0", start, clock.t, 2048 if i == 0 else 32, 2048 if i == 0 else 0)
        if i % poll_every_ms == 0:
            out += src.poll()
    src.on_request_end("gpu0")
    for _ in range(30):
        clock.t += 10 * _MS
        out += src.poll()
    clock.t += src.delay_ns + _MS
    out += src.poll()
    return out


class TestLabelling:
    def test_is_a_power_source_labelled_simulated(self):
        src = SimulatedSource(devices=["gpu0", "gpu1"])
        assert isinstance(src, PowerSource) and src.name == "simulated" and src.errors == 0
        infos = src.devices()
        assert [d.id for d in infos] == ["gpu0", "gpu1"]
        for d in infos:
            assert d.sensor == "simulated" and d.simulated is True and d.name == "simulated GPU (no sensor)"
            assert d.kind == "gpu" and d.power_kind == SampleKind.INSTANT

    def test_bad_input_is_refused_clearly(self):
        src = SimulatedSource()
        with pytest.raises(ValueError, match=r"unknown device 'gpu7'.*\['gpu0'\]"):
            src.on_step("gpu7", 0, 1, 1)
        with pytest.raises(ValueError, match="end_ns"):
            src.on_step("gpu0", 10, 10, 1)
        with pytest.raises(ValueError, match="prefill_tokens"):
            src.on_step("gpu0", 0, 10, 4, 5)
        with pytest.raises(ValueError, match="distinct"):
            SimulatedSource(devices=["gpu0", "gpu0"])


class TestSignal:
    def test_power_follows_activity_and_energy_integrates_it(self):
        clock = Clock()
        pm = PowerModel()
        src = SimulatedSource(idle_w=70.0, power_model=pm, clock=clock)
        first = src.poll()  # starts the grid with one sample, delay_ns before now
        t0 = clock.t
        t, p, te, e = collect(first + drive(src, clock, poll_every_ms=3))
        assert np.array_equal(t, te) and np.all(np.diff(t) == _MS)
        assert t[-1] <= clock.t - src.delay_ns
        # energy: from 0, monotone, the rectangle rule of the power column
        assert e[0] == 0.0 and np.all(np.diff(e) > 0)
        assert np.allclose(np.diff(e), p[:-1] * 1e-3)
        # idle before, the prefill step's power during it, back to idle at the end
        assert len(first[0].t_ns) == 1 and p[:20].mean() == pytest.approx(70.0, abs=1.5)
        prefill_w = float(pm.step_dynamic_w(duration_s=0.08, prefill_tokens=2048, decode_tokens=0, idle_w=70.0))
        mid_prefill = p[(t > t0 + 40 * _MS) & (t < t0 + 80 * _MS)]  # the prefill step: t0 + 0.5 ms .. + 80.5 ms
        assert mid_prefill.mean() == pytest.approx(70.0 + prefill_w, rel=0.02)
        assert p[-50:].mean() == pytest.approx(70.0, abs=1.5)
        assert 1.0 < np.std(p[:20]) < 4.0  # labelled noise, not a flat line

    def test_deterministic_whatever_the_poll_cadence(self):
        runs = []
        for every, seed in ((1, 3), (7, 3), (5, 4)):
            clock = Clock()
            src = SimulatedSource(seed=seed, clock=clock)
            src.poll()
            runs.append(collect(drive(src, clock, poll_every_ms=every)))
        (t1, p1, _, e1), (t2, p2, _, e2), (t3, p3, _, _) = runs
        assert np.array_equal(t1, t2) and np.array_equal(p1, p2) and np.array_equal(e1, e2)
        assert np.array_equal(t1, t3) and not np.array_equal(p1, p3)

    def test_devices_are_independent(self):
        clock = Clock()
        src = SimulatedSource(devices=["gpu0", "gpu1"], clock=clock)
        src.poll()
        batches = drive(src, clock, poll_every_ms=2)
        _, p0, _, _ = collect(batches, "gpu0")
        _, p1, _, _ = collect(batches, "gpu1")
        assert p0.max() > 300 and p1.max() < 80

    def test_a_step_reported_too_late_is_counted(self):
        clock = Clock()
        src = SimulatedSource(clock=clock, delay_ns=10 * _MS)
        src.poll()
        start = clock.t
        clock.t += 200 * _MS
        src.poll()  # emits up to now - 10 ms
        src.on_step("gpu0", start + 20 * _MS, start + 40 * _MS, 32)
        clock.t += 20 * _MS
        src.poll()
        assert src.late_steps == 1


class TestConcurrency:
    def test_hooks_from_many_threads_while_polling(self):
        src = SimulatedSource(devices=["gpu0", "gpu1"], delay_ns=5 * _MS)
        stop = threading.Event()
        polled = []

        def poller():
            while not stop.is_set():
                polled.extend(src.poll())
                time.sleep(0.002)

        def worker(dev):
            for _ in range(200):
                src.on_request_start(dev)
                t = time.monotonic_ns()
                src.on_step(dev, t - 200_000, t, 8, 0)
                src.on_request_end(dev)

        pt = threading.Thread(target=poller)
        pt.start()
        workers = [threading.Thread(target=worker, args=(f"gpu{i % 2}",)) for i in range(6)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        time.sleep(0.03)
        stop.set()
        pt.join()
        polled.extend(src.poll())
        assert src.errors == 0 and src.dropped == 0
        for dev in ("gpu0", "gpu1"):
            t, p, _, e = collect(polled, dev)
            assert np.all(np.diff(t) == _MS) and np.all(np.diff(e) > 0) and np.all(p > 0)
        assert all(d.in_flight == 0 for d in src._devices.values())
