"""wattspan.testing, as a user's own test would use it: capture records, replay a trace, simulate a GPU."""

from __future__ import annotations

import time

import pytest

import wattspan.testing as wt
from wattspan.carbon import CarbonModel
from wattspan.records import RequestLabels

MS = 1_000_000


def test_the_public_helpers_are_listed():
    assert set(wt.__all__) == {"RecordCollector", "ReplaySource", "SimulatedSource", "constant_trace", "metered",
                               "sense", "simulate_server"}
    for name in wt.__all__:
        assert getattr(wt, name).__doc__


def test_a_replayed_constant_trace_gives_known_joules_to_the_collector():
    with wt.metered(wt.constant_trace(100.0), idle_w=40.0, carbon=CarbonModel(intensity_g_per_kwh=400.0)) as (m, got):
        t0 = time.monotonic_ns()
        m.begin("a", "gpu0", t0)
        time.sleep(0.3)
        t1 = time.monotonic_ns()
        m.end("a", "gpu0", t1, RequestLabels(route="/v1/x", status_code=200, tenant="acme"))
        assert got.wait(1, timeout=10)
    rec = got.by_id("a")
    assert rec is not None and got.by_id("nope") is None
    assert (rec.route, rec.status_code, rec.tenant, rec.simulated) == ("/v1/x", 200, "acme", False)
    assert rec.energy_j == pytest.approx(100.0 * (t1 - t0) / 1e9, rel=0.05)  # alone on the device: all of it
    assert rec.co2e_g == pytest.approx((rec.energy_j + rec.host_j) / 3.6e6 * 400.0)
    assert got.devices["gpu0"].energy_j >= rec.energy_j
    got.clear()
    assert got.records == [] and not got.wait(1, timeout=0.05)


def test_the_simulator_is_labelled_simulated_in_every_record():
    src = wt.SimulatedSource(devices=["gpu0"], idle_w=70.0, seed=1)
    with wt.metered(src) as (m, got):
        t0 = time.monotonic_ns()
        m.begin("s", "gpu0", t0)
        m.record_step(t0, t0 + 20 * MS, "gpu0", {"s": 8})
        time.sleep(0.2)
        m.end("s", "gpu0", time.monotonic_ns(), {"route": "/sim"})
        assert got.wait(1, timeout=10)
    (rec,) = got.records
    assert rec.simulated and rec.sensor == "simulated" and rec.energy_j > 0
