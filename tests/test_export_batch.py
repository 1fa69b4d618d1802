"""A meter pass's records as columns (:class:`wattspan.records.RecordBatch`): the spans, metrics and
ledger read the columns instead of building a RequestRecord each, and must export exactly what the
records themselves give (the path every other sink and a plain list of records take)."""

from __future__ import annotations

import random
import time

import numpy as np
import pytest

from wattspan.carbon import CarbonModel
from wattspan.carbon.records import request_batch, request_records
from wattspan.records import FIELDS, RecordBatch, RequestRecord

pytest.importorskip("opentelemetry.sdk")

from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans  # noqa: E402
from opentelemetry.sdk.metrics import MeterProvider  # noqa: E402
from opentelemetry.sdk.metrics.export import InMemoryMetricReader  # noqa: E402
from opentelemetry.sdk.resources import Resource  # noqa: E402
from opentelemetry.sdk.trace import TracerProvider  # noqa: E402
from opentelemetry.sdk.trace.export import BatchSpanProcessor  # noqa: E402
from opentelemetry.trace import SpanKind  # noqa: E402

from wattspan.export.ledger import Ledger  # noqa: E402
from wattspan.export.otel import EnergyMetrics, EnergySpanProcessor, record_attributes  # noqa: E402
from wattspan.export.otel.attributes import batch_attributes  # noqa: E402

from .test_otel_export_path import Collect  # noqa: E402


def _columns(n: int, seed: int, mixed: bool, span_ids: list[int] | None = None) -> dict:
    rng = random.Random(seed)
    pick = (lambda *xs: [rng.choice(xs) for _ in range(n)]) if mixed else (lambda *xs: [xs[0]] * n)
    st = np.array([rng.randrange(10**9) for _ in range(n)], dtype=np.int64)
    dyn = np.array([rng.choice([0.0, rng.uniform(0, 50)]) if mixed else rng.uniform(0.1, 50) for _ in range(n)])
    band = np.array([rng.uniform(0, 1) for _ in range(n)])
    return dict(
        ids=[f"r{seed}-{i}" for i in range(n)], device="gpu0", start_ns=st, end_ns=st + 5_000_000, dynamic_j=dyn,
        idle_j=np.where(dyn > 0, 0.5, 0.0), device_s=np.array([rng.random() for _ in range(n)]), host_j=0.25,
        wall_s=np.full(n, 1.7e9), energy_j_low=np.maximum(dyn - band, 0.0), energy_j_high=np.where(dyn > 0, dyn + band, 0.0),
        method=pick("time-share", "batch-fit"), sensor="nvml:energy-counter", quality=pick("good", "", "coarse"),
        label_columns=[pick("/a", "/b"), pick("GET", "POST"), pick(200, 500), pick("m1", "", "m2"), pick("", "t1", "t2"),
                       pick(0, 17, 4096), pick(5, 0), [rng.getrandbits(128) for _ in range(n)],
                       span_ids if span_ids is not None else [rng.getrandbits(64) for _ in range(n)]],
    )


def _batch(n: int = 200, seed: int = 0, mixed: bool = True, span_ids: list[int] | None = None) -> RecordBatch:
    b = request_batch(CarbonModel.for_region("FR"), **_columns(n, seed, mixed, span_ids))
    if mixed:  # intensity from a provider for some records only (and a market factor for some of those)
        for name, values in (("intensity_provider", ["table", ""]), ("market_g_per_kwh", [0.0, 250.0]), ("co2e_market_g", [0.0, 0.01])):
            b.const.pop(name, None)
            b.columns[name] = [values[i % 2 if name == "intensity_provider" else (i // 2) % 2] for i in range(n)]
    return b


@pytest.mark.parametrize("mixed", [False, True])
def test_a_batch_builds_what_request_records_builds(mixed):
    kw = _columns(50, 3, mixed)
    carbon = CarbonModel(intensity_g_per_kwh=400.0)
    batch, recs = request_batch(carbon, **kw), request_records(carbon, **kw)
    assert len(batch) == 50 and set(batch.const) | set(batch.columns) == set(FIELDS)
    assert not set(batch.const) & set(batch.columns)
    assert [r.to_dict() for r in batch] == [r.to_dict() for r in recs]
    assert [list(r.__dict__) for r in batch] == [list(FIELDS)] * 50  # the field order of a constructed record
    assert batch.records() is batch.records() and batch[3] is batch.records()[3]
    for name in FIELDS:
        assert batch.column(name) == [getattr(r, name) for r in recs]
    if not mixed:
        assert "route" in batch.const and "tenant" in batch.const
    with pytest.raises(ValueError):
        RecordBatch(2, {}, {"id": ["a", "b"]})


@pytest.mark.parametrize("mixed", [False, True])
def test_batch_attributes_are_record_attributes_in_order_and_type(mixed):
    batch = _batch(300, 1, mixed)
    names, rows = batch_attributes(batch)
    shapes = set()
    for rec, k, v in zip(batch.records(), names, rows):
        want = record_attributes(rec)
        got = dict(zip(k, v))
        assert list(got.items()) == list(want.items())
        assert [type(x) for x in got.values()] == [type(x) for x in want.values()]
        shapes.add(k)
    assert (len(shapes) > 4) is mixed
    # a device group's records: None (record_attributes per record, what the span processor then does)
    batch.const["device_energy"] = '{"gpu0":1.0}'
    assert batch_attributes(batch) is None


@pytest.mark.parametrize("field, value", [
    ("route", "/it's \"quoted\"; --"), ("route", "/" + "x" * 300), ("model", "naïve-模型"), ("host_j", -0.0),
    ("host_j", 1e300), ("intensity_g_per_kwh", 436.7), ("coverage", 1.0), ("prompt_tokens", 2**62),
    ("prompt_tokens", -(2**63)), ("status_code", -1), ("tenant", ""), ("energy_j_high", 2.0**53), ("quality", "a\nb"),
])
def test_a_pass_constant_stores_what_binding_it_stores(tmp_path, field, value):
    # a pass's constant fields go into the statement as literals where that stores the same value and
    # type, and are bound otherwise: the rows read back equal the plain list path's, field by field
    import math

    batch = _batch(100, 3, mixed=False)  # (a pass of 64 records or more: smaller ones bind every value)
    batch.columns.pop(field, None)
    batch.const[field] = value
    with Ledger(tmp_path / "a.sqlite") as led:
        led.write(batch)
        led.write(batch)  # the second with the many-rows statement of the first's constants
        led.write(batch.records())
        assert led.flush(10)
        rows = led.query()
    assert len(rows) == 300
    for a, b, c in zip(rows[:100], rows[100:200], rows[200:]):  # one row a statement, many, the list's
        for r in (a, b, c):
            del r["recorded_at"]
        assert a == c and b == c
        assert [type(x) for x in a.values()] == [type(x) for x in b.values()] == [type(x) for x in c.values()]
        assert math.copysign(1.0, a["host_j"]) == math.copysign(1.0, b["host_j"]) == math.copysign(1.0, c["host_j"])
    assert rows[0][field] == value


def test_a_small_pass_binds_every_value_and_a_new_set_of_constants_gets_no_many_rows_statement(tmp_path):
    # statements are compiled per set of a pass's constants: a small pass binds everything (the one
    # statement all such passes share), and a set of constants seen once is inserted one row a statement
    with Ledger(tmp_path / "a.sqlite") as led:
        shape, rows = led._batch_rows(_batch(20, 1), time.time())
        assert not shape.const and len(rows[0]) == 41
        big = _batch(300, 2)
        shape, _ = led._batch_rows(big, time.time())
        assert shape.const and shape.used == 0
        inserts: list[str] = []
        assert led._conn is not None
        led._conn.set_trace_callback(lambda sql: inserts.append(sql) if sql.startswith("INSERT") else None)
        led.write(big)
        assert led.flush(10) and shape.used == 1
        first = len(inserts)
        led.write(big)
        assert led.flush(10) and shape.used == 2
        k = shape.per_statement
        assert first == 300 and len(inserts) - first == 300 // k + 300 % k  # one a row, then k a statement
        assert [r["id"] for r in led.query()] == big.column("id") * 2


def test_ledger_rows_from_the_columns_are_the_records_rows(tmp_path):
    batch = _batch(120, 2)
    with Ledger(tmp_path / "a.sqlite") as led:
        now = time.time()
        shape, rows = led._batch_rows(batch, now)
        assert [shape.full(r) for r in rows] == led._rows(batch.records(), now)
        assert shape.const and shape.sql.count("?") == len(shape.bound) == len(rows[0])  # constants in the statement
        led.write(batch)
        led.write(batch.records())
        assert led.flush(10)
        rows = led.query()
    assert len(rows) == 240
    for r in rows:
        del r["recorded_at"]  # stamped at each write
    assert rows[:120] == rows[120:] and [r["id"] for r in rows[:120]] == batch.column("id")
    assert len({r["span_id"] for r in rows}) == 120


def _points(reader: InMemoryMetricReader) -> dict:
    out = {}
    for rm in reader.get_metrics_data().resource_metrics:
        for sm in rm.scope_metrics:
            for m in sm.metrics:
                for p in m.data.data_points:
                    key = (m.name, tuple(sorted(p.attributes.items())))
                    out[key] = ((p.count, p.sum, tuple(p.bucket_counts), p.min, p.max) if hasattr(p, "bucket_counts")
                                else p.value)
    return out


@pytest.mark.parametrize("mixed", [False, True])
def test_metrics_from_the_columns_equal_the_records_path(mixed):
    readers = [InMemoryMetricReader() for _ in range(2)]
    fast, slow = (EnergyMetrics(MeterProvider(metric_readers=[r])) for r in readers)
    for seed in range(3):
        batch = _batch(250, seed, mixed)
        fast.on_records(batch)
        slow.on_records(batch.records())
    got, want = _points(readers[0]), _points(readers[1])
    assert got == want  # the same label sets, counts, buckets, exact sums, minima and maxima
    assert len(got) == (4 if not mixed else len(got)) and (len(got) > 20) is mixed
    assert fast.stats() == slow.stats()
    # a record whose energy is not finite: the records path (counted invalid), never a wrong sum
    bad = _batch(10, 9, False)
    bad.columns["energy_j"][3] = float("nan")
    fast.on_records(bad)
    assert fast.stats()["invalid"] == 1 and fast.stats()["observed"] == slow.stats()["observed"] + 9


@pytest.mark.parametrize("mixed", [False, True])
def test_spans_from_the_columns_equal_the_records_path(mixed):
    def run(as_batch: bool) -> list:
        exporter = Collect()
        proc = EnergySpanProcessor(BatchSpanProcessor(exporter, schedule_delay_millis=60_000), hold_timeout_s=60)
        tp = TracerProvider(resource=Resource.create({"service.name": "svc"}))
        tp.add_span_processor(proc)
        tracer = tp.get_tracer("scope")
        sids, running = [], []
        for i in range(100):
            s = tracer.start_span(f"GET /{i}", kind=SpanKind.SERVER, start_time=1000 + i, attributes={"http.route": "/", "n": i})
            proc.expect(s)
            sids.append(s.get_span_context().span_id)
            if i % 10 == 9:  # its record comes before it ends: kept, applied at its end
                running.append(s)
            else:
                s.end(end_time=5000 + i)
        batch = _batch(100, 4, mixed, span_ids=sids)
        proc.on_records(batch if as_batch else batch.records())
        assert proc.stats()["final"] == 90 and proc.stats()["early"] == 10
        for s in running:
            s.end(end_time=9000)
        tp.force_flush()
        assert proc.stats()["final"] == 100
        return sorted(exporter.spans, key=lambda s: s.start_time)

    got, want = run(True), run(False)
    assert len(got) == len(want) == 100
    for a, b in zip(got, want):
        assert a.name == b.name and (a.start_time, a.end_time) == (b.start_time, b.end_time)
        assert list(a.attributes.items()) == list(b.attributes.items())
        assert a.attributes["wattspan.status"] == "final" and a.attributes["n"] == b.attributes["n"]
        # the span built inline (_resolve_rows) is what _finish builds: the same fields, in order, of the same types
        assert list(vars(a)) == list(vars(b)) and [type(v) for v in vars(a).values()] == [type(v) for v in vars(b).values()]
        assert (a.kind, a.status.status_code, a.parent, a.context.trace_flags, a.context.trace_state, a.context.is_remote) == (
            b.kind, b.status.status_code, b.parent, b.context.trace_flags, b.context.trace_state, b.context.is_remote)
        assert a.resource.attributes == b.resource.attributes and a.instrumentation_scope == b.instrumentation_scope
    assert encode_spans(got).SerializeToString() and len(encode_spans(got).resource_spans[0].scope_spans[0].spans) == 100


def test_large_label_sets_bucket_counts_equal_the_sdks_record_per_value():
    """A label set with many values in a pass (its bucket counts found at once) exports what the SDK's
    Histogram.record gives value by value: counts per bucket (values on the bounds too), min, max, sum."""
    readers = [InMemoryMetricReader() for _ in range(2)]
    fast, slow = (EnergyMetrics(MeterProvider(metric_readers=[r])) for r in readers)
    for h in (slow._req_energy, slow._req_co2e):
        h._usable = False  # the public path: Histogram.record, one value at a time
    rng = random.Random(11)
    from wattspan.export.otel.metrics import CO2E_BUCKETS_G, ENERGY_BUCKETS_J
    for p in range(2):
        batch = _batch(400, 20 + p, False)
        e = batch.columns["energy_j"]
        for i in range(0, 400, 7):  # values exactly on bucket bounds, and beyond the last
            e[i] = rng.choice([*ENERGY_BUCKETS_J, 0.0, 5e4])
        batch.columns["co2e_g"] = [rng.choice([*CO2E_BUCKETS_G, rng.uniform(0, 20)]) for _ in range(400)]
        batch.const.pop("co2e_g", None)
        fast.on_records(batch)
        slow.on_records(batch)
    assert fast._req_energy.bulk and not slow._req_energy.bulk
    got, want = _points(readers[0]), _points(readers[1])
    assert got.keys() == want.keys()
    for k, v in want.items():
        if isinstance(v, tuple):
            assert got[k][0] == v[0] == 800 and got[k][2] == v[2] and got[k][3:] == v[3:], k
            assert got[k][1] == pytest.approx(v[1], rel=1e-12)
        else:
            assert got[k] == pytest.approx(v, rel=1e-12)


def test_a_pass_goes_in_many_rows_a_statement_in_order_and_a_bad_one_is_stored_once(tmp_path):
    # a pass's rows go in per_statement rows an INSERT (the rest one by one), in order; a value the
    # database refuses inside one of those statements sends the batch row by row: each record once
    batch = _batch(250, 4, mixed=True)
    bad = 130
    batch.columns["prompt_tokens"] = [2**70 if i == bad else 0 for i in range(250)]
    batch.const.pop("prompt_tokens", None)
    with Ledger(tmp_path / "a.sqlite") as led:
        shape, rows = led._batch_rows(batch, time.time())
        assert 1 < shape.per_statement < 250 and 250 % shape.per_statement  # whole statements and a rest
        shape.used = 1  # its constants seen before: the many-rows statement from the first write
        led.write(batch)
        good = request_batch(CarbonModel.for_region("FR"), **_columns(250, 5, True))
        led.write(good)
        assert led.flush(10)
        st = led.stats()
        rows = led.query()
    assert [r["id"] for r in rows] == batch.column("id") + good.column("id")
    assert st["written"] == 500 and st["sanitized"] == 1 and st["dropped"] == 0
    assert rows[bad]["prompt_tokens"] == 2**63 - 1 and rows[bad + 1]["prompt_tokens"] == 0


def test_a_collector_that_never_answers_does_not_hold_a_flush_or_shutdown_past_its_time():
    # the SDK's batch processor exports every queued batch at a flush whatever its timeout, each waiting on the
    # collector: with a black hole behind it a server's shutdown took 108 s (1,500 requests)
    import threading

    from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

    release = threading.Event()

    class BlackHole(SpanExporter):  # a collector that accepts and never answers, until the test ends
        def export(self, spans):
            release.wait(30)
            return SpanExportResult.FAILURE

    proc = EnergySpanProcessor(BatchSpanProcessor(BlackHole(), max_export_batch_size=8, schedule_delay_millis=60_000), hold_timeout_s=60)
    tp = TracerProvider(resource=Resource.create({"service.name": "svc"}))
    tp.add_span_processor(proc)
    tracer = tp.get_tracer("scope")
    try:
        for i in range(64):  # eight batches, each a 30 s wait
            tracer.start_span(f"GET /{i}", kind=SpanKind.SERVER).end()
        t0 = time.monotonic()
        proc.force_flush(timeout_millis=500)
        flushed = time.monotonic() - t0
        t0 = time.monotonic()
        proc.shutdown()
        shut = time.monotonic() - t0
    finally:
        release.set()
    assert flushed < 3.0 and shut < 12.0, (flushed, shut)
    assert proc.stats()["flush_overran"] >= 2
