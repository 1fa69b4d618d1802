"""The shipped examples work as their READMEs say."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np

from .conftest import serve
from wattspan.meter import RecordCallback

ROOT = Path(__file__).resolve().parents[1]
SIM = ROOT / "examples" / "simulated"


def test_simulated_example_attributes_close_to_its_truth(tmp_path):
    out = tmp_path / "a.jsonl"
    p = subprocess.run([sys.executable, "-m", "wattspan.cli", "attribute", "--trace", SIM / "trace.csv", "--requests", SIM / "requests.jsonl", "--batches", SIM / "batches.jsonl", "--out", out], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    truth = {r["id"]: r["energy_j"] for r in map(json.loads, (SIM / "truth.jsonl").read_text().splitlines()) if r["id"] is not None}
    got = {r["id"]: r["energy_j"] for r in map(json.loads, out.read_text().splitlines())}
    err = np.array([abs(got[k] - v) / v for k, v in truth.items()])
    assert np.quantile(err, 0.95) < 0.12


def test_fastapi_example_serves_and_meters_with_the_default_meter(tmp_path, monkeypatch):
    monkeypatch.setenv("WATTSPAN_PEER_DIR", str(tmp_path / "peers"))
    monkeypatch.setenv("WATTSPAN_SIMULATE", "1")
    monkeypatch.setenv("WATTSPAN_OTEL", "0")
    from wattspan.defaults import get_default_meter, set_default_meter

    set_default_meter(None)
    from examples.fastapi.app import app

    try:
        with serve(app) as url:
            for i in range(5):
                r = httpx.post(f"{url}/v1/generate", json={"prompt": "a b c", "max_tokens": 4}, headers={"x-tenant-id": "team-a"})
                assert r.status_code == 200
            assert httpx.get(f"{url}/healthz").status_code == 200
        meter = get_default_meter()
        recs = []
        meter.add_sink(RecordCallback(recs.append))
        assert meter.flush(15)
        assert meter.counters["records"] == 5  # /healthz is excluded
        assert meter.counters["requests"] == 5
    finally:
        get_default_meter().close()
        set_default_meter(None)
