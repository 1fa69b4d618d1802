"""The live Meter: bounded delay, lost sensors, overflow, sinks, and the batch-step split."""

from __future__ import annotations

import time

import numpy as np
import pytest

from wattspan import DeviceTrace, Meter
from wattspan.carbon import CarbonModel
from wattspan.sources.replay import ReplaySource
from wattspan.meter import RecordCallback
from wattspan.testing import metered

from .conftest import constant_trace

MS = 1_000_000


def make_meter(trace=None, **kw):
    records, seen_at = [], {}

    def sink(rec):
        records.append(rec)
        seen_at[rec.id] = time.monotonic_ns()

    kw.setdefault("idle_w", 40.0)
    kw.setdefault("period_s", 0.05)
    m = Meter(sources=[ReplaySource([trace or constant_trace(100.0)], loop=True)], carbon=CarbonModel(intensity_g_per_kwh=400.0), sinks=[RecordCallback(sink)], **kw)
    assert not m.sinks or kw.get("autostart") is False or m.wait_ready(30)
    return m, records, seen_at


def test_records_are_final_within_a_bounded_delay_and_steps_split_by_tokens():
    m, records, seen_at = make_meter(lag_s=0.1)
    try:
        t0 = time.monotonic_ns()
        m.begin("a", "gpu0", t0)
        m.begin("b", "gpu0", t0)
        for k in range(20):  # 20 steps of 10 ms, 3 tokens for a and 1 for b
            s = t0 + k * 20 * MS
            m.record_step(s, s + 10 * MS, "gpu0", {"a": 3, "b": 1})
        time.sleep(0.45)
        t1 = time.monotonic_ns()
        m.end("a", "gpu0", t1, {"route": "/x"})
        m.end("b", "gpu0", t1, {"route": "/x"})
        assert m.flush(5)
    finally:
        m.close()
    a, b = sorted(records, key=lambda r: r.id)
    assert max(seen_at[a.id], seen_at[b.id]) - t1 < 1.5e9  # lag 0.1 s + a pass or two
    assert a.idle_j == pytest.approx(b.idle_j, rel=1e-6)  # idle shared equally
    assert a.dynamic_j > 2.0 * b.dynamic_j  # steps split 3:1, gaps shared equally
    total = a.energy_j + b.energy_j
    assert total == pytest.approx(100.0 * (t1 - t0) / 1e9, rel=0.05)
    assert a.co2e_g == pytest.approx(a.energy_j / 3.6e6 * 400.0)
    assert a.method == "batch-fit"


def test_a_lost_sensor_does_not_hold_records_back_for_ever():
    t = np.arange(0, 300 * MS, 5 * MS, dtype=np.int64)  # 0.3 s of trace, then nothing
    short = DeviceTrace("gpu0", t, np.full(len(t), 100.0), sensor="short")
    m, records, _ = make_meter(short, max_delay_s=0.5, lag_s=0.05)
    m.sampler.sources[0].__dict__["loop"] = False
    try:
        time.sleep(0.1)
        start = time.monotonic_ns()
        m.begin("r", "gpu0", start)
        time.sleep(0.6)  # the trace has run out
        m.end("r", "gpu0", time.monotonic_ns(), {})
        assert m.flush(5)
    finally:
        m.close()
    (rec,) = records
    assert rec.coverage < 0.8
    assert m.counters["late_records"] == 1  # counted, not silent
    assert rec.energy_j >= 0


def test_event_overflow_is_counted_not_silent():
    m, records, _ = make_meter(max_events=10, autostart=False)
    for i in range(25):
        m.begin(str(i), "gpu0", time.monotonic_ns())
    assert m.counters["dropped_events"] == 15
    m.close(timeout=1)


def test_a_failing_sink_is_counted_and_others_still_run():
    def bad(rec):
        raise RuntimeError("sink down")

    with metered(constant_trace(), idle_w=40.0, carbon=CarbonModel(intensity_g_per_kwh=100.0), sinks=[RecordCallback(bad)]) as (m, got):
        now = time.monotonic_ns()
        m.begin("x", "gpu0", now)
        m.end("x", "gpu0", now + 20 * MS, {})
        assert m.flush(5)
    assert len(got.records) == 1 and m.counters["sink_errors"] == 1


@pytest.mark.parametrize("kw", [{"period_s": 0}, {"idle_w": -1.0}, {"idle_w": float("nan")}, {"max_delay_s": -2}])
def test_bad_configuration_is_refused_when_built(kw):
    with pytest.raises(ValueError):
        Meter(sources=[ReplaySource([constant_trace()])], autostart=False, **kw)
