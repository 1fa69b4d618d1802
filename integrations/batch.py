"""The generic batch-step API: any model server tells wattspan what each step ran.

Call :func:`record_step` after every forward pass of the batch (from any
thread: it only appends to the meter's queue)::

    from wattspan import current_request_id
    from wattspan.integrations.batch import record_step

    rid = current_request_id()          # in the request's context, when it enqueues work
    ...
    t0 = time.monotonic_ns(); model.step(batch); t1 = time.monotonic_ns()
    record_step(t0, t1, {rid_a: 512, rid_b: 1, rid_c: 1}, device="gpu0")
    record_step(t0, t1, {rid_a: 1}, device=["gpu0", "gpu1", "gpu2", "gpu3"])  # tensor parallel

Tokens are what each request processed in that step: its prefill chunk, or 1
for a decode token. Requests are named by wattspan's request id, the one the
middleware gave them (:func:`wattspan.current_request_id` in the request's
context, also returned to the caller in ``x-wattspan-request-id`` when the
middleware's ``request_id_header`` is set); tokens under an id that no
metering window has are left out of the split. Or time the step with
:class:`step`::

    with step("gpu0") as s:
        out = model.forward(batch)
        for rid, n in batch.tokens.items():
            s.add(rid, n)
"""

from __future__ import annotations

import time
from collections.abc import Mapping

__all__ = ["record_step", "step"]


def _meter(meter):
    if meter is not None:
        return meter
    from wattspan.defaults import get_default_meter

    return get_default_meter()


def record_step(start_ns: int, end_ns: int, tokens: Mapping[str, float], *, device: str | list[str] = "gpu0", meter=None) -> None:
    """Report one batch step on ``device`` over ``[start_ns, end_ns)`` (``time.monotonic_ns()``).

    ``device``: one device (``"gpu0"``) or the device group the step ran on (``["gpu0", "gpu1"]``
    or ``"gpu0,gpu1"``: a tensor-parallel step, or one pipeline stage's GPUs)."""
    _meter(meter).record_step(start_ns, end_ns, device, tokens)  # the meter checks the times (a bad one: dropped, counted)


class step:
    """Times a batch step and reports it on exit (also when the step raised)."""

    __slots__ = ("device", "meter", "tokens", "start_ns")

    def __init__(self, device: str | list[str] = "gpu0", *, meter=None) -> None:
        self.device = device
        self.meter = meter
        self.tokens: dict[str, float] = {}
        self.start_ns = 0

    def add(self, request_id: str, tokens: float = 1) -> None:
        self.tokens[request_id] = self.tokens.get(request_id, 0) + tokens

    def __enter__(self) -> "step":
        self.start_ns = time.monotonic_ns()
        return self

    def __exit__(self, *exc) -> None:
        if self.tokens:
            record_step(self.start_ns, time.monotonic_ns(), self.tokens, device=self.device, meter=self.meter)
