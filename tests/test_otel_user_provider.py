"""An app with its own TracerProvider and FastAPIInstrumentor: energy lands on its own server spans."""

from __future__ import annotations

import httpx
from fastapi import FastAPI
from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from wattspan import EnergyMiddleware
from wattspan.export.otel import wrap_provider

from .conftest import serve


def test_energy_attributes_arrive_on_the_users_own_server_spans(live_meter):
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))  # the user's own pipeline

    app = FastAPI()

    @app.get("/items/{item_id}")
    async def item(item_id: int):
        return {"id": item_id}

    app.add_middleware(EnergyMiddleware, meter=live_meter)
    FastAPIInstrumentor.instrument_app(app, tracer_provider=provider)
    wrap_provider(provider, meter=live_meter)
    try:
        with serve(app) as url:
            for i in range(5):
                assert httpx.get(f"{url}/items/{i}").status_code == 200
        assert live_meter.flush(10)
        provider.force_flush()
    finally:
        FastAPIInstrumentor.uninstrument_app(app)
    servers = [s for s in exporter.get_finished_spans() if s.kind.name == "SERVER"]
    assert len(servers) == 5
    by_span = {r.span_id: r for r in live_meter.records}
    for s in servers:
        a = s.attributes
        assert a["wattspan.status"] == "final"
        rec = by_span[s.context.span_id]
        assert a["wattspan.energy_j"] == rec.energy_j and a["wattspan.co2e_g"] == rec.co2e_g
        assert a["http.route"] == "/items/{item_id}" and rec.route == "/items/{item_id}"
    # each span went out exactly once
    assert len({s.context.span_id for s in servers}) == 5
