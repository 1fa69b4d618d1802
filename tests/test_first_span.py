"""The first request's server span is exported, with its energy, under the zero-argument middleware.

A fresh interpreter (OpenTelemetry's global providers can be set once per process):
FastAPI + ``FastAPIInstrumentor`` + ``EnergyMiddleware()`` configured from ``OTEL_*``
variables only (console exporter), served with its lifespan, two requests.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

APP = r"""
from fastapi import FastAPI
from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor
from starlette.testclient import TestClient
from wattspan import EnergyMiddleware

app = FastAPI()

@app.get("/items/{i}")
async def item(i: int):
    return {"i": i}

app.add_middleware(EnergyMiddleware)
FastAPIInstrumentor.instrument_app(app)
with TestClient(app) as client:
    for i in range(2):
        assert client.get(f"/items/{i}").status_code == 200
    from wattspan.defaults import get_default_meter
    assert get_default_meter().flush(10)
from opentelemetry import trace
trace.get_tracer_provider().force_flush()
trace.get_tracer_provider().shutdown()
"""


def test_first_request_server_span_is_exported_with_energy(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "WATTSPAN_"))}
    env.update(OTEL_TRACES_EXPORTER="console", OTEL_METRICS_EXPORTER="none", WATTSPAN_SIMULATE="1", WATTSPAN_PEERS="0", PYTHONPATH=str(ROOT))
    r = subprocess.run([sys.executable, "-c", APP], capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    # the console exporter prints one JSON object per span
    spans, depth, buf = [], 0, ""
    for line in r.stdout.splitlines():
        if line.startswith("{") and depth == 0:
            buf = ""
        depth += line.count("{") - line.count("}")
        buf += line + "\n"
        if depth == 0 and buf.strip():
            try:
                spans.append(json.loads(buf))
            except ValueError:
                pass
            buf = ""
    servers = [s for s in spans if s.get("kind") == "SpanKind.SERVER"]
    assert len(servers) == 2, [s.get("name") for s in spans]
    for s in servers:
        assert s["attributes"].get("wattspan.energy_j", 0) > 0, s["attributes"]
    # no orphans: every child span's parent was exported too
    ids = {s["context"]["span_id"] for s in spans}
    for s in spans:
        if s.get("parent_id"):
            assert s["parent_id"] in ids, (s["name"], s["parent_id"])
