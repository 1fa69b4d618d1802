"""Dynamic batchers for the demo models: one worker thread each, asyncio-facing.

``DynamicBatcher`` does continuous batching for :class:`~wattspan.demo.models.TinyGenerator`:
requests join and leave at step boundaries; each step holds at most ``max_batch_size``
sequences and ``max_batch_tokens`` tokens (decode tokens first, then prompt prefill in
chunks that fill the rest). ``EmbeddingBatcher`` gathers embedding requests for up to
``max_wait_ms`` (or ``max_batch_size`` texts) and embeds them in one forward.

Both call ``on_step(start_ns, end_ns, device, {request_id: tokens})`` from the worker
thread after every model step, before any result of that step is handed to a waiting
request, so a meter has seen every step of a request by the time its response ends.
``start_ns``/``end_ns`` are ``time.monotonic_ns()`` around the forward; ``tokens`` is
what the step processed for that request (a prefill chunk's length, 1 per decode
token, or the text tokens of an embedding request). An exception in ``on_step`` is
logged and counted (``stats.on_step_errors``) and never affects serving.

A request's id is ``wattspan.meter.context.current_request_id()`` in the context that
submits it (the middleware sets it), or a fresh ``uuid4().hex`` when there is none.
"""

from __future__ import annotations

import asyncio
import math
import queue
import threading
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Sequence
from dataclasses import dataclass

import numpy as np

from ..logs import get_logger
from ..meter.context import current_request_id
from .models import Embedder, GenSequence, TinyGenerator

__all__ = [
    "BatcherClosed",
    "BatcherOverloaded",
    "BatcherStats",
    "DynamicBatcher",
    "EmbeddingBatcher",
    "OnStep",
]

log = get_logger(__name__)

OnStep = Callable[[int, int, str, dict[str, int]], None]
"""``on_step(start_ns, end_ns, device, {request_id: tokens})``."""


class BatcherClosed(RuntimeError):
    """The batcher was closed before (or while) serving the request."""


class BatcherOverloaded(RuntimeError):
    """The batcher's bounded queue of waiting requests is full; retry later."""


@dataclass(frozen=True, slots=True)
class BatcherStats:
    """Counters since start. ``tokens`` counts all tokens the model processed
    (``prefill_tokens + decode_tokens`` for the generator); ``max_requests_in_step``
    is the largest number of distinct requests seen in one step; ``step_s_total`` is
    the summed wall time of model steps, in seconds."""

    steps: int = 0
    requests_done: int = 0
    requests_failed: int = 0
    tokens: int = 0
    prefill_tokens: int = 0
    decode_tokens: int = 0
    max_requests_in_step: int = 0
    on_step_errors: int = 0
    step_s_total: float = 0.0


_STOP = object()
_END = object()


def _request_id(explicit: str | None) -> str:
    if explicit is not None:
        if not isinstance(explicit, str) or not explicit:
            raise ValueError(f"request_id must be a non-empty str or None, got {explicit!r}")
        return explicit
    return current_request_id() or uuid.uuid4().hex


def _check_pos_int(name: str, v: object, lo: int = 1) -> int:
    if not isinstance(v, int) or isinstance(v, bool) or v < lo:
        raise ValueError(f"{name} must be an int >= {lo}, got {v!r}")
    return v


def _check_wait(v: object) -> float:
    if not isinstance(v, (int, float)) or isinstance(v, bool) or not (0.0 <= float(v) < math.inf):
        raise ValueError(f"max_wait_ms must be a finite number >= 0, got {v!r}")
    return float(v)


class _Worker:
    """Thread lifecycle, the guarded ``on_step`` call, counters, and hand-back to loops."""

    def __init__(self, *, device: str, on_step: OnStep | None, max_queue: int, name: str) -> None:
        if not isinstance(device, str) or not device:
            raise ValueError(f"device must be a non-empty str like 'gpu0' or 'cpu0', got {device!r}")
        if on_step is not None and not callable(on_step):
            raise TypeError(f"on_step must be callable or None, got {type(on_step).__name__}")
        self.device = device
        self.on_step = on_step
        self.max_queue = _check_pos_int("max_queue", max_queue)
        self._name = name
        self._inbox: queue.Queue = queue.Queue(maxsize=self.max_queue)
        self._thread: threading.Thread | None = None
        self._start_lock = threading.Lock()  # guards _closed/_thread and queue admission
        self._load_lock = threading.Lock()   # serialises model loading
        self._closed = False
        self._stopping = threading.Event()  # checked by the worker at every step boundary
        self._c = {f: getattr(BatcherStats(), f) for f in BatcherStats.__dataclass_fields__}

    # ---- lifecycle ---------------------------------------------------------------------
    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def stats(self) -> BatcherStats:
        return BatcherStats(**self._c)

    def start(self) -> None:
        """Load the model (in the calling thread) and start the worker thread; idempotent.

        The first ``generate``/``embed`` calls it if needed, which would load the model
        on the event loop's thread: call :meth:`start` or :meth:`astart` first."""
        with self._load_lock:
            if self._thread is not None:
                return
            if self._closed:
                raise BatcherClosed(f"{type(self).__name__} is closed; create a new one")
            self._load()
            with self._start_lock:
                if self._closed:
                    raise BatcherClosed(f"{type(self).__name__} was closed while loading")
                self._thread = threading.Thread(target=self._run_guarded, name=self._name, daemon=True)
                self._thread.start()

    async def astart(self) -> None:
        """:meth:`start` without blocking the event loop (the model loads in a helper
        thread that is joined before this returns)."""
        if self._thread is not None and not self._closed:
            return
        done = threading.Event()
        err: list[BaseException] = []

        def target() -> None:
            try:
                self.start()
            except BaseException as exc:  # handed to the awaiting task
                err.append(exc)
            finally:
                done.set()

        t = threading.Thread(target=target, name=f"{self._name}-load", daemon=True)
        t.start()
        while not done.is_set():
            await asyncio.sleep(0.005)
        t.join()
        if err:
            raise err[0]

    def close(self, timeout_s: float = 10.0) -> None:
        """Stop the worker: requests queued or in flight fail with :class:`BatcherClosed`.
        Blocks until the thread has exited (at most ``timeout_s``)."""
        self._signal_stop()
        if self._thread is not None:
            self._thread.join(timeout_s)
            if self._thread.is_alive():
                raise TimeoutError(f"{self._name} did not stop within {timeout_s} s")

    async def aclose(self, timeout_s: float = 10.0) -> None:
        """:meth:`close` without blocking the event loop."""
        self._signal_stop()
        t = self._thread
        deadline = time.monotonic() + timeout_s
        while t is not None and t.is_alive():
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self._name} did not stop within {timeout_s} s")
            await asyncio.sleep(0.002)

    def _signal_stop(self) -> None:
        with self._start_lock:
            if self._closed:
                return
            self._closed = True
        self._stopping.set()
        started = self._thread is not None
        while True:  # the stop marker must get in even when the queue is full
            try:
                self._inbox.put_nowait(_STOP)
                break
            except queue.Full:
                try:
                    self._fail(self._inbox.get_nowait(), BatcherClosed("batcher closed"))
                except queue.Empty:
                    pass
        if not started:
            self._drain_inbox()

    def _drain_inbox(self) -> None:
        while True:
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                return
            if item is not _STOP:
                self._fail(item, BatcherClosed("batcher closed"))

    def _submit(self, req) -> None:
        if self._thread is None:
            self.start()
        with self._start_lock:  # no request may land behind the stop marker
            if self._closed:
                raise BatcherClosed(f"{type(self).__name__} is closed")
            try:
                self._inbox.put_nowait(req)
            except queue.Full:
                raise BatcherOverloaded(
                    f"{type(self).__name__} has {self.max_queue} requests waiting (max_queue); retry later"
                ) from None

    def _run_guarded(self) -> None:
        try:
            self._run()
        except BaseException:  # pragma: no cover - a bug in the loop itself
            log.exception("%s crashed", self._name)
            raise
        finally:
            self._drain_inbox()

    # ---- per step ---------------------------------------------------------------------
    def _report(self, start_ns: int, end_ns: int, tokens: dict[str, int]) -> None:
        c = self._c
        c["steps"] += 1
        c["step_s_total"] += (end_ns - start_ns) / 1e9
        c["max_requests_in_step"] = max(c["max_requests_in_step"], len(tokens))
        if self.on_step is None:
            return
        try:
            self.on_step(start_ns, end_ns, self.device, tokens)
        except Exception:
            c["on_step_errors"] += 1
            n = c["on_step_errors"]
            if n & (n - 1) == 0:  # 1st, 2nd, 4th, 8th ... failure: don't flood the log
                log.exception("on_step callback failed (%d failures so far); serving continues", n)

    @staticmethod
    def _deliver(batches: dict) -> None:
        """Hand results to their event loops: ``{loop: [(callback, arg), ...]}``."""
        for loop, items in batches.items():
            try:
                loop.call_soon_threadsafe(_run_all, items)
            except RuntimeError:  # the loop is closed; nobody is waiting any more
                pass

    # subclass hooks
    def _load(self) -> None:
        raise NotImplementedError

    def _run(self) -> None:
        raise NotImplementedError

    def _fail(self, req, exc: BaseException) -> None:
        raise NotImplementedError


def _run_all(items: list) -> None:
    for fn, arg in items:
        fn(arg)


# =========================================================================================
# Generation: continuous batching
# =========================================================================================


class _GenRequest:
    __slots__ = ("rid", "prompt_ids", "max_tokens", "temperature", "seed", "loop", "out",
                 "cancelled", "seq")

    def __init__(self, rid: str, prompt_ids: list[int], max_tokens: int, temperature: float,
                 seed: int | None, loop: asyncio.AbstractEventLoop) -> None:
        self.rid = rid
        self.prompt_ids = prompt_ids
        self.max_tokens = max_tokens
        self.temperature = temperature
        self.seed = seed
        self.loop = loop
        self.out: asyncio.Queue = asyncio.Queue()  # at most max_tokens + 1 items
        self.cancelled = False
        self.seq: GenSequence | None = None  # while admitted

    def held(self) -> GenSequence:
        """The sequence of an admitted request (it holds one until it ends or is withdrawn)."""
        assert self.seq is not None, "the request is not admitted"
        return self.seq


class DynamicBatcher(_Worker):
    """Continuous batching for a :class:`TinyGenerator` (see the module docstring).
    Give each batcher its own generator: the worker thread is its only driver.

    ``max_batch_size``: most sequences in one step (and in flight); ``max_batch_tokens``:
    most tokens in one step (prompts longer than what is left are prefilled in chunks);
    ``max_wait_ms``: when idle, how long the first request waits for company before the
    first step; ``max_queue``: most requests waiting to be admitted (beyond it,
    :class:`BatcherOverloaded`).
    """

    def __init__(self, generator: TinyGenerator, *, device: str = "cpu0", on_step: OnStep | None = None,
                 max_batch_size: int = 8, max_batch_tokens: int = 256, max_wait_ms: float = 2.0,
                 max_queue: int = 64) -> None:
        super().__init__(device=device, on_step=on_step, max_queue=max_queue, name="wattspan-demo-generate")
        self.generator = generator
        self.max_batch_size = _check_pos_int("max_batch_size", max_batch_size)
        self.max_batch_tokens = _check_pos_int("max_batch_tokens", max_batch_tokens)
        self.max_wait_ms = _check_wait(max_wait_ms)
        if self.max_batch_tokens < self.max_batch_size:
            raise ValueError(
                f"max_batch_tokens ({max_batch_tokens}) must be >= max_batch_size ({max_batch_size}): "
                "every sequence in a step needs at least one token"
            )
        if generator.config.max_slots < self.max_batch_size:
            raise ValueError(
                f"the generator has {generator.config.max_slots} KV-cache slots but max_batch_size is "
                f"{max_batch_size}; lower max_batch_size or raise GeneratorConfig.max_slots"
            )

    @property
    def max_context_tokens(self) -> int:
        """Prompt tokens + max_tokens allowed per request."""
        return self.generator.config.max_seq_len

    def count_prompt_tokens(self, prompt: str) -> int:
        return len(self.generator.encode(prompt))

    def validate(self, prompt: str, max_tokens: int) -> int:
        """Check a request without submitting it; return its prompt token count.
        Raises ``ValueError`` naming what is wrong."""
        if not isinstance(prompt, str):
            raise ValueError(f"prompt must be a str, got {type(prompt).__name__}")
        n = self.count_prompt_tokens(prompt)
        if n == 0:
            raise ValueError("prompt is empty: give at least one character")
        _check_pos_int("max_tokens", max_tokens)
        if n + max_tokens > self.max_context_tokens:
            raise ValueError(
                f"prompt ({n} tokens) + max_tokens ({max_tokens}) exceeds the model context of "
                f"{self.max_context_tokens} tokens; shorten the prompt or lower max_tokens"
            )
        return n

    async def generate(self, prompt: str, max_tokens: int, *, temperature: float = 0.0,
                       seed: int | None = None, request_id: str | None = None) -> AsyncGenerator[str, None]:
        """Yield the text of each generated token as the worker produces it.

        The request is submitted when iteration starts (the request id is read from
        the context then). Raises ``ValueError`` for a bad request,
        :class:`BatcherOverloaded` when the queue is full, :class:`BatcherClosed` after
        close. Stopping iteration early (``aclose()``, a cancelled task) withdraws the
        request at the next step boundary.
        """
        self.validate(prompt, max_tokens)
        if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature >= 0):
            raise ValueError(f"temperature must be a finite number >= 0, got {temperature!r}")
        if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
            raise ValueError(f"seed must be an int or None, got {seed!r}")
        req = _GenRequest(_request_id(request_id), self.generator.encode(prompt), max_tokens,
                          float(temperature), seed, asyncio.get_running_loop())
        self._submit(req)
        finished = False
        try:
            while True:
                item = await req.out.get()
                if item is _END:
                    finished = True
                    return
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                yield item
        finally:
            if not finished:
                req.cancelled = True

    # ---- worker -------------------------------------------------------------------------
    def _load(self) -> None:
        self.generator.load()

    def _fail(self, req: _GenRequest, exc: BaseException) -> None:
        self._c["requests_failed"] += 1
        if req.seq is not None:
            self.generator.release(req.seq)
            req.seq = None
        self._deliver({req.loop: [(req.out.put_nowait, exc)]})

    def _admit(self, req, active: list[_GenRequest]) -> bool:
        """Start ``req``'s sequence; False if it is the stop marker."""
        if req is _STOP:
            return False
        if req.cancelled:
            return True
        try:
            req.seq = self.generator.start(req.prompt_ids, max_tokens=req.max_tokens,
                                           temperature=req.temperature, seed=req.seed)
        except Exception as exc:
            self._fail(req, exc)
            return True
        active.append(req)
        return True

    def _run(self) -> None:
        gen = self.generator
        active: list[_GenRequest] = []
        stopping = False
        while not stopping and not self._stopping.is_set():
            if not active:
                if not self._admit(self._inbox.get(), active):
                    break
                deadline = time.monotonic() + self.max_wait_ms / 1e3
                while len(active) < self.max_batch_size:
                    left = deadline - time.monotonic()
                    try:
                        item = self._inbox.get(timeout=left) if left > 0 else self._inbox.get_nowait()
                    except queue.Empty:
                        break
                    if not self._admit(item, active):
                        stopping = True
                        break
            else:
                while len(active) < self.max_batch_size:
                    try:
                        item = self._inbox.get_nowait()
                    except queue.Empty:
                        break
                    if not self._admit(item, active):
                        stopping = True
                        break
            if stopping or self._stopping.is_set():
                break
            # withdraw cancelled requests at the step boundary
            keep = []
            for r in active:
                if r.cancelled:
                    gen.release(r.held())
                    r.seq = None
                else:
                    keep.append(r)
            active = keep
            if not active:
                continue

            # schedule: decode tokens first, then prefill chunks in arrival order
            budget = self.max_batch_tokens
            items: list[tuple[_GenRequest, int]] = []
            for r in active:
                if not r.held().in_prefill:
                    items.append((r, 1))
                    budget -= 1
            for r in active:
                if r.held().in_prefill and budget > 0:
                    n = min(r.held().pending, budget)
                    items.append((r, n))
                    budget -= n

            t0 = time.monotonic_ns()
            try:
                toks = gen.step([(r.held(), n) for r, n in items])
            except Exception as exc:
                log.exception("generator step failed; failing the %d requests in it", len(items))
                stepped = {id(r) for r, _ in items}
                for r, _ in items:
                    self._fail(r, RuntimeError(f"model step failed: {exc!r}"))
                active = [r for r in active if id(r) not in stepped]
                continue
            t1 = time.monotonic_ns()

            per_req: dict[str, int] = {}
            c = self._c
            for r, n in items:
                per_req[r.rid] = per_req.get(r.rid, 0) + n
                if n == 1 and r.held().pos > len(r.held().prompt_ids):
                    c["decode_tokens"] += 1
                else:
                    c["prefill_tokens"] += n
                c["tokens"] += n
            self._report(t0, t1, per_req)

            out: dict = {}
            still: list[_GenRequest] = []
            done_ids = set()
            for (r, _n), tok in zip(items, toks):
                if tok is None:
                    continue
                q = out.setdefault(r.loop, [])
                q.append((r.out.put_nowait, gen.decode([tok])))
                if r.held().done:
                    q.append((r.out.put_nowait, _END))
                    gen.release(r.held())
                    r.seq = None
                    c["requests_done"] += 1
                    done_ids.add(id(r))
            for r in active:
                if id(r) not in done_ids:
                    still.append(r)
            active = still
            self._deliver(out)

        for r in active:
            self._fail(r, BatcherClosed("batcher closed while the request was in flight"))


# =========================================================================================
# Embeddings: gather and run
# =========================================================================================


class _EmbRequest:
    __slots__ = ("rid", "texts", "loop", "fut")

    def __init__(self, rid: str, texts: list[str], loop: asyncio.AbstractEventLoop) -> None:
        self.rid = rid
        self.texts = texts
        self.loop = loop
        self.fut: asyncio.Future = loop.create_future()


def _settle(arg: tuple) -> None:
    fut, value, is_exc = arg
    if fut.done():  # the waiter was cancelled
        return
    if is_exc:
        fut.set_exception(value)
    else:
        fut.set_result(value)


class EmbeddingBatcher(_Worker):
    """Batches embedding requests for an :class:`Embedder` (see the module docstring).

    A step gathers whole requests until ``max_batch_size`` texts or ``max_wait_ms``
    after the first one arrived (a request larger than ``max_batch_size`` runs alone).
    """

    def __init__(self, embedder: Embedder, *, device: str = "cpu0", on_step: OnStep | None = None,
                 max_batch_size: int = 32, max_wait_ms: float = 5.0, max_queue: int = 256) -> None:
        super().__init__(device=device, on_step=on_step, max_queue=max_queue, name="wattspan-demo-embed")
        self.embedder = embedder
        self.max_batch_size = _check_pos_int("max_batch_size", max_batch_size)
        self.max_wait_ms = _check_wait(max_wait_ms)

    async def embed(self, texts: Sequence[str], *, request_id: str | None = None) -> tuple[np.ndarray, list[int]]:
        """Embed ``texts`` (batched with other requests); returns ``(vectors[n, 384]
        float32 unit-norm, tokens_per_text)`` like :meth:`Embedder.embed`."""
        if isinstance(texts, str) or not isinstance(texts, Sequence):
            raise ValueError("texts must be a list of strings")
        texts = list(texts)
        if not texts:
            raise ValueError("texts is empty: give at least one string")
        if not all(isinstance(t, str) for t in texts):
            raise ValueError("every item of texts must be a str")
        req = _EmbRequest(_request_id(request_id), texts, asyncio.get_running_loop())
        self._submit(req)
        return await req.fut

    def _load(self) -> None:
        self.embedder.load()

    def _fail(self, req: _EmbRequest, exc: BaseException) -> None:
        self._c["requests_failed"] += 1
        self._deliver({req.loop: [(_settle, (req.fut, exc, True))]})

    def _run(self) -> None:
        carry = None
        while True:
            first = carry if carry is not None else self._inbox.get()
            carry = None
            if first is _STOP:
                return
            batch = [first]
            n_texts = len(first.texts)
            deadline = time.monotonic() + self.max_wait_ms / 1e3
            stop_after = False
            while n_texts < self.max_batch_size:
                left = deadline - time.monotonic()
                try:
                    item = self._inbox.get(timeout=left) if left > 0 else self._inbox.get_nowait()
                except queue.Empty:
                    break
                if item is _STOP:
                    stop_after = True
                    break
                if n_texts + len(item.texts) > self.max_batch_size:
                    carry = item
                    break
                batch.append(item)
                n_texts += len(item.texts)
            batch = [r for r in batch if not r.fut.cancelled()]
            if self._stopping.is_set():
                for r in batch:
                    self._fail(r, BatcherClosed("batcher closed"))
                if carry is not None:
                    self._fail(carry, BatcherClosed("batcher closed"))
                return
            if batch:
                self._step(batch)
            if stop_after:
                if carry is not None:
                    self._fail(carry, BatcherClosed("batcher closed"))
                return

    def _step(self, batch: list[_EmbRequest]) -> None:
        texts = [t for r in batch for t in r.texts]
        t0 = time.monotonic_ns()
        try:
            vecs, toks = self.embedder.embed(texts)
        except Exception as exc:
            log.exception("embedding step failed; failing the %d requests in it", len(batch))
            for r in batch:
                self._fail(r, RuntimeError(f"model step failed: {exc!r}"))
            return
        t1 = time.monotonic_ns()
        per_req: dict[str, int] = {}
        out: dict = {}
        i = 0
        c = self._c
        for r in batch:
            n = len(r.texts)
            rt = toks[i:i + n]
            per_req[r.rid] = per_req.get(r.rid, 0) + sum(rt)
            out.setdefault(r.loop, []).append((_settle, (r.fut, (vecs[i:i + n], rt), False)))
            i += n
        c["tokens"] += sum(toks)
        c["prefill_tokens"] += sum(toks)
        c["requests_done"] += len(batch)
        self._report(t0, t1, per_req)
        self._deliver(out)
