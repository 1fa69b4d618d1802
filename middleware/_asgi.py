"""``EnergyMiddleware``: pure ASGI, one window per HTTP request.

A request's window opens when the request arrives and closes at the final
response body chunk (streaming and SSE included), on an exception, or on a
client disconnect - in one place, :func:`_Window.close`, whichever way the
request ends. All per-request state lives in that small window object; the
middleware object only holds configuration.
"""

from __future__ import annotations

import itertools
import logging
import os
import re
import threading
import time
from collections.abc import Callable
from typing import Any

from ._context import _current

__all__ = ["EnergyMiddleware"]

log = logging.getLogger("wattspan")

_TENANT_OK = re.compile(r"[^A-Za-z0-9_.:-]")
_monotonic_ns = time.monotonic_ns
# Request ids: a random per-process prefix and a counter (unique, and cheaper than
# a random draw per request); the prefix is renewed in a forked child.
_ids = itertools.count(1)
_prefix = os.urandom(4).hex()


def _renew_prefix() -> None:
    global _prefix, _ids
    _prefix, _ids = os.urandom(4).hex(), itertools.count(1)


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_renew_prefix)


def _span_ids() -> tuple[int, int, Any]:
    return 0, 0, None


try:  # OpenTelemetry is optional: with it, the record is tied to the request's server span.
    from opentelemetry import trace as _otel_trace

    def _span_ids() -> tuple[int, int, Any]:  # noqa: F811
        span = _otel_trace.get_current_span()
        ctx = span.get_span_context()
        if ctx.is_valid and span.is_recording():
            return ctx.trace_id, ctx.span_id, span
        return 0, 0, None

except ImportError:  # pragma: no cover - exercised without the otel extra
    pass


class Cardinality:
    """Admits at most ``limit`` distinct values; the rest become ``overflow`` (counted).

    Bounds label cardinality: the middleware's tenants, the metrics' labels.
    """

    __slots__ = ("limit", "seen", "overflow", "overflowed", "_lock")

    def __init__(self, limit: int, overflow: str = "other") -> None:
        self.limit = limit
        self.seen: set[str] = set()
        self.overflow = overflow
        self.overflowed = 0
        self._lock = threading.Lock()

    def __call__(self, value: str) -> str:
        if value in self.seen:
            return value
        with self._lock:
            if len(self.seen) < self.limit:
                self.seen.add(value)
                return value
            self.overflowed += 1
        return self.overflow


class EnergyMiddleware:
    """Meters each HTTP request's energy and CO2e.

    ``app.add_middleware(EnergyMiddleware)`` is enough: the process's default
    :class:`~wattspan.Meter` is created on first use (configured from
    ``WATTSPAN_*`` environment variables). Options, all keyword-only:

    * ``meter``: the :class:`~wattspan.Meter` to report to;
    * ``device``: the accelerator that serves this app (``"gpu0"``), or a
      callable ``scope -> str``;
    * ``model``: a header name (default ``x-model``) or a callable ``scope -> str``;
    * ``tenant``: a header name (default ``x-tenant-id``) or a callable; values
      are cut to ``[A-Za-z0-9_.:-]``, 64 characters, and at most
      ``max_tenants`` distinct values (then ``"other"``);
    * ``request_id_header``: echo wattspan's request id in this response
      header (off by default);
    * ``exclude``: path prefixes not to meter (health checks: ``("/healthz",)``).

    Websocket and lifespan scopes pass straight through.
    """

    def __init__(
        self,
        app,
        *,
        meter=None,
        device: str | Callable[[dict], str] | None = None,
        model: str | Callable[[dict], str] = "x-model",
        tenant: str | Callable[[dict], str] = "x-tenant-id",
        max_tenants: int = 100,
        request_id_header: str | None = None,
        exclude: tuple[str, ...] | list[str] = (),
    ) -> None:
        if max_tenants < 1:
            raise ValueError("max_tenants must be at least 1")
        self.app = app
        self._meter = meter
        self.device = device if device is not None else os.environ.get("WATTSPAN_DEVICE", "gpu0")
        self.model = model.lower().encode("latin-1") if isinstance(model, str) else model
        self.tenant = tenant.lower().encode("latin-1") if isinstance(tenant, str) else tenant
        self.tenants = Cardinality(max_tenants)
        self.request_id_header = request_id_header.lower().encode("latin-1") if request_id_header else None
        self.exclude = tuple(exclude)
        self._header_names = frozenset(h for h in (self.model, self.tenant) if isinstance(h, bytes))
        self.errors = 0

    @property
    def meter(self):
        if self._meter is None:
            from ._meter import get_default_meter

            self._meter = get_default_meter()
        return self._meter

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "lifespan" and self._meter is None:
            # make the default meter (and its OpenTelemetry setup) at startup, not inside the
            # first request: a tracer provider set up then would miss that request's server span
            try:
                self.meter
            except Exception:
                log.exception("could not create the default meter at startup; retrying at the first request")
        if scope["type"] != "http" or (self.exclude and scope.get("path", "").startswith(self.exclude)):
            await self.app(scope, receive, send)
            return
        try:
            window = _Window(self, scope)
        except Exception:  # telemetry must never break a request
            self.errors += 1
            log.exception("could not open a metering window; serving unmetered")
            await self.app(scope, receive, send)
            return
        token = _current.set(window)
        send_wrapper = window.wrap(send)
        try:
            await self.app(scope, receive, send_wrapper)
        except BaseException:
            window.close(error=True)
            raise
        finally:
            window.close()
            _current.reset(token)


class _Window:
    """One request's metering window: opened on arrival, closed exactly once."""

    __slots__ = ("mw", "scope", "id", "device", "status", "closed", "root", "trace_id", "span_id", "prompt_tokens", "output_tokens", "model")

    def __init__(self, mw: EnergyMiddleware, scope) -> None:
        self.mw = mw
        self.scope = scope
        self.id = f"{_prefix}{next(_ids):08x}"
        self.device = mw.device(scope) if callable(mw.device) else mw.device
        self.status = 0
        self.closed = False
        self.prompt_tokens = 0
        self.output_tokens = 0
        self.model = ""
        self.root = scope.get("root_path", "")
        self.trace_id, self.span_id, span = _span_ids()
        meter = mw.meter
        if span is not None and meter.span_processor is not None:
            meter.span_processor.expect(self.span_id)
        meter.begin(self.id, self.device, _monotonic_ns())
        prov = getattr(meter, "provisional", None)  # wattspan.usage_energy() is in use: tally this request's steps
        if prov is not None:
            prov.open(self.id)

    def wrap(self, send):
        rid_header = self.mw.request_id_header

        async def send_wrapper(message) -> None:
            t = message["type"]
            if t == "http.response.start":
                self.status = message["status"]
                if rid_header is not None:
                    message = dict(message)
                    message["headers"] = [*message.get("headers", ()), (rid_header, self.id.encode())]
                await send(message)
            elif t == "http.response.body" and not message.get("more_body", False):
                try:
                    await send(message)
                finally:
                    self.close()
            else:
                await send(message)

        return send_wrapper

    def close(self, error: bool = False) -> None:
        """The one place a request's window closes: last body chunk, exception or disconnect."""
        if self.closed:
            return
        self.closed = True
        t = _monotonic_ns()
        try:
            mw = self.mw
            scope = self.scope
            model, tenant = self._labels()
            meta = {
                "route": self._route(),
                "http_method": scope.get("method", ""),
                "status_code": 500 if (error and not self.status) else self.status,
                "model": model,
                "tenant": tenant,
                "trace_id": self.trace_id,
                "span_id": self.span_id,
                "prompt_tokens": self.prompt_tokens,
                "output_tokens": self.output_tokens,
            }
            mw.meter.end(self.id, self.device, t, meta)
            prov = getattr(mw.meter, "provisional", None)
            if prov is not None:
                prov.forget(self.id)
        except Exception:
            self.mw.errors += 1
            log.exception("could not close a metering window")

    def _route(self) -> str:
        """The route template (``/items/{id}``), never the raw path: bounded cardinality."""
        scope = self.scope
        route = scope.get("route")
        path = getattr(route, "path", None)
        if path is None:
            return "(unmatched)"
        prefix = scope.get("root_path", "")[len(self.root) :]
        return (prefix + path)[:256]

    def _value(self, source, limit: int, headers: dict) -> str:
        if callable(source):
            try:
                v = source(self.scope)
            except Exception:
                self.mw.errors += 1
                return ""
        else:
            v = headers.get(source)
        return str(v)[:limit] if v else ""

    def _labels(self) -> tuple[str, str]:
        """Model and tenant, from one pass over the request headers."""
        mw = self.mw
        wanted = mw._header_names
        headers = {}
        if wanted:
            for k, v in self.scope.get("headers", ()):
                if k in wanted:
                    headers[k] = v.decode("latin-1")
        model = self.model or self._value(mw.model, 128, headers)
        tenant = self._value(mw.tenant, 256, headers)
        if tenant:
            tenant = mw.tenants(_TENANT_OK.sub("", tenant)[:64] or "invalid")
        return model, tenant
