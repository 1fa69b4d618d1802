"""The span attributes of a final record (:func:`record_attributes`).

Span attributes (:func:`record_attributes`; names from the OpenTelemetry
semantic conventions where one exists: ``hw.*``, ``gen_ai.*``):

===============================  ========  ==============================================
attribute                        type      meaning
===============================  ========  ==============================================
``wattspan.energy_j``            double    the request's accelerator energy, joules
                                           (dynamic + idle share)
``wattspan.energy.dynamic_j``    double    energy above the idle baseline, J
``wattspan.energy.idle_j``       double    the request's share of the idle baseline, J
``wattspan.energy.host_j``       double    the request's share of host (CPU package) energy, J
``wattspan.co2e_g``              double    grams CO2e: operational (accelerator + host energy x
                                           PUE x grid intensity) + embodied
``wattspan.co2e.embodied_g``     double    the embodied (manufacturing) part, g CO2e
``wattspan.device_s``            double    accelerator-seconds charged to the request
``wattspan.energy_j.low``        double    lower end of the 90 % band on ``energy_j``, J
                                           (when the attribution gave a band)
``wattspan.energy_j.high``       double    upper end of that band, J
``wattspan.quality``             string    ``good`` | ``coarse`` | ``misfit``: how well the
                                           step model fits the sensor's readings
``wattspan.method``              string    ``batch-fit`` | ``time-share`` | ``no-trace``
``wattspan.sensor``              string    which reading the energy rests on
``wattspan.coverage``            double    fraction of the request's life the power trace
                                           covered (0..1)
``wattspan.simulated``           boolean   true when the power came from the simulated
                                           source - never a measurement
``wattspan.status``              string    ``final`` (energy attached) | ``pending``
                                           (record not final in time; no energy)
``wattspan.request_id``          string    wattspan's request id (the ledger's key)
``wattspan.tenant``              string    the tenant, when known
``wattspan.intensity.*``         mixed     the intensity the carbon used: ``g_per_kwh``,
                                           ``provider``, ``zone``, ``hour`` (UTC), ``basis``
``wattspan.co2e.market_g``       double    market-based operational g CO2e, when a factor is set
``wattspan.co2e.marginal_g``     double    marginal operational g CO2e, when a provider is set
``hw.id``                        string    the device the request ran on (``gpu0``), or its
                                           device group (``gpu0,gpu1``)
``wattspan.device.ids``          string[]  a device group's members, when a group
``wattspan.device.energy_j``     double[]  the request's J on each of them, same order
``hw.type``                      string    ``gpu``
``gen_ai.request.model``         string    the model, when known
``gen_ai.usage.input_tokens``    int       prompt tokens, when known
``gen_ai.usage.output_tokens``   int       output tokens, when known
===============================  ========  ==============================================
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ...records import RequestRecord

if TYPE_CHECKING:
    from opentelemetry.util.types import AttributeValue

__all__ = ["record_attributes"]


def record_attributes(record: RequestRecord, into: dict[str, AttributeValue] | None = None) -> dict[str, AttributeValue]:
    """The span attributes for one final record (see the module's table).

    Optional values (model, tenant, token counts) are left out when unknown.
    ``into``: a dict to add them to (and return), after its own keys (one of them
    already there takes the record's value in its place), as ``{**into, **attrs}``
    would but without building a second dict: the span processor merges a
    record into a copy of its span's attributes this way.
    """
    a: dict[str, AttributeValue] = {} if into is None else into
    a["wattspan.energy_j"] = float(record.energy_j)
    a["wattspan.energy.dynamic_j"] = float(record.dynamic_j)
    a["wattspan.energy.idle_j"] = float(record.idle_j)
    a["wattspan.energy.host_j"] = float(record.host_j)
    a["wattspan.co2e_g"] = float(record.co2e_g)
    a["wattspan.co2e.embodied_g"] = float(record.embodied_g)
    a["wattspan.device_s"] = float(record.device_s)
    a["wattspan.method"] = record.method
    a["wattspan.sensor"] = record.sensor
    a["wattspan.coverage"] = float(record.coverage)
    a["wattspan.simulated"] = bool(record.simulated)
    a["wattspan.status"] = "final"
    a["wattspan.request_id"] = record.id
    a["hw.id"] = record.device
    a["hw.type"] = "gpu"
    if record.device_energy:  # a device group: each member's id and energy, in the same order
        parts = record.device_energy_j
        a["wattspan.device.ids"] = list(parts)
        a["wattspan.device.energy_j"] = [float(v) for v in parts.values()]
    if record.model:
        a["gen_ai.request.model"] = record.model
    if record.prompt_tokens:
        a["gen_ai.usage.input_tokens"] = int(record.prompt_tokens)
    if record.output_tokens:
        a["gen_ai.usage.output_tokens"] = int(record.output_tokens)
    if record.tenant:
        a["wattspan.tenant"] = record.tenant
    if record.intensity_provider:  # which intensity the carbon used (issue 11)
        a["wattspan.intensity.g_per_kwh"] = float(record.intensity_g_per_kwh)
        a["wattspan.intensity.provider"] = record.intensity_provider
        a["wattspan.intensity.zone"] = record.intensity_zone
        a["wattspan.intensity.hour"] = record.intensity_hour
        a["wattspan.intensity.basis"] = record.intensity_basis
        if record.market_g_per_kwh:
            a["wattspan.co2e.market_g"] = float(record.co2e_market_g)
        if record.marginal_g_per_kwh:
            a["wattspan.co2e.marginal_g"] = float(record.co2e_marginal_g)
    if record.energy_j_high > 0:
        a["wattspan.energy_j.low"] = float(record.energy_j_low)
        a["wattspan.energy_j.high"] = float(record.energy_j_high)
    if record.quality:
        a["wattspan.quality"] = record.quality
    return a
