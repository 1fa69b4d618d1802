"""Faults at the command line: outputs that cannot be written, out-of-range options, input that meters nothing.

Each is a clear one-line error (exit 2, no traceback) or a result with a warning saying what was not metered.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
A100 = ROOT / "examples" / "a100"


def wattspan(*args, cwd=None, env=None):
    return subprocess.run([sys.executable, "-m", "wattspan.cli", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, env={**os.environ, **(env or {})}, timeout=120)


def _small(tmp_path: Path, *, trace_gpu: str = "0", req_gpu: object = 0, step_gpu: object = None, bom: bool = False):
    t = tmp_path / "trace.csv"
    t.write_text("time_ns,gpu,power_w\n" + "".join(f"{1000 + 100 * i},{trace_gpu},{60 + (i % 3) * 40}\n" for i in range(40)))
    r = tmp_path / "requests.jsonl"
    rows = [{"id": f"r{k}", "start_ns": 1200 + 400 * k, "end_ns": 1500 + 400 * k, "gpu": req_gpu} for k in range(8)]
    r.write_text(("\ufeff" if bom else "") + "".join(json.dumps(x) + "\n" for x in rows), encoding="utf-8")
    args = ["attribute", "--trace", t, "--requests", r]
    if step_gpu is not None:
        b = tmp_path / "batches.jsonl"
        b.write_text("".join(json.dumps({"start_ns": x["start_ns"], "end_ns": x["end_ns"], "gpu": step_gpu, "requests": {x["id"]: 1}}) + "\n" for x in rows))
        args += ["--batches", b]
    return args


@pytest.mark.parametrize("where", ["missing-folder", "a-directory"])
@pytest.mark.parametrize("option", ["--out", "--summary"])
def test_an_output_that_cannot_be_written_is_a_usage_error(tmp_path, option, where):
    path = tmp_path / "no" / "such" / "x.json" if where == "missing-folder" else tmp_path
    p = wattspan(*_small(tmp_path), option, path)
    assert p.returncode == 2, p.stderr
    assert "Traceback" not in p.stderr
    assert f"wattspan: error: {option} {path}: cannot write" in p.stderr


@pytest.mark.parametrize(("option", "value"), [("--idle", "1e308"), ("--idle", "2e6"), ("--power-window-s", "1e300"), ("--power-window-s", "1e10")])
def test_huge_idle_or_averaging_window_is_refused_not_a_traceback(tmp_path, option, value):
    extra = ["--power-kind", "average"] if option == "--power-window-s" else []
    p = wattspan(*_small(tmp_path), *extra, option, value)
    assert p.returncode == 2, p.stderr
    assert "Traceback" not in p.stderr and option in p.stderr


def test_a_day_long_averaging_window_still_runs(tmp_path):
    p = wattspan(*_small(tmp_path), "--power-kind", "average", "--power-window-s", "86400", "--out", tmp_path / "o.jsonl")
    assert p.returncode == 0, p.stderr


def test_a_byte_order_mark_on_the_requests_file_is_read_as_on_the_trace(tmp_path):
    out = tmp_path / "o.jsonl"
    p = wattspan(*_small(tmp_path, bom=True), "--out", out)
    assert p.returncode == 0, p.stderr
    assert json.loads(out.read_text().splitlines()[0])["id"] == "r0"


def test_requests_on_a_device_the_trace_does_not_meter_are_kept_and_warned_about(tmp_path):
    out, summ = tmp_path / "o.jsonl", tmp_path / "s.json"
    p = wattspan(*_small(tmp_path, trace_gpu="gpu7", step_gpu=0), "--out", out, "--summary", summ)
    assert p.returncode == 0, p.stderr
    recs = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(recs) == 8 and all(r["method"] == "no-trace" and r["energy_j"] == 0 for r in recs)
    s = json.loads(summ.read_text())
    assert s["unattributed_j"] == pytest.approx(s["measured_j"]) and s["measured_j"] > 0
    assert "wattspan: warning: 8 request(s) run on gpu0, which" in p.stderr and "it meters gpu7" in p.stderr
    assert "8 batch step(s) run on gpu0;" in p.stderr


def test_a_group_member_without_readings_and_steps_on_other_devices_are_warned_about(tmp_path):
    p = wattspan(*_small(tmp_path, req_gpu=["gpu0", "gpu5"], step_gpu="gpu1"), "--out", tmp_path / "o.jsonl")
    assert p.returncode == 0, p.stderr
    assert "8 request(s) run on gpu5" in p.stderr
    assert "8 batch step(s) run on gpu1;" in p.stderr
    assert "8 batch step entries name a request that does not run on every device of its step" in p.stderr


def test_the_shipped_examples_give_no_warning(tmp_path):
    for ex in ("a100", "tp4"):
        d = ROOT / "examples" / ex
        p = wattspan("attribute", "--trace", d / "trace.csv", "--requests", d / "requests.jsonl", "--batches", d / "batches.jsonl", "--out", tmp_path / "o.jsonl")
        assert p.returncode == 0, p.stderr
        assert "warning" not in p.stderr


def _attribute_output(tmp_path: Path) -> tuple[Path, Path]:
    out, summ = tmp_path / "o.jsonl", tmp_path / "s.json"
    p = wattspan(*_small(tmp_path), "--out", out, "--summary", summ)
    assert p.returncode == 0, p.stderr
    return out, summ


@pytest.mark.parametrize(("records", "message"), [
    ("a-directory", "cannot open"),
    (b"\xdb\xff\x00binary\n", ":1: cannot be read as UTF-8 text"),
    ('{"energy_j": "abc"}\n', ":1: energy_j must be a finite number from 0 to"),
    ('{"energy_j": NaN}\n', ":1: energy_j must be a finite number from 0 to"),
    # found by a probe: a traceback, or rc 0 with a report of "-" and impossible figures
    ("[" * 100_000 + "\n", ":1: not a record (nested too deeply)"),
    ('{"energy_j": 1e308}\n{"energy_j": 1e308}\n', ":1: energy_j must be a finite number from 0 to 1e+15"),
    ('{"energy_j": 5, "energy_j_low": 9, "energy_j_high": 1}\n', ":1: its band is not around its value"),
    ('{"energy_j": 5, "prompt_tokens": 2.7}\n', ":1: prompt_tokens must be a whole number"),
    ('{"energy_j": 1, "coverage": "x"}\n', ":1: coverage must be"),
    ('{"energy_j": 1}\n{"energy_j": 1, "prompt_tokens": 1e999}\n', ":2: prompt_tokens must be"),
])
def test_audit_of_bad_attribute_records_names_the_file_and_line(tmp_path, records, message):
    pytest.importorskip("jinja2")
    pytest.importorskip("markdown_it")
    pytest.importorskip("matplotlib")
    if records == "a-directory":
        path = tmp_path
    else:
        path = tmp_path / "recs.jsonl"
        path.write_bytes(records if isinstance(records, bytes) else records.encode())
    p = wattspan("audit", "--records", path, "--out", tmp_path / "a.md")
    assert p.returncode == 2, p.stderr
    assert "Traceback" not in p.stderr and f"wattspan: error: {path}" in p.stderr and message in p.stderr


@pytest.mark.parametrize(("summary", "message"), [
    ("a-directory", "cannot be read as JSON"),
    ("{not json", "cannot be read as JSON"),
    ("[1]", "is not a JSON object"),
    ('{"devices": [1, 2]}', "is not `wattspan attribute --summary` output"),
    ('{"unattributed_j": "x"}', "is not `wattspan attribute --summary` output"),
    ('{"carbon": {"region": 5}}', "its carbon needs numbers"),
    ('{"carbon": {"intensity_g_per_kwh": 100, "pue": "x"}}', "its carbon needs numbers"),
])
def test_audit_of_a_bad_attribute_summary_names_the_file(tmp_path, summary, message):
    pytest.importorskip("jinja2")
    pytest.importorskip("markdown_it")
    pytest.importorskip("matplotlib")
    out, _ = _attribute_output(tmp_path)
    if summary == "a-directory":
        path = tmp_path
    else:
        path = tmp_path / "bad-summary.json"
        path.write_text(summary)
    p = wattspan("audit", "--records", out, "--summary", path, "--out", tmp_path / "a.md")
    assert p.returncode == 2, p.stderr
    assert "Traceback" not in p.stderr and f"wattspan: error: {path}" in p.stderr and message in p.stderr


@pytest.mark.parametrize("value", ["-5", "nan", "inf", "3000"])
def test_audit_refuses_a_market_intensity_out_of_range(tmp_path, value):
    pytest.importorskip("jinja2")
    pytest.importorskip("markdown_it")
    pytest.importorskip("matplotlib")
    out, summ = _attribute_output(tmp_path)
    p = wattspan("audit", "--records", out, "--summary", summ, "--out", tmp_path / "a.md", "--market-intensity", value)
    assert p.returncode == 2 and "--market-intensity" in p.stderr and "Traceback" not in p.stderr
    p = wattspan("audit", "--records", out, "--summary", summ, "--out", tmp_path / "a.md", "--market-intensity", "100")
    assert p.returncode == 0, p.stderr


@pytest.mark.parametrize("where", ["missing-folder", "a-directory"])
def test_run_json_that_cannot_be_written_is_refused_before_the_job(tmp_path, where):
    path = tmp_path / "no" / "such" / "s.json" if where == "missing-folder" else tmp_path
    db, mark = tmp_path / "w.sqlite", tmp_path / "ran"
    p = wattspan("run", "--db", db, "--json", path, "--", sys.executable, "-c", f"open({str(mark)!r}, 'w')")
    assert p.returncode == 2, p.stderr
    assert "Traceback" not in p.stderr and not mark.exists()
    assert f"wattspan: error: --json {path}: " in p.stderr and ("cannot write" in p.stderr or "is a directory" in p.stderr)


def test_bench_says_why_a_stream_answered_200_failed():
    httpx = pytest.importorskip("httpx")
    import asyncio

    from wattspan.bench.load import WorkItem, closed_loop

    def handler(request):  # a server that answers a stream request with plain JSON: no data: [DONE]
        return httpx.Response(200, json={"id": "x"}, headers={"x-wattspan-request-id": "r1"})

    async def go():
        async with httpx.AsyncClient(transport=httpx.MockTransport(handler), base_url="http://up") as client:
            return await closed_loop(client, [WorkItem(0, "/v1/completions", {"prompt": "hi"})], concurrency=1)

    (res,), _ = asyncio.run(go())
    assert not res.ok and res.error == "HTTP 200, the stream ended without data: [DONE]"


def test_the_summary_is_standard_json_even_where_a_figure_is_nan(tmp_path):
    # time-share (no batches): the device has no fit, so its window and band figures are NaN in memory;
    # the file said NaN, which JSON.parse, jq's strict readers and Go refuse
    summ = tmp_path / "s.json"
    p = wattspan("attribute", "--trace", A100 / "trace.csv", "--requests", A100 / "requests.jsonl", "--out", tmp_path / "o.jsonl", "--summary", summ)
    assert p.returncode == 0, p.stderr

    def refuse(c):
        raise ValueError(f"{c} in the summary")

    s = json.loads(summ.read_text(), parse_constant=refuse)
    assert s["devices"]["gpu0"]["window_s"] is None and s["measured_j"] > 0
    p = wattspan("audit", "--records", tmp_path / "o.jsonl", "--summary", summ, "--out", tmp_path / "a.md") if _has_audit() else None
    assert p is None or p.returncode == 0, p.stderr


def _has_audit() -> bool:
    import importlib.util

    return all(importlib.util.find_spec(m) is not None for m in ("jinja2", "markdown_it", "matplotlib"))


def test_requests_wholly_outside_the_readings_are_warned_about_with_a_clock_hint_when_all_are(tmp_path):
    args = _small(tmp_path)
    r = tmp_path / "requests.jsonl"
    rows = [json.loads(x) for x in r.read_text().splitlines()]
    r.write_text("".join(json.dumps(dict(x, start_ns=x["start_ns"] * 10**9, end_ns=x["end_ns"] * 10**9)) + "\n" for x in rows))  # a unit slip
    summ = tmp_path / "s.json"
    p = wattspan(*args, "--out", tmp_path / "o.jsonl", "--summary", summ)
    assert p.returncode == 0, p.stderr
    assert "8 of 8 request(s) on gpu0 lie wholly outside its readings (1000..4900 ns)" in p.stderr
    assert "one clock, in nanoseconds?" in p.stderr
    s = json.loads(summ.read_text())
    assert s["attributed_j"] == 0 and s["unattributed_j"] == pytest.approx(s["measured_j"])
    r.write_text("".join(json.dumps(x) + "\n" for x in rows[:6]) + "".join(json.dumps(dict(x, start_ns=x["start_ns"] + 10**6, end_ns=x["end_ns"] + 10**6)) + "\n" for x in rows[6:]))
    p = wattspan(*args, "--out", tmp_path / "o.jsonl")
    assert p.returncode == 0, p.stderr
    assert "2 of 8 request(s) on gpu0 lie wholly outside its readings" in p.stderr and "one clock" not in p.stderr


@pytest.mark.parametrize(("args", "message"), [
    (["--port", "99999"], "--port must be between 0 and 65535, got 99999"),  # uvicorn served it on 34463
    (["--port", "-5"], "--port must be between 0 and 65535"),
    (["--device", ""], "--device '': a device name"),  # served, every record 0 J
    (["--device", "a/b"], "--device 'a/b': a device name"),
    (["--route", "m=http://127.0.0.1:9@gpu0+x y"], "--route m 'gpu0+x y': a device name"),
    (["--steps-listen", "unix:/no/such/folder/steps.sock"], "cannot listen for batch steps on unix:/no/such/folder/steps.sock"),  # a traceback
    (["--db", "."], "--db .: is a directory"),  # served, failing every ledger write
    (["--timeout-s", "1e-300"], "must be 0.001..86400 seconds"),  # served, every request timing out
    (["--tenant-header", "authorization"], "carries a credential"),  # the key stored as the tenant
    (["--host", ""], "--host is empty"),  # listened on every interface
])
def test_proxy_options_that_cannot_work_are_refused_before_serving(args, message):
    pytest.importorskip("uvicorn")
    pytest.importorskip("httpx")
    p = wattspan("proxy", "--upstream", "http://127.0.0.1:9", *args, env={"WATTSPAN_SIMULATE": "1"})
    assert p.returncode == 2, p.stderr
    assert "Traceback" not in p.stderr and message in p.stderr and "Uvicorn running" not in p.stderr


@pytest.mark.parametrize("since", ["1e30", "1e12", "99999999d", "0001-01-01T00:00Z"])
def test_audit_times_outside_what_a_date_can_be_are_refused(tmp_path, since):
    from wattspan.audit import parse_time

    with pytest.raises(ValueError, match="outside 1970-01-01..9999-12-31"):
        parse_time(since, now=1.7e9)
    assert parse_time("1h", now=1.7e9) == 1.7e9 - 3600 and parse_time("1764700000") == 1764700000.0
    if _has_audit():  # 1e30 was an OverflowError traceback, 99999999d 'year -273788674 is out of range'
        p = wattspan("audit", "--db", tmp_path / "w.sqlite", "--since", since, "--out", tmp_path / "a.md")
        assert p.returncode == 2 and "Traceback" not in p.stderr and "outside 1970-01-01..9999-12-31" in p.stderr, p.stderr


def test_audit_of_a_ledger_with_a_blob_label_reads_it_as_text(tmp_path):
    # another writer's BLOB sensor/device/method broke build_report (TypeError: startswith on bytes)
    if not _has_audit():
        pytest.skip("needs wattspan[audit]")
    import sqlite3

    from wattspan.export.ledger import Ledger

    from .test_ledger import make_records

    db = tmp_path / "w.sqlite"
    with Ledger(db) as led:
        led.write(make_records(5))
        assert led.flush()
    con = sqlite3.connect(db)
    con.execute("UPDATE requests SET route = ?, device = ?, sensor = ?, method = ? WHERE id = 'r0'", (b"\xff/v1", b"gpu0", b"nvml\xff", b"batch-fit"))
    con.commit()
    con.close()
    p = wattspan("audit", "--db", db, "--since", "1000d", "--out", tmp_path / "a.md")
    assert p.returncode == 0, p.stderr
    assert "nvml\ufffd" in (tmp_path / "a.md").read_text(encoding="utf-8")


def test_a_reader_that_goes_away_is_no_traceback(tmp_path):
    # `wattspan attribute ... | head -1`: the records' write (or the exit's flush) met a closed pipe
    p = subprocess.Popen([sys.executable, "-m", "wattspan.cli", "attribute", "--trace", str(A100 / "trace.csv"), "--requests", str(A100 / "requests.jsonl")],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert p.stdout is not None and p.stderr is not None
    p.stdout.close()
    err = p.stderr.read().decode()
    assert p.wait(120) == 1
    assert "Traceback" not in err and "Exception ignored" not in err, err


def test_ctrl_c_is_one_line_and_status_130(tmp_path):
    import signal
    import time

    fifo = tmp_path / "trace.csv"
    os.mkfifo(fifo)  # reading it blocks until a writer comes: the command waits there for the signal
    # Ctrl-C as a terminal delivers it to a command started from a shell: where this test process
    # has SIGINT ignored (a CI job started in the background with `&`; a server test that put back
    # the disposition it found), the command would inherit it ignored and never see the signal. A
    # handler here (not SIG_IGN) is reset to the default in the command by exec.
    was = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        p = subprocess.Popen([sys.executable, "-m", "wattspan.cli", "attribute", "--trace", str(fifo), "--requests", str(A100 / "requests.jsonl")],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    finally:
        signal.signal(signal.SIGINT, was)
    # wait until the command holds the FIFO open (past its imports, inside main): a writer's
    # non-blocking open succeeds only then; held open, the command blocks in its read
    deadline, fd = time.monotonic() + 120, None
    while fd is None and time.monotonic() < deadline and p.poll() is None:
        try:
            fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
        except OSError:
            time.sleep(0.05)
    assert fd is not None, "the command never opened its trace"
    try:
        time.sleep(0.2)
        p.send_signal(signal.SIGINT)
        out, err = p.communicate(timeout=60)
    finally:
        os.close(fd)
    assert p.returncode == 130, err
    assert err.strip() == "wattspan: interrupted"


def test_a_board_lag_for_a_device_the_trace_does_not_meter_is_warned_about(tmp_path):
    p = wattspan(*_small(tmp_path), "--board-lag-ms", "gpu0=0.25,gpu9=4", "--out", tmp_path / "o.jsonl")
    assert p.returncode == 0, p.stderr
    assert "--board-lag-ms names gpu9, which" in p.stderr and "names gpu0" not in p.stderr


def test_audit_of_an_inverted_period_says_so(tmp_path):
    if not _has_audit():
        pytest.skip("audit's extra is not installed")
    p = wattspan("audit", "--db", tmp_path / "w.sqlite", "--since", "1h", "--until", "2h", "--out", tmp_path / "a.md")
    assert p.returncode == 2 and "Traceback" not in p.stderr and "is not before --until 2h" in p.stderr, p.stderr


def test_batch_steps_wholly_outside_the_readings_are_warned_about(tmp_path):
    args = _small(tmp_path, step_gpu=0)
    b = tmp_path / "batches.jsonl"
    steps = [json.loads(x) for x in b.read_text().splitlines()]
    b.write_text("".join(json.dumps(dict(x, start_ns=x["start_ns"] + 10**9, end_ns=x["end_ns"] + 10**9)) + "\n" for x in steps))
    p = wattspan(*args, "--out", tmp_path / "o.jsonl")
    assert p.returncode == 0, p.stderr
    assert "8 of 8 batch step(s) on gpu0 lie wholly outside its readings (1000..4900 ns)" in p.stderr
    assert "one clock, in nanoseconds?" in p.stderr
    p = wattspan(*_small(tmp_path, step_gpu=0), "--out", tmp_path / "o.jsonl")  # the steps back inside: no warning
    assert p.returncode == 0 and "batch step" not in p.stderr, p.stderr


def test_an_idle_baseline_above_the_measured_power_is_warned_about(tmp_path):
    args = _small(tmp_path)  # 60-140 W, 100 W on average
    p = wattspan(*args, "--out", tmp_path / "o.jsonl", "--idle", "1000")
    assert p.returncode == 0, p.stderr
    assert "gpu0: the idle baseline (1000 W, configured) is above the mean measured power" in p.stderr
    p = wattspan(*args, "--out", tmp_path / "o.jsonl", "--idle", "60")
    assert p.returncode == 0 and "idle baseline" not in p.stderr, p.stderr


def test_a_counter_that_never_moves_beside_power_readings_is_warned_about(tmp_path):
    t = tmp_path / "trace.csv"
    t.write_text("time_ns,gpu,power_w,energy_j\n" + "".join(f"{1000 + 100 * i},0,{60 + (i % 3) * 40},5.0\n" for i in range(40)))
    r = tmp_path / "requests.jsonl"
    r.write_text("".join(json.dumps({"id": f"r{k}", "start_ns": 1200 + 400 * k, "end_ns": 1500 + 400 * k, "gpu": 0}) + "\n" for k in range(8)))
    p = wattspan("attribute", "--trace", t, "--requests", r, "--out", tmp_path / "o.jsonl")
    assert p.returncode == 0, p.stderr
    assert "gpu0: the meter measured no energy over the period" in p.stderr and "does its energy counter move?" in p.stderr


def test_one_file_for_records_and_summary_is_refused(tmp_path):
    out = tmp_path / "o.jsonl"
    p = wattspan(*_small(tmp_path), "--out", out, "--summary", tmp_path / "." / "o.jsonl")
    assert p.returncode == 2 and "--out and --summary name one file" in p.stderr and "Traceback" not in p.stderr
    assert not out.exists()


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full")
def test_records_to_a_full_standard_output_are_a_clear_error(tmp_path):
    with open("/dev/full", "w") as full:
        p = subprocess.run([sys.executable, "-m", "wattspan.cli", *map(str, _small(tmp_path))], stdout=full,
                           stderr=subprocess.PIPE, text=True, timeout=120)
    assert p.returncode == 2 and "standard output: cannot write the records" in p.stderr and "Traceback" not in p.stderr


def test_a_window_for_instant_readings_is_refused_not_ignored(tmp_path):
    p = wattspan(*_small(tmp_path), "--power-window-s", "0.5", "--out", tmp_path / "o.jsonl")
    assert p.returncode == 2 and "add --power-kind average" in p.stderr and "Traceback" not in p.stderr
    assert not (tmp_path / "o.jsonl").exists()


@pytest.mark.parametrize("constant", ["Infinity", "-Infinity", "NaN"])
def test_a_json_constant_for_a_time_is_named_as_written(tmp_path, constant):
    args = _small(tmp_path)
    r = tmp_path / "requests.jsonl"
    r.write_text(f'{{"id": "a", "start_ns": {constant}, "end_ns": 1500, "gpu": 0}}\n')
    p = wattspan(*args, "--out", tmp_path / "o.jsonl")
    assert p.returncode == 2 and f"start_ns must be an integer of nanoseconds, got {constant}" in p.stderr


def test_a_run_that_attributes_no_energy_says_so_instead_of_a_zero_intensity(tmp_path):
    t = tmp_path / "trace.csv"
    t.write_text("time_ns,gpu,power_w\n" + "".join(f"{1000 + 100 * i},0,0\n" for i in range(40)))  # a board at 0 W
    r = tmp_path / "requests.jsonl"
    r.write_text(json.dumps({"id": "a", "start_ns": 1200, "end_ns": 1500, "gpu": 0}) + "\n")
    s = tmp_path / "s.json"
    p = wattspan("attribute", "--trace", t, "--requests", r, "--out", tmp_path / "o.jsonl", "--summary", s)
    assert p.returncode == 0, p.stderr
    assert "no energy attributed, no weighted intensity" in p.stdout and "per request: 0 gCO2e/kWh" not in p.stdout
    assert json.loads(s.read_text())["intensity"]["energy_weighted_g_per_kwh"] is None


def test_batch_steps_outside_their_requests_lives_are_warned_about(tmp_path):
    args = _small(tmp_path, step_gpu=0)  # each request's one step spans its life exactly
    b = tmp_path / "batches.jsonl"
    rows = [json.loads(x) for x in b.read_text().splitlines()]
    rows[0]["start_ns"] += 2000  # r0's step moved past r0's end
    rows[0]["end_ns"] += 2000
    b.write_text("".join(json.dumps(x) + "\n" for x in rows))
    p = wattspan(*args, "--out", tmp_path / "o.jsonl")
    assert p.returncode == 0, p.stderr
    assert "1 of 8 batch step entry lies wholly outside the request's start_ns..end_ns" in p.stderr
    p = wattspan(*_small(tmp_path, step_gpu=0), "--out", tmp_path / "o.jsonl")
    assert "outside the request's" not in p.stderr


@pytest.mark.parametrize(("args", "message"), [
    (["--region", "nowhere"], "--region: unknown region 'nowhere'"),  # a traceback
    (["--seed", "-1"], "--seed must be between 0 and"),  # every completion refused, found at the end
    (["--seed", str(10**14)], "--seed must be between 0 and"),
    (["--db", "."], "--db .: is a directory"),  # ran, lost its records, exited 0
    (["--db", "/dev/null"], "--db /dev/null: not a regular file"),
    (["--db", "README.md"], "README.md: is not a wattspan ledger"),  # a traceback from the server's start
    (["--concurrency", "0"], "--concurrency must be between 1 and 100000, got 0"),  # silently 1
    (["--repeat", "0"], "--repeat must be between 1 and 100000, got 0"),
])
def test_demo_options_that_cannot_work_are_refused_before_serving(args, message):
    p = wattspan("demo", *args, env={"WATTSPAN_SIMULATE": "1"})
    assert p.returncode == 2, p.stderr
    assert "Traceback" not in p.stderr and message in p.stderr


def test_demo_meters_at_the_environments_pue_and_refuses_a_bad_one(monkeypatch):
    # the demo's meter reads WATTSPAN_PUE as any metered server does (it took the provider's value)
    p = wattspan("demo", env={"WATTSPAN_SIMULATE": "1", "WATTSPAN_PUE": "9"})
    assert p.returncode == 2 and "WATTSPAN_PUE='9'" in p.stderr and "Traceback" not in p.stderr
    from wattspan.demo.run import build

    monkeypatch.setenv("WATTSPAN_SIMULATE", "1")
    monkeypatch.setenv("WATTSPAN_PUE", "1.4")
    _, meter, _ = build(region="gcp:europe-west1")
    try:
        assert meter.carbon.pue == 1.4
    finally:
        meter.close()


def test_demo_on_a_port_in_use_is_refused_not_sent_to_another_server():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        p = wattspan("demo", "--port", str(s.getsockname()[1]), env={"WATTSPAN_SIMULATE": "1"})
    assert p.returncode == 2 and "in use on 127.0.0.1" in p.stderr and "Traceback" not in p.stderr


@pytest.mark.parametrize("damage", ["drop-table", "overwrite-pages"])
def test_a_damaged_ledger_is_a_clear_error_for_every_reader(tmp_path, damage):
    import sqlite3

    from wattspan.export.ledger import Ledger

    db = tmp_path / "l.sqlite"
    with Ledger(db):
        pass
    if damage == "drop-table":
        with sqlite3.connect(db) as c:
            c.execute("DROP TABLE requests")
    else:
        raw = bytearray(db.read_bytes())
        raw[4096:] = b"\xa5" * (len(raw) - 4096)  # every page after the first
        db.write_bytes(bytes(raw))
    for args in (["report", "--db", db, "--id", "r1"], ["report", "--db", db], ["audit", "--db", db]):
        p = wattspan(*args)
        assert p.returncode == 2, (args, p.stderr)
        assert "Traceback" not in p.stderr and ("cannot read" in p.stderr or "is not a wattspan ledger" in p.stderr), (args, p.stderr)


def test_audit_of_attribute_output_reads_a_bom_and_prices_the_records_hours(tmp_path):
    # the records of an hourly-priced run (GB's 2023 profile) were audited at the yearly intensity: +31 %
    pytest.importorskip("jinja2")
    pytest.importorskip("markdown_it")
    pytest.importorskip("matplotlib")
    ex = ROOT / "examples" / "a100"
    out, summ = tmp_path / "r.jsonl", tmp_path / "s.json"
    p = wattspan("attribute", "--trace", ex / "trace.csv", "--requests", ex / "requests.jsonl", "--batches", ex / "batches.jsonl",
                 "--region", "GB", "--out", out, "--summary", summ)
    assert p.returncode == 0, p.stderr
    s = json.loads(summ.read_text())
    ew = s["intensity"]["energy_weighted_g_per_kwh"]
    assert ew != s["carbon"]["intensity_g_per_kwh"]  # the hour's value, not the yearly one
    assert s["unattributed_co2e_g"] == pytest.approx(s["unattributed_j"] / 3.6e6 * s["carbon"]["pue"] * ew, rel=1e-9)
    bom = tmp_path / "bom.jsonl"
    bom.write_bytes(b"\xef\xbb\xbf" + out.read_bytes())
    p = wattspan("audit", "--records", bom, "--summary", summ, "--out", tmp_path / "a.md")
    assert p.returncode == 0, p.stderr
    md = (tmp_path / "a.md").read_text()
    assert "energy-weighted over the records' hours" in md and "differs by +0.0%" in md, md
    # a summary whose own figures do not add up is refused
    bad = dict(s, unattributed_j=-1e6)
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    p = wattspan("audit", "--records", out, "--summary", tmp_path / "bad.json", "--out", tmp_path / "b.md")
    assert p.returncode == 2 and "unattributed_j must be a finite number" in p.stderr


def test_attribute_out_dash_is_standard_output(tmp_path):
    ex = ROOT / "examples" / "a100"
    p = wattspan("attribute", "--trace", ex / "trace.csv", "--requests", ex / "requests.jsonl", "--out", "-", cwd=tmp_path)
    assert p.returncode == 0 and p.stdout.startswith('{"id":') and not (tmp_path / "-").exists(), p.stderr


def test_a_trace_row_error_names_its_line_past_a_form_feed(tmp_path):
    trace = tmp_path / "t.csv"
    trace.write_text("time_ns,gpu,power_w\n0,0,100\x0c\n500000000,0,100\n1000000000,0,abc\n")
    req = tmp_path / "r.jsonl"
    req.write_text('{"id": "a", "start_ns": 0, "end_ns": 900000000, "gpu": 0}\n')
    p = wattspan("attribute", "--trace", trace, "--requests", req)
    assert p.returncode == 2 and f"{trace}:4: power_w 'abc' is not a number" in p.stderr, p.stderr
