"""The app `uvicorn --workers 2` serves in test_multiworker.py (one module per worker process)."""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path

from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from wattspan import EnergyMiddleware, Meter
from wattspan.carbon import CarbonModel
from wattspan.sources.replay import ReplaySource
from wattspan.meter import RecordCallback

from tests.conftest import constant_trace

OUT = Path(os.environ["WATTSPAN_TEST_OUT"])
PEERS = os.environ.get("WATTSPAN_TEST_PEERS") or None


async def work(request):
    await asyncio.sleep(0.2)
    return PlainTextResponse(str(os.getpid()))


def _sink(rec):
    with open(OUT / f"{os.getpid()}.jsonl", "a") as fh:
        fh.write(json.dumps(rec.to_dict()) + "\n")


def _lifespan(app):
    from contextlib import asynccontextmanager

    @asynccontextmanager
    async def span(app):
        meter = Meter(sources=[ReplaySource([constant_trace(100.0)], loop=True)], idle_w=40.0, carbon=CarbonModel(intensity_g_per_kwh=400.0), sinks=[RecordCallback(_sink)], period_s=0.05, peers=PEERS)
        app.state.meter = meter
        yield
        meter.close()

    return span


app = Starlette(routes=[Route("/work", work)])
app.router.lifespan_context = _lifespan(app)


class _Late:
    """The middleware finds the meter the lifespan created in this worker."""

    def __init__(self, app):
        self.app = app
        self.mw = None

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and self.mw is None:
            self.mw = EnergyMiddleware(self.app, meter=app.state.meter)
        await (self.mw or self.app)(scope, receive, send)


asgi = _Late(app)
