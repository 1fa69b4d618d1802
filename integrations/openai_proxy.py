"""A metering proxy in front of any OpenAI-compatible server (``vllm serve``, SGLang, TGI, llama.cpp).

Put it between the clients and the model server; each ``/v1/*`` request gets a
:class:`~wattspan.RequestRecord` with its energy, CO2e, model and token counts::

    vllm serve Qwen/Qwen2.5-0.5B-Instruct --port 8000
    wattspan proxy --upstream http://127.0.0.1:8000 --port 8080
    curl http://127.0.0.1:8080/v1/chat/completions -H 'content-type: application/json' -d '{"model": ..., "messages": [...]}'

In Python: ``uvicorn.run(create_proxy("http://127.0.0.1:8000", meter=meter), port=8080)``.
Add ``--steps-listen 127.0.0.1:8791`` here and ``WATTSPAN_VLLM_STEPS=127.0.0.1:8791``
on ``vllm serve`` to have vLLM's batch steps split the energy by tokens
(see :mod:`wattspan.integrations.vllm`).

What it does with a request:

* forwards ``/v1/<anything>`` (chat/completions, completions, embeddings,
  models, ...) to ``upstream`` + the same path and query, over one shared
  ``httpx.AsyncClient`` (a connection pool); other paths answer 404, and
  ``GET /healthz`` answers 200 (neither is metered);
* forwards only the request headers in ``forward_headers`` (an allowlist;
  ``name*`` allows a prefix), never hop-by-hop ones, and adds
  ``X-Request-Id: <wattspan's request id>`` (replacing any the client sent) so
  the upstream names the request by it - vLLM builds its engine request ids
  from that header;
* reads the ``model`` from the JSON body and the token counts from the
  response's ``usage`` (``prompt_tokens``, ``completion_tokens``) and reports
  them with :func:`wattspan.set_tokens`;
* streams responses through as they arrive (SSE included), byte for byte.

Streaming usage, decided: when a client streams chat/completions or
completions without ``stream_options.include_usage: true``, the proxy adds it
(``include_usage=True``, the default), so the upstream ends the stream with a
usage chunk; the proxy reads that chunk and does not forward it, so the client
receives exactly the events it would have received without the option. (An
OpenAI-style server that rejects ``stream_options`` needs ``include_usage=False``;
then streamed requests carry no token counts unless the client asks for usage.)
A client that asks for usage gets the chunk, and the proxy reads it too.

Failure modes: a request body over ``max_body_bytes`` -> 413; the upstream
unreachable or failing before its response headers -> 502; no answer within
``timeout_s`` (for the connection, the headers, or between two body chunks)
-> 504; the connection pool exhausted for ``timeout_s`` -> 503. Errors are
JSON in OpenAI's shape ``{"error": {"message", "type", "code"}}``. If the
upstream fails in the middle of a body, the client's connection is closed
without completing the response. A client that disconnects closes the
upstream request (vLLM then aborts it).

Privacy: the proxy never logs or stores a request or response body: it keeps
only the model name, the token counts and the route template. A request
without a tenant header is labelled by a keyed pseudonym of its API key
(HMAC-SHA-256 under a secret: ``WATTSPAN_PSEUDONYM_KEY``, else a key file
beside the ledger, else one per process); neither the API key nor that
secret is logged, stored in a record or exported.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
import os
import re
import secrets
import threading
import asyncio
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from wattspan.logs import get_logger
from wattspan.meter.context import MAX_TOKENS, _current, current_request_id, set_tokens
from wattspan.records import tenant_label

if TYPE_CHECKING:
    import httpx

    from wattspan.export.ledger import Ledger
    from wattspan.meter.provisional import Provisional
    from wattspan.records import RequestRecord

__all__ = ["DEFAULT_FORWARD_HEADERS", "OpenAIProxy", "create_proxy", "run_proxy"]

log = get_logger(__name__)

DEFAULT_FORWARD_HEADERS: tuple[str, ...] = (
    "authorization",
    "api-key",  # Azure OpenAI's key header; the tenant pseudonym reads it too
    "x-api-key",
    "content-type",
    "accept",
    "user-agent",
    "openai-organization",
    "openai-project",
    "openai-beta",
    "x-stainless-*",
    "traceparent",
    "tracestate",
    "baggage",
)

# RFC 9110 7.6.1 hop-by-hop headers, plus ones a proxy must set itself
_HOP_BY_HOP = frozenset(
    {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "proxy-connection", "te", "trailer", "transfer-encoding", "upgrade"}
)
_NEVER_FORWARD = _HOP_BY_HOP | {"host", "content-length", "x-request-id", "accept-encoding", "expect"}
# uvicorn sets its own date and server; the request id header is the proxy's own
_RESPONSE_DROP = frozenset(n.encode() for n in _HOP_BY_HOP | {"date", "server", "x-wattspan-request-id"})
_KEY_HEADERS = (b"authorization", b"api-key", b"x-api-key")
#: headers that carry a credential: never a tenant label (the label is stored in the ledger and exported)
_CREDENTIAL_HEADERS = (*_KEY_HEADERS, b"proxy-authorization", b"cookie")
_USAGE_ROUTES = frozenset({"/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/responses"})
_RECORDS_PATH = "/wattspan/requests/"
_UNWIND_S = 3.0  # at shutdown, how long the cancelled requests may take to close their metering windows
_MAX_KEPT = 10_000  # final and provisional figures kept in memory for GET /wattspan/requests/{id}

_ROUTES = {
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/embeddings",
    "/v1/models",
    "/v1/responses",
    "/v1/audio/transcriptions",
    "/v1/audio/translations",
    "/v1/score",
    "/v1/rerank",
    "/v1/moderations",
    "/v1/images/generations",
}
_STREAM_USAGE_PATHS = ("/v1/chat/completions", "/v1/completions")
_MAX_JSON_USAGE = 256 << 10  # parse non-streamed responses up to this size; beyond (embeddings), scan the tail for usage
_TAIL = 64 << 10
_MAX_SSE_EVENT = 1 << 20
_TOKEN = re.compile(r"[A-Za-z0-9!#$%&'*+.^_`|~-]{1,64}")
_RID_OK = re.compile(r"[A-Za-z0-9_.:-]{1,128}")
_PUBLIC = ("energy_j", "co2e_g", "dynamic_j", "idle_j", "host_j", "embodied_g", "device_s", "method", "sensor", "coverage", "simulated", "device", "model", "route", "status_code", "prompt_tokens", "output_tokens",
           "energy_j_low", "energy_j_high", "co2e_g_low", "co2e_g_high", "quality", "intensity_g_per_kwh",
           "intensity_provider", "intensity_zone", "intensity_hour", "intensity_basis")
# at most 19 digits (int() of a 5000-digit run raises); set_tokens bounds the value itself
_PROMPT_RE = re.compile(rb'"prompt_tokens"\s*:\s*(\d{1,19})(?:\.0*)?(?![\d.eE])')
_COMPLETION_RE = re.compile(rb'"completion_tokens"\s*:\s*(\d{1,19})(?:\.0*)?(?![\d.eE])')


class _Route:
    """What EnergyMiddleware reads as the route template (``scope["route"].path``)."""

    __slots__ = ("path",)

    def __init__(self, path: str) -> None:
        self.path = path


_ROUTE_OBJS = {p: _Route(p) for p in _ROUTES}
_MODEL_ROUTE = _Route("/v1/models/{model}")
_OTHER_ROUTE = _Route("/v1/{path}")


def _route_for(path: str) -> _Route:
    r = _ROUTE_OBJS.get(path.rstrip("/") or path)
    if r is not None:
        return r
    if path.startswith("/v1/models/"):
        return _MODEL_ROUTE
    return _OTHER_ROUTE


class _TooLarge(Exception):
    pass


class _Disconnected(Exception):
    pass


def _error_body(status: int, message: str, kind: str) -> bytes:
    return json.dumps({"error": {"message": message, "type": kind, "param": None, "code": status}}).encode()


async def _send_error(send, status: int, message: str, kind: str) -> None:
    body = _error_body(status, message, kind)
    await send({"type": "http.response.start", "status": status, "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body, "more_body": False})


def _as_int(v) -> int | None:
    """A token count as the usage object gives it, or None: not a count, or more than any request holds
    (``MAX_TOKENS``: a figure priced from 1e12 tokens would be tonnes of CO2e for a 3 ms request)."""
    if type(v) is float and v.is_integer():  # 5.0: a server that counts in floats (a bool is no count)
        v = int(v)
    return v if type(v) is int and 0 <= v <= MAX_TOKENS else None


def _dumps_faithful(obj) -> bytes | None:
    """``obj`` as JSON the upstream reads as the client's body, or None where no text can say it: a
    number JSON cannot hold (``1e999`` parses as inf) is forwarded as the client wrote it, untouched."""
    try:
        return json.dumps(obj, ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode()
    except UnicodeEncodeError:  # a lone surrogate ("\ud800"): escaped, as the client's text had it
        pass
    except ValueError:
        return None
    try:
        return json.dumps(obj, allow_nan=False, separators=(",", ":")).encode()
    except ValueError:
        return None


def _dot_segment(path: str) -> bool:
    """Whether a (decoded) path holds a ``.`` or ``..`` segment."""
    return any(seg in (".", "..") for seg in path.split("/"))


#: a tenant label the ledger keeps lossily: the cardinality bound's and the cleaning's fallbacks
_LOSSY_TENANTS = ("other", "invalid")


class _Usage:
    """Token counts seen in a response."""

    __slots__ = ("prompt", "completion")

    def __init__(self) -> None:
        self.prompt: int | None = None
        self.completion: int | None = None

    def take(self, usage) -> bool:
        if not isinstance(usage, dict):
            return False
        p, c = _as_int(usage.get("prompt_tokens")), _as_int(usage.get("completion_tokens"))
        if p is None and c is None:
            return False
        if p is not None:
            self.prompt = p
        if c is not None:
            self.completion = c
        return True


class _SSEScanner:
    """Finds the usage in a server-sent-event stream; with ``strip``, drops the usage-only event.

    Without ``strip`` or ``annotate`` the bytes are forwarded as they come and the
    scanner only looks; with either, only complete events are forwarded (an
    event is of no use to the client before its blank line anyway), so one can be
    left out (``strip``) or rewritten: ``annotate(usage) -> dict`` gives fields to
    add to the usage-only event's ``usage`` (the provisional energy).
    """

    __slots__ = ("strip", "usage", "buf", "skipping", "skip_tail", "annotate", "buffered", "cr_tail", "content_events")

    def __init__(self, strip: bool, usage: _Usage, annotate=None) -> None:
        self.strip = strip
        self.usage = usage
        self.annotate = annotate
        self.buffered = bool(strip or annotate is not None)
        self.buf = b""
        #: inside an event longer than _MAX_SSE_EVENT: its bytes are forwarded as they come, and
        #: scanning resumes after its blank line (the last bytes seen, for a line end cut in two)
        self.skipping = False
        self.skip_tail = b""
        #: the last event ended at a CR that ended its chunk: None, else whether it was forwarded (an LF that
        #: opens the next chunk completes that CRLF, and goes, or not, with it)
        self.cr_tail: bool | None = None
        #: events that carried generated text (a non-empty ``content`` or ``text``): about one token each on
        #: vLLM and OpenAI, the output count of a stream that ends before its usage (the client left)
        self.content_events = 0

    def feed(self, chunk: bytes) -> bytes:
        if not chunk:  # nothing to forward, and a CR left at the last chunk's end still waits for its LF
            return chunk
        if self.skipping:
            look = self.skip_tail + chunk
            end = _event_end(look, 0)
            if end < 0:
                self.skip_tail = look[-3:]
                return chunk
            cut = end - len(self.skip_tail)
            self.skipping, self.skip_tail = False, b""
            if cut >= len(chunk) and chunk.endswith(b"\r"):
                self.cr_tail = True  # an LF that opens the next chunk ends this CR's CRLF, and goes with it
            rest = self.feed(chunk[cut:]) if cut < len(chunk) else b""
            return chunk[:cut] + rest if self.buffered else chunk
        out: list[bytes] = []
        raw = chunk
        if self.cr_tail is not None:
            if chunk[:1] == b"\n":
                if self.cr_tail:
                    out.append(b"\n")
                chunk = chunk[1:]
            self.cr_tail = None
        start = max(0, len(self.buf) - 3)
        buf = self.buf + chunk
        pos = 0
        while True:
            end = _event_end(buf, max(pos, start))
            if end < 0:
                break
            ev = self._event(buf[pos:end])
            if ev:
                out.append(ev)
            pos = end
            start = end
            if end == len(buf) and buf.endswith(b"\r"):
                self.cr_tail = bool(ev)
        self.buf = buf[pos:]
        if len(self.buf) > _MAX_SSE_EVENT:
            # one event past the bound (a huge content delta): no usage-only event is that long, so
            # it goes on unread as it comes, and the events after it are scanned again (the usage
            # chunk that ends the stream among them: read, and left out where the proxy asked for it)
            self.skipping, self.skip_tail = True, self.buf[-3:]
            self.content_events += 1  # no usage-only event is that long: a content delta
            if self.buffered:
                out.append(self.buf)
            self.buf = b""
        return b"".join(out) if self.buffered else raw

    def finish(self) -> bytes:
        rest, self.buf = self.buf, b""
        if rest and not self.skipping:
            ev = self._event(rest)
            return ev if self.buffered else b""
        return b""

    def _event(self, ev: bytes) -> bytes:
        """The event to forward: ``ev``, rewritten, or ``b""`` (dropped)."""
        if _CONTENT.search(ev):
            self.content_events += 1
        if b'"usage"' not in ev:
            return ev
        sep = b"\r" if b"\n" not in ev else b"\n"  # lines ended by a lone CR, or by LF (CRLF: the CR stays on the line)
        lines = ev.split(sep)
        data_at = [i for i, line in enumerate(lines) if line.startswith(b"data:")]
        data = b"\n".join(lines[i][5:].strip() for i in data_at)
        try:
            obj = json.loads(data)
        except ValueError:
            return ev
        if not isinstance(obj, dict):
            return ev
        found = self.usage.take(obj.get("usage"))
        if not (found and obj.get("choices") == []):
            if self.strip and len(data_at) == 1 and "usage" in obj and obj["usage"] is None:
                # the null usage OpenAI puts on every other chunk once usage is asked for: this client did not ask
                return _drop_null_usage(ev)
            return ev
        if self.strip:
            return b""
        if self.annotate is not None and len(data_at) == 1:
            i = data_at[0]
            line = lines[i]
            cr = line.endswith(b"\r")
            payload = line[5:].strip()
            spliced = _splice_usage(payload, self.annotate(obj["usage"]), obj["usage"])
            if spliced is not None:
                lines[i] = b"data: " + spliced + (b"\r" if cr and sep == b"\n" else b"")
                return sep.join(lines)
        return ev


#: generated text in a chat or completions chunk: ``"content": "x..."`` or ``"text": "x..."`` (not empty)
_CONTENT = re.compile(rb'"(?:content|text)"[ \t]*:[ \t]*"(?!")')

#: a ``"usage": null`` member, with the comma that joins it to its neighbour
#: (spaces and tabs only: a line end would join the event's lines; events of one ``data:`` line only)
_NULL_USAGE = re.compile(rb'[ \t]*,[ \t]*"usage"[ \t]*:[ \t]*null(?=[ \t]*[,}])|"usage"[ \t]*:[ \t]*null[ \t]*,[ \t]*')
_ANY_NULL_USAGE = re.compile(rb'"usage"\s*:\s*null')


def _drop_null_usage(ev: bytes) -> bytes:
    """``ev`` without its one ``"usage": null`` member (unchanged if it has none, or more than one)."""
    if len(_ANY_NULL_USAGE.findall(ev)) != 1:
        return ev
    return _NULL_USAGE.sub(b"", ev, count=1)


#: a blank line: two line ends in a row, each CRLF, LF or a lone CR (SSE allows all three); a CR at the
#: buffer's end counts as a lone one (the scanner passes an LF that follows it in the next chunk straight on)
_BLANK_LINE = re.compile(rb"(?:\r\n|\r(?!\n)|\n)(?:\r\n|\r(?!\n)|\n)")


def _event_end(buf: bytes, start: int) -> int:
    """Index just past the first event terminator (blank line) at or after ``start``, or -1."""
    m = _BLANK_LINE.search(buf, start)
    return m.end() if m else -1


def _allow(names: Iterable[str]) -> tuple[frozenset[str], tuple[str, ...]]:
    exact, prefixes = set(), []
    for n in names:
        if not isinstance(n, str) or not n.strip():
            raise ValueError(f"forward_headers entries must be header names, got {n!r}")
        n = n.strip().lower()
        base = n[:-1] if n.endswith("*") else n
        if base in _HOP_BY_HOP or base == "host":
            raise ValueError(f"forward_headers: {n!r} is a hop-by-hop header; a proxy never forwards it")
        if n.endswith("*"):
            prefixes.append(base)
        else:
            exact.add(n)
    return frozenset(exact), tuple(prefixes)


def _owner_digest(label: str) -> bytes:
    """What the records endpoint keeps of a caller's tenant label: 16 bytes of its BLAKE2b digest."""
    return hashlib.blake2b(label.encode("utf-8", "backslashreplace"), digest_size=16).digest()


class OpenAIProxy:
    """The proxy's ASGI app; :func:`create_proxy` builds it. ``stats`` counts outcomes."""

    def __init__(
        self,
        upstream: str | None = None,
        *,
        routes: Mapping[str, Any] | None = None,
        meter=None,
        device="gpu0",
        timeout_s: float = 600.0,
        connect_timeout_s: float = 10.0,
        max_body_bytes: int = 8 << 20,
        forward_headers: Iterable[str] = DEFAULT_FORWARD_HEADERS,
        include_usage: bool = True,
        max_connections: int = 512,
        request_id_header: str | None = "x-wattspan-request-id",
        tenant: str = "x-tenant-id",
        tenant_from_key: bool = True,
        pseudonym_key: bytes | str | None = None,
        model_header: str = "x-model",
        steps_listen: str | None = None,
        ledger=None,
        usage_energy: bool = True,
        records_endpoint: bool = True,
    ) -> None:
        from wattspan import EnergyMiddleware

        self.upstream = _check_upstream(upstream) if upstream is not None else None
        self.routes = _check_routes(routes)
        if self.upstream is None and not self.routes:
            raise ValueError("give the upstream server's URL, or routes: model name -> URL (or (URL, device))")
        if meter is None:  # the process's meter: where no GPU answers, its simulated source meters these devices too
            from wattspan.meter.discovery import simulate_devices

            simulate_devices([d for d in [*(r.device for r in self.routes.values()), device] if isinstance(d, str) and d])
        if self.routes:
            # one upstream per model: the request's device is its upstream's GPUs
            dflt = device
            self._default_route = _Upstream(self.upstream, None) if self.upstream is not None else None
            if callable(dflt):
                device = lambda scope: (scope.get(_ROUTE_KEY) or _NO_ROUTE).device or dflt(scope)  # noqa: E731
            else:
                dkey = _group_key(dflt) if dflt is not None else None
                device = lambda scope: (scope.get(_ROUTE_KEY) or _NO_ROUTE).device or dkey  # noqa: E731
        if not (0.001 <= timeout_s <= 86400 and 0.001 <= connect_timeout_s <= 86400):  # NaN fails too
            raise ValueError(f"timeout_s and connect_timeout_s must be 0.001..86400 seconds (no answer comes in less than "
                             f"a millisecond), got {timeout_s!r} and {connect_timeout_s!r}")
        if not (isinstance(max_body_bytes, int) and max_body_bytes > 0):
            raise ValueError(f"max_body_bytes must be a positive number of bytes, got {max_body_bytes!r}")
        if not (isinstance(max_connections, int) and max_connections > 0):
            raise ValueError(f"max_connections must be a positive integer, got {max_connections!r}")
        for what, name in (("request_id_header", request_id_header), ("tenant", tenant), ("model_header", model_header)):
            if name is not None and not (isinstance(name, str) and _TOKEN.fullmatch(name)):
                raise ValueError(f"{what} must be an HTTP header name (letters, digits, '-'), got {name!r}")
        if pseudonym_key is not None and len(pseudonym_key.encode("utf-8") if isinstance(pseudonym_key, str) else pseudonym_key) < 32:
            raise ValueError("pseudonym_key must be a secret of at least 32 bytes")
        self.timeout_s = float(timeout_s)
        self.connect_timeout_s = float(min(connect_timeout_s, timeout_s))
        self.max_body_bytes = max_body_bytes
        self.include_usage = bool(include_usage)
        self.usage_energy = bool(usage_energy)
        self.records_endpoint = bool(records_endpoint)
        self._active = 0  # /v1 requests being served (the shutdown waits for the cancelled ones to unwind)
        self.max_connections = max_connections
        self.request_id_header = request_id_header.lower() if request_id_header else None
        self._allow_exact, self._allow_prefix = _allow(forward_headers)
        self.stats = {"requests": 0, "unrouted": 0, "upstream_errors": 0, "timeouts": 0, "too_large": 0, "disconnects": 0, "usage_injected": 0, "usage_missing": 0, "energy_annotated": 0, "tenant_renamed": 0, "tenant_digested": 0, "tokens_from_events": 0}
        self._client: httpx.AsyncClient | None = None
        self._ledger_arg = ledger
        self.ledger: Ledger | None = None
        self.ledger_path: Path | None = None
        if ledger is not None:
            self._open_ledger()  # first: a foreign file is refused before a key file is made beside it
        self.pseudonym_source = "off"  # where the API-key pseudonyms' key came from (never the key itself)
        pkey = None
        if tenant_from_key:
            pkey, self.pseudonym_source = _pseudonym_key(pseudonym_key, self.ledger_path)
        if tenant and tenant.strip().lower().encode("latin-1", "replace") in _CREDENTIAL_HEADERS:
            raise ValueError(f"tenant header {tenant!r} carries a credential, which would be stored as the tenant: name a "
                             "tenant header (x-tenant-id), or label by API key with tenant_from_key (a keyed pseudonym)")
        tenant_of = _tenant_label(tenant.lower().encode("latin-1") if tenant else None, bool(tenant_from_key), pkey, self.stats)
        #: ``tenant_of(scope) -> str``: a request's tenant as sent (its header's value, else its API key's pseudonym);
        #: who may read a request's figures back (its own tenant only), and what a budget gate in front matches
        self.tenant_of = tenant_of
        def tenants_of(scope) -> tuple[str, ...]:
            """Every tenant a request answers for: the one it is billed as (``tenant_of``), and the
            pseudonym of every API key it carries, so a budget on a key holds however the request
            labels itself (another tenant header, another key header beside it)."""
            t = tenant_of(scope)
            if not pkey:
                return (t,)
            out = [t]
            for k, v in scope.get("headers", ()):
                if k in _KEY_HEADERS:
                    p = _pseudonym(pkey, v)
                    if p and p not in out:
                        out.append(p)
            return tuple(out)

        #: what a budget gate in front matches (see :class:`wattspan.budgets.BudgetMiddleware`'s ``tenant``)
        self.tenants_of = tenants_of
        self._model_header = model_header.lower().encode("latin-1") if model_header else None
        self.metered = EnergyMiddleware(self._proxy, meter=meter, device=device, tenant=tenant_of, model=model_header or "x-model", request_id_header=self.request_id_header)
        self.steps = None
        if steps_listen:
            from ._relay import StepReceiver

            self.steps = StepReceiver(lambda: self.metered.meter, steps_listen)
        self._wired = False
        self._wire_lock = threading.Lock()
        self.provisional: Provisional | None = None
        self._final: OrderedDict[str, RequestRecord] = OrderedDict()  # request id -> its final record
        self._prov: OrderedDict[str, dict] = OrderedDict()  # request id -> provisional figure
        self._owners: OrderedDict[str, bytes] = OrderedDict()  # request id -> a digest of its caller's tenant, as sent

    def _open_ledger(self) -> None:
        from wattspan.export.ledger import Ledger

        led = self._ledger_arg
        if isinstance(led, Ledger):
            self.ledger = led
        else:
            self.ledger = Ledger(led)  # raises InputError for a foreign or newer file
        self.ledger_path = Path(self.ledger.path)

    def _wire(self):
        """Connect to the meter once, on first use: the ledger, the final-record cache, the provisional estimate."""
        meter = self.metered.meter
        if self._wired:
            return meter
        with self._wire_lock:
            if not self._wired:
                from wattspan.meter import BatchCallback

                if self.ledger is not None:
                    meter.add_sink(self.ledger)
                meter.add_sink(BatchCallback(self._keep_final))
                if self.usage_energy:
                    from wattspan.meter.provisional import attach

                    self.provisional = attach(meter)
                self._wired = True
        return meter

    def _keep_final(self, records) -> None:
        final = self._final
        for r in records:
            final[r.id] = r
        while len(final) > _MAX_KEPT:
            final.popitem(last=False)

    @property
    def meter(self):
        return self.metered.meter

    # ------------------------------------------------------------------ ASGI

    async def __call__(self, scope, receive, send) -> None:
        t = scope["type"]
        if t == "lifespan":
            await self._lifespan(receive, send)
            return
        if t != "http":
            if t == "websocket":
                await send({"type": "websocket.close", "code": 1008})
            return
        path = scope.get("path", "")
        if path.startswith("/v1/") and _dot_segment(path):
            # the upstream's client resolves "..": /v1/../metrics would reach what this proxy does not serve
            await _send_error(send, 404, "not found: this proxy serves /v1/* (paths with . or .. segments are refused)", "not_found_error")
        elif path.startswith("/v1/"):
            if not self._wired:
                self._wire()
            self._active += 1  # (a count, no request's state: the shutdown waits for it)
            try:
                if self.routes:
                    await self._routed(scope, receive, send)
                else:
                    await self.metered(scope, receive, send)
            finally:
                self._active -= 1
        elif path.startswith(_RECORDS_PATH) and self.records_endpoint and scope.get("method") in ("GET", "HEAD"):
            await self._record_by_id(scope, send, path[len(_RECORDS_PATH) :])
        elif path == "/healthz" and scope.get("method") in ("GET", "HEAD"):
            body = b'{"status":"ok"}'
            await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
            await send({"type": "http.response.body", "body": body if scope.get("method") == "GET" else b""})
        else:
            await _send_error(send, 404, "not found: this proxy serves /v1/*", "not_found_error")

    async def _lifespan(self, receive, send) -> None:
        while True:
            msg = await receive()
            if msg["type"] == "lifespan.startup":
                try:
                    self._http()
                    self._wire()
                except Exception as exc:  # pragma: no cover - httpx missing
                    await send({"type": "lifespan.startup.failed", "message": str(exc)})
                    return
                await send({"type": "lifespan.startup.complete"})
            elif msg["type"] == "lifespan.shutdown":
                # a stream cut at the end of the grace (uvicorn cancels it, then sends this at once) closes its
                # metering window as its task unwinds: wait for those, briefly, so the drain finds their records
                # (under load the drain could start first and the cut stream's 499 record was lost)
                end = time.monotonic() + _UNWIND_S
                while self._active and time.monotonic() < end:
                    await asyncio.sleep(0.01)
                await self.aclose()
                await send({"type": "lifespan.shutdown.complete"})
                return

    def _http(self):
        if self._client is None:
            try:
                import httpx
            except ImportError:  # pragma: no cover
                raise RuntimeError("the metering proxy needs httpx: pip install 'wattspan[demo]' or pip install httpx") from None
            self._client = httpx.AsyncClient(
                # one client serves every caller: it must never keep an upstream's Set-Cookie and send it
                # on another caller's request (the response's Set-Cookie still reaches its own caller)
                cookies=_no_cookies(),
                timeout=httpx.Timeout(self.timeout_s, connect=self.connect_timeout_s),
                limits=httpx.Limits(max_connections=self.max_connections, max_keepalive_connections=min(self.max_connections, 128)),
                follow_redirects=False,
                trust_env=False,
            )
        return self._client

    async def aclose(self) -> None:
        """Close the connection pool and the step receiver; commit the ledger."""
        client, self._client = self._client, None
        if client is not None:
            await client.aclose()
        if self.steps is not None:
            self.steps.close()
        if self.ledger is not None or self._wired:
            import anyio

            await anyio.to_thread.run_sync(self._flush_ledger)

    def _flush_ledger(self) -> None:
        if self._wired:
            # every ended request's record final, and the sinks that buffer flushed: the ledger's queue, held
            # spans, the OTel metrics a push reader holds (a SIGTERM skips the SDK's own atexit flush)
            self.metered.meter.drain(10.0)
        led = self.ledger
        if led is None:
            return
        if led is not self._ledger_arg:  # the proxy opened it: close it
            led.close()
        else:
            led.flush()

    # ------------------------------------------------------------------ GET /wattspan/requests/{id}

    async def _record_by_id(self, scope, send, rid: str) -> None:
        """A request's figures by id: final (200), only provisional (202), or unknown (404). Read-only."""
        import anyio

        rid = rid.strip("/")
        if not _RID_OK.fullmatch(rid):
            await _send_error(send, 404, "no such request id", "not_found_error")
            return
        rec = self._final.get(rid)
        d = None
        if rec is not None:
            d = rec.to_dict()
        elif self.ledger_path is not None:
            from wattspan.export.ledger import find

            try:
                d = await anyio.to_thread.run_sync(find, self.ledger_path, rid)
            except Exception as exc:  # a missing or unreadable file: say so, do not crash
                log.warning("wattspan proxy: cannot read the ledger %s for %s (%s)", self.ledger_path, rid, exc)
                d = None
        prov = self._prov.get(rid)
        owner = self._owners.get(rid)  # every request of the last _MAX_KEPT, as its caller sent the label
        if owner is None and d is not None:
            # only in the ledger (a restart, or older than the last requests): its tenant as recorded, where that
            # is the caller's label itself, not a fallback or a cut (64 characters) many tenants may share
            t = d.get("tenant", "")
            owner = _owner_digest(t) if isinstance(t, str) and t not in _LOSSY_TENANTS and len(t) < 64 else None
        caller = _owner_digest(self.tenant_of(scope))
        if owner is None or not hmac.compare_digest(owner, caller):
            d = prov = None  # another tenant's request (or one whose owner is unknown): as unknown as one that never was
        if d is not None:
            out = {"id": rid, "status": "final", **_public(d)}
            if prov is not None:
                out["provisional"] = prov
            status = 200
        elif prov is not None:
            out, status = {"id": rid, "status": "pending", "provisional": prov}, 202
        else:
            await _send_error(send, 404, "no such request id (unknown, or older than this proxy remembers: see `wattspan report --id`)", "not_found_error")
            return
        body = json.dumps(out, separators=(",", ":")).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), (b"cache-control", b"no-store")]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body if scope.get("method") == "GET" else b""})

    # ------------------------------------------------------------------ one request

    async def _body_or_answer(self, scope, receive, send) -> bytes | None:
        """The request body, or None once a too-large body has been answered 413 (counted) or
        the client has gone (counted)."""
        try:
            return await self._read_body(scope, receive)
        except _TooLarge:
            self.stats["too_large"] += 1
            await _send_error(send, 413, f"request body larger than {self.max_body_bytes} bytes", "invalid_request_error")
        except _Disconnected:
            self.stats["disconnects"] += 1
        return None

    async def _routed(self, scope, receive, send) -> None:
        """Several upstreams: read the body, pick the upstream by the model it names (or the
        model header), then meter the request on that upstream's devices."""
        body = await self._body_or_answer(scope, receive, send)
        if body is None:
            return
        model = await self._model_of(scope, body)
        route = self.routes.get(model) if model is not None else None
        if route is None:
            route = self._default_route
        if route is None:
            if model is None and scope.get("method") == "GET":
                route = next(iter(self.routes.values()))  # GET /v1/models and the like: the first upstream
            else:
                self.stats["unrouted"] += 1
                what = f"model {model!r}" if model is not None else "a request that names no model"
                await _send_error(send, 404, f"no upstream serves {what}; this proxy routes: {', '.join(sorted(self.routes))}", "model_not_found")
                return
        sent = False

        async def replay():
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.metered({**scope, _ROUTE_KEY: route}, replay, send)

    async def _model_of(self, scope, body: bytes) -> str | None:
        if body.lstrip()[:1] == b"{":
            try:
                if len(body) > (1 << 20):
                    import anyio

                    obj = await anyio.to_thread.run_sync(json.loads, body)
                else:
                    obj = json.loads(body)
            except (ValueError, RecursionError):
                obj = None
            if isinstance(obj, dict) and isinstance(obj.get("model"), str):
                return obj["model"][:128]
        if self._model_header:
            for k, v in scope.get("headers", ()):
                if k == self._model_header:
                    return v.decode("latin-1")[:128]
        return None

    async def _read_body(self, scope, receive) -> bytes:
        limit = self.max_body_bytes
        for k, v in scope.get("headers", ()):
            if k == b"content-length":
                try:
                    if int(v) > limit:
                        raise _TooLarge
                except ValueError:
                    pass
        parts, size = [], 0
        while True:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                raise _Disconnected
            chunk = msg.get("body", b"")
            if chunk:
                size += len(chunk)
                if size > limit:
                    raise _TooLarge
                parts.append(chunk)
            if not msg.get("more_body", False):
                return b"".join(parts)

    def _headers(self, scope) -> list[tuple[bytes, bytes]]:
        exact, prefixes = self._allow_exact, self._allow_prefix
        connection_named: set[str] = set()
        for k, v in scope.get("headers", ()):
            if k == b"connection":
                connection_named.update(x.strip().lower() for x in v.decode("latin-1").split(","))
        out = []
        for k, v in scope.get("headers", ()):
            name = k.decode("latin-1").lower()
            if name in _NEVER_FORWARD or name in connection_named:
                continue
            if name in exact or (prefixes and name.startswith(prefixes)):
                out.append((k, v))
        rid = current_request_id()
        if rid:
            out.append((b"x-request-id", rid.encode()))
        out.append((b"accept-encoding", b"identity"))  # pass bodies through as the upstream sends them
        return out

    async def _inspect(self, scope, body: bytes) -> tuple[bytes, str | None, bool]:
        """The body to send, the model it names, and whether usage was injected into a stream request."""
        if scope.get("method") != "POST" or body.lstrip()[:1] != b"{":
            return body, None, False  # not a JSON object (multipart audio, say): forwarded untouched
        try:
            if len(body) > (1 << 20):
                import anyio

                obj = await anyio.to_thread.run_sync(json.loads, body)
            else:
                obj = json.loads(body)
        except (ValueError, RecursionError):
            return body, None, False  # the upstream will say what is wrong with it
        if not isinstance(obj, dict):
            return body, None, False
        model = obj.get("model")
        model = model[:128] if isinstance(model, str) else None
        path = scope.get("path", "").rstrip("/")
        if self.include_usage and obj.get("stream") is True and path in _STREAM_USAGE_PATHS:
            so = obj.get("stream_options")
            if so is None or (isinstance(so, dict) and so.get("include_usage") is not True and "continuous_usage_stats" not in so):
                obj["stream_options"] = {**(so or {}), "include_usage": True}
                out = _dumps_faithful(obj)
                if out is not None:
                    self.stats["usage_injected"] += 1
                    return out, model, True
        return body, model, False

    async def _proxy(self, scope, receive, send) -> None:
        self.stats["requests"] += 1
        scope["route"] = _route_for(scope.get("path", ""))
        rid = current_request_id()
        if rid and self.records_endpoint:  # who may read its figures back: the label before any cleaning or bound
            owners = self._owners
            owners[rid] = _owner_digest(self.tenant_of(scope))  # a digest: a 1 MiB header keeps 16 bytes, not itself
            while len(owners) > _MAX_KEPT:
                owners.popitem(last=False)
        if self.provisional is not None:
            rid = current_request_id()
            if rid:
                self.provisional.open(rid)
        try:
            await self._proxy_request(scope, receive, send)
        finally:
            if self.provisional is not None:
                rid = current_request_id()
                if rid:
                    self.provisional.forget(rid)

    async def _proxy_request(self, scope, receive, send) -> None:
        import anyio
        import httpx

        body = await self._body_or_answer(scope, receive, send)
        if body is None:
            return
        body, model, injected = await self._inspect(scope, body)
        if model:
            set_tokens(model=model)

        raw_path = scope.get("raw_path")  # still percent-encoded: /v1/models/org%2Fname stays one segment
        route = scope.get(_ROUTE_KEY)
        base = route.url if route is not None else self.upstream
        url = base + (raw_path.decode("latin-1") if raw_path else scope.get("path", ""))
        if scope.get("query_string"):
            url += "?" + scope["query_string"].decode("latin-1")
        client = self._http()
        request = client.build_request(scope.get("method", "GET"), url, headers=self._headers(scope), content=body)
        state = {"started": False, "done": False}

        async with anyio.create_task_group() as tg:

            async def watch_disconnect() -> None:
                while True:
                    msg = await receive()
                    if msg["type"] == "http.disconnect":
                        if not state["done"]:  # uvicorn also says so once the response is complete
                            self.stats["disconnects"] += 1
                            tg.cancel_scope.cancel()
                        return

            tg.start_soon(watch_disconnect)
            try:
                await self._exchange(client, request, send, injected, state)
            except httpx.PoolTimeout:
                await self._fail(send, state, 503, "no upstream connection free within the timeout", "upstream_busy")
            except httpx.TimeoutException:
                self.stats["timeouts"] += 1
                await self._fail(send, state, 504, f"upstream did not answer within {self.timeout_s:g} s", "upstream_timeout")
            except httpx.ConnectError as exc:
                self.stats["upstream_errors"] += 1
                await self._fail(send, state, 502, f"upstream unavailable ({type(exc).__name__})", "upstream_unavailable")
            except httpx.HTTPError as exc:
                self.stats["upstream_errors"] += 1
                await self._fail(send, state, 502, f"upstream failed ({type(exc).__name__})", "upstream_error")
            tg.cancel_scope.cancel()

    async def _fail(self, send, state: dict, status: int, message: str, kind: str) -> None:
        if state["started"]:
            # mid-body: return without completing the response, so the client sees a broken one; its record
            # says the upstream failed (the status the client saw was the upstream's first word, not its last)
            log.warning("wattspan proxy: %s after the response started; closing the client's connection", message)
            window = _current.get()
            if window is not None:
                window.status = status
            return
        log.warning("wattspan proxy: %s -> %d", message, status)
        await _send_error(send, status, message, kind)

    async def _exchange(self, client, request, send, injected: bool, state: dict) -> None:
        import anyio

        response = await client.send(request, stream=True)
        usage = _Usage()
        scanner: _SSEScanner | None = None
        try:
            if not 100 <= response.status_code <= 599:  # no HTTP status: the server could not even send its line
                self.stats["upstream_errors"] += 1
                await self._fail(send, state, 502, f"upstream answered with status {response.status_code}, not an HTTP status (100-599)", "upstream_error")
                return
            ctype = response.headers.get("content-type", "").lower()
            is_sse = ctype.startswith("text/event-stream")
            ok = 200 <= response.status_code < 300
            annotate = self._annotator(usage) if (self.usage_energy and ok and request.url.path.rstrip("/") in _USAGE_ROUTES) else None
            scanner = _SSEScanner(strip=injected, usage=usage, annotate=annotate) if is_sse else None
            headers = _response_headers(response.headers.raw, drop_length=is_sse)
            ok_json = (not is_sse) and ok and "json" in ctype
            chunks = response.aiter_raw().__aiter__()
            held: list[bytes] = []
            held_n = 0
            if ok_json and annotate is not None:
                # the usage is rewritten, so the body's length changes: hold it (up to a bound) before the headers
                async for chunk in chunks:
                    held.append(chunk)
                    held_n += len(chunk)
                    if held_n > _MAX_JSON_USAGE:
                        break
                else:
                    body = b"".join(held)
                    top = _json_usage(held, held_n, b"", usage)
                    if usage.prompt is not None or usage.completion is not None:
                        new = _splice_usage(body, annotate(None), top)
                        if new is not None:
                            body = new
                    headers = [h for h in headers if h[0].lower() != b"content-length"]
                    headers.append((b"content-length", str(len(body)).encode()))
                    await send({"type": "http.response.start", "status": response.status_code, "headers": headers})
                    state["started"] = True
                    self._report(usage, expected=True)
                    state["done"] = True
                    await send({"type": "http.response.body", "body": body, "more_body": False})
                    return
            await send({"type": "http.response.start", "status": response.status_code, "headers": headers})
            state["started"] = True
            tail = b""
            if held:  # over the bound: forward what was held, then stream the rest as it comes
                await send({"type": "http.response.body", "body": b"".join(held), "more_body": True})
                tail = b"".join(held)[-_TAIL:]
            async for chunk in chunks:
                if scanner is not None:
                    out = scanner.feed(chunk)
                else:
                    out = chunk
                    if ok_json:
                        if held_n <= _MAX_JSON_USAGE:
                            held.append(chunk)
                        held_n += len(chunk)
                        tail = (tail + chunk)[-_TAIL:]
                if out:
                    await send({"type": "http.response.body", "body": out, "more_body": True})
            if scanner is not None:
                rest = scanner.finish()
                if rest:
                    await send({"type": "http.response.body", "body": rest, "more_body": True})
            elif ok_json:
                _json_usage(held, held_n, tail, usage)
            self._report(usage, expected=ok_json or is_sse)
            if annotate is not None and not annotate.done and (usage.prompt is not None or usage.completion is not None):
                annotate(None)  # not shown to this client (it did not ask for usage), but kept for GET /wattspan/requests/{id}
                self.stats["energy_annotated"] -= 1
            state["done"] = True
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            if not state["done"] and scanner is not None and usage.completion is None and scanner.content_events:
                # the stream ended before its usage (the client left, the upstream broke): its record gets the
                # text events the client was sent, about one token each, not 0 output tokens
                self.stats["tokens_from_events"] += 1
                set_tokens(output_tokens=scanner.content_events)
            with anyio.CancelScope(shield=True):  # close the upstream request even when the client left
                await response.aclose()

    def _annotator(self, usage: _Usage):
        """``annotate(usage_dict) -> fields``: the provisional energy of the request being served."""
        window = _current.get()
        if window is None:
            return None
        proxy = self

        def annotate(_usage_obj) -> dict:
            annotate.done = True  # type: ignore[attr-defined]  # a function takes attributes; mypy's callable types have none
            est = None
            try:
                prov = proxy.provisional
                if prov is not None:
                    est = prov.estimate(window.id, window.device, usage.prompt, usage.completion)
            except Exception:  # the figure is a courtesy: never fail the response for it
                log.exception("wattspan proxy: provisional energy estimate failed")
            energy = _sig(est["energy_j"]) if est else None
            co2e = _sig(est["co2e_g"]) if est else None
            method = est["method"] if est else "none"
            fig = {"energy_j": energy, "co2e_g": co2e, "method": method}
            kept = proxy._prov
            kept[window.id] = fig
            while len(kept) > _MAX_KEPT:
                kept.popitem(last=False)
            proxy.stats["energy_annotated"] += 1
            return {
                "energy_j": energy,
                "co2e_g": co2e,
                "energy_details": {"provisional": True, "method": method, "request_id": window.id, "final": _RECORDS_PATH + window.id},
            }

        annotate.done = False  # type: ignore[attr-defined]  # a function takes attributes; mypy's callable types have none
        return annotate

    def _report(self, usage: _Usage, *, expected: bool) -> None:
        if usage.prompt is None and usage.completion is None:
            if expected:
                self.stats["usage_missing"] += 1
            return
        set_tokens(prompt_tokens=usage.prompt, output_tokens=usage.completion)


def _json_usage(held: list[bytes], n: int, tail: bytes, usage: _Usage) -> dict | None:
    """Take the token counts; return the parsed top-level ``usage`` object (bodies within the bound)."""
    if n <= _MAX_JSON_USAGE:
        body = b"".join(held)
        try:
            obj = json.loads(body)
        except (ValueError, RecursionError):
            # not JSON to Python (an integer of over 4,300 digits, nesting past the recursion limit):
            # the counts the body does give are still found by their pattern
            _scan_usage(body, usage)
            return None
        if isinstance(obj, dict):
            usage.take(obj.get("usage"))
            u = obj.get("usage")
            return u if isinstance(u, dict) else None
        return None
    _scan_usage(tail, usage)
    return None


def _scan_usage(text: bytes, usage: _Usage) -> None:
    """The last ``prompt_tokens`` and ``completion_tokens`` integers in ``text`` (bounded digits), taken."""
    p = _PROMPT_RE.findall(text)
    c = _COMPLETION_RE.findall(text)
    usage.take({"prompt_tokens": int(p[-1]) if p else None, "completion_tokens": int(c[-1]) if c else None})


def _no_cookies():
    import http.cookiejar

    class _NoJar(http.cookiejar.CookieJar):
        def set_cookie(self, cookie) -> None:
            pass

        def extract_cookies(self, response, request) -> None:
            pass

    return _NoJar()  # httpx uses a CookieJar given as is


def _response_headers(raw, *, drop_length: bool) -> list[tuple[bytes, bytes]]:
    """The upstream's response headers a client may see: no hop-by-hop ones (nor those its
    ``Connection`` names), no ``date`` or ``server`` (uvicorn sends its own), no
    ``content-length`` on a stream."""
    named: set[bytes] = set()
    for k, v in raw:
        if k.lower() == b"connection":
            named.update(x.strip().lower().encode("latin-1") for x in v.decode("latin-1").split(","))
    return [
        (k, v)
        for k, v in raw
        if (kl := k.lower()) not in _RESPONSE_DROP and kl not in named and not (drop_length and kl == b"content-length")
    ]


_KEY_FILE_SUFFIX = ".pseudonym-key"


def _pseudonym_key(given: bytes | str | None, ledger: Path | None) -> tuple[bytes, str]:
    """The secret key of the API-key pseudonyms, and where it came from.

    In order: ``given``; ``WATTSPAN_PSEUDONYM_KEY``; the key file beside the
    ledger (``<ledger>.pseudonym-key``, created once with 32 random bytes, mode
    0600, so the pseudonyms stay the same across restarts); else 32 random
    bytes for this process only (its pseudonyms change at the next start).
    """
    if given is not None:
        key = given.encode("utf-8") if isinstance(given, str) else bytes(given)
        if len(key) < 32:
            raise ValueError("pseudonym_key must be a secret of at least 32 bytes")
        return key, "argument"
    from wattspan.settings import get_settings

    env = get_settings().pseudonym_key
    if env:
        return env.encode("utf-8"), "WATTSPAN_PSEUDONYM_KEY"
    path = ledger
    if path is not None and str(path) != ":memory:":
        kf = Path(path).with_name(Path(path).name + _KEY_FILE_SUFFIX)
        try:
            return _key_file(kf), "key-file"
        except OSError as exc:
            log.warning("wattspan proxy: cannot read or create the pseudonym key file %s (%s); API-key pseudonyms "
                        "use a key of this process only and change at the next start", kf, exc.strerror or exc)
    return secrets.token_bytes(32), "process"


def _key_file(path: Path) -> bytes:
    """The key in ``path``, made once (32 random bytes, hex, mode 0600) if there is none; the first writer wins."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        pass
    else:
        try:
            os.write(fd, (secrets.token_hex(32) + "\n").encode("ascii"))
            os.fsync(fd)
        finally:
            os.close(fd)
    for _ in range(50):  # another process may have created it an instant ago and not yet written it
        text = path.read_text("ascii").strip()
        if text:
            break
        time.sleep(0.01)
    try:
        key = bytes.fromhex(text)
    except ValueError:
        key = b""
    if len(key) < 32:
        raise OSError(0, "not a pseudonym key file (64 hex characters)")
    if os.stat(path).st_mode & 0o077:
        log.warning("wattspan proxy: the pseudonym key file %s can be read by other users; chmod 600 it", path)
    return key


#: the shape of an API key's pseudonym, as the ledger keeps a label (case aside)
_PSEUDONYM = re.compile(r"key-[0-9a-f]{12}", re.IGNORECASE)


def _pseudonym(secret: bytes, value: bytes) -> str:
    """``key-`` and 12 hex of an API key header's value (``Bearer`` cut), or "" for an empty key."""
    if value[:7].lower() == b"bearer ":
        value = value[7:]
    value = value.strip()
    return "key-" + hmac.new(secret, b"wattspan-tenant\0" + value, hashlib.sha256).hexdigest()[:12] if value else ""


def _tenant_label(header: bytes | None, from_key: bool, key_secret: bytes | None = None, stats: dict | None = None):
    """The tenant of a request: the ``header``'s value, else (``from_key``) a pseudonym of its API key.

    The API key itself is never kept: the label is ``key-`` and 12 hex
    characters of HMAC-SHA-256 of it under ``key_secret`` (see
    :func:`_pseudonym_key`), a stable pseudonym per key that no one without
    the secret can compute from a guessed key or match across deployments.
    A tenant header whose label would read as a pseudonym (``key-`` and 12 hex
    characters, once cleaned) is another caller's name: it becomes
    ``header:`` and the value, counted in ``stats["tenant_renamed"]``, so no
    header can be billed as, or read the records of, an API key's tenant. A header value that
    cleaning would change (``acme corp`` -> ``acmecorp``, another tenant's label) becomes the cleaned
    label, ``:h`` and 12 hex of its digest, counted in ``stats["tenant_digested"]``. With several key
    headers, the key is the first of ``_KEY_HEADERS`` present (Authorization's), whatever their order.
    """
    if from_key and not key_secret:
        raise ValueError("a pseudonym of the API key needs a secret key")
    secret: bytes = key_secret or b""
    counts = stats if stats is not None else {}

    def tenant(scope) -> str:
        # once per request: the middleware, a budget gate and the owner check all ask (and a renamed
        # header is counted once per request, not per asking)
        cache = scope.get("wattspan.tenant") if isinstance(scope, dict) else None
        if cache is not None and cache[0] is tenant:
            return cache[1]
        label = _tenant_uncached(scope)
        if isinstance(scope, dict):
            scope["wattspan.tenant"] = (tenant, label)
        return label

    def _tenant_uncached(scope) -> str:
        key, rank = None, len(_KEY_HEADERS)
        for k, v in scope.get("headers", ()):
            if k == header:
                if v.strip():
                    label = v.decode("latin-1")
                    if from_key and _PSEUDONYM.fullmatch(tenant_label(label)):
                        counts["tenant_renamed"] = counts.get("tenant_renamed", 0) + 1
                        return "header:" + label
                    clean = tenant_label(label)
                    if clean != label:
                        # cleaning would make it another tenant's label ("acme corp" -> "acmecorp"): billed and
                        # owned apart, as the cleaned label and a digest of the value sent
                        counts["tenant_digested"] = counts.get("tenant_digested", 0) + 1
                        return f"{clean[:48]}:h{hashlib.blake2b(v, digest_size=6).hexdigest()}"
                    return label
                continue  # an empty tenant header: fall back to the key
            if from_key and k in _KEY_HEADERS and _KEY_HEADERS.index(k) < rank:
                # the key the upstream authenticates on: Authorization first (OpenAI, vLLM), then api-key, x-api-key,
                # whatever order they came in (a junk x-api-key sent first must not rename a real key's tenant)
                key, rank = v, _KEY_HEADERS.index(k)
        return _pseudonym(secret, key) if key else ""

    return tenant


def _public(d: dict) -> dict:
    out = {k: d[k] for k in _PUBLIC if k in d}
    out["duration_s"] = (d["end_ns"] - d["start_ns"]) / 1e9
    return out


def _usage_object_span(raw: bytes) -> tuple[int, int] | None:
    """``(start, end)`` of the top-level ``"usage": {...}`` object's braces in a JSON text, or None.

    The usage object is found from the end (OpenAI-compatible servers put it last) and
    checked by parsing just that slice; its keys and values hold no braces in strings
    that matter, but strings are skipped properly anyway.
    """
    key = raw.rfind(b'"usage"')
    while key >= 0:
        i = key + 7
        n = len(raw)
        while i < n and raw[i] in b" \t\r\n":
            i += 1
        if i < n and raw[i] == 58:  # ':'
            i += 1
            while i < n and raw[i] in b" \t\r\n":
                i += 1
            if i < n and raw[i] == 123:  # '{'
                start, depth, j, in_str = i, 0, i, False
                while j < n:
                    c = raw[j]
                    if in_str:
                        if c == 92:  # backslash
                            j += 1
                        elif c == 34:
                            in_str = False
                    elif c == 34:
                        in_str = True
                    elif c == 123:
                        depth += 1
                    elif c == 125:
                        depth -= 1
                        if depth == 0:
                            return start, j + 1
                    j += 1
                return None
        key = raw.rfind(b'"usage"', 0, key)
    return None


def _splice_usage(raw: bytes, extra: dict, expected: dict | None = None) -> bytes | None:
    """``raw`` (a JSON object's text) with ``extra``'s fields added to its ``usage`` object.

    Every other byte stays as the upstream wrote it. None if no usage object is found, or
    (``expected``: the parsed top-level usage) if the one found is not it.
    """
    span = _usage_object_span(raw)
    if span is None:
        return None
    a, b = span
    try:
        inner = json.loads(raw[a:b])
    except ValueError:
        return None
    if not isinstance(inner, dict) or (expected is not None and inner != expected):
        return None
    add = json.dumps(extra, separators=(",", ":"), allow_nan=False)[1:-1].encode()
    if not add:
        return raw
    sep = b"," if inner else b""
    close = raw.rindex(b"}", a, b)
    return raw[:close] + sep + add + raw[close:]


def _sig(x: float | None, digits: int = 6) -> float | None:
    if x is None or not math.isfinite(x):
        return None
    return float(f"{x:.{digits}g}")


def _check_upstream(upstream: str) -> str:
    if not isinstance(upstream, str) or not upstream.strip():
        raise ValueError("upstream must be the model server's base URL, e.g. http://127.0.0.1:8000")
    u = upstream.strip().rstrip("/")
    parts = urlsplit(u)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"upstream {upstream!r} is not an http(s) URL with a host; write it like http://127.0.0.1:8000")
    if parts.query or parts.fragment:
        raise ValueError(f"upstream {upstream!r} must not have a query or fragment")
    try:
        parts.port
    except ValueError:
        raise ValueError(f"upstream {upstream!r} has an invalid port") from None
    if u.endswith("/v1"):  # the proxy forwards /v1/... itself
        u = u[:-3]
    return u


_ROUTE_KEY = "wattspan.upstream"


class _Upstream:
    """One upstream server and the devices its requests are metered on (``None``: the proxy's)."""

    __slots__ = ("url", "device")

    def __init__(self, url: str | None, device: str | None) -> None:
        self.url, self.device = url, device

    def __repr__(self) -> str:
        return f"_Upstream({self.url!r}, {self.device!r})"


_NO_ROUTE = _Upstream(None, None)


def _group_key(device) -> str:
    from wattspan.devices import group_key

    return group_key(device)


def _check_routes(routes) -> dict[str, _Upstream]:
    """``{model: URL or (URL, device) or {"url": URL, "device": device}}`` -> ``{model: _Upstream}``."""
    if not routes:
        return {}
    if not isinstance(routes, Mapping):
        raise ValueError("routes must map model names to upstream URLs, e.g. {'llama-70b': ('http://127.0.0.1:8000', 'gpu0,gpu1')}")
    out = {}
    for model, target in routes.items():
        if not isinstance(model, str) or not model.strip():
            raise ValueError(f"a route's model name must be a non-empty string, got {model!r}")
        if isinstance(target, Mapping):
            url, dev = target.get("url"), target.get("device")
        elif isinstance(target, (tuple, list)) and len(target) == 2:
            url, dev = target
        else:
            url, dev = target, None
        if dev is not None and not _group_key(dev):
            raise ValueError(f"route {model!r}: device {dev!r} names no device")
        out[model.strip()] = _Upstream(_check_upstream(url if isinstance(url, str) else ""), _group_key(dev) if dev is not None else None)
    return out


def parse_route(text: str) -> tuple[str, str, str | None]:
    """``MODEL=URL`` or ``MODEL=URL@DEVICES`` (``wattspan proxy --route``; devices as
    ``gpu0+gpu1`` or ``gpu0,gpu1``) -> ``(model, url, devices or None)``."""
    model, sep, rest = str(text).partition("=")
    if not sep or not model.strip() or not rest.strip():
        raise ValueError(f"--route {text!r}: write it MODEL=URL or MODEL=URL@DEVICES, e.g. llama-70b=http://127.0.0.1:8000@gpu0+gpu1")
    url, dev = rest, None
    head, at, tail = rest.rpartition("@")
    if at and tail.strip() and not any(c in tail for c in "/:"):  # not a URL's user@host:port
        url, dev = head, tail.strip()
    return model.strip(), url.strip(), dev


def create_proxy(upstream: str | None = None, **options) -> OpenAIProxy:
    """An ASGI app that meters every ``/v1/*`` request it forwards to ``upstream``.

    The options are :class:`OpenAIProxy`'s (all keyword-only):

    ``upstream``: the OpenAI-compatible server's base URL (``http://host:port``;
    a trailing ``/v1`` is dropped). ``routes``: several upstreams behind one proxy,
    ``{model: URL}`` or ``{model: (URL, device)}``: a request goes to the upstream serving
    the model its body (or ``model_header``) names and is metered on that upstream's
    device or device group (``"gpu0,gpu1"``); a model no route names goes to
    ``upstream`` if given (on ``device``), else gets 404 (``model_not_found``, counted as
    ``stats["unrouted"]``); a GET naming no model (``/v1/models``) goes to the first
    route. ``meter``: the :class:`~wattspan.Meter`
    (default: the process's). ``device``: the device the upstream runs on, or a
    callable ``scope -> name``. ``timeout_s``: the most seconds to wait for the
    upstream's headers or its next body chunk (then 504); ``connect_timeout_s``
    for the connection. ``max_body_bytes``: larger request bodies get 413.
    ``forward_headers``: request headers forwarded (allowlist, ``prefix*``
    allowed). ``include_usage``: ask streaming upstreams for usage (see the
    module's docstring). ``max_connections``: the upstream connection pool.
    ``request_id_header``: the response header that returns wattspan's request
    id (default ``x-wattspan-request-id``; ``None``: none). ``tenant``: the
    request header naming the tenant (default ``x-tenant-id``);
    ``tenant_from_key``: without it, label the request ``key-<12 hex>``, an
    HMAC-SHA-256 pseudonym of its API key (``Authorization: Bearer``, ``api-key``,
    ``x-api-key``; the key itself is never kept). ``pseudonym_key``: that
    HMAC's secret (32 bytes or more; default ``WATTSPAN_PSEUDONYM_KEY``, else
    the key file ``<ledger>.pseudonym-key``, made once with mode 0600, else a
    random key of this process, whose pseudonyms change at each start). ``model_header``: the model's
    header when the body names none. ``steps_listen``: listen here for batch
    steps from the upstream's engine (``host:port`` or ``unix:/path``; see
    :mod:`wattspan.integrations.vllm`). ``ledger``: a path (or a
    :class:`~wattspan.export.ledger.Ledger`): every final record is appended to that
    SQLite file, for ``wattspan report``. ``usage_energy``: add the provisional
    ``energy_j`` / ``co2e_g`` to OpenAI-style ``usage`` objects (default on).
    ``records_endpoint``: serve ``GET /wattspan/requests/{id}`` (default on).
    Raises ``ValueError`` naming a bad argument, :class:`~wattspan.InputError`
    for a ledger file that is not one.
    """
    return OpenAIProxy(upstream, **options)


def _no_query(record) -> bool:
    """uvicorn's access log line without the request's query string (``/v1/models?…``)."""
    args = record.args
    if isinstance(args, tuple) and len(args) >= 3 and isinstance(args[2], str) and "?" in args[2]:
        record.args = (*args[:2], args[2].split("?", 1)[0] + "?…", *args[3:])
    return True


def run_proxy(
    upstream: str | None,
    host: str = "127.0.0.1",
    port: int = 8080,
    *,
    log_level: str = "info",
    wrap: Callable[[Any], Any] | None = None,
    graceful_s: float | None = 30.0,
    **options,
) -> None:
    """Serve the metering proxy with uvicorn until interrupted (``wattspan proxy --upstream URL``).

    ``options`` are :func:`create_proxy`'s (``ledger="wattspan.sqlite"``, ...); ``wrap``, if
    given, wraps the proxy's ASGI app before it is served (e.g. in a ``BudgetMiddleware``).
    ``graceful_s``: at SIGTERM, how long requests in flight may finish before they are cut (a stream
    then recorded as 499) and the records drained; None waits for them however long (a stalled
    upstream held a stop for the whole ``timeout_s``, past any orchestrator's grace period).
    """
    import uvicorn

    from wattspan.logs import setup_logging

    setup_logging()
    app = create_proxy(upstream, **options)
    served = wrap(app) if wrap is not None else app
    import logging

    logging.getLogger("uvicorn.access").addFilter(_no_query)  # query strings carry keys (?api_key=...): never logged
    try:
        uvicorn.run(served, host=host, port=port, log_level=log_level, lifespan="on",
                    timeout_graceful_shutdown=None if graceful_s is None else int(math.ceil(graceful_s)))
    finally:
        if app.ledger is not None:
            app._flush_ledger()
