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
