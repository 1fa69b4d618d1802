"""A labelled stand-in for a power sensor: synthesises GPU power from the activity it is told about.

For demos and tests on machines without a GPU. Every device it reports says
``sensor="simulated"`` and ``simulated=True``, so nothing downstream can mistake its
numbers for measurements.
"""

from __future__ import annotations

import math
import os
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import TypeAlias

import numpy as np

from .power_model import PowerModel
from ..samples import DeviceInfo, SampleBatch, SampleKind

__all__ = ["SimulatedSource"]

_M64 = (1 << 64) - 1


_Event: TypeAlias = "tuple[int, int] | tuple[int, int, int, int]"  # a request (t_ns, +1/-1) or a step


class _Device:
    """One simulated device: reported activity not yet turned into samples, and the signal's state."""

    __slots__ = ("info", "index", "events", "pending_req", "pending_steps", "in_flight", "next_k", "power_w", "energy_j")

    def __init__(self, info: DeviceInfo, index: int, max_events: int) -> None:
        self.info = info
        self.index = index
        self.events: deque[_Event] = deque(maxlen=max_events)
        self.pending_req: list[tuple[int, int]] = []  # (t_ns, +1/-1)
        self.pending_steps: list[tuple[int, int, int, int]] = []  # (start_ns, end_ns, tokens, prefill_tokens)
        self.in_flight = 0
        self.next_k: int | None = None  # next grid index to emit
        self.power_w = 0.0  # dynamic power above idle at grid point next_k
        self.energy_j = 0.0  # cumulative energy at grid point next_k


class SimulatedSource:
    """A :class:`~wattspan.sources.PowerSource` whose power is synthesised, never measured.

    Hooks tell it what each device is doing: :meth:`on_request_start`,
    :meth:`on_request_end` (timed by ``clock`` when called) and :meth:`on_step` (a batch
    step's own start/end times). These are thread-safe and cheap (one deque append).
    :meth:`poll` turns that activity into readings on a grid of ``resolution_ns`` (1 ms):
    an INSTANT power column (``idle_w`` + the :class:`~wattspan.simulate.PowerModel`'s step
    power, lagged by its ``tau_s``, plus ``noise_w`` of gaussian noise) and a cumulative
    ENERGY column (J, from 0 at the first sample, the rectangle rule of that power). It
    emits grid points up to ``delay_ns`` (100 ms) before now, so that steps reported when
    they end are included; a step reported later than that misses the samples already
    emitted (counted in ``late_steps``). Samples are a deterministic function of ``seed``,
    the activity and the first poll time, however often ``poll`` is called.
    """

    name = "simulated"
    #: its readings carry the trace's (or grid's) own times and every one since the last poll comes back:
    #: the sampler may poll it this rarely (seconds) and get the same readings (see wattspan.sampler.Sampler)
    poll_every_s = 0.5  # the meter's default period: a pass finds the readings of the last poll at most a period old

    def __init__(
        self,
        *,
        devices: Sequence[str] = ("gpu0",),
        idle_w: float = 70.0,
        power_model: PowerModel | None = None,
        seed: int = 0,
        resolution_ns: int = 1_000_000,
        delay_ns: int = 100_000_000,
        max_events: int = 65536,
        clock: Callable[[], int] = time.monotonic_ns,
    ) -> None:
        devices = list(devices)
        if not devices or len(set(devices)) != len(devices) or not all(isinstance(d, str) and d for d in devices):
            raise ValueError(f"SimulatedSource devices must be distinct non-empty strings like 'gpu0', got {devices!r}")
        if not idle_w >= 0:
            raise ValueError(f"SimulatedSource idle_w must be >= 0 W, got {idle_w!r}")
        if resolution_ns <= 0 or delay_ns < 0 or max_events < 16:
            raise ValueError("SimulatedSource needs resolution_ns > 0, delay_ns >= 0 and max_events >= 16")
        self.model = power_model or PowerModel()
        self.idle_w = float(idle_w)
        self.seed = int(seed)
        self.resolution_ns = int(resolution_ns)
        self.delay_ns = int(delay_ns)
        self._clock = clock
        self._alpha = math.exp(-self.resolution_ns * 1e-9 / self.model.tau_s)
        self.errors = 0
        self.late_steps = 0
        self.dropped = 0
        _identity = os.urandom(8).hex()  # each simulated GPU is this source's own: no process shares it
        self._devices = {
            d: _Device(DeviceInfo(id=d, name="simulated GPU (no sensor)", kind="gpu", sensor="simulated", simulated=True,
                                  power_kind=SampleKind.INSTANT, window_ns=0,
                                  extra={"idle_w": self.idle_w, "note": "power synthesised from reported activity, not measured",
                                         "identity": f"simulated:{_identity}:{d}"}),
                       i, max_events)
            for i, d in enumerate(devices)
        }

    # ------------------------------------------------------------------ hooks (any thread)

    def _device(self, device: str) -> _Device:
        try:
            return self._devices[device]
        except KeyError:
            raise ValueError(f"unknown device {device!r}: this SimulatedSource meters {list(self._devices)}") from None

    def _push(self, dev: _Device, item: _Event) -> None:
        if len(dev.events) == dev.events.maxlen:
            self.dropped += 1
        dev.events.append(item)

    def on_request_start(self, device: str) -> None:
        """A request began on ``device`` (now, by ``clock``)."""
        self._push(self._device(device), (self._clock(), 1))

    def on_request_end(self, device: str) -> None:
        """A request ended on ``device`` (now, by ``clock``)."""
        self._push(self._device(device), (self._clock(), -1))

    def on_step(self, device: str, start_ns: int, end_ns: int, tokens: int, prefill_tokens: int = 0) -> None:
        """A batch step ran on ``device`` over ``[start_ns, end_ns)`` (monotonic ns) and processed
        ``tokens`` tokens, ``prefill_tokens`` of them prompt (prefill) tokens."""
        dev = self._device(device)
        if not end_ns > start_ns:
            raise ValueError(f"on_step: end_ns ({end_ns}) must be after start_ns ({start_ns})")
        if not 0 <= prefill_tokens <= tokens:
            raise ValueError(f"on_step: need 0 <= prefill_tokens ({prefill_tokens}) <= tokens ({tokens})")
        self._push(dev, (int(start_ns), int(end_ns), int(tokens), int(prefill_tokens)))

    # ------------------------------------------------------------------ PowerSource

    def devices(self) -> list[DeviceInfo]:
        return [d.info for d in self._devices.values()]

    def poll(self) -> list[SampleBatch]:
        """Readings for grid points since the last poll, up to ``delay_ns`` before now."""
        last_k = (self._clock() - self.delay_ns) // self.resolution_ns
        out: list[SampleBatch] = []
        for dev in self._devices.values():
            try:
                batch = self._poll_device(dev, last_k)
            except Exception:  # a poll must never raise; count it and carry on
                self.errors += 1
                continue
            if batch:
                out.extend(batch)
        return out

    def close(self) -> None:
        for dev in self._devices.values():
            dev.events.clear()
            dev.pending_req.clear()
            dev.pending_steps.clear()

    # ------------------------------------------------------------------ synthesis

    def _poll_device(self, dev: _Device, last_k: int) -> list[SampleBatch] | None:
        while True:
            try:
                item = dev.events.popleft()
            except IndexError:
                break
            if len(item) == 2:
                dev.pending_req.append(item)
            else:
                dev.pending_steps.append(item)
        if dev.next_k is None:
            dev.next_k = last_k
        if last_k < dev.next_k:
            return None
        k = np.arange(dev.next_k, last_k + 1, dtype=np.int64)
        g = k * self.resolution_ns
        g_last = int(g[-1])

        # requests in flight at each grid point
        dev.pending_req.sort()
        n_now = sum(1 for t, _ in dev.pending_req if t <= g_last)
        now_ev, dev.pending_req = dev.pending_req[:n_now], dev.pending_req[n_now:]
        if now_ev:
            et = np.fromiter((t for t, _ in now_ev), dtype=np.int64, count=n_now)
            cum = np.concatenate([[0], np.cumsum([d for _, d in now_ev])])
            in_flight = dev.in_flight + cum[np.searchsorted(et, g, side="right")]
            dev.in_flight = max(0, dev.in_flight + int(cum[-1]))
        else:
            in_flight = np.full(k.shape[0], dev.in_flight)

        # steps: their power over the grid points they cover
        step_w = np.zeros(k.shape[0])
        keep = []
        if dev.pending_steps:
            s = np.array(dev.pending_steps, dtype=np.int64)
            w = self.model.step_dynamic_w(duration_s=(s[:, 1] - s[:, 0]) * 1e-9, prefill_tokens=s[:, 3],
                                          decode_tokens=s[:, 2] - s[:, 3], idle_w=self.idle_w)
            i0 = np.searchsorted(g, s[:, 0], side="left")
            i1 = np.searchsorted(g, s[:, 1], side="left")
            for j, step in enumerate(dev.pending_steps):
                if step[1] <= g[0]:
                    self.late_steps += 1
                    continue
                if i1[j] > i0[j]:
                    np.maximum(step_w[i0[j]:i1[j]], w[j], out=step_w[i0[j]:i1[j]])
                if step[1] > g_last + self.resolution_ns:  # covers grid points not emitted yet
                    keep.append(step)
        dev.pending_steps = keep
        target = np.where(step_w > 0, step_w, np.where(in_flight > 0, self.model.between_steps_w, 0.0))

        # first-order lag: the sample at g[i] is the state there; target[i] acts over [g[i], g[i+1])
        # and the energy counter by the rectangle rule, summed in time order so that the
        # values do not depend on how the grid was split between polls
        a, dt_s, idle = self._alpha, self.resolution_ns * 1e-9, self.idle_w
        p, e = dev.power_w, dev.energy_j
        power, energy = [], []
        for tg, z in zip(target.tolist(), (self.model.noise_w * _normal(self.seed, dev.index, k)).tolist()):
            pw = max(0.0, idle + p + z)
            power.append(pw)
            energy.append(e)
            e += pw * dt_s
            p = tg + (p - tg) * a
        dev.power_w, dev.energy_j = p, e
        dev.next_k = last_k + 1
        name = dev.info.id
        return [SampleBatch(name, SampleKind.INSTANT, g, np.array(power)), SampleBatch(name, SampleKind.ENERGY, g, np.array(energy))]


def _normal(seed: int, device: int, k: np.ndarray) -> np.ndarray:
    """Standard normal noise as a pure function of (seed, device, grid index): splitmix64 + Box-Muller."""
    base = np.uint64((((seed & 0xFFFFFFFF) << 20) ^ (device * 0x9E3779B97F4A7C15)) & _M64)
    x = (k.astype(np.uint64) << np.uint64(1)) + base
    u1 = _unit(x)
    u2 = _unit(x + np.uint64(1))
    out: np.ndarray = np.sqrt(-2.0 * np.log1p(-u1)) * np.cos(2.0 * np.pi * u2)
    return out


def _unit(x: np.ndarray) -> np.ndarray:
    z = x + np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    z = z ^ (z >> np.uint64(31))
    out: np.ndarray = (z >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))
    return out
