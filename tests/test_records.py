"""One record builder, carbon applied once: the live meter and ``wattspan attribute`` price
energy the same way, host energy kept apart and counted in CO2e where it was metered."""

from __future__ import annotations

import numpy as np
import pytest

from wattspan.carbon import CarbonModel, Embodied
from wattspan.carbon.records import request_records
from wattspan.records import RequestLabels

J_PER_KWH = 3.6e6


def model() -> CarbonModel:
    return CarbonModel.for_region("FR", pue=1.2, embodied=Embodied(kgco2e_per_device=1500.0, lifetime_years=4.0))


def test_co2e_prices_accelerator_plus_host_and_keeps_them_apart():
    c = model()
    recs = request_records(
        c, ids=["a", "b"], device="gpu0", start_ns=[0, 10], end_ns=[5, 30], dynamic_j=[3.0, 0.0], idle_j=[1.0, 0.5],
        device_s=[0.005, 0.02], host_j=[2.0, 0.0], energy_j_low=[3.5, 0.4], energy_j_high=[4.5, 0.6],
        labels=[RequestLabels(route="/x", status_code=200, tenant="t"), RequestLabels()],
    )
    a, b = recs
    assert (a.energy_j, a.host_j, b.energy_j, b.host_j) == (4.0, 2.0, 0.5, 0.0)
    g = c.intensity_g_per_kwh * c.pue / J_PER_KWH
    emb = Embodied(kgco2e_per_device=1500.0, lifetime_years=4.0).g_per_device_s
    assert a.embodied_g == pytest.approx(0.005 * emb) and a.embodied_g > 0
    assert a.co2e_g == pytest.approx((4.0 + 2.0) * g + a.embodied_g, rel=1e-12)
    assert b.co2e_g == pytest.approx(0.5 * g + b.embodied_g, rel=1e-12)
    # the band moves the accelerator's part only; the host's grams stay in both ends
    assert a.co2e_g_low == pytest.approx((3.5 + 2.0) * g + a.embodied_g, rel=1e-12)
    assert a.co2e_g_high == pytest.approx((4.5 + 2.0) * g + a.embodied_g, rel=1e-12)
    assert (a.route, a.status_code, a.tenant, b.route) == ("/x", 200, "t", "")


def test_without_a_band_both_ends_are_the_estimate_and_labels_may_be_dicts_in_the_meter():
    recs = request_records(model(), ids=["a"], device=["gpu0"], start_ns=np.array([0]), end_ns=np.array([1]),
                           dynamic_j=np.array([1.0]), idle_j=np.array([0.0]), device_s=np.array([0.0]))
    r = recs[0]
    assert r.energy_j_low == r.energy_j_high == r.energy_j == 1.0
    assert r.co2e_g_low == r.co2e_g_high == r.co2e_g > 0
    assert RequestLabels.from_mapping({"route": "/r", "status_code": "404", "span_id": 7}) == RequestLabels(route="/r", status_code=404, span_id=7)
    assert RequestLabels.from_mapping(None) == RequestLabels()


def test_a_column_of_the_wrong_length_is_refused():
    with pytest.raises(ValueError, match="rows for 2 requests"):
        request_records(model(), ids=["a", "b"], device="gpu0", start_ns=[0, 0], end_ns=[1, 1], dynamic_j=[1.0],
                        idle_j=[0.0, 0.0], device_s=[0.0, 0.0])


def test_steps_from_batches_match_steps_from_records():
    """The meter's columns-first build of a pass's steps equals the dict route it replaced."""
    from wattspan.attribution import BatchStep, Requests, Steps

    req = Requests(np.array(["a", "b", "c"], dtype=object), np.array([0, 0, 5]), np.array([50, 50, 50]),
                   np.full(3, "gpu1", dtype=object), np.ones(3))
    batches = [BatchStep(0, 10, "gpu1", {"a": 3, "b": 1, "z": 9}), BatchStep(10, 20, "gpu0", {"a": 2}),
               BatchStep(20, 30, "gpu0,gpu1", {"c": 4.0}), BatchStep(30, 40, "gpu1", {"z": 1})]
    got = Steps.from_batches(batches, req, "gpu1")
    want = Steps.from_records([{"start_ns": 0, "end_ns": 10, "device": "gpu1", "requests": {"a": 3, "b": 1}},
                               {"start_ns": 20, "end_ns": 30, "device": "gpu1", "requests": {"c": 4.0}}], req)
    for f in ("start_ns", "end_ns", "device", "entry_step", "entry_request", "entry_tokens"):
        assert getattr(got, f).tolist() == getattr(want, f).tolist(), f
    assert Steps.from_batches(batches[3:], req, "gpu1") is None
