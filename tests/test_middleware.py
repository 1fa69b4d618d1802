"""EnergyMiddleware under a real uvicorn server on loopback, metered by a live Meter."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import pytest
from starlette.applications import Starlette
from starlette.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.routing import Mount, Route, WebSocketRoute

from wattspan import EnergyMiddleware, current_request_id, set_tokens
from wattspan.integrations.batch import record_step

from .conftest import serve


async def _no_body():
    return {"type": "http.request", "body": b"", "more_body": False}


async def _ignore(message):
    pass


def make_app(meter, **mw):
    async def item(request):
        await asyncio.sleep(0.005)
        set_tokens(prompt_tokens=7, output_tokens=3)
        return JSONResponse({"id": current_request_id(), "tenant": request.headers.get("x-tenant-id", "")})

    async def stream(request):
        rid = current_request_id()

        async def gen():
            for i in range(5):
                t0 = time.monotonic_ns()
                await asyncio.sleep(0.02)
                record_step(t0, time.monotonic_ns(), {rid: 1}, meter=meter)
                yield f"data: {i}\n\n"
            set_tokens(output_tokens=5)

        return StreamingResponse(gen(), media_type="text/event-stream")

    async def boom(request):
        raise RuntimeError("endpoint failed")

    async def slow(request):
        async def gen():
            for i in range(200):
                yield b"x" * 1024
                await asyncio.sleep(0.01)

        return StreamingResponse(gen())

    async def ws(websocket):
        await websocket.accept()
        await websocket.send_text(str(current_request_id()))
        await websocket.close()

    inner = Starlette(routes=[Route("/v/{name}", item)])
    app = Starlette(
        routes=[
            Route("/items/{item_id}", item),
            Route("/stream", stream),
            Route("/boom", boom),
            Route("/slow", slow),
            Route("/healthz", lambda r: PlainTextResponse("ok")),
            WebSocketRoute("/ws", ws),
            Mount("/api", app=inner),
        ]
    )
    app.add_middleware(EnergyMiddleware, meter=meter, **mw)
    return app


def records_by_route(meter):
    assert meter.flush(15)
    out = {}
    for r in meter.records:
        out.setdefault(r.route, []).append(r)
    return out


class TestWindows:
    def test_route_templates_tokens_and_energy(self, live_meter):
        with serve(make_app(live_meter)) as url:
            for i in range(3):
                assert httpx.get(f"{url}/items/{i}").status_code == 200
            assert httpx.get(f"{url}/api/v/x").status_code == 200
            assert httpx.get(f"{url}/nope").status_code == 404
        by = records_by_route(live_meter)
        assert sorted(by) == ["(unmatched)", "/api/v/{name}", "/items/{item_id}"]
        for r in by["/items/{item_id}"]:
            assert (r.prompt_tokens, r.output_tokens, r.status_code, r.http_method) == (7, 3, 200, "GET")
            # a constant 100 W trace, idle 40 W: each request alone gets 100 W over its life
            assert r.energy_j == pytest.approx(100.0 * r.duration_s, rel=0.05, abs=2e-4)
            assert r.co2e_g == pytest.approx(r.energy_j / 3.6e6 * 400.0)
            assert r.sensor == "replay:constant" and not r.simulated and r.coverage == pytest.approx(1.0)
        assert by["(unmatched)"][0].status_code == 404

    def test_streaming_window_closes_at_the_last_chunk(self, live_meter):
        with serve(make_app(live_meter)) as url:
            t0 = time.monotonic()
            with httpx.stream("GET", f"{url}/stream") as r:
                chunks = list(r.iter_lines())
            wall = time.monotonic() - t0
        assert len([c for c in chunks if c.startswith("data:")]) == 5
        (rec,) = records_by_route(live_meter)["/stream"]
        assert 0.1 <= rec.duration_s <= wall
        assert rec.output_tokens == 5 and rec.method == "batch-fit"

    def test_exception_closes_the_window_with_500(self, live_meter):
        with serve(make_app(live_meter)) as url:
            assert httpx.get(f"{url}/boom").status_code == 500
        (rec,) = records_by_route(live_meter)["/boom"]
        assert rec.status_code == 500 and rec.energy_j > 0

    def test_client_disconnect_closes_the_window(self, live_meter):
        with serve(make_app(live_meter)) as url:
            with httpx.stream("GET", f"{url}/slow") as r:
                for _ in r.iter_raw(1024):
                    break  # hang up after the first chunk
            time.sleep(0.3)
        (rec,) = records_by_route(live_meter)["/slow"]
        assert rec.duration_s < 1.5  # the full body takes 2 s
        assert rec.status_code == 499  # its 200 never ended: the client closed the request

    def test_a_response_that_never_ends_is_499_but_an_error_status_stays(self, live_meter):
        async def app(scope, receive, send):  # returns before its last body chunk
            status = 200 if scope["path"] == "/cut" else 502
            await send({"type": "http.response.start", "status": status, "headers": []})
            await send({"type": "http.response.body", "body": b"part", "more_body": True})

        async def file_app(scope, receive, send):  # a file sent by the server's pathsend extension (Starlette's FileResponse)
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.pathsend", "path": "/dev/null"})

        asyncio.run(EnergyMiddleware(file_app, meter=live_meter)({"type": "http", "method": "GET", "path": "/f", "headers": []}, _no_body, _ignore))
        mw = EnergyMiddleware(app, meter=live_meter)
        for path in ("/cut", "/broken"):
            asyncio.run(mw({"type": "http", "method": "GET", "path": path, "headers": []}, _no_body, _ignore))
        assert live_meter.flush(5)
        assert sorted(r.status_code for r in live_meter.records) == [200, 499, 502]  # the file's response ended

    def test_an_app_that_returns_before_any_answer_is_499_not_status_0(self, live_meter):
        # a proxy that saw its client leave while the upstream had not answered returns without a response
        async def app(scope, receive, send):
            await receive()

        asyncio.run(EnergyMiddleware(app, meter=live_meter)({"type": "http", "method": "GET", "path": "/x", "headers": []}, _no_body, _ignore))
        assert live_meter.flush(5)
        assert [r.status_code for r in live_meter.records] == [499]

    def test_websocket_and_excluded_paths_pass_through(self, live_meter):
        import websockets.sync.client as wsc  # uvicorn's websocket implementation

        with serve(make_app(live_meter, exclude=("/healthz",))) as url:
            assert httpx.get(f"{url}/healthz").text == "ok"
            with wsc.connect(url.replace("http", "ws") + "/ws") as ws:
                assert ws.recv() == "None"
        assert live_meter.flush(5)
        assert live_meter.records == []


class TestLabels:
    def test_tenants_are_sanitised_bounded_and_capped(self, live_meter):
        with serve(make_app(live_meter, max_tenants=3)) as url:
            for t in ["team-a", "team-a", "team b!<script>", "x" * 500, "t4", "t5"]:
                httpx.get(f"{url}/items/1", headers={"x-tenant-id": t})
        tenants = [r.tenant for r in sorted(records_by_route(live_meter)["/items/{item_id}"], key=lambda r: r.start_ns)]
        assert tenants[:3] == ["team-a", "team-a", "teambscript"]
        assert tenants[3] == "x" * 64
        assert tenants[4:] == ["other", "other"]

    def test_a_repeated_tenant_header_is_read_first_as_the_budget_gate_reads_it(self, live_meter):
        with serve(make_app(live_meter)) as url:
            httpx.get(f"{url}/items/1", headers=[("x-tenant-id", "first"), ("x-tenant-id", "second")])
        (rec,) = records_by_route(live_meter)["/items/{item_id}"]
        assert rec.tenant == "first"

    def test_model_from_a_callable_that_fails_does_not_break_the_request(self, live_meter):
        def bad(scope):
            raise ValueError("no model")

        with serve(make_app(live_meter, model=bad)) as url:
            assert httpx.get(f"{url}/items/1").status_code == 200
        (rec,) = records_by_route(live_meter)["/items/{item_id}"]
        assert rec.model == ""


async def raw_get(port: int, path: str, headers: dict) -> tuple[int, bytes]:
    """A minimal HTTP/1.1 client on a real socket: an in-process httpx client for
    1000 connections would share the server's GIL and dominate the run."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    extra = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    writer.write(f"GET {path} HTTP/1.1\r\nhost: 127.0.0.1\r\nconnection: close\r\n{extra}\r\n".encode())
    data = await reader.read()
    writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


def test_a_thousand_concurrent_requests_keep_their_own_ids_and_labels(live_meter):
    async def drive(port):
        return await asyncio.gather(*(raw_get(port, f"/items/{i}", {"x-tenant-id": f"t{i % 50}"}) for i in range(1000)))

    with serve(make_app(live_meter, max_tenants=100), backlog=4096) as url:
        responses = asyncio.run(drive(int(url.rsplit(":", 1)[1])))
    assert {status for status, _ in responses} == {200}
    bodies = [json.loads(body) for _, body in responses]
    ids = {b["id"] for b in bodies}
    assert len(ids) == 1000
    recs = records_by_route(live_meter)["/items/{item_id}"]
    assert {r.id for r in recs} == ids
    tenant_of = {b["id"]: b["tenant"] for b in bodies}
    assert all(r.tenant == tenant_of[r.id] for r in recs)
    # many were in flight together: the idle share of each is less than its own life at 40 W
    assert sum(r.idle_j for r in recs) < 0.5 * sum(40.0 * r.duration_s for r in recs)
    # conservation across the live passes: requests + unattributed = measured, in one
    # consistent view (the meter keeps passing while the test reads)
    b = live_meter.balance()
    assert b.measured_j > 0 and b.peers_j == 0
    assert b.attributed_j + b.pending_j + b.unattributed_j == pytest.approx(b.measured_j, rel=1e-6)
    assert b.pending_j == 0  # every request had ended and was flushed
    assert sum(r.energy_j for r in recs) == pytest.approx(b.attributed_j, rel=1e-6)


def test_middleware_holds_no_per_request_state(live_meter):
    app = make_app(live_meter)
    with serve(app) as url:
        httpx.get(f"{url}/items/1")
        mw = app.middleware_stack
        while not isinstance(mw, EnergyMiddleware):
            mw = mw.app
        before = dict(vars(mw))
        for i in range(20):
            httpx.get(f"{url}/items/{i}")
        assert set(vars(mw)) == set(before)
        assert {k: v for k, v in vars(mw).items() if k != "tenants"} == {k: v for k, v in before.items() if k != "tenants"}


def test_a_failing_meter_never_breaks_serving(live_meter):
    class Broken:
        holds_spans = False
        provisional = None

        def begin(self, *a):
            raise RuntimeError("meter down")

        def end(self, *a):
            raise RuntimeError("meter down")

    with serve(make_app(Broken())) as url:
        assert httpx.get(f"{url}/items/1").status_code == 200
        with httpx.stream("GET", f"{url}/slow") as r:
            assert r.status_code == 200
