"""A FastAPI inference endpoint metered by wattspan, with batch steps reported.

    pip install 'wattspan[serve,otel]' fastapi
    uvicorn examples.fastapi.app:app --port 8000
    curl -s localhost:8000/v1/generate -H 'x-tenant-id: team-a' -d '{"prompt": "hello"}' -H 'content-type: application/json'

Without a GPU the power is the labelled simulated source; with one, NVML.
Set ``OTEL_EXPORTER_OTLP_ENDPOINT`` to send spans and metrics to a collector.
"""

from __future__ import annotations

import asyncio
import time

from fastapi import FastAPI
from pydantic import BaseModel

from wattspan import EnergyMiddleware, current_request_id, set_tokens
from wattspan.integrations.batch import record_step

app = FastAPI()
app.add_middleware(EnergyMiddleware, exclude=("/healthz",))


class Prompt(BaseModel):
    prompt: str
    max_tokens: int = 16


@app.post("/v1/generate")
async def generate(body: Prompt):
    rid = current_request_id()
    prompt_tokens = len(body.prompt.split())
    # a stand-in for a model: one prefill step, then one decode step per token
    t0 = time.monotonic_ns()
    await asyncio.sleep(0.002 + 0.0001 * prompt_tokens)
    record_step(t0, time.monotonic_ns(), {rid: prompt_tokens})
    out = []
    for i in range(body.max_tokens):
        t0 = time.monotonic_ns()
        await asyncio.sleep(0.001)
        record_step(t0, time.monotonic_ns(), {rid: 1})
        out.append(f"tok{i}")
    set_tokens(prompt_tokens=prompt_tokens, output_tokens=body.max_tokens, model="example")
    return {"text": " ".join(out)}


@app.get("/healthz")
async def healthz():
    return {"ok": True}
