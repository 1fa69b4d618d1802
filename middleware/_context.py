"""The request being served, as a context variable the middleware sets and hooks read.

The variable holds the request's metering window (a small mutable object), so
what an endpoint reports from a child task (a streaming body, a worker thread
started with the request's context) reaches the middleware too.
"""

from __future__ import annotations

from contextvars import ContextVar
from typing import Any

__all__ = ["current_request_id", "set_tokens"]

_current: ContextVar[Any] = ContextVar("wattspan_request", default=None)


def current_request_id() -> str | None:
    """The id wattspan gave the request being served in this context, or ``None``.

    Model-server hooks call it where work is enqueued, so a batch step can name the
    requests it served. It flows into tasks and ``run_in_executor`` calls made
    from the request's context.
    """
    w = _current.get()
    return None if w is None else w.id


def set_tokens(*, prompt_tokens: int | None = None, output_tokens: int | None = None, model: str | None = None) -> None:
    """Report the current request's token counts (and model) from the endpoint.

    They appear on the record as ``prompt_tokens``/``output_tokens`` and on the
    span as ``gen_ai.usage.*``. Outside a metered request it does nothing.
    """
    w = _current.get()
    if w is None:
        return
    if prompt_tokens is not None:
        w.prompt_tokens = max(0, int(prompt_tokens))
    if output_tokens is not None:
        w.output_tokens = max(0, int(output_tokens))
    if model:
        w.model = str(model)[:128]
