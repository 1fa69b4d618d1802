"""vLLM: time every engine step and tell wattspan which requests it ran.

Offline ``LLM``, with vLLM's EngineCore kept in this process: set
``VLLM_ENABLE_V1_MULTIPROCESSING=0`` in the environment before vLLM is imported
(by default vLLM runs the engine in a child process, out of reach)::

    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    from vllm import LLM
    llm = LLM(model="Qwen/Qwen2.5-0.5B-Instruct")
    hook = instrument_vllm(llm, meter=meter, track_requests=True)
    outs = llm.generate(prompts); meter.flush()   # one RequestRecord per prompt, split by batch-fit
    # each record's id is its RequestOutput's request_id (outs[i].request_id)

``vllm serve`` behind the metering proxy (the engine runs in a child process,
so its steps travel to the proxy's meter over a local socket)::

    wattspan proxy --upstream http://127.0.0.1:8000 --port 8080 --steps-listen 127.0.0.1:8791
    WATTSPAN_VLLM_STEPS=127.0.0.1:8791 vllm serve Qwen/Qwen2.5-0.5B-Instruct --port 8000
    curl http://127.0.0.1:8080/v1/chat/completions ...   # clients talk to the proxy

The second recipe needs wattspan's vLLM plugin, the entry point
``vllm.general_plugins: wattspan = wattspan.integrations.vllm:register``
(vLLM calls it in every process it starts, unless ``VLLM_PLUGINS`` names
others only; it does nothing unless ``WATTSPAN_VLLM_STEPS`` is set). Use the
same ``device`` name on both sides (``--device`` / ``WATTSPAN_DEVICE``).

What is hooked (vLLM V1, ``vllm/v1/engine/core.py``): ``EngineCore.step()``
(and ``step_with_batch_queue()`` under pipeline parallelism or async
scheduling) calls ``scheduler.schedule()`` for a ``SchedulerOutput`` whose
``num_scheduled_tokens`` maps each request id to the tokens it runs in this
step (its prefill chunk, 1 decode token, or more with speculative decoding);
then ``model_executor.execute_model(scheduler_output)``; then, once the step's
output is on the host, ``scheduler.update_from_output(scheduler_output,
model_output)``. The hook wraps ``execute_model`` (the step is dispatched) and
``update_from_output`` (its output is available) on the instance and reports
``[max(dispatch, previous step's end), output available)`` with the tokens.
If the scheduler has no ``update_from_output``, the step ends when
``execute_model`` returns (or its future completes).

Timing caveat: CUDA runs asynchronously and recent vLLM versions return a
future from ``execute_model``, so the time ``execute_model`` returns says
nothing about the GPU. The hook never calls ``torch.cuda.synchronize()`` (it
would stall the engine); it ends a step when vLLM itself has the step's output,
which needs the GPU to have finished it. With several batches in flight
(``step_with_batch_queue``) a step's start is moved to the previous step's end,
so the steps tile the busy time rather than overlap.

Request ids (checked against vLLM 0.32): the engine's id of a request is the
id its caller gave (``RequestOutput.request_id``, what users see) followed by
``-<8 random hex>`` for uniqueness (``vllm/v1/engine/input_processor.py``);
the hook drops that suffix first (:func:`user_request_id`), so offline records
carry ``RequestOutput.request_id`` (``"0"``, ``"1"``, ... for ``LLM.generate``).
vLLM's OpenAI server builds the caller's id from the ``X-Request-Id`` header:
``chatcmpl-<id>``, ``cmpl-<id>-<prompt index>``, ``embd-<id>`` and the like, and
``<n>_<id>`` for each of the ``n`` parallel samples. The metering proxy sends
wattspan's request id (lowercase hex: an 8-character process prefix and a
counter, 16 characters until the counter passes 2**32) as that header, so
:func:`default_request_id_map` takes the first run of 16 to 24 hex characters
out of it; an id without one is used as is. vLLM's own random ids (no
``X-Request-Id``: a client that bypassed the proxy) are 16 hex characters too:
they map to an id that no metering window has, and the meter leaves their
tokens out of the split.

The hook never raises into vLLM: a failure is logged once per kind and counted
in :attr:`VllmHook.stats`; a vLLM whose objects lack the attributes named above
is left alone (a warning, ``hook.active`` is ``False``).
"""

from __future__ import annotations

import os
import re
import sys
import threading
import time
import weakref
from collections.abc import Callable, Mapping
from typing import Any

from wattspan.logs import LogOnce, get_logger

__all__ = ["VllmHook", "default_request_id_map", "instrument_vllm", "register", "uninstrument_vllm", "user_request_id"]

log = get_logger(__name__)

_now = time.monotonic_ns
_WS_ID = re.compile(r"(?<![0-9a-f])[0-9a-f]{16,24}(?![0-9a-f])")
_ATTR = "_wattspan_vllm_hook"
_MAX_PENDING = 64  # batches dispatched and not yet back; vLLM keeps at most a few
_MAX_OPEN = 200_000  # requests tracked at once (track_requests)
_MAX_CACHE = 65_536
_once = LogOnce(log)  # one line per kind of trouble, for the whole process


def _warn_once(key: str, msg: str, *args: object) -> None:
    _once.warning(key, "wattspan vLLM hook: " + msg, *args)


_SUFFIX = re.compile(r"-[0-9a-f]{8}$")


def user_request_id(engine_request_id: str) -> str:
    """The caller's id of a request (``RequestOutput.request_id``) from the engine's.

    vLLM 0.32 appends ``-<8 random hex>`` to the caller's id: ``"0-ac6c6db3"`` -> ``"0"``,
    ``"chatcmpl-0123456789abcdef-1a2b3c4d"`` -> ``"chatcmpl-0123456789abcdef"``. (With
    ``VLLM_DISABLE_REQUEST_ID_RANDOMIZATION`` there is no suffix; an id that itself ends
    in ``-`` and 8 hex characters then loses them.)
    """
    return _SUFFIX.sub("", engine_request_id, count=1)


def default_request_id_map(vllm_request_id: str) -> str:
    """The wattspan request id inside a vLLM request id, else the id unchanged.

    ``"chatcmpl-0123456789abcdef-1a2b3c4d"`` -> ``"0123456789abcdef"``;
    ``"cmpl-0123456789abcdef-0"``, ``"2_chatcmpl-0123456789abcdef"`` likewise;
    ``"cmpl-7d1c...(32 hex)"`` or ``"0"`` -> unchanged.
    """
    m = _WS_ID.search(vllm_request_id)
    return m.group(0) if m else vllm_request_id


class VllmHook:
    """The instrumentation of one vLLM EngineCore; :func:`instrument_vllm` makes it.

    ``stats``: ``steps`` reported, ``tokens`` in them, ``empty`` steps (no
    tokens, not reported), ``unmatched`` outputs whose dispatch was not seen,
    ``errors`` inside the hook (never raised into vLLM), ``requests`` opened and
    ``closed`` (``track_requests``).
    """

    def __init__(self, core, *, meter, device: str, request_id_map: Callable[[str], str | None], track_requests: bool, model: str = "",
                 stages: list[str] | None = None) -> None:
        self.core = core
        self.meter = meter
        self.device = device
        self.stages = stages if stages and len(stages) > 1 else None  # pipeline stages' groups (device="auto")
        self.map = request_id_map
        self.track = track_requests
        self.model = model
        self.active = False
        self.mode = ""
        self.stats = {"steps": 0, "tokens": 0, "empty": 0, "unmatched": 0, "errors": 0, "requests": 0, "closed": 0}
        self._pending: dict[int, tuple[Any, int]] = {}
        self._last_end = 0
        self._cache: dict[str, str | None] = {}
        self._open: dict[str, list] = {}
        self._patched: list[tuple[Any, str, bool, Any, Any]] = []

    # ------------------------------------------------------------------ install

    def _patch(self, obj, name: str, wrapper) -> bool:
        original = getattr(obj, name)
        had_own = name in getattr(obj, "__dict__", {})
        try:
            setattr(obj, name, wrapper)
        except (AttributeError, TypeError) as exc:
            _warn_once(f"patch:{type(obj).__name__}.{name}", "cannot wrap %s.%s (%s); not instrumented", type(obj).__name__, name, exc)
            return False
        self._patched.append((obj, name, had_own, original, wrapper))
        return True

    def install(self) -> bool:
        core = self.core
        executor = getattr(core, "model_executor", None)
        scheduler = getattr(core, "scheduler", None)
        if executor is None or not callable(getattr(executor, "execute_model", None)):
            _warn_once("no-execute_model", "this vLLM EngineCore has no model_executor.execute_model; steps are not metered (vLLM version not supported)")
            return False
        ok = True
        if scheduler is not None and callable(getattr(scheduler, "update_from_output", None)):
            self.mode = "output"
            ok = self._patch(executor, "execute_model", self._wrap_dispatch(executor.execute_model))
            ok = ok and self._patch(scheduler, "update_from_output", self._wrap_output(scheduler.update_from_output))
        else:
            _warn_once("no-update_from_output", "the vLLM scheduler has no update_from_output; timing steps by execute_model alone")
            self.mode = "execute"
            ok = self._patch(executor, "execute_model", self._wrap_execute(executor.execute_model))
        if ok and self.track:
            for name in ("add_request", "abort_requests"):
                if not callable(getattr(core, name, None)):
                    _warn_once(f"no-{name}", "this vLLM EngineCore has no %s; track_requests is off", name)
                    ok = False
                    break
            if ok:
                ok = self._patch(core, "add_request", self._wrap_add(core.add_request))
                ok = ok and self._patch(core, "abort_requests", self._wrap_abort(core.abort_requests))
        if not ok:
            self.uninstall()
            return False
        self.active = True
        return True

    def uninstall(self) -> None:
        """Put back what :meth:`install` replaced; close the requests it opened."""
        self.active = False
        for obj, name, had_own, original, wrapper in reversed(self._patched):
            try:
                if obj.__dict__.get(name) is not wrapper:
                    continue  # wrapped again by someone else: leave it, the wrapper now passes through
                if had_own:
                    setattr(obj, name, original)
                else:
                    delattr(obj, name)
            except Exception:  # pragma: no cover - exotic objects
                pass
        self._patched.clear()
        self._pending.clear()
        if self._open:
            t = _now()
            for vid in list(self._open):
                self._close(vid, t)

    # ------------------------------------------------------------------ wrappers

    def _fail(self, where: str) -> None:
        self.stats["errors"] += 1
        _once.error("fail:" + where, "wattspan vLLM hook failed in %s (vLLM carries on; further failures are only counted)",
                    where, exc_info=True)

    def _wrap_dispatch(self, original):
        hook = self

        def execute_model(*args, **kwargs):
            if hook.active:
                t = _now()
                try:
                    hook._dispatch(args[0] if args else kwargs.get("scheduler_output"), t)
                except Exception:
                    hook._fail("execute_model")
            return original(*args, **kwargs)

        execute_model.__wrapped__ = original  # type: ignore[attr-defined]  # a function takes attributes; mypy's callable types have none
        return execute_model

    def _wrap_output(self, original):
        hook = self

        def update_from_output(*args, **kwargs):
            if not hook.active:
                return original(*args, **kwargs)
            t = _now()
            try:
                hook._output(args[0] if args else kwargs.get("scheduler_output"), t)
            except Exception:
                hook._fail("update_from_output")
            result = original(*args, **kwargs)
            if hook.track:
                try:
                    hook._track_outputs(result, t)
                except Exception:
                    hook._fail("request tracking")
            return result

        update_from_output.__wrapped__ = original  # type: ignore[attr-defined]  # a function takes attributes; mypy's callable types have none
        return update_from_output

    def _wrap_execute(self, original):
        """No ``update_from_output``: the step ends when ``execute_model``'s result is there."""
        hook = self

        def execute_model(*args, **kwargs):
            if not hook.active:
                return original(*args, **kwargs)
            so = args[0] if args else kwargs.get("scheduler_output")
            t = _now()
            try:
                hook._dispatch(so, t)
            except Exception:
                hook._fail("execute_model")
            result = original(*args, **kwargs)
            try:
                if callable(getattr(result, "add_done_callback", None)):
                    result.add_done_callback(lambda _f: hook._safe_output(so, _now()))
                else:
                    hook._output(so, _now())
            except Exception:
                hook._fail("execute_model result")
            return result

        execute_model.__wrapped__ = original  # type: ignore[attr-defined]  # a function takes attributes; mypy's callable types have none
        return execute_model

    def _safe_output(self, so, t: int) -> None:
        try:
            self._output(so, t)
        except Exception:
            self._fail("execute_model future")

    def _wrap_add(self, original):
        hook = self

        def add_request(*args, **kwargs):
            if hook.active:
                try:
                    hook._track_add(args[0] if args else kwargs.get("request"), _now())
                except Exception:
                    hook._fail("add_request")
            return original(*args, **kwargs)

        add_request.__wrapped__ = original  # type: ignore[attr-defined]  # a function takes attributes; mypy's callable types have none
        return add_request

    def _wrap_abort(self, original):
        hook = self

        def abort_requests(*args, **kwargs):
            result = original(*args, **kwargs)
            if hook.active:
                try:
                    ids = args[0] if args else kwargs.get("request_ids")
                    t = _now()
                    for vid in [ids] if isinstance(ids, str) else (ids or ()):
                        hook._close(vid, t)
                except Exception:
                    hook._fail("abort_requests")
            return result

        abort_requests.__wrapped__ = original  # type: ignore[attr-defined]  # a function takes attributes; mypy's callable types have none
        return abort_requests

    # ------------------------------------------------------------------ steps

    def _dispatch(self, so, t: int) -> None:
        if so is None:
            return
        pending = self._pending
        pending[id(so)] = (so, t)
        if len(pending) > _MAX_PENDING:
            del pending[next(iter(pending))]
        if self.track and self._open:
            finished = getattr(so, "finished_req_ids", None)
            if finished:
                for vid in finished:
                    if vid in self._open:
                        self._close(vid, t)

    def _mapped(self, vid: str) -> str | None:
        cache = self._cache
        try:
            return cache[vid]
        except KeyError:
            pass
        wid = self.map(user_request_id(vid) if isinstance(vid, str) else vid)
        if wid is not None:
            wid = str(wid)
        if len(cache) >= _MAX_CACHE:
            cache.clear()
        cache[vid] = wid
        return wid

    def _output(self, so, t_end: int) -> None:
        entry = self._pending.pop(id(so), None)
        if entry is None or entry[0] is not so:
            self.stats["unmatched"] += 1
            return
        submit = start = entry[1]
        prev_end = self._last_end
        if start < self._last_end:
            start = self._last_end
        nst = getattr(so, "num_scheduled_tokens", None)
        if not isinstance(nst, Mapping):
            _warn_once("no-num_scheduled_tokens", "SchedulerOutput has no num_scheduled_tokens mapping (vLLM version not supported); steps are not metered")
            return
        tokens: dict[str, float] = {}
        total = 0
        for vid, n in nst.items():
            if n and n > 0:
                wid = self._mapped(vid)
                if wid is not None:
                    tokens[wid] = tokens.get(wid, 0) + n
                    total += n
        if not tokens or t_end <= start:
            self.stats["empty"] += 1
            return
        self._last_end = t_end
        if self.stages is not None:
            # pipeline parallel: each stage's step on its own GPUs, at its own (modelled) time
            from ._gpu_groups import stage_windows

            for stage, (a, b) in zip(self.stages, stage_windows(submit, t_end, prev_end, len(self.stages))):
                if b > a:
                    self.meter.record_step(a, b, stage, tokens)
        else:
            self.meter.record_step(start, t_end, self.device, tokens)
        self.stats["steps"] += 1
        self.stats["tokens"] += total

    # ------------------------------------------------------------------ requests (track_requests)

    def _track_add(self, request, t: int) -> None:
        vid = getattr(request, "request_id", None)
        if not isinstance(vid, str) or vid in self._open:
            return
        if len(self._open) >= _MAX_OPEN:
            _warn_once("too-many-open", "more than %d vLLM requests open; new ones are not metered", _MAX_OPEN)
            return
        wid = self._mapped(vid)
        if wid is None:
            return
        prompt = getattr(request, "num_prompt_tokens", None)
        if not isinstance(prompt, int):
            ids = getattr(request, "prompt_token_ids", None)
            prompt = len(ids) if ids is not None else 0
        self._open[vid] = [wid, prompt, 0]
        self.meter.begin(wid, self.device, t)
        self.stats["requests"] += 1

    def _track_outputs(self, result, t: int) -> None:
        if not self._open or result is None:
            return
        groups = result.values() if isinstance(result, Mapping) else (result,)
        for eco in groups:
            for out in getattr(eco, "outputs", None) or ():
                vid = getattr(out, "request_id", None)
                entry = self._open.get(vid) if vid is not None else None
                if vid is None or entry is None:
                    continue
                new = getattr(out, "new_token_ids", None)
                if new:
                    entry[2] += len(new)
                if getattr(out, "finish_reason", None) is not None:
                    self._close(vid, t)

    def _close(self, vid: str, t: int) -> None:
        entry = self._open.pop(vid, None)
        if entry is None:
            return
        wid, prompt, output = entry
        self.meter.end(wid, self.device, t, {"route": "vllm", "model": self.model, "prompt_tokens": prompt, "output_tokens": output})
        self.stats["closed"] += 1


# ---------------------------------------------------------------------- public API


def _resolve_core(target):
    """An EngineCore from an ``LLM``, ``LLMEngine``, ``InprocClient`` or the core itself."""
    obj = target
    for _ in range(5):
        if hasattr(obj, "scheduler") and hasattr(obj, "model_executor"):
            return obj
        nxt = getattr(obj, "llm_engine", None) or getattr(obj, "engine_core", None)
        if nxt is None or nxt is obj:
            break
        obj = nxt
    raise ValueError(
        f"cannot find a vLLM EngineCore (an object with .scheduler and .model_executor) in {type(target).__name__}: "
        "pass llm.llm_engine.engine_core.engine_core, or the EngineCore class. If vLLM runs its engine in a child process "
        "(VLLM_ENABLE_V1_MULTIPROCESSING=1, the default, and always under `vllm serve`), set VLLM_ENABLE_V1_MULTIPROCESSING=0 "
        "for offline use, or use the plugin (WATTSPAN_VLLM_STEPS) to instrument the engine process"
    )


def _model_name(core) -> str:
    mc = getattr(getattr(core, "vllm_config", None), "model_config", None)
    name = getattr(mc, "served_model_name", None) or getattr(mc, "model", None) or ""
    if isinstance(name, (list, tuple)):
        name = name[0] if name else ""
    return str(name)[:128]


def _check_device(device) -> None:
    if isinstance(device, (list, tuple)) and device:
        return
    if not (callable(device) or (isinstance(device, str) and device)):
        raise ValueError(f"device must be a device name such as 'gpu0' or a callable engine_core -> name, got {device!r}")


def _stages_for(core, device) -> list[str] | None:
    """Each pipeline stage's device group, where the hook maps the engine itself (``device="auto"``)."""
    if device != "auto":
        return None
    from ._gpu_groups import engine_group

    return engine_group(core.vllm_config)[1]


def _device_for(core, device) -> str:
    if device == "auto":  # the engine's GPUs from its parallel config and the visible devices (mapped by UUID)
        from ._gpu_groups import engine_group

        group, stages = engine_group(core.vllm_config)
        log.info("wattspan: vLLM engine steps metered on %s (pipeline stages: %s)", group, " | ".join(stages))
        return group
    d = device(core) if callable(device) else device
    if isinstance(d, (list, tuple)):
        from wattspan.devices import group_key

        d = group_key(d)
    if not isinstance(d, str) or not d:
        raise ValueError(f"device callable returned {d!r}; it must return a device name such as 'gpu0'")
    return d


class _ClassPatch:
    __slots__ = ("cls", "saved", "opts", "instances", "active")

    def __init__(self, cls, opts: dict) -> None:
        self.active = True
        self.cls = cls
        self.saved: list[tuple[str, bool, Any, Any]] = []
        self.opts = opts
        self.instances: weakref.WeakSet = weakref.WeakSet()


_class_patches: dict[type, _ClassPatch] = {}
_class_lock = threading.Lock()


def _instrument_instance(core, *, meter, device, request_id_map, track_requests) -> VllmHook:
    existing = getattr(core, _ATTR, None)
    if existing is not None:
        return existing
    from ._relay import resolve_step_sink

    sink = resolve_step_sink(meter)
    if track_requests and not (hasattr(sink, "begin") and hasattr(sink, "end")):
        raise ValueError("track_requests=True needs a local wattspan Meter (it opens a window per request); a step relay cannot")
    hook = VllmHook(
        core,
        meter=sink,
        device=_device_for(core, device),
        request_id_map=request_id_map or default_request_id_map,
        track_requests=track_requests,
        model=_model_name(core),
        stages=_stages_for(core, device),
    )
    hook.install()
    try:
        setattr(core, _ATTR, hook)
    except (AttributeError, TypeError):  # pragma: no cover - slotted engine objects
        pass
    return hook


def _instrument_class(cls, opts: dict) -> _ClassPatch:
    with _class_lock:
        patch = _class_patches.get(cls)
        if patch is not None:
            return patch
        patch = _ClassPatch(cls, opts)

        def make_shim(original):
            def shim(self, *args, **kwargs):
                # an engine keeps the bound shim in step_fn: after uninstrument_vllm(cls) it must pass through
                if patch.active and getattr(self, _ATTR, None) is None:
                    try:
                        patch.instances.add(self)
                        _instrument_instance(self, **patch.opts)
                    except Exception:
                        _warn_once("class-instrument", "could not instrument a %s; it runs unmetered", type(self).__name__)
                        try:
                            setattr(self, _ATTR, False)  # do not retry every step
                        except Exception:
                            pass
                return original(self, *args, **kwargs)

            shim.__wrapped__ = original  # type: ignore[attr-defined]  # a function takes attributes; mypy's callable types have none
            shim.__name__ = getattr(original, "__name__", "step")
            return shim

        for name in ("step", "step_with_batch_queue"):
            original = getattr(cls, name, None)
            if original is None:
                continue
            had_own = name in cls.__dict__
            shim = make_shim(original)
            setattr(cls, name, shim)
            patch.saved.append((name, had_own, original, shim))
        if not patch.saved:
            _warn_once("no-step", "%s has neither step nor step_with_batch_queue; not instrumented", cls.__name__)
        _class_patches[cls] = patch
        return patch


def instrument_vllm(
    engine_core_or_class,
    *,
    meter=None,
    device: str | Callable[[Any], str] = "gpu0",
    request_id_map: Callable[[str], str | None] | None = None,
    track_requests: bool = False,
):
    """Meter every engine step of a vLLM V1 engine.

    ``engine_core_or_class``: an ``EngineCore`` (``llm.llm_engine.engine_core.engine_core``,
    which exists only with ``VLLM_ENABLE_V1_MULTIPROCESSING=0`` set before vLLM is
    imported; an ``LLM``, ``LLMEngine`` or ``InprocClient`` is followed down to
    it), or the class ``EngineCore`` /
    ``EngineCoreProc``, which is patched so every instance instruments itself
    at its first step (how the plugin reaches the engine process of ``vllm serve``).

    ``meter``: the :class:`~wattspan.Meter` to report to (default: the
    process's), a :class:`wattspan.integrations._relay.StepSender`, or a relay
    address string (``"127.0.0.1:8791"``) for a proxy's step receiver.
    ``device``: the device name the steps ran on (as the requests' windows name
    it), a device group (``["gpu0", "gpu1"]`` or ``"gpu0,gpu1"``), ``"auto"`` (the
    engine's GPUs: ``tensor_parallel_size x pipeline_parallel_size`` devices from its
    ``parallel_config``, its data-parallel replica's block of ``CUDA_VISIBLE_DEVICES``,
    resolved to NVML devices by UUID; see :mod:`wattspan.integrations._gpu_groups`), or a
    callable ``engine_core -> name``. vLLM does not expose each pipeline stage's own timing
    to the engine core; with ``"auto"`` a pipeline-parallel engine's steps are reported per
    stage, on the stage's GPUs, at the times a balanced pipeline runs them (see
    :func:`wattspan.integrations._gpu_groups.stage_windows`); with a group given, on the whole
    group over the step's time. ``request_id_map``: the caller's request id
    (``RequestOutput.request_id``: the engine's id less vLLM's random suffix,
    see :func:`user_request_id`) -> wattspan request id, ``None`` to leave a
    request out (default: :func:`default_request_id_map`). ``track_requests``: also open and close a
    metering window per vLLM request, with its prompt and output token counts
    (offline use, where no HTTP middleware opens windows; needs a local Meter).

    Returns the :class:`VllmHook` (an instance) or ``None`` (a class). Raises
    ``ValueError`` for bad arguments; never raises from inside vLLM.
    """
    _check_device(device)
    if request_id_map is not None and not callable(request_id_map):
        raise ValueError(f"request_id_map must be a callable vllm_request_id -> wattspan request id, got {request_id_map!r}")
    opts = {"meter": meter, "device": device, "request_id_map": request_id_map, "track_requests": bool(track_requests)}
    if isinstance(engine_core_or_class, type):
        if isinstance(meter, str):
            from ._relay import StepSender

            opts["meter"] = StepSender(meter)  # one connection for every instance of the class
        _instrument_class(engine_core_or_class, opts)
        return None
    core = _resolve_core(engine_core_or_class)
    return _instrument_instance(core, **opts)


def uninstrument_vllm(engine_core_or_class) -> bool:
    """Undo :func:`instrument_vllm` on an engine core (or what leads to one) or a class.

    For a class, the instances it instrumented are undone too. Returns whether
    anything was instrumented.
    """
    target = engine_core_or_class
    if isinstance(target, type):
        with _class_lock:
            patch = _class_patches.pop(target, None)
        if patch is None:
            return False
        patch.active = False
        for name, had_own, original, shim in patch.saved:
            if target.__dict__.get(name) is shim:
                if had_own:
                    setattr(target, name, original)
                else:
                    delattr(target, name)
        for inst in list(patch.instances):
            uninstrument_vllm(inst)
        return True
    try:
        core = _resolve_core(target)
    except ValueError:
        return False
    hook = getattr(core, _ATTR, None)
    if hook is None:
        return False
    try:
        delattr(core, _ATTR)
    except AttributeError:  # pragma: no cover
        pass
    if hook is False:
        return False
    hook.uninstall()
    return True


_registered = False


def register() -> None:
    """vLLM general plugin: meter the engine of ``vllm serve`` when ``WATTSPAN_VLLM_STEPS`` is set.

    It also gives wattspan's logger a handler in vLLM's processes (vLLM configures
    only its own loggers), so wattspan's warnings show there; ``WATTSPAN_LOG_LEVEL``
    sets the level.

    ``WATTSPAN_VLLM_STEPS``: the step receiver's address (``wattspan proxy
    --steps-listen``), ``WATTSPAN_DEVICE``: the device name (default ``gpu0``), a
    device group (``gpu0,gpu1``), or ``auto`` (each engine's own GPUs, see ``device``).
    vLLM calls plugins in each process it starts; only a process that has
    loaded ``vllm.v1.engine.core`` (the engine process loads plugins from
    ``EngineCore.__init__``) is patched, and only once. Never raises.
    """
    global _registered
    try:
        from wattspan.logs import setup_logging

        setup_logging()
        address = os.environ.get("WATTSPAN_VLLM_STEPS", "").strip()
        if not address or _registered:
            return
        module = sys.modules.get("vllm.v1.engine.core")
        cls = getattr(module, "EngineCore", None) if module is not None else None
        if cls is None:
            return
        instrument_vllm(cls, meter=address, device=os.environ.get("WATTSPAN_DEVICE", "gpu0") or "gpu0")
        _registered = True
        log.info("wattspan: metering vLLM engine steps, sending them to %s", address)
    except Exception:
        log.exception("wattspan: the vLLM plugin could not instrument the engine; vLLM runs unmetered")
