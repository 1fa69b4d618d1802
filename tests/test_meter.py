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
        # 20 back-to-back steps of 20 ms, 3 tokens for a and 1 for b: on a constant trace the energy
        # of a gap between steps (a wait) and of a step cannot be told apart, so none is left inside
        for k in range(20):
            s = t0 + k * 20 * MS
            m.record_step(s, s + 20 * MS, "gpu0", {"a": 3, "b": 1})
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
    assert a.dynamic_j > 2.0 * b.dynamic_j  # steps split 3:1, the 50 ms after them shared equally
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


def test_ends_queued_by_a_stalled_meter_are_bounded_too():
    # begins stop at max_events; every begun request's end is still taken (or it stayed in flight for
    # ever), but a stalled thread's queue does not grow without end on the ends of dropped begins
    m, records, _ = make_meter(max_events=10, autostart=False)
    t = time.monotonic_ns()
    for i in range(25):
        m.begin(str(i), "gpu0", t)
    for i in range(25):
        m.end(str(i), "gpu0", t + MS)
    for i in range(25):
        m.end_fields(str(i), "gpu0", t + MS, "/", "GET", 200, "", "", 0, 0, 0, 0)
    assert len(m._events) == 20  # the 10 begins and the 10 ends the cap leaves room for
    assert m.counters["dropped_events"] == 15 + 40
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


@pytest.mark.parametrize("kw", [{"period_s": 0}, {"idle_w": -1.0}, {"idle_w": float("nan")}, {"max_delay_s": -2},
                                # accepted before: inf ended the meter's thread or failed every pass, NaN too
                                {"period_s": float("inf")}, {"max_delay_s": float("inf")}, {"history_s": float("inf")},
                                {"lag_s": -1.0}, {"lag_s": float("nan")}, {"refit_s": float("nan")},
                                {"idle_period_s": float("nan")}, {"period_s": "0.25"}, {"max_events": -5},
                                {"max_inflight": 0}, {"max_step_ids": 1.5}])
def test_bad_configuration_is_refused_when_built(kw):
    with pytest.raises(ValueError):
        Meter(sources=[ReplaySource([constant_trace()])], autostart=False, **kw)


def _run_steps(m, ids, n, step_ms=10, first_prefill=False):
    """``n`` batch steps of ``step_ms`` in real time (the simulated source wants them as they end)."""
    for k in range(n):
        s = time.monotonic_ns()
        time.sleep(step_ms / 1000)
        m.record_step(s, time.monotonic_ns(), "gpu0", {r: (12 if first_prefill and k == 0 else 1) for r in ids})


def test_the_first_step_model_comes_from_the_first_20_steps_not_from_a_timer():
    """After an idle start, a burst's own steps give the device its model as soon as the readings
    cover 20 of them (refit_s is an hour here), fitted over the burst rather than the idle history,
    so that it predicts the next request's energy (the provisional figure) near its final record."""
    from wattspan.meter.provisional import attach
    from wattspan.sources.simulated import SimulatedSource

    records = []
    m = Meter(sources=[SimulatedSource()], carbon=CarbonModel(intensity_g_per_kwh=400.0), sinks=[RecordCallback(records.append)], period_s=0.05, refit_s=3600.0)
    prov = attach(m)
    try:
        assert m.wait_ready(30)
        time.sleep(12.0)  # a history of idle readings first (about 30x the burst)
        ids = [f"a{i}" for i in range(8)]
        for r in ids:
            m.begin(r, "gpu0", time.monotonic_ns())
        _run_steps(m, ids, 19, first_prefill=True)
        time.sleep(1.0)  # the readings now cover all 19
        assert "gpu0" not in m._models  # fewer than min_fit_steps: no model yet
        _run_steps(m, ids, 21)
        for r in ids:
            m.end(r, "gpu0", time.monotonic_ns(), {"prompt_tokens": 12, "output_tokens": 40})
        deadline = time.monotonic() + 30
        while "gpu0" not in m._models and time.monotonic() < deadline:
            time.sleep(0.05)
        model = m._models.get("gpu0")
        assert model is not None, m.counters
        # it predicts held-out readings (one fitted over the whole, mostly idle history scores <= 0 here:
        # its time blocks hold the burst in one or two, every family's held-out error is the readings' RMS)
        assert m.counters["step_model_fits"] >= 1 and model.cv_r2 > 0.25, (model.as_dict(), m.counters)
        # the next requests are priced by it; their final records agree
        later = [f"b{i}" for i in range(8)]
        for r in later:
            m.begin(r, "gpu0", time.monotonic_ns())
            prov.open(r)
        _run_steps(m, later, 20, first_prefill=True)
        est = {}
        for r in later:
            est[r] = prov.estimate(r, "gpu0", 12, 20)
            m.end(r, "gpu0", time.monotonic_ns(), {"prompt_tokens": 12, "output_tokens": 20})
        assert m.flush(30)
    finally:
        m.close()
    final = {r.id: r.energy_j for r in records}
    assert {e["method"] for e in est.values()} == {"step-model"}
    ratios = sorted(e["energy_j"] / final[r] for r, e in est.items())
    assert 0.7 < ratios[len(ratios) // 2] < 1.4, ratios


def test_the_refit_schedule(monkeypatch):
    """First model: once the readings cover 20 steps, retried after 1, 2, 4 ... s; then every refit_s."""
    import types

    import wattspan.meter.core as core

    m = Meter(sources=[ReplaySource([constant_trace()])], autostart=False, refit_s=5.0)
    now = [100.0]
    monkeypatch.setattr(core, "time", types.SimpleNamespace(monotonic=lambda: now[0], monotonic_ns=time.monotonic_ns))

    def steps(k0, k1):
        for k in range(k0, k1):
            m._hist_add((k * 10 * MS, k * 10 * MS + 5 * MS, "gpu0", {"a": 1}))

    def due(t, cut=10**12, busy=False):
        now[0] = t
        return m._refit_due("gpu0", cut, busy)

    steps(0, 19)
    assert due(100.0)  # a device's first refit (idle baseline; its model would have too few steps)
    assert not due(100.5)  # nothing new
    steps(19, 20)  # the 20th step ends at 195 ms
    assert not due(100.6, cut=190 * MS)  # the readings do not cover it yet
    assert due(100.6, cut=195 * MS)
    steps(20, 21)
    assert not due(101.0) and due(101.7)  # no model came of it: again after 1 s
    steps(21, 22)
    assert not due(103.0) and due(103.8)  # ... then 2 s
    m._models["gpu0"] = object()  # a model was accepted
    steps(22, 23)
    assert not due(105.0) and due(108.9)  # then every refit_s
    assert not due(120.0)  # no new steps and nothing in flight: nothing to refit
    assert due(120.0, busy=True)
    m.close()


def test_end_fields_carries_the_labels_and_a_meter_without_sinks_still_counts_and_balances():
    """The middleware's flat hand-off (Meter.end_fields) gives the same labels as end(meta=RequestLabels);
    with no sink the pass builds no record, yet counts the requests and their energy in the balance."""
    from wattspan.records import RequestLabels

    m, records, _ = make_meter(lag_s=0.05)
    lonely = Meter(sources=[ReplaySource([constant_trace(100.0)], loop=True)], carbon=CarbonModel(intensity_g_per_kwh=400.0),
                   idle_w=40.0, period_s=0.05, lag_s=0.05)
    try:
        assert lonely.wait_ready(30)
        for meter in (m, lonely):
            t0 = time.monotonic_ns()
            meter.begin("a", "gpu0", t0)
            meter.begin("b", "gpu0", t0)
            meter.end_fields("a", "gpu0", t0 + 30 * MS, "/x", "POST", 201, "m1", "t1", 5, 7, 11, 13)
            meter.end("b", "gpu0", t0 + 30 * MS, RequestLabels("/x", "POST", 201, "m1", "t1", 5, 7, 11, 13))
            assert meter.flush(5)
        t0 = time.monotonic_ns()  # a pass whose requests all ended by end_fields: its labels taken as columns
        for rid, status in (("c", 200), ("d", 404)):
            m.begin(rid, "gpu0", t0)
            m.end_fields(rid, "gpu0", t0 + 30 * MS, "/y", "GET", status, "", "t2", 1, 2, 3, 4)
        assert m.flush(5)
    finally:
        m.close()
        lonely.close()
    a, b, c, d = sorted(records, key=lambda r: r.id)
    fields = RequestLabels._fields
    assert [getattr(a, f) for f in fields] == [getattr(b, f) for f in fields] == ["/x", "POST", 201, "m1", "t1", 5, 7, 11, 13]
    assert [getattr(c, f) for f in fields] == ["/y", "GET", 200, "", "t2", 1, 2, 3, 4]
    assert [getattr(d, f) for f in fields] == ["/y", "GET", 404, "", "t2", 1, 2, 3, 4]
    assert a.energy_j == pytest.approx(b.energy_j) and a.energy_j > 0
    assert lonely.counters["records"] == 2 and m.counters["records"] == 4
    bal = lonely.balance()
    assert bal.attributed_j == pytest.approx(a.energy_j + b.energy_j, rel=1e-6)  # the same split, no record built
    assert bal.measured_j == pytest.approx(bal.attributed_j + bal.pending_j + bal.peers_j + bal.unattributed_j, rel=1e-9)


def test_an_idle_meter_passes_at_its_idle_period_and_a_begin_wakes_it():
    """Nothing in flight: no pass until idle_period_s; a request's begin is taken at the next period_s tick."""
    from wattspan.meter import DeviceCallback

    figures = []
    m, records, _ = make_meter(lag_s=0.05, idle_period_s=30.0, autostart=False)
    m.add_sink(DeviceCallback(figures.append))
    m.start()
    try:
        assert m.wait_ready(30)
        time.sleep(0.5)  # ten busy periods, far less than the idle one
        assert figures == []
        t0 = time.monotonic_ns()
        m.begin("a", "gpu0", t0)
        m.end("a", "gpu0", t0 + 20 * MS)
        assert m.flush(10)
    finally:
        m.close()
    assert [r.id for r in records] == ["a"] and records[0].energy_j > 0 and figures


def test_a_hostile_end_mapping_gets_default_labels_and_blocks_no_other_record():
    # meter.end(..., meta) takes a caller's dict: a status of "abc" made int() raise on the meter's
    # thread, the pass failed and was retried for ever, and no request's record was ever made
    with metered(constant_trace(), idle_w=40.0) as (m, got):
        now = time.monotonic_ns()
        m.begin("good", "gpu0", now)
        m.begin("bad", "gpu0", now)
        m.end("good", "gpu0", now + 20 * MS, {"route": "/a", "status_code": 200, "trace_id": 7})
        m.end("bad", "gpu0", now + 20 * MS, {"route": "x" * 10_000, "status_code": "abc", "trace_id": -5,
                                             "span_id": 2**80, "prompt_tokens": 1e300, "output_tokens": "many",
                                             "model": ["not", "text"]})
        assert m.flush(5)
    recs = {r.id: r for r in got.records}
    assert set(recs) == {"good", "bad"} and m.counters["pass_errors"] == 0
    assert (recs["good"].status_code, recs["good"].trace_id) == (200, 7)
    bad = recs["bad"]
    assert (bad.status_code, bad.trace_id, bad.span_id, bad.prompt_tokens, bad.output_tokens) == (0, 0, 0, 0, 0)
    assert len(bad.route) == 256


def test_a_pass_that_keeps_failing_settles_the_ended_requests_instead_of_holding_them_for_ever(monkeypatch):
    # an attribution bug (or a reading the pass cannot handle) failed every pass and was retried for
    # ever: no record was ever made again. After a streak of failures the ended requests are made
    # final (with the energy attributed so far: none here), counted and logged; the meter goes on.
    from wattspan.meter import core

    with metered(constant_trace(), idle_w=40.0) as (m, got):
        def broken(*a, **k):
            raise RuntimeError("attribution bug")

        monkeypatch.setattr(m, "_attribute", broken)
        now = time.monotonic_ns()
        m.begin("a", "gpu0", now)
        m.end("a", "gpu0", now + 20 * MS, {"route": "/a"})
        assert m.flush(10)
        assert m.counters["pass_errors"] >= core._PASS_RETRIES
        assert m.counters["settled_on_errors"] == 1 and m.counters.get("dropped_on_errors", 0) == 0
        monkeypatch.undo()  # repaired: the next request is attributed as usual
        now = time.monotonic_ns()
        m.begin("b", "gpu0", now)
        m.end("b", "gpu0", now + 20 * MS, {"route": "/b"})
        assert m.flush(10)
    recs = {r.id: r for r in got.records}
    assert set(recs) == {"a", "b"}
    assert recs["a"].energy_j == 0.0 and recs["b"].energy_j > 0
