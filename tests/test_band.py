"""The 90 % error band and quality flag: computed by attribution, carried to records, the ledger,
spans and `wattspan attribute`'s output."""

from __future__ import annotations

import dataclasses
import json
import sqlite3
import subprocess
import sys

import numpy as np
import pytest

from wattspan import DeviceTrace, RequestRecord, Requests, Steps, attribute
from wattspan.export.ledger.schema import COLUMNS, NAMES
from wattspan.export.ledger import Ledger, query
from wattspan.export.otel import record_attributes
from wattspan.simulate import LAWS, sense, simulate_server, write_files

S = 10**9


@pytest.fixture(scope="module")
def sim():
    run = simulate_server(seed=4, duration_s=20.0, power_model=LAWS["power-linear"])
    req = Requests.from_records(run.requests)
    return run, req, Steps.from_records(run.steps, req), np.array([run.truth[i]["energy_j"] for i in req.ids])


@pytest.mark.parametrize("sensor", ["ideal-1ms", "energy-counter", "instant-100ms"])
def test_band_brackets_the_estimate_and_mostly_the_truth(sim, sensor):
    run, req, steps, truth = sim
    res = attribute([sense(run, sensor, seed=2)], req, steps)
    assert np.all(res.energy_j_low <= res.energy_j) and np.all(res.energy_j <= res.energy_j_high)
    assert np.all(res.energy_j_high > res.energy_j_low)
    inside = (truth >= res.energy_j_low) & (truth <= res.energy_j_high)
    assert 0.75 <= inside.mean() <= 1.0
    # the band is not a blanket: well under the naive split's error
    assert np.median((res.energy_j_high - res.energy_j_low) / res.energy_j) < 0.25
    assert set(res.quality) <= {"good", "coarse"}


def test_fine_sensor_says_good_coarse_sensor_says_coarse(sim):
    run, req, steps, _ = sim
    fine = attribute([sense(run, "ideal-1ms", seed=2)], req, steps)
    coarse = attribute([sense(run, "instant-100ms", seed=2)], req, steps)
    assert fine.devices["gpu0"].quality == "good" and coarse.devices["gpu0"].quality == "coarse"
    w = lambda r: np.median((r.energy_j_high - r.energy_j_low) / r.energy_j)  # noqa: E731
    assert w(fine) < w(coarse)


def test_steps_unrelated_to_power_are_flagged_misfit_with_a_wide_band():
    rng = np.random.default_rng(0)
    t = 10**12 + np.arange(0, 20 * S, 10_000_000)
    p = 100 + 200 * rng.random(len(t))  # power that no step explains
    rows = [{"id": f"r{i}", "start_ns": 10**12 + i * S, "end_ns": 10**12 + (i + 2) * S, "gpu": 0} for i in range(15)]
    req = Requests.from_records(rows)
    srows = [{"start_ns": 10**12 + k * 50_000_000, "end_ns": 10**12 + k * 50_000_000 + 20_000_000, "gpu": 0,
              "requests": {f"r{min(14, k // 20)}": int(rng.integers(1, 500))}} for k in range(300)]
    res = attribute([DeviceTrace("gpu0", t, p)], req, Steps.from_records(srows, req), idle_w=100.0)
    assert res.devices["gpu0"].quality == "misfit"
    ok = res.energy_j > 0
    assert np.median((res.energy_j_high[ok] - res.energy_j_low[ok]) / res.energy_j[ok]) > 0.2


def test_time_share_requests_get_a_wide_band_and_conservation_holds(sim):
    run, req, _, _ = sim
    res = attribute([sense(run, "energy-counter", seed=1)], req)
    assert set(res.quality) == {"coarse"}
    assert np.all(res.energy_j_high - res.energy_j >= res.dynamic_j * 1.6)
    d = res.devices["gpu0"]
    assert res.energy_j.sum() + d.unattributed_j == pytest.approx(d.measured_j, rel=1e-9)


def test_records_and_summary_name_the_model_and_window(sim):
    run, req, steps, _ = sim
    res = attribute([sense(run, "hopper-nvml", seed=1)], req, steps)
    rec = res.records()[0]
    assert {"energy_j_low", "energy_j_high", "quality"} <= set(rec)
    d = res.devices["gpu0"].as_dict()
    assert d["model"]["family"] in {"energy", "power", "saturating", "energy+power", "power+saturating", "all"}
    assert 0 <= d["model"]["cv_error"] < 1 and d["model"]["cv_r2"] <= 1 and d["model"]["why"]
    assert d["window_s"] > 0 and d["window_why"] and d["quality"] in {"good", "coarse", "misfit"}
    json.dumps(d)  # the CLI writes it


def test_span_attributes_carry_the_band():
    rec = RequestRecord(id="a", device="gpu0", start_ns=0, end_ns=1, energy_j=10.0, dynamic_j=8.0, idle_j=2.0, device_s=1.0,
                        energy_j_low=9.0, energy_j_high=11.5, quality="coarse")
    a = record_attributes(rec)
    assert (a["wattspan.energy_j.low"], a["wattspan.energy_j.high"], a["wattspan.quality"]) == (9.0, 11.5, "coarse")
    bare = record_attributes(dataclasses.replace(rec, energy_j_low=0.0, energy_j_high=0.0, quality=""))
    assert not {"wattspan.energy_j.low", "wattspan.energy_j.high", "wattspan.quality"} & set(bare)


def test_ledger_stores_the_band_and_upgrades_an_older_file(tmp_path):
    path = tmp_path / "old.db"
    con = sqlite3.connect(path)
    old = [c for c in NAMES if c not in ("energy_j_low", "energy_j_high", "co2e_g_low", "co2e_g_high", "quality")]
    con.execute("CREATE TABLE requests (" + ", ".join(f"{c} NOT NULL" for c in old) + ", recorded_at REAL NOT NULL, run_id TEXT NOT NULL)")
    vals = {c: 0 for c in old} | {"id": "old-1", "device": "gpu0", "energy_j": 5.0, "method": "batch-fit", "sensor": "s", "route": "/",
                                  "http_method": "POST", "model": "", "tenant": "", "trace_id": "0" * 32, "span_id": "0" * 16}
    con.execute(f"INSERT INTO requests ({', '.join(old)}, recorded_at, run_id) VALUES ({', '.join('?' * (len(old) + 2))})",
                [vals[c] for c in old] + [1.0, "run0"])
    con.execute("PRAGMA application_id=1463899219")
    con.execute("PRAGMA user_version=1")
    con.commit()
    con.close()
    rows = query(path)  # a reader fills in what an older file lacks
    assert rows[0]["id"] == "old-1" and rows[0]["energy_j_low"] == 0.0 and rows[0]["quality"] == ""
    rec = RequestRecord(id="new-1", device="gpu0", start_ns=0, end_ns=S, energy_j=10.0, dynamic_j=8.0, idle_j=2.0,
                        device_s=1.0, energy_j_low=9.0, energy_j_high=11.0, co2e_g_low=0.1, co2e_g_high=0.2, quality="good")
    with Ledger(path) as led:  # a writer adds the columns
        led.write([rec])
        assert led.flush()
    rows = {r["id"]: r for r in query(path)}
    assert rows["new-1"]["energy_j_high"] == 11.0 and rows["new-1"]["quality"] == "good"
    assert rows["old-1"]["energy_j_high"] == 0.0
    assert [r[1] for r in sqlite3.connect(path).execute("PRAGMA table_info(requests)")] == [*old, "recorded_at", "run_id",
                                                                                         "energy_j_low", "energy_j_high",
                                                                                         "co2e_g_low", "co2e_g_high", "quality"]
    assert set(COLUMNS) <= set(rows["old-1"])


def test_cli_attribute_writes_bands_and_the_model(tmp_path, sim):
    run, _, _, truth = sim
    paths = write_files(run, sense(run, "counter-100ms", seed=3), tmp_path)
    out, summ = tmp_path / "out.jsonl", tmp_path / "summary.json"
    p = subprocess.run([sys.executable, "-m", "wattspan.cli", "attribute", "--trace", str(paths["trace"]), "--requests",
                        str(paths["requests"]), "--batches", str(paths["batches"]), "--out", str(out), "--summary", str(summ)],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    recs = [json.loads(x) for x in out.read_text().splitlines()]
    for r in recs:
        assert r["energy_j_low"] <= r["energy_j"] <= r["energy_j_high"]
        assert r["co2e_g_low"] <= r["co2e_g"] <= r["co2e_g_high"]
        assert r["quality"] in {"good", "coarse", "misfit"}
    s = json.loads(summ.read_text())
    route = s["routes"]["/v1/completions"]
    assert route["energy_j_low"] < route["energy_j"] < route["energy_j_high"]
    assert "step model" in p.stdout and "window" in p.stdout
