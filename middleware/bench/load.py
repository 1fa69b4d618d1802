"""Load generation for ``wattspan bench``: a seeded workload and three ways of sending it.

* :func:`open_loop`: Poisson arrivals at a target rate; a request is sent at its
  scheduled time whether or not earlier ones have finished (what real users do);
* :func:`closed_loop`: ``concurrency`` workers, each sending its next request when the
  last one is answered;
* :func:`batches`: the same requests grouped into batches, one HTTP request per batch,
  to a batch endpoint (``POST /v1/batch`` of the demo server).

One ``httpx.AsyncClient`` on one event loop; in one process it manages a few hundred
requests per second (about 300/s closed-loop on a 2-core machine against a trivial server;
beyond that the event loop, not the server, sets the pace). :class:`PhaseResult` reports the achieved against the target rate
and how late requests left (``send_lag``), so a saturated generator shows in the report;
run several ``wattspan bench --load-only`` processes (on several machines) and merge
their files when one is not enough.
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np

__all__ = ["ClientResult", "PhaseResult", "PhaseSpec", "WorkItem", "batches", "closed_loop", "make_workload",
           "open_loop", "run_phase"]

_WORDS = (
    "energy request batch grid carbon token model server latency power idle watt joule region "
    "prompt answer cache queue device memory compute cluster schedule cost budget stream window "
    "summary report inference embedding vector transformer decode prefill throughput utilisation "
    "the a of to and in for on with at by from is are was be this that it as an or"
).split()


@dataclass(frozen=True, slots=True)
class WorkItem:
    """One API call of the workload: ``route`` (``/v1/completions`` or ``/v1/embeddings``)
    and its JSON ``body`` (without ``stream``, which the sender sets)."""

    index: int
    route: str
    body: dict


def make_workload(kind: str, n: int, *, seed: int = 0, max_tokens: int = 32, model: str | None = None) -> list[WorkItem]:
    """``n`` seeded requests of ``kind`` (``completions`` or ``embeddings``).

    Completions: prompts of 6 to 40 words, ``max_tokens`` tokens each, greedy, a per-item
    seed. Embeddings: 1 to 4 texts of 4 to 30 words. The same ``seed`` gives the same list.
    """
    if kind not in ("completions", "embeddings"):
        raise ValueError(f"workload must be 'completions' or 'embeddings', got {kind!r}")
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"the number of requests must be an int >= 1, got {n!r}")
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or not 1 <= max_tokens <= 4096:
        raise ValueError(f"max_tokens must be an int between 1 and 4096, got {max_tokens!r}")
    rng = random.Random(seed)

    def text(lo: int, hi: int) -> str:
        return " ".join(rng.choice(_WORDS) for _ in range(rng.randint(lo, hi))).capitalize() + "."

    out = []
    for i in range(n):
        if kind == "completions":
            body = {"prompt": text(6, 40), "max_tokens": max_tokens, "temperature": 0.0, "seed": rng.randrange(2**31)}
            route = "/v1/completions"
        else:
            body = {"input": [text(4, 30) for _ in range(rng.randint(1, 4))]}
            route = "/v1/embeddings"
        if model:
            body["model"] = model
        out.append(WorkItem(i, route, body))
    return out


@dataclass(slots=True)
class ClientResult:
    """What the client saw of one HTTP request (times in seconds from the phase start).

    ``rid``: wattspan's request id from the response header ("" if absent); ``items``:
    API calls it carried (1, or a batch's size) and ``items_ok`` how many succeeded;
    ``ttft_s``: time to the first streamed chunk (NaN when not streamed).
    """

    index: int
    rid: str = ""
    status: int = 0
    ok: bool = False
    error: str = ""
    scheduled_s: float = 0.0
    sent_s: float = 0.0
    latency_s: float = math.nan
    ttft_s: float = math.nan
    items: int = 1
    items_ok: int = 0


@dataclass(frozen=True, slots=True)
class PhaseSpec:
    """One phase of a bench: ``mode`` ``open`` (``value`` = requests/s), ``closed``
    (``value`` = concurrency) or ``batch`` (``value`` = requests per batch)."""

    mode: str
    value: float

    @property
    def name(self) -> str:
        if self.mode == "open":
            return f"open-{self.value:g}rps"
        if self.mode == "closed":
            return f"closed-c{int(self.value)}"
        return f"batch-{int(self.value)}"

    @property
    def label(self) -> str:
        if self.mode == "open":
            return f"on demand, Poisson {self.value:g} req/s"
        if self.mode == "closed":
            return f"on demand, {int(self.value)} concurrent"
        return f"batch, {int(self.value)} per batch"


@dataclass
class PhaseResult:
    """A phase's client-side results; ``started_unix``/``ended_unix`` wall-clock bounds."""

    spec: PhaseSpec
    results: list[ClientResult]
    started_unix: float
    ended_unix: float
    target_rate: float = math.nan  # requests/s asked for (open loop)
    extra: dict = field(default_factory=dict)

    @property
    def wall_s(self) -> float:
        return self.ended_unix - self.started_unix

    def to_dict(self) -> dict:
        return {"name": self.spec.name, "mode": self.spec.mode, "value": self.spec.value,
                "started_unix": self.started_unix, "ended_unix": self.ended_unix, "target_rate": self.target_rate,
                "extra": self.extra, "results": [asdict(r) for r in self.results]}

    @classmethod
    def from_dict(cls, d: dict) -> PhaseResult:
        spec = PhaseSpec(d["mode"], float(d["value"]))
        return cls(spec, [ClientResult(**r) for r in d["results"]], float(d["started_unix"]), float(d["ended_unix"]),
                   float(d.get("target_rate", math.nan)), dict(d.get("extra") or {}))


def _short(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"[:200]


async def _send(client, item: WorkItem, res: ClientResult, t0: float, *, stream: bool, id_header: str) -> None:
    """One on-demand request; fills ``res``. Never raises for HTTP trouble."""
    body = dict(item.body)
    streaming = stream and item.route == "/v1/completions"
    if streaming:
        body["stream"] = True
    res.sent_s = time.perf_counter() - t0
    try:
        if streaming:
            async with client.stream("POST", item.route, json=body) as r:
                res.status, res.rid = r.status_code, r.headers.get(id_header, "")
                done = False
                async for line in r.aiter_lines():
                    if not line:
                        continue
                    if math.isnan(res.ttft_s) and line.startswith("data: {"):
                        res.ttft_s = time.perf_counter() - t0 - res.sent_s
                    if line == "data: [DONE]":
                        done = True
                    elif line.startswith('data: {"error"'):
                        res.error = "the stream reported an error"
                res.ok = r.status_code == 200 and done and not res.error
        else:
            r = await client.post(item.route, json=body)
            res.status, res.rid = r.status_code, r.headers.get(id_header, "")
            res.ok = r.status_code == 200
        if not res.ok and not res.error:
            res.error = f"HTTP {res.status}" + (", the stream ended without data: [DONE]" if streaming and res.status == 200 else "")
    except Exception as exc:  # a failed request is a result, not a crash
        res.error = _short(exc)
    res.latency_s = time.perf_counter() - t0 - res.sent_s
    res.items_ok = int(res.ok)


async def open_loop(client, items: Sequence[WorkItem], *, rate: float, seed: int = 0, stream: bool = True,
                    id_header: str = "x-wattspan-request-id", on_done: Callable[[int], None] | None = None,
                    max_in_flight: int = 10_000) -> tuple[list[ClientResult], float]:
    """Send ``items`` at Poisson arrivals of ``rate`` per second (seeded); returns the
    results and the phase start (``time.perf_counter()``). Requests beyond
    ``max_in_flight`` wait (counted as send lag)."""
    if not (math.isfinite(rate) and rate > 0):
        raise ValueError(f"rate must be > 0 requests/s, got {rate!r}")
    gaps = np.random.default_rng(seed).exponential(1.0 / rate, size=len(items))
    gaps[0] = 0.0
    sched = np.cumsum(gaps)
    gate = asyncio.Semaphore(max_in_flight)
    results = [ClientResult(index=it.index) for it in items]

    async def one(i: int) -> None:
        try:
            await _send(client, items[i], results[i], t0, stream=stream, id_header=id_header)
        finally:
            gate.release()
            if on_done:
                on_done(1)

    tasks = []
    t0 = time.perf_counter()
    for i in range(len(items)):
        results[i].scheduled_s = float(sched[i])
        delay = t0 + sched[i] - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        await gate.acquire()
        tasks.append(asyncio.ensure_future(one(i)))
    await asyncio.gather(*tasks)
    return results, t0


async def closed_loop(client, items: Sequence[WorkItem], *, concurrency: int, stream: bool = True,
                      id_header: str = "x-wattspan-request-id",
                      on_done: Callable[[int], None] | None = None) -> tuple[list[ClientResult], float]:
    """``concurrency`` workers send ``items`` in order, each its next when the last is answered."""
    if isinstance(concurrency, bool) or not isinstance(concurrency, int) or concurrency < 1:
        raise ValueError(f"concurrency must be an int >= 1, got {concurrency!r}")
    results = [ClientResult(index=it.index) for it in items]
    nxt = iter(range(len(items)))

    async def worker() -> None:
        for i in nxt:
            results[i].scheduled_s = time.perf_counter() - t0
            await _send(client, items[i], results[i], t0, stream=stream, id_header=id_header)
            if on_done:
                on_done(1)

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(min(concurrency, len(items)))))
    return results, t0


async def batches(client, items: Sequence[WorkItem], *, batch_size: int, path: str = "/v1/batch",
                  id_header: str = "x-wattspan-request-id", prefix: str = "bench",
                  on_done: Callable[[int], None] | None = None) -> tuple[list[ClientResult], float]:
    """Send ``items`` in batches of ``batch_size`` to ``path``, one batch after the other.

    The body is ``{"requests": [{"custom_id", "method", "url", "body"}, ...]}`` (the
    OpenAI Batch API's line format). One :class:`ClientResult` per batch."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    results = []
    t0 = time.perf_counter()
    for b, lo in enumerate(range(0, len(items), batch_size)):
        chunk = items[lo:lo + batch_size]
        res = ClientResult(index=b, items=len(chunk))
        res.scheduled_s = time.perf_counter() - t0
        payload = {"requests": [batch_line(it, prefix) for it in chunk]}
        res.sent_s = time.perf_counter() - t0
        try:
            r = await client.post(path, content=json.dumps(payload, separators=(",", ":")).encode(),
                                  headers={"content-type": "application/json"})
            res.status, res.rid = r.status_code, r.headers.get(id_header, "")
            if r.status_code == 200:
                data = r.json().get("data", [])
                res.items_ok = sum(1 for d in data if d.get("error") is None)
                res.ok = res.items_ok == len(chunk)
                if not res.ok:
                    res.error = f"{len(chunk) - res.items_ok} of {len(chunk)} batch items failed"
            else:
                res.error = f"HTTP {r.status_code}: {r.text[:160]}"
        except Exception as exc:
            res.error = _short(exc)
        res.latency_s = time.perf_counter() - t0 - res.sent_s
        results.append(res)
        if on_done:
            on_done(len(chunk))
    return results, t0


def batch_line(item: WorkItem, prefix: str = "bench") -> dict:
    """One line of an OpenAI-style batch input file for ``item``."""
    return {"custom_id": f"{prefix}-{item.index}", "method": "POST", "url": item.route, "body": dict(item.body)}


async def run_phase(client, spec: PhaseSpec, items: Sequence[WorkItem], *, seed: int, stream: bool, id_header: str,
                    batch_path: str, on_done: Callable[[int], None] | None = None) -> PhaseResult:
    """Run one phase and time it on the wall clock."""
    if spec.mode == "open":
        results, t0 = await open_loop(client, items, rate=spec.value, seed=seed, stream=stream, id_header=id_header,
                                      on_done=on_done)
    elif spec.mode == "closed":
        results, t0 = await closed_loop(client, items, concurrency=int(spec.value), stream=stream,
                                        id_header=id_header, on_done=on_done)
    elif spec.mode == "batch":
        results, t0 = await batches(client, items, batch_size=int(spec.value), path=batch_path, id_header=id_header,
                                    prefix=spec.name, on_done=on_done)
    else:
        raise ValueError(f"unknown phase mode {spec.mode!r}")
    ended = time.time()
    started = ended - (time.perf_counter() - t0)  # the phase clock's own start, on the wall clock
    target = spec.value if spec.mode == "open" else math.nan
    return PhaseResult(spec, results, started, ended, target)
