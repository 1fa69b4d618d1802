"""A pass's histogram values handed to the OpenTelemetry SDK at once: :class:`BulkHistogram`.

The OpenTelemetry metrics API has no batch call: ``Histogram.record`` takes one
value, and the SDK then cleans and hashes that value's attribute dict, builds a
``Measurement``, offers it to the exemplar filter and finds its aggregation
again - about 8 us per value on a 2-core VM, 55-60 % of what exporting a
request's metrics cost. The meter hands over a pass's records together, most
of them sharing a few label sets, so :class:`BulkHistogram` adds a label set's
values to the SDK's own explicit-bucket aggregation in one step (bucket counts,
sum, min and max: what ``record`` would have added one by one), under that
aggregation's locks, and the SDK collects and exports it as usual.

This uses the SDK's internals (``opentelemetry.sdk.metrics._internal``, as of
1.2x): it is checked once when the histogram is made and again on each call,
and wherever something is not as expected - another SDK, a proxy or no-op
provider, a View giving the instrument another aggregation or filtering its
attributes, an exemplar filter that could sample, a metric reader added later
whose storage has a different shape - that call goes through the public
``Histogram.record``, value by value, and the result is the same.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Mapping, Sequence
from contextlib import ExitStack
from typing import Any

import numpy as np
from opentelemetry.metrics import Histogram

__all__ = ["BulkHistogram"]

_VECTOR_MIN = 16  # values from which a label set's bucket counts are found with numpy, not one bisect each

try:  # the SDK's internals this relies on (absent or moved: the public path only)
    from opentelemetry.sdk.metrics import AlwaysOffExemplarFilter, TraceBasedExemplarFilter
    from opentelemetry.sdk.metrics._internal.aggregation import (
        _DropAggregation,
        _ExplicitBucketHistogramAggregation,
    )
    from opentelemetry.sdk.metrics._internal.instrument import Histogram as _SDKHistogram
    from opentelemetry.sdk.metrics._internal.measurement_consumer import SynchronousMeasurementConsumer
    from opentelemetry.sdk.metrics._internal._view_instrument_match import _hash_attributes
    from opentelemetry.trace import get_current_span
    from opentelemetry.attributes import _clean_attribute_value

    _SDK = True
except ImportError:  # pragma: no cover - another SDK version
    _SDK = False


class BulkHistogram:
    """``histogram`` (a synchronous OpenTelemetry Histogram) fed a label set's values at once.

    :meth:`record_many` adds every value of ``values`` (finite, >= 0: the caller
    checks) with ``attributes`` (a dict of primitive values). ``bulk`` says
    whether the last call went the SDK's internal way (True) or value by value
    through ``Histogram.record`` (False).
    """

    def __init__(self, histogram: Histogram) -> None:
        self.histogram = histogram
        self.bulk = False
        self._usable = _SDK and isinstance(histogram, _SDKHistogram)

    def record_many(self, values: Sequence[float], attributes: Mapping[str, Any]) -> None:
        if not values:
            return
        if self._usable:
            try:
                if self._bulk(values, attributes):
                    self.bulk = True
                    return
            except (AttributeError, TypeError, KeyError):  # the SDK's insides are not what they were
                self._usable = False
        self.bulk = False
        record = self.histogram.record
        for v in values:
            record(v, attributes)

    def _bulk(self, values: Sequence[float], attributes: Mapping[str, Any]) -> bool:
        """Add ``values`` to every aggregation ``record`` would reach; False, with nothing added,
        where one of them is not the SDK's explicit-bucket histogram or exemplars could be sampled."""
        inst: Any = self.histogram
        if not inst._is_enabled():
            return True  # the SDK's record() drops the values too
        consumer = inst._measurement_consumer
        if type(consumer) is not SynchronousMeasurementConsumer:
            return False
        filt = consumer._sdk_config.exemplar_filter
        if type(filt) is TraceBasedExemplarFilter:
            if get_current_span().get_span_context().trace_flags.sampled:
                return False  # record() would sample an exemplar from this span
        elif type(filt) is not AlwaysOffExemplarFilter:
            return False
        matches: list[Any] = []
        for storage in consumer._reader_storages.values():
            for m in storage._get_or_init_view_instrument_match(inst):
                template = m._aggregation
                if type(template) is _DropAggregation:
                    continue
                if m._view._attribute_keys is not None or type(template) is not _ExplicitBucketHistogramAggregation:
                    return False
                matches.append(m)
        cleaned = _clean_attribute_value(attributes, None)  # what Measurement does to them
        attrs: dict[str, Any] = dict(cleaned) if isinstance(cleaned, Mapping) else {}
        key = _hash_attributes(attrs)
        total, low, high = sum(values), min(values), max(values)
        with ExitStack() as held:
            aggs: list[tuple[Any, Any, Any, Any, Any]] = []
            for m in matches:  # each held until its values are in: collect() swaps or discards them under it
                held.enter_context(m._lock)
                agg: Any = m._get_or_create_aggregation(key, attrs)  # made from the template: the same type
                _ = (agg._sum, agg._min, agg._max, agg._value)  # each there, or AttributeError before any is added
                aggs.append((agg, agg._lock, agg._boundaries, agg._record_min_max, agg._get_empty_bucket_counts))
            binned: dict[tuple[float, ...], list[int]] = {}
            if len(values) >= _VECTOR_MIN:  # each bucket's count at once (what bisect_left per value gives)
                for _, _, bounds, _, _ in aggs:
                    key_b = tuple(bounds)
                    if key_b not in binned:
                        idx = np.searchsorted(np.asarray(key_b, dtype=float), np.asarray(values, dtype=float), side="left")
                        binned[key_b] = np.bincount(idx, minlength=len(key_b) + 1).tolist()
            for agg, lock, bounds, min_max, empty in aggs:  # every attribute read: from here on nothing can fail
                with lock:
                    if agg._value is None:
                        agg._value = empty()
                    counts = agg._value
                    per = binned.get(tuple(bounds)) if binned else None
                    if per is not None and len(per) == len(counts):
                        for i, c in enumerate(per):
                            if c:
                                counts[i] += c
                    else:
                        for v in values:
                            counts[bisect_left(bounds, v)] += 1
                    agg._sum += total
                    if min_max:
                        agg._min = min(agg._min, low)
                        agg._max = max(agg._max, high)
        return True
