"""`wattspan attribute`: the offline command, run as a user runs it."""

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
    return subprocess.run(
        [sys.executable, "-m", "wattspan.cli", *map(str, args)],
        capture_output=True,
        text=True,
        cwd=cwd,
        env={**os.environ, **(env or {})},
        timeout=120,
    )


def test_attributes_the_shipped_example_and_writes_records_and_summary(tmp_path):
    out, summ = tmp_path / "out.jsonl", tmp_path / "summary.json"
    p = wattspan("attribute", "--trace", A100 / "trace.csv", "--requests", A100 / "requests.jsonl", "--batches", A100 / "batches.jsonl", "--out", out, "--summary", summ, "--region", "FR")
    assert p.returncode == 0, p.stderr
    recs = [json.loads(x) for x in out.read_text().splitlines()]
    ids = [json.loads(x)["id"] for x in (A100 / "requests.jsonl").read_text().splitlines()]
    assert [r["id"] for r in recs] == ids
    for r in recs:
        assert r["energy_j"] == pytest.approx(r["dynamic_j"] + r["idle_j"])
        assert r["method"] == "batch-fit" and r["coverage"] == 1.0
        assert r["co2e_g"] > 0
    s = json.loads(summ.read_text())
    assert s["attributed_j"] + s["unattributed_j"] == pytest.approx(s["measured_j"], rel=1e-9)
    assert s["carbon"]["region"] and s["carbon"]["intensity_g_per_kwh"] > 0
    # gCO2e = J / 3.6e6 * PUE * intensity of the hour it ran (France's 2023 profile: the
    # example was recorded on 2023-07-14 at 09:xx UTC), and each record says so
    r = recs[0]
    assert (r["intensity_provider"], r["intensity_zone"], r["intensity_hour"], r["intensity_basis"]) == ("profile", "FR", "2023-07-14T09:00Z", "location")
    assert 3.5 < r["intensity_g_per_kwh"] < 127  # inside FR's 2023 range (direct min .. lifecycle)
    assert r["intensity_g_per_kwh"] != s["carbon"]["intensity_g_per_kwh"]  # not the yearly row
    assert r["co2e_g"] == pytest.approx(r["energy_j"] / 3.6e6 * s["carbon"]["pue"] * r["intensity_g_per_kwh"])
    assert s["intensity"]["providers"] == ["profile"] and s["intensity"]["hours"] == 1
    assert "/square-wave" in p.stdout and "measured" in p.stdout


def test_stdout_mode_and_environment_defaults(tmp_path):
    p = wattspan("attribute", "--trace", A100 / "trace.csv", "--requests", A100 / "requests.jsonl", env={"WATTSPAN_IDLE": "55"})
    assert p.returncode == 0, p.stderr
    lines = p.stdout.splitlines()
    assert len(lines) == 76 and all(json.loads(x)["method"] == "time-share" for x in lines)
    assert "idle 55.0 W (configured)" in p.stderr


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    ("trace", "requests", "batches", "message"),
    [
        ("time_ns,gpu\n1,0\n", None, None, "trace.csv"),
        ("time_ns,gpu,power_w\n1000,0,5\n900,0,5\n", None, None, "trace.csv:3"),
        ("time_ns,gpu,power_w\n1000,0,5\n2000,0,nan\n", None, None, "trace.csv:3"),
        ("time_ns,gpu,power_w\n", None, None, "trace.csv"),
        (None, '{"id": "a", "start_ns": 5, "end_ns": 1, "gpu": 0}\n', None, "requests.jsonl:1: request 'a' ends"),
        (None, '{"id": "a", "start_ns": 1, "end_ns": 5, "gpu": 0}\n{"id": "a", "start_ns": 1, "end_ns": 5, "gpu": 0}\n', None, "requests.jsonl:2: duplicate id"),
        (None, '{"id": "a", "start_ns": 1}\n', None, "requests.jsonl:1: missing 'end_ns'"),
        (None, "not json\n", None, "requests.jsonl:1: not valid JSON"),
        (None, "", None, "requests.jsonl: is empty"),
        (None, '{"id": "a", "start_ns": 1e300, "end_ns": 5, "gpu": 0}\n', None, "requests.jsonl:1: start_ns"),
        (None, None, '{"start_ns": 1, "end_ns": 2, "gpu": 0, "requests": {"zzz": 1}}\n', "batches.jsonl:1: batch step names unknown request 'zzz'"),
        (None, None, '{"start_ns": 3, "end_ns": 2, "gpu": 0, "requests": {"a": 1}}\n', "batches.jsonl:1: batch step ends"),
        (None, None, '{"start_ns": 1, "end_ns": 2, "gpu": 0, "requests": {"a": NaN}}\n', "batches.jsonl:1: tokens of 'a'"),
    ],
)
def test_bad_files_name_file_and_line_and_exit_2(tmp_path, trace, requests, batches, message):
    t = _write(tmp_path / "trace.csv", trace or "time_ns,gpu,power_w\n1000,0,50\n2000,0,60\n3000,0,70\n")
    r = _write(tmp_path / "requests.jsonl", requests if requests is not None else '{"id": "a", "start_ns": 1000, "end_ns": 2500, "gpu": 0}\n')
    args = ["attribute", "--trace", t, "--requests", r]
    if batches is not None:
        args += ["--batches", _write(tmp_path / "batches.jsonl", batches)]
    p = wattspan(*args)
    assert p.returncode == 2, (p.stdout, p.stderr)
    assert message in p.stderr
    assert "Traceback" not in p.stderr


def test_bad_options_are_refused_clearly(tmp_path):
    p = wattspan("attribute", "--trace", A100 / "trace.csv", "--requests", A100 / "requests.jsonl", "--region", "atlantis")
    assert p.returncode == 2 and "atlantis" in p.stderr and "Traceback" not in p.stderr
    p = wattspan("attribute", "--trace", A100 / "trace.csv", "--requests", A100 / "requests.jsonl", "--idle", "-3")
    assert p.returncode == 2 and "--idle" in p.stderr
    p = wattspan("attribute", "--trace", tmp_path / "missing.csv", "--requests", A100 / "requests.jsonl")
    assert p.returncode == 2 and "missing.csv" in p.stderr


def test_a_carbon_price_turns_grams_into_money(tmp_path):
    out, summ = tmp_path / "o.jsonl", tmp_path / "s.json"
    p = wattspan("attribute", "--trace", A100 / "trace.csv", "--requests", A100 / "requests.jsonl", "--out", out, "--summary", summ, "--carbon-price", "100", "--embodied-kg", "318")
    assert p.returncode == 0, p.stderr
    r = json.loads(out.read_text().splitlines()[0])
    assert r["embodied_g"] > 0
    assert r["carbon_cost_usd"] == pytest.approx(r["co2e_g"] / 1e6 * 100.0)  # 100 USD per tonne
    s = json.loads(summ.read_text())
    assert s["carbon"]["carbon_price_per_tonne"] == 100.0


def test_records_written_a_slice_at_a_time_are_the_records_of_one_pass(tmp_path, monkeypatch, capsys):
    # a day of requests is built, written and summed a slice at a time (bounded memory): slices of 7 requests
    # must give the very bytes, and the very summary, that one slice of every request gives
    from wattspan.cli import attribute as cli
    from wattspan.cli.main import main

    def run(tag):
        out, summ = tmp_path / f"{tag}.jsonl", tmp_path / f"{tag}.json"
        try:
            main(["attribute", "--trace", str(A100 / "trace.csv"), "--requests", str(A100 / "requests.jsonl"),
                  "--batches", str(A100 / "batches.jsonl"), "--out", str(out), "--summary", str(summ), "--carbon-price", "80"])
        except SystemExit as exc:
            assert not exc.code
        capsys.readouterr()
        return out.read_bytes(), json.loads(summ.read_text())

    monkeypatch.setattr(cli, "_SLICE", 10**9)
    whole = run("whole")
    monkeypatch.setattr(cli, "_SLICE", 7)
    sliced = run("sliced")
    lines = whole[0].decode().splitlines()
    assert len(lines) > 3 * 7 and sliced[0] == whole[0]
    assert sliced[1] == whole[1] and whole[1]["requests"] == len(lines)
    first = json.loads(lines[0])
    assert {"co2e_g", "co2e_g_low", "co2e_g_high", "intensity_provider"} <= set(first)
    assert any(k.startswith("carbon_cost_") for k in first)


def test_devices_are_listed_in_their_numbers_order():
    from wattspan.cli.attribute import _natural

    assert sorted(["gpu10", "gpu2", "gpu1", "gpu0,gpu1", "3", "10", "2"], key=_natural) == \
        ["2", "3", "10", "gpu0,gpu1", "gpu1", "gpu2", "gpu10"]
