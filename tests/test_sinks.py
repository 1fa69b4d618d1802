"""The meter's one way out: every sink implements wattspan.RecordSink (records and device figures)."""

from __future__ import annotations

import time

import pytest

from wattspan import BatchCallback, DeviceFigures, Meter, RecordCallback, RecordSink, RequestRecord
from wattspan.carbon import CarbonModel
from wattspan.sources.replay import ReplaySource

from .conftest import constant_trace

MS = 1_000_000


class UserSink:
    """A user's own sink: two methods, no base class."""

    def __init__(self) -> None:
        self.batches: list[list[RequestRecord]] = []
        self.figures: list[DeviceFigures] = []

    def on_records(self, records):
        self.batches.append(list(records))

    def on_device(self, figures):
        self.figures.append(figures)


def _meter(**kw) -> Meter:
    return Meter(sources=[ReplaySource([constant_trace(100.0)], loop=True)], idle_w=40.0, carbon=CarbonModel(intensity_g_per_kwh=400.0),
                 period_s=0.05, lag_s=0.05, **kw)


def _after_first_reading(m: Meter) -> int:
    """Now, once the meter's sampler holds a reading: a request wholly before the first reading has none to
    carry its energy (on a loaded machine the sampler's thread can start later than the test's requests)."""
    deadline = time.monotonic() + 10
    while (m.sampler is None or m.sampler.latest_ns("gpu0") is None) and time.monotonic() < deadline:
        time.sleep(0.005)
    return time.monotonic_ns()


def test_a_users_sink_gets_the_records_and_each_devices_figures():
    user, per_record, per_pass = UserSink(), [], []
    m = _meter(sinks=[user, RecordCallback(per_record.append)])
    m.add_sink(BatchCallback(per_pass.append))
    try:
        assert isinstance(user, RecordSink) and m.sinks[0] is user and len(m.sinks) == 3
        now = _after_first_reading(m)
        for i in range(3):
            m.begin(f"r{i}", "gpu0", now)
            m.end(f"r{i}", "gpu0", now + 30 * MS, {"route": "/x"})
        assert m.flush(10)
    finally:
        m.close()
    got = [r.id for b in user.batches for r in b]
    assert sorted(got) == ["r0", "r1", "r2"] and sorted(r.id for r in per_record) == sorted(got)
    assert sorted(r.id for b in per_pass for r in b) == sorted(got)
    assert all(r.route == "/x" and r.energy_j > 0 for b in user.batches for r in b)
    # device figures: running totals, measured energy never less than what requests got
    assert user.figures and all(f.device == "gpu0" for f in user.figures)
    last = user.figures[-1]
    assert last.energy_j > 0 and last.unattributed_j >= 0 and last.power_w == pytest.approx(100.0)
    assert last.energy_j + 1e-9 >= sum(r.energy_j for r in per_record)
    with pytest.raises(AttributeError):
        last.energy_j = 0.0  # frozen


def test_a_sink_that_raises_is_counted_and_the_others_still_get_everything():
    class Broken(UserSink):
        def on_records(self, records):
            raise RuntimeError("down")

        def on_device(self, figures):
            raise RuntimeError("down")

    ok = UserSink()
    m = _meter(sinks=[Broken(), ok])
    try:
        now = _after_first_reading(m)
        m.begin("a", "gpu0", now)
        m.end("a", "gpu0", now + 20 * MS, {})
        assert m.flush(10)
    finally:
        m.close()
    assert [r.id for b in ok.batches for r in b] == ["a"]
    assert m.counters["sink_errors"] >= 2  # its records and its device figures, each counted


def test_something_that_is_not_a_sink_is_refused_with_the_way_to_wrap_it():
    m = _meter(autostart=False)
    with pytest.raises(TypeError, match="RecordCallback"):
        m.add_sink(print)
    with pytest.raises(TypeError, match="on_records"):
        _meter(sinks=[[].append], autostart=False)


def test_remove_sink_stops_delivery():
    a, b = UserSink(), UserSink()
    m = _meter(sinks=[a, b])
    try:
        m.remove_sink(a)
        assert m.sinks == (b,)
        now = _after_first_reading(m)
        m.begin("z", "gpu0", now)
        m.end("z", "gpu0", now + 20 * MS, {})
        assert m.flush(10)
    finally:
        m.close()
    assert a.batches == [] and [r.id for x in b.batches for r in x] == ["z"]


def test_a_callbacks_flush_passes_the_timeout_only_where_it_is_taken_and_is_called_once():
    """A bound method's owner is flushed with the timeout when its flush takes one, without when it does not
    (a file's); a ``TypeError`` raised inside a flush is its own failure: it is not called a second time."""
    import io

    class Timed:
        def __init__(self):
            self.calls = []

        def write(self, rec):
            pass

        def flush(self, timeout):
            self.calls.append(timeout)
            if timeout < 0:
                raise TypeError("the ledger's own bug")
            return True

    t = Timed()
    assert RecordCallback(t.write).flush(2.5) is True and t.calls == [2.5]
    with pytest.raises(TypeError, match="own bug"):
        RecordCallback(t.write).flush(-1.0)
    assert t.calls == [2.5, -1.0]  # once, not retried without the timeout
    buf = io.StringIO()
    assert RecordCallback(buf.write).flush(1.0) is None  # io's flush() takes no timeout
