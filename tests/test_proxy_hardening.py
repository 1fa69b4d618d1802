"""The proxy and the middleware against hostile callers and broken upstreams: real uvicorn, real httpx.

Each test is a finding of a probe of the running proxy: a path escaping ``/v1/``, a tenant reading
another's figures, a usage count no request holds, bodies the rewrite could not re-encode, a credential
as the tenant label, bare-CR event streams, broken responses recorded as good ones, a window that
never closed.
"""

from __future__ import annotations

import json
import logging
import socket
import subprocess
import sys

import httpx
import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from wattspan.integrations.openai_proxy import _SSEScanner, _Usage, _json_usage, _no_query, create_proxy

from .conftest import serve
from .test_openai_proxy import chat_body, records, stack


def test_a_path_with_dot_segments_never_reaches_the_upstream(live_meter):
    with stack(live_meter) as (up, proxy, url, up_url):
        port = url.rsplit(":", 1)[1]  # raw request lines: a client would normalise the path itself
        for path in (b"/v1/../admin", b"/v1/x/../../metrics", b"/v1/%2e%2e/metrics", b"/v1/models/.."):
            with socket.create_connection(("127.0.0.1", int(port))) as c:
                c.sendall(b"GET " + path + b" HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
                reply = b""
                while chunk := c.recv(65536):
                    reply += chunk
            assert reply.startswith(b"HTTP/1.1 404"), (path, reply[:100])
        assert httpx.get(f"{url}/v1/models/org%2Fname").status_code == 200  # an encoded slash is one segment: forwarded
    assert [s["path"] for s in up.state.seen] == ["/v1/models/org%2Fname"]


@pytest.mark.parametrize("tenant", ["acme corp", "é漢", "t" * 71])
def test_a_tenant_whose_label_is_cleaned_reads_its_own_figures_and_no_one_else_does(live_meter, tenant):
    # the ledger's label is cleaned ("acmecorp", "invalid", cut to 64): the owner is the label as sent
    raw = tenant.encode("utf-8")
    cleaned = {"acme corp": b"acmecorp", "é漢": b"invalid"}.get(tenant, raw[:64])
    with stack(live_meter) as (up, proxy, url, up_url):
        r = httpx.post(f"{url}/v1/chat/completions", json=chat_body(), headers=[(b"x-tenant-id", raw)])
        rid = r.headers["x-wattspan-request-id"]
        records(live_meter, 1)
        own = httpx.get(f"{url}/wattspan/requests/{rid}", headers=[(b"x-tenant-id", raw)])
        lookalike = httpx.get(f"{url}/wattspan/requests/{rid}", headers=[(b"x-tenant-id", cleaned)])
        anonymous = httpx.get(f"{url}/wattspan/requests/{rid}")
    assert own.status_code == 200 and own.json()["status"] == "final"
    assert lookalike.status_code == anonymous.status_code == 404  # not 500: a non-ASCII label compares as bytes


def test_tenants_past_the_label_bound_do_not_read_each_other(live_meter):
    with stack(live_meter) as (up, proxy, url, up_url):
        limit = proxy.metered.tenants.limit
        for k in range(limit):  # fill the tenant label budget
            httpx.post(f"{url}/v1/embeddings", json={"model": "m", "input": "x"}, headers={"x-tenant-id": f"t{k}"})
        r = httpx.post(f"{url}/v1/chat/completions", json=chat_body(), headers={"x-tenant-id": "late-tenant"})
        rid = r.headers["x-wattspan-request-id"]
        records(live_meter)
        mine = httpx.get(f"{url}/wattspan/requests/{rid}", headers={"x-tenant-id": "late-tenant"})
        other = httpx.get(f"{url}/wattspan/requests/{rid}", headers={"x-tenant-id": "other"})
    rec = next(x for x in live_meter.records if x.id == rid)
    assert rec.tenant == "other"  # labels stay bounded ...
    assert mine.status_code == 200 and other.status_code == 404  # ... and reading back is by who asked


def _usage_upstream(prompt: object, completion: object) -> FastAPI:
    app = FastAPI()

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        await request.body()
        return JSONResponse({"id": "x", "object": "chat.completion", "choices": [{"index": 0, "message": {"content": "ok"}}],
                             "usage": {"prompt_tokens": prompt, "completion_tokens": completion}})

    return app


def test_a_usage_count_no_request_holds_gets_no_priced_figure(live_meter):
    with serve(_usage_upstream(10**12, 5)) as up_url:
        proxy = create_proxy(up_url, meter=live_meter)
        with serve(proxy) as url:
            first = httpx.post(f"{url}/v1/chat/completions", json=chat_body())  # a rate to price from
            records(live_meter, 1)
            r = httpx.post(f"{url}/v1/chat/completions", json=chat_body())
    usage = r.json()["usage"]
    assert usage["prompt_tokens"] == 10**12  # the upstream's body is the client's, as it was
    # the trillion prompt tokens were no count: priced from the 5 completion tokens, not as tonnes of CO2e
    fig = first.json()["usage"]
    assert usage["energy_j"] is None or usage["energy_j"] < 1e6, usage
    assert fig["energy_j"] is None or fig["energy_j"] < 1e6


def test_a_rate_is_not_dragged_by_one_record_orders_of_magnitude_off():
    from types import SimpleNamespace

    from wattspan.meter.provisional import Provisional

    p = Provisional(SimpleNamespace())
    rec = lambda e, tok: SimpleNamespace(prompt_tokens=tok, output_tokens=0, energy_j=e, device="gpu0")  # noqa: E731
    p.observe_records([rec(10.0, 100)])  # 0.1 J a token
    p.observe_records([rec(10.0, 10**9)])  # a usage count a server got wrong: 1e-8 J a token
    assert p._rate["gpu0"] == pytest.approx(0.1) and p.stats["rate_outliers"] == 1
    p.observe_records([rec(20.0, 100)])
    assert p._rate["gpu0"] == pytest.approx(0.11)
    # the first record was the outlier: after five in a row the rate starts again from the newest
    p = Provisional(SimpleNamespace())
    p.observe_records([rec(1e6, 1)] + [rec(1.0, 10)] * 5)
    assert p._rate["gpu0"] == pytest.approx(0.1)


def test_stream_bodies_the_rewrite_cannot_reencode_are_forwarded_not_failed(live_meter):
    with stack(live_meter) as (up, proxy, url, up_url):
        lone = b'{"model":"a","stream":true,"max_tokens":2,"messages":[{"role":"user","content":"x\\ud800y"}]}'
        r = httpx.post(f"{url}/v1/chat/completions", content=lone, headers={"content-type": "application/json"})
        assert r.status_code == 200, r.text
        sent = up.state.seen[-1]["body"]
        assert json.loads(sent)["stream_options"] == {"include_usage": True}  # injected, as valid JSON
        assert json.loads(sent)["messages"][0]["content"] == "x\ud800y"
        huge = b'{"model":"a","stream":true,"max_tokens":2,"temperature":1e999,"messages":[]}'
        httpx.post(f"{url}/v1/chat/completions", content=huge, headers={"content-type": "application/json"})
        assert up.state.seen[-1]["body"] == huge  # no Infinity invented for the upstream: untouched


def test_a_credential_header_is_never_the_tenant_label(live_meter, tmp_path):
    for header in ("authorization", "Api-Key", "x-api-key", "cookie"):
        with pytest.raises(ValueError, match="carries a credential"):
            create_proxy("http://127.0.0.1:9", meter=live_meter, tenant=header)
    p = subprocess.run([sys.executable, "-m", "wattspan.cli", "proxy", "--upstream", "http://127.0.0.1:9",
                        "--tenant-header", "authorization"], capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and "carries a credential" in p.stderr and "Traceback" not in p.stderr


def test_the_access_log_keeps_no_query_string():
    rec = logging.LogRecord("uvicorn.access", logging.INFO, "", 0, '%s - "%s %s HTTP/%s" %d',
                            ("127.0.0.1:5", "GET", "/v1/models?api_key=sk-QUERYSECRET", "1.1", 200), None)
    assert _no_query(rec)
    assert "sk-QUERYSECRET" not in rec.getMessage() and "/v1/models?" in rec.getMessage()


def test_bare_cr_events_are_forwarded_as_they_complete():
    sc = _SSEScanner(strip=True, usage=_Usage())
    out = sc.feed(b'data: {"choices":[{"delta":{"content":"a"}}]}\r\rdata: {"cho')
    assert out == b'data: {"choices":[{"delta":{"content":"a"}}]}\r\r'  # not held until the stream ends
    out = sc.feed(b'ices":[],"usage":{"prompt_tokens":3,"completion_tokens":1}}\r\rdata: [DONE]\r\r')
    assert out == b"data: [DONE]\r\r" and (sc.usage.prompt, sc.usage.completion) == (3, 1)  # the injected usage: stripped


def test_a_streaming_app_that_fails_midway_is_recorded_as_failed(live_meter):
    from starlette.applications import Starlette
    from starlette.responses import StreamingResponse
    from starlette.routing import Route

    from wattspan import EnergyMiddleware

    async def broken(request):
        async def gen():
            yield b"part one\n"
            raise RuntimeError("the model server fell over")

        return StreamingResponse(gen())

    app = EnergyMiddleware(Starlette(routes=[Route("/stream", broken)]), meter=live_meter)
    with serve(app) as url:
        with pytest.raises(httpx.HTTPError):
            with httpx.stream("GET", f"{url}/stream") as r:
                for _ in r.iter_raw():
                    pass
    (rec,) = records(live_meter, 1)
    assert rec.status_code == 500 and rec.route == "/stream"


def test_a_window_whose_labels_fail_is_still_closed_and_recorded(live_meter, caplog):
    from wattspan import EnergyMiddleware

    class OddRoute:  # a framework's route object whose path is no string
        path = 12345

    async def app(scope, receive, send):
        scope["route"] = OddRoute()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    mw = EnergyMiddleware(app, meter=live_meter)
    with serve(mw) as url, caplog.at_level(logging.ERROR):
        assert httpx.get(f"{url}/x").status_code == 200
    (rec,) = records(live_meter, 1)
    assert rec.route == "(unmatched)" and rec.status_code == 200 and mw.errors == 1
    assert live_meter.balance().pending_j == 0.0  # nothing left in flight, billed to no one


def test_sigterm_with_a_stalled_stream_stops_within_the_grace_and_records_it(tmp_path):
    # an upstream that sent two events and went quiet held `wattspan proxy` at SIGTERM for the whole
    # --timeout-s (600 s): past any orchestrator's grace period, then SIGKILL and the last records lost
    import os
    import signal
    import threading
    import time

    from wattspan.export.ledger import query

    from .backends import free_port
    from .test_openai_proxy import make_upstream

    db, port = tmp_path / "p.sqlite", free_port()
    with serve(make_upstream()) as up_url:
        env = {**os.environ, "WATTSPAN_SIMULATE": "1"}
        proc = subprocess.Popen([sys.executable, "-m", "wattspan.cli", "proxy", "--upstream", up_url, "--port", str(port),
                                 "--db", str(db), "--graceful-s", "2"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        try:
            url = f"http://127.0.0.1:{port}"
            end = time.monotonic() + 60
            while time.monotonic() < end:
                try:
                    httpx.get(f"{url}/healthz", timeout=1)
                    break
                except httpx.HTTPError:
                    time.sleep(0.1)
            got = threading.Event()

            def stream():
                try:
                    with httpx.stream("POST", f"{url}/v1/chat/completions", timeout=60,
                                      json=chat_body(stream=True, max_tokens=5, fake_delay_s=30)) as r:
                        for _ in r.iter_raw():
                            got.set()
                except httpx.HTTPError:
                    pass

            th = threading.Thread(target=stream, daemon=True)
            th.start()
            assert got.wait(30)
            t = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            proc.wait(30)
            assert time.monotonic() - t < 20, "the proxy waited for the stalled stream"
        finally:
            if proc.poll() is None:
                proc.kill()
    rows = query(db)
    assert [r["status_code"] for r in rows] == [499], (rows, proc.stderr.read()[-2000:] if proc.stderr else "")


def test_a_body_python_cannot_parse_still_gives_the_counts_it_holds():
    # an integer of over 4,300 digits is beyond Python's int parsing: json.loads raised and both counts were lost
    body = b'{"usage": {"prompt_tokens": 12, "completion_tokens": 34, "junk": ' + b"7" * 5000 + b"}}"
    u = _Usage()
    assert _json_usage([body], len(body), body[-(64 << 10):], u) is None
    assert (u.prompt, u.completion) == (12, 34)
    # a count that is itself that long is no count
    body = b'{"usage": {"prompt_tokens": ' + b"9" * 5000 + b', "completion_tokens": 5}}'
    u = _Usage()
    _json_usage([body], len(body), body, u)
    assert (u.prompt, u.completion) == (None, 5)
