"""The demo inference server: OpenAI-like embeddings and completions on the CPU.

``create_app()`` returns a FastAPI app serving

* ``POST /v1/embeddings``: ``{"input": str | [str], "model": "all-MiniLM-L6-v2"}`` ->
  ``{"object": "list", "data": [{"object": "embedding", "embedding": [...384 floats],
  "index": i}], "model": ..., "usage": {"prompt_tokens": n, "total_tokens": n}}``
  (tokens as the model processed them, with ``[CLS]``/``[SEP]``, after truncation to 256);
* ``POST /v1/completions``: ``{"prompt": str, "max_tokens": int, "temperature": float,
  "seed": int, "stream": bool}`` -> a ``text_completion`` JSON, or with ``"stream": true``
  server-sent events (``data: {...}\\n\\n`` per token, the last chunk with
  ``finish_reason`` and ``usage``, then ``data: [DONE]\\n\\n``). The model is
  :class:`~wattspan.demo.models.TinyGenerator` (random weights: gibberish text);
* ``POST /v1/batch``: many embeddings/completions requests in one HTTP request, run
  together through the same batchers (see :func:`create_app`'s batch notes); the body is
  ``{"requests": [{"custom_id": str, "method": "POST", "url": "/v1/completions" |
  "/v1/embeddings", "body": {...}}, ...]}`` or the same items as JSON Lines (the
  OpenAI Batch API input file, sent with content type ``application/jsonl`` or
  ``application/x-ndjson``) -> ``{"object": "batch.result", "id": ..., "data": [{"id",
  "custom_id", "response": {"status_code", "body"} | null, "error": null | {...}}, ...],
  "usage": {...}}`` in the input order. It is one metered request: its energy is the
  whole batch's;
* ``GET /healthz``: ``{"status": "ok"}`` once both models are loaded (503 before).

Batchers start (models load) in the app's lifespan and stop at shutdown; they are on
``app.state.embedding_batcher`` / ``app.state.generate_batcher`` while it runs. Bad
input gets 422 (413 for a body over ``max_body_bytes``), a full queue 503, all with an
OpenAI-style ``{"error": {"message", "type", "param", "code"}}`` body that does not
echo the input. Endpoints report their token counts with ``wattspan.meter.context.set_tokens``
(a no-op outside a metered request). The app adds no headers of its own beyond content type and, for
streams, ``cache-control: no-cache``.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any, overload
from contextlib import asynccontextmanager
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from ..logs import get_logger
from ..meter.context import set_tokens
from .batcher import BatcherClosed, BatcherOverloaded, DynamicBatcher, EmbeddingBatcher, OnStep
from .models import EMBEDDING_MODEL, Embedder, TinyGenerator

__all__ = ["COMPLETION_MODEL", "DemoSettings", "create_app"]

log = get_logger(__name__)

COMPLETION_MODEL = "wattspan-tiny-random"


@dataclass(frozen=True, slots=True)
class DemoSettings:
    """Input limits and batcher knobs of the demo app.

    Limits: ``max_embedding_inputs`` strings per embeddings request, each at most
    ``max_embedding_chars`` characters; completion prompts at most ``max_prompt_chars``
    characters and, as UTF-8 bytes (the generator's tokens), with ``max_tokens`` within
    the generator's context; ``max_tokens`` at most ``max_completion_tokens``; request
    bodies at most ``max_body_bytes``; ``/v1/batch`` takes at most ``max_batch_requests``
    items in at most ``max_batch_body_bytes`` and keeps at most ``batch_concurrency`` of
    them submitted to the batchers at once. Batchers: see :class:`DynamicBatcher` and
    :class:`EmbeddingBatcher` (``*_wait_ms`` in milliseconds).
    """

    max_embedding_inputs: int = 64
    max_embedding_chars: int = 8192
    max_prompt_chars: int = 1024
    max_completion_tokens: int = 256
    max_body_bytes: int = 1 << 20
    gen_max_batch_size: int = 8
    gen_max_batch_tokens: int = 256
    gen_max_wait_ms: float = 2.0
    embed_max_batch_size: int = 32
    embed_max_wait_ms: float = 5.0
    max_queue: int = 64
    max_batch_requests: int = 2048
    max_batch_body_bytes: int = 16 << 20
    batch_concurrency: int = 32

    def __post_init__(self) -> None:
        for name in ("max_embedding_inputs", "max_embedding_chars", "max_prompt_chars",
                     "max_completion_tokens", "max_body_bytes", "gen_max_batch_size",
                     "gen_max_batch_tokens", "embed_max_batch_size", "max_queue",
                     "max_batch_requests", "max_batch_body_bytes", "batch_concurrency"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"DemoSettings.{name} must be an int >= 1, got {v!r}")


class _BadRequest(Exception):
    def __init__(self, status: int, message: str, param: str | None = None,
                 type_: str = "invalid_request_error", code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.type, self.code = status, message, param, type_, code


def _error(status: int, message: str, *, param: str | None = None,
           type_: str = "invalid_request_error", code: str | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": type_, "param": param, "code": code}},
                        status_code=status)


async def _read_body(request: Request, limit: int) -> bytes:
    """The raw body, read with a size limit (also for chunked bodies)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise _BadRequest(413, f"request body is larger than {limit} bytes", code="body_too_large")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise _BadRequest(413, f"request body is larger than {limit} bytes", code="body_too_large")
        chunks.append(chunk)
    return b"".join(chunks)


async def _read_json(request: Request, limit: int) -> dict:
    """The body as a JSON object, read with a size limit (also for chunked bodies)."""
    raw = await _read_body(request, limit)
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise _BadRequest(422, "request body is not valid JSON") from None
    if not isinstance(body, dict):
        raise _BadRequest(422, "request body must be a JSON object")
    return body


@overload
def _int_field(body: dict, name: str, default: int, lo: int, hi: int | None) -> int: ...
@overload
def _int_field(body: dict, name: str, default: None, lo: int, hi: int | None) -> int | None: ...
def _int_field(body: dict, name: str, default: int | None, lo: int, hi: int | None) -> int | None:
    v = body.get(name, default)
    if v is None:
        return default
    if not isinstance(v, int) or isinstance(v, bool):
        raise _BadRequest(422, f"'{name}' must be an integer", name)
    if v < lo or (hi is not None and v > hi):
        rng = f"between {lo} and {hi}" if hi is not None else f">= {lo}"
        raise _BadRequest(422, f"'{name}' must be {rng}, got {v}", name)
    return v


def _check_model(body: dict, expected: str) -> str:
    model = body.get("model", expected)
    if model is None:
        return expected
    if model != expected:
        raise _BadRequest(422, f"'model' must be '{expected}' (the only model served here)", "model",
                          code="model_not_found")
    return model


def create_app(*, on_step: OnStep | None = None, device: str = "gpu0", embedder: Embedder | None = None,
               generator: TinyGenerator | None = None, settings: DemoSettings | None = None) -> FastAPI:
    """The demo server (see the module docstring).

    ``on_step`` and ``device`` go to both batchers (``on_step(start_ns, end_ns, device,
    {request_id: tokens})`` after each model step). ``embedder``/``generator`` default
    to new :class:`Embedder` / :class:`TinyGenerator` instances; they load in the
    lifespan startup.
    """
    s = settings or DemoSettings()
    embedder = embedder if embedder is not None else Embedder()
    generator = generator if generator is not None else TinyGenerator()
    if not isinstance(device, str) or not device:
        raise ValueError(f"device must be a non-empty str like 'gpu0' or 'cpu0', got {device!r}")

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        eb = EmbeddingBatcher(embedder, device=device, on_step=on_step, max_batch_size=s.embed_max_batch_size,
                              max_wait_ms=s.embed_max_wait_ms, max_queue=s.max_queue)
        gb = DynamicBatcher(generator, device=device, on_step=on_step, max_batch_size=s.gen_max_batch_size,
                            max_batch_tokens=s.gen_max_batch_tokens, max_wait_ms=s.gen_max_wait_ms,
                            max_queue=s.max_queue)
        app.state.embedding_batcher, app.state.generate_batcher = eb, gb
        try:
            await eb.astart()
            await gb.astart()
            log.info("demo models loaded: %s in %.2f s, %s in %.2f s", EMBEDDING_MODEL,
                     embedder.load_s or 0.0, COMPLETION_MODEL, generator.load_s or 0.0)
            yield
        finally:
            await gb.aclose()
            await eb.aclose()

    app = FastAPI(title="wattspan demo", lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None)

    @app.exception_handler(_BadRequest)
    async def _bad_request(request: Request, exc: _BadRequest) -> JSONResponse:
        return _error(exc.status, exc.message, param=exc.param, type_=exc.type, code=exc.code)

    @app.exception_handler(BatcherOverloaded)
    async def _overloaded(request: Request, exc: BatcherOverloaded) -> JSONResponse:
        return _error(503, "server is busy; retry later", type_="server_busy", code="overloaded")

    @app.exception_handler(BatcherClosed)
    async def _closed(request: Request, exc: BatcherClosed) -> JSONResponse:
        return _error(503, "server is shutting down", type_="server_unavailable", code="shutting_down")

    @app.get("/healthz")
    async def healthz(request: Request) -> JSONResponse:
        eb = getattr(request.app.state, "embedding_batcher", None)
        gb = getattr(request.app.state, "generate_batcher", None)
        ok = eb is not None and gb is not None and eb.running and gb.running
        return JSONResponse({"status": "ok" if ok else "unavailable"}, status_code=200 if ok else 503)

    @app.post("/v1/embeddings")
    async def embeddings(request: Request) -> JSONResponse:
        body = await _read_json(request, s.max_body_bytes)
        model, texts = _parse_embeddings(body, s)
        vecs, toks = await request.app.state.embedding_batcher.embed(texts)
        n = int(sum(toks))
        set_tokens(prompt_tokens=n, output_tokens=0, model=model)
        return JSONResponse(_embedding_body(model, vecs, toks))

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await _read_json(request, s.max_body_bytes)
        gb: DynamicBatcher = request.app.state.generate_batcher
        c = _parse_completion(body, s, gb)
        cid = "cmpl-" + uuid.uuid4().hex
        created = int(time.time())
        model, prompt_tokens = c.model, c.prompt_tokens
        agen = gb.generate(c.prompt, c.max_tokens, temperature=c.temperature, seed=c.seed)

        if not c.stream:
            pieces: list[str] = []
            try:
                async for piece in agen:
                    pieces.append(piece)
            finally:
                await agen.aclose()
                set_tokens(prompt_tokens=prompt_tokens, output_tokens=len(pieces), model=model)
            return JSONResponse(_completion_body(cid, created, model, "".join(pieces), prompt_tokens, len(pieces)))

        # submit and wait for the first token here, so a full queue is a 503, not a broken stream
        try:
            first = await agen.__anext__()
        except BaseException:
            await agen.aclose()
            raise

        def chunk(text: str, finish: str | None, usage: dict | None = None) -> bytes:
            d = {"id": cid, "object": "text_completion", "created": created, "model": model,
                 "choices": [{"text": text, "index": 0, "logprobs": None, "finish_reason": finish}]}
            if usage is not None:
                d["usage"] = usage
            return b"data: " + json.dumps(d, separators=(",", ":")).encode() + b"\n\n"

        async def events() -> AsyncIterator[bytes]:
            n = 1
            try:
                yield chunk(first, None)
                async for piece in agen:
                    n += 1
                    yield chunk(piece, None)
                yield chunk("", "length", _usage(prompt_tokens, n))
            except (BatcherClosed, RuntimeError) as exc:
                log.warning("completion stream ended early: %s", exc)
                err = {"error": {"message": "generation stopped early", "type": "server_error",
                                 "param": None, "code": None}}
                yield b"data: " + json.dumps(err).encode() + b"\n\n"
            finally:
                await agen.aclose()
                set_tokens(prompt_tokens=prompt_tokens, output_tokens=n, model=model)
            yield b"data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"cache-control": "no-cache"})

    @app.post("/v1/batch")
    async def batch(request: Request) -> JSONResponse:
        raw = await _read_body(request, s.max_batch_body_bytes)
        ctype = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
        items = _parse_batch(raw, ctype, s)
        eb: EmbeddingBatcher = request.app.state.embedding_batcher
        gb: DynamicBatcher = request.app.state.generate_batcher
        # validate every item before any model work: a bad item rejects the whole batch
        jobs: list[tuple[str, str, tuple[str, list[str]] | _Completion]] = []
        for i, (custom_id, url, body) in enumerate(items):
            try:
                if url == "/v1/embeddings":
                    jobs.append((custom_id, url, _parse_embeddings(body, s)))
                else:
                    c = _parse_completion(body, s, gb)
                    if c.stream:
                        raise _BadRequest(422, "'stream' must be false in a batch", "stream")
                    jobs.append((custom_id, url, c))
            except _BadRequest as exc:
                raise _BadRequest(exc.status, f"requests[{i}].body: {exc.message}", f"requests[{i}].body.{exc.param}"
                                  if exc.param else f"requests[{i}].body", exc.type, exc.code) from None
        gate = asyncio.Semaphore(min(s.batch_concurrency, s.max_queue))
        created = int(time.time())
        tokens = {"prompt": 0, "output": 0}
        models: set[str] = set()

        async def retry_busy(submit):
            # the batch waits its turn instead of failing when the queues are full
            delay = 0.002
            while True:
                try:
                    return await submit()
                except BatcherOverloaded:
                    await asyncio.sleep(delay)
                    delay = min(2 * delay, 0.05)

        async def run_one(custom_id: str, url: str, job) -> dict:
            rid = "batch_req_" + uuid.uuid4().hex
            async with gate:
                try:
                    if url == "/v1/embeddings":
                        model, texts = job
                        vecs, toks = await retry_busy(lambda: eb.embed(texts))
                        n = int(sum(toks))
                        tokens["prompt"] += n
                        models.add(model)
                        body = _embedding_body(model, vecs, toks)
                    else:
                        async def generate(c=job) -> list[str]:
                            pieces: list[str] = []
                            agen = gb.generate(c.prompt, c.max_tokens, temperature=c.temperature, seed=c.seed)
                            try:
                                async for piece in agen:
                                    pieces.append(piece)
                            finally:
                                await agen.aclose()
                            return pieces

                        pieces = await retry_busy(generate)
                        tokens["prompt"] += job.prompt_tokens
                        tokens["output"] += len(pieces)
                        models.add(job.model)
                        body = _completion_body("cmpl-" + uuid.uuid4().hex, created, job.model, "".join(pieces),
                                                job.prompt_tokens, len(pieces))
                except (BatcherClosed, RuntimeError) as exc:
                    log.warning("batch item %r failed: %s", custom_id, exc)
                    return {"id": rid, "custom_id": custom_id, "response": None,
                            "error": {"code": "server_error", "message": "the model failed on this request"}}
            return {"id": rid, "custom_id": custom_id, "response": {"status_code": 200, "body": body}, "error": None}

        data = await asyncio.gather(*(run_one(*job) for job in jobs))
        set_tokens(prompt_tokens=tokens["prompt"], output_tokens=tokens["output"],
                   model=",".join(sorted(models)))
        failed = sum(d["error"] is not None for d in data)
        return JSONResponse({
            "object": "batch.result", "id": "batch_" + uuid.uuid4().hex, "created": created,
            "request_counts": {"total": len(data), "completed": len(data) - failed, "failed": failed},
            "data": data,
            "usage": {"prompt_tokens": tokens["prompt"], "completion_tokens": tokens["output"],
                      "total_tokens": tokens["prompt"] + tokens["output"]},
        })

    return app


def _usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


_BATCH_URLS = ("/v1/completions", "/v1/embeddings")
_JSONL_TYPES = ("application/jsonl", "application/x-ndjson", "application/x-jsonlines", "application/jsonlines")


def _parse_embeddings(body: dict, s: DemoSettings) -> tuple[str, list[str]]:
    """An embeddings request body -> ``(model, texts)``; raises :class:`_BadRequest`."""
    model = _check_model(body, EMBEDDING_MODEL)
    fmt = body.get("encoding_format")
    if fmt not in (None, "float"):
        raise _BadRequest(422, "'encoding_format' must be 'float'", "encoding_format")
    raw = body.get("input")
    if isinstance(raw, str):
        texts = [raw]
    elif isinstance(raw, list) and raw:
        texts = raw
    elif raw is None:
        raise _BadRequest(422, "'input' is required: a string or a list of strings", "input")
    else:
        raise _BadRequest(422, "'input' must be a non-empty string or a non-empty list of strings", "input")
    if len(texts) > s.max_embedding_inputs:
        raise _BadRequest(422, f"'input' has {len(texts)} items; at most {s.max_embedding_inputs} "
                               "per request", "input")
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise _BadRequest(422, f"'input[{i}]' must be a string", "input")
        if not t.strip():
            raise _BadRequest(422, f"'input[{i}]' is empty", "input")
        if len(t) > s.max_embedding_chars:
            raise _BadRequest(422, f"'input[{i}]' has {len(t)} characters; at most "
                                   f"{s.max_embedding_chars}", "input")
    return model, texts


@dataclass(frozen=True, slots=True)
class _Completion:
    model: str
    prompt: str
    max_tokens: int
    temperature: float
    seed: int | None
    stream: bool
    prompt_tokens: int


def _parse_completion(body: dict, s: DemoSettings, gb: DynamicBatcher) -> _Completion:
    """A completions request body, checked; raises :class:`_BadRequest`."""
    model = _check_model(body, COMPLETION_MODEL)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1:
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise _BadRequest(422, "'prompt' is required and must be a string", "prompt")
    if not prompt:
        raise _BadRequest(422, "'prompt' is empty", "prompt")
    if len(prompt) > s.max_prompt_chars:
        raise _BadRequest(422, f"'prompt' has {len(prompt)} characters; at most {s.max_prompt_chars}",
                          "prompt")
    max_tokens = _int_field(body, "max_tokens", 16, 1, s.max_completion_tokens)
    seed = _int_field(body, "seed", None, 0, 2**63 - 1)
    temperature = body.get("temperature", 0.0)
    if temperature is None:
        temperature = 0.0
    if (not isinstance(temperature, (int, float)) or isinstance(temperature, bool)
            or not math.isfinite(temperature) or not 0.0 <= temperature <= 2.0):
        raise _BadRequest(422, "'temperature' must be a number between 0 and 2", "temperature")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise _BadRequest(422, "'stream' must be true or false", "stream")
    try:
        prompt_tokens = gb.validate(prompt, max_tokens)
    except ValueError as exc:
        raise _BadRequest(422, str(exc), "prompt") from None
    return _Completion(model, prompt, max_tokens, float(temperature), seed, stream, prompt_tokens)


def _embedding_body(model: str, vecs, toks) -> dict:
    n = int(sum(toks))
    return {
        "object": "list",
        "data": [{"object": "embedding", "embedding": vecs[i].tolist(), "index": i} for i in range(len(toks))],
        "model": model,
        "usage": {"prompt_tokens": n, "total_tokens": n},
    }


def _completion_body(cid: str, created: int, model: str, text: str, prompt_tokens: int, n: int) -> dict:
    return {
        "id": cid, "object": "text_completion", "created": created, "model": model,
        "choices": [{"text": text, "index": 0, "logprobs": None, "finish_reason": "length"}],
        "usage": _usage(prompt_tokens, n),
    }


def _parse_batch(raw: bytes, content_type: str, s: DemoSettings) -> list[tuple[str, str, dict]]:
    """A batch body (JSON ``{"requests": [...]}`` or JSON Lines) -> ``[(custom_id, url, body)]``.

    Raises :class:`_BadRequest` naming the first bad item and what to fix."""
    if content_type in _JSONL_TYPES:
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise _BadRequest(422, "batch body is not valid UTF-8") from None
        items: list[Any] = []
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            if len(items) >= s.max_batch_requests:
                raise _BadRequest(422, f"a batch holds at most {s.max_batch_requests} requests; split it",
                                  "requests", code="batch_too_large")
            try:
                items.append(json.loads(line))
            except ValueError:
                raise _BadRequest(422, f"line {n} of the JSON Lines body is not valid JSON", "requests") from None
    else:
        try:
            body = json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            raise _BadRequest(422, "request body is not valid JSON (send {\"requests\": [...]}, or JSON Lines "
                                   "with content type application/jsonl)") from None
        if not isinstance(body, dict) or not isinstance(body.get("requests"), list):
            raise _BadRequest(422, "request body must be a JSON object with a 'requests' list", "requests")
        items = body["requests"]
    if not items:
        raise _BadRequest(422, "the batch is empty: give at least one request", "requests")
    if len(items) > s.max_batch_requests:
        raise _BadRequest(422, f"the batch has {len(items)} requests; at most {s.max_batch_requests}; split it",
                          "requests", code="batch_too_large")
    out, seen = [], set()
    for i, it in enumerate(items):
        where = f"requests[{i}]"
        if not isinstance(it, dict):
            raise _BadRequest(422, f"{where} must be an object with custom_id, url and body", where)
        cid = it.get("custom_id")
        if not isinstance(cid, str) or not cid or len(cid) > 128:
            raise _BadRequest(422, f"{where}.custom_id must be a non-empty string of at most 128 characters",
                              f"{where}.custom_id")
        if cid in seen:
            raise _BadRequest(422, f"{where}.custom_id {cid[:64]!r} is used twice; custom ids must be unique",
                              f"{where}.custom_id")
        seen.add(cid)
        method = it.get("method", "POST")
        if method != "POST":
            raise _BadRequest(422, f"{where}.method must be 'POST'", f"{where}.method")
        url = it.get("url")
        if url not in _BATCH_URLS:
            raise _BadRequest(422, f"{where}.url must be one of {', '.join(_BATCH_URLS)}", f"{where}.url")
        body = it.get("body")
        if not isinstance(body, dict):
            raise _BadRequest(422, f"{where}.body must be a JSON object (the request's body)", f"{where}.body")
        out.append((cid, url, body))
    return out
