"""wattspan.export.otel in-process: real SDK pipelines (InMemory exporters and readers), a real
Starlette app under real uvicorn with the real ASGI instrumentation, and the real Meter."""

from __future__ import annotations

import asyncio
import math
import queue
import random
import socket
import threading
import time
import urllib.error
import urllib.request

import pytest

pytest.importorskip("opentelemetry.sdk")
httpx = pytest.importorskip("httpx")
pytest.importorskip("starlette")
asgi = pytest.importorskip("opentelemetry.instrumentation.asgi")

from .conftest import constant_trace, free_port, serve  # noqa: E402
from opentelemetry import trace  # noqa: E402
from opentelemetry.attributes import BoundedAttributes  # noqa: E402
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans  # noqa: E402
from opentelemetry.sdk.metrics import MeterProvider  # noqa: E402
from opentelemetry.sdk.metrics.export import InMemoryMetricReader  # noqa: E402
from opentelemetry.sdk.resources import Resource  # noqa: E402
from opentelemetry.sdk.trace import SpanLimits, SpanProcessor, TracerProvider  # noqa: E402
from opentelemetry.sdk.trace.export import SimpleSpanProcessor  # noqa: E402
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter  # noqa: E402
from opentelemetry.trace import Link, SpanKind, Status, StatusCode  # noqa: E402
from starlette.applications import Starlette  # noqa: E402
from starlette.responses import JSONResponse, StreamingResponse  # noqa: E402
from starlette.routing import Route  # noqa: E402

from wattspan import RequestRecord  # noqa: E402
from wattspan.export.otel import (  # noqa: E402
    EnergyMetrics,
    EnergySpanProcessor,
    configure_from_env,
    install,
    record_attributes,
)
from wattspan.meter import RecordCallback

ENERGY_KEYS = ("wattspan.energy_j", "wattspan.energy.dynamic_j", "wattspan.energy.idle_j", "wattspan.co2e_g")


def wait_until(cond, timeout: float = 10.0, step: float = 0.01) -> bool:
    end = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > end:
            return False
        time.sleep(step)
    return True


def make_record(span_id: int = 0, *, seed: int = 0, **kw) -> RequestRecord:
    rng = random.Random(seed)
    dyn, idle = rng.uniform(0.1, 50), rng.uniform(0.01, 5)
    base = dict(
        id=f"r{seed}", device=rng.choice(["gpu0", "gpu1"]), start_ns=1_000, end_ns=2_000_000, energy_j=dyn + idle,
        dynamic_j=dyn, idle_j=idle, device_s=rng.random(), co2e_g=rng.uniform(1e-4, 0.1), embodied_g=rng.uniform(0, 1e-3),
        method=rng.choice(["batch-fit", "time-share"]), sensor="nvml:energy-counter", coverage=rng.random(),
        simulated=rng.random() < 0.5, route="/v1/embeddings", http_method="POST", status_code=200,
        model=f"model-{seed}", tenant=f"tenant-{seed}", prompt_tokens=rng.randrange(1, 4096),
        output_tokens=rng.randrange(1, 4096), trace_id=rng.getrandbits(128), span_id=span_id, host_j=rng.uniform(0, 2),
    )
    base.update(kw)
    return RequestRecord(**base)


def pipeline(**kw):
    exporter = InMemorySpanExporter()
    proc = EnergySpanProcessor(SimpleSpanProcessor(exporter), **kw)
    tp = TracerProvider(resource=Resource.create({"service.name": "wattspan-test"}))
    tp.add_span_processor(proc)
    return exporter, proc, tp, tp.get_tracer("wattspan-test")


def server_spans(exporter) -> list:
    return [s for s in exporter.get_finished_spans() if s.kind == SpanKind.SERVER]


def replay_meter(**kw):
    from wattspan import Meter
    from wattspan.carbon import CarbonModel
    from wattspan.sources.replay import ReplaySource

    return Meter(sources=[ReplaySource([constant_trace(100.0)])], idle_w=40.0, carbon=CarbonModel(intensity_g_per_kwh=400.0), period_s=0.05, lag_s=0.05, **kw)


async def _work(request):
    await asyncio.sleep(0.005)
    return JSONResponse({"i": int(request.query_params.get("i", 0))})


async def _stream(request):
    async def body():
        for k in range(3):
            await asyncio.sleep(0.005)
            yield f"chunk{k}\n".encode()

    return StreamingResponse(body(), media_type="text/plain")


def starlette_app() -> Starlette:
    return Starlette(routes=[Route("/work", _work), Route("/stream", _stream), Route("/embed", _work, methods=["POST"])])


# ---------------------------------------------------------------------------- record_attributes


def test_record_attributes_maps_every_field_with_semconv_names():
    rec = make_record(0x1234, seed=7)
    a = record_attributes(rec)
    assert a["wattspan.energy_j"] == rec.energy_j
    assert a["wattspan.energy.dynamic_j"] == rec.dynamic_j and a["wattspan.energy.idle_j"] == rec.idle_j
    assert a["wattspan.energy.host_j"] == rec.host_j and a["wattspan.device_s"] == rec.device_s
    assert a["wattspan.co2e_g"] == rec.co2e_g and a["wattspan.co2e.embodied_g"] == rec.embodied_g
    assert (a["wattspan.method"], a["wattspan.sensor"], a["wattspan.coverage"]) == (rec.method, rec.sensor, rec.coverage)
    assert a["wattspan.simulated"] is rec.simulated and a["wattspan.status"] == "final"
    assert (a["hw.id"], a["hw.type"], a["wattspan.request_id"]) == (rec.device, "gpu", rec.id)
    assert a["gen_ai.request.model"] == rec.model and a["wattspan.tenant"] == rec.tenant
    assert (a["gen_ai.usage.input_tokens"], a["gen_ai.usage.output_tokens"]) == (rec.prompt_tokens, rec.output_tokens)
    # every value is a valid OTel attribute value: the SDK's own cleaning keeps them all
    assert dict(BoundedAttributes(None, a)) == a


def test_record_attributes_leaves_out_unknown_optional_values():
    a = record_attributes(make_record(1, model="", tenant="", prompt_tokens=0, output_tokens=0))
    for key in ("gen_ai.request.model", "wattspan.tenant", "gen_ai.usage.input_tokens", "gen_ai.usage.output_tokens"):
        assert key not in a
    assert "wattspan.energy_j" in a


# ---------------------------------------------------------------------------- the processor, in process


def test_unexpected_spans_pass_straight_through():
    exporter, proc, tp, tracer = pipeline(hold_timeout_s=60)
    with tracer.start_as_current_span("not metered", kind=SpanKind.SERVER):
        pass
    (s,) = exporter.get_finished_spans()
    assert s.name == "not metered" and "wattspan.status" not in s.attributes
    assert proc.stats()["held"] == 0
    tp.shutdown()


def test_timeout_forwards_pending_from_the_timer_thread_and_counts_late_records():
    exporter, proc, tp, tracer = pipeline(hold_timeout_s=0.3)
    span = tracer.start_span("GET /slow", kind=SpanKind.SERVER, attributes={"http.route": "/slow"})
    proc.expect(span)
    span.end()
    t_end = time.monotonic()
    assert exporter.get_finished_spans() == ()  # held
    # nothing else calls the processor: only its timer can pass the span on
    assert wait_until(lambda: len(exporter.get_finished_spans()) == 1, timeout=5.0, step=0.005)
    waited = time.monotonic() - t_end
    assert 0.3 - 0.02 <= waited < 0.3 + 2.0
    (s,) = exporter.get_finished_spans()
    assert s.attributes["wattspan.status"] == "pending" and s.attributes["http.route"] == "/slow"
    assert not any(k in s.attributes for k in ENERGY_KEYS)
    # the record comes too late: counted, never exported twice
    proc.resolve(span.context.span_id, record_attributes(make_record(span.context.span_id)))
    assert len(exporter.get_finished_spans()) == 1
    st = proc.stats()
    assert (st["pending_timeout"], st["late"], st["final"], st["held"]) == (1, 1, 0, 0)
    tp.shutdown()


def test_max_held_forwards_the_oldest_as_pending():
    exporter, proc, tp, tracer = pipeline(hold_timeout_s=60, max_held=3)
    spans = []
    for i in range(5):
        s = tracer.start_span(f"req{i}", kind=SpanKind.SERVER)
        proc.expect(s)
        s.end()
        spans.append(s)
    out = exporter.get_finished_spans()
    assert [s.name for s in out] == ["req0", "req1"]
    assert all(s.attributes["wattspan.status"] == "pending" for s in out)
    assert proc.stats()["pending_overflow"] == 2 and proc.stats()["held"] == 3
    for i, s in enumerate(spans[2:], start=2):
        proc.resolve(s.context.span_id, record_attributes(make_record(s.context.span_id, seed=i)))
    out = exporter.get_finished_spans()
    assert [s.name for s in out] == [f"req{i}" for i in range(5)]
    for i, s in enumerate(out[2:], start=2):
        assert s.attributes["wattspan.status"] == "final"
        assert s.attributes["wattspan.energy_j"] == make_record(seed=i).energy_j
    assert proc.stats()["held"] == 0 and proc.stats()["final"] == 3
    tp.shutdown()


def test_record_before_span_end_is_applied_at_end():
    exporter, proc, tp, tracer = pipeline(hold_timeout_s=60)
    span = tracer.start_span("GET /fast", kind=SpanKind.SERVER, attributes={"mine": 1})
    proc.expect(span.get_span_context())  # a SpanContext works too
    rec = make_record(span.context.span_id, seed=3)
    proc.resolve(span.context.span_id, record_attributes(rec))
    assert exporter.get_finished_spans() == () and proc.stats()["early"] == 1
    span.end()
    (s,) = exporter.get_finished_spans()
    assert s.attributes["wattspan.energy_j"] == rec.energy_j and s.attributes["mine"] == 1
    assert s.attributes["wattspan.status"] == "final"
    assert proc.stats()["early"] == 0 and proc.stats()["final"] == 1
    tp.shutdown()


def test_copy_keeps_everything_of_the_original_span_and_encodes_as_otlp():
    exporter = InMemorySpanExporter()
    proc = EnergySpanProcessor(SimpleSpanProcessor(exporter), hold_timeout_s=60)
    tp = TracerProvider(resource=Resource.create({"service.name": "svc"}), span_limits=SpanLimits(max_span_attributes=2, max_events=1))
    tp.add_span_processor(proc)
    tracer = tp.get_tracer("scope-name", "9.9")
    with tracer.start_as_current_span("parent") as parent:
        other = trace.SpanContext(0xABC, 0xDEF, is_remote=True)
        span = tracer.start_span("child", kind=SpanKind.SERVER, links=[Link(other, {"l": "x"})])
        proc.expect(span)
        for k in ("a", "b", "c"):  # one over the limit: "a" is dropped
            span.set_attribute(k, k)
        span.add_event("e1")
        span.add_event("e2", {"n": 2})  # over the limit: e1 is dropped
        span.set_status(Status(StatusCode.ERROR, "boom"))
        span.end()
    rec = make_record(span.context.span_id, seed=5)
    proc.resolve(span.context.span_id, record_attributes(rec))
    s = next(x for x in exporter.get_finished_spans() if x.name == "child")
    assert s.context == span.context and s.parent == parent.get_span_context()
    assert (s.start_time, s.end_time, s.kind) == (span.start_time, span.end_time, SpanKind.SERVER)
    assert s.status.status_code == StatusCode.ERROR and s.status.description == "boom"
    assert s.resource.attributes["service.name"] == "svc"
    assert (s.instrumentation_scope.name, s.instrumentation_scope.version) == ("scope-name", "9.9")
    assert [e.name for e in s.events] == [e.name for e in span.events] == ["e2"] and s.dropped_events == 1  # oldest dropped
    assert s.links[0].context.span_id == 0xDEF and s.links[0].attributes["l"] == "x"
    assert s.attributes["b"] == "b" and s.attributes["c"] == "c" and "a" not in s.attributes
    assert s.dropped_attributes == 1  # the original's count, not reset
    assert s.attributes["wattspan.energy_j"] == rec.energy_j  # ours are added even to a full span
    # the real OTLP encoder takes it
    pb = encode_spans([s])
    (pspan,) = pb.resource_spans[0].scope_spans[0].spans
    got = {kv.key: kv.value for kv in pspan.attributes}
    assert got["wattspan.energy_j"].double_value == rec.energy_j
    assert got["hw.id"].string_value == rec.device
    assert pspan.dropped_attributes_count == 1 and pspan.dropped_events_count == 1
    tp.shutdown()


@pytest.mark.parametrize("outcome", ["final", "pending"])
def test_a_plain_span_held_slimmed_exports_as_the_sdk_would(outcome):
    """A span without events or links is held as a lighter copy (less for the GC to scan): what comes
    out is field for field the original, its attributes plus ours, and the OTLP encoder takes it."""
    exporter = InMemorySpanExporter()
    proc = EnergySpanProcessor(SimpleSpanProcessor(exporter), hold_timeout_s=60)
    seen = InMemorySpanExporter()  # a second processor on the provider: gets the SDK's original
    tp = TracerProvider(resource=Resource.create({"service.name": "svc"}))
    tp.add_span_processor(SimpleSpanProcessor(seen))
    tp.add_span_processor(proc)
    span = tp.get_tracer("scope", "1.0").start_span("GET /x", kind=SpanKind.SERVER, attributes={"http.route": "/x", "n": 3})
    proc.expect(span)
    span.set_status(Status(StatusCode.OK))
    span.end()
    rec = make_record(span.context.span_id, seed=8)
    if outcome == "final":
        proc.resolve(span.context.span_id, record_attributes(rec))
    else:
        proc.force_flush()
    (orig,), (s,) = seen.get_finished_spans(), exporter.get_finished_spans()
    for field in ("name", "context", "parent", "kind", "start_time", "end_time", "resource", "instrumentation_scope",
                  "events", "links", "dropped_events", "dropped_links", "dropped_attributes"):
        assert getattr(s, field) == getattr(orig, field), field
    assert s.status.status_code == StatusCode.OK
    extra = {k: v for k, v in s.attributes.items() if k not in orig.attributes}
    assert {k: s.attributes[k] for k in orig.attributes} == dict(orig.attributes) == {"http.route": "/x", "n": 3}
    assert extra == (record_attributes(rec) if outcome == "final" else {"wattspan.status": "pending"})
    (pspan,) = encode_spans([s]).resource_spans[0].scope_spans[0].spans
    assert {kv.key for kv in pspan.attributes} == set(s.attributes) and pspan.name == "GET /x"
    tp.shutdown()


def test_force_flush_and_shutdown_forward_held_spans_as_pending():
    exporter, proc, tp, tracer = pipeline(hold_timeout_s=60)
    for name in ("a", "b"):
        s = tracer.start_span(name, kind=SpanKind.SERVER)
        proc.expect(s)
        s.end()
    assert exporter.get_finished_spans() == ()
    assert tp.force_flush() is True
    assert [s.attributes["wattspan.status"] for s in exporter.get_finished_spans()] == ["pending", "pending"]
    s = tracer.start_span("c", kind=SpanKind.SERVER)
    proc.expect(s)
    s.end()
    thread = proc._thread
    tp.shutdown()
    assert [x.name for x in exporter.get_finished_spans()] == ["a", "b", "c"]
    assert proc.stats()["pending_flush"] == 3
    assert thread is not None and not thread.is_alive()


def test_bad_arguments_are_rejected_clearly_and_runtime_faults_never_raise(caplog):
    with pytest.raises(TypeError, match="SpanProcessor"):
        EnergySpanProcessor(object())
    with pytest.raises(ValueError, match="hold_timeout_s"):
        EnergySpanProcessor(SimpleSpanProcessor(InMemorySpanExporter()), hold_timeout_s=0)
    with pytest.raises(ValueError, match="max_held"):
        EnergySpanProcessor(SimpleSpanProcessor(InMemorySpanExporter()), max_held=0)

    class Broken(SpanProcessor):
        def on_end(self, span):
            raise RuntimeError("exporter down")

    proc = EnergySpanProcessor(Broken(), hold_timeout_s=60)
    tp = TracerProvider()
    tp.add_span_processor(proc)
    tracer = tp.get_tracer("t")
    proc.expect("not a span")  # counted, not raised
    proc.expect(trace.INVALID_SPAN)  # not recording: nothing to wait for
    assert proc.stats()["expected"] == 0 and proc.stats()["errors"] == 1
    s = tracer.start_span("x", kind=SpanKind.SERVER)
    proc.expect(s)
    s.end()
    proc.resolve(s.context.span_id, {"wattspan.energy_j": 1.0})
    with tracer.start_as_current_span("y"):
        pass
    assert proc.stats()["errors"] == 3 and proc.stats()["final"] == 1
    # a broken exporter is logged once, not once per span
    assert sum("downstream on_end failed" in r.getMessage() for r in caplog.records) == 1
    proc.resolve(12345, {"wattspan.energy_j": 1.0})
    assert proc.stats()["unmatched"] == 1
    tp.shutdown()


def test_a_record_whose_attributes_fail_sends_its_span_on_pending_with_its_own_attributes():
    # on_records merges a record's attributes as the span is built: a record that cannot give them
    # (here a non-number energy) must neither lose the span nor its own attributes, nor raise
    exporter, proc, tp, tracer = pipeline(hold_timeout_s=60)
    bad = tracer.start_span("GET /bad", kind=SpanKind.SERVER, attributes={"http.route": "/bad"})
    good = tracer.start_span("GET /good", kind=SpanKind.SERVER, attributes={"http.route": "/good"})
    for s in (bad, good):
        proc.expect(s)
        s.end()
    early = tracer.start_span("GET /early", kind=SpanKind.SERVER, attributes={"http.route": "/early"})
    proc.expect(early)  # its record comes before it ends
    proc.on_records([make_record(bad.context.span_id, energy_j="lots"), make_record(good.context.span_id, seed=2),
                     make_record(early.context.span_id, seed=3)])
    early.end()
    got = {s.name: s.attributes for s in exporter.get_finished_spans()}
    assert set(got) == {"GET /bad", "GET /good", "GET /early"}
    assert got["GET /bad"]["wattspan.status"] == "pending" and got["GET /bad"]["http.route"] == "/bad"
    assert not any(k in got["GET /bad"] for k in ENERGY_KEYS)
    for name, seed in (("GET /good", 2), ("GET /early", 3)):
        want = record_attributes(make_record(0, seed=seed))
        assert dict(got[name]) == {"http.route": name[4:], **want}
        assert list(got[name])[0] == "http.route"  # the span's own attributes first, then ours
    assert proc.stats()["errors"] == 1 and proc.stats()["held"] == 0
    tp.shutdown()


def test_record_attributes_into_a_dict_is_the_merge():
    base = {"http.route": "/x", "wattspan.status": "pending"}
    for rec in (make_record(1, seed=1), make_record(2, seed=2, model="", tenant="", prompt_tokens=0)):
        into = dict(base)
        assert record_attributes(rec, into) is into
        assert list(into.items()) == list({**base, **record_attributes(rec)}.items())


def test_many_threads_each_span_exported_once_with_its_own_energy():
    exporter, proc, tp, tracer = pipeline(hold_timeout_s=60)
    n_threads, per = 4, 300
    expected: dict[int, float] = {}
    lock = threading.Lock()
    todo: queue.Queue = queue.Queue()

    def serve_requests(k: int) -> None:
        rng = random.Random(k)
        for j in range(per):
            s = tracer.start_span(f"r{k}-{j}", kind=SpanKind.SERVER)
            proc.expect(s)
            sid, energy = s.context.span_id, k * 1000.0 + j
            with lock:
                expected[sid] = energy
            if rng.random() < 0.3:  # the record wins the race
                proc.resolve(sid, {"wattspan.energy_j": energy})
                s.end()
            else:
                s.end()
                todo.put((sid, {"wattspan.energy_j": energy}))

    def resolver() -> None:
        while (item := todo.get()) is not None:
            proc.resolve(*item)

    resolvers = [threading.Thread(target=resolver) for _ in range(2)]
    workers = [threading.Thread(target=serve_requests, args=(k,)) for k in range(n_threads)]
    for t in resolvers + workers:
        t.start()
    for t in workers:
        t.join()
    for _ in resolvers:
        todo.put(None)
    for t in resolvers:
        t.join()
    out = exporter.get_finished_spans()
    assert len(out) == n_threads * per
    assert len({s.context.span_id for s in out}) == len(out)
    assert all(s.attributes["wattspan.energy_j"] == expected[s.context.span_id] for s in out)
    st = proc.stats()
    assert (st["final"], st["held"], st["expected"], st["early"], st["errors"]) == (n_threads * per, 0, 0, 0, 0)
    tp.shutdown()


# ---------------------------------------------------------------------------- real server spans


class ExpectAndResolve:
    """A tiny ASGI middleware inside the OTel one: marks the request's server span, and after
    the response hands its record to a thread that resolves it after ``delay_s`` once ``go`` is set."""

    def __init__(self, app, proc: EnergySpanProcessor, delay_s: float) -> None:
        self.app, self.proc, self.delay_s = app, proc, delay_s
        self.go = threading.Event()
        self.sent: dict[int, dict] = {}
        self.resolved_at: list[float] = []

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        span = trace.get_current_span()
        self.proc.expect(span)
        await self.app(scope, receive, send)
        sid = span.get_span_context().span_id
        i = int(scope["query_string"].decode().partition("=")[2] or 0)
        attrs = record_attributes(make_record(sid, seed=i))
        self.sent[sid] = attrs

        def later() -> None:
            self.go.wait(30)
            time.sleep(self.delay_s)
            self.resolved_at.append(time.monotonic())
            self.proc.resolve(sid, attrs)

        threading.Thread(target=later, daemon=True).start()


def test_asgi_server_spans_carry_energy_resolved_after_they_ended():
    exporter, proc, tp, _ = pipeline(hold_timeout_s=30)
    inner = ExpectAndResolve(starlette_app(), proc, delay_s=0.2)
    app = asgi.OpenTelemetryMiddleware(inner, tracer_provider=tp)
    n = 5
    with serve(app) as url, httpx.Client(base_url=url, timeout=10) as client:
        for i in range(n):
            r = client.get("/work", params={"i": i})
            assert r.status_code == 200 and r.json() == {"i": i}
        r = client.get("/stream", params={"i": n})
        assert r.text == "chunk0\nchunk1\nchunk2\n"
        assert wait_until(lambda: proc.stats()["held"] == n + 1)
        # the server spans have ended and are held; the send/receive spans went straight on
        assert server_spans(exporter) == []
        internal = exporter.get_finished_spans()
        assert internal and all("wattspan.status" not in s.attributes for s in internal)
        t_go = time.monotonic()
        inner.go.set()
        assert wait_until(lambda: len(server_spans(exporter)) == n + 1)
    spans = server_spans(exporter)
    assert {s.context.span_id for s in spans} == set(inner.sent)
    for s in spans:
        want = inner.sent[s.context.span_id]
        for key in (*ENERGY_KEYS, "hw.id", "gen_ai.request.model", "wattspan.tenant", "wattspan.simulated"):
            assert s.attributes[key] == want[key], key
        assert s.attributes["wattspan.status"] == "final"
        assert s.attributes.get("http.request.method", s.attributes.get("http.method")) == "GET"  # the instrumentation's own
    assert min(inner.resolved_at) - t_go >= 0.2
    assert proc.stats()["final"] == n + 1 and proc.stats()["pending_timeout"] == 0
    tp.shutdown()


def test_real_meter_resolves_server_spans_through_energy_middleware():
    from wattspan import EnergyMiddleware

    exporter, proc, tp, _ = pipeline(hold_timeout_s=30)
    records: list[RequestRecord] = []
    meter = replay_meter(sinks=[proc, RecordCallback(records.append)])
    app = asgi.OpenTelemetryMiddleware(EnergyMiddleware(starlette_app(), meter=meter, device="gpu0"), tracer_provider=tp)
    try:
        with serve(app) as url, httpx.Client(base_url=url, timeout=10) as client:
            for i in range(4):
                assert client.post("/embed", params={"i": i}, headers={"x-model": "minilm", "x-tenant-id": "acme"}).status_code == 200
            assert meter.flush(10)
            assert wait_until(lambda: len(server_spans(exporter)) == 4)
    finally:
        meter.close()
    by_span = {r.span_id: r for r in records}
    assert len(by_span) == 4
    for s in server_spans(exporter):
        rec = by_span[s.context.span_id]
        assert rec.trace_id == s.context.trace_id
        assert s.attributes["wattspan.energy_j"] == rec.energy_j > 0
        assert s.attributes["wattspan.request_id"] == rec.id
        assert (s.attributes["hw.id"], s.attributes["gen_ai.request.model"], s.attributes["wattspan.tenant"]) == ("gpu0", "minilm", "acme")
        assert s.attributes["wattspan.status"] == "final"
    tp.shutdown()


# ---------------------------------------------------------------------------- install


def test_install_adds_a_batching_energy_processor():
    from wattspan import Meter
    from wattspan.sources.replay import ReplaySource

    exporter = InMemorySpanExporter()
    tp = TracerProvider()
    meter = Meter(sources=[ReplaySource([constant_trace(100.0)])], autostart=False)
    proc = install(tp, exporter=exporter, hold_timeout_s=60, meter=meter)
    assert isinstance(proc, EnergySpanProcessor) and proc in meter.sinks
    s = tp.get_tracer("t").start_span("GET /", kind=SpanKind.SERVER)
    proc.expect(s)
    s.end()
    rec = make_record(s.context.span_id, seed=11)
    proc.resolve(s.context.span_id, record_attributes(rec))
    assert tp.force_flush()
    (out,) = exporter.get_finished_spans()
    assert out.attributes["wattspan.energy_j"] == rec.energy_j
    tp.shutdown()
    with pytest.raises(TypeError, match="SDK TracerProvider"):
        install(trace.NoOpTracerProvider(), exporter=InMemorySpanExporter())


# ---------------------------------------------------------------------------- metrics


def _points(reader: InMemoryMetricReader) -> dict[str, list]:
    out: dict[str, list] = {}
    data = reader.get_metrics_data()
    for rm in data.resource_metrics:
        for sm in rm.scope_metrics:
            for m in sm.metrics:
                out.setdefault(m.name, []).extend(m.data.data_points)
                assert m.unit in ("J", "g", "W", "s", "1"), m.unit
    return out


def test_metrics_sum_per_route_cap_tenants_and_report_devices():
    reader = InMemoryMetricReader()
    mp = MeterProvider(metric_readers=[reader])
    health = {"poll_errors": {"nvml": 3, "rapl": 0}, "dropped_rows": {"gpu0": 7}, "last_poll_age_s": 0.25}
    em = EnergyMetrics(mp, max_tenants=2, health=lambda: health)
    recs = [
        make_record(seed=i, route=route, tenant=tenant, status_code=code)
        for i, (route, tenant, code) in enumerate(
            [("/embed", "a", 200), ("/embed", "b", 200), ("/gen", "c", 503), ("/gen", "d", 200), ("/gen", "a", 200)]
        )
    ]
    for r in recs:
        em.observe(r)
    em.observe(make_record(seed=99, energy_j=math.nan))  # invalid: counted, not added
    em.observe_device("gpu0", 1234.5, 250.0, unattributed_j_total=12.0)
    em.observe_device("gpu1", None, 80.0)
    pts = _points(reader)

    energy = {}
    for p in pts["wattspan.energy"]:
        energy[p.attributes["http.route"]] = energy.get(p.attributes["http.route"], 0.0) + p.value
    for route in ("/embed", "/gen"):
        assert energy[route] == pytest.approx(sum(r.energy_j for r in recs if r.route == route), rel=1e-12)
    co2 = sum(p.value for p in pts["wattspan.co2e"])
    assert co2 == pytest.approx(sum(r.co2e_g for r in recs), rel=1e-12)
    assert sum(p.count for p in pts["wattspan.request.energy"]) == len(recs)
    tenants = {p.attributes["wattspan.tenant"] for p in pts["wattspan.energy"]}
    assert tenants == {"a", "b", "other"}
    assert {p.attributes["wattspan.status_class"] for p in pts["wattspan.energy"]} == {"2xx", "5xx"}
    assert em.stats()["tenants_overflowed"] == 2 and em.stats()["invalid"] == 1 and em.stats()["observed"] == len(recs)

    (hw_e,) = pts["hw.energy"]
    assert (hw_e.value, dict(hw_e.attributes)) == (1234.5, {"hw.id": "gpu0", "hw.type": "gpu"})
    assert {p.attributes["hw.id"]: p.value for p in pts["hw.power"]} == {"gpu0": 250.0, "gpu1": 80.0}
    assert [(p.attributes["hw.id"], p.value) for p in pts["wattspan.unattributed.energy"]] == [("gpu0", 12.0)]
    assert {p.attributes["wattspan.source"]: p.value for p in pts["wattspan.sampler.poll_errors"]} == {"nvml": 3, "rapl": 0}
    assert [(p.attributes["hw.id"], p.value) for p in pts["wattspan.sampler.dropped"]] == [("gpu0", 7)]
    assert [p.value for p in pts["wattspan.sampler.poll_age"]] == [0.25]
    mp.shutdown()


def _histograms(reader: InMemoryMetricReader) -> dict:
    """Every histogram point of the reader's latest collection: (name, attributes) -> its figures."""
    out = {}
    for rm in reader.get_metrics_data().resource_metrics:
        for sm in rm.scope_metrics:
            for m in sm.metrics:
                for p in m.data.data_points:
                    if hasattr(p, "bucket_counts"):
                        out[m.name, tuple(sorted(p.attributes.items()))] = (p.count, p.sum, tuple(p.bucket_counts), p.min, p.max)
    return out


@pytest.mark.parametrize("temporality", ["cumulative", "delta"])
def test_histograms_fed_per_label_set_equal_the_sdks_own_record_per_value(temporality):
    """The bulk path (a label set's values into the SDK's aggregation at once) exports exactly what
    Histogram.record per value does: counts, buckets, min, max, sums to rounding, over passes."""
    from opentelemetry.sdk.metrics import Histogram
    from opentelemetry.sdk.metrics.export import AggregationTemporality
    from opentelemetry.sdk.metrics.view import ExplicitBucketHistogramAggregation, View

    pref = {Histogram: AggregationTemporality.DELTA} if temporality == "delta" else {}
    readers = [InMemoryMetricReader(preferred_temporality=pref) for _ in range(2)]
    fast, slow = EnergyMetrics(MeterProvider(metric_readers=[readers[0]])), EnergyMetrics(MeterProvider(metric_readers=[readers[1]]))
    for h in (slow._req_energy, slow._req_co2e):
        h._usable = False  # the public path: Histogram.record, one value at a time
    rng = random.Random(5)
    for p in range(3):  # passes, collected in between (delta resets, cumulative adds up)
        recs = [make_record(seed=rng.randrange(10**6), route=rng.choice(["/a", "/b"]), tenant=rng.choice(["x", "y", None]),
                            model="m", energy_j=rng.choice([0.01, 0.03, 2.0, rng.uniform(0, 50)]), co2e_g=rng.uniform(0, 0.2))
                for _ in range(300)]
        fast.observe_many(recs)
        slow.observe_many(recs)
        assert fast._req_energy.bulk and fast._req_co2e.bulk and not slow._req_energy.bulk
        got, want = _histograms(readers[0]), _histograms(readers[1])
        assert got.keys() == want.keys() and len(got) >= 8
        for k, (n, total, buckets, low, high) in want.items():
            assert got[k][0] == n and got[k][2] == buckets and got[k][3:] == (low, high), k
            assert got[k][1] == pytest.approx(total, rel=1e-12), k
        assert sum(v[0] for (name, _), v in got.items() if name == "wattspan.request.energy") == (300 if temporality == "delta" else 300 * (p + 1))

    # a View that filters the attributes (or changes the aggregation) is the SDK's to apply: value by value
    reader = InMemoryMetricReader()
    view = View(instrument_name="wattspan.request.energy", attribute_keys={"http.route"},
                aggregation=ExplicitBucketHistogramAggregation((1.0, 10.0)))
    em = EnergyMetrics(MeterProvider(metric_readers=[reader], views=[view]))
    em.observe_many([make_record(seed=i, route="/a", energy_j=float(i)) for i in range(20)])
    assert not em._req_energy.bulk and em._req_co2e.bulk
    (pt,) = [v for (name, _), v in _histograms(reader).items() if name == "wattspan.request.energy"]
    assert pt[0] == 20 and pt[2] == (2, 9, 9) and pt[1] == sum(range(20))


def test_metrics_never_raise_a_failing_health_provider_is_counted():
    reader = InMemoryMetricReader()
    mp = MeterProvider(metric_readers=[reader])

    def health():
        raise RuntimeError("sampler gone")

    em = EnergyMetrics(mp, health=health)
    em.observe(make_record(seed=1))
    em.observe("not a record")  # type: ignore[arg-type]
    em.observe_device("gpu0", -5.0, 10.0)
    pts = _points(reader)
    assert sum(p.value for p in pts["wattspan.energy"]) == make_record(seed=1).energy_j
    assert "hw.energy" not in pts and [p.value for p in pts["hw.power"]] == [10.0]
    st = em.stats()
    assert st["errors"] >= 2 and st["invalid"] == 1  # the bad record, the health callbacks; the negative total
    with pytest.raises(ValueError, match="max_tenants"):
        EnergyMetrics(mp, max_tenants=0)
    with pytest.raises(TypeError, match="health"):
        EnergyMetrics(mp, health=42)
    mp.shutdown()


# ---------------------------------------------------------------------------- configure_from_env


def test_configure_from_env_none_and_resource(monkeypatch):
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "none")
    monkeypatch.setenv("OTEL_METRICS_EXPORTER", "none")
    monkeypatch.setenv("OTEL_SERVICE_NAME", "my-inference")
    setup = configure_from_env(set_global=False)
    assert setup.span_processor is None and setup.prometheus_address is None
    assert setup.tracer_provider.resource.attributes["service.name"] == "my-inference"
    setup.metrics.observe(make_record(seed=2))
    assert setup.metrics.stats()["observed"] == 1
    setup.shutdown()


@pytest.mark.parametrize(
    ("env", "match"),
    [
        ({"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_PROTOCOL": "carrier-pigeon"}, "OTEL_EXPORTER_OTLP_PROTOCOL"),
        ({"OTEL_TRACES_EXPORTER": "zipkin-ish"}, "zipkin-ish"),
        ({"OTEL_TRACES_EXPORTER": "none,otlp"}, "cannot be combined"),
        ({"OTEL_TRACES_EXPORTER": "none", "OTEL_METRICS_EXPORTER": "prometheus", "OTEL_EXPORTER_PROMETHEUS_PORT": "http"}, "OTEL_EXPORTER_PROMETHEUS_PORT"),
    ],
)
def test_configure_from_env_rejects_bad_settings_by_name(monkeypatch, env, match):
    monkeypatch.setenv("OTEL_METRICS_EXPORTER", "none")
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(ValueError, match=match):
        configure_from_env(set_global=False)


def test_configure_from_env_with_traces_off_wires_the_meter_to_the_metrics_only(monkeypatch):
    # metrics without traces (a Prometheus-only setup): the meter gets the metrics sink and no span
    # processor (there is none); it used to be handed None, which add_sink rejects with TypeError
    from wattspan import Meter
    from wattspan.sources.replay import ReplaySource

    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "none")
    monkeypatch.setenv("OTEL_METRICS_EXPORTER", "none")
    meter = Meter(sources=[ReplaySource([constant_trace(100.0)])], autostart=False)
    setup = configure_from_env(set_global=False, meter=meter)
    try:
        assert setup.span_processor is None
        assert meter.sinks == (setup.metrics,)
        assert not meter.holds_spans
    finally:
        setup.shutdown()


def test_configure_from_env_disabled_sdk_exports_nothing(monkeypatch):
    monkeypatch.setenv("OTEL_SDK_DISABLED", "true")
    monkeypatch.delenv("OTEL_TRACES_EXPORTER", raising=False)
    setup = configure_from_env(set_global=False)
    assert setup.span_processor is None
    setup.shutdown()


def test_configure_from_env_that_fails_after_prometheus_started_stops_it(monkeypatch):
    """A setup that fails once the /metrics server is up (here: the meter refuses the sinks) raises, and the
    server it started is shut down, not left serving a half set-up provider."""
    pytest.importorskip("opentelemetry.exporter.prometheus")
    port = free_port()
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "none")
    monkeypatch.setenv("OTEL_METRICS_EXPORTER", "prometheus")
    monkeypatch.setenv("OTEL_EXPORTER_PROMETHEUS_HOST", "127.0.0.1")
    monkeypatch.setenv("OTEL_EXPORTER_PROMETHEUS_PORT", str(port))

    class Refusing:
        sampler = None

        def add_sink(self, sink):
            raise RuntimeError("no sinks here")

    with pytest.raises(RuntimeError, match="no sinks here"):
        configure_from_env(set_global=False, meter=Refusing())
    with pytest.raises((urllib.error.URLError, ConnectionError, socket.timeout)):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2)


def test_configure_from_env_prometheus_serves_and_stops(monkeypatch):
    pytest.importorskip("opentelemetry.exporter.prometheus")
    port = free_port()
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "none")
    monkeypatch.setenv("OTEL_METRICS_EXPORTER", "prometheus")
    monkeypatch.setenv("OTEL_EXPORTER_PROMETHEUS_HOST", "127.0.0.1")
    monkeypatch.setenv("OTEL_EXPORTER_PROMETHEUS_PORT", str(port))
    setup = configure_from_env(set_global=False)
    try:
        assert setup.prometheus_address == ("127.0.0.1", port)
        rec = make_record(seed=4, route="/v1/chat")
        setup.metrics.observe(rec)
        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
        line = next(x for x in body.splitlines() if x.startswith("wattspan_energy_joules_total{") and 'http_route="/v1/chat"' in x)
        assert float(line.rsplit(" ", 1)[1]) == rec.energy_j
    finally:
        setup.shutdown()
    with pytest.raises((urllib.error.URLError, ConnectionError, socket.timeout)):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2)


def test_force_flush_during_a_resolve_keeps_the_resolved_spans_own_attributes():
    # resolve() takes a held span under the lock and builds it outside; a force_flush (another
    # thread) in between must not drop the span's own attributes (it cleared every held dict)
    exporter, proc, tp, tracer = pipeline(hold_timeout_s=60)
    s = tracer.start_span("a", kind=SpanKind.SERVER, attributes={"user.key": "kept"})
    proc.expect(s)
    s.end()
    other = tracer.start_span("b", kind=SpanKind.SERVER)
    proc.expect(other)
    other.end()
    finish = proc._finish
    flushed = []

    def finish_after_a_flush(span_id, entry, extra):
        if not flushed:
            flushed.append(1)
            t = threading.Thread(target=proc.force_flush)
            t.start()
            t.join()
        return finish(span_id, entry, extra)

    proc._finish = finish_after_a_flush
    proc.on_records([make_record(s.get_span_context().span_id)])
    (got,) = [x for x in exporter.get_finished_spans() if x.name == "a"]
    assert got.attributes["wattspan.status"] == "final"
    assert got.attributes["user.key"] == "kept"
    tp.shutdown()


def test_the_metrics_flush_at_shutdown_keeps_to_its_time_with_a_collector_that_never_answers():
    # the SDK's OTLP exporter waits its own 10 s whatever the flush is given: a SIGTERM's drain ran 9-19 s past
    # shutdown_timeout_s, and the flush said True
    from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
    from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader

    from wattspan.export.otel import EnergyMetrics
    from wattspan.meter.sinks import DeviceFigures

    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(16)
    held: list[socket.socket] = []
    def hold() -> None:  # accept, never answer
        try:
            for _ in range(16):
                held.append(srv.accept()[0])
        except OSError:  # closed at the test's end
            pass

    th = threading.Thread(target=hold, daemon=True)
    th.start()
    exp = OTLPMetricExporter(endpoint=f"http://127.0.0.1:{srv.getsockname()[1]}/v1/metrics", timeout=5)
    mp = MeterProvider(metric_readers=[PeriodicExportingMetricReader(exp, export_interval_millis=600_000)])
    em = EnergyMetrics(mp)
    try:
        em.on_device(DeviceFigures("gpu0", "gpu", 10.0, 100.0, 1.0))
        t0 = time.monotonic()
        assert em.flush(0.3) is False
        assert time.monotonic() - t0 < 2.0
        assert em.stats()["flush_overran"] == 1
    finally:
        try:
            srv.shutdown(socket.SHUT_RDWR)  # wakes the accept
        except OSError:
            pass
        srv.close()
        th.join(5)
        for c in held:
            c.close()


def test_many_tenants_times_many_models_never_push_a_route_out_of_the_metrics():
    # tenants and models are capped one by one (100 each), but their product went past the SDK's 2,000 label
    # sets a metric: a new route's energy then sat in the unlabelled otel.metric.overflow series, counted nowhere
    from wattspan import RequestRecord
    from wattspan.export.otel import EnergyMetrics

    reader = InMemoryMetricReader()
    em = EnergyMetrics(MeterProvider(metric_readers=[reader]))

    def rec(i, route, tenant, model):
        return RequestRecord(id=f"r{i}", device="gpu0", start_ns=0, end_ns=1, energy_j=1.0, dynamic_j=1.0, idle_j=0.0,
                             device_s=0.1, co2e_g=0.001, route=route, tenant=tenant, model=model, status_code=200)

    em.observe_many([rec(t * 50 + m, "/v1/chat", f"junk{t}", f"junk{m}") for t in range(50) for m in range(50)])
    em.observe_many([rec(10_000 + i, "/v1/embeddings", "acme", "m") for i in range(20)])
    pts = [p for rm in reader.get_metrics_data().resource_metrics for sm in rm.scope_metrics for mt in sm.metrics
           if mt.name == "wattspan.energy" for p in mt.data.data_points]
    assert not [p for p in pts if p.attributes.get("otel.metric.overflow")]
    assert sum(p.value for p in pts if p.attributes.get("http.route") == "/v1/embeddings") == pytest.approx(20.0)
    assert sum(p.value for p in pts) == pytest.approx(2520.0)  # every joule under some label set
    assert em.stats()["label_sets_folded"] > 0 and len(pts) < 2000
