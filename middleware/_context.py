"""The current request, as a context variable the middleware sets and hooks read."""

from __future__ import annotations

from contextvars import ContextVar

__all__ = ["current_request_id"]

_request_id: ContextVar[str | None] = ContextVar("wattspan_request_id", default=None)


def current_request_id() -> str | None:
    """The id wattspan gave the request being served in this context, or ``None``.

    Model-server hooks call it where work is enqueued, so a batch step can name the
    requests it served. It flows into tasks and ``run_in_executor`` calls made
    from the request's context.
    """
    return _request_id.get()
