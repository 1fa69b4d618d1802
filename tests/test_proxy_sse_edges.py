"""The metering proxy at the edges of what upstreams send: an SSE event longer than the scanner's
bound (a huge content delta) does not stop it reading the stream's usage, or leak the usage chunk
it asked for to a client that did not; token counts written as integral floats (``5.0``) are counts.
A real uvicorn upstream and proxy, httpx clients."""

from __future__ import annotations

import json

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from wattspan.integrations.openai_proxy import _MAX_SSE_EVENT, _SSEScanner, _Usage, create_proxy

from .conftest import serve

BIG = _MAX_SSE_EVENT + 300_000  # one content delta past the scanner's bound


def _ev(obj) -> bytes:
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"


def upstream() -> FastAPI:
    app = FastAPI()

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        body = json.loads(await request.body())
        usage = {"prompt_tokens": 7.0, "completion_tokens": 3.0, "total_tokens": 10.0}  # counted in floats
        if not body.get("stream"):
            if body.get("pad"):  # a body past the proxy's parse bound: its usage is read from the tail
                return Response(b'{"id":"x","pad":"' + b"p" * 300_000 + b'","choices":[],"usage":{"prompt_tokens":7.0,"completion_tokens":3.0}}',
                                media_type="application/json")
            return JSONResponse({"id": "x", "object": "chat.completion", "choices": [{"index": 0, "message": {"content": "ok"}}], "usage": usage})
        include = (body.get("stream_options") or {}).get("include_usage") is True

        async def events():
            yield _ev({"choices": [{"index": 0, "delta": {"content": "a" * BIG}}]})
            yield _ev({"choices": [{"index": 0, "delta": {"content": "b"}}]})
            if include:
                yield _ev({"choices": [], "usage": usage})
            yield b"data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    return app


def _records(meter, n):
    assert meter.flush(15)
    recs = list(meter.records)
    assert len(recs) == n
    return recs


def test_a_huge_event_does_not_leak_the_injected_usage_chunk_or_lose_the_count(live_meter):
    with serve(upstream()) as up_url:
        proxy = create_proxy(up_url, meter=live_meter)
        with serve(proxy) as url:
            body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": True}
            with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=30) as r:
                got = b"".join(r.iter_raw())
    assert r.status_code == 200
    assert got.count(b"a" * 1000) >= BIG // 1000 and b'"content":"b"' in got and got.endswith(b"data: [DONE]\n\n")
    assert b'"usage"' not in got  # the proxy asked for it; this client did not
    (rec,) = _records(live_meter, 1)
    assert (rec.prompt_tokens, rec.output_tokens) == (7, 3)
    assert proxy.stats["usage_missing"] == 0


@pytest.mark.parametrize("pad", [False, True])
def test_integral_float_token_counts_are_counts(live_meter, pad):
    with serve(upstream()) as up_url:
        proxy = create_proxy(up_url, meter=live_meter)
        with serve(proxy) as url:
            r = httpx.post(f"{url}/v1/chat/completions", json={"model": "m", "messages": [], "pad": pad}, timeout=30)
    assert r.status_code == 200
    (rec,) = _records(live_meter, 1)
    assert (rec.prompt_tokens, rec.output_tokens) == (7, 3) and proxy.stats["usage_missing"] == 0


def test_a_non_integral_or_boolean_count_is_not_a_count():
    u = _Usage()
    assert not u.take({"prompt_tokens": 5.5, "completion_tokens": True})
    assert not u.take({"prompt_tokens": float("inf"), "completion_tokens": -1.0})
    assert u.take({"prompt_tokens": 5.0}) and u.prompt == 5 and type(u.prompt) is int


@settings(max_examples=60, deadline=None)
@given(cuts=st.lists(st.floats(0.0, 1.0), max_size=8), tail=st.integers(0, 12), nl=st.sampled_from([b"\n", b"\r\n", b"\r"]),
       strip=st.booleans())
def test_scanner_passes_an_oversized_event_and_scans_what_follows_however_cut(cuts, tail, nl, strip):
    head = b'data: {"choices":[{"delta":{}}]}' + nl + nl
    big = b"data: " + b"x" * (_MAX_SSE_EVENT + 10) + nl + nl
    usage_ev = b'data: {"choices":[],"usage":{"prompt_tokens":4,"completion_tokens":2}}' + nl + nl
    stream = head + big + b"data: {}" + nl + nl + usage_ev + b"data: [DONE]" + nl + nl
    # always one cut inside the big event past the bound (the scanner gives up on it there), one
    # near its end (its blank line cut in two), and anywhere else
    at = {len(head) + _MAX_SSE_EVENT + 8, len(head) + len(big) - tail} | {int(c * len(stream)) for c in cuts}
    bounds = [0, *sorted(a for a in at if 0 < a < len(stream)), len(stream)]
    pieces = [stream[a:b] for a, b in zip(bounds, bounds[1:])]
    usage = _Usage()
    sc = _SSEScanner(strip, usage)
    out = b"".join(sc.feed(p) + sc.feed(b"") for p in pieces) + sc.finish()  # an empty chunk between any two changes nothing
    assert out == (stream.replace(usage_ev, b"") if strip else stream)
    assert (usage.prompt, usage.completion) == (4, 2)
