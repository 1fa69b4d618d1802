"""The request being served, as a context variable the middleware sets and hooks read.

The variable holds the request's metering window (a small mutable object), so
what an endpoint reports from a child task (a streaming body, a worker thread
started with the request's context) reaches the middleware too.

Token counts are bounded here, where they enter: a count must be a finite
number ``0 <= n <= MAX_TOKENS``; a larger one is clipped to ``MAX_TOKENS``, a
negative one to 0, and a non-number, NaN or infinity is ignored - each counted
in :data:`counters` and logged once. :func:`set_tokens` never raises.
"""

from __future__ import annotations

import math
from contextvars import ContextVar
from typing import Any

from ..logs import get_logger

__all__ = ["MAX_TOKENS", "current_request_id", "set_tokens"]

log = get_logger(__name__)

#: the largest token count one request can report (10**9): far above any
#: context window, far below the ledger's 64-bit integers
MAX_TOKENS = 1_000_000_000

#: token counts clipped into range, and values ignored (not a finite number)
counters = {"tokens_clipped": 0, "tokens_invalid": 0}

_current: ContextVar[Any] = ContextVar("wattspan_request", default=None)


def current_request_id() -> str | None:
    """The id wattspan gave the request being served in this context, or ``None``.

    Model-server hooks call it where work is enqueued, so a batch step can name the
    requests it served. It flows into tasks and ``run_in_executor`` calls made
    from the request's context.
    """
    w = _current.get()
    return None if w is None else w.id


def bound_tokens(value: Any) -> int | None:
    """``value`` as a token count in ``0..MAX_TOKENS`` (clipped, counted), or ``None``
    (counted) when it is not a finite number."""
    try:
        if isinstance(value, bool):
            raise TypeError
        if isinstance(value, int):
            n = value
        else:
            f = float(value)
            if not math.isfinite(f):
                raise ValueError
            n = int(f)
    except (TypeError, ValueError, OverflowError):
        counters["tokens_invalid"] += 1
        if counters["tokens_invalid"] == 1:
            log.warning("wattspan: ignoring a token count that is not a finite number (%.40r); further ones are only counted", value)
        return None
    if 0 <= n <= MAX_TOKENS:
        return n
    counters["tokens_clipped"] += 1
    if counters["tokens_clipped"] == 1:
        shown = str(n) if abs(n) < 10**40 else f"{'-' if n < 0 else ''}an integer of {n.bit_length()} bits"  # str() of a huge int raises
        log.warning("wattspan: token count %s is outside 0..%d; clipped (further ones are only counted)", shown, MAX_TOKENS)
    return 0 if n < 0 else MAX_TOKENS


def set_tokens(*, prompt_tokens: int | None = None, output_tokens: int | None = None, model: str | None = None) -> None:
    """Report the current request's token counts (and model) from the endpoint.

    They appear on the record as ``prompt_tokens``/``output_tokens`` and on the
    span as ``gen_ai.usage.*``. Outside a metered request it does nothing.
    Counts are bounded (see the module doc); it never raises.
    """
    w = _current.get()
    if w is None:
        return
    if prompt_tokens is not None:
        n = bound_tokens(prompt_tokens)
        if n is not None:
            w.prompt_tokens = n
    if output_tokens is not None:
        n = bound_tokens(output_tokens)
        if n is not None:
            w.output_tokens = n
    if model:
        try:
            w.model = str(model)[:128]
        except Exception:  # a str() that raises: telemetry never breaks the request
            counters["tokens_invalid"] += 1
