"""The GPU validation kit, run here against the thin NVML fake (a square-wave power trace)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pynvml
import pytest

from tests.fakes.fake_nvml import ALL, ENERGY, FIELD_INSTANT, USAGE, FakeGpu, FakeNvml

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("gpu_kit", ROOT / "benchmarks" / "gpu_kit.py")
kit = sys.modules.setdefault("gpu_kit", importlib.util.module_from_spec(_spec))
_spec.loader.exec_module(kit)

# 50 ms at 300 W, 50 ms at 80 W, repeating: a GPU whose power the fake plays back
SQUARE_T = np.arange(0, 0.1, 0.005)
SQUARE_W = np.where(SQUARE_T < 0.05, 300.0, 80.0)


def test_kit_probes_records_crosschecks_and_meters(monkeypatch, tmp_path):
    FakeNvml([FakeGpu("NVIDIA H100 80GB HBM3", pynvml.NVML_DEVICE_ARCH_HOPPER, SQUARE_T, SQUARE_W, supports=ALL,
                      usage_window_s=1.0)]).install(monkeypatch)
    s = kit.run_kit(tmp_path, seconds=0.6, sizes=(64,), duties=(0.5,), period_s=0.1, load=kit.sleep_load)
    assert s["gpu"] == "NVIDIA H100 80GB HBM3"
    assert {p for p, v in s["probes"].items() if v["status"] == "ok"} == set(kit.PATHS)
    assert all(v["latency_us_median"] > 0 for v in s["probes"].values())
    assert s["nvml_source"]["sensor"].startswith("nvml:energy-counter")
    # every path recorded raw, and agrees with the energy counter on the mean power (~190 W)
    for p in kit.PATHS:
        rows = (tmp_path / "raw" / f"{p}.csv").read_text().splitlines()
        assert rows[0] == "time_ns,value" and len(rows) > 10, p
    cc = s["crosscheck"]
    assert 150 < cc["energy"]["mean_w"] < 230
    assert abs(cc["field-instant"]["vs_energy_counter"]) < 0.1
    assert abs(cc["usage"]["vs_energy_counter"]) < 0.1  # a 1 s average: smooth, same mean
    assert cc["field-instant"]["value_changes_every_ms"] < 60
    assert s["sampler"]["poll_us_median"] > 0
    # the live meter saw the load's steps, and the run is written in `wattspan attribute` formats
    steps = [json.loads(x) for x in (tmp_path / "load_steps.jsonl").read_text().splitlines()]
    assert len(steps) == s["steps"] >= 4
    recs = [json.loads(x) for x in (tmp_path / "meter_records.jsonl").read_text().splitlines()]
    assert len(recs) == len(steps) and all(r["method"] == "batch-fit" for r in recs)
    assert all(r["energy_j_low"] <= r["energy_j"] <= r["energy_j_high"] for r in recs)
    from wattspan.attribution.jsonl import read_batches_jsonl, read_requests_jsonl
    from wattspan.sources.replay import read_trace_csv

    traces = read_trace_csv(tmp_path / "trace.csv")
    req, _ = read_requests_jsonl(tmp_path / "requests.jsonl")
    assert len(read_batches_jsonl(tmp_path / "batches.jsonl", req)) == len(steps)
    assert len(next(iter(traces.values()))) > 10
    md = (tmp_path / "summary.md").read_text()
    assert "NVML path" in md and "wattspan attribute" in md


def test_kit_reports_a_path_the_gpu_lacks(monkeypatch, tmp_path):
    FakeNvml([FakeGpu("Tesla V100-SXM2-16GB", pynvml.NVML_DEVICE_ARCH_VOLTA, SQUARE_T, SQUARE_W,
                      supports=frozenset({ENERGY, USAGE}))]).install(monkeypatch)
    s = kit.run_kit(tmp_path, seconds=0.3, sizes=(64,), duties=(0.5,), period_s=0.1, load=kit.sleep_load)
    assert "NOT_SUPPORTED" in s["probes"]["field-instant"]["status"].upper().replace(" ", "_") or "Not Supported" in s["probes"]["field-instant"]["status"]
    assert s["probes"]["energy"]["status"] == "ok"
    assert not (tmp_path / "raw" / f"{FIELD_INSTANT}.csv").exists()
