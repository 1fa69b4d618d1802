"""The span processor's export path: held spans packed and finished once, a pass's spans handed to a
BatchSpanProcessor's queue at once, and what the queue has no room for deferred, never lost silently.

Each fast path is compared with the fallback it replaces (the span held as it is, copied with the
attributes merged, and passed on through ``on_end``): the exported spans must be the same, field for
field and as OTLP bytes."""

from __future__ import annotations

import gc
import logging
import threading
import time

import pytest

pytest.importorskip("opentelemetry.sdk")

from opentelemetry import trace  # noqa: E402
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans  # noqa: E402
from opentelemetry.sdk.resources import Resource  # noqa: E402
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider  # noqa: E402
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult  # noqa: E402
from opentelemetry.trace import SpanKind, Status, StatusCode, TraceFlags, TraceState  # noqa: E402

from wattspan.export.otel import EnergySpanProcessor, record_attributes  # noqa: E402
from wattspan.export.otel import spans as spans_mod  # noqa: E402

from .test_otel import make_record, wait_until  # noqa: E402


class Collect(SpanExporter):
    """Keeps what it exports; ``gate`` (an Event) blocks each export until set."""

    def __init__(self, gate: threading.Event | None = None) -> None:
        self.spans: list[ReadableSpan] = []
        self.gate = gate
        self.lock = threading.Lock()

    def export(self, spans):
        if self.gate is not None:
            self.gate.wait(30)
        with self.lock:
            self.spans.extend(spans)
        return SpanExportResult.SUCCESS

    def shutdown(self):
        pass


FIELDS = ("name", "context", "parent", "kind", "start_time", "end_time", "resource", "instrumentation_scope",
          "dropped_events", "dropped_links", "dropped_attributes")


def _run_pipeline(fast: bool, monkeypatch) -> list[ReadableSpan]:
    """A fixed set of server spans (plain, with a remote parent and a trace state, with an error status,
    with an event, one whose record came before it ended, one left pending) through a BatchSpanProcessor,
    on the fast path or with every fast path off."""
    monkeypatch.setattr(spans_mod, "_FAST", fast)
    exporter = Collect()
    proc = EnergySpanProcessor(BatchSpanProcessor(exporter, schedule_delay_millis=60_000), hold_timeout_s=60)
    if not fast:
        proc._batch = None  # the BatchSpanProcessor's public on_end, span by span
    assert (proc._batch is not None) is fast
    tp = TracerProvider(resource=Resource.create({"service.name": "svc"}))
    tp.add_span_processor(proc)
    tracer = tp.get_tracer("scope", "1.2")
    ids = iter(range(1, 1000))
    remote = trace.SpanContext(0xABCDEF, 0x1234, is_remote=True, trace_flags=TraceFlags(TraceFlags.SAMPLED),
                               trace_state=TraceState([("vendor", "v1")]))
    made = []

    def server(name, parent=None, **attrs):
        ctx = trace.set_span_in_context(trace.NonRecordingSpan(parent)) if parent is not None else None
        s = tracer.start_span(name, context=ctx, kind=SpanKind.SERVER, start_time=next(ids) * 1000,
                              attributes={"http.route": f"/{name}", "n": len(made), **attrs})
        proc.expect(s)
        made.append(s)
        return s

    plain = [server(f"plain{i}") for i in range(5)]
    child = server("child", remote, tags=("a", "b"))
    err = server("err")
    err.set_status(Status(StatusCode.ERROR, "boom"))
    ev = server("event")
    ev.add_event("e", {"k": 1}, timestamp=5000)
    early = server("early")
    pending = server("pending")
    proc.resolve(early.context.span_id, record_attributes(make_record(early.context.span_id, seed=99)))
    for s in made:
        s.end(end_time=next(ids) * 1000 + 10**6)
    # one pass's records (the pending one gets none), resolved together as the meter does
    proc.on_records([make_record(s.context.span_id, seed=i) for i, s in enumerate([*plain, child, err, ev])])
    del pending
    tp.force_flush()  # the pending span goes on marked pending
    tp.shutdown()
    return sorted(exporter.spans, key=lambda s: s.name)


def test_the_fast_path_exports_what_the_fallback_exports(monkeypatch):
    with monkeypatch.context() as m:
        slow = _run_pipeline(False, m)
    fast = _run_pipeline(True, monkeypatch)
    assert [s.name for s in fast] == [s.name for s in slow] == sorted(
        ["child", "early", "err", "event", "pending"] + [f"plain{i}" for i in range(5)])
    for a, b in zip(fast, slow):
        # ids differ between the two runs (random): compare the rest, and the parent/trace state as given
        assert (a.name, a.kind, a.start_time, a.end_time) == (b.name, b.kind, b.start_time, b.end_time)
        assert a.resource.attributes == b.resource.attributes and a.instrumentation_scope == b.instrumentation_scope
        assert (a.status.status_code, a.status.description) == (b.status.status_code, b.status.description)
        assert [(e.name, dict(e.attributes)) for e in a.events] == [(e.name, dict(e.attributes)) for e in b.events]
        assert (a.dropped_attributes, a.dropped_events, a.dropped_links) == (b.dropped_attributes, b.dropped_events, b.dropped_links)
        assert dict(a.attributes) == dict(b.attributes)
        assert (a.context.trace_flags, a.context.is_remote, a.context.is_valid, dict(a.context.trace_state)) == (
            b.context.trace_flags, b.context.is_remote, b.context.is_valid, dict(b.context.trace_state))
        assert (a.parent is None) == (b.parent is None)
        if a.parent is not None:
            assert a.parent == b.parent  # the remote parent given: the same in both
            assert a.context.trace_id == a.parent.trace_id == 0xABCDEF
            assert dict(a.parent.trace_state) == {"vendor": "v1"} and a.parent.is_remote
    by = {s.name: s for s in fast}
    assert by["pending"].attributes["wattspan.status"] == "pending"
    assert by["err"].status.status_code == StatusCode.ERROR and by["err"].status.description == "boom"
    assert by["child"].attributes["tags"] == ("a", "b")
    assert all(by[n].attributes["wattspan.status"] == "final" for n in by if n != "pending")

    def otlp_spans(spans):
        pb = encode_spans(spans)
        out = []
        for rs in pb.resource_spans:
            for ss in rs.scope_spans:
                for sp in ss.spans:
                    sp.span_id, sp.trace_id = b"", b""
                    out.append(sp)
        return out

    def otlp(spans):  # the OTLP bytes, with the random ids of each run blanked out
        pb = encode_spans(spans)
        for rs in pb.resource_spans:
            for ss in rs.scope_spans:
                for sp in ss.spans:
                    sp.span_id, sp.trace_id = b"", b""
        return pb.SerializeToString(deterministic=True)

    assert [str(x) for x in otlp_spans(fast)] == [str(x) for x in otlp_spans(slow)]
    assert otlp(fast) == otlp(slow)


def test_plain_held_spans_are_packed_and_others_held_as_they_are():
    exporter = Collect()
    proc = EnergySpanProcessor(BatchSpanProcessor(exporter), hold_timeout_s=60)
    tp = TracerProvider()
    tp.add_span_processor(proc)
    tracer = tp.get_tracer("t")
    plain = tracer.start_span("plain", kind=SpanKind.SERVER, attributes={"a": 1})
    ev = tracer.start_span("event", kind=SpanKind.SERVER)
    ev.add_event("x")
    for s in (plain, ev):
        proc.expect(s)
        s.end()
    held = dict(proc._held)
    packed, kept = held[plain.context.span_id], held[ev.context.span_id]
    # packed: no SDK object of the span left to keep alive (only the resource/scope index)
    assert not any(isinstance(x, (ReadableSpan, trace.SpanContext, Status)) for x in packed)
    assert len(kept) == 2 and isinstance(kept[1], ReadableSpan)
    gc.collect()  # the collector stops tracking the packed entry's tuples, then the entry: nothing left to scan
    gc.collect()
    assert not gc.is_tracked(packed) and gc.is_tracked(kept)
    tp.shutdown()


def _held_behind_a_small_queue(n):
    """``n`` ended server spans held by an EnergySpanProcessor in front of a BatchSpanProcessor whose queue holds
    64 and whose exporter waits for ``gate``: (gate, exporter, bsp, proc, tp, spans)."""
    gate = threading.Event()
    exporter = Collect(gate)
    bsp = BatchSpanProcessor(exporter, max_queue_size=64, max_export_batch_size=16, schedule_delay_millis=60_000)
    proc = EnergySpanProcessor(bsp, hold_timeout_s=60)
    tp = TracerProvider()
    tp.add_span_processor(proc)
    tracer = tp.get_tracer("t")
    spans = []
    for i in range(n):
        s = tracer.start_span(f"r{i}", kind=SpanKind.SERVER)
        proc.expect(s)
        s.end()
        spans.append(s)
    return gate, exporter, bsp, proc, tp, spans


def test_a_pass_bigger_than_the_exporters_queue_is_deferred_not_dropped(caplog):
    gate, exporter, bsp, proc, tp, spans = _held_behind_a_small_queue(500)
    with caplog.at_level(logging.WARNING):
        proc.on_records([make_record(s.context.span_id, seed=i) for i, s in enumerate(spans)])  # one pass: 500 spans
        st = proc.stats()
        assert st["final"] == 500 and st["export_deferred"] > 400 and st["export_dropped"] == 0
        assert st["export_waiting"] > 0 and len(bsp._batch_processor._queue) <= 64
        gate.set()  # the exporter catches up; the timer hands over the rest
        assert proc.force_flush(30_000)
    assert proc.stats()["export_waiting"] == 0
    got = [s.context.span_id for s in exporter.spans]
    assert sorted(got) == sorted(s.context.span_id for s in spans)  # every span exactly once
    assert all(s.attributes["wattspan.status"] == "final" for s in exporter.spans)
    assert "Queue full" not in caplog.text  # the SDK never had to push a span out
    tp.shutdown()


def test_deferred_spans_reach_the_exporter_without_a_flush_when_a_batch_fills_the_queue():
    """max_export_batch_size == max_queue_size: the exporter's thread exports only full batches when woken,
    so the spans handed over must fill the queue to the batch size, and the timer hands over the rest."""
    exporter = Collect()
    bsp = BatchSpanProcessor(exporter, max_queue_size=64, max_export_batch_size=64, schedule_delay_millis=60_000)
    proc = EnergySpanProcessor(bsp, hold_timeout_s=60)
    tp = TracerProvider()
    tp.add_span_processor(proc)
    tracer = tp.get_tracer("t")
    spans = []
    for i in range(320):  # five full batches
        s = tracer.start_span(f"r{i}", kind=SpanKind.SERVER)
        proc.expect(s)
        s.end()
        spans.append(s)
    proc.on_records([make_record(s.context.span_id, seed=i) for i, s in enumerate(spans)])
    assert wait_until(lambda: len(exporter.spans) == 320, timeout=10.0)  # no force_flush: the timer and the worker
    assert proc.stats()["export_waiting"] == 0 and proc.stats()["export_dropped"] == 0
    tp.shutdown()


def test_spans_beyond_max_held_waiting_for_the_exporter_are_counted_and_logged(caplog):
    gate = threading.Event()
    exporter = Collect(gate)
    bsp = BatchSpanProcessor(exporter, max_queue_size=64, max_export_batch_size=16, schedule_delay_millis=60_000)
    proc = EnergySpanProcessor(bsp, hold_timeout_s=60, max_held=100)
    tp = TracerProvider()
    tp.add_span_processor(proc)
    tracer = tp.get_tracer("t")
    with caplog.at_level(logging.WARNING, logger="wattspan"):
        for k in range(3):  # three passes of 100 while the exporter is stuck: the outbox passes max_held
            spans = []
            for i in range(100):
                s = tracer.start_span(f"r{k}-{i}", kind=SpanKind.SERVER)
                proc.expect(s)
                s.end()
                spans.append(s)
            proc.on_records([make_record(s.context.span_id, seed=i) for i, s in enumerate(spans)])
    st = proc.stats()
    gate.set()
    proc.force_flush(30_000)
    dropped = st["export_dropped"]
    assert dropped > 0 and "dropped the" in caplog.text
    assert len(exporter.spans) + dropped == 300  # every span either exported or counted as dropped
    assert len({s.context.span_id for s in exporter.spans}) == len(exporter.spans)
    tp.shutdown()


def test_another_span_processor_downstream_gets_each_span_through_on_end():
    got = []

    class Mine(BatchSpanProcessor):  # a subclass: its own on_end must be called
        def on_end(self, span):
            got.append(span)

    proc = EnergySpanProcessor(Mine(Collect()), hold_timeout_s=60)
    assert proc._batch is None
    tp = TracerProvider()
    tp.add_span_processor(proc)
    s = tp.get_tracer("t").start_span("x", kind=SpanKind.SERVER)
    proc.expect(s)
    s.end()
    proc.on_records([make_record(s.context.span_id)])
    assert [x.name for x in got] == ["x"] and got[0].attributes["wattspan.status"] == "final"
    tp.shutdown()


def test_spans_waiting_when_the_exporter_shuts_down_go_to_its_on_end_and_flush_does_not_spin():
    gate, exporter, bsp, proc, tp, spans = _held_behind_a_small_queue(200)
    proc.on_records([make_record(s.context.span_id, seed=i) for i, s in enumerate(spans)])
    assert proc.stats()["export_waiting"] > 0
    gate.set()
    bsp.shutdown()  # the exporter goes away first (a user's order of shutdown)
    t0 = time.monotonic()
    proc.force_flush(2_000)
    assert time.monotonic() - t0 < 1.5  # no busy wait for the whole timeout
    assert proc.stats()["export_waiting"] == 0  # handed to the SDK's on_end, which refuses them after shutdown
    proc.shutdown()


@pytest.mark.parametrize("how", ["force_flush", "shutdown", "timeout"])
def test_one_held_span_failing_to_build_loses_no_other(how, monkeypatch, caplog):
    """Flushing, shutting down or timing out several held spans: one whose pending span cannot be built
    goes on as it ended (counted, logged), the others as pending; nothing raises, none is sent twice."""
    exporter = Collect()
    proc = EnergySpanProcessor(BatchSpanProcessor(exporter, schedule_delay_millis=60_000),
                               hold_timeout_s=0.2 if how == "timeout" else 60)
    tp = TracerProvider()
    tp.add_span_processor(proc)
    tracer = tp.get_tracer("t")
    spans = []
    for i in range(5):
        s = tracer.start_span(f"s{i}", kind=SpanKind.SERVER, attributes={"i": i})
        proc.expect(s)
        s.end()
        spans.append(s)
    bad = spans[2].context.span_id
    finish = proc._finish

    def failing(span_id, entry, extra):
        if span_id == bad and extra is spans_mod._PENDING:
            raise RuntimeError("boom")
        return finish(span_id, entry, extra)

    monkeypatch.setattr(proc, "_finish", failing)
    if how == "force_flush":
        assert proc.force_flush() is True
    elif how == "shutdown":
        proc.shutdown()
    else:
        assert wait_until(lambda: not proc._held, 10)
        proc.force_flush()
    got = {s.name: s.attributes.get("wattspan.status") for s in exporter.spans}
    assert len(exporter.spans) == 5 and set(got) == {f"s{i}" for i in range(5)}  # each once
    assert got["s2"] is None and all(got[f"s{i}"] == "pending" for i in (0, 1, 3, 4))
    assert proc.stats()["errors"] == 1 and not proc._held
    if how != "shutdown":
        tp.shutdown()


def test_spans_still_waiting_for_the_exporter_at_shutdown_are_counted_and_logged_never_sent_twice(monkeypatch, caplog):
    gate, exporter, bsp, proc, tp, spans = _held_behind_a_small_queue(200)
    proc.on_records([make_record(s.context.span_id, seed=i) for i, s in enumerate(spans)])
    waiting = proc.stats()["export_waiting"]
    assert waiting > 0
    monkeypatch.setattr(proc, "_drain_outbox", lambda timeout_s: None)  # the exporter too slow: no room made in time
    threading.Timer(0.3, gate.set).start()  # ... until the SDK's own shutdown exports its queue
    with caplog.at_level(logging.ERROR):
        proc.shutdown()
    st = proc.stats()
    assert st["export_waiting"] == 0 and 0 < st["export_dropped"] <= waiting  # (the timer may have handed some over)
    assert "still waiting for room" in caplog.text
    got = [s.context.span_id for s in exporter.spans]
    assert len(got) == len(set(got)) and len(got) + st["export_dropped"] == 200  # each span sent once, or counted


def test_the_middleware_reads_the_current_spans_ids_on_every_kind_of_span():
    """The window's span lookup (a fast path for the SDK's own span classes, the API's methods
    for any other span): the same ids, and none for a span that records nothing."""
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags

    from wattspan.asgi import _span_ids

    tracer = TracerProvider().get_tracer("t")
    span = tracer.start_span("GET /")
    ctx = span.get_span_context()
    with trace.use_span(span, end_on_exit=False):
        assert _span_ids() == (ctx.trace_id, ctx.span_id, span)
    span.end()
    with trace.use_span(span, end_on_exit=False):
        assert _span_ids() == (0, 0, None)  # ended: on_end has run already, nothing to hold
    remote = NonRecordingSpan(SpanContext(0x1234, 0x56, is_remote=True, trace_flags=TraceFlags(1)))
    with trace.use_span(remote):
        assert _span_ids() == (0, 0, None)  # not recording: no span of this process will end

    class Mine(NonRecordingSpan):  # a span of another implementation, recording
        def is_recording(self) -> bool:
            return True

    mine = Mine(SpanContext(0xABC, 0xDEF, is_remote=False))
    with trace.use_span(mine):
        assert _span_ids() == (0xABC, 0xDEF, mine)
    assert _span_ids() == (0, 0, None)


def test_only_spans_without_events_links_or_drops_are_held_packed():
    """_pack reads the SDK's BoundedList deques directly: a span with an event, a link, or an event
    dropped by the limits (an empty list with a count) is held as it is, so nothing of it is lost."""
    from opentelemetry.sdk.trace import SpanLimits

    assert spans_mod._BoundedList is not None  # the SDK installed is the one the fast check expects
    proc = EnergySpanProcessor(BatchSpanProcessor(Collect()), hold_timeout_s=60)
    tp = TracerProvider(span_limits=SpanLimits(max_events=0))
    tracer = tp.get_tracer("scope")
    link = trace.SpanContext(5, 6, is_remote=False, trace_flags=TraceFlags(TraceFlags.SAMPLED))

    def ended(event=False, links=()):
        s = tracer.start_span("s", kind=SpanKind.SERVER, links=[trace.Link(c) for c in links], attributes={"a": 1})
        if event:
            s.add_event("e")  # max_events=0: dropped, counted
        s.end()
        return s._readable_span()

    plain = ended()
    entry, attrs = proc._pack(plain, 1.0)
    assert len(entry) == 14 and entry[0] == 1.0 and attrs == {"a": 1}
    assert spans_mod._KINDS[entry[9]] is SpanKind.SERVER
    for span in (ended(event=True), ended(links=[link])):
        entry, attrs = proc._pack(span, 1.0)
        assert entry == (1.0, span) and attrs is None
    dropped = ended(event=True)
    assert dropped.dropped_events == 1 and not dropped.events
    tp.shutdown()


def test_held_spans_of_several_providers_and_scopes_keep_their_own_resource_and_scope():
    # one processor behind two tracer providers (two resources) and two tracers each (two scopes), their
    # server spans interleaved: each packed span is rebuilt with its own resource and scope (the
    # processor remembers the last span's and must not hand it to the next one of another)
    exporter = Collect()
    proc = EnergySpanProcessor(BatchSpanProcessor(exporter, schedule_delay_millis=60_000), hold_timeout_s=60)
    tracers = []
    for svc in ("a", "b"):
        tp = TracerProvider(resource=Resource.create({"service.name": svc}))
        tp.add_span_processor(proc)
        tracers += [(svc, scope, tp.get_tracer(scope)) for scope in ("s1", "s2")]
    made = []
    for i in range(12):
        svc, scope, tracer = tracers[(i * 3) % 4]
        s = tracer.start_span(f"{svc}-{scope}-{i}", kind=SpanKind.SERVER)
        proc.expect(s)
        s.end()
        made.append(s)
    assert len(proc._held) == 12 and len(proc._shared) == 4  # all held packed
    proc.on_records([make_record(s.context.span_id, seed=i) for i, s in enumerate(made)])
    proc.force_flush()
    assert len(exporter.spans) == 12
    for s in exporter.spans:
        svc, scope, _ = s.name.split("-")
        assert s.resource.attributes["service.name"] == svc and s.instrumentation_scope.name == scope
        assert s.attributes["wattspan.status"] == "final"
