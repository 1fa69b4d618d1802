"""wattspan.bench's pure arithmetic: projection to N calls, idle bases, sensitivity grid,
winner map, error bands from quality flags, regions; and the analysis of a bench from
hand-made client results and records (no server)."""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from wattspan.bench.analysis import Assumptions, analyse
from wattspan.bench.load import ClientResult, PhaseResult, PhaseSpec, make_workload
from wattspan.bench.projection import (
    BASES,
    ERROR_BANDS,
    ModeMeasure,
    accuracy_row,
    busy_union_s,
    error_band,
    measure,
    per_request,
    project,
    resolve_regions,
    sensitivity_grid,
    winner_grid,
)
from wattspan.carbon import EMBODIED_A100_SERVER_SHARE, CarbonModel

ACCURACY_MD = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "accuracy.md"


# ----------------------------------------------------------------------------- projection

def test_half_a_joule_per_call_times_a_million_by_hand() -> None:
    p = project(energy_j_per_request=0.5, calls=1_000_000, intensity_g_per_kwh=400.0, pue=1.1)
    assert p.it_kwh == pytest.approx(0.138889, rel=1e-5)  # 5e5 J / 3.6e6
    assert p.facility_kwh == pytest.approx(0.152778, rel=1e-5)
    assert p.operational_g == pytest.approx(61.111, rel=1e-4)
    assert p.embodied_g == 0.0 and p.total_g == p.operational_g
    assert p.per_request_g == pytest.approx(61.111e-6, rel=1e-4)
    assert p.per_1k_g == pytest.approx(0.061111, rel=1e-4)


def test_embodied_share_by_hand_and_against_the_carbon_model() -> None:
    g_s = EMBODIED_A100_SERVER_SHARE.g_per_device_s
    assert g_s == pytest.approx(318_000 / (4 * 365.25 * 86400), rel=1e-12)  # 0.0025192 g per device-second
    p = project(energy_j_per_request=0.5, device_s_per_request=0.02, calls=1_000_000, intensity_g_per_kwh=400.0,
                pue=1.1, embodied_g_per_device_s=g_s)
    assert p.embodied_g == pytest.approx(50.384, rel=1e-4)  # 2e4 device-s x 0.0025192
    assert p.total_g == pytest.approx(61.111 + 50.384, rel=1e-4)
    assert p.embodied_share == pytest.approx(50.384 / 111.495, rel=1e-4)
    cm = CarbonModel(intensity_g_per_kwh=400.0, pue=1.1, embodied=EMBODIED_A100_SERVER_SHARE)
    assert p.total_g == pytest.approx(cm.total_g(0.5 * 1e6, 0.02 * 1e6), rel=1e-12)


@pytest.mark.parametrize("kw, fragment", [
    ({"energy_j_per_request": -1.0}, "energy_j_per_request"),
    ({"energy_j_per_request": float("nan")}, "energy_j_per_request"),
    ({"pue": 0.9}, "pue"),
    ({"intensity_g_per_kwh": 5000.0}, "intensity"),
    ({"calls": 0}, "calls"),
    ({"calls": 1.5}, "calls"),
    ({"device_s_per_request": -0.1}, "device_s"),
])
def test_bad_projection_input_is_named(kw, fragment) -> None:
    args = {"energy_j_per_request": 1.0, "intensity_g_per_kwh": 400.0} | kw
    with pytest.raises(ValueError, match=fragment):
        project(**args)


# ----------------------------------------------------------------------------- idle bases

def _m(**kw) -> ModeMeasure:
    base = dict(requests=10, records=10, energy_j=30.0, dynamic_j=20.0, idle_j=10.0, host_j=4.0, device_s=2.0,
                busy_s=2.0, window_s=5.0)
    return ModeMeasure(**(base | kw))


def test_three_idle_bases_by_hand() -> None:
    m = _m()
    assert m.idle_w == pytest.approx(5.0)  # 10 J over 2 busy seconds
    assert m.gap_s == pytest.approx(3.0)
    assert m.unattributed_idle_j == pytest.approx(15.0)  # 5 W x 3 s with nothing in flight
    assert m.utilisation == pytest.approx(0.4)
    d, a, am = (per_request(m, b) for b in BASES)
    assert (d.energy_j, d.device_s) == pytest.approx((2.0, 0.2))
    assert (a.energy_j, a.device_s) == pytest.approx((3.0, 0.2))
    assert (am.energy_j, am.device_s) == pytest.approx((4.5, 0.5))  # (30 + 15) / 10, and the whole window / 10
    assert per_request(m, "attributed", include_host=True).energy_j == pytest.approx(3.4)
    assert per_request(m, "amortised", include_host=True).energy_j == pytest.approx(4.9)
    assert per_request(m, "dynamic", include_host=True).energy_j == pytest.approx(2.0)  # host carries idle: not dynamic


def test_a_fully_busy_phase_has_nothing_to_amortise() -> None:
    m = _m(window_s=2.0)
    assert m.unattributed_idle_j == 0.0 and m.utilisation == 1.0
    assert per_request(m, "amortised").energy_j == per_request(m, "attributed").energy_j


def test_per_request_refuses_bad_basis_and_empty_phase() -> None:
    with pytest.raises(ValueError, match="basis"):
        per_request(_m(), "total")
    with pytest.raises(ValueError, match="no requests"):
        per_request(_m(requests=0), "dynamic")


def test_measure_sums_records_and_counts_batch_items() -> None:
    s = 1_000_000_000
    m = measure(start_ns=[0, s // 2, 3 * s], end_ns=[s, 3 * s // 2, 4 * s], energy_j=[1.0, 2.0, 3.0],
                dynamic_j=[0.5, 1.5, 2.0], idle_j=[0.5, 0.5, 1.0], host_j=[0.1, 0.1, 0.1], device_s=[0.75, 0.75, 1.0],
                items=[1, 1, 8], output_tokens=[4, 4, 32])
    assert m.requests == 10 and m.records == 3
    assert m.energy_j == pytest.approx(6.0) and m.dynamic_j == pytest.approx(4.0) and m.idle_j == pytest.approx(2.0)
    assert m.busy_s == pytest.approx(2.5)  # [0, 1.5] and [3, 4]
    assert m.window_s == pytest.approx(4.0)
    assert m.output_tokens == 40
    with pytest.raises(ValueError, match="energy_j has 2 entries for 3 records"):
        measure(start_ns=[0, 1, 2], end_ns=[1, 2, 3], energy_j=[1, 2], dynamic_j=[1, 2, 3], idle_j=[1, 2, 3],
                host_j=[0, 0, 0], device_s=[1, 1, 1])


def _union_reference(starts, ends) -> float:
    total, cur_s, cur_e = 0, None, None
    for s, e in sorted(zip(starts, ends)):
        e = max(e, s)
        if cur_e is None or s > cur_e:
            if cur_e is not None:
                total += cur_e - cur_s
            cur_s, cur_e = s, e
        else:
            cur_e = max(cur_e, e)
    if cur_e is not None:
        total += cur_e - cur_s
    return total / 1e9


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 10**5)), max_size=40))
def test_busy_union_matches_a_plain_sweep(pairs) -> None:
    starts = [s for s, _ in pairs]
    ends = [s + d for s, d in pairs]
    assert busy_union_s(starts, ends) == pytest.approx(_union_reference(starts, ends), abs=1e-12)


# ----------------------------------------------------------------------------- sensitivity

INT = np.arange(20.0, 901.0, 20.0)
PUE = np.round(np.arange(1.0, 1.6001, 0.02), 2)


def test_sensitivity_grid_shape_corners_and_monotonicity() -> None:
    g_s = EMBODIED_A100_SERVER_SHARE.g_per_device_s
    grid = sensitivity_grid(energy_j_per_request=0.5, device_s_per_request=0.02, intensities_g_per_kwh=INT, pues=PUE,
                            embodied_g_per_device_s=g_s)
    assert grid.shape == (len(PUE), len(INT)) == (31, 45)
    assert np.all(np.diff(grid, axis=0) > 0) and np.all(np.diff(grid, axis=1) > 0)
    for j, i in ((0, 0), (-1, -1), (10, 19)):
        ref = project(energy_j_per_request=0.5, device_s_per_request=0.02, intensity_g_per_kwh=float(INT[i]),
                      pue=float(PUE[j]), embodied_g_per_device_s=g_s)
        assert grid[j, i] == pytest.approx(ref.total_g, rel=1e-12)
    flat = sensitivity_grid(energy_j_per_request=0.0, device_s_per_request=0.02, intensities_g_per_kwh=INT, pues=PUE,
                            embodied_g_per_device_s=g_s)
    assert np.allclose(flat, 0.02 * 1e6 * g_s)  # no energy: only the embodied share, everywhere


def test_embodied_can_flip_the_winner_at_the_hand_computed_intensity() -> None:
    # A: less energy per call, more device time (embodied); B: the reverse.
    g_s = 0.0025
    ka, kb = 1.0 * 1e6 / 3.6e6, 3.0 * 1e6 / 3.6e6  # kWh per 1M calls
    ea, eb = 0.05 * 1e6 * g_s, 0.01 * 1e6 * g_s  # embodied grams per 1M calls
    a = sensitivity_grid(energy_j_per_request=1.0, device_s_per_request=0.05, intensities_g_per_kwh=INT, pues=[1.0],
                         embodied_g_per_device_s=g_s)
    b = sensitivity_grid(energy_j_per_request=3.0, device_s_per_request=0.01, intensities_g_per_kwh=INT, pues=[1.0],
                         embodied_g_per_device_s=g_s)
    w = winner_grid(a, b)[0]
    cross = (ea - eb) / (kb - ka)  # a = b here: 180 g/kWh
    assert cross == pytest.approx(180.0)
    assert np.all(w[INT < cross] == 1) and np.all(w[INT > cross] == -1) and np.all(w[INT == cross] == 0)


def test_winner_grid_leaves_overlapping_bands_undecided() -> None:
    a = np.array([[100.0, 100.0, 100.0]])
    b = np.array([[103.0, 120.0, 80.0]])
    assert winner_grid(a, b).tolist() == [[-1, -1, 1]]
    assert winner_grid(a, b, rel_err_a=0.02, rel_err_b=0.02).tolist() == [[0, -1, 1]]
    assert winner_grid(a, b, rel_err_a=0.2, rel_err_b=0.2).tolist() == [[0, 0, 0]]
    with pytest.raises(ValueError, match="one shape"):
        winner_grid(a, b[:, :2])


# ----------------------------------------------------------------------------- error bands

def test_error_bands_match_the_accuracy_benchmark_file() -> None:
    text = ACCURACY_MD.read_text("utf-8")
    worst = text[text.index("### Worst cell per sensor"):].split("\n\n", 2)[1]  # the table after the heading
    rows = {}
    for line in worst.splitlines():
        # | `sensor` | worst law | worst p95 | worst median | band coverage | naive p95, worst |
        m = re.match(r"\| `([\w-]+)` \| [\w-]+ \| ([\d.]+) % \| [\d.]+ % \| [^|]+ \| ([\d.]+) % \|", line)
        if m and m.group(1) in ERROR_BANDS:
            rows[m.group(1)] = {"batch-fit": float(m.group(2)) / 100, "time-share": float(m.group(3)) / 100}
    assert rows.keys() == ERROR_BANDS.keys()
    for k, v in rows.items():
        assert ERROR_BANDS[k] == pytest.approx(v, abs=1e-9), k


@pytest.mark.parametrize("sensor, row", [
    ("simulated", "ideal-1ms"),
    ("nvml:energy-counter+power-instant", "hopper-nvml"),
    ("nvml:energy-counter+power-usage-avg1s", "hopper-1s-average"),
    ("nvml:energy-counter", "energy-counter"),
    ("nvml:power-instant", "nvml-poll-20ms"),
    ("nvml:power-usage-avg1s", "hopper-1s-average"),
    ("rapl:energy_uj", "nvml-poll-20ms"),
    ("", "nvml-poll-20ms"),
])
def test_sensor_strings_map_to_accuracy_rows(sensor, row) -> None:
    assert accuracy_row(sensor) == row


def test_error_band_from_quality_flags() -> None:
    bf, ts = ERROR_BANDS["ideal-1ms"]["batch-fit"], ERROR_BANDS["energy-counter"]["time-share"]
    assert error_band(["batch-fit"], ["simulated"], [1.0], [5.0]) == pytest.approx(bf)
    assert error_band(["time-share"], ["nvml:energy-counter"], [1.0], [5.0]) == pytest.approx(ts)
    assert error_band(["no-trace"], ["none"], [0.0], [5.0]) == pytest.approx(2.0)  # 100 % plus nothing covered
    assert error_band(["batch-fit"], ["simulated"], [0.9], [1.0]) == pytest.approx(bf + 0.1)  # + the 10 % not covered
    # energy-weighted: 3 J at the batch-fit band, 1 J at the time-share one
    band = error_band(["batch-fit", "time-share"], ["simulated", "simulated"], [1, 1], [3.0, 1.0])
    assert band == pytest.approx((3 * bf + ERROR_BANDS["ideal-1ms"]["time-share"]) / 4)
    assert math.isnan(error_band([], [], [], []))
    with pytest.raises(ValueError, match="one length"):
        error_band(["batch-fit"], [], [1.0], [1.0])


# ----------------------------------------------------------------------------- regions

def test_regions_from_the_offline_table_with_provider_pue() -> None:
    regs = {r.label: r for r in resolve_regions(["FR", "aws:us-east-1", "gcp:europe-north1", "world"])}
    assert regs["FR"].intensity_g_per_kwh == pytest.approx(40.48) and regs["FR"].pue == 1.0
    assert regs["aws:us-east-1"].intensity_g_per_kwh == pytest.approx(383.78) and regs["aws:us-east-1"].pue == 1.15
    assert regs["gcp:europe-north1"].pue == 1.10
    assert "Our World in Data" in regs["world"].source
    forced = resolve_regions(["aws:us-east-1"], [250.0], pue=1.3)
    assert [(r.label, r.intensity_g_per_kwh, r.pue) for r in forced] == [("aws:us-east-1", 383.78, 1.3),
                                                                        ("given 250 g/kWh", 250.0, 1.3)]
    assert resolve_regions([], [250.0])[0].pue == 1.0
    assert len(resolve_regions(["world", "WORLD"])) == 1


def test_unknown_region_names_close_matches() -> None:
    with pytest.raises(ValueError, match="close matches"):
        resolve_regions(["aws:us-east-9"])
    with pytest.raises(ValueError, match="pue"):
        resolve_regions(["world"], pue=0.5)


# ----------------------------------------------------------------------------- analysis

def _rec(rid: str, start_s: float, end_s: float, energy: float, idle: float, **kw) -> dict:
    return {"id": rid, "start_ns": int(start_s * 1e9), "end_ns": int(end_s * 1e9), "energy_j": energy,
            "dynamic_j": energy - idle, "idle_j": idle, "host_j": 0.1, "device_s": end_s - start_s,
            "method": "batch-fit", "sensor": "simulated", "coverage": 1.0, "simulated": True, "prompt_tokens": 10,
            "output_tokens": 8} | kw


def test_analyse_divides_a_batch_over_its_items_and_amortises_gaps() -> None:
    # on demand: two requests of 1 s in a 4 s window, 10 W idle; batch: one record of 12 calls
    od = PhaseResult(PhaseSpec("open", 0.5), [
        ClientResult(0, rid="a", status=200, ok=True, scheduled_s=0.0, sent_s=0.0, latency_s=1.0, items=1, items_ok=1),
        ClientResult(1, rid="b", status=200, ok=True, scheduled_s=3.0, sent_s=3.0, latency_s=1.0, items=1, items_ok=1),
    ], 1000.0, 1004.0, target_rate=0.5)
    bt = PhaseResult(PhaseSpec("batch", 12), [
        ClientResult(0, rid="c", status=200, ok=True, sent_s=0.0, latency_s=2.0, items=12, items_ok=12)], 1010.0, 1012.0)
    recs = {"a": _rec("a", 0, 1, 30.0, 10.0), "b": _rec("b", 3, 4, 30.0, 10.0), "c": _rec("c", 10, 12, 96.0, 20.0)}
    region = resolve_regions(["world"])[0]
    rep = analyse([od, bt], recs, Assumptions(calls=1000, regions=(region,), embodied_kg=None, basis="amortised"))
    p_od, p_bt = rep["phases"]
    assert p_od["records"]["idle_w"] == pytest.approx(10.0)
    assert p_od["records"]["unattributed_idle_j"] == pytest.approx(20.0)  # 2 s of gap x 10 W
    assert p_od["per_request"]["amortised"]["energy_j"] == pytest.approx(40.0)  # (60 + 20) / 2
    assert p_od["per_request"]["attributed"]["energy_j"] == pytest.approx(30.0)
    assert p_od["records"]["utilisation"] == pytest.approx(0.5)
    assert p_bt["records"]["requests"] == 12 and p_bt["records"]["records"] == 1
    assert p_bt["per_request"]["attributed"]["energy_j"] == pytest.approx(8.0)  # 96 J / 12 calls
    assert p_bt["client"]["throughput_rps"] == pytest.approx(6.0)
    row = next(r for r in rep["projection"] if r["phase"] == "batch-12" and r["basis"] == "attributed")
    assert row["total_g"] == pytest.approx(8.0 * 1000 / 3.6e6 * region.intensity_g_per_kwh)
    assert rep["verdict"]["lowest"] == "batch-12"
    assert rep["verdict"]["comparisons"][0]["energy_ratio"] == pytest.approx(5.0)  # 40 J against 8 J
    assert rep["sensitivity"]["summary"]["open-0.5rps"]["batch_wins"] == 1.0
    assert np.array(rep["sensitivity"]["winner"]["open-0.5rps"]).shape == (31, 45)
    assert rep["quality"]["records"] == 3 and rep["quality"]["missing_records"] == 0


def test_analyse_counts_missing_records_and_open_loop_lag() -> None:
    res = [ClientResult(i, rid=f"r{i}", status=200, ok=True, scheduled_s=i * 0.1, sent_s=i * 0.1 + (0.05 if i > 5 else 0),
                        latency_s=0.05, items=1, items_ok=1) for i in range(10)]
    ph = PhaseResult(PhaseSpec("open", 10.0), res, 0.0, 1.0, target_rate=10.0)
    recs = {f"r{i}": _rec(f"r{i}", i * 0.1, i * 0.1 + 0.05, 1.0, 0.5) for i in range(8)}
    rep = analyse([ph], recs, Assumptions(regions=tuple(resolve_regions(["world"]))))
    p = rep["phases"][0]
    assert p["missing_records"] == 2 and p["records"]["requests"] == 8
    assert p["client"]["send_lag_p95_s"] == pytest.approx(0.05)
    assert p["client"]["saturated"] is True  # 50 ms late at 10 req/s: more than a tenth of the 100 ms gap


def test_workload_is_seeded_and_checked() -> None:
    a = make_workload("completions", 20, seed=3, max_tokens=16)
    assert a == make_workload("completions", 20, seed=3, max_tokens=16)
    assert a != make_workload("completions", 20, seed=4, max_tokens=16)
    assert all(w.route == "/v1/completions" and w.body["max_tokens"] == 16 for w in a)
    e = make_workload("embeddings", 5, model="m")
    assert all(1 <= len(w.body["input"]) <= 4 and w.body["model"] == "m" for w in e)
    with pytest.raises(ValueError, match="workload"):
        make_workload("chat", 5)
