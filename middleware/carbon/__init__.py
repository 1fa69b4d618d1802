"""Carbon: joules to grams CO2e (grid intensity, PUE, embodied emissions).

* :mod:`.model`: the grid intensity table, :class:`Pue`, :class:`Embodied`, :class:`CarbonModel`;
* :mod:`.intensity`: hourly intensity providers (profiles, files, live services);
* :mod:`.records`: :func:`request_records`, the one place joules become grams on a
  :class:`~wattspan.records.RequestRecord` (host energy kept apart, priced with the accelerator's).

Budgets (:mod:`wattspan.budgets`) and deferral (:mod:`wattspan.deferral`) act on these figures.
"""

from __future__ import annotations

from .model import (
    EMBODIED_A100_SERVER_SHARE,
    CarbonModel,
    Embodied,
    GridIntensity,
    HttpJsonProvider,
    IntensityProvider,
    Pue,
    RequestCarbon,
    StaticProvider,
    default_pue,
    grid_intensity,
    wall_times,
)

__all__ = [
    "EMBODIED_A100_SERVER_SHARE",
    "CarbonModel",
    "Embodied",
    "GridIntensity",
    "HttpJsonProvider",
    "IntensityProvider",
    "Pue",
    "RequestCarbon",
    "StaticProvider",
    "default_pue",
    "grid_intensity",
    "wall_times",
]
