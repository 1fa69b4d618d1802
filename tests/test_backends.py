"""wattspan's energy in real backends the tests start: Arize Phoenix (OTLP/HTTP and OTLP/gRPC
traces, read back over its REST API) and Prometheus (scraping the OTel Prometheus exporter,
queried with PromQL). A real uvicorn server, the real ASGI instrumentation, the real Meter."""

from __future__ import annotations

import asyncio
import uuid

import pytest

pytest.importorskip("opentelemetry.sdk")
httpx = pytest.importorskip("httpx")
pytest.importorskip("starlette")
asgi = pytest.importorskip("opentelemetry.instrumentation.asgi")

from starlette.applications import Starlette  # noqa: E402
from starlette.responses import JSONResponse  # noqa: E402
from starlette.routing import Route  # noqa: E402

from wattspan import EnergyMiddleware, Meter, RequestRecord  # noqa: E402
from wattspan.carbon import CarbonModel  # noqa: E402
from wattspan.export.otel import EnergyMetrics, configure_from_env  # noqa: E402
from wattspan.sources.replay import ReplaySource  # noqa: E402
from wattspan.meter import RecordCallback

from .backends import otel_prometheus, phoenix, prometheus  # noqa: E402, F401 - fixtures
from .conftest import constant_trace, serve  # noqa: E402

pytestmark = pytest.mark.backend

# route -> (requests, model, tenant)
TRAFFIC = {"/v1/embeddings": (3, "minilm", "acme"), "/v1/completions": (2, "tiny-gen", "globex")}


async def _ok(request):
    await asyncio.sleep(0.01)
    return JSONResponse({"ok": True})


def app_for(meter: Meter, tracer_provider=None):
    inner = Starlette(routes=[Route(r, _ok, methods=["POST"]) for r in TRAFFIC])
    app = EnergyMiddleware(inner, meter=meter, device="gpu0")
    return asgi.OpenTelemetryMiddleware(app, tracer_provider=tracer_provider) if tracer_provider is not None else app


def replay_meter(**kw) -> Meter:
    return Meter(sources=[ReplaySource([constant_trace(100.0)])], idle_w=40.0, carbon=CarbonModel(intensity_g_per_kwh=400.0), period_s=0.05, lag_s=0.05, **kw)


def send_traffic(url: str) -> int:
    n = 0
    with httpx.Client(base_url=url, timeout=10) as client:
        for route, (count, model, tenant) in TRAFFIC.items():
            for _ in range(count):
                r = client.post(route, headers={"x-model": model, "x-tenant-id": tenant})
                assert r.status_code == 200
                n += 1
    return n


def wait_until(cond, timeout: float = 10.0) -> bool:
    import time

    end = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > end:
            return False
        time.sleep(0.02)
    return True


@pytest.mark.parametrize("protocol", ["http/protobuf", "grpc"])
def test_phoenix_stores_energy_on_server_spans(phoenix, protocol, monkeypatch):  # noqa: F811
    project = f"wattspan-{protocol.split('/')[0]}-{uuid.uuid4().hex[:8]}"
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "otlp")
    monkeypatch.setenv("OTEL_METRICS_EXPORTER", "none")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", protocol)
    if protocol == "grpc":
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", phoenix.grpc_endpoint)  # http:// = plaintext
    else:
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", phoenix.traces_url)
    monkeypatch.setenv("OTEL_SERVICE_NAME", "wattspan-test")
    monkeypatch.setenv("OTEL_RESOURCE_ATTRIBUTES", f"openinference.project.name={project}")
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "100")
    setup = configure_from_env(set_global=False, hold_timeout_s=20)
    proc = setup.span_processor
    records: list[RequestRecord] = []
    meter = replay_meter(sinks=[RecordCallback(records.append)])
    meter.add_sink(proc)
    try:
        with serve(app_for(meter, setup.tracer_provider)) as url:
            n = send_traffic(url)
            assert meter.flush(10)
            # every held span resolved (flushing earlier would send them on as pending)
            assert wait_until(lambda: proc.stats()["final"] == n), proc.stats()
        assert setup.tracer_provider.force_flush()
        roots = phoenix.wait_for_spans(project, n, where=lambda s: s["parent_id"] is None)
    finally:
        meter.close()
        setup.shutdown()
    by_span = {f"{r.span_id:016x}": r for r in records}
    assert len(roots) == n == len(by_span)
    for s in roots:
        rec = by_span[s["context"]["span_id"]]
        a = s["attributes"]
        assert s["context"]["trace_id"] == f"{rec.trace_id:032x}"
        assert a["wattspan.energy_j"] == pytest.approx(rec.energy_j, rel=1e-12) and rec.energy_j > 0
        assert a["wattspan.co2e_g"] == pytest.approx(rec.co2e_g, rel=1e-12) and rec.co2e_g > 0
        assert a["wattspan.status"] == "final" and a["wattspan.request_id"] == rec.id
        assert a["wattspan.simulated"] is False and a["wattspan.method"] == rec.method
        assert (a["hw.id"], a["hw.type"]) == ("gpu0", "gpu")
        model, tenant = TRAFFIC[rec.route][1:]
        assert (a["gen_ai.request.model"], a["wattspan.tenant"]) == (model, tenant)
        assert a.get("http.request.method", a.get("http.method")) == "POST"  # the instrumentation's own
    assert proc.stats()["pending_timeout"] == 0


def test_prometheus_sums_energy_per_route(prometheus, otel_prometheus):  # noqa: F811
    metrics = EnergyMetrics(otel_prometheus.meter_provider)
    records: list[RequestRecord] = []
    meter = replay_meter(sinks=[RecordCallback(records.append), metrics])
    try:
        with serve(app_for(meter)) as url:
            n = send_traffic(url)
            assert meter.flush(10)
        assert len(records) == n
        metrics.observe_device("gpu0", sum(meter.device_energy_j.values()), 100.0)
    finally:
        meter.close()
    want = {}
    for r in records:
        want[r.route] = want.get(r.route, 0.0) + r.energy_j
    assert set(want) == set(TRAFFIC) and all(v > 0 for v in want.values())

    def per_route(res):
        return {x["metric"]["http_route"]: float(x["value"][1]) for x in res}

    res = prometheus.wait_for(
        "sum by (http_route) (wattspan_energy_joules_total)",
        lambda res: per_route(res).keys() == want.keys() and all(per_route(res)[k] == pytest.approx(v, rel=1e-9) for k, v in want.items()),
    )
    assert len(res) == len(TRAFFIC)
    counts = per_route(prometheus.query("sum by (http_route) (wattspan_request_energy_joules_count)"))
    assert counts == {route: float(c) for route, (c, _, _) in TRAFFIC.items()}
    tenants = per_route(prometheus.query('sum by (http_route) (wattspan_co2e_grams_total{wattspan_tenant="acme"})'))
    assert tenants.keys() == {"/v1/embeddings"}
    (hw,) = prometheus.query('hw_energy_joules_total{hw_id="gpu0",hw_type="gpu"}')
    assert float(hw["value"][1]) == pytest.approx(sum(meter.device_energy_j.values()), rel=1e-9)
