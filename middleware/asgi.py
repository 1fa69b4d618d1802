"""``EnergyMiddleware``: pure ASGI, one window per HTTP request.

A request's window opens when the request arrives and closes at the final
response body chunk (streaming and SSE included), on an exception, or on a
client disconnect - in one place, :func:`_Window.close`, whichever way the
request ends. All per-request state lives in that small window object; the
middleware object only holds configuration.
"""

from __future__ import annotations

import itertools
import os
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import TYPE_CHECKING, Any

from .logs import get_logger
from .meter.context import _current
from .records import Cardinality, RequestLabels, model_label, tenant_label

if TYPE_CHECKING:
    from .meter.core import Meter

__all__ = ["EnergyMiddleware"]

log = get_logger(__name__)

#: the status of a response that started and never ended (the client hung up): nginx's "client closed request"
CLIENT_CLOSED = 499
_METHODS = frozenset(("GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH", "QUERY"))
_monotonic_ns = time.monotonic_ns
# Request ids: a random per-process prefix and a counter (unique, and cheaper than
# a random draw per request); the prefix is renewed in a forked child.
_ids = itertools.count(1)
_prefix = os.urandom(4).hex()
# f"{_prefix}{n:08x}" without formatting an int per request: the id's last three hex
# digits come from a table, the rest (prefix and n >> 12) is formatted once per 4096 ids.
_LOW = tuple(f"{i:03x}" for i in range(4096))
_head = (0, f"{_prefix}00000")  # (n >> 12, its formatted head), read and replaced as one tuple


def _next_id() -> str:
    global _head
    n = next(_ids)
    key, head = _head
    if key != n >> 12:
        key = n >> 12
        head = f"{_prefix}{key:05x}"
        _head = (key, head)
    return head + _LOW[n & 0xFFF]


def _renew_prefix() -> None:
    global _prefix, _ids, _head
    _prefix, _ids = os.urandom(4).hex(), itertools.count(1)
    _head = (0, f"{_prefix}00000")


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_renew_prefix)


def _span_ids() -> tuple[int, int, Any]:
    return 0, 0, None


try:  # OpenTelemetry is optional: with it, the record is tied to the request's server span.
    from opentelemetry import trace as _otel_trace

    _get_current_span = _otel_trace.get_current_span
    _NO_SPAN = _otel_trace.INVALID_SPAN

    try:  # the SDK's span classes (the tracer makes its private subclass _Span), matched exactly
        from opentelemetry.sdk import trace as _sdk_trace

        _SDK_SPANS = frozenset({_sdk_trace.Span, getattr(_sdk_trace, "_Span", _sdk_trace.Span)})
    except ImportError:  # pragma: no cover - the API without the SDK
        _SDK_SPANS = frozenset()
    # The current context's ContextVar, where the API keeps it by default (OTEL_PYTHON_CONTEXT
    # unset): read directly, it spares a request start four calls of get_current_span's.
    _context_var: Any = None
    try:
        from opentelemetry import context as _otel_context
        from opentelemetry.context.contextvars_context import ContextVarsRuntimeContext as _VarsContext
        from opentelemetry.trace.propagation import _SPAN_KEY

        if type(_otel_context._RUNTIME_CONTEXT) is _VarsContext:
            _context_var = _otel_context._RUNTIME_CONTEXT._current_context
    except (ImportError, AttributeError):  # pragma: no cover - the API is not what it was
        _context_var = None

    def _span_ids() -> tuple[int, int, Any]:  # noqa: F811
        if _context_var is not None:
            span = _context_var.get().get(_SPAN_KEY)
            if span is None:  # no tracing in this request (the common case without OpenTelemetry)
                return 0, 0, None
            if type(span) not in _SDK_SPANS:
                span = _get_current_span()  # the API's own checks for any other kind of span
        else:
            span = _get_current_span()
        if span is _NO_SPAN:
            return 0, 0, None
        if type(span) in _SDK_SPANS:
            # The SDK's span, read as its own methods do (is_recording: no end time yet;
            # get_span_context: its SpanContext, a tuple (trace_id, span_id, ..., is_valid)):
            # one request start pays no property calls for it.
            sdk_span: Any = span
            ctx = sdk_span._context
            if ctx[5] and sdk_span._end_time is None:
                return ctx[0], ctx[1], span
            return 0, 0, None
        ctx = span.get_span_context()
        if ctx.is_valid and span.is_recording():
            return ctx.trace_id, ctx.span_id, span
        return 0, 0, None

except ImportError:  # pragma: no cover - exercised without the otel extra
    pass


class EnergyMiddleware:
    """Meters each HTTP request's energy and CO2e.

    ``app.add_middleware(EnergyMiddleware)`` is enough: the process's default
    :class:`~wattspan.Meter` is created on first use (configured from
    ``WATTSPAN_*`` environment variables). Options, all keyword-only:

    * ``meter``: the :class:`~wattspan.Meter` to report to;
    * ``device``: the accelerator that serves this app (``"gpu0"``), the device
      group of a multi-GPU engine (``["gpu0", "gpu1"]`` or ``"gpu0,gpu1"``), or a
      callable ``scope -> str``;
    * ``model``: a header name (default ``x-model``) or a callable ``scope -> str``;
    * ``tenant``: a header name (default ``x-tenant-id``) or a callable; values
      are cut to ``[A-Za-z0-9_.:-]``, 64 characters, and at most
      ``max_tenants`` distinct values (then ``"other"``); the model likewise to
      printable ASCII, 128 characters and ``max_models`` distinct values, and
      an HTTP method outside the standard ones is ``"_OTHER"``;
    * ``request_id_header``: echo wattspan's request id in this response
      header (off by default);
    * ``exclude``: path prefixes not to meter (health checks: ``("/healthz",)``);
    * ``shutdown_timeout_s``: at the ASGI lifespan shutdown, wait up to this
      long for the last records to be final and written (default 10).

    Websocket scopes pass straight through. Lifespan scopes pass through too,
    but a bad ``WATTSPAN_*`` variable (or a meter that cannot be built) makes
    the startup fail with a message naming it, and the shutdown waits for the
    meter and the ledger to write every ended request's record.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        meter: Meter | None = None,
        device: str | list[str] | tuple[str, ...] | Callable[[dict[str, Any]], str] | None = None,
        model: str | Callable[[dict[str, Any]], str] = "x-model",
        tenant: str | Callable[[dict[str, Any]], str] = "x-tenant-id",
        max_tenants: int = 100,
        max_models: int = 100,
        request_id_header: str | None = None,
        exclude: tuple[str, ...] | list[str] = (),
        shutdown_timeout_s: float = 10.0,
    ) -> None:
        if max_tenants < 1 or max_models < 1:
            raise ValueError("max_tenants and max_models must be at least 1")
        from .settings import Settings, SettingsError, get_settings

        self.app = app
        self._meter = meter
        try:
            settings = get_settings()
            #: a bad WATTSPAN_* variable: the server refuses to start (lifespan), requests are served unmetered
            self.config_error: SettingsError | None = None
        except SettingsError as exc:
            settings, self.config_error = Settings(), exc
        if request_id_header is None:
            request_id_header = settings.request_id_header
        dev = device if device is not None else settings.device
        if isinstance(dev, (list, tuple)) or (isinstance(dev, str) and ("," in dev or "+" in dev)):
            # a device group, e.g. ["gpu0", "gpu1"] or "gpu0, gpu1" (see wattspan.attribution.groups)
            from .devices import group_key

            dev = group_key(dev)
        self.device: str | Callable[[Any], str] = dev
        self.model: bytes | Callable[[Any], str] = model.lower().encode("latin-1") if isinstance(model, str) else model
        self.tenant: bytes | Callable[[Any], str] = tenant.lower().encode("latin-1") if isinstance(tenant, str) else tenant
        self.tenants = Cardinality(max_tenants)
        self.models = Cardinality(max_models)
        self.request_id_header = request_id_header.lower().encode("latin-1") if request_id_header else None
        self.exclude = tuple(exclude)
        #: seconds the lifespan shutdown waits for the last records to be final and written
        self.shutdown_timeout_s = float(shutdown_timeout_s)
        self._header_names = frozenset(h for h in (self.model, self.tenant) if isinstance(h, bytes))
        #: model and tenant both come from headers (no callables): a request without those headers has no labels
        self._by_header = isinstance(self.model, bytes) and isinstance(self.tenant, bytes)
        self.errors = 0

    @property
    def meter(self) -> Meter:
        if self._meter is None:
            from .defaults import get_default_meter

            self._meter = get_default_meter()
        return self._meter

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "lifespan":
            await self._lifespan(scope, receive, send)
            return
        if kind != "http" or (self.exclude and scope.get("path", "").startswith(self.exclude)) or self.config_error is not None:
            if self.config_error is not None and scope["type"] == "http" and not self.errors:
                self.errors += 1
                log.error("wattspan: %s; serving unmetered", self.config_error)
            await self.app(scope, receive, send)
            return
        try:
            window = _Window(self, scope, send)
        except Exception:  # telemetry must never break a request
            self.errors += 1
            log.exception("could not open a metering window; serving unmetered")
            await self.app(scope, receive, send)
            return
        token = _current.set(window)
        try:
            await self.app(scope, receive, window.send)
        except BaseException as exc:
            window.close(error=True, raised=isinstance(exc, Exception))
            if (self.request_id_header is not None and not window.status and isinstance(exc, Exception)
                    and not _app_answers_errors(scope)):
                # The framework's error handler is outside this middleware: answer the 500
                # here, so it carries the request id too; the exception still propagates
                # (and is logged by the server as before). Not where the app has its own
                # answer (an exception handler for 500 or Exception, or debug tracebacks).
                await _send_500(send, self.request_id_header, window.id)
            raise
        finally:
            if not window.closed:  # (it closed at the last body chunk, as a rule): the response never ended
                window.close(incomplete=True)
            _current.reset(token)


    def _startup_error(self) -> BaseException | None:
        """Why the server must not start (a bad ``WATTSPAN_*`` variable, a meter that cannot be built), or None."""
        if self.config_error is not None:
            return self.config_error
        try:
            self.meter  # the default meter is built now, at startup, not on the first request
        except Exception as exc:
            return exc
        return None

    async def _drain(self) -> None:
        """At shutdown: every ended request's record final and written, bounded in time."""
        meter = self._meter
        if meter is None or not hasattr(meter, "drain"):
            return
        import asyncio

        try:
            await asyncio.get_running_loop().run_in_executor(None, meter.drain, self.shutdown_timeout_s)
        except Exception:
            log.exception("wattspan: flushing the meter at shutdown failed")

    async def _lifespan(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Pass the lifespan through, refusing to start on bad configuration and
        draining the meter before the server is told shutdown is complete (so a
        SIGTERM or SIGINT loses no record: uvicorn re-raises those signals after
        the lifespan shutdown, when ``atexit`` would never run)."""
        first = await receive()
        if first.get("type") == "lifespan.startup":
            err = self._startup_error()
            if err is not None:
                log.error("wattspan: refusing to start: %s", err)
                await send({"type": "lifespan.startup.failed", "message": f"wattspan: {err}"})
                return
        pending = [first]
        state = {"received": False, "drained": False, "answered": False, "shutdown": False}

        async def recv() -> Message:
            state["received"] = True
            m = pending.pop() if pending else await receive()
            if m.get("type") == "lifespan.shutdown":
                state["shutdown"] = True
            return m

        async def snd(message: Message) -> None:
            t = message.get("type", "")
            if t.startswith("lifespan.startup."):
                state["answered"] = True
            if t in ("lifespan.shutdown.complete", "lifespan.shutdown.failed") and not state["drained"]:
                state["drained"] = True
                await self._drain()
            await send(message)

        try:
            await self.app(scope, recv, snd)
            if state["drained"]:
                return
            # the app returned without seeing the lifespan through (``if scope["type"] != "http": return``):
            # the server would then stop without a shutdown anyone answers, and the meter would never drain
            if first.get("type") == "lifespan.startup" and not state["answered"]:
                await send({"type": "lifespan.startup.complete"})
            if not state["shutdown"]:
                while (await receive()).get("type") != "lifespan.shutdown":
                    pass
            state["drained"] = True
            await self._drain()
            await send({"type": "lifespan.shutdown.complete"})
        except Exception:
            if state["received"] or state["answered"]:
                if not state["drained"]:
                    state["drained"] = True
                    await self._drain()
                raise
            # the app does not speak the lifespan protocol: speak it for the meter's sake
            if first.get("type") != "lifespan.startup":
                raise
            await send({"type": "lifespan.startup.complete"})
            while (await receive()).get("type") != "lifespan.shutdown":
                pass
            await self._drain()
            await send({"type": "lifespan.shutdown.complete"})


def _app_answers_errors(scope: Scope) -> bool:
    """Whether the framework app (``scope["app"]``: Starlette's, FastAPI's) answers an unhandled error
    its own way: a handler for ``Exception`` or 500, or debug tracebacks. Its ServerErrorMiddleware sits
    outside every user middleware and keeps quiet once a response has started, so a 500 answered here
    would replace that answer (its status, body, headers)."""
    app = scope.get("app")
    try:
        handlers = getattr(app, "exception_handlers", None) or {}
        return bool(getattr(app, "debug", False)) or Exception in handlers or 500 in handlers
    except Exception:
        return False


class _Window:
    """One request's metering window: opened on arrival, closed exactly once."""

    __slots__ = ("mw", "meter", "scope", "id", "device", "status", "closed", "root", "trace_id", "span_id", "prompt_tokens",
                 "output_tokens", "model", "_send")

    def __init__(self, mw: EnergyMiddleware, scope: Scope, send: Send) -> None:
        self.mw = mw
        self.scope = scope
        self._send = send
        self.id = _next_id()
        device = mw.device
        self.device = device(scope) if callable(device) else device
        self.status = 0
        self.closed = False
        self.prompt_tokens = 0
        self.output_tokens = 0
        self.model = ""
        self.root = scope.get("root_path", "")
        self.trace_id, self.span_id, span = _span_ids()
        meter = self.meter = mw._meter or mw.meter
        if span is not None:
            meter.expect_span(self.span_id)  # nothing to do unless a sink holds spans
        meter.begin(self.id, self.device, _monotonic_ns())
        prov = meter.provisional  # wattspan.usage_energy() is in use: tally this request's steps
        if prov is not None:
            prov.open(self.id)

    def send(self, message: Message) -> Awaitable[None]:
        """The app's ``send``: notes the status, adds the request-id header if asked, closes at the last body chunk.

        A plain method returning the server's awaitable (no coroutine of its own per message),
        except for the last body chunk, whose window closes once the server has taken it."""
        t = message["type"]
        if t == "http.response.body" or t == "http.response.zerocopysend":
            if not message.get("more_body", False):
                return self._last(message)
        elif t == "http.response.pathsend":  # the server sends the whole file: the response's last message
            return self._last(message)
        elif t == "http.response.start":
            self.status = message["status"]
            rid_header = self.mw.request_id_header
            if rid_header is not None:
                message = dict(message)
                message["headers"] = [*message.get("headers", ()), (rid_header, self.id.encode())]
        return self._send(message)

    async def _last(self, message: Message) -> None:
        try:
            await self._send(message)
        finally:
            self.close()

    def close(self, error: bool = False, raised: bool = False, incomplete: bool = False) -> None:
        """The one place a request's window closes: last body chunk, exception or disconnect.
        ``error``: the app raised or was cancelled; ``raised``: an exception (not a cancellation), which
        makes the record's status 500 even after the response started (the client got a broken one).
        ``incomplete``: the app returned before its last body chunk (it saw the client hang up, as a
        rule). A response that started with a success status and never ended, cancelled or returned
        early, is recorded as 499 (the client closed the request, nginx's code): it was no 2xx or 3xx to
        the client. An error status the app set stays (a proxy's 502 when the upstream broke mid-body)."""
        if self.closed:
            return
        self.closed = True
        t = _monotonic_ns()
        meter = self.meter
        status = self.status
        if error and (raised or not status):
            status = 500
        elif (incomplete or error) and type(status) is int and 0 < status < 400:
            status = CLIENT_CLOSED
        elif incomplete and not status:  # returned before any answer: the client left first (a proxy that saw it go)
            status = CLIENT_CLOSED
        try:
            scope = self.scope
            model, tenant = self._labels()
            path = getattr(scope.get("route"), "path", None)  # the route template (/items/{id}), never the raw path
            if path is not None:
                path = (scope.get("root_path", "")[len(self.root):] + path)[:256]
            m = scope.get("method", "")
            # the labels as plain values, in the field order of records.RequestLabels (the meter checks it)
            route = "(unmatched)" if path is None else path
            method = m if m in _METHODS else "_OTHER"
            if type(status) is not int:
                status = int(status) if isinstance(status, (int, str)) and str(status).isdigit() else 0
        except Exception:  # the labels failed (a route object of the framework's without a str path): the request
            self.mw.errors += 1  # is still ended, or it would stay in flight, its energy never recorded
            log.exception("could not label a metering window; recording it unlabelled")
            model = tenant = ""
            route, method = "(unmatched)", "_OTHER"
            status = status if type(status) is int else 0
        try:
            end = getattr(meter, "end_fields", None)
            if end is not None:
                end(self.id, self.device, t, route, method, status, model, tenant, self.prompt_tokens, self.output_tokens,
                    self.trace_id, self.span_id)
            else:  # a meter-like object of the user's with only Meter.end
                meter.end(self.id, self.device, t, RequestLabels(route, method, status, model, tenant, self.prompt_tokens,
                                                                 self.output_tokens, self.trace_id, self.span_id))
            prov = meter.provisional
            if prov is not None:
                prov.forget(self.id)
        except Exception:
            self.mw.errors += 1
            log.exception("could not close a metering window")

    def _value(self, source: bytes | Callable[[Any], str], limit: int, headers: dict[bytes, str]) -> str:
        v: Any
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
        headers = None
        if wanted:
            for k, v in self.scope.get("headers", ()):
                if k in wanted:
                    if headers is None:
                        headers = {}
                    if k not in headers:  # the first of a repeated header, as the budget gate and the proxy read it
                        headers[k] = v.decode("latin-1")
        if headers is None and mw._by_header:  # no label header in this request: no tenant, no model header
            model = self.model
            if model:
                model = mw.models(model_label(model))
            return model, ""
        headers = headers or {}
        model = self.model or self._value(mw.model, 512, headers)
        if model:
            model = mw.models(model_label(model))
        tenant = self._value(mw.tenant, 256, headers)
        if tenant:
            tenant = mw.tenants(tenant_label(tenant))
        return model, tenant


async def _send_500(send: Send, header: bytes, request_id: str) -> None:
    body = b"Internal Server Error"
    headers = [(b"content-type", b"text/plain; charset=utf-8"), (b"content-length", str(len(body)).encode()), (header, request_id.encode())]
    try:
        await send({"type": "http.response.start", "status": 500, "headers": headers})
        await send({"type": "http.response.body", "body": body, "more_body": False})
    except Exception:  # the connection is gone: nothing to answer
        pass


# The ASGI interface (https://asgi.readthedocs.io), as wattspan's middleware and apps see it.
Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]
Headers = list[tuple[bytes, bytes]]
