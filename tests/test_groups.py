"""Device groups: tensor/pipeline-parallel engines on several GPUs, offline and live (fake NVML of 4 GPUs)."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import numpy as np
import pytest

from wattspan import Requests, Steps, attribute
from wattspan.devices import group_key, members
from wattspan._sim_parallel import simulate_parallel
from wattspan.simulate import sense
from wattspan.meter import RecordCallback


def _attribute(run, which="steps", sensor="counter-100ms", device=None):
    rq = [dict(r, gpu=device) for r in run.requests] if device else run.requests
    st = [dict(s, gpu=device) for s in getattr(run, which)] if device else getattr(run, which)
    req = Requests.from_records(rq)
    traces = {g: sense(r, sensor, seed=7 + k) for k, (g, r) in enumerate(run.runs.items())}
    return req, traces, attribute(traces, req, Steps.from_records(st, req))


def _err(res, run):
    truth = np.array([run.truth[i]["energy_j"] for i in res.requests.ids])
    return np.abs(res.energy_j - truth) / truth


def test_group_names():
    assert group_key(["gpu0", 1, "gpu1"]) == "gpu0,gpu1"
    assert group_key("gpu2, gpu3") == group_key("gpu2+gpu3") == "gpu2,gpu3"
    assert group_key(0) == "gpu0" and members("gpu0") == ("gpu0",)
    assert members("gpu0,gpu1") == ("gpu0", "gpu1")


@pytest.fixture(scope="module")
def tp4():
    run = simulate_parallel(tp=4, pp=1, seed=3, duration_s=12)
    return run, *_attribute(run)


def test_tensor_parallel_books_close_per_device_and_in_total(tp4):
    run, req, traces, res = tp4
    assert set(res.devices) == {"gpu0", "gpu1", "gpu2", "gpu3"}
    for d in res.devices.values():  # every GPU's own books
        assert d.attributed_j + d.unattributed_j == pytest.approx(d.measured_j, rel=1e-9)
        assert d.method == "batch-fit" and d.steps == len(run.steps)
    assert res.energy_j.sum() + res.unattributed_j == pytest.approx(res.measured_j, rel=1e-9)
    # the per-device parts add up to each request's energy, and name each member (hw.id)
    parts = np.bincount(res.parts["request"], weights=res.parts["energy_j"], minlength=len(req))
    np.testing.assert_allclose(parts, res.energy_j, rtol=1e-12)
    rec = res.records()[0]
    assert rec["device"] == "gpu0,gpu1,gpu2,gpu3" and set(rec["devices"]) == {"gpu0", "gpu1", "gpu2", "gpu3"}
    assert sum(rec["devices"].values()) == pytest.approx(rec["energy_j"])
    assert rec["sensor"] != "none" and rec["method"] == "batch-fit"


def test_tensor_parallel_is_as_accurate_as_one_gpu_and_bills_all_four(tp4):
    run, _, _, res = tp4
    err = _err(res, run)
    one = simulate_parallel(tp=1, pp=1, seed=3, duration_s=12)
    err1 = _err(_attribute(one)[2], one)
    assert np.median(err) < 0.03 and np.median(err) < 2 * np.median(err1) + 0.005
    true_dyn = sum(t["dynamic_j"] for t in run.truth.values())
    assert res.dynamic_j.sum() / true_dyn > 0.97
    # before device groups: the engine named as gpu0 bills about a quarter
    legacy = _attribute(run, device="gpu0")[2]
    assert legacy.energy_j.sum() < 0.35 * res.energy_j.sum()


def test_pipeline_stages_each_on_their_own_gpu_and_timing():
    run = simulate_parallel(tp=1, pp=2, seed=4, duration_s=12)
    assert {s["gpu"] for s in run.steps} == {"gpu0", "gpu1"}  # stage steps on the stage's GPU
    _, _, res = _attribute(run)
    assert res.requests.device[0] == "gpu0,gpu1"
    assert np.median(_err(res, run)) < 0.06
    for d in res.devices.values():
        assert d.attributed_j + d.unattributed_j == pytest.approx(d.measured_j, rel=1e-9)
    # the whole step reported on the group (stage timing unknown) still closes the books
    _, _, whole = _attribute(run, which="group_steps")
    assert whole.energy_j.sum() + whole.unattributed_j == pytest.approx(whole.measured_j, rel=1e-9)
    assert np.median(_err(whole, run)) < 0.08


def test_an_overlapped_unbalanced_pipeline_has_its_own_truth():
    """vLLM's pipeline: stage 0 runs micro-batch k+1 while stage 1 runs k, the last stage slower."""
    run = simulate_parallel(tp=1, pp=2, seed=2, duration_s=8, overlap=True, stage_weights=(0.4, 0.6))
    assert run.overlap and run.stage_weights == pytest.approx((0.4, 0.6))
    by_gpu = {g: sorted((s["start_ns"], s["end_ns"]) for s in run.steps if s["gpu"] == g) for g in run.gpus}
    for spans in by_gpu.values():  # a stage runs one micro-batch at a time
        assert all(b0 <= a1 for (_, b0), (a1, _) in zip(spans, spans[1:]))
    # the stages overlap in time (different micro-batches), and the last stage is busier
    s0, s1 = (np.array(by_gpu[g]) for g in run.gpus)
    k = np.searchsorted(s1[:, 0], s0[:, 0], side="right") - 1
    assert np.mean((k >= 0) & (s1[np.maximum(k, 0), 1] > s0[:, 0])) > 0.2
    busy = [float(np.sum(x[:, 1] - x[:, 0])) for x in (s0, s1)]
    assert busy[1] / busy[0] == pytest.approx(1.5, rel=0.02)
    # a micro-batch holds one virtual engine's requests; each request contains its micro-batches
    rq = {r["id"]: r for r in run.requests}
    for s in run.steps:
        assert len({int(i.split("-")[1]) % 2 for i in s["requests"]}) == 1
        assert all(rq[i]["start_ns"] <= s["start_ns"] and s["end_ns"] <= rq[i]["end_ns"] for i in s["requests"])
    # the engine's view: handed over no later than stage 0 starts it, back when the last stage ends it
    assert all(a < b for a, b, _ in run.engine_steps)
    for r in run.runs.values():  # truth closes per GPU
        assert sum(t["energy_j"] for t in r.truth.values()) + r.truth_unattributed_j == pytest.approx(r.total_j, rel=1e-6)
    _, _, res = _attribute(run, sensor="hopper-nvml")
    assert res.dynamic_j.sum() / sum(t["dynamic_j"] for t in run.truth.values()) == pytest.approx(1.0, abs=0.03)
    assert np.median(_err(res, run)) < 0.06


def test_a_pipeline_stage_s_waits_are_fitted_and_billed_to_the_other_stage_s_step():
    """A stage waits about half its busy time (the other stage runs the step); the GPU does not
    drop to idle then (clocks held; the electrical tail of its slice is that slice's). The power
    held is not its own steps': the fit gives the waits their own terms, near the truth, and bills
    it to the step the other stage runs meanwhile."""
    import dataclasses

    from wattspan.simulate import LAWS

    pm = dataclasses.replace(LAWS["saturating"], between_steps_w=30.0, tau_s=0.004)
    for pp in (1, 2):
        run = simulate_parallel(tp=1, pp=pp, seed=0, duration_s=20, rate_per_s=8.0, power_model=pm)
        _, _, res = _attribute(run, sensor="hopper-nvml")
        for g, r in run.runs.items():
            true_wait = r.truth_wait_j  # the power held while it waits (each slice's tail is the slice's)
            d = res.devices[g]
            if pp == 1:  # a lone GPU's waits are host gaps: kept only where the readings ask for them
                assert true_wait < 0.05 * d.measured_j
                continue
            assert "waits" in d.model.why and d.model.wait_coef.any()
            # coarse readings cannot tell the power held in a wait from the tail of the slice before it
            # (a stage waits as long as the other's slice); both go to the same requests by the same tokens
            assert 0.6 * true_wait < d.wait_j < 2.5 * true_wait, (g, d.wait_j, true_wait)
            assert d.attributed_j + d.unattributed_j == pytest.approx(d.measured_j, rel=1e-9)
        assert np.quantile(_err(res, run), 0.95) < 0.06


def test_a_stage_s_wait_is_billed_to_the_step_the_other_stage_runs():
    """Two stages, requests A, B and C in flight all along: A's and C's micro-batches go through
    stage 0 then stage 1 in turn, B waits in the queue (in no step). A stage draws 100 W above
    idle in its slices and 40 W while the other stage runs: that is the micro-batch's, so B gets
    none of it (shared by time it would get a third)."""
    from wattspan.samples import DeviceTrace, SampleKind

    ms = 1_000_000
    req = Requests.from_records([{"id": i, "start_ns": 0, "end_ns": 2000 * ms, "gpu": ["gpu0", "gpu1"]} for i in "ABC"])
    t = np.arange(0, 2000 * ms + 1, ms // 2)
    power = {g: np.full(len(t), 90.0) for g in ("gpu0", "gpu1")}
    rows = []
    for k in range(50):  # 40 ms a round: A's micro-batch through both stages, then C's
        for j, rid in enumerate("AC"):
            for stage, g in enumerate(("gpu0", "gpu1")):
                a = k * 40 * ms + j * 20 * ms + stage * 10 * ms
                rows.append({"start_ns": a, "end_ns": a + 10 * ms, "gpu": g, "requests": {rid: 2}})
                power[g][(t >= a) & (t < a + 10 * ms)] = 150.0
    traces = {g: DeviceTrace(g, t, power_w=p, power_kind=SampleKind.INSTANT) for g, p in power.items()}
    res = attribute(traces, req, Steps.from_records(rows, req), idle_w=50.0)
    dyn = dict(zip(res.requests.ids, res.dynamic_j))
    # each of A and C: its slices on both GPUs (2 x 50 x 10 ms x 100 W) and the other stage's
    # waits meanwhile (2 x 50 x 10 ms x 40 W), less the last half reading
    assert dyn["A"] == pytest.approx(140.0, rel=0.01) and dyn["C"] == pytest.approx(140.0, rel=0.01)
    assert dyn["B"] < 0.005 * dyn["A"]
    assert res.idle_j[1] == pytest.approx(res.idle_j[0])  # idle is still everyone's in flight
    for d in res.devices.values():
        assert d.attributed_j + d.unattributed_j == pytest.approx(d.measured_j, rel=1e-9)
    # groups derive their owners themselves: owners given beside them are a clear error
    with pytest.raises(ValueError, match="wait_owners"):
        attribute(traces, req, Steps.from_records(rows, req), idle_w=50.0, wait_owners=Steps.from_records(rows, req))


def test_whole_steps_on_the_group_bill_a_balanced_pipeline_like_its_stages():
    """In a pipeline that does not overlap, stage 0 waits in step k only while stage 1 runs step
    k: the whole step on the group bills the same requests by the same tokens as the stages'
    own slices with their waits, so the hook needs no stage timing there (on 1 ms readings
    p95 1.6 %, the stages' own timing 0.3 %; with the waits shared by time it was 10 %)."""
    run = simulate_parallel(tp=1, pp=2, seed=4, duration_s=12)
    _, _, res = _attribute(run, which="group_steps", sensor="ideal-1ms")
    assert np.quantile(_err(res, run), 0.95) < 0.02
    _, _, res = _attribute(run, which="steps", sensor="ideal-1ms")
    assert np.quantile(_err(res, run), 0.95) < 0.005


def test_waits_are_in_flight_time_outside_the_device_s_steps():
    from wattspan.attribution.fit import _Segments, _waits

    seg = _Segments(np.array([0, 50]), np.array([100, 120]), np.ones(2), 0, 200)
    ws, we = _waits(seg, np.array([10, 30, 60]), np.array([20, 40, 90]))
    assert ws.tolist() == [0, 20, 40, 90] and we.tolist() == [10, 30, 60, 120]
    ws, we = _waits(seg, np.array([0]), np.array([120]))
    assert len(ws) == 0


def _write(tmp_path, run, traces, req_gpu, step_gpu):
    lines = ["time_ns,gpu,power_w,energy_j"]
    for g, tr in traces.items():
        e = tr.energy_j if tr.energy_j is not None else np.full(len(tr), np.nan)
        p = tr.power_w if tr.power_w is not None else np.full(len(tr), np.nan)
        for t, pw, ej in zip(tr.t_ns.tolist(), p.tolist(), e.tolist()):
            lines.append(f"{t},{g},{'' if pw != pw else f'{pw:.6f}'},{'' if ej != ej else f'{ej:.6f}'}")
    (tmp_path / "trace.csv").write_text("\n".join(lines) + "\n")
    (tmp_path / "requests.jsonl").write_text("".join(json.dumps(dict(r, gpu=req_gpu)) + "\n" for r in run.requests))
    (tmp_path / "batches.jsonl").write_text("".join(json.dumps(dict(s, gpu=step_gpu)) + "\n" for s in run.steps))


def _cli(tmp_path, *extra):
    return subprocess.run([sys.executable, "-m", "wattspan.cli", "attribute", "--trace", str(tmp_path / "trace.csv"),
                           "--requests", str(tmp_path / "requests.jsonl"), "--batches", str(tmp_path / "batches.jsonl"),
                           *extra], capture_output=True, text=True, timeout=300)


def test_offline_files_take_a_group_as_a_list_or_a_string(tmp_path):
    run = simulate_parallel(tp=2, pp=1, seed=5, duration_s=6)
    traces = {g: sense(r, "counter-100ms", seed=1) for g, r in run.runs.items()}
    _write(tmp_path, run, traces, ["gpu0", "gpu1"], "gpu0,gpu1")
    p = _cli(tmp_path)
    assert p.returncode == 0, p.stderr
    recs = [json.loads(line) for line in p.stdout.splitlines() if line.strip()]
    assert recs[0]["device"] == "gpu0,gpu1" and set(recs[0]["devices"]) == {"gpu0", "gpu1"}
    truth = np.array([run.truth[r["id"]]["energy_j"] for r in recs])
    got = np.array([r["energy_j"] for r in recs])
    assert np.median(np.abs(got - truth) / truth) < 0.05
    # an empty group is a clear error on its line, not a crash
    (tmp_path / "requests.jsonl").write_text(json.dumps(dict(run.requests[0], gpu=[])) + "\n")
    p = _cli(tmp_path)
    assert p.returncode != 0 and "requests.jsonl" in p.stderr and "gpu" in p.stderr and "Traceback" not in p.stderr


def test_the_pipeline_example_attributes_near_its_truth_and_is_what_its_generator_writes(tmp_path):
    """examples/pp2 (an overlapped PP-2 on hopper-nvml): its truth is the current conventions'
    (regenerated as its README says), and `wattspan attribute` on it lands near that truth."""
    from pathlib import Path

    from wattspan._sim_parallel import write_files

    ex = Path(__file__).resolve().parents[1] / "examples" / "pp2"
    write_files(simulate_parallel(tp=1, pp=2, seed=0, duration_s=8, rate_per_s=6.0, overlap=True,
                                  stage_weights=(0.45, 0.55)), "hopper-nvml", tmp_path)
    for name in ("truth.jsonl", "batches.jsonl", "requests.jsonl"):
        assert (tmp_path / name).read_text() == (ex / name).read_text(), name
    truth = {r["id"]: r for r in map(json.loads, (ex / "truth.jsonl").read_text().splitlines()) if r["id"]}
    p = subprocess.run([sys.executable, "-m", "wattspan.cli", "attribute", "--trace", str(ex / "trace.csv"),
                        "--requests", str(ex / "requests.jsonl"), "--batches", str(ex / "batches.jsonl")],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    recs = [json.loads(line) for line in p.stdout.splitlines() if line.strip()]
    assert len(recs) == len(truth) and all(set(r["devices"]) == {"gpu0", "gpu1"} for r in recs)
    err = np.array([abs(r["energy_j"] - truth[r["id"]]["energy_j"]) / truth[r["id"]]["energy_j"] for r in recs])
    assert np.median(err) < 0.04 and np.quantile(err, 0.95) < 0.12
    inside = np.mean([r["energy_j_low"] <= truth[r["id"]]["energy_j"] <= r["energy_j_high"] for r in recs])
    assert inside >= 0.8


def test_live_meter_on_four_fake_gpus_bills_each_gpu_of_the_group(monkeypatch):
    """A TP-4 engine on a fake NVML of 4 GPUs (each its own trace): records carry all four GPUs' energy."""
    from tests.fakes.fake_nvml import FakeGpu, FakeNvml

    from wattspan import Meter
    from wattspan.carbon import CarbonModel
    from wattspan.integrations.batch import record_step
    from wattspan.sources.nvml import NvmlSource

    watts = (200.0, 220.0, 240.0, 260.0)
    FakeNvml([FakeGpu("NVIDIA H100 80GB HBM3", 9, np.array([0.0]), np.array([w])) for w in watts]).install(monkeypatch)
    records = []
    meter = Meter(sources=[NvmlSource()], idle_w=100.0, carbon=CarbonModel(intensity_g_per_kwh=400.0), sinks=[RecordCallback(records.append)],
                  period_s=0.05, lag_s=0.05, autostart=False)
    meter.start()
    assert meter.wait_ready(10)
    group = ["gpu0", "gpu1", "gpu2", "gpu3"]
    t = time.monotonic_ns()
    for i in range(8):
        a = t + i * 50_000_000
        meter.begin(f"r{i}", group, a)
        record_step(a, a + 40_000_000, {f"r{i}": 16}, device=group, meter=meter)
        meter.end(f"r{i}", group, a + 50_000_000)
    time.sleep(1.0)
    assert meter.flush(10)
    meter.close()
    assert len(records) == 8 and all(r.device == "gpu0,gpu1,gpu2,gpu3" for r in records)
    billed = sum(r.energy_j for r in records)
    measured = sum(meter.device_energy_j[g] for g in group)
    assert all(meter.device_energy_j[g] > 0 for g in group)
    assert billed + sum(meter.device_unattributed_j[g] for g in group) == pytest.approx(measured, rel=1e-6)
    # 8 x 50 ms back to back at 920 W in all: ~368 J; one GPU alone would bill ~80 J
    assert billed == pytest.approx(sum(watts) * 0.4, rel=0.25)
    # each record keeps each GPU's part (hw.id per device): they add up to the record, and per
    # GPU the parts plus that GPU's unattributed energy are what that GPU measured
    for r in records:
        assert list(r.device_energy_j) == group
        assert sum(r.device_energy_j.values()) == pytest.approx(r.energy_j - r.host_j, rel=1e-9)
    for g, w in zip(group, watts):
        part = sum(r.device_energy_j[g] for r in records)
        assert part + meter.device_unattributed_j[g] == pytest.approx(meter.device_energy_j[g], rel=1e-6)
        assert part == pytest.approx(w * 0.4, rel=0.25)  # each GPU's own draw, not a quarter of the sum
    assert sum(records[0].device_energy_j[g] for g in group[2:]) > sum(records[0].device_energy_j[g] for g in group[:2])
    _spans_and_metrics_carry_each_device(records, group)


def _spans_and_metrics_carry_each_device(records, group):
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader

    from wattspan.export.otel import EnergyMetrics, record_attributes

    a = record_attributes(records[0])
    assert a["hw.id"] == ",".join(group) and a["wattspan.device.ids"] == group
    assert a["wattspan.device.energy_j"] == pytest.approx(list(records[0].device_energy_j.values()))
    reader = InMemoryMetricReader()
    em = EnergyMetrics(MeterProvider(metric_readers=[reader]))
    em.observe_many(records)
    per_id: dict[str, float] = {}
    for rm in reader.get_metrics_data().resource_metrics:
        for sm in rm.scope_metrics:
            for m in sm.metrics:
                if m.name == "wattspan.energy":
                    for pt in m.data.data_points:
                        per_id[pt.attributes["hw.id"]] = per_id.get(pt.attributes["hw.id"], 0.0) + pt.value
    assert set(per_id) == set(group)  # the counter per GPU, not per group string
    for g in group:
        assert per_id[g] == pytest.approx(sum(r.device_energy_j[g] for r in records), rel=1e-6)


def test_a_single_device_record_has_no_parts_and_reads_as_its_device():
    from wattspan import RequestRecord

    r = RequestRecord(id="a", device="gpu1", start_ns=0, end_ns=1, energy_j=5.0, dynamic_j=4.0, idle_j=1.0, device_s=1.0)
    assert r.device_energy == "" and r.device_energy_j == {"gpu1": 5.0}
    bad = RequestRecord(id="b", device="gpu0,gpu1", start_ns=0, end_ns=1, energy_j=5.0, dynamic_j=4.0, idle_j=1.0,
                        device_s=1.0, device_energy="not json")
    assert bad.device_energy_j == {}


def test_vllm_engine_devices_are_mapped_by_uuid_not_index():
    from wattspan.integrations._gpu_groups import engine_devices, engine_group

    uuids = [f"GPU-aaaa000{i}-0000-0000-0000-000000000000" for i in range(4)]
    # CUDA lists the GPUs in another order than NVML: UUIDs say which is which
    vis = ",".join(uuids[i] for i in (2, 3, 0, 1))
    assert engine_devices(2, 1, visible=vis, uuids=uuids) == [["gpu2", "gpu3"]]
    assert engine_devices(2, 1, visible=vis, uuids=uuids, local_dp_rank=1) == [["gpu0", "gpu1"]]  # a data-parallel replica
    assert engine_devices(1, 2, visible="1,3", uuids=uuids) == [["gpu1"], ["gpu3"]]  # pipeline stages
    assert engine_devices(2, 1, visible="GPU-aaaa0003,GPU-aaaa0001", uuids=uuids) == [["gpu3", "gpu1"]]  # UUID prefixes
    mig = {"MIG-1111": uuids[2]}
    assert engine_devices(1, 1, visible="MIG-1111", uuids=uuids, mig_parent=mig) == [["gpu2"]]  # MIG: its parent GPU
    with pytest.raises(ValueError, match="not among NVML"):
        engine_devices(1, 1, visible="GPU-ffff", uuids=uuids)
    with pytest.raises(ValueError, match="visible"):
        engine_devices(4, 2, visible="0,1,2,3", uuids=uuids)

    class PC:
        tensor_parallel_size, pipeline_parallel_size, data_parallel_rank_local = 2, 2, 0

    class Cfg:
        parallel_config = PC()

    assert engine_group(Cfg(), visible="0,1,2,3", uuids=uuids) == ("gpu0,gpu1,gpu2,gpu3", ["gpu0,gpu1", "gpu2,gpu3"])


def test_uuids_are_read_from_nvml(monkeypatch):
    from tests.fakes.fake_nvml import FakeGpu, FakeNvml

    from wattspan.integrations._gpu_groups import engine_devices, nvml_uuids

    gpus = [FakeGpu("NVIDIA H100 80GB HBM3", 9, np.array([0.0]), np.array([100.0]), uuid=f"GPU-bbbb{i}") for i in range(4)]
    FakeNvml(gpus).install(monkeypatch)
    assert nvml_uuids() == [f"GPU-bbbb{i}" for i in range(4)]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-bbbb3,GPU-bbbb1")
    assert engine_devices(2) == [["gpu3", "gpu1"]]


def test_servers_sharing_one_physical_gpu_share_one_peer_group(monkeypatch):
    """MIG instances and several servers on one GPU: NVML meters the physical GPU, so they join one
    peer group keyed by its UUID (their requests share its one trace); other GPUs are apart."""
    from tests.fakes.fake_nvml import FakeGpu, FakeNvml

    from wattspan.meter.peers import group_key as peer_key
    from wattspan.sources.nvml import NvmlSource

    mk = lambda u: FakeGpu("NVIDIA A100-SXM4-80GB", 7, np.array([0.0]), np.array([100.0]), uuid=u)  # noqa: E731
    FakeNvml([mk("GPU-cccc0"), mk("GPU-cccc1")]).install(monkeypatch)

    def key(index):
        src = NvmlSource(indices=[index])
        try:
            return peer_key([i.extra["identity"] for i in src.devices()], None)
        finally:
            src.close()

    assert key(0) == key(0) != key(1)


def test_two_servers_on_one_host_each_bill_their_own_gpus(monkeypatch):
    """Several servers on one host, one meter (proxy) each, `--device` naming its GPUs: each bills its own."""
    from tests.fakes.fake_nvml import FakeGpu, FakeNvml

    from wattspan import Meter
    from wattspan.carbon import CarbonModel
    from wattspan.sources.nvml import NvmlSource

    watts = (150.0, 150.0, 400.0, 400.0)
    FakeNvml([FakeGpu("NVIDIA H100 80GB HBM3", 9, np.array([0.0]), np.array([w])) for w in watts]).install(monkeypatch)
    out = {}
    meters = {}
    for name, group in (("a", "gpu0,gpu1"), ("b", "gpu2,gpu3")):
        out[name] = []
        meters[name] = Meter(sources=[NvmlSource()], idle_w=100.0, carbon=CarbonModel(intensity_g_per_kwh=400.0),
                             sinks=[RecordCallback(out[name].append)], period_s=0.05, lag_s=0.05, autostart=False)
        meters[name].start()
        assert meters[name].wait_ready(10)
    t = time.monotonic_ns()
    for i in range(6):
        a = t + i * 50_000_000
        for name, group in (("a", "gpu0,gpu1"), ("b", "gpu2,gpu3")):
            meters[name].begin(f"{name}{i}", group, a)
            meters[name].end(f"{name}{i}", group, a + 50_000_000)
    time.sleep(1.0)
    for m in meters.values():
        assert m.flush(10)
        m.close()
    ea, eb = (sum(r.energy_j for r in out[n]) for n in ("a", "b"))
    assert len(out["a"]) == len(out["b"]) == 6
    assert ea == pytest.approx(300.0 * 0.3, rel=0.25) and eb == pytest.approx(800.0 * 0.3, rel=0.25)
    assert {r.device for r in out["b"]} == {"gpu2,gpu3"}


def test_live_meter_takes_a_group_written_with_plus_or_spaces():
    """``"gpu0+gpu1"`` and ``"gpu0, gpu1"`` name the same group as ``"gpu0,gpu1"`` (as the middleware reads them)."""
    from wattspan import Meter

    seen = []
    meter = Meter(sources=[], idle_w=0.0, autostart=False)
    meter.step_observers.append(lambda a, b, d, tok: seen.append(d))
    t = time.monotonic_ns()
    meter.begin("r0", "gpu0+gpu1", t)
    meter.record_step(t, t + 1000, "gpu0, gpu1", {"r0": 4})
    meter.record_step(t, t + 1000, "gpu0+gpu1", {"r0": 1})
    meter.record_step(t, t + 1000, "gpu0", {"r0": 1})
    assert seen == ["gpu0,gpu1", "gpu0,gpu1", "gpu0"]
    assert meter._events[0][1:3] == ("r0", "gpu0,gpu1")  # the begin event
    meter.close()


def test_a_stage_s_held_clocks_are_not_taken_for_its_idle_power():
    """An overlapped pipeline read by 1 s averages is never idle long enough for the baseline to be
    read off the trace, so it is the fit's intercept; a stage's waits hold power (80 W here) nearly
    all the time it is not running a slice, and without the waits' terms beside the steps' that
    power went into the intercept: idle read ~45 W high, a quarter of the dynamic energy billed as idle."""
    import dataclasses

    from wattspan.simulate import LAWS

    pm = dataclasses.replace(LAWS["saturating"], between_steps_w=80.0, tau_s=0.008)
    run = simulate_parallel(tp=1, pp=2, seed=5, duration_s=40, rate_per_s=3.0, idle_drift_w=3.0, power_model=pm,
                            overlap=True, stage_weights=(0.45, 0.55))
    _, _, res = _attribute(run, sensor="average-1s-counter")
    assert {d.idle_source for d in res.devices.values()} == {"fit-intercept"}
    for g, d in res.devices.items():
        assert d.idle_w < 1.1 * float(np.mean(run.runs[g].idle_w)), (g, d.idle_w)
    true_dyn = sum(t["dynamic_j"] for t in run.truth.values())
    assert res.dynamic_j.sum() / true_dyn > 0.97


def test_the_live_meter_bills_a_stage_s_wait_to_the_other_stage_s_step():
    """The live meter, pass by pass on each stage's GPU, applies the rule offline attribution does:
    B, queued all along, gets none of the stages' waits; A and C, whose micro-batches the other
    stage was running, get them."""
    import dataclasses

    from wattspan import Meter
    from wattspan.carbon import CarbonModel
    from wattspan.samples import DeviceTrace, SampleKind

    from .fakes.sampler import CutSampler

    ms, s = 1_000_000, 10**9
    base = time.monotonic_ns() + 1000 * s
    t = base + np.arange(0, 4000 * ms + 1, ms // 2)
    power = {g: np.full(len(t), 90.0) for g in ("gpu0", "gpu1")}
    steps = []
    for k in range(100):
        for j, rid in enumerate("AC"):
            for stage, g in enumerate(("gpu0", "gpu1")):
                a = base + k * 40 * ms + j * 20 * ms + stage * 10 * ms
                steps.append((a, a + 10 * ms, g, {rid: 2}))
                power[g][(t >= a) & (t < a + 10 * ms)] = 150.0
    sampler = CutSampler([DeviceTrace(g, t, power_w=p, power_kind=SampleKind.INSTANT) for g, p in power.items()], latest=int(t[0]))
    got = []
    m = Meter(sampler=sampler, autostart=False, idle_w=50.0, lag_s=0.0, refit_s=1e5, carbon=CarbonModel(intensity_g_per_kwh=400.0),
              sinks=[RecordCallback(got.append)])
    for rid in "ABC":
        m.begin(rid, ["gpu0", "gpu1"], base)
    for a, b, g, tok in steps:
        m.record_step(a, b, g, tok)
    for rid in "ABC":
        m.end(rid, ["gpu0", "gpu1"], base + 4000 * ms)
    for k in (2, 3, 4):
        for g in sampler.latest:
            sampler.latest[g] = base + k * s
        m._pass()
    m.close(0)
    assert m.counters["pass_errors"] == 0
    e = {r.id: r.energy_j for r in got}
    assert set(e) == set("ABC")
    idle = 2 * 50.0 * 4.0 / 3  # each one's share of both GPUs' idle
    # A and C: their slices (2 x 100 x 10 ms x 100 W) and the other stage's waits meanwhile (2 x 100 x 10 ms x 40 W)
    assert e["A"] - idle == pytest.approx(280.0, rel=0.02) and e["C"] - idle == pytest.approx(280.0, rel=0.02)
    assert e["B"] - idle < 0.01 * (e["A"] - idle)
