"""A thin stand-in for vLLM V1's engine core: vLLM needs CUDA and cannot be installed here.

It mirrors only the names and shapes wattspan's hook touches, as vLLM defines them:

* ``vllm/v1/engine/core.py``: ``EngineCore`` with ``.scheduler``, ``.model_executor``,
  ``.vllm_config.model_config.model``, ``add_request(request, request_wave=0)``,
  ``abort_requests(request_ids)``, ``step()`` (schedule -> ``execute_model(so, non_block=True)``
  -> ``future.result()`` -> ``scheduler.update_from_output(so, output)``), and
  ``step_with_batch_queue()`` with ``step_fn`` bound to one of them at the end of ``__init__``.
  ``non_block=False`` gives the older shape (``execute_model(so)`` returns the output).
* ``vllm/v1/core/sched/output.py``: ``SchedulerOutput.num_scheduled_tokens`` (request id ->
  tokens this step), ``total_num_scheduled_tokens``, ``finished_req_ids``.
* ``vllm/v1/engine/__init__.py``: ``EngineCoreOutputs(outputs=[EngineCoreOutput(request_id,
  new_token_ids, finish_reason)])``, returned by ``update_from_output`` as ``{client_index: ...}``.
* ``vllm/v1/request.py``: ``Request.request_id``, ``prompt_token_ids``, ``num_prompt_tokens``.

The "GPU" is a worker thread that sleeps ``base_s + per_token_s * tokens`` per step, so a
step's output arrives after ``execute_model`` has returned, as with CUDA.
"""

from __future__ import annotations

import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from types import SimpleNamespace


@dataclass
class Request:
    request_id: str
    prompt_token_ids: list[int]
    max_tokens: int
    num_computed_tokens: int = 0
    output_token_ids: list[int] = field(default_factory=list)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)


@dataclass
class SchedulerOutput:
    num_scheduled_tokens: dict[str, int]
    total_num_scheduled_tokens: int
    finished_req_ids: set[str]


@dataclass
class EngineCoreOutput:
    request_id: str
    new_token_ids: list[int]
    finish_reason: int | None = None


@dataclass
class EngineCoreOutputs:
    outputs: list[EngineCoreOutput] = field(default_factory=list)


@dataclass
class ModelRunnerOutput:
    req_ids: list[str]


class Scheduler:
    """FCFS, chunked prefill: each step gives running requests a decode token or a prefill chunk."""

    def __init__(self, max_num_batched_tokens: int = 64, max_num_seqs: int = 8) -> None:
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_num_seqs = max_num_seqs
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}
        self.in_flight: set[str] = set()
        self.finished_req_ids: set[str] = set()

    def add_request(self, request: Request) -> None:
        self.requests[request.request_id] = request
        self.waiting.append(request)

    def has_requests(self) -> bool:
        return bool(self.waiting or self.running or self.finished_req_ids)

    def finish_requests(self, request_ids, status=None) -> None:
        for rid in [request_ids] if isinstance(request_ids, str) else request_ids:
            req = self.requests.pop(rid, None)
            if req is None:
                continue
            if req in self.running:
                self.running.remove(req)
            elif req in self.waiting:
                self.waiting.remove(req)
            self.finished_req_ids.add(rid)

    def schedule(self, *args) -> SchedulerOutput:
        budget = self.max_num_batched_tokens
        tokens: dict[str, int] = {}
        while self.waiting and len(self.running) < self.max_num_seqs:
            self.running.append(self.waiting.popleft())
        for req in self.running:
            if budget <= 0 or req.request_id in self.in_flight:
                continue
            left = req.num_prompt_tokens - req.num_computed_tokens
            n = min(left, budget) if left > 0 else 1
            tokens[req.request_id] = n
            budget -= n
        self.in_flight.update(tokens)
        finished, self.finished_req_ids = self.finished_req_ids, set()
        return SchedulerOutput(tokens, sum(tokens.values()), finished)

    def update_from_output(self, scheduler_output: SchedulerOutput, model_runner_output) -> dict[int, EngineCoreOutputs]:
        outs = []
        for rid, n in scheduler_output.num_scheduled_tokens.items():
            self.in_flight.discard(rid)
            req = self.requests.get(rid)
            if req is None:
                continue
            req.num_computed_tokens += n
            if req.num_computed_tokens < req.num_prompt_tokens:
                continue  # a prefill chunk that does not finish the prompt samples nothing
            req.output_token_ids.append(len(req.output_token_ids) + 1)
            done = len(req.output_token_ids) >= req.max_tokens
            outs.append(EngineCoreOutput(rid, [req.output_token_ids[-1]], 0 if done else None))
            if done:
                self.running.remove(req)
                del self.requests[rid]
                self.finished_req_ids.add(rid)
        return {0: EngineCoreOutputs(outs)} if outs else {}


class Executor:
    """``execute_model`` hands the step to a one-thread "GPU" that sleeps for its duration."""

    def __init__(self, base_s: float = 0.002, per_token_s: float = 0.0001) -> None:
        self.base_s = base_s
        self.per_token_s = per_token_s
        self._gpu = ThreadPoolExecutor(1, thread_name_prefix="fake-gpu")

    def _run(self, so: SchedulerOutput) -> ModelRunnerOutput:
        time.sleep(self.base_s + self.per_token_s * so.total_num_scheduled_tokens)
        return ModelRunnerOutput(list(so.num_scheduled_tokens))

    def execute_model(self, scheduler_output: SchedulerOutput, non_block: bool = False) -> ModelRunnerOutput | Future:
        fut = self._gpu.submit(self._run, scheduler_output)
        return fut if non_block else fut.result()

    def shutdown(self) -> None:
        self._gpu.shutdown(wait=True)


class EngineCore:
    def __init__(self, *, model: str = "fake/model", batch_queue_size: int = 1, non_block: bool = True, base_s: float = 0.002, per_token_s: float = 0.0001, max_num_batched_tokens: int = 64, max_num_seqs: int = 8) -> None:
        self.vllm_config = SimpleNamespace(model_config=SimpleNamespace(model=model, served_model_name=None))
        self.model_executor = Executor(base_s, per_token_s)
        self.scheduler = Scheduler(max_num_batched_tokens, max_num_seqs)
        self.non_block = non_block
        self.batch_queue_size = batch_queue_size
        self.batch_queue: deque | None = deque(maxlen=batch_queue_size) if batch_queue_size > 1 else None
        self.step_fn = self.step if self.batch_queue is None else self.step_with_batch_queue

    def add_request(self, request: Request, request_wave: int = 0) -> None:
        self.scheduler.add_request(request)

    def abort_requests(self, request_ids: list[str]) -> None:
        self.scheduler.finish_requests(request_ids)

    def step(self) -> tuple[dict[int, EngineCoreOutputs], bool]:
        if not self.scheduler.has_requests():
            return {}, False
        scheduler_output = self.scheduler.schedule()
        if self.non_block:
            future = self.model_executor.execute_model(scheduler_output, non_block=True)
            model_output = future.result()
        else:
            model_output = self.model_executor.execute_model(scheduler_output)
        outputs = self.scheduler.update_from_output(scheduler_output, model_output)
        return outputs, scheduler_output.total_num_scheduled_tokens > 0

    def step_with_batch_queue(self) -> tuple[dict[int, EngineCoreOutputs] | None, bool]:
        batch_queue = self.batch_queue
        executed = False
        if self.scheduler.has_requests() and len(batch_queue) < self.batch_queue_size:
            scheduler_output = self.scheduler.schedule()
            if scheduler_output.total_num_scheduled_tokens > 0:
                future = self.model_executor.execute_model(scheduler_output, non_block=True)
                batch_queue.appendleft((future, scheduler_output))
                executed = True
                if len(batch_queue) < self.batch_queue_size:
                    return None, True
        if not batch_queue:
            return None, executed
        future, scheduler_output = batch_queue.pop()
        model_output = future.result()
        return self.scheduler.update_from_output(scheduler_output, model_output), True

    def run_until_done(self, limit: int = 100_000) -> int:
        """Step until no work is left (the engine's busy loop, minus the sockets); returns the steps run."""
        n = 0
        while (self.scheduler.has_requests() or self.batch_queue) and n < limit:
            self.step_fn()
            n += 1
        return n

    def shutdown(self) -> None:
        self.model_executor.shutdown()
