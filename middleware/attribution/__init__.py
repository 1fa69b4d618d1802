"""Offline and live attribution: a power trace plus what ran when, to each request's energy.

* :mod:`.inputs`: :class:`Requests`, :class:`Steps` (what ran when);
* :mod:`.attribute`: :func:`attribute` and its results (:class:`Attribution`, :class:`DeviceSummary`, :class:`StepModel`);
* :mod:`.family`: the step-energy model's basis and family selection;
* :mod:`.groups`: device groups (tensor/pipeline parallel);
* :mod:`.jsonl`: reading requests and batch steps from JSON lines files.
"""

from __future__ import annotations

from .attribute import FEATURES, Attribution, DeviceSummary, Requests, StepModel, Steps, attribute, device_key

__all__ = ["FEATURES", "Attribution", "DeviceSummary", "Requests", "StepModel", "Steps", "attribute", "device_key"]
