"""`wattspan bench --deploy MODE=REGION[@HOURS]`: each mode in its own region and hours; the
projection chart drawn at the table's PUE; embodied amortisation described as it is computed."""

from __future__ import annotations

import numpy as np
import pytest

from wattspan.bench.analysis import Assumptions, analyse
from wattspan.bench.deploy import deployment_report, effective_intensity, hours_curve, parse_deploy
from wattspan.bench.load import ClientResult, PhaseResult, PhaseSpec
from wattspan.bench.projection import resolve_regions
from wattspan.bench.report import CHARTS, build_blocks, write_report
from wattspan.carbon import grid_intensity
from wattspan.carbon.intensity import ProfileProvider

from .test_bench_projection import _rec


def test_hours_select_profile_cells_month_by_month():
    all_de, src, hourly = effective_intensity("DE", "all")
    assert hourly and "2023 hourly profile" in src
    assert all_de == pytest.approx(395.1, abs=3)  # DE lifecycle 2023 mean (SOURCES.md), day-weighted month-hour cells
    clean6 = effective_intensity("DEU", "cleanest:6")[0]
    assert clean6 < all_de and effective_intensity("DE", "cleanest:24")[0] == pytest.approx(all_de)
    curve = hours_curve("US-CAL-CISO")
    assert all(a <= b + 1e-9 for a, b in zip(curve, curve[1:]))  # more hours, never cleaner
    # a window by hand: California 18-22 UTC (late morning to early afternoon PST)
    p = ProfileProvider()
    jan = [p.at("US-CAL-CISO", 1672531200 + h * 3600).g_per_kwh for h in range(18, 22)]
    v = effective_intensity("US-CAL-CISO", "18-22")[0]
    assert min(jan) * 0.5 < v < max(jan) * 1.5
    night = effective_intensity("US-CAL-CISO", "22-06")[0]
    assert night > v  # solar: midday is cleaner than the night
    flat, src, hourly = effective_intensity("aws:us-east-1", "cleanest:3")
    assert not hourly and flat == grid_intensity("aws:us-east-1").gco2e_per_kwh and "same at every hour" in src


@pytest.mark.parametrize(("spec", "message"), [
    ("on-demand", "MODE=REGION"), ("weekly=FR", "mode must be one of"), ("batch=atlantis", "atlantis"),
    ("batch=DE@cleanest:0", "N from 1 to 24"), ("batch=DE@noon", "hours must be"), ("batch=DE@5-5", "not equal"),
])
def test_bad_deploy_specs_are_named(spec, message):
    with pytest.raises(ValueError, match=message):
        parse_deploy(spec)


def _rep():
    od = PhaseResult(PhaseSpec("open", 0.5), [
        ClientResult(0, rid="a", status=200, ok=True, scheduled_s=0.0, sent_s=0.0, latency_s=1.0, items=1, items_ok=1),
        ClientResult(1, rid="b", status=200, ok=True, scheduled_s=3.0, sent_s=3.0, latency_s=1.0, items=1, items_ok=1),
    ], 1000.0, 1004.0, target_rate=0.5)
    bt = PhaseResult(PhaseSpec("batch", 12), [
        ClientResult(0, rid="c", status=200, ok=True, sent_s=0.0, latency_s=2.0, items=12, items_ok=12)], 1010.0, 1012.0)
    recs = {"a": _rec("a", 0, 1, 30.0, 10.0), "b": _rec("b", 3, 4, 30.0, 10.0), "c": _rec("c", 10, 12, 96.0, 20.0)}
    a = Assumptions(calls=1000, regions=tuple(resolve_regions(["aws:us-east-1", "FR"])), embodied_kg=318.0, basis="amortised")
    return analyse([od, bt], recs, a), a


def test_each_mode_in_its_own_region_and_hours_by_hand(tmp_path):
    rep, a = _rep()
    deps = [parse_deploy("on-demand=aws:us-east-1"), parse_deploy("batch=DE@cleanest:6")]
    assert deps[0].pue == 1.15 and deps[1].pue == 1.0 and deps[1].region == "DE"
    d = deployment_report(rep, deps, basis="amortised", calls=1000, g_per_device_s=a.g_per_device_s)
    by = {r["phase"]: r for r in d["rows"]}
    bt = rep["phases"][1]["per_request"]["amortised"]
    want = bt["energy_j"] * 1000 / 3.6e6 * 1.0 * deps[1].intensity_g_per_kwh + bt["device_s"] * 1000 * a.g_per_device_s
    assert by["batch-12"]["total_g"] == pytest.approx(want)
    assert by["open-0.5rps"]["intensity_g_per_kwh"] == grid_intensity("aws:us-east-1").gco2e_per_kwh
    assert d["best"]["phase"] == "batch-12"
    curve = next(c for c in d["curves"] if c["phase"] == "batch-12")
    assert curve["total_g_by_cleanest_hours"][5] == pytest.approx(want)  # N = 6
    rep["deployment"] = d
    rep.update({"config": {"requests": 2, "workload": "completions", "seed": 0, "max_tokens": 8}, "command": "wattspan bench",
                "target": {"description": "test"}, "simulated": True, "seeds": {"workload": 0, "arrivals": {}}, "timings_s": {},
                "versions": {}, "machine": {"platform": "test", "cpus": 1}})
    blocks = build_blocks(rep)
    texts = " ".join(str(b[1]) for b in blocks)
    assert "Each mode in its own region and hours" in texts and "batch=DE@cleanest:6" in texts
    # the embodied text says what amortised device-seconds are
    assert "phase's wall seconds" in texts
    assert "embodied included" in texts and "embodied left out" not in texts
    no_emb = dict(rep, assumptions=dict(rep["assumptions"], embodied_g_per_device_s=0.0))  # --no-embodied
    texts_no = " ".join(str(b[1]) for b in build_blocks(no_emb))
    assert "embodied included" not in texts_no and "embodied left out" in texts_no
    paths = write_report(rep, tmp_path)
    assert CHARTS["deployment"] in paths and CHARTS["projection"] in paths


def test_projection_chart_line_is_drawn_at_the_tables_pue(tmp_path, monkeypatch):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.axes

    rep, a = _rep()
    rep.update({"simulated": False})
    lines = []
    real_plot = matplotlib.axes.Axes.plot

    def spy(self, *args, **kw):
        lines.append(args)
        return real_plot(self, *args, **kw)

    monkeypatch.setattr(matplotlib.axes.Axes, "plot", spy)
    from wattspan.bench.report import _charts

    _charts(rep, tmp_path)
    ii = np.array(rep["sensitivity"]["intensities_g_per_kwh"])
    table = {(r["phase"], r["region"]): r["total_g"] for r in rep["projection"] if r["basis"] == "amortised"}
    # the first region (aws:us-east-1, PUE 1.15) sets the line; its table figure lies on the line
    reg = a.regions[0]
    for p in rep["phases"]:
        line = next(l for l in lines if len(l) >= 2 and np.shape(l[0]) == ii.shape and np.allclose(l[0], ii)
                    and np.isclose(np.interp(reg.intensity_g_per_kwh, ii, l[1]) * 1e3, table[(p["name"], reg.label)], rtol=1e-6))
        assert line is not None


def test_deploy_option_is_checked_and_reproduced_in_the_command_line():
    import argparse

    from wattspan.bench.runner import BenchError, add_bench_arguments, command_line, config_from_args

    p = argparse.ArgumentParser()
    add_bench_arguments(p)
    cfg = config_from_args(p.parse_args(["--deploy", "on-demand=FR", "--deploy", "batch=DE@cleanest:6"]))
    assert cfg.deploy == ("on-demand=FR", "batch=DE@cleanest:6")
    assert "--deploy on-demand=FR --deploy batch=DE@cleanest:6" in command_line(cfg)
    with pytest.raises(BenchError, match="atlantis"):
        config_from_args(p.parse_args(["--deploy", "batch=atlantis"]))
    # a deployment of a mode this run does not measure would be silently missing from the report
    with pytest.raises(BenchError, match="no phase of this run is 'batch'"):
        config_from_args(p.parse_args(["--modes", "open,closed", "--deploy", "batch=DE"]))


def test_a_region_spelled_out_or_a_cloud_region_at_a_country_average_gets_the_hourly_profile():
    # 'france' and aws:eu-west-3 (priced at France's average) are France: @cleanest:N changes their figure
    fr = effective_intensity("FR", "cleanest:6")
    assert effective_intensity("france", "cleanest:6") == fr and fr[2]
    assert effective_intensity("aws:eu-west-3", "cleanest:6")[0] == fr[0]
    assert effective_intensity("france", "cleanest:6")[0] < effective_intensity("france", "all")[0]
    assert parse_deploy("batch=france@cleanest:6").region == "FR" and parse_deploy("batch=france@cleanest:6").hourly
    # a cloud region with its own published figure keeps it, the same at every hour
    assert not effective_intensity("gcp:europe-west9", "cleanest:6")[2]


def test_a_deployment_no_phase_measured_is_named_in_the_report():
    rep, a = _rep()
    measured = dict(rep, phases=[p for p in rep["phases"] if p["mode"] != "batch"])  # its phase measured nothing
    d = deployment_report(measured, [parse_deploy("on-demand=FR"), parse_deploy("batch=DE@cleanest:6")], basis="amortised",
                          calls=1000, g_per_device_s=a.g_per_device_s)
    assert d["unmatched"] == ["batch=DE@cleanest:6"] and {r["deploy"] for r in d["rows"]} == {"on-demand=FR@all"}
    rep["deployment"] = d
    rep.update({"config": {"requests": 2, "workload": "completions", "seed": 0, "max_tokens": 8}, "command": "wattspan bench",
                "target": {"description": "test"}, "simulated": True, "seeds": {"workload": 0, "arrivals": {}}, "timings_s": {},
                "versions": {}, "machine": {"platform": "test", "cpus": 1}})
    texts = " ".join(str(b[1]) for b in build_blocks(rep))
    assert "No measured phase for `--deploy batch=DE@cleanest:6`" in texts


def test_a_cloud_region_keeps_its_name_and_its_providers_pue():
    # aws:eu-west-3 was priced at FR's profile and shown as FR with PUE 1.0 ("no facility overhead assumed")
    from wattspan.bench.deploy import parse_deploy
    from wattspan.carbon import default_pue

    for region, cloud in (("aws:eu-west-3", "aws"), ("azure:francecentral", "azure"), ("gcp:europe-west1", "gcp")):
        d = parse_deploy(f"batch={region}")
        assert d.region == region and d.pue == default_pue(cloud).value and d.pue > 1.0, d
    assert parse_deploy("batch=france").region == "FR" and parse_deploy("batch=FR").pue == default_pue("on-prem").value
