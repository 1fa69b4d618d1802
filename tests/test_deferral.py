"""The carbon-aware batch queue: the choice, the recorded decision, deadlines and the concurrency cap."""

from __future__ import annotations

import asyncio
import math
import os
import sqlite3
import stat
import threading

import numpy as np
import pytest

from wattspan.deferral import DeferralFull, DeferralQueue, choose_start
from wattspan.carbon.intensity import IntensityValue, ProfileProvider, ProviderConfigError

H = 3600.0
T0 = 1689325200.0 + 1800  # 2023-07-14T09:30Z


def test_choose_start_picks_the_cleanest_window_earliest_on_ties():
    v = np.array([300, 200, 100, 100, 250.0])
    assert choose_start(v, 4) == 2  # the earliest of two minima
    assert choose_start(v, 1) == 1  # only two starts allowed
    assert choose_start(v, 0) == 0 and choose_start(v, -3) == 0
    assert choose_start(v, 4, span=2) == 2  # mean(100, 100) is the cleanest two-period window
    # two-period windows: (100+300)/2 = 200, (300+90)/2 = 195, (90+400)/2 = 245: the middle one
    assert choose_start(np.array([100, 300, 90, 400.0]), 2, span=2) == 1
    assert choose_start(np.array([100, 300, 90, 400.0]), 2, span=1) == 2


class Forecast:
    name = "test"

    def __init__(self, values, step=H):
        self.values, self.step, self.calls = list(values), step, 0

    def forecast(self, zone, start_s, end_s):
        self.calls += 1
        n = int(math.ceil((end_s - math.floor(start_s / self.step) * self.step) / self.step))
        return [IntensityValue(self.values[min(i, len(self.values) - 1)], self.name, zone, math.floor(start_s / self.step) * self.step + i * self.step)
                for i in range(max(1, n))]


def test_plan_records_what_it_chose_and_why():
    clock = [T0]
    q = DeferralQueue(Forecast([300, 250, 120, 200, 90]), zone="GB", clock=lambda: clock[0])
    d = q.plan(deadline_s=T0 + 3.4 * H)  # by 12:54: starts now (09:30), 10:00, 11:00, 12:00 are allowed
    assert d.planned_start_s == math.floor(T0 / H) * H + 2 * H  # 11:00, the 120 g hour
    assert (d.intensity_now_g_per_kwh, d.intensity_planned_g_per_kwh) == (300, 120)
    assert d.expected_saving == pytest.approx(0.6) and "cleanest of 4 start(s)" in d.reason
    assert d.provider == "test" and d.zone == "GB"
    now = q.plan(deadline_s=T0 + 0.4 * H)
    assert now.planned_start_s == T0 and "no room" in now.reason
    dur = q.plan(deadline_s=T0 + 3.4 * H, duration_s=2 * H)  # must start by 10:54: now or 10:00
    assert dur.planned_start_s == math.floor(T0 / H) * H + H  # mean(250, 120) < mean(300, 250)
    assert q.plan(deadline_s=T0 + 3.6 * H).planned_start_s == math.floor(T0 / H) * H + 4 * H  # by 13:06: 13:00 (90 g)
    assert d.to_dict()["planned_start"] == "2023-07-14T11:00:00Z"


def test_offline_profile_plans_and_an_unknown_zone_fails_at_start():
    q = DeferralQueue(zone="US-CAL-CISO", clock=lambda: T0)
    d = q.plan(deadline_s=T0 + 24 * H)
    # California's cleanest hours are around 20:00 UTC (noon PST), the profile's trough
    assert 17 <= (d.planned_start_s // H) % 24 <= 23 and d.intensity_planned_g_per_kwh < d.intensity_now_g_per_kwh
    assert d.provider == "profile"
    with pytest.raises(ProviderConfigError, match="atlantis"):
        DeferralQueue(ProfileProvider(), zone="atlantis")
    with pytest.raises(ValueError, match="max_concurrency"):
        DeferralQueue(max_concurrency=0)


def test_queue_runs_jobs_at_their_time_with_a_concurrency_cap():
    clock = [T0]
    q = DeferralQueue(Forecast([100, 300, 300]), zone="GB", max_concurrency=2, clock=lambda: clock[0], poll_s=0.01, max_jobs=5)
    running, peak, lock = [0], [0], threading.Lock()

    async def job():
        with lock:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
        await asyncio.sleep(0.05)
        with lock:
            running[0] -= 1
        return "ok"

    def sync_job():
        return 42

    jobs = [q.submit(job, deadline_s=T0 + 2 * H, name=f"j{i}") for i in range(4)] + [q.submit(sync_job, deadline_s=T0 + 2 * H)]
    with pytest.raises(DeferralFull):
        q.submit(job, deadline_s=T0 + H)
    asyncio.run(q.run_until_idle(timeout_s=10))
    assert [j.status for j in jobs] == ["done"] * 5 and jobs[0].result == "ok" and jobs[-1].result == 42
    assert peak[0] == 2  # never more than the cap
    assert q.counters["ran"] == 5 and q.counters["deferred"] == 0  # now was cleanest
    # a later, cleaner hour: the job waits for it
    q2 = DeferralQueue(Forecast([300, 100]), zone="GB", clock=lambda: clock[0], poll_s=0.01)
    j = q2.submit(sync_job, deadline_s=T0 + 2 * H)
    assert j.decision.planned_start_s > T0 and q2.counters["deferred"] == 1

    async def later():
        task = asyncio.create_task(q2.run())
        await asyncio.sleep(0.1)
        assert j.status == "planned"  # not yet: the clock has not reached 10:00
        clock[0] = j.decision.planned_start_s
        for _ in range(200):
            await asyncio.sleep(0.01)
            if j.status == "done":
                break
        task.cancel()

    asyncio.run(later())
    assert j.status == "done" and j.decision.started_s == j.decision.planned_start_s


def test_a_failing_forecast_or_job_is_recorded_not_raised():
    class Broken:
        name = "broken"

        def forecast(self, *a):
            raise OSError("no network")

    q = DeferralQueue(Broken(), zone="GB", clock=lambda: T0, poll_s=0.01)

    def boom():
        raise RuntimeError("bad batch")

    j = q.submit(boom, deadline_s=T0 + 6 * H)
    assert j.decision.planned_start_s == T0 and "no forecast" in j.decision.reason
    asyncio.run(q.run_until_idle(timeout_s=5))
    assert j.status == "failed" and "bad batch" in j.error and q.counters["failed"] == 1


def test_a_deferred_jobs_captured_response_keeps_at_most_capture_bytes_in_memory():
    import tracemalloc

    from wattspan.deferral import CAPTURE_BYTES, capture

    chunk = 1 << 20

    async def app(scope, receive, send):  # streams 24 MiB, a fresh chunk each time
        await receive()
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
        for _ in range(24):
            await send({"type": "http.response.body", "body": b"x" * chunk, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    tracemalloc.start()
    try:
        out = asyncio.run(capture(app, {"type": "http", "method": "POST", "path": "/v1/batch", "headers": []}, b"{}"))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert out["status"] == 200 and len(out["body"]) == CAPTURE_BYTES
    assert peak < 8 * chunk  # the whole stream kept would be 24 MiB


def test_deferred_request_bodies_are_bounded_in_all_and_not_kept_after_the_run():
    from wattspan.deferral import defer_request

    q = DeferralQueue(zone="FR", max_held_bytes=1000, poll_s=0.01)
    seen = []

    async def app(scope, receive, send):
        seen.append((await receive())["body"])
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"done"})

    async def post(body: bytes) -> int:
        msgs = iter([{"type": "http.request", "body": body, "more_body": False}])
        out = []

        async def receive():
            return next(msgs)

        async def send(m):
            out.append(m)

        scope = {"type": "http", "method": "POST", "path": "/v1/batch", "headers": [(b"x-wattspan-deadline-s", b"0")]}
        await defer_request(q, app, scope, receive, send)
        return out[0]["status"]

    async def main():
        first, second = await post(b"a" * 600), await post(b"b" * 600)  # 1200 bytes would wait: the second is refused
        assert (first, second) == (202, 503) and q.held_bytes == 600
        await q.run_until_idle(timeout_s=30)
        assert seen == [b"a" * 600] and q.held_bytes == 0
        assert all(j.fn is None and j.status == "done" for j in q.jobs.values())  # the body is not kept
        assert await post(b"c" * 600) == 202  # room again

    asyncio.run(main())


def test_submit_async_plans_off_the_event_loop():
    """A live provider's forecast (up to its timeout) must not run on the server's event loop."""
    import threading

    seen = []

    class Slow(Forecast):
        def forecast(self, zone, start_s, end_s):
            seen.append(threading.get_ident())
            return super().forecast(zone, start_s, end_s)

    q = DeferralQueue(Slow([300, 120]), zone="GB", clock=lambda: T0)

    async def main():
        loop_thread = threading.get_ident()
        job = await q.submit_async(lambda: None, deadline_s=T0 + 3 * H, name="batch")
        return loop_thread, job

    loop_thread, job = asyncio.run(main())
    assert seen and all(t != loop_thread for t in seen)
    assert q.get(job.id) is job and job.decision.intensity_planned_g_per_kwh == 120


def _asgi_call(app, method: str, path: str, body: bytes = b"", headers=(), query: bytes = b""):
    """One request through an ASGI app, in the running loop: (status, parsed JSON body)."""
    import json

    msgs = iter([{"type": "http.request", "body": body, "more_body": False}])
    out: list = []

    async def receive():
        return next(msgs, {"type": "http.disconnect"})

    async def send(m):
        out.append(m)

    async def go():
        scope = {"type": "http", "method": method, "path": path, "raw_path": path.encode(), "query_string": query,
                 "headers": list(headers), "client": ("127.0.0.1", 5000), "server": ("127.0.0.1", 8000), "state": {}}
        await app(scope, receive, send)
        return out[0]["status"], json.loads(b"".join(m.get("body", b"") for m in out[1:]) or b"null")

    return go()


def test_deferred_requests_survive_a_restart(tmp_path):
    """A deferred request is written to the store before its 202: a restart before its hour resumes it, with
    its method, path, query, headers and body; it runs once, and its outcome is still readable after another restart."""
    from wattspan.deferral import DeferralMiddleware, DeferralStore

    store = tmp_path / "w.sqlite.deferral.sqlite"
    clock = [T0]
    seen = []

    async def app(scope, receive, send):
        seen.append((scope["method"], scope["path"], scope["query_string"], dict(scope["headers"]).get(b"x-team"),
                     (await receive())["body"]))
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
        await send({"type": "http.response.body", "body": b"ran"})

    def life():
        q = DeferralQueue(Forecast([300, 100]), zone="GB", clock=lambda: clock[0], poll_s=0.01, store=store)
        return q, DeferralMiddleware(app, queue=q)

    async def first():
        q, mw = life()
        status, body = await _asgi_call(mw, "POST", "/v1/batch", b'{"n": 1}', [(b"x-wattspan-deadline-s", b"7200"),
                                        (b"x-team", b"a,b")], b"x=1&y=%22")
        assert status == 202 and q.get(body["job"]).decision.planned_start_s == T0 + 1800  # 10:00, the cleaner hour
        mw._runner.cancel()
        q.store.close()  # the process stops before 10:00
        return body["job"]

    jid = asyncio.run(first())
    assert seen == [] and stat.S_IMODE(os.stat(store).st_mode) == 0o600

    async def second():
        q, mw = life()
        job = q.get(jid)
        assert q.counters["resumed"] == 1 and job.status == "planned" and job.decision.planned_start_s == T0 + 1800
        assert q.held_bytes == len(b'{"n": 1}')
        clock[0] = T0 + 1800
        await q.run_until_idle(timeout_s=30)
        assert job.status == "done" and job.result["body"] == "ran" and q.held_bytes == 0
        q.store.close()

    asyncio.run(second())
    assert seen == [("POST", "/v1/batch", b"x=1&y=%22", b"a,b", b'{"n": 1}')]
    with sqlite3.connect(store) as db:  # once run, neither the request's headers nor its body are kept
        assert db.execute("SELECT request, body FROM deferred_jobs").fetchall() == [("{}", None)]

    async def third():
        q, mw = life()
        assert q.counters["resumed"] == 0  # done: not run again
        status, body = await _asgi_call(mw, "GET", f"/wattspan/jobs/{jid}")
        assert status == 200 and body["status"] == "done" and body["response"]["body"] == "ran"
        q.store.close()

    asyncio.run(third())
    assert len(seen) == 1
    with pytest.raises(ValueError, match="not a wattspan deferral store"):
        bad = tmp_path / "notes.sqlite"
        bad.write_text("not a database " * 100)
        DeferralStore(bad)


def test_a_queue_without_a_store_keeps_jobs_in_memory_only(tmp_path, monkeypatch):
    from wattspan.deferral import DeferralMiddleware, store_beside

    monkeypatch.delenv("WATTSPAN_LEDGER", raising=False)
    assert DeferralMiddleware(lambda *a: None, zone="GB").queue.store is None
    monkeypatch.setenv("WATTSPAN_LEDGER", str(tmp_path / "w.sqlite"))
    mw = DeferralMiddleware(lambda *a: None, zone="GB")
    assert mw.queue.store is not None and mw.queue.store.path == str(tmp_path / "w.sqlite") + ".deferral.sqlite"
    mw.queue.store.close()
    assert store_beside(None) is None


def test_a_resumed_request_runs_at_startup_with_the_lifespan_state(tmp_path):
    """After a restart, a stored deferred request runs once the server has started, with no request needed to
    wake the queue, and its endpoint sees the app's lifespan state (``request.state``) as a live request would."""
    import contextlib
    import time

    import httpx
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    from .conftest import serve
    from wattspan.deferral import DeferralMiddleware

    store = tmp_path / "w.sqlite.deferral.sqlite"
    clock = [T0]
    seen: list = []

    async def batch(request: Request) -> JSONResponse:
        seen.append(getattr(request.state, "model", None))
        return JSONResponse({"model": getattr(request.state, "model", None)})

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield {"model": "loaded at startup"}

    def life():
        q = DeferralQueue(Forecast([300, 100]), zone="GB", clock=lambda: clock[0], poll_s=0.01, store=store)
        app = Starlette(routes=[Route("/v1/batch", batch, methods=["POST"])], lifespan=lifespan)
        return q, DeferralMiddleware(app, queue=q)

    q, mw = life()
    with serve(mw) as url:
        r = httpx.post(f"{url}/v1/batch", content=b"{}", headers={"x-wattspan-deadline-s": "7200"})
        assert r.status_code == 202
        jid = r.json()["job"]
    q.store.close()
    assert seen == []  # planned for the cleaner hour: the process stopped before it

    clock[0] = T0 + 1800  # the restart comes after the planned start
    q, mw = life()
    assert q.get(jid).status == "planned"
    with serve(mw):
        deadline = time.monotonic() + 20
        while q.get(jid).status != "done" and time.monotonic() < deadline:
            time.sleep(0.02)
    q.store.close()
    assert q.get(jid).status == "done", q.get(jid).to_dict()
    assert seen == ["loaded at startup"]


def test_the_state_kept_for_resumed_requests_is_the_lifespans_not_a_requests():
    """The lifespan's state dict is kept by reference (the app fills it at startup); without a lifespan, the
    first request's state is copied, so what that request writes to ``request.state`` reaches no resumed one."""
    q = DeferralQueue(Forecast([100]), zone="GB")
    own = {"model": "m"}
    q.note_state({"type": "http", "state": own})
    own["user"] = "set by that request"
    assert q.lifespan_state == {"model": "m"}
    q2 = DeferralQueue(Forecast([100]), zone="GB")
    life: dict = {}
    q2.note_state({"type": "lifespan", "state": life})
    life["model"] = "loaded at startup"
    assert q2.lifespan_state is life


def test_a_deadline_in_seconds_from_now_or_past_a_year_is_refused():
    import time

    q = DeferralQueue(zone="GB", max_concurrency=1)
    # seconds from now (the HTTP header's unit) passed as deadline_s ran the job at once, silently
    with pytest.raises(ValueError, match="unix time"):
        q.submit(lambda: 1, deadline_s=3600, duration_s=60)
    # a deadline past the forecasts was accepted, then every decisions() call raised on its year
    with pytest.raises(ValueError, match="at most"):
        q.submit(lambda: 1, deadline_s=time.time() + 1e12)
    assert q.decisions() == [] or all(d.deadline_s < time.time() + 4e7 for d in q.decisions())
