"""Region names: the zones of the hourly profiles (US-CAL-CISO, GB-NESO) are regions of the
yearly table too, with their own provenance, and a hostile region name gets a short error."""

from __future__ import annotations

import calendar
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from wattspan.carbon import grid_intensity
from wattspan.carbon.intensity import ProfileProvider

ROOT = Path(__file__).resolve().parents[1]
SIM = ROOT / "examples" / "simulated"


@pytest.mark.parametrize("zone, factor", [("US-CAL-CISO", "lifecycle"), ("GB-NESO", "direct")])
def test_a_profile_zone_has_a_yearly_row_the_mean_of_its_hours(zone, factor):
    gi = grid_intensity(zone)
    assert gi.zone == zone and gi.year == 2023 and gi.licence and "2023" in gi.source
    # every hour of 2023 through the hourly provider (its own reading of the file): their mean
    p = ProfileProvider(factor=factor)
    t0 = calendar.timegm((2023, 1, 1, 0, 0, 0))
    hours = [p.at(zone, t0 + h * 3600).g_per_kwh for h in range(8760)]
    assert gi.gco2e_per_kwh == pytest.approx(float(np.mean(hours)), abs=0.01)
    assert ("direct" in gi.maps_to) == (factor == "direct")


def test_aliases_and_case_reach_the_same_row():
    assert grid_intensity("us-cal-ciso") == grid_intensity("CAISO") == grid_intensity("US-CAL-CISO")
    assert grid_intensity("FR").gco2e_per_kwh == grid_intensity("fra").gco2e_per_kwh  # the table's rows are untouched


def test_a_huge_region_name_is_a_short_error_and_fast():
    t = time.perf_counter()
    with pytest.raises(ValueError) as e:
        grid_intensity("x" * 100_000)
    assert time.perf_counter() - t < 1.0  # no fuzzy search over 100k characters
    assert len(str(e.value)) < 300 and "unknown region" in str(e.value)


def test_the_cli_takes_a_profile_zone_and_refuses_a_hostile_name_in_one_line(tmp_path):
    base = [sys.executable, "-m", "wattspan.cli", "attribute", "--trace", str(SIM / "trace.csv"), "--requests",
            str(SIM / "requests.jsonl"), "--batches", str(SIM / "batches.jsonl"), "--out", str(tmp_path / "o.jsonl")]
    r = subprocess.run(base + ["--region", "US-CAL-CISO", "--summary", str(tmp_path / "s.json")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    c = json.loads((tmp_path / "s.json").read_text())["carbon"]
    assert c["region"] == "US-CAL-CISO" and c["intensity_g_per_kwh"] == grid_intensity("US-CAL-CISO").gco2e_per_kwh
    r = subprocess.run(base + ["--region", "y" * 100_000], capture_output=True, text=True)
    assert r.returncode == 2 and len(r.stderr) < 400 and "unknown region" in r.stderr
