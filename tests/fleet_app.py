"""One replica of a fleet for test_budgets_fleet.py: a metered app whose OTel metrics a real
Prometheus scrapes, enforcing a budget whose spend it reads back from that Prometheus.

Environment: WATTSPAN_TEST_METRICS_PORT (its /metrics), WATTSPAN_BUDGETS (the budget file),
WATTSPAN_TEST_LEDGER (its own ledger, so the test can check what each replica spent)."""

from __future__ import annotations

import asyncio
import os

from opentelemetry import metrics as otel_metrics
from opentelemetry.exporter.prometheus import PrometheusMetricReader
from opentelemetry.sdk.metrics import MeterProvider
from prometheus_client import REGISTRY, start_http_server
from starlette.applications import Starlette
from starlette.responses import JSONResponse
from starlette.routing import Route

from wattspan import EnergyMiddleware, Meter
from wattspan.budgets import BudgetMiddleware
from wattspan.carbon import CarbonModel
from wattspan.export.ledger import Ledger
from wattspan.export.otel import EnergyMetrics, connect_metrics
from wattspan.sources.replay import ReplaySource

from tests.conftest import constant_trace

provider = MeterProvider(metric_readers=[PrometheusMetricReader()])
otel_metrics.set_meter_provider(provider)
start_http_server(int(os.environ["WATTSPAN_TEST_METRICS_PORT"]), addr="127.0.0.1", registry=REGISTRY)

ledger = Ledger(os.environ["WATTSPAN_TEST_LEDGER"])
meter = Meter(sources=[ReplaySource([constant_trace(300.0)], loop=True)], idle_w=40.0,
              carbon=CarbonModel(intensity_g_per_kwh=400.0), sinks=[ledger], period_s=0.05, lag_s=0.05)
connect_metrics(meter, EnergyMetrics(meter_provider=provider))


async def chat(request):
    await asyncio.sleep(0.05)
    return JSONResponse({"pid": os.getpid()})


app = BudgetMiddleware(EnergyMiddleware(Starlette(routes=[Route("/v1/chat", chat, methods=["POST"])]), meter=meter),
                       budgets=os.environ["WATTSPAN_BUDGETS"])
