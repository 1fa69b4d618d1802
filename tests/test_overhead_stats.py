"""The interval benchmarks/overhead.py gives the median of its paired /work ratios, and what it calls met."""

from __future__ import annotations

import math

from benchmarks.overhead import median_interval, met


def test_the_sign_test_interval_is_the_order_statistics_binomial_tails_allow():
    xs = [0.91, 0.99, 0.95, 0.97, 0.93, 1.01, 0.96, 0.98, 0.94, 0.92]  # 10 pairs, shuffled
    lo, hi, cover = median_interval(xs)
    assert (lo, hi) == (0.92, 1.0 - 0.01)  # x(2) and x(9) of the sorted ten
    assert math.isclose(cover, 1 - 2 * 11 / 1024)  # P(Bin(10, 1/2) <= 1) = 11/1024 in each tail
    assert cover >= 0.95
    lo, hi, cover = median_interval(list(range(20)))
    assert (lo, hi) == (5, 14) and cover >= 0.95  # P(Bin(20, 1/2) <= 5) = 0.0207; <= 6: 0.0577
    assert median_interval([1.0, 2.0, 3.0, 4.0, 5.0]) is None  # 2 / 32 > 0.05: five pairs cannot give 95 %


def test_met_is_said_only_where_the_interval_clears_the_target():
    assert met([0.98, 0.99, 0.975, 0.985, 0.99, 0.98, 0.978, 0.99, 0.982, 0.987], 0.97) == "yes"
    assert met([0.95, 0.96, 0.955, 0.958, 0.96, 0.95, 0.952, 0.96, 0.962, 0.957], 0.97) == "no"
    said = met([0.95, 0.99, 0.96, 0.98, 0.975, 0.965, 0.99, 0.955, 0.985, 0.972], 0.97)
    assert said.startswith("yes") and "interval spans" in said  # median 0.9735, interval 0.955 to 0.985
    assert met([0.99, 0.98, 0.975], 0.97) == "yes"  # too few for an interval: the median alone
