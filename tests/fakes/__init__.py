"""Test stand-ins for what cannot exist on a machine without a GPU, and recorded traces.

``a100_power_instant.csv``: 200 readings (2.6 s) of a real NVIDIA A100's ``power.draw.instant``
as ``time_ns,gpu,power_w``; see ``TRACES.md`` for where it comes from and its licence.
"""

from pathlib import Path

HERE = Path(__file__).resolve().parent
A100_TRACE = HERE / "a100_power_instant.csv"
