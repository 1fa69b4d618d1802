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

from operator import itemgetter
from typing import TYPE_CHECKING, Any, Callable

from ...records import RecordBatch, RequestRecord

if TYPE_CHECKING:
    from opentelemetry.util.types import AttributeValue

__all__ = ["batch_attributes", "record_attributes"]


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


# record_attributes as a plan, in its order: (attribute, field, conversion, the fields that must all be
# set for it to be there: truthy, or > 0 for energy_j_high). A device group's attributes are not here:
# a batch with one takes record_attributes per record.
_ConditionField = str
_PLAN: tuple[tuple[str, str, Callable[[Any], Any] | None, tuple[_ConditionField, ...]], ...] = (
    ("wattspan.energy_j", "energy_j", float, ()),
    ("wattspan.energy.dynamic_j", "dynamic_j", float, ()),
    ("wattspan.energy.idle_j", "idle_j", float, ()),
    ("wattspan.energy.host_j", "host_j", float, ()),
    ("wattspan.co2e_g", "co2e_g", float, ()),
    ("wattspan.co2e.embodied_g", "embodied_g", float, ()),
    ("wattspan.device_s", "device_s", float, ()),
    ("wattspan.method", "method", None, ()),
    ("wattspan.sensor", "sensor", None, ()),
    ("wattspan.coverage", "coverage", float, ()),
    ("wattspan.simulated", "simulated", bool, ()),
    ("wattspan.status", "", None, ()),  # "final"
    ("wattspan.request_id", "id", None, ()),
    ("hw.id", "device", None, ()),
    ("hw.type", "", None, ()),  # "gpu"
    ("gen_ai.request.model", "model", None, ("model",)),
    ("gen_ai.usage.input_tokens", "prompt_tokens", int, ("prompt_tokens",)),
    ("gen_ai.usage.output_tokens", "output_tokens", int, ("output_tokens",)),
    ("wattspan.tenant", "tenant", None, ("tenant",)),
    ("wattspan.intensity.g_per_kwh", "intensity_g_per_kwh", float, ("intensity_provider",)),
    ("wattspan.intensity.provider", "intensity_provider", None, ("intensity_provider",)),
    ("wattspan.intensity.zone", "intensity_zone", None, ("intensity_provider",)),
    ("wattspan.intensity.hour", "intensity_hour", None, ("intensity_provider",)),
    ("wattspan.intensity.basis", "intensity_basis", None, ("intensity_provider",)),
    ("wattspan.co2e.market_g", "co2e_market_g", float, ("intensity_provider", "market_g_per_kwh")),
    ("wattspan.co2e.marginal_g", "co2e_marginal_g", float, ("intensity_provider", "marginal_g_per_kwh")),
    ("wattspan.energy_j.low", "energy_j_low", float, ("energy_j_high",)),
    ("wattspan.energy_j.high", "energy_j_high", float, ("energy_j_high",)),
    ("wattspan.quality", "quality", None, ("quality",)),
)
_FIXED = {"wattspan.status": "final", "hw.type": "gpu"}
# columns whose values record_attributes converts and a RecordBatch may hold as given (labels); the
# others are Python floats, bools and strings already (RecordBatch: of the record's field types)
_CONVERT_COLUMNS = frozenset(("prompt_tokens", "output_tokens"))


def _present(value: Any, field: str) -> bool:
    return bool(value > 0) if field == "energy_j_high" else bool(value)


def batch_attributes(batch: RecordBatch) -> tuple[list[tuple[str, ...]], list[tuple[Any, ...]]] | None:
    """:func:`record_attributes` of every record of ``batch``, from its columns: per record, the
    attribute names and their values (``dict(zip(names[i], values[i]))`` is
    ``record_attributes(batch[i])``: the same keys, order, values and types). None when a record is
    a device group's (take :func:`record_attributes` per record then)."""
    const, columns = batch.const, batch.columns
    if "device_energy" in columns or const["device_energy"]:
        return None
    n = len(batch)
    # each condition field: one answer for the whole batch, or one per record
    fixed: dict[str, bool] = {}
    masks: dict[str, list[bool]] = {}
    for field in {f for *_, cond in _PLAN for f in cond}:
        col = columns.get(field)
        if col is None:
            fixed[field] = _present(const[field], field)
            continue
        mask = [v > 0 for v in col] if field == "energy_j_high" else list(map(bool, col))
        if all(mask) or not any(mask):
            fixed[field] = bool(mask[0]) if mask else False
        else:
            masks[field] = mask
    plan = [entry for entry in _PLAN if all(fixed.get(f, True) for f in entry[3])]  # those never there: out
    names = tuple(entry[0] for entry in plan)
    cols: list[list[Any]] = []
    for attr, field, conv, _ in plan:
        if not field:
            cols.append([_FIXED[attr]] * n)
            continue
        col = columns.get(field)
        if col is None:
            v = const[field]
            cols.append([conv(v) if conv is not None else v] * n)
        elif conv is not None and field in _CONVERT_COLUMNS:
            cols.append(list(map(conv, col)))
        else:
            cols.append(col)
    rows = list(zip(*cols))
    if not masks:
        return [names] * n, rows
    # records of several shapes (some have a model, some not, ...): each shape's names, and a getter of its values
    mixed = list(masks)
    shapes: dict[tuple[bool, ...], tuple[tuple[str, ...], Callable[[tuple[Any, ...]], tuple[Any, ...]]]] = {}
    out_names: list[tuple[str, ...]] = []
    out_rows: list[tuple[Any, ...]] = []
    for shape, row in zip(zip(*(masks[f] for f in mixed)), rows):
        got = shapes.get(shape)
        if got is None:
            on = dict(zip(mixed, shape))
            keep = [i for i, entry in enumerate(plan) if all(on.get(f, True) for f in entry[3])]
            got = shapes[shape] = (tuple(names[i] for i in keep), itemgetter(*keep))  # >= 15 kept: a tuple
        out_names.append(got[0])
        out_rows.append(got[1](row))
    return out_names, out_rows
