"""The meter's requests in flight as columns (``wattspan.meter.core._Table``): no object per request for
the garbage collector, rows reused, and the counts flush() and drain() read kept exact."""

from __future__ import annotations

import gc
import time

import pytest

from wattspan import Meter
from wattspan.carbon import CarbonModel
from wattspan.meter import RecordCallback
from wattspan.meter.core import _Table
from wattspan.sources.replay import ReplaySource

from .conftest import constant_trace
from .fakes.sampler import CutSampler

MS = 1_000_000


def test_requests_in_flight_add_no_object_the_collector_tracks():
    m = Meter(sources=[ReplaySource([constant_trace(100.0)], loop=True)], autostart=False)
    t0 = time.monotonic_ns()
    for i in range(50):  # rows allocated once
        m.begin(f"w{i}", "gpu0", t0)
    m._drain()
    gc.collect()
    before = len(gc.get_objects())
    for i in range(3000):
        m.begin(f"r{i}", "gpu0", t0 + i)
        if i % 2:
            m.end_fields(f"r{i}", "gpu0", t0 + i + 5 * MS, "/", "GET", 200, "", "", 0, 0, 0, 0)
    m._drain()
    gc.collect()
    assert len(m._table) == 3050
    assert len(gc.get_objects()) - before < 100  # an object per request in flight was 3,000 more
    assert m._table.ended == 1500 and not m._table.peers


def test_rows_are_reused_and_counts_follow_adds_ends_and_removals():
    t = _Table()
    t.add("a", "gpu0", 100)
    t.add("b", "gpu0", 200, peer=7)
    t.set_end(t.row["a"], 50)  # never before it began
    t.set_end(t.row["b"], 300)
    assert t.end[t.row["a"]] == 100 and t.ended == 1 and t.peers == 1
    t.set_end(t.row["a"], 150)  # a second end moves it, counted once
    assert t.end[t.row["a"]] == 150 and t.ended == 1
    ra = t.row["a"]
    t.dyn[ra] += 2.5
    t.remove([ra, t.row["b"]])
    assert not t.row and t.ended == 0 and t.peers == 0 and t.rid[ra] is None and t.dyn[ra] == 0
    t.add("c", "gpu1", 400)
    assert t.row["c"] in (ra, ra + 1) and t.dyn[t.row["c"]] == 0 and t.end[t.row["c"]] is None
    t.add("c", "gpu1", 500)  # the same id again: replaces it
    assert len(t) == 1 and t.start[t.row["c"]] == 500
    for i in range(3000):  # grows past its first rows
        t.add(f"x{i}", "gpu0", i)
    assert len(t) == 3001 and len(t.dyn) >= 3001 and len(set(t.row.values())) == 3001


def test_records_from_the_table_carry_each_requests_own_sums():
    got = []
    m = Meter(sources=[ReplaySource([constant_trace(100.0)], loop=True)], carbon=CarbonModel(intensity_g_per_kwh=400.0),
              idle_w=40.0, period_s=0.05, lag_s=0.05, sinks=[RecordCallback(got.append)])
    try:
        assert m.wait_ready(30)
        t0 = time.monotonic_ns()
        for i in range(40):  # overlapping requests of different lengths, ended over several passes
            m.begin(f"r{i}", "gpu0", t0 + i * MS)
        time.sleep(0.1)
        for i in range(40):
            m.end(f"r{i}", "gpu0", t0 + (i + 1) * 5 * MS + 60 * MS, {"route": f"/{i % 3}"})
            if i % 10 == 9:
                time.sleep(0.06)
        assert m.flush(10)
        assert m._table.ended == 0 and len(m._table) == 0
    finally:
        m.close()
    assert sorted(r.id for r in got) == sorted(f"r{i}" for i in range(40))
    by = {r.id: r for r in got}
    for i in range(40):
        r = by[f"r{i}"]
        assert r.route == f"/{i % 3}" and r.end_ns - r.start_ns == (i + 1) * 5 * MS + 60 * MS - i * MS
        assert r.energy_j == pytest.approx(r.dynamic_j + r.idle_j) and r.coverage == pytest.approx(1.0)
    # longer requests carry more of the idle baseline (40 W shared among those in flight)
    assert by["r39"].idle_j > by["r0"].idle_j > 0
    assert sum(r.energy_j for r in got) == pytest.approx(m.balance().attributed_j, rel=1e-9)


def test_a_row_named_twice_in_a_removal_is_freed_once():
    t = _Table()
    t.add("a", "gpu0", 100)
    r = t.row["a"]
    t.remove([r, r])  # twice: was put on the free list twice, then handed to two requests
    assert t.free.count(r) == 1
    t.add("b", "gpu0", 200)
    t.add("c", "gpu0", 300)
    assert t.row["b"] != t.row["c"]


def _fake_sampler(devices: list[str], base: int) -> CutSampler:
    """Two or more 100 W devices whose newest reading the test sets (deterministic passes)."""
    import numpy as np

    from wattspan.samples import DeviceTrace

    t = np.arange(base - 5 * 10**9, base + 100 * 10**9, 5 * MS, dtype=np.int64)
    return CutSampler([DeviceTrace(d, t, np.full(len(t), 100.0), energy_j=100.0 * (t - t[0]) * 1e-9, sensor="c")
                       for d in devices], latest=base)


def test_a_group_naming_a_device_twice_makes_one_record_and_frees_its_row_once():
    S = 10**9
    base = time.monotonic_ns() + 1000 * S  # ahead of the clock: the cut is the sensor's
    sampler = _fake_sampler(["gpu0"], base)
    got = []
    m = Meter(sampler=sampler, autostart=False, idle_w=20.0, lag_s=0.0, carbon=CarbonModel(intensity_g_per_kwh=400.0),
              sinks=[RecordCallback(got.append)])
    m.begin("g", "gpu0,gpu0", base)  # a repeated member: was a row twice in gpu0's pass
    m.end("g", "gpu0", base + 2 * S)
    sampler.latest["gpu0"] = base + 3 * S
    m._pass()
    assert [r.id for r in got] == ["g"]  # was two records of one request
    assert got[0].device == "gpu0"
    assert got[0].energy_j == pytest.approx(200.0)  # 100 W for its 2 s, alone on the device
    assert len(m._table.free) == len(set(m._table.free))
    assert m.counters["records"] == 1


def test_a_group_request_made_final_on_one_member_is_not_in_the_next_members_turn():
    S = 10**9
    base = time.monotonic_ns() + 1000 * S
    sampler = _fake_sampler(["gpu0", "gpu1"], base)
    got = []
    m = Meter(sampler=sampler, autostart=False, idle_w=20.0, lag_s=0.0, carbon=CarbonModel(intensity_g_per_kwh=400.0),
              sinks=[RecordCallback(got.append)])
    m.begin("g", "gpu0,gpu1", base)
    m.begin("b", "gpu1", base + S // 2)
    m.end("g", "gpu0,gpu1", base + 2 * S)
    sampler.latest.update(gpu0=base + 1 * S, gpu1=base + 3 * S)  # gpu1 passes g's end first
    m._pass()
    row = m._table.row["g"]
    sampler.latest.update(gpu0=base + 4 * S, gpu1=base + 5 * S)
    m._pass()  # gpu0's turn makes g final and frees its row; gpu1's turn comes after, in the same pass
    assert [r.id for r in got] == ["g"]
    t = m._table
    assert t.rid[row] is None and row in t.free
    # a free row is clean (the begin that reuses it relies on it): gpu1's turn had written g's part into it
    assert t.parts[row] is None and t.dyn[row] == 0 and t.cov[row] == 0
    assert m.counters.get("pass_errors", 0) == 0


def test_a_group_none_of_whose_devices_is_metered_is_settled_not_left_in_flight():
    S = 10**9
    base = time.monotonic_ns() + 1000 * S
    sampler = _fake_sampler(["gpu0"], base)
    got = []
    m = Meter(sampler=sampler, autostart=False, idle_w=20.0, lag_s=0.0, carbon=CarbonModel(intensity_g_per_kwh=400.0),
              sinks=[RecordCallback(got.append)])
    m.begin("g", "gpu5,gpu6", base)  # a wrong WATTSPAN_DEVICE naming a group: was in flight for ever (flush never true)
    m.begin("h", "gpu5", base)
    m.end("g", "gpu5,gpu6", base + S)
    m.end("h", "gpu5", base + S)
    for k in (2, 3):
        sampler.latest["gpu0"] = base + k * S
        m._pass()
    assert sorted(r.id for r in got) == ["g", "h"]  # each once, with no energy
    assert all(r.energy_j == 0 and r.sensor == "none" for r in got)
    assert len(m._table) == 0 and m._table.ended == 0
    assert m.counters["unmetered_device"] == 2


@pytest.mark.parametrize("devices", [("gpu0", "gpu1"), ("gpu0,gpu1",)])
def test_the_hosts_energy_is_billed_once_across_gpus(devices):
    """The host (CPU package) is one meter shared by every GPU's requests: with requests on two
    GPUs over the same second, or one request on a group of both, the host's 50 J are split once,
    not once per GPU (before: each GPU's turn split all of them among its own requests, 100 J)."""
    from wattspan.records import RequestLabels
    from wattspan.testing import RecordCollector

    src = ReplaySource([constant_trace(300.0, device="gpu0"), constant_trace(300.0, device="gpu1"),
                        constant_trace(50.0, device="cpu0-package")], loop=True)
    col = RecordCollector()
    m = Meter(sources=[src], idle_w=100.0, period_s=0.05, lag_s=0.05, sinks=[col])
    try:
        time.sleep(0.2)
        t0 = time.monotonic_ns()
        for i, d in enumerate(devices):
            m.begin(f"r{i}", d, t0)
        time.sleep(0.6)
        t1 = time.monotonic_ns()
        labels = RequestLabels("/", "GET", 200, "", "", 0, 0, 0, 0)
        for i, d in enumerate(devices):
            m.end(f"r{i}", d, t1, labels)
        assert m.flush(10)
    finally:
        m.close()
    host = sum(r.host_j for r in col.records)
    expected = 50.0 * (t1 - t0) / 1e9
    assert len(col.records) == len(devices)
    assert host == pytest.approx(expected, rel=0.03)
    if len(devices) == 2:
        a, b = (r.host_j for r in col.records)
        assert a == pytest.approx(b, rel=0.02)
