"""Conservation always: requests + unattributed = measured, and unattributed is never negative
(reliability item 5), for any trace shape the NVML fake produces and any requests and steps."""

from __future__ import annotations

import time

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from wattspan import DeviceTrace, Requests, SampleKind, Steps, attribute
from wattspan.meter import DeviceCallback, RecordCallback

S = 1_000_000_000


@st.composite
def nvml_like(draw):
    """A trace as the NVML fake serves it: a stepwise power trace read as instant power,
    a 1 s average, a millijoule energy counter, or power and counter together."""
    n = draw(st.integers(3, 120))
    dt_ms = draw(st.sampled_from([1, 10, 20, 100]))
    t = np.arange(n, dtype=np.int64) * dt_ms * 1_000_000 + 5 * S
    levels = draw(st.lists(st.floats(0.0, 700.0), min_size=1, max_size=6))
    w = np.array([levels[i * len(levels) // n] for i in range(n)], dtype=float)
    shape = draw(st.sampled_from(["instant", "average", "counter", "both"]))
    energy = None
    if shape in ("counter", "both"):
        e = np.concatenate(([0.0], np.cumsum(w[:-1] * np.diff(t) / S)))
        energy = np.floor((e + 123_456.789) * 1000) / 1000  # a millijoule counter, not from 0
    power = None if shape == "counter" else w
    kind = SampleKind.AVERAGE if shape == "average" else SampleKind.INSTANT
    return DeviceTrace("gpu0", t, power, energy, power_kind=kind, window_ns=S if shape == "average" else 0, sensor="fake-nvml")


@st.composite
def workload(draw, trace):
    t0, t1 = int(trace.t_ns[0]), int(trace.t_ns[-1])
    k = draw(st.integers(0, 12))
    rows = []
    for i in range(k):
        a = draw(st.integers(t0 - S, t1))
        b = draw(st.integers(a, t1 + S))
        rows.append({"id": f"r{i}", "start_ns": a, "end_ns": b, "gpu": "gpu0"})
    req = Requests.from_records(rows) if rows else Requests(np.array([], dtype=object), np.array([], dtype=np.int64), np.array([], dtype=np.int64), np.array([], dtype=object), np.array([]))
    steps = None
    if rows and draw(st.booleans()):
        srows = []
        for _ in range(draw(st.integers(1, 30))):
            a = draw(st.integers(t0, t1 - 1))
            b = draw(st.integers(a + 1, min(t1, a + S // 5)))
            names = draw(st.lists(st.sampled_from([r["id"] for r in rows]), min_size=1, max_size=4, unique=True))
            srows.append({"start_ns": a, "end_ns": b, "gpu": "gpu0", "requests": {nm: draw(st.integers(1, 512)) for nm in names}})
        steps = Steps.from_records(srows, req)
    return req, steps


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_requests_plus_unattributed_is_measured_and_unattributed_is_never_negative(data):
    trace = data.draw(nvml_like())
    req, steps = data.draw(workload(trace))
    idle = data.draw(st.one_of(st.none(), st.floats(0.0, 900.0)))  # a configured baseline may exceed the power
    t0 = data.draw(st.one_of(st.none(), st.integers(int(trace.t_ns[0]) - S, int(trace.t_ns[-1]))))
    res = attribute({"gpu0": trace}, req, steps, idle_w=idle, t0_ns=t0)
    for d in res.devices.values():
        assert d.unattributed_j >= 0.0, d
        assert d.attributed_j + d.unattributed_j == pytest.approx(d.measured_j, abs=1e-9, rel=1e-12)
    assert np.all(res.energy_j >= 0) and np.all(np.isfinite(res.energy_j))
    assert float(res.energy_j.sum()) <= res.measured_j + 1e-6


def test_the_live_meter_on_the_nvml_fake_never_bills_more_than_measured(monkeypatch):
    """The issue's case: a baseline above what the GPU draws billed requests 4,320 J of 4,032 J."""
    from tests.fakes.fake_nvml import FakeGpu, FakeNvml

    from wattspan import Meter
    from wattspan.carbon import CarbonModel
    from wattspan.sources.nvml import NvmlSource

    FakeNvml([FakeGpu("NVIDIA A100-SXM4-40GB", 7, np.array([0.0, 0.5]), np.array([100.0, 300.0]))]).install(monkeypatch)
    records, totals = [], []
    meter = Meter(sources=[NvmlSource()], idle_w=500.0, carbon=CarbonModel(intensity_g_per_kwh=400.0), sinks=[RecordCallback(records.append)],
                  period_s=0.05, lag_s=0.05, idle_period_s=0.05, autostart=False)  # idle passes as often as busy ones
    meter.add_sink(DeviceCallback(lambda f: totals.append((f.energy_j, f.unattributed_j))))
    meter.start()
    assert meter.wait_ready(10)
    t = time.monotonic_ns()
    for i in range(40):
        meter.begin(f"r{i}", "gpu0", t + i * 20_000_000)
        meter.end(f"r{i}", "gpu0", t + i * 20_000_000 + 60_000_000)
    time.sleep(1.5)  # idle passes after the load: their energy is unattributed, and reported
    assert meter.flush(10)
    meter.close()
    assert len(records) == 40
    measured = meter.device_energy_j["gpu0"]
    billed = sum(r.energy_j for r in records)
    assert 0 < billed <= measured * (1 + 1e-9)
    assert meter.device_unattributed_j["gpu0"] >= 0
    assert billed + meter.device_unattributed_j["gpu0"] == pytest.approx(measured, rel=1e-9)
    passes = len(totals)
    assert passes >= 20 and all(un >= 0 for _, un in totals)  # the counters are reported on every pass
