"""Shared fixtures: a real uvicorn server on loopback, and a live meter on a known power trace."""

from __future__ import annotations

import socket
import threading
import time
from contextlib import contextmanager

import pytest

from wattspan.testing import RecordCollector, constant_trace  # noqa: F401 (constant_trace: the tests' own trace)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def serve(app, **kw):
    """Run ``app`` under a real uvicorn server on 127.0.0.1; yields its base URL."""
    import uvicorn

    port = free_port()
    cfg = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan=kw.pop("lifespan", "auto"), **kw)
    server = uvicorn.Server(cfg)
    th = threading.Thread(target=server.run, daemon=True)
    th.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not th.is_alive():
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        th.join(10)


@pytest.fixture
def live_meter():
    """A started Meter replaying a constant 100 W GPU (idle configured at 40 W)."""
    from wattspan import Meter
    from wattspan.carbon import CarbonModel
    from wattspan.sources.replay import ReplaySource

    collector = RecordCollector()
    meter = Meter(sources=[ReplaySource([constant_trace(100.0)])], idle_w=40.0, carbon=CarbonModel(intensity_g_per_kwh=400.0), sinks=[collector], period_s=0.05, lag_s=0.05)
    meter.records = collector.records
    yield meter
    meter.close()
