"""Which GPUs a vLLM engine runs on, as wattspan's NVML device names.

vLLM places an engine's ``tensor_parallel_size x pipeline_parallel_size`` workers on
consecutive visible devices (rank = ``pp_rank * tp + tp_rank``); a data-parallel
replica with local rank ``r`` takes the ``r``-th such block (vLLM's
``get_physical_gpu_ids_for_local_dp_rank``). The visible devices are
``CUDA_VISIBLE_DEVICES`` entries, which are CUDA indices (in CUDA's order, which is not
NVML's unless ``CUDA_DEVICE_ORDER=PCI_BUS_ID``) or UUIDs (``GPU-...``, ``MIG-...``).
wattspan's NVML source names GPUs ``gpu<NVML index>``; so every entry is resolved to a
UUID first and the UUID to the NVML index: never index to index. An index entry is read
as a PCI-bus-order index (the order ``nvidia-smi`` and NVML use); set
``CUDA_DEVICE_ORDER=PCI_BUS_ID`` (vLLM recommends it) or give UUIDs to be exact.
A MIG instance meters as its parent GPU (NVML reports power per physical GPU).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

from wattspan.logs import get_logger

log = get_logger(__name__)

__all__ = ["nvml_uuids", "engine_devices", "engine_group", "stage_windows"]


def nvml_uuids() -> list[str]:
    """The UUID of each NVML device, in NVML index order (empty without NVML)."""
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception:
        return []
    try:
        out = []
        for i in range(pynvml.nvmlDeviceGetCount()):
            u = pynvml.nvmlDeviceGetUUID(pynvml.nvmlDeviceGetHandleByIndex(i))
            out.append(u.decode() if isinstance(u, bytes) else str(u))
        return out
    except Exception as exc:
        log.warning("wattspan: NVML device UUIDs unreadable (%s); GPUs named by index", exc)
        return []
    finally:
        try:
            pynvml.nvmlShutdown()
        except Exception:
            pass


def _resolve(entry: str, uuids: Sequence[str], mig_parent: Mapping[str, str] | None) -> str:
    e = entry.strip()
    if e.startswith("MIG-"):
        e = (mig_parent or {}).get(e) or _mig_parent_from_nvml(e) or e
    if e.startswith(("GPU-", "MIG-")):
        for i, u in enumerate(uuids):
            if u == e or (len(e) >= 8 and u.startswith(e)):  # CUDA accepts a unique UUID prefix
                return f"gpu{i}"
        raise ValueError(f"visible device {entry!r} is not among NVML's devices ({len(uuids)} found)")
    if e.isdigit():
        i = int(e)
        if uuids and i >= len(uuids):
            raise ValueError(f"visible device {entry!r} is out of range: NVML has {len(uuids)} devices")
        return f"gpu{i}"
    raise ValueError(f"visible device {entry!r} is neither an index nor a GPU-/MIG- UUID")


def _mig_parent_from_nvml(mig_uuid: str) -> str | None:
    """The UUID of the physical GPU a MIG instance is on (NVML), or None."""
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            h = pynvml.nvmlDeviceGetDeviceHandleFromMigDeviceHandle(pynvml.nvmlDeviceGetHandleByUUID(mig_uuid))
            u = pynvml.nvmlDeviceGetUUID(h)
            return u.decode() if isinstance(u, bytes) else str(u)
        finally:
            pynvml.nvmlShutdown()
    except Exception:
        return None


def engine_devices(tp: int, pp: int = 1, *, local_dp_rank: int = 0, visible: str | None = None,
                   uuids: Sequence[str] | None = None, mig_parent: Mapping[str, str] | None = None) -> list[list[str]]:
    """The NVML device names of each pipeline stage (stage ``s``: a list of ``tp`` names).

    ``visible``: ``CUDA_VISIBLE_DEVICES`` (default: the environment's; unset: all NVML devices);
    ``uuids``: NVML's UUIDs in index order (default: read from NVML); ``mig_parent``: MIG UUID ->
    parent GPU UUID."""
    if tp < 1 or pp < 1:
        raise ValueError(f"tensor and pipeline parallel sizes must be >= 1, got {tp!r}, {pp!r}")
    uuids = nvml_uuids() if uuids is None else list(uuids)
    visible = os.environ.get("CUDA_VISIBLE_DEVICES") if visible is None else visible
    entries = [v for v in visible.split(",") if v.strip()] if visible else [str(i) for i in range(len(uuids) or tp * pp * (local_dp_rank + 1))]
    world = tp * pp
    lo = local_dp_rank * world
    if lo + world > len(entries):
        raise ValueError(f"engine needs visible devices [{lo}, {lo + world}) but {len(entries)} are visible")
    names = [_resolve(e, uuids, mig_parent) for e in entries[lo:lo + world]]
    return [names[s * tp:(s + 1) * tp] for s in range(pp)]


def engine_group(vllm_config, **kw) -> tuple[str, list[str]]:
    """``(group, stage groups)`` of an engine from its ``vllm_config.parallel_config``: the
    device group every step runs on (``"gpu0,gpu1"``) and each pipeline stage's group."""
    pc = vllm_config.parallel_config
    tp = int(getattr(pc, "tensor_parallel_size", 1) or 1)
    pp = int(getattr(pc, "pipeline_parallel_size", 1) or 1)
    dp_local = int(getattr(pc, "data_parallel_rank_local", 0) or 0)
    stages = engine_devices(tp, pp, local_dp_rank=dp_local, **kw)
    return ",".join(n for s in stages for n in s), [",".join(s) for s in stages]


def stage_windows(submit_ns: int, done_ns: int, prev_done_ns: int, pp: int) -> list[tuple[int, int]]:
    """When each pipeline stage ran one micro-batch, from what the engine core sees of it: when it
    was handed to the workers (``submit_ns``), when its output came back (``done_ns``, the last
    stage's end) and when the micro-batch before it came back (``prev_done_ns``).

    The stages are taken as balanced (vLLM splits the layers evenly), each running the micro-batch
    for ``d`` after the stage before it: stage ``k`` over ``[done - (pp - k) d, done - (pp - 1 - k) d)``.
    ``d`` is the smaller of ``(done - submit) / pp`` (a lone micro-batch goes through the stages
    one after another) and ``done - max(prev_done, submit)`` (in a full pipeline the micro-batches
    come out one stage-time apart, each stage already busy with the next one). Approximate where
    the stages are not balanced or a micro-batch queued for the first stage: on the simulated
    overlapped pipeline with a 45/55 % split (``benchmarks/accuracy.py --parallel``) the modelled
    windows tile each stage's time with no waits (a stage really waits about a quarter of it),
    and do about as well as the true windows there with the coarse sensors of that file."""
    total = done_ns - submit_ns
    if pp <= 1 or total <= 0:
        return [(submit_ns, done_ns)] * max(pp, 1)
    d = min(total / pp, float(done_ns - max(prev_done_ns, submit_ns)))
    d = max(d, 1.0)
    return [(max(submit_ns, int(done_ns - (pp - k) * d)), int(done_ns - (pp - 1 - k) * d)) for k in range(pp)]
