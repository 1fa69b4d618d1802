"""NVIDIA GPUs through NVML (NVIDIA's ``nvidia-ml-py`` binding, imported as ``pynvml``).

For each GPU two readings are probed at start-up and the best that works is kept:

* energy: ``nvmlDeviceGetTotalEnergyConsumption`` (mJ since the driver loaded,
  Volta and newer) -> ENERGY samples in joules, for totals;
* power, in order of preference, for shape:
  ``"power-instant"``: field ``NVML_FI_DEV_POWER_INSTANT`` of ``nvmlDeviceGetFieldValues`` (mW) -> INSTANT;
  ``"power-samples"``: the driver's buffer ``nvmlDeviceGetSamples(NVML_TOTAL_POWER_SAMPLES)`` (mW),
  read incrementally from the last timestamp seen -> INSTANT;
  ``"power-usage"``: ``nvmlDeviceGetPowerUsage`` (mW): on Ampere and newer, except GA100
  (A100/A30/A800), a 1 s average -> AVERAGE with ``window_ns = 1e9``; otherwise INSTANT.

``DeviceInfo.sensor`` says what was chosen (``"nvml:energy-counter+power-instant"``) and
``DeviceInfo.extra["probes"]`` what each probe gave (``"ok"``, ``"not tried"`` or why it failed).
"""

from __future__ import annotations

import re
import threading
import time
from typing import Any

import numpy as np
import pynvml

from ..logs import LogOnce, get_logger
from ..samples import DeviceInfo, SampleBatch, SampleKind
from ._base import SourceUnavailable

__all__ = ["NvmlSource", "POWER_PROBES"]

log = get_logger(__name__)

ENERGY_PROBE = "energy-counter"
POWER_PROBES = ("power-instant", "power-samples", "power-usage")
_ALIASES = {"energy": ENERGY_PROBE, "instant": "power-instant", "samples": "power-samples", "usage": "power-usage"}

# errors after which a GPU is not read again this run
_LOST_CODES = frozenset({pynvml.NVML_ERROR_GPU_IS_LOST, pynvml.NVML_ERROR_UNKNOWN, pynvml.NVML_ERROR_RESET_REQUIRED})

# GA100 parts (A100, A800, A30) report nvmlDeviceGetPowerUsage as an instant reading although they are Ampere
_GA100 = re.compile(r"\bA(?:100|800|30)\b")
# when the architecture query fails: names of parts known to average over 1 s (Ampere/Ada/Hopper/Blackwell)
_AVERAGING_NAMES = re.compile(r"\b(?:G?H(?:100|200|800|20)|G?B(?:100|200|300)|L4|L40S?|L20|A(?:2|10G?|16|40|6000)|RTX [345]0\d0)\b")

_ARCH_NAMES = {
    getattr(pynvml, n): n.replace("NVML_DEVICE_ARCH_", "").lower()
    for n in dir(pynvml)
    if n.startswith("NVML_DEVICE_ARCH_") and isinstance(getattr(pynvml, n), int)
}

_VALUE_FIELD = {
    pynvml.NVML_VALUE_TYPE_DOUBLE: "dVal",
    pynvml.NVML_VALUE_TYPE_UNSIGNED_INT: "uiVal",
    pynvml.NVML_VALUE_TYPE_UNSIGNED_LONG: "ulVal",
    pynvml.NVML_VALUE_TYPE_UNSIGNED_LONG_LONG: "ullVal",
    pynvml.NVML_VALUE_TYPE_SIGNED_LONG_LONG: "sllVal",
    pynvml.NVML_VALUE_TYPE_SIGNED_INT: "siVal",
    pynvml.NVML_VALUE_TYPE_UNSIGNED_SHORT: "usVal",
}


def _value(value_type: int, value: object) -> float:
    """A ``c_nvmlValue_t`` union read as the member its type names."""
    return float(getattr(value, _VALUE_FIELD.get(int(value_type), "uiVal")))


def _why(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def _wall_offset_ns() -> int:
    """``time.time_ns() - time.monotonic_ns()``, measured now (wall clock steps are followed)."""
    a = time.monotonic_ns()
    w = time.time_ns()
    b = time.monotonic_ns()
    return w - (a + b) // 2


class _Gpu:
    __slots__ = ("index", "id", "handle", "info", "energy", "power", "power_kind", "window_ns",
                 "last_mj", "offset_mj", "samples_last_us", "field_last_us", "lost")

    def __init__(self, index: int, handle: Any) -> None:  # an NVML device handle
        self.index = index
        self.id = f"gpu{index}"  # the device id, as in its DeviceInfo
        self.handle = handle
        self.info: DeviceInfo | None = None
        self.energy = False
        self.power: str | None = None
        self.power_kind = SampleKind.INSTANT
        self.window_ns = 0
        self.last_mj = 0
        self.offset_mj = 0  # added after a counter reset (driver reload)
        self.samples_last_us = 0
        self.field_last_us = 0
        self.lost = False


class NvmlSource:
    """A :class:`~wattspan.sources.PowerSource` for NVIDIA GPUs through NVML.

    ``indices``: NVML indices of the GPUs to meter (default all; NVML numbers
    GPUs by PCI bus and ignores ``CUDA_VISIBLE_DEVICES``). ``prefer``: a power
    probe to try first (``"power-instant"``, ``"power-samples"`` or
    ``"power-usage"``, or ``"instant"``/``"samples"``/``"usage"``); the others
    follow in the default order (``"energy-counter"``/``"energy"`` or ``None``:
    the default order). The energy counter is always read where it works.

    Attributes: ``errors`` (failed reads), ``skipped`` ({device id: why} for GPUs
    not metered), ``prefer``.

    Device ids are ``"gpu<NVML index>"``. A GPU that falls off the bus mid-run
    (``GPU is lost``, ``Unknown Error``, ``GPU requires reset``) is logged once,
    counted in :attr:`errors`, marked ``extra["lost"] = True`` and skipped;
    :meth:`poll` never raises.

    NVML calls block while the driver answers (usually microseconds, longer on a
    troubled GPU): construct the source outside the event loop, and let the
    :class:`~wattspan.sampler.Sampler`'s thread do all polling.
    """

    name = "nvml"

    def __init__(self, *, indices: list[int] | None = None, prefer: str | None = None) -> None:
        if prefer is not None:
            key = _ALIASES.get(prefer, prefer)
            if key not in POWER_PROBES and key != ENERGY_PROBE:
                raise ValueError(f"NvmlSource prefer must be one of {', '.join((ENERGY_PROBE,) + POWER_PROBES)} "
                                 f"(or {', '.join(_ALIASES)}), got {prefer!r}")
            prefer = key
        self.prefer = prefer
        self.errors = 0
        self._lock = threading.Lock()
        self._once = LogOnce(log)
        self._closed = False
        try:
            pynvml.nvmlInit()
        except pynvml.NVMLError as exc:
            raise SourceUnavailable(
                f"NVML is not available ({exc}): no NVIDIA driver here? NvmlSource needs the NVIDIA driver "
                "(it provides libnvidia-ml.so.1) and a GPU. Without one, meter the CPU with RaplSource, replay a "
                "recorded trace with ReplaySource, or use the SimulatedSource (labelled simulated)."
            ) from exc
        except OSError as exc:  # a broken libnvidia-ml install
            raise SourceUnavailable(f"NVML could not be loaded ({exc}): reinstall the NVIDIA driver") from exc
        try:
            self._gpus = self._open(indices)
        except BaseException:
            self._shutdown()
            raise

    # ------------------------------------------------------------------ start-up

    def _open(self, indices: list[int] | None) -> list[_Gpu]:
        count = pynvml.nvmlDeviceGetCount()
        if count == 0:
            raise SourceUnavailable("NVML found no GPU (nvmlDeviceGetCount() is 0): check `nvidia-smi`")
        if indices is None:
            indices = list(range(count))
        else:
            indices = list(indices)
            bad = [i for i in indices if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < count]
            if bad or len(set(indices)) != len(indices):
                raise SourceUnavailable(
                    f"NvmlSource indices {indices!r} must be distinct NVML indices in 0..{count - 1} "
                    f"({count} GPU{'s' if count != 1 else ''} here; see `nvidia-smi -L`)"
                )
        gpus: list[_Gpu] = []
        failed: dict[str, str] = {}
        for i in indices:
            try:
                g = _Gpu(i, pynvml.nvmlDeviceGetHandleByIndex(i))
                self._probe(g)
            except pynvml.NVMLError as exc:
                failed[f"gpu{i}"] = _why(exc)
                log.warning("wattspan: GPU %d not metered: %s", i, _why(exc))
                continue
            if g.info is None:
                failed[f"gpu{i}"] = "no power or energy reading works"
                continue
            gpus.append(g)
        if not gpus:
            raise SourceUnavailable(
                "NVML answered but no GPU gave a power or energy reading: "
                + "; ".join(f"{k}: {v}" for k, v in failed.items())
            )
        self.skipped = failed
        return gpus

    def _probe(self, g: _Gpu) -> None:
        h = g.handle
        name = pynvml.nvmlDeviceGetName(h)
        if isinstance(name, bytes):
            name = name.decode(errors="replace")
        probes: dict[str, str] = {}
        arch: int | None
        extra: dict[str, Any] = {"index": g.index, "probes": probes}
        try:
            arch = int(pynvml.nvmlDeviceGetArchitecture(h))
            extra["architecture"] = _ARCH_NAMES.get(arch, str(arch))
        except pynvml.NVMLError as exc:
            arch = None
            extra["architecture"] = f"unknown ({_why(exc)})"

        try:
            mj = int(pynvml.nvmlDeviceGetTotalEnergyConsumption(h))
            g.energy, g.last_mj = True, mj
            probes[ENERGY_PROBE] = "ok"
        except pynvml.NVMLError as exc:
            if exc.value in _LOST_CODES:
                raise
            probes[ENERGY_PROBE] = _why(exc)

        order = list(POWER_PROBES)
        if self.prefer in POWER_PROBES:
            order.remove(self.prefer)
            order.insert(0, self.prefer)
        for probe in order:
            if g.power is not None:
                probes[probe] = "not tried"
                continue
            try:
                why = getattr(self, "_probe_" + probe.replace("-", "_"))(g, name, arch, extra)
            except pynvml.NVMLError as exc:
                if exc.value in _LOST_CODES:
                    raise
                why = _why(exc)
            if why is None:
                g.power = probe
                probes[probe] = "ok"
            else:
                probes[probe] = why

        if not g.energy and g.power is None:
            log.warning("wattspan: GPU %d (%s) gives neither energy nor power through NVML: %s", g.index, name, probes)
            return
        parts = ([ENERGY_PROBE] if g.energy else []) + ([g.power] if g.power else [])
        if g.power == "power-usage" and g.power_kind == SampleKind.AVERAGE:
            parts[-1] = "power-usage-avg1s"
        extra["power"] = g.power
        try:  # the physical GPU's identity: the peer group key (see wattspan.meter.peers)
            uuid = pynvml.nvmlDeviceGetUUID(g.handle)
            extra["identity"] = "nvml:" + (uuid.decode() if isinstance(uuid, bytes) else str(uuid))
        except Exception:
            extra["identity"] = f"nvml:index{g.index}:{name}"
        extra["energy"] = g.energy
        extra["lost"] = False
        g.info = DeviceInfo(
            id=g.id,
            name=name,
            kind="gpu",
            sensor="nvml:" + "+".join(parts),
            simulated=False,
            power_kind=g.power_kind,
            window_ns=g.window_ns,
            extra=extra,
        )

    def _probe_power_instant(self, g: _Gpu, name: str, arch: int | None, extra: dict[str, Any]) -> str | None:
        v = pynvml.nvmlDeviceGetFieldValues(g.handle, [(pynvml.NVML_FI_DEV_POWER_INSTANT, 0)])[0]
        if v.nvmlReturn != pynvml.NVML_SUCCESS:
            return _why(pynvml.NVMLError(v.nvmlReturn))
        mw = _value(v.valueType, v.value)
        if not mw > 0:
            return f"field NVML_FI_DEV_POWER_INSTANT read {mw:g} mW"
        g.power_kind, g.window_ns = SampleKind.INSTANT, 0
        return None

    def _probe_power_samples(self, g: _Gpu, name: str, arch: int | None, extra: dict[str, Any]) -> str | None:
        try:
            _, samples = pynvml.nvmlDeviceGetSamples(g.handle, pynvml.NVML_TOTAL_POWER_SAMPLES, 0)
        except pynvml.NVMLError_NotFound:
            return "sample buffer is empty"
        if not samples:
            return "sample buffer is empty"
        # only readings taken from now on are returned
        g.samples_last_us = max(int(s.timeStamp) for s in samples)
        g.power_kind, g.window_ns = SampleKind.INSTANT, 0
        return None

    def _probe_power_usage(self, g: _Gpu, name: str, arch: int | None, extra: dict[str, Any]) -> str | None:
        mw = pynvml.nvmlDeviceGetPowerUsage(g.handle)
        if not mw > 0:
            return f"nvmlDeviceGetPowerUsage read {mw} mW"
        if arch is not None and arch != pynvml.NVML_DEVICE_ARCH_UNKNOWN:
            averaged = arch >= pynvml.NVML_DEVICE_ARCH_AMPERE and not _GA100.search(name)
            extra["power_usage"] = "1 s average (Ampere or newer, not GA100)" if averaged else "instant (before Ampere, or GA100)"
        else:
            averaged = bool(_AVERAGING_NAMES.search(name)) and not _GA100.search(name)
            extra["power_usage"] = ("1 s average (guessed from the name)" if averaged
                                    else "instant (guessed: architecture unknown)")
        if averaged:
            g.power_kind, g.window_ns = SampleKind.AVERAGE, 1_000_000_000
        else:
            g.power_kind, g.window_ns = SampleKind.INSTANT, 0
        return None

    # ------------------------------------------------------------------ PowerSource

    def devices(self) -> list[DeviceInfo]:
        return [g.info for g in self._gpus if g.info is not None]  # only probed GPUs are kept

    def poll(self) -> list[SampleBatch]:
        """The readings since the previous poll, for every GPU not lost; never raises."""
        out: list[SampleBatch] = []
        with self._lock:
            if self._closed:
                return out
            for g in self._gpus:
                info = g.info
                if g.lost or info is None:
                    continue
                for read in (self._read_energy, self._read_power):
                    try:
                        read(g, out)
                    except pynvml.NVMLError as exc:
                        self.errors += 1
                        if exc.value in _LOST_CODES:
                            g.lost = True
                            info.extra["lost"] = True
                            log.error("wattspan: %s (%s) is lost (%s): no more readings from it this run",
                                      info.id, info.name, _why(exc))
                            break
                        self._log_once(g, info, exc)
                    except Exception as exc:  # a poll never raises
                        self.errors += 1
                        self._log_once(g, info, exc)
        return out

    def close(self) -> None:
        """Release NVML (once)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._shutdown()

    # ------------------------------------------------------------------ internals

    def _shutdown(self) -> None:
        try:
            pynvml.nvmlShutdown()
        except Exception as exc:  # already shut down, or the driver went away
            log.debug("wattspan: nvmlShutdown: %s", exc)

    def _log_once(self, g: _Gpu, info: DeviceInfo, exc: BaseException) -> None:
        self._once.warning((g.index, type(exc).__name__, str(exc)),
                           "wattspan: reading %s failed: %s (counted in errors; logged once)", info.id, _why(exc))

    def _read_energy(self, g: _Gpu, out: list[SampleBatch]) -> None:
        if g.energy:
            h, dev = g.handle, g.id
            t0 = time.monotonic_ns()
            mj = int(pynvml.nvmlDeviceGetTotalEnergyConsumption(h))
            t = (t0 + time.monotonic_ns()) // 2
            if mj < g.last_mj:  # the driver was reloaded: the counter restarted from 0
                g.offset_mj += g.last_mj
            g.last_mj = mj
            out.append(SampleBatch(dev, SampleKind.ENERGY, np.array([t], dtype=np.int64),
                                   np.array([(mj + g.offset_mj) * 1e-3])))

    def _read_power(self, g: _Gpu, out: list[SampleBatch]) -> None:
        h, dev, p = g.handle, g.id, g.power
        if p == "power-instant":
            t0 = time.monotonic_ns()
            v = pynvml.nvmlDeviceGetFieldValues(h, [(pynvml.NVML_FI_DEV_POWER_INSTANT, 0)])[0]
            t1 = time.monotonic_ns()
            if v.nvmlReturn != pynvml.NVML_SUCCESS:
                raise pynvml.NVMLError(v.nvmlReturn)
            ts_us = int(v.timestamp)
            if ts_us:
                if ts_us == g.field_last_us:  # the driver has not refreshed it since the last poll
                    return
                g.field_last_us = ts_us
                t = ts_us * 1000 - _wall_offset_ns()
                t = min(max(t, t0 - 1_000_000_000), t1)  # a wall-clock step must not move it far
            else:
                t = (t0 + t1) // 2
            out.append(SampleBatch(dev, SampleKind.INSTANT, np.array([t], dtype=np.int64),
                                   np.array([_value(v.valueType, v.value) * 1e-3])))
        elif p == "power-samples":
            try:
                vt, samples = pynvml.nvmlDeviceGetSamples(h, pynvml.NVML_TOTAL_POWER_SAMPLES, g.samples_last_us)
            except pynvml.NVMLError_NotFound:  # nothing new since the last timestamp
                return
            offset = _wall_offset_ns()
            if not samples:
                return
            ts = np.fromiter((s.timeStamp for s in samples), dtype=np.int64, count=len(samples))
            field = _VALUE_FIELD.get(int(vt), "uiVal")
            mw = np.fromiter((getattr(s.sampleValue, field) for s in samples), dtype=np.float64, count=len(samples))
            new = ts > g.samples_last_us
            if not new.all():
                ts, mw = ts[new], mw[new]
            if ts.shape[0] == 0:
                return
            if ts.shape[0] > 1 and not (np.diff(ts) > 0).all():
                ts, first = np.unique(ts, return_index=True)
                mw = mw[first]
            g.samples_last_us = int(ts[-1])
            mono = ts * 1000 - offset
            ahead = int(mono[-1]) - time.monotonic_ns()
            if ahead > 0:  # the wall clock stepped back since the driver stamped them: the newest is taken as read now
                mono = mono - ahead
            out.append(SampleBatch(dev, SampleKind.INSTANT, mono, mw * 1e-3))
        elif p == "power-usage":
            t0 = time.monotonic_ns()
            mw = pynvml.nvmlDeviceGetPowerUsage(h)
            t = (t0 + time.monotonic_ns()) // 2
            out.append(SampleBatch(dev, g.power_kind, np.array([t], dtype=np.int64), np.array([mw * 1e-3]),
                                   g.window_ns))
