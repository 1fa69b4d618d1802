"""The vLLM hook on a thin stand-in of vLLM V1's EngineCore, the step relay, and the whole
path: proxy -> OpenAI server -> engine steps -> relay -> the proxy's meter."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import queue
import socket
import sys
import threading
import time
import types

import httpx
import pytest
from fastapi import FastAPI, Request as HTTPRequest
from fastapi.responses import JSONResponse

from wattspan.integrations import vllm as vhook
from wattspan.integrations._relay import StepReceiver, StepSender, parse_address
from wattspan.integrations.openai_proxy import create_proxy
from wattspan.integrations.vllm import default_request_id_map, instrument_vllm, uninstrument_vllm

from .conftest import free_port, serve
from .fakes.fake_vllm import EngineCore, Request


class StepLog:
    """A step sink with the Meter's record_step signature, keeping what it is given."""

    def __init__(self) -> None:
        self.steps: list[tuple[int, int, str, dict]] = []

    def record_step(self, start_ns, end_ns, device, tokens) -> None:
        self.steps.append((start_ns, end_ns, device, dict(tokens)))

    def tokens_by_request(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for *_, tok in self.steps:
            for k, v in tok.items():
                out[k] = out.get(k, 0) + v
        return out


def ws_id(i: int) -> str:
    return f"{i:016x}"


def add_requests(core, shapes, fmt="chatcmpl-{id}-{suffix}"):
    """shapes: [(prompt_tokens, max_tokens)]; vLLM ids built like its OpenAI server's."""
    ids = []
    for i, (p, m) in enumerate(shapes):
        vid = fmt.format(id=ws_id(i + 1), suffix=os.urandom(4).hex())
        core.add_request(Request(vid, list(range(p)), m))
        ids.append(vid)
    return ids


@pytest.fixture
def make_core():
    cores = []

    def make(**kw):
        core = EngineCore(**kw)
        cores.append(core)
        return core

    yield make
    for c in cores:
        uninstrument_vllm(c)
        c.shutdown()


SHAPES = [(50, 6), (130, 4), (7, 9), (64, 1)]


class TestSteps:
    @pytest.mark.parametrize("shape", ["step-future", "step-sync", "batch-queue"])
    def test_steps_carry_the_scheduled_tokens_and_tile_the_busy_time(self, make_core, shape):
        kw = {"step-future": {}, "step-sync": {"non_block": False}, "batch-queue": {"batch_queue_size": 2}}[shape]
        core = make_core(base_s=0.003, per_token_s=0.00005, **kw)
        log = StepLog()
        hook = instrument_vllm(core, meter=log, device="gpu3")
        add_requests(core, SHAPES)
        core.run_until_done()
        assert hook.active and hook.stats["errors"] == 0 and hook.stats["unmatched"] == 0
        # every prompt token once, then one token per further output token
        assert log.tokens_by_request() == {ws_id(i + 1): p + m - 1 for i, (p, m) in enumerate(SHAPES)}
        assert hook.stats["tokens"] == sum(p + m - 1 for p, m in SHAPES) and hook.stats["steps"] == len(log.steps)
        assert {d for _, _, d, _ in log.steps} == {"gpu3"}
        for (s0, e0, _, _), (s1, e1, _, _) in zip(log.steps, log.steps[1:]):
            assert s0 < e0 <= s1 < e1  # in order, never overlapping
        # a step ends when its output is there, not when execute_model returns (with a
        # future, at once): each lasts at least its "GPU" time. With two batches in flight a
        # step starts when the previous one's output was taken, which may be late, so there
        # only the steps together must cover the GPU's time.
        gpu_s = [0.003 + 0.00005 * sum(tok.values()) for *_, tok in log.steps]
        took_s = [(e - s) / 1e9 for s, e, _, _ in log.steps]
        if shape == "batch-queue":
            assert sum(took_s) >= 0.95 * sum(gpu_s)
        else:
            assert all(t >= 0.95 * g for t, g in zip(took_s, gpu_s))

    def test_a_pipeline_parallel_engine_reports_each_stage_on_its_gpus(self, make_core, monkeypatch):
        """device="auto" on a PP-2 engine (a batch queue of 2, as vLLM runs pipeline parallel):
        every step becomes one step per stage, on the stage's GPU, inside the step's window."""
        from types import SimpleNamespace

        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1,0")
        monkeypatch.setattr("wattspan.integrations._gpu_groups.nvml_uuids", lambda: [])
        core = make_core(base_s=0.003, per_token_s=0.00005, batch_queue_size=2)
        core.vllm_config.parallel_config = SimpleNamespace(tensor_parallel_size=1, pipeline_parallel_size=2, data_parallel_rank_local=0)
        log = StepLog()
        hook = instrument_vllm(core, meter=log, device="auto")
        add_requests(core, SHAPES)
        core.run_until_done()
        assert hook.device == "gpu1,gpu0" and hook.stats["errors"] == 0
        by_stage = {d: [st for st in log.steps if st[2] == d] for d in ("gpu1", "gpu0")}
        assert len(by_stage["gpu1"]) == len(by_stage["gpu0"]) == hook.stats["steps"] > 0
        for (a0, b0, _, t0), (a1, b1, _, t1) in zip(by_stage["gpu1"], by_stage["gpu0"]):
            assert a0 < b0 <= a1 < b1 and t0 == t1  # stage 0 then stage 1, the same tokens
        # each stage's tokens are every request's tokens (each stage ran every step's batch)
        assert log.tokens_by_request() == {ws_id(i + 1): 2 * (p + m - 1) for i, (p, m) in enumerate(SHAPES)}

    def test_stage_windows_follow_a_lone_or_a_full_pipeline(self):
        from wattspan.integrations._gpu_groups import stage_windows

        # a lone micro-batch: the stages one after another over its whole window
        assert stage_windows(1000, 1300, 0, 3) == [(1000, 1100), (1100, 1200), (1200, 1300)]
        # a full pipeline: out one stage-time (50) after the one before, each stage one slot earlier
        assert stage_windows(1000, 1200, 1150, 2) == [(1100, 1150), (1150, 1200)]
        assert stage_windows(1000, 1200, 0, 1) == [(1000, 1200)]

    def test_parallel_samples_and_prompt_indices_map_to_one_request(self, make_core):
        core = make_core()
        log = StepLog()
        instrument_vllm(core, meter=log)
        wid = ws_id(42)
        for vid in (f"0_chatcmpl-{wid}-1a2b3c4d", f"1_chatcmpl-{wid}-1a2b3c4d", f"cmpl-{wid}-1-99aa00ff"):
            core.add_request(Request(vid, list(range(10)), 3))
        core.run_until_done()
        assert log.tokens_by_request() == {wid: 3 * (10 + 3 - 1)}

    def test_request_id_formats(self):
        w = "0123456789abcdef"
        for vid in (f"chatcmpl-{w}", f"chatcmpl-{w}-1a2b3c4d", f"cmpl-{w}-0", f"cmpl-{w}-3-1a2b3c4d", f"2_chatcmpl-{w}-1a2b3c4d", f"embd-{w}", w):
            assert default_request_id_map(vid) == w, vid
        long = "0123456789abcdef0"  # the counter part of wattspan's id grows past 2**32
        assert default_request_id_map(f"chatcmpl-{long}-1a2b3c4d") == long
        for vid in ("chatcmpl-" + "ab" * 16, "cmpl-" + "ab" * 16 + "-0-1a2b3c4d", "0", "1_2", "chatcmpl-0123456789ABCDEF"):
            assert default_request_id_map(vid) == vid, vid

    def test_custom_map_can_leave_requests_out(self, make_core):
        core = make_core()
        log = StepLog()
        instrument_vllm(core, meter=log, request_id_map=lambda vid: None if vid.startswith("internal") else vid.upper())
        core.add_request(Request("internal-1", list(range(5)), 2))
        core.add_request(Request("user-1", list(range(5)), 2))
        core.run_until_done()
        assert log.tokens_by_request() == {"USER-1": 6}

    def test_device_from_a_callable_and_bad_arguments(self, make_core):
        core = make_core(model="org/some-model")
        log = StepLog()
        hook = instrument_vllm(core, meter=log, device=lambda c: "gpu-" + c.vllm_config.model_config.model.split("/")[0])
        assert hook.device == "gpu-org" and hook.model == "org/some-model"
        with pytest.raises(ValueError, match="device"):
            instrument_vllm(make_core(), meter=log, device="")
        with pytest.raises(ValueError, match="EngineCore"):
            instrument_vllm(object(), meter=log)
        with pytest.raises(ValueError, match="local wattspan Meter"):
            instrument_vllm(make_core(), meter=log, track_requests=True)
        with pytest.raises(TypeError, match="meter"):
            instrument_vllm(make_core(), meter=42)

    def test_reaches_the_core_from_llm_like_wrappers_and_uninstruments(self, make_core):
        core = make_core()
        llm = types.SimpleNamespace(llm_engine=types.SimpleNamespace(engine_core=types.SimpleNamespace(engine_core=core)))  # LLM -> LLMEngine -> InprocClient
        log = StepLog()
        hook = instrument_vllm(llm, meter=log)
        assert hook.core is core and instrument_vllm(core, meter=log) is hook  # once per core
        assert "execute_model" in vars(core.model_executor)
        add_requests(core, [(8, 2)])
        core.run_until_done()
        n = len(log.steps)
        assert n > 0
        assert uninstrument_vllm(llm) is True
        assert "execute_model" not in vars(core.model_executor) and "update_from_output" not in vars(core.scheduler)
        add_requests(core, [(8, 2)])
        core.run_until_done()
        assert len(log.steps) == n and uninstrument_vllm(core) is False


def test_offline_requests_get_records_with_their_tokens(live_meter, make_core):
    core = make_core(base_s=0.004, per_token_s=0.0001, max_num_batched_tokens=256, model="org/offline-model")
    hook = instrument_vllm(core, meter=live_meter, track_requests=True)
    shapes = {"0-1a2b3c4d": (200, 8), "1-99ffee00": (10, 8), "2-0badf00d": (60, 3), "3-12345678": (30, 100)}
    for vid, (p, m) in shapes.items():  # offline LLM ids: a counter and vLLM's random suffix
        core.add_request(Request(vid, list(range(p)), m))
    for _ in range(12):
        core.step_fn()
    core.abort_requests(["3-12345678"])  # e.g. the caller gave up on it
    core.run_until_done()
    assert hook.stats["requests"] == hook.stats["closed"] == 4 and hook.stats["errors"] == 0
    assert live_meter.flush(15)
    recs = {r.id: r for r in live_meter.records}
    # records carry the ids users see (RequestOutput.request_id), not the engine's suffixed ones
    assert sorted(recs) == ["0", "1", "2", "3"]
    for vid, (p, m) in shapes.items():
        r = recs[vid.split("-")[0]]
        assert (r.prompt_tokens, r.route, r.model, r.method) == (p, "vllm", "org/offline-model", "batch-fit")
        assert r.energy_j > 0 and r.start_ns < r.end_ns
        if vid != "3-12345678":
            assert r.output_tokens == m
    assert 0 < recs["3"].output_tokens < 100


class TestNeverRaisesIntoVllm:
    def test_a_failing_meter_or_map_is_counted_and_logged_once(self, make_core, caplog):
        class Broken:
            def record_step(self, *a):
                raise RuntimeError("meter exploded")

        for kw in ({"meter": Broken()}, {"meter": StepLog(), "request_id_map": lambda vid: 1 / 0}):
            core = make_core()
            caplog.clear()
            hook = instrument_vllm(core, **kw)
            ids = add_requests(core, SHAPES)
            core.run_until_done()
            assert hook.stats["errors"] > 1
            assert core.scheduler.requests == {} and core.scheduler.running == [] and len(ids) == len(SHAPES)  # vLLM finished its work
            assert sum("wattspan vLLM hook failed" in r.message for r in caplog.records) <= 1

    def test_missing_attributes_leave_vllm_alone(self, make_core, caplog):
        caplog.set_level(logging.WARNING)
        vhook._once.forget()
        # a SchedulerOutput without num_scheduled_tokens
        core = make_core()
        real = core.scheduler.schedule

        def schedule(*a):
            so = real(*a)
            return types.SimpleNamespace(total_num_scheduled_tokens=so.total_num_scheduled_tokens, finished_req_ids=so.finished_req_ids, _so=so)

        # this "other version" passes its own SchedulerOutput around; the fake's internals get the original
        core.scheduler.update_from_output = (lambda orig: lambda so, out: orig(so._so, out))(core.scheduler.update_from_output)
        core.model_executor.execute_model = (lambda orig: lambda so, **kw: orig(so._so, **kw))(core.model_executor.execute_model)
        core.scheduler.schedule = schedule
        log = StepLog()
        hook = instrument_vllm(core, meter=log)
        add_requests(core, [(10, 3)])
        core.run_until_done()
        assert hook.active and log.steps == [] and core.scheduler.requests == {}
        assert "num_scheduled_tokens" in caplog.text
        # an executor without execute_model: not instrumented at all
        odd = types.SimpleNamespace(scheduler=core.scheduler, model_executor=types.SimpleNamespace())
        hook2 = instrument_vllm(odd, meter=log)
        assert hook2.active is False and "execute_model" in caplog.text

    def test_without_update_from_output_execute_model_times_the_step(self, make_core):
        core = make_core(non_block=False)
        sched = core.scheduler

        class Proxy:  # a scheduler of another version, with no update_from_output to hook
            def __getattr__(self, name):
                if name == "update_from_output":
                    raise AttributeError(name)
                return getattr(sched, name)

        core.scheduler = Proxy()
        hook_target = types.SimpleNamespace(scheduler=core.scheduler, model_executor=core.model_executor)
        log = StepLog()
        hook = instrument_vllm(hook_target, meter=log)
        assert hook.mode == "execute"
        core.scheduler = sched
        add_requests(core, [(20, 3)])
        core.run_until_done()
        assert log.tokens_by_request() == {ws_id(1): 22}


class TestClassAndPlugin:
    def test_patching_the_class_instruments_each_new_engine(self):
        class Core(EngineCore):  # a subclass, like EngineCoreProc
            pass

        log = StepLog()
        assert instrument_vllm(Core, meter=log, device="gpu1") is None
        core = Core()
        try:
            add_requests(core, [(12, 3)])
            core.run_until_done()
            assert log.tokens_by_request() == {ws_id(1): 14}
            assert getattr(core, vhook._ATTR).device == "gpu1"
            assert uninstrument_vllm(Core) is True
            assert "step" not in vars(Core) and Core.step is EngineCore.step
            assert getattr(core, vhook._ATTR, None) is None
            n = len(log.steps)
            add_requests(core, [(12, 3)])  # its step_fn still holds the old shim: it must stay quiet
            core.run_until_done()
            assert len(log.steps) == n and getattr(core, vhook._ATTR, None) is None
        finally:
            uninstrument_vllm(Core)
            core.shutdown()

    def test_plugin_meters_the_engine_process_over_the_relay(self, monkeypatch):
        class Core(EngineCore):
            pass

        log = StepLog()
        rx = StepReceiver(log, "127.0.0.1:0")
        module = types.ModuleType("vllm.v1.engine.core")
        module.EngineCore = Core
        monkeypatch.setitem(sys.modules, "vllm.v1.engine.core", module)
        monkeypatch.setattr(vhook, "_registered", False)
        monkeypatch.setenv("WATTSPAN_VLLM_STEPS", rx.address)
        monkeypatch.setenv("WATTSPAN_DEVICE", "gpu7")
        core = None
        try:
            vhook.register()
            vhook.register()  # vLLM may load plugins more than once
            core = Core()  # the engine process builds its EngineCore after loading plugins
            add_requests(core, [(30, 4), (5, 2)])
            core.run_until_done()
            getattr(core, vhook._ATTR).meter.flush()
            deadline = time.monotonic() + 5
            while rx.counters["steps"] < getattr(core, vhook._ATTR).stats["steps"] and time.monotonic() < deadline:
                time.sleep(0.01)
            assert log.tokens_by_request() == {ws_id(1): 33, ws_id(2): 6}
            assert {d for _, _, d, _ in log.steps} == {"gpu7"}
        finally:
            uninstrument_vllm(Core)
            rx.close()
            if core is not None:
                core.shutdown()

    def test_plugin_does_nothing_unless_asked(self, monkeypatch):
        monkeypatch.delenv("WATTSPAN_VLLM_STEPS", raising=False)
        monkeypatch.setattr(vhook, "_registered", False)
        before = dict(vhook._class_patches)
        vhook.register()
        assert vhook._class_patches == before


class TestRelay:
    def test_round_trip_and_malformed_lines(self):
        log = StepLog()
        rx = StepReceiver(log, "127.0.0.1:0")
        tx = StepSender(rx.address)
        try:
            tx.record_step(10, 20, "gpu0", {"a": 3, "b": 1})
            tx.record_step(20, 20, "gpu0", {"a": 1})  # empty interval: not sent
            tx.record_step(20, 30, "gpu1", {})  # nobody: not sent
            tx.record_step(30, 45, "gpu1", {"c": 2.5})
            assert tx.flush()
            with socket.create_connection(parse_address(rx.address)[1]) as s:
                s.sendall(b'{"auth": "%s"}\n' % rx.token.encode())  # TCP connections authenticate first
                s.sendall(b'not json\n{"s": 5, "e": 1, "d": "gpu0", "t": {"x": 1}}\n{"s": 1, "e": 2, "d": "gpu0", "t": {"x": -1}}\n{"s":50,"e":60,"d":"gpu0","t":{"d":1}}\n')
            deadline = time.monotonic() + 5
            while (rx.counters["steps"] < 3 or rx.counters["bad_lines"] < 3) and time.monotonic() < deadline:
                time.sleep(0.01)
        finally:
            tx.close()
            rx.close()
        assert log.steps == [(10, 20, "gpu0", {"a": 3, "b": 1}), (30, 45, "gpu1", {"c": 2.5}), (50, 60, "gpu0", {"d": 1})]
        assert rx.counters["bad_lines"] == 3 and tx.counters["sent"] == 2

    @pytest.mark.skipif(not hasattr(socket, "AF_UNIX"), reason="no unix sockets")
    def test_unix_socket(self, tmp_path):
        log = StepLog()
        rx = StepReceiver(log, f"unix:{tmp_path / 'steps.sock'}")
        tx = StepSender(rx.address)
        try:
            tx.record_step(1, 2, "gpu0", {"r": 1})
            assert tx.flush()
            deadline = time.monotonic() + 5
            while not log.steps and time.monotonic() < deadline:
                time.sleep(0.01)
        finally:
            tx.close()
            rx.close()
        assert log.steps == [(1, 2, "gpu0", {"r": 1})]
        assert not (tmp_path / "steps.sock").exists()

    def test_a_missing_receiver_drops_and_counts(self, caplog, monkeypatch):
        tx = StepSender(f"127.0.0.1:{free_port()}", retry_s=10)
        callers = []
        real_connect = socket.socket.connect

        def connect(sock, addr):
            callers.append(threading.current_thread())
            return real_connect(sock, addr)

        monkeypatch.setattr(socket.socket, "connect", connect)
        for i in range(100):
            tx.record_step(i, i + 1, "gpu0", {"r": 1})
        assert tx.flush()
        # the caller never waits for the network: every connect is the sender's own thread's
        # (a check of who, not of how fast, so a loaded machine cannot fail it)
        assert callers and threading.main_thread() not in callers
        tx.close()
        assert tx.counters["dropped"] == 100 and tx.counters["sent"] == 0
        assert "cannot reach the step receiver" in caplog.text

    def test_addresses(self):
        assert parse_address("127.0.0.1:8791")[1] == ("127.0.0.1", 8791)
        assert parse_address("[::1]:9")[1] == ("::1", 9)
        for bad, why in (("8791", "no port"), ("host:http", "not a number"), ("host:0", "1..65535"), ("unix:", "socket path"), ("", "host:port")):
            with pytest.raises(ValueError, match=why):
                parse_address(bad)


# ---------------------------------------------------------------------- the whole path


class EngineServer:
    """vLLM's engine process in miniature: a thread runs the busy loop over a queue of new requests."""

    def __init__(self, core) -> None:
        self.core = core
        self.inbox: queue.Queue = queue.Queue()
        self.waiters: dict[str, tuple] = {}
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self) -> None:
        core = self.core
        while not self.stop.is_set():
            while not self.inbox.empty():
                req, loop, fut = self.inbox.get_nowait()
                self.waiters[req.request_id] = (loop, fut, req)
                core.add_request(req)
            if not (core.scheduler.has_requests() or core.batch_queue):
                time.sleep(0.001)
                continue
            outputs, _ = core.step_fn()
            for eco in (outputs or {}).values():
                for out in eco.outputs:
                    if out.finish_reason is not None and out.request_id in self.waiters:
                        loop, fut, req = self.waiters.pop(out.request_id)
                        loop.call_soon_threadsafe(fut.set_result, len(req.output_token_ids))

    async def generate(self, req) -> int:
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        self.inbox.put((req, loop, fut))
        return await fut

    def close(self) -> None:
        self.stop.set()
        self.thread.join(5)


def make_vllm_like_server(engine: EngineServer) -> FastAPI:
    app = FastAPI()

    @app.post("/v1/chat/completions")
    async def chat(request: HTTPRequest):
        body = json.loads(await request.body())
        base = request.headers.get("x-request-id") or os.urandom(16).hex()
        vid = f"chatcmpl-{base}-{os.urandom(4).hex()}"  # as vLLM >= 0.11 names it in the engine
        prompt = sum(len(m["content"].split()) for m in body["messages"])
        n = await engine.generate(Request(vid, list(range(prompt)), int(body["max_tokens"])))
        return JSONResponse({"id": f"chatcmpl-{base}", "object": "chat.completion", "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"}}], "usage": {"prompt_tokens": prompt, "completion_tokens": n, "total_tokens": prompt + n}})

    return app


def test_proxy_and_engine_steps_meet_in_the_meter(live_meter):
    core = EngineCore(base_s=0.004, per_token_s=0.0002, max_num_batched_tokens=512)
    engine = EngineServer(core)
    shapes = [(300, 12), (10, 12), (120, 20), (40, 6)]
    hook = None
    try:
        with serve(make_vllm_like_server(engine)) as up_url:
            proxy = create_proxy(up_url, meter=live_meter, steps_listen="127.0.0.1:0")
            relayed = []
            record_step = live_meter.record_step
            live_meter.record_step = lambda *a: (relayed.append(a), record_step(*a))  # a tee: the meter still gets every step
            hook = instrument_vllm(core, meter=proxy.steps.address)  # the engine process sends its steps to the proxy
            with serve(proxy) as url:

                def one(p, m):
                    msg = " ".join(["w"] * p)
                    return httpx.post(f"{url}/v1/chat/completions", json={"model": "fake/model", "messages": [{"role": "user", "content": msg}], "max_tokens": m}, timeout=30)

                results = []
                threads = [threading.Thread(target=lambda s=s: results.append(one(*s))) for s in shapes]
                for t in threads:
                    t.start()
                for t in threads:
                    t.join()
                assert sorted(r.status_code for r in results) == [200] * 4
                hook.meter.flush()
                deadline = time.monotonic() + 5
                while proxy.steps.counters["steps"] < hook.stats["steps"] and time.monotonic() < deadline:
                    time.sleep(0.01)
    finally:
        engine.close()
        uninstrument_vllm(core)
        if hook is not None:
            hook.meter.close()
        core.shutdown()
    assert hook.stats["steps"] > 10 and proxy.steps.counters["steps"] == hook.stats["steps"]
    assert live_meter.flush(15)
    recs = {r.prompt_tokens: r for r in live_meter.records}
    assert sorted(recs) == sorted(p for p, _ in shapes)
    for p, m in shapes:
        r = recs[p]
        assert r.output_tokens == m and r.method == "batch-fit" and r.route == "/v1/chat/completions"
    # the steps that reached the proxy's meter name exactly the proxy's requests, with each one's tokens
    tokens: dict[str, int] = {}
    for _, _, device, tok in relayed:
        assert device == "gpu0"
        for k, v in tok.items():
            tokens[k] = tokens.get(k, 0) + v
    assert tokens == {r.id: r.prompt_tokens + r.output_tokens - 1 for r in recs.values()}
