#!/usr/bin/env python3
"""Build ``middleware/data/intensity_profiles.csv``: wattspan's offline hourly intensity shapes.

Usage (from the repository root)::

    python tools/build_intensity_profiles.py [DATA_DIR] [--out PATH]

``DATA_DIR`` (default ``../shared/data`` next to the repository) holds ``intensity_hourly/``:
Electricity Maps' 2023 hourly series for DE, FR, GB and US-CAL-CISO (ODbL v1.0) and the NESO
Carbon Intensity API's 2023 half-hourly GB actuals (CC BY 4.0). For each zone, factor type and
(month, hour of day in UTC) the output holds the mean of that year's values, i.e. 12 x 24 cells a
series: the daily and seasonal shape, not the hour-by-hour record. Columns:
``zone,source,factor,month,hour_utc,gco2e_per_kwh,n``. The output is deterministic.

Licences: the Electricity Maps rows are a derived database of an ODbL database and stay under
ODbL v1.0 ("Electricity Maps (electricitymaps.com), hourly carbon intensity data 2023, ODbL");
the NESO rows stay CC BY 4.0 ("Carbon Intensity API, National Energy System Operator (NESO),
carbonintensity.org.uk, CC BY 4.0"). See ``middleware/data/INTENSITY_SOURCES.md``.
"""

from __future__ import annotations

import argparse
import csv
import sys
from collections import defaultdict
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA_DIR = REPO_ROOT.parent / "shared" / "data"
DEFAULT_OUT = REPO_ROOT / "middleware" / "data" / "intensity_profiles.csv"

FILES = (
    ("electricitymaps_DE_2023_hourly.csv", "DE", "electricitymaps-2023"),
    ("electricitymaps_FR_2023_hourly.csv", "FR", "electricitymaps-2023"),
    ("electricitymaps_GB_2023_hourly.csv", "GB", "electricitymaps-2023"),
    ("electricitymaps_US-CAL-CISO_2023_hourly.csv", "US-CAL-CISO", "electricitymaps-2023"),
    ("neso_carbon_intensity_api_GB_2023_halfhourly.csv", "GB-NESO", "neso-2023"),
)
COLUMNS = ("zone", "source", "factor", "month", "hour_utc", "gco2e_per_kwh", "n")


def build(data_dir: Path) -> list[tuple]:
    rows = []
    for name, zone, source in FILES:
        path = data_dir / "intensity_hourly" / name
        cells: dict[tuple[str, int, int], list[float]] = defaultdict(list)
        with path.open(newline="", encoding="utf-8") as fh:
            for r in csv.DictReader(fh):
                t = r["datetime_utc"]  # 2023-01-01T00:00:00Z
                month, hour = int(t[5:7]), int(t[11:13])
                cells[(r["emission_factor_type"], month, hour)].append(float(r["carbon_intensity_gco2e_per_kwh"]))
        for (factor, month, hour), vals in sorted(cells.items()):
            rows.append((zone, source, factor, month, hour, f"{sum(vals) / len(vals):.2f}", len(vals)))
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("data_dir", nargs="?", type=Path, default=DEFAULT_DATA_DIR)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    a = ap.parse_args(argv)
    if not (a.data_dir / "intensity_hourly").is_dir():
        print(f"no intensity_hourly/ in {a.data_dir}", file=sys.stderr)
        return 2
    rows = build(a.data_dir)
    with a.out.open("w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh, lineterminator="\n")
        w.writerow(COLUMNS)
        w.writerows(rows)
    print(f"wrote {len(rows)} rows to {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
