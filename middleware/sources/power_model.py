"""A GPU power model for simulation: what a batch step draws above idle, and how fast power follows.

Used by :mod:`wattspan.simulate` (the ground-truth server simulator) and by
:class:`wattspan.sources.simulated.SimulatedSource` (the labelled stand-in for a
sensor). Nothing here is a measurement.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["LAWS", "PowerModel"]

#: The step-power laws :class:`PowerModel` can follow (see its docstring).
LAW_NAMES = ("saturating", "energy-linear", "power-linear")


@dataclass(frozen=True)
class PowerModel:
    """Dynamic power (watts above the idle baseline) of an inference GPU as a function of
    what a batch step does, plus how the electrical power follows it.

    The defaults describe an H100 SXM serving an 8B-parameter model in bf16
    (idle about 90 W, board limit 700 W). For a step that lasts ``duration_s`` and
    processes ``prefill_tokens`` + ``decode_tokens`` tokens while reading
    ``context_tokens`` tokens of KV cache, the target power above idle is::

        active_w                                                    # clocks up, SMs busy
        + compute_w * (1 - exp(-tokens_per_s / tokens_sat_per_s))   # saturating in throughput
        + memory_w  * min(1, bytes_per_s / hbm_bytes_per_s)         # HBM traffic
                                                                    #   (weights + KV cache)

    capped so that idle + dynamic <= ``cap_w``. It is deliberately nonlinear in the
    step's composition (an additive per-token energy model cannot fit it exactly):
    a decode step of 32 sequences at ~800 tokens of context (about 11 ms) lands near
    290 W above idle, one of 64 sequences at ~2000 tokens (17 ms) near 320 W, a
    4096-token prefill step (about 150 ms) near 470 W above idle.

    Fields (units in the names):

    ``active_w`` (100 W): floor while any kernel runs; the difference between an
    H100 at idle clocks and one running memory-bound small kernels.
    ``compute_w`` (380 W) and ``tokens_sat_per_s`` (8000 tokens/s): the tensor-core
    part, saturating once the step is compute-bound (large prefill chunks).
    ``memory_w`` (140 W): HBM3 power at full bandwidth ``hbm_bytes_per_s`` (3.35e12 B/s).
    ``weight_bytes`` (16.06e9 B, 8.03B parameters in bf16) and ``kv_bytes_per_token``
    (131072 B: Llama-3-8B's 32 layers x 8 KV heads x 128 dims x 2 (K,V) x 2 B) set the
    bytes a step reads.
    ``between_steps_w`` (30 W): target while requests are in flight but no step runs
    (host scheduling gaps: clocks stay up); 0 W when nothing is in flight.
    ``cap_w`` (700 W): the board power limit.
    ``tau_s`` (4 ms): first-order time constant of the electrical response (voltage
    regulators, clock ramp): power lags step changes by a few ms.
    ``thermal_tau_s`` (20 s): time constant of the idle baseline's drift with temperature
    (leakage); how far it drifts is set by the simulator (``idle_drift_w``).
    ``step_jitter_rel`` (3 %): per-step random spread of the target (data-dependent
    switching activity), so equal compositions do not draw exactly equal power.
    ``noise_w`` (2 W): white noise on the true power at the simulator's grid.

    ``law`` picks the step-power law (the formula above is ``"saturating"``; real GPUs
    differ, and an attribution method must not assume one of them):

    * ``"energy-linear"``: a step's energy above idle is additive in what it does,
      ``active_w * duration + prefill_coef * prefill + decode_coef * decode + context_coef * context``
      (coefficients in J/token); its power is that energy over its duration.
    * ``"power-linear"``: a step's power above idle is linear in its composition,
      ``active_w + prefill_coef * prefill + decode_coef * decode + context_coef * context``
      (coefficients in W/token in the batch); its energy is that power times its duration.
    * ``"saturating"``: the throughput-saturating formula above (the coefficients unused).

    Every law is capped at ``cap_w`` (a low ``cap_w`` gives a board-limited GPU).
    """

    active_w: float = 100.0
    compute_w: float = 380.0
    tokens_sat_per_s: float = 8000.0
    memory_w: float = 140.0
    weight_bytes: float = 16.06e9
    kv_bytes_per_token: float = 131072.0
    hbm_bytes_per_s: float = 3.35e12
    between_steps_w: float = 30.0
    cap_w: float = 700.0
    tau_s: float = 0.004
    thermal_tau_s: float = 20.0
    step_jitter_rel: float = 0.03
    noise_w: float = 2.0
    law: str = "saturating"
    prefill_coef: float = 0.0
    decode_coef: float = 0.0
    context_coef: float = 0.0

    def __post_init__(self) -> None:
        for name in ("active_w", "compute_w", "memory_w", "between_steps_w", "weight_bytes",
                     "kv_bytes_per_token", "step_jitter_rel", "noise_w"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"PowerModel.{name} must be >= 0, got {getattr(self, name)!r}")
        for name in ("tokens_sat_per_s", "hbm_bytes_per_s", "cap_w", "tau_s", "thermal_tau_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"PowerModel.{name} must be > 0, got {getattr(self, name)!r}")
        if self.law not in LAW_NAMES:
            raise ValueError(f"PowerModel.law must be one of {LAW_NAMES}, got {self.law!r}")
        for name in ("prefill_coef", "decode_coef", "context_coef"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"PowerModel.{name} must be >= 0, got {getattr(self, name)!r}")

    def step_dynamic_w(
        self,
        *,
        duration_s: float | np.ndarray,
        prefill_tokens: float | np.ndarray,
        decode_tokens: float | np.ndarray,
        context_tokens: float | np.ndarray = 0.0,
        idle_w: float = 0.0,
    ) -> np.ndarray:
        """Target power above idle (W) of steps with the given composition (vectorised).

        ``duration_s`` in seconds (> 0); token counts per step; ``context_tokens`` the KV
        cache tokens the step reads (sum of its sequences' context lengths); ``idle_w``
        only serves the cap (``idle_w + result <= cap_w``).
        """
        d = np.asarray(duration_s, dtype=np.float64)
        if np.any(d <= 0):
            raise ValueError("PowerModel.step_dynamic_w: every duration_s must be > 0")
        pre = np.asarray(prefill_tokens, dtype=np.float64)
        dec = np.asarray(decode_tokens, dtype=np.float64)
        ctx = np.asarray(context_tokens, dtype=np.float64)
        limit = max(self.cap_w - idle_w, 0.0)
        if self.law != "saturating":
            lin = self.prefill_coef * pre + self.decode_coef * dec + self.context_coef * ctx
            if self.law == "energy-linear":
                lin = lin / d
            return np.minimum(self.active_w + lin, limit)
        tokens = pre + dec
        rate = tokens / d
        compute = self.compute_w * -np.expm1(-rate / self.tokens_sat_per_s)
        nbytes = self.weight_bytes + self.kv_bytes_per_token * np.asarray(context_tokens, dtype=np.float64)
        memory = self.memory_w * np.minimum(1.0, nbytes / d / self.hbm_bytes_per_s)
        return np.minimum(self.active_w + compute + memory, limit)


#: Step-power laws of the simulator family (H100-like magnitudes: a 32-sequence decode
#: step near 250-300 W above idle, a 4096-token prefill chunk near 400-470 W), each a
#: :class:`PowerModel`. ``capped`` is the saturating law on a board limited to 400 W, so
#: large steps sit at the cap. None of them is a measurement.
LAWS: dict[str, PowerModel] = {
    "saturating": PowerModel(),
    "energy-linear": PowerModel(law="energy-linear", active_w=120.0, prefill_coef=0.011, decode_coef=0.045,
                                context_coef=1.5e-5),
    "power-linear": PowerModel(law="power-linear", active_w=110.0, prefill_coef=0.075, decode_coef=3.5,
                               context_coef=1.2e-3),
    "capped": PowerModel(cap_w=400.0),
}
