"""Several upstreams behind one proxy: each model to its own server, metered on that server's GPUs.

Two OpenAI-compatible upstreams (the fake of tests/test_openai_proxy.py) under real uvicorn
over loopback, the proxy under its own; the meter reads a simulated source of three GPUs
(labelled simulated: no GPU here), the first upstream on gpu0, the second on gpu1+gpu2.
"""

from __future__ import annotations

import httpx
import pytest

from wattspan import Meter, RecordCallback
from wattspan.simulate import PowerModel
from wattspan.carbon import CarbonModel
from wattspan.integrations.openai_proxy import create_proxy, parse_route
from wattspan.sources.simulated import SimulatedSource

from .conftest import serve
from .test_openai_proxy import make_upstream

IDLE_W = 70.0
BETWEEN_W = 50.0  # what a simulated GPU draws above idle while a request is in flight on it


@pytest.fixture
def sim_meter():
    records: list = []
    src = SimulatedSource(devices=["gpu0", "gpu1", "gpu2"], idle_w=IDLE_W, power_model=PowerModel(between_steps_w=BETWEEN_W, noise_w=0.0))
    meter = Meter(sources=[src], idle_w=IDLE_W, carbon=CarbonModel(intensity_g_per_kwh=400.0), sinks=[RecordCallback(records.append)], period_s=0.05, lag_s=0.05)
    meter.records = records
    yield meter
    meter.close()


def _chat(model: str, wait_s: float = 0.0) -> dict:
    return {"model": model, "messages": [{"role": "user", "content": "hello there"}], "max_tokens": 3, "fake_wait_s": wait_s}


def test_each_model_goes_to_its_upstream_and_is_metered_on_its_gpus(sim_meter):
    small, large = make_upstream(), make_upstream()
    with serve(small) as small_url, serve(large) as large_url:
        proxy = create_proxy(meter=sim_meter, routes={"small": small_url, "large": (large_url, "gpu1+gpu2")}, device="gpu0")
        with serve(proxy) as url:
            got = {m: [httpx.post(f"{url}/v1/chat/completions", json=_chat(m, 0.2), timeout=30) for _ in range(2)]
                   for m in ("small", "large")}
            unknown = httpx.post(f"{url}/v1/chat/completions", json=_chat("nobody-serves-this"))
            by_header = httpx.post(f"{url}/v1/embeddings", json={"input": "two words"}, headers={"x-model": "large"})
            listing = httpx.get(f"{url}/v1/models")
            assert sim_meter.flush(15)
    assert all(r.status_code == 200 for rs in got.values() for r in rs)
    assert by_header.status_code == 200 and listing.status_code == 200
    # routing: each upstream saw only its own model's requests; the unknown model reached neither
    seen = {name: [s for s in app.state.seen if s["path"] != "/v1/models"] for name, app in (("small", small), ("large", large))}
    assert len(seen["small"]) == 2 and all(b'"small"' in s["body"] for s in seen["small"])
    assert len(seen["large"]) == 3 and sum(b'"large"' in s["body"] for s in seen["large"]) == 2
    assert unknown.status_code == 404 and unknown.json()["error"]["type"] == "model_not_found"
    assert "nobody-serves-this" in unknown.json()["error"]["message"] and proxy.stats["unrouted"] == 1
    assert any(s["path"] == "/v1/models" for s in small.state.seen)  # a GET naming no model: the first route
    # metering: each request on its upstream's devices
    recs = {r.id: r for r in sim_meter.records}
    routed = {r.headers["x-wattspan-request-id"]: m for m, rs in got.items() for r in rs}
    assert len(routed) == 4
    for rid, model in routed.items():
        rec = recs[rid]
        assert rec.device == ("gpu0" if model == "small" else "gpu1,gpu2"), (model, rec.device)
        assert rec.simulated and rec.model == model
    assert recs[by_header.headers["x-wattspan-request-id"]].device == "gpu1,gpu2"
    # energy: one request at a time, each on its GPUs alone, so a request's energy is its
    # GPUs' draw over its life: (idle + in-flight power) x one GPU for "small", x two for "large"
    per_w = {m: [recs[r.headers["x-wattspan-request-id"]].energy_j / recs[r.headers["x-wattspan-request-id"]].duration_s for r in rs]
             for m, rs in got.items()}
    for w in per_w["small"]:
        assert w == pytest.approx(IDLE_W + BETWEEN_W, rel=0.15)
    for w in per_w["large"]:
        assert w == pytest.approx(2 * (IDLE_W + BETWEEN_W), rel=0.15)


def test_a_default_upstream_takes_the_models_no_route_names(sim_meter):
    main, side = make_upstream(), make_upstream()
    with serve(main) as main_url, serve(side) as side_url:
        proxy = create_proxy(main_url, routes={"side": (side_url, ["gpu2"])}, meter=sim_meter, device="gpu0,gpu1")
        with serve(proxy) as url:
            a = httpx.post(f"{url}/v1/chat/completions", json=_chat("whatever"))
            b = httpx.post(f"{url}/v1/chat/completions", json=_chat("side"))
            assert sim_meter.flush(15)
    recs = {r.id: r for r in sim_meter.records}
    assert a.status_code == b.status_code == 200
    assert len(main.state.seen) == 1 and len(side.state.seen) == 1
    assert recs[a.headers["x-wattspan-request-id"]].device == "gpu0,gpu1"
    assert recs[b.headers["x-wattspan-request-id"]].device == "gpu2"


def test_route_arguments_are_checked():
    assert parse_route("llama-70b=http://127.0.0.1:8000@gpu0+gpu1") == ("llama-70b", "http://127.0.0.1:8000", "gpu0+gpu1")
    assert parse_route("m=http://127.0.0.1:8000/v1") == ("m", "http://127.0.0.1:8000/v1", None)
    assert parse_route("m=http://10.0.0.2:8000") == ("m", "http://10.0.0.2:8000", None)  # host:port is not a device
    for bad in ("no-equals", "=http://h:1", "m="):
        with pytest.raises(ValueError, match="MODEL=URL"):
            parse_route(bad)
    with pytest.raises(ValueError, match="upstream"):
        create_proxy()
    with pytest.raises(ValueError, match="http"):
        create_proxy(routes={"m": "ftp://h"})
    with pytest.raises(ValueError, match="model name"):
        create_proxy(routes={"": "http://h:1"})


def test_the_cli_takes_routes(capsys):
    from wattspan.cli import main

    assert main(["proxy"]) == 2
    assert "--route" in capsys.readouterr().err
    assert main(["proxy", "--route", "a=http://h:1", "--route", "a=http://h:2"]) == 2
    assert "once" in capsys.readouterr().err


def test_the_command_lines_routes_are_each_metered_on_the_simulated_source(tmp_path):
    # `wattspan proxy --route a=URL@gpu0+gpu1 --route b=URL@gpu4` with no GPU: the default simulated source
    # metered gpu0 alone, so gpu1 logged an error per request and every request routed to gpu4 got 0 J
    import os
    import signal
    import subprocess
    import sys
    import time

    from wattspan.export.ledger import query

    from .conftest import free_port

    up = make_upstream()
    db = tmp_path / "l.sqlite"
    with serve(up) as up_url:
        port = free_port()
        proc = subprocess.Popen([sys.executable, "-m", "wattspan.cli", "proxy", "--route", f"big={up_url}@gpu0+gpu1",
                                 "--route", f"small={up_url}@gpu4", "--port", str(port), "--db", str(db)],
                                env={**os.environ, "WATTSPAN_SIMULATE": "1", "WATTSPAN_OTEL": "0", "WATTSPAN_PEERS": "0"},
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            url = f"http://127.0.0.1:{port}"
            deadline = time.monotonic() + 60
            while True:
                try:
                    httpx.get(url + "/v1/models", timeout=2)
                    break
                except httpx.HTTPError:
                    assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read() if proc.stdout else ""
                    time.sleep(0.2)
            for m in ("big", "small", "small"):
                assert httpx.post(url + "/v1/chat/completions", json=_chat(m, 0.3), timeout=30).status_code == 200
        finally:
            proc.send_signal(signal.SIGTERM)
            out = proc.communicate(timeout=60)[0]
    rows = [r for r in query(db) if r["model"] in ("big", "small")]
    assert sorted(r["device"] for r in rows) == ["gpu0,gpu1", "gpu4", "gpu4"], rows
    assert all(r["energy_j"] > 0 and r["sensor"] != "none" and r["simulated"] for r in rows), rows
    assert "unknown device" not in out and "Traceback" not in out, out
