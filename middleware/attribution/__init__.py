"""Offline and live attribution: a power trace plus what ran when, to each request's energy.

* :mod:`.inputs`: :class:`Requests`, :class:`Steps`, :class:`BatchStep` (what ran when);
* :mod:`.attribute`: :func:`attribute`, the engine that puts the pieces together;
* :mod:`.results`: what it returns (:class:`Attribution`, :class:`DeviceSummary`, :class:`StepModel`);
* :mod:`.energy`: a device's cumulative energy from power readings or an energy counter;
* :mod:`.idle`: the idle baseline;
* :mod:`.fit`: the batch fit (step features, non-negative least squares, the noise band);
* :mod:`.reconcile`: conservation (requests + unattributed = measured);
* :mod:`.family`: the step-energy model's basis and family selection;
* :mod:`.groups`: device groups (tensor/pipeline parallel);
* :mod:`.jsonl`: reading requests and batch steps from JSON lines files.
"""

from __future__ import annotations

from ..devices import device_key
from .attribute import attribute
from .inputs import FEATURES, BatchStep, Requests, Steps
from .results import Attribution, DeviceSummary, StepModel

__all__ = ["FEATURES", "Attribution", "BatchStep", "DeviceSummary", "Requests", "StepModel", "Steps", "attribute", "device_key"]
