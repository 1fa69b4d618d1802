"""Nothing lost, nothing miscounted: hostile values and bounds, each through the real path.

Each test names the numbered defect of the reliability issue it keeps mended.
"""

from __future__ import annotations

import math

import httpx
import pytest
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from wattspan import EnergyMiddleware, RequestRecord, set_tokens
from wattspan.meter import context as _context
from wattspan.export.ledger import Ledger
from wattspan.meter import BatchCallback, RecordCallback

from .conftest import serve


def _rec(i: int, **kw) -> RequestRecord:
    base = dict(id=f"r{i}", device="gpu0", start_ns=i, end_ns=i + 1, energy_j=1.0, dynamic_j=0.5, idle_j=0.5, device_s=0.1)
    return RequestRecord(**{**base, **kw})


# 1. one huge token count must not block the ledger --------------------------------------------


def test_a_huge_token_count_is_clipped_where_it_enters_and_the_ledger_keeps_committing(live_meter, tmp_path):
    ledger = Ledger(tmp_path / "l.sqlite")
    live_meter.add_sink(ledger)

    async def huge(request):
        set_tokens(prompt_tokens=1e30, output_tokens=2**70)
        return PlainTextResponse("ok")

    async def ok(request):
        set_tokens(prompt_tokens=12, output_tokens=3)
        return PlainTextResponse("ok")

    app = Starlette(routes=[Route("/huge", huge), Route("/ok", ok)])
    app.add_middleware(EnergyMiddleware, meter=live_meter)
    before = dict(_context.counters)
    with serve(app) as url, httpx.Client(base_url=url) as c:
        assert c.get("/huge").status_code == 200
        codes = [c.get("/ok").status_code for _ in range(100)]
    assert codes == [200] * 100
    assert live_meter.flush(10) and ledger.flush(10)
    rows = ledger.query()
    ledger.close()
    assert len(rows) == 101
    big = [r for r in rows if r["route"] == "/huge"]
    assert [(r["prompt_tokens"], r["output_tokens"]) for r in big] == [(_context.MAX_TOKENS, _context.MAX_TOKENS)]
    assert _context.counters["tokens_clipped"] == before["tokens_clipped"] + 2


def test_the_ledger_stores_a_record_the_database_refuses_clipped_and_keeps_going(tmp_path):
    ledger = Ledger(tmp_path / "l.sqlite")
    ledger.write([_rec(0, prompt_tokens=2**70, energy_j=math.nan, model="bad\udcff")])
    ledger.write([_rec(i) for i in range(1, 10_001)])
    assert ledger.flush(30)
    st = ledger.stats()
    rows = ledger.query()
    ledger.close()
    assert st["written"] == 10_001 and st["sanitized"] == 1 and st["errors"] == 0 and st["dropped"] == 0
    bad = rows[0]
    assert bad["id"] == "r0" and bad["prompt_tokens"] == 2**63 - 1 and bad["energy_j"] == 0.0


def test_a_refused_record_inside_a_batch_stores_each_record_once(tmp_path):
    # executemany stops at the bad row with the rows before it already inserted: the
    # row-by-row retry must not store those a second time
    ledger = Ledger(tmp_path / "l.sqlite")
    ledger.write([_rec(0), _rec(1), _rec(2, prompt_tokens=2**70), _rec(3)])
    assert ledger.flush(30)
    st = ledger.stats()
    rows = ledger.query()
    ledger.close()
    assert [r["id"] for r in rows] == ["r0", "r1", "r2", "r3"]
    assert st["written"] == 4 and st["sanitized"] == 1 and st["dropped"] == 0


def test_a_record_that_cannot_be_stored_is_counted_dropped_not_written(tmp_path, monkeypatch):
    import wattspan.export.ledger.writer as ledger_mod

    monkeypatch.setattr(ledger_mod, "_sanitize", lambda row: row)  # as if clipping could not mend it
    ledger = Ledger(tmp_path / "l.sqlite")
    ledger.write([_rec(0), _rec(1, prompt_tokens=2**70), _rec(2)])
    assert ledger.flush(30)
    st = ledger.stats()
    rows = ledger.query()
    ledger.close()
    assert [r["id"] for r in rows] == ["r0", "r2"]
    assert (st["written"], st["dropped"], st["sanitized"]) == (2, 1, 0)  # written + dropped = what was given


# 10. NaN or inf token counts must never turn a response into a 500 -----------------------------


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf, "12x", object(), -5, True])
def test_set_tokens_with_a_non_number_never_breaks_the_request(live_meter, value):
    async def ep(request):
        set_tokens(prompt_tokens=value, output_tokens=value, model="m")
        return PlainTextResponse("ok")

    app = Starlette(routes=[Route("/x", ep)])
    app.add_middleware(EnergyMiddleware, meter=live_meter)
    with serve(app) as url:
        assert httpx.get(f"{url}/x").status_code == 200
    assert live_meter.flush(10)
    (rec,) = live_meter.records
    assert rec.prompt_tokens == rec.output_tokens == 0 and rec.model == "m"


def test_a_huge_integer_token_count_is_clipped_and_logged_without_a_logging_error(monkeypatch, caplog):
    # str() of an integer beyond 4300 digits raises: the log line must not try it
    monkeypatch.setitem(_context.counters, "tokens_clipped", 0)
    with caplog.at_level("WARNING", logger="wattspan"):
        assert _context.bound_tokens(10**5000) == _context.MAX_TOKENS
        assert _context.bound_tokens(-(10**5000)) == 0
    assert any("clipped" in m and "bits" in m for m in caplog.messages)


# 3. unrelated apps of one user must not merge -------------------------------------------------


def test_two_unrelated_apps_on_one_host_do_not_share_their_devices(tmp_path):
    """Two servers on different ports, each metering its own simulated gpu0, one peer directory."""
    import asyncio

    from wattspan.export.ledger import query

    from .test_durability import _start

    procs = [_start(tmp_path, tmp_path / f"app{i}.sqlite") for i in range(2)]
    try:
        async def load():
            async with httpx.AsyncClient(timeout=10) as c:
                for _ in range(8):  # both apps busy at the same time
                    await asyncio.gather(*(c.get(f"http://127.0.0.1:{port}/work") for _, port in procs for _ in range(10)))

        asyncio.run(load())
        stats = [httpx.get(f"http://127.0.0.1:{port}/stats", timeout=30).json() for _, port in procs]
    finally:
        for p, _ in procs:
            p.terminate()
        for p, _ in procs:
            p.communicate(timeout=60)
    for i, s in enumerate(stats):
        assert s["peer_requests"] == 0, s  # the other app's requests never share this app's device
        billed = sum(r["energy_j"] for r in query(tmp_path / f"app{i}.sqlite") if r["route"] == "/work")
        assert billed > 0
        # every joule measured is either billed to this app's requests or unattributed: none to the other app
        assert billed + s["unattributed_j"] == pytest.approx(s["measured_j"], rel=0.02)


# 4. a lost peer datagram must not leave phantom requests in flight ---------------------------


def test_lost_peer_messages_leave_no_phantom_request_and_the_stretch_is_flagged(tmp_path):
    import time

    from wattspan import Meter
    from wattspan.meter.peers import Peers
    from wattspan.carbon import CarbonModel
    from wattspan.sources.replay import ReplaySource

    from .conftest import constant_trace

    records = []
    meter = Meter(sources=[ReplaySource([constant_trace(100.0)], loop=True)], idle_w=40.0, carbon=CarbonModel(intensity_g_per_kwh=400.0),
                  sinks=[RecordCallback(records.append)], period_s=1.0, lag_s=0.05, max_delay_s=1.0, peers=tmp_path / "peers")
    try:
        assert meter.wait_ready(10) and meter.peers is not None
        worker = Peers(meter.peers.dir, name="999001")  # another worker on the same GPU, flooding its peer
        t = time.monotonic_ns()
        for i in range(1500):
            worker.broadcast([(0, f"p{i}", "gpu0", t)])
        for i in range(1500):
            worker.broadcast([(1, f"p{i}", t + 1000)])
        assert worker.dropped > 0  # the meter's socket buffer overflowed: real lost datagrams
        time.sleep(1.5)  # the meter takes what did arrive
        worker.broadcast([(3, time.monotonic_ns())])  # the worker's next message shows the gap
        time.sleep(1.5)
        assert meter.counters.get("peer_gaps", 0) >= 1 and meter.peer_gaps
        assert not meter._table.peers and not any(meter._table.peer[r] for r in meter._table.row.values()), "phantom peer requests left in flight"
        t = time.monotonic_ns()
        meter.begin("mine", "gpu0", t)
        meter.end("mine", "gpu0", t + 500_000_000)
        time.sleep(0.6)
        assert meter.flush(10)
    finally:
        meter.close()
    (mine,) = [r for r in records if r.id == "mine"]
    assert mine.energy_j == pytest.approx(100.0 * 0.5, rel=0.1)  # alone on the GPU: all of its 100 W


# 11. a peer directory another user can reach is refused ----------------------------------------


def test_a_peer_directory_of_another_user_is_refused_and_an_open_one_of_ours_closed(tmp_path, monkeypatch, caplog):
    import os
    import stat

    from wattspan import Meter
    from wattspan.meter import peers as _peers
    from wattspan.sources.replay import ReplaySource

    from .conftest import constant_trace

    open_dir = tmp_path / "open"
    open_dir.mkdir()
    os.chmod(open_dir, 0o777)
    _peers.Peers(open_dir, name="4242").close()
    assert stat.S_IMODE(os.stat(open_dir).st_mode) == 0o700 and "closed it to mode 700" in caplog.text
    theirs = tmp_path / "theirs"
    theirs.mkdir(mode=0o700)
    if os.getuid() == 0:
        os.chown(theirs, 65534, 65534)  # really another user's
    else:
        monkeypatch.setattr(_peers, "_uid", lambda: os.getuid() + 1)
    with pytest.raises(PermissionError, match="belongs to another user"):
        _peers.Peers(theirs)
    link = tmp_path / "link"
    link.symlink_to(theirs)
    with pytest.raises(PermissionError, match="not a directory"):
        _peers.Peers(link)
    meter = Meter(sources=[ReplaySource([constant_trace(100.0)])], idle_w=40.0, peers=theirs)
    try:
        assert meter.wait_ready(10)
        assert meter.peers is None and meter.counters["peers_refused"] == 1
        assert "not sharing the device" in caplog.text and str(theirs) in caplog.text
    finally:
        meter.close()


def test_sockets_of_another_user_in_the_peer_directory_are_ignored_and_kept(tmp_path):
    import os
    import socket

    from wattspan.meter.peers import Peers

    if os.getuid() != 0:
        pytest.skip("needs to chown a socket to another user")
    mine = Peers(tmp_path / "peers", name="1001")
    other = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    path = mine.dir / "1002.sock"
    other.bind(str(path))
    os.chown(path, 65534, 65534)
    try:
        assert mine.peers() == [] and mine.refused == 1
        mine.broadcast([(3, 1)])
        assert path.exists()
    finally:
        other.close()
        mine.close()


# 6. batch steps are bounded, and the step relay is authenticated and size-limited -------------


def test_batch_steps_beyond_the_bounds_are_dropped_and_counted(caplog):
    from wattspan import Meter
    from wattspan.sources.replay import ReplaySource

    from .conftest import constant_trace

    meter = Meter(sources=[ReplaySource([constant_trace(100.0)])], idle_w=40.0, autostart=False)
    meter.record_step(0, 10, "gpu0", {f"r{i}": 1 for i in range(1_000_000)})  # one step naming a million requests
    assert meter.counters["dropped_steps"] == 1 and not meter._events
    assert "batch step dropped" in caplog.text
    meter.record_step(0, 10, "gpu0", {"a": float("nan")})
    meter.record_step(0, 10, "gpu0", {"a": 1e30})
    assert meter.counters["dropped_steps"] == 3
    base = 5_000_000_000
    for i in range(3000):  # 3000 steps within one second of step time
        meter.record_step(base + i * 100_000, base + i * 100_000 + 50_000, "gpu0", {"a": 1})
    assert len(meter._events) == meter.max_steps_per_s == 2000
    assert meter.counters["dropped_steps"] == 3 + 1000
    meter.record_step(base + 2 * 10**9, base + 2 * 10**9 + 1, "gpu0", {"a": 1})  # the next second is admitted again
    assert len(meter._events) == 2001


def test_the_batch_hook_never_raises_into_the_step_loop():
    # wattspan.integrations.batch.record_step called int() on the times first: NaN, inf, text and None raised
    # into the model server's loop, where Meter.record_step drops and counts them; a generator of tokens raised too
    from wattspan import Meter
    from wattspan.integrations.batch import record_step
    from wattspan.sources.replay import ReplaySource

    from .conftest import constant_trace

    meter = Meter(sources=[ReplaySource([constant_trace(100.0)])], idle_w=40.0, autostart=False)
    for bad in (float("nan"), float("inf"), "abc", None):
        record_step(bad, 10, {"a": 1}, meter=meter)
    assert meter.counters["dropped_steps"] == 4 and not meter._events
    record_step(0, 10, (r for r in ["a", "b"]), meter=meter)  # ids, not pairs: not a mapping
    assert meter.counters["dropped_steps"] == 5
    record_step(0, 10, iter([("a", 2), ("b", 1)]), meter=meter)  # pairs make one
    assert len(meter._events) == 1 and meter._events[0][4] == {"a": 2, "b": 1}


def _wait(cond, timeout=5.0):
    import time

    deadline = time.monotonic() + timeout
    while not cond() and time.monotonic() < deadline:
        time.sleep(0.01)
    return cond()


def _closed(s) -> bool:
    s.settimeout(5)
    try:
        return s.recv(10) == b""
    except ConnectionResetError:
        return True


def test_the_tcp_step_relay_takes_only_authenticated_bounded_steps():
    import json
    import socket

    from wattspan.integrations._relay import StepReceiver, StepSender, parse_address

    got = []

    class Sink:
        def record_step(self, s, e, d, t):
            got.append((s, e, d, t))

    rx = StepReceiver(Sink(), "127.0.0.1:0")
    try:
        addr = parse_address(rx.address)[1]
        with socket.create_connection(addr) as s:  # another local user: no token
            s.sendall(b'{"s": 1, "e": 2, "d": "gpu0", "t": {"x": 1}}\n' * 30)
            assert _closed(s)  # closed on us
        with socket.create_connection(addr) as s:
            s.sendall(b'{"auth": "guessed-wrong-token-0000"}\n{"s": 1, "e": 2, "d": "gpu0", "t": {"x": 1}}\n')
            assert _closed(s)
        assert _wait(lambda: rx.counters["auth_failures"] == 2) and got == []
        with socket.create_connection(addr) as s:  # the right token, but a step naming 100k requests
            s.sendall(b'{"auth": "%s"}\n' % rx.token.encode())
            s.sendall(json.dumps({"s": 1, "e": 2, "d": "gpu0", "t": {f"r{i}": 1 for i in range(100_000)}}).encode() + b"\n")
            assert _closed(s)  # a line over 1 MiB closes the connection
        with socket.create_connection(addr) as s:
            s.sendall(b'{"auth": "%s"}\n' % rx.token.encode())
            s.sendall(json.dumps({"s": 1, "e": 2, "d": "gpu0", "t": {f"r{i}": 1 for i in range(5000)}}).encode() + b"\n")
        assert _wait(lambda: rx.counters["bad_lines"] == 2) and got == []
        tx = StepSender(rx.address)  # the same user's sender finds the token on its own
        tx.record_step(10, 20, "gpu0", {"a": 3})
        assert tx.flush() and _wait(lambda: got == [(10, 20, "gpu0", {"a": 3})])
        tx.close()
    finally:
        rx.close()


def test_the_tcp_step_relay_bounds_silent_and_surplus_connections():
    # a local user who opens connections and never authenticates holds no thread for long,
    # and no more than max_connections at once
    import socket

    from wattspan.integrations._relay import StepReceiver, StepSender, parse_address

    got = []

    class Sink:
        def record_step(self, s, e, d, t):
            got.append((s, e, d, t))

    rx = StepReceiver(Sink(), "127.0.0.1:0")
    rx.max_connections, rx.auth_timeout_s = 2, 0.3
    try:
        addr = parse_address(rx.address)[1]
        silent = [socket.create_connection(addr) for _ in range(2)]
        assert _wait(lambda: len(rx._conns) == 2)
        with socket.create_connection(addr) as third:  # over the cap: closed at once
            assert _closed(third)
        for s in silent:  # said nothing within auth_timeout_s: closed
            assert _closed(s)
            s.close()
        assert _wait(lambda: rx.counters["auth_failures"] == 3 and not rx._conns)
        tx = StepSender(rx.address)  # an authenticated sender is served, and may stay idle
        tx.record_step(10, 20, "gpu0", {"a": 3})
        assert tx.flush() and _wait(lambda: got == [(10, 20, "gpu0", {"a": 3})])
        import time

        time.sleep(0.6)
        tx.record_step(30, 40, "gpu0", {"b": 1})
        assert tx.flush() and _wait(lambda: len(got) == 2)
        assert rx.counters["auth_failures"] == 3 and rx.counters["connections"] == 3
        tx.close()
    finally:
        rx.close()


def test_the_unix_step_relay_is_owner_only(tmp_path):
    import os
    import socket
    import stat

    from wattspan.integrations._relay import StepReceiver

    class Sink:
        def record_step(self, *a):
            pass

    path = tmp_path / "steps.sock"
    rx = StepReceiver(Sink(), f"unix:{path}")
    try:
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        if os.getuid() == 0:  # another user really cannot connect
            pid = os.fork()
            if pid == 0:
                try:
                    os.setgid(65534)
                    os.setuid(65534)
                    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                        s.connect(str(path))
                    os._exit(1)
                except PermissionError:
                    os._exit(0)
                except BaseException:
                    os._exit(2)
            assert os.waitpid(pid, 0)[1] == 0
    finally:
        rx.close()


# 7. every label a client can set is bounded in cardinality and printable -----------------------


def test_client_set_models_are_capped_and_printable_in_records_metrics_and_the_report(live_meter, tmp_path):
    import asyncio
    import io

    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader

    from wattspan.cli.report import run_report
    from wattspan.export.otel import EnergyMetrics

    reader = InMemoryMetricReader()
    metrics = EnergyMetrics(MeterProvider(metric_readers=[reader]))
    live_meter.add_sink(metrics)
    ledger = Ledger(tmp_path / "l.sqlite")
    live_meter.add_sink(ledger)

    async def ep(request):
        return PlainTextResponse("ok")

    app = Starlette(routes=[Route("/x", ep)])
    app.add_middleware(EnergyMiddleware, meter=live_meter, max_models=50)
    # h11: httptools (the `serve` extra) refuses control bytes and unknown methods itself, before any app
    with serve(app, http="h11") as url:
        port = int(url.rsplit(":", 1)[1])

        async def raw(i: int) -> bytes:
            reader_, writer = await asyncio.open_connection("127.0.0.1", port)
            model = b"m%d\x1b[31m\x07" % i
            method = b"GET" if i % 2 else b"BREW%d" % i
            writer.write(method + b" /x HTTP/1.1\r\nhost: a\r\nx-model: " + model + b"\r\nconnection: close\r\n\r\n")
            data = await reader_.read()
            writer.close()
            return data

        async def all_():
            for k in range(0, 400, 50):
                await asyncio.gather(*(raw(i) for i in range(k, k + 50)))

        asyncio.run(all_())
    assert live_meter.flush(10) and ledger.flush(10)
    models = {r.model for r in live_meter.records}
    assert len(live_meter.records) >= 300
    assert len(models) <= 51 and "other" in models
    assert all(c.isprintable() and ord(c) < 127 for m in models for c in m)
    assert {r.http_method for r in live_meter.records} <= {"GET", "_OTHER"}
    data = reader.get_metrics_data()
    label_sets = {
        tuple(sorted(p.attributes.items()))
        for rm in data.resource_metrics for sm in rm.scope_metrics for m in sm.metrics if m.name == "wattspan.energy"
        for p in m.data.data_points
    }
    assert 0 < len(label_sets) <= 2 * 51  # models x methods, bounded whatever the clients send
    out = io.StringIO()
    assert run_report(tmp_path / "l.sqlite", by="model", fmt="table", out=out) == 0
    assert "\x1b" not in out.getvalue() and "\x07" not in out.getvalue()
    ledger.close()


# 9. a device the sources do not meter ------------------------------------------------------------


def test_requests_on_a_device_no_source_meters_are_settled_counted_and_logged_once(live_meter, caplog):
    import logging

    caplog.set_level(logging.INFO, logger="wattspan")

    async def ep(request):
        return PlainTextResponse("ok")

    app = Starlette(routes=[Route("/x", ep)])
    app.add_middleware(EnergyMiddleware, meter=live_meter, device="gpu9")  # the meter only has gpu0
    with serve(app) as url, httpx.Client(base_url=url) as c:
        codes = [c.get("/x").status_code for _ in range(200)]
    assert codes == [200] * 200
    assert live_meter.flush(10)
    assert len(live_meter.records) == 200 and live_meter.stats()["inflight"] == 0
    assert all(r.device == "gpu9" and r.energy_j == 0 and r.sensor == "none" and r.coverage == 0 for r in live_meter.records)
    assert live_meter.counters["unmetered_device"] == 200
    lines = [r for r in caplog.records if "gpu9" in r.getMessage()]
    assert len(lines) == 1 and "gpu0" in lines[0].getMessage()


# 13. a 500 raised by an endpoint carries the request id -----------------------------------------


def test_a_500_raised_by_the_endpoint_carries_the_request_id(live_meter, capfd):
    async def boom(request):
        raise RuntimeError("the endpoint failed")

    async def ok(request):
        return PlainTextResponse("ok")

    app = Starlette(routes=[Route("/boom", boom), Route("/ok", ok)])
    app.add_middleware(EnergyMiddleware, meter=live_meter, request_id_header="x-request-id")
    with serve(app) as url:
        r = httpx.get(f"{url}/boom")  # the server closes this connection after a 500, as without wattspan
        after = httpx.get(f"{url}/ok")
    assert r.status_code == 500 and r.text == "Internal Server Error"
    assert after.status_code == 200  # the server keeps serving
    assert live_meter.flush(10)
    by_id = {rec.id: rec for rec in live_meter.records}
    assert r.headers["x-request-id"] in by_id and by_id[r.headers["x-request-id"]].status_code == 500
    assert "the endpoint failed" in capfd.readouterr().err  # the server still logs it as the error it is


def test_an_apps_own_error_answer_is_left_as_it_sends_it(live_meter):
    # with request_id_header set the middleware answered every raised error with its own plain 500, replacing
    # a FastAPI exception handler's answer (a JSON 503 with Retry-After) and debug tracebacks
    from starlette.responses import JSONResponse

    async def boom(request):
        raise RuntimeError("the endpoint failed")

    async def handler(request, exc):
        return JSONResponse({"error": "try later"}, status_code=503, headers={"retry-after": "7"})

    for kind in ("handler", "debug"):
        app = Starlette(routes=[Route("/boom", boom)], debug=kind == "debug",
                        exception_handlers={Exception: handler} if kind == "handler" else {})
        app.add_middleware(EnergyMiddleware, meter=live_meter, request_id_header="x-request-id")
        with serve(app) as url:
            r = httpx.get(f"{url}/boom")
        if kind == "handler":
            assert r.status_code == 503 and r.json() == {"error": "try later"} and r.headers["retry-after"] == "7"
        else:
            assert r.status_code == 500 and "RuntimeError" in r.text  # Starlette's debug page
    assert live_meter.flush(10)
    assert sum(rec.status_code == 500 for rec in live_meter.records) >= 2  # metered as the errors they were


def test_drain_flushes_the_sinks_that_buffer_within_the_timeout(live_meter, tmp_path):
    import time

    ledger = Ledger(tmp_path / "l.sqlite")
    fh = open(tmp_path / "ids.txt", "w", buffering=1 << 20)
    live_meter.add_sink(ledger)
    live_meter.add_sink(RecordCallback(lambda rec: fh.write(rec.id + "\n")))
    live_meter.add_sink(BatchCallback(lambda recs: None))
    t = time.monotonic_ns()
    for i in range(50):
        live_meter.begin(f"d{i}", "gpu0", t)
        live_meter.end(f"d{i}", "gpu0", t + 1_000_000)
    out = live_meter.drain(10)
    assert out == {"unfinished": 0, "sinks_unflushed": 0}
    assert len(ledger.query()) == 50  # committed, not just queued
    ledger.close()
    fh.close()


def test_drain_exports_the_metrics_a_push_reader_still_holds(live_meter):
    # SIGTERM: uvicorn re-raises it, the SDK's atexit flush never runs; the meter's drain at the lifespan's
    # shutdown must push what the periodic reader holds (up to 60 s of counters were lost)
    import time

    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import MetricExporter, MetricExportResult, PeriodicExportingMetricReader

    from wattspan.export.otel import EnergyMetrics, connect_metrics

    class Collect(MetricExporter):
        def __init__(self):
            super().__init__()
            self.names = []

        def export(self, metrics_data, timeout_millis=10_000, **kw):
            for rm in metrics_data.resource_metrics:
                for sm in rm.scope_metrics:
                    self.names += [m.name for m in sm.metrics]
            return MetricExportResult.SUCCESS

        def force_flush(self, timeout_millis=10_000):
            return True

        def shutdown(self, timeout_millis=30_000, **kw):
            pass

    exp = Collect()
    provider = MeterProvider(metric_readers=[PeriodicExportingMetricReader(exp, export_interval_millis=3_600_000)])
    try:
        connect_metrics(live_meter, EnergyMetrics(meter_provider=provider))
        t = time.monotonic_ns()
        for i in range(5):
            live_meter.begin(f"m{i}", "gpu0", t)
            live_meter.end(f"m{i}", "gpu0", t + 1_000_000)
        assert not any(n.startswith("wattspan") for n in exp.names)  # the hour's export is far off
        assert live_meter.drain(10) == {"unfinished": 0, "sinks_unflushed": 0}
        assert any(n.startswith("wattspan.energy") for n in exp.names), exp.names
    finally:
        provider.shutdown()
