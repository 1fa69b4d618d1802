#!/usr/bin/env python3
"""Build ``middleware/data/grid_intensity.csv``, wattspan's offline grid-intensity table.

Usage (from the repository root)::

    python tools/build_grid_table.py [DATA_DIR] [--out PATH]

``DATA_DIR`` holds the public inputs (default ``../shared/data`` next to the
repository): ``grid_intensity_by_country.csv`` (Our World in Data, based on Ember and
the Energy Institute, CC BY 4.0) and ``gcp_region_carbon_2024.csv`` (Google Cloud
region-carbon-info, Apache-2.0). The output is deterministic: rebuilding from the same
inputs reproduces the committed file byte for byte. See ``middleware/data/GRID_SOURCES.md``.

Columns: ``zone,kind,name,year,gco2e_per_kwh,source,licence,maps_to``. ``kind`` is one of
country, aggregate, gcp, aws, azure. ``maps_to`` says which row a zone's value was taken
from when it is not its own data (ISO alpha-2 aliases, AWS and Azure regions), with the
caveat in brackets. Values are copied verbatim from the inputs.
"""

from __future__ import annotations

import argparse
import csv
import sys
from collections import defaultdict
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA_DIR = REPO_ROOT.parent / "shared" / "data"
DEFAULT_OUT = REPO_ROOT / "middleware" / "data" / "grid_intensity.csv"

COUNTRY_FILE = "grid_intensity_by_country.csv"
GCP_FILE = "gcp_region_carbon_2024.csv"
GCP_YEAR = 2024
# The newest year that is a complete release. OWID's 2025 rows cover 94 of 225 codes
# (an early, partial release), so each country gets 2024, or its latest earlier year.
FULL_RELEASE_YEAR = 2024

OWID_SOURCE = "Our World in Data (Ember; Energy Institute)"
OWID_LICENCE = "CC-BY-4.0"
GCP_SOURCE = "Google Cloud region-carbon-info 2024"
GCP_LICENCE = "Apache-2.0"

COLUMNS = ("zone", "kind", "name", "year", "gco2e_per_kwh", "source", "licence", "maps_to")
KIND_ORDER = ("aggregate", "country", "gcp", "aws", "azure")

# OWID's own codes for regions and income groups -> wattspan zone names.
AGGREGATES = {
    "OWID_WRL": "world", "OWID_EU27": "eu27", "OWID_EUR": "europe", "OWID_AFR": "africa",
    "OWID_ASI": "asia", "OWID_NAM": "north-america", "OWID_SAM": "south-america",
    "OWID_OCE": "oceania", "OWID_HIC": "high-income", "OWID_UMC": "upper-middle-income",
    "OWID_LMC": "lower-middle-income", "OWID_LIC": "low-income",
}
# Countries OWID codes outside ISO 3166-1: (alpha-3-like zone, alpha-2-like alias).
NON_ISO = {"OWID_KOS": ("XKX", "XK")}
NON_ISO_NOTE = "user-assigned code, not ISO 3166-1"

# ISO 3166-1 alpha-3 -> alpha-2 for every country in the OWID file.
ALPHA2 = {
    "ABW": "AW", "AFG": "AF", "AGO": "AO", "ALB": "AL", "ARE": "AE", "ARG": "AR", "ARM": "AM",
    "ASM": "AS", "ATG": "AG", "AUS": "AU", "AUT": "AT", "AZE": "AZ", "BDI": "BI", "BEL": "BE",
    "BEN": "BJ", "BFA": "BF", "BGD": "BD", "BGR": "BG", "BHR": "BH", "BHS": "BS", "BIH": "BA",
    "BLR": "BY", "BLZ": "BZ", "BMU": "BM", "BOL": "BO", "BRA": "BR", "BRB": "BB", "BRN": "BN",
    "BTN": "BT", "BWA": "BW", "CAF": "CF", "CAN": "CA", "CHE": "CH", "CHL": "CL", "CHN": "CN",
    "CIV": "CI", "CMR": "CM", "COD": "CD", "COG": "CG", "COK": "CK", "COL": "CO", "COM": "KM",
    "CPV": "CV", "CRI": "CR", "CUB": "CU", "CYM": "KY", "CYP": "CY", "CZE": "CZ", "DEU": "DE",
    "DJI": "DJ", "DMA": "DM", "DNK": "DK", "DOM": "DO", "DZA": "DZ", "ECU": "EC", "EGY": "EG",
    "ERI": "ER", "ESP": "ES", "EST": "EE", "ETH": "ET", "FIN": "FI", "FJI": "FJ", "FLK": "FK",
    "FRA": "FR", "FRO": "FO", "GAB": "GA", "GBR": "GB", "GEO": "GE", "GHA": "GH", "GIB": "GI",
    "GIN": "GN", "GLP": "GP", "GMB": "GM", "GNB": "GW", "GNQ": "GQ", "GRC": "GR", "GRD": "GD",
    "GRL": "GL", "GTM": "GT", "GUF": "GF", "GUM": "GU", "GUY": "GY", "HKG": "HK", "HND": "HN",
    "HRV": "HR", "HTI": "HT", "HUN": "HU", "IDN": "ID", "IND": "IN", "IRL": "IE", "IRN": "IR",
    "IRQ": "IQ", "ISL": "IS", "ISR": "IL", "ITA": "IT", "JAM": "JM", "JOR": "JO", "JPN": "JP",
    "KAZ": "KZ", "KEN": "KE", "KGZ": "KG", "KHM": "KH", "KIR": "KI", "KNA": "KN", "KOR": "KR",
    "KWT": "KW", "LAO": "LA", "LBN": "LB", "LBR": "LR", "LBY": "LY", "LCA": "LC", "LKA": "LK",
    "LSO": "LS", "LTU": "LT", "LUX": "LU", "LVA": "LV", "MAC": "MO", "MAR": "MA", "MDA": "MD",
    "MDG": "MG", "MDV": "MV", "MEX": "MX", "MKD": "MK", "MLI": "ML", "MLT": "MT", "MMR": "MM",
    "MNE": "ME", "MNG": "MN", "MOZ": "MZ", "MRT": "MR", "MSR": "MS", "MTQ": "MQ", "MUS": "MU",
    "MWI": "MW", "MYS": "MY", "NAM": "NA", "NCL": "NC", "NER": "NE", "NGA": "NG", "NIC": "NI",
    "NLD": "NL", "NOR": "NO", "NPL": "NP", "NRU": "NR", "NZL": "NZ", "OMN": "OM", "PAK": "PK",
    "PAN": "PA", "PER": "PE", "PHL": "PH", "PNG": "PG", "POL": "PL", "PRI": "PR", "PRK": "KP",
    "PRT": "PT", "PRY": "PY", "PSE": "PS", "PYF": "PF", "QAT": "QA", "REU": "RE", "ROU": "RO",
    "RUS": "RU", "RWA": "RW", "SAU": "SA", "SDN": "SD", "SEN": "SN", "SGP": "SG", "SHN": "SH",
    "SLB": "SB", "SLE": "SL", "SLV": "SV", "SOM": "SO", "SPM": "PM", "SRB": "RS", "SSD": "SS",
    "STP": "ST", "SUR": "SR", "SVK": "SK", "SVN": "SI", "SWE": "SE", "SWZ": "SZ", "SYC": "SC",
    "SYR": "SY", "TCA": "TC", "TCD": "TD", "TGO": "TG", "THA": "TH", "TJK": "TJ", "TKM": "TM",
    "TLS": "TL", "TON": "TO", "TTO": "TT", "TUN": "TN", "TUR": "TR", "TWN": "TW", "TZA": "TZ",
    "UGA": "UG", "UKR": "UA", "URY": "UY", "USA": "US", "UZB": "UZ", "VCT": "VC", "VEN": "VE",
    "VGB": "VG", "VIR": "VI", "VNM": "VN", "VUT": "VU", "WSM": "WS", "YEM": "YE", "ZAF": "ZA",
    "ZMB": "ZM", "ZWE": "ZW",
}

# region id -> (display name, country alpha-3, where it is). AWS commercial regions,
# plus the China and GovCloud partitions, which are separate AWS partitions.
AWS_REGIONS = {
    "us-east-1": ("US East (N. Virginia)", "USA", "Virginia"),
    "us-east-2": ("US East (Ohio)", "USA", "Ohio"),
    "us-west-1": ("US West (N. California)", "USA", "California"),
    "us-west-2": ("US West (Oregon)", "USA", "Oregon"),
    "ca-central-1": ("Canada (Central)", "CAN", "Quebec"),
    "ca-west-1": ("Canada West (Calgary)", "CAN", "Alberta"),
    "mx-central-1": ("Mexico (Central)", "MEX", "Querétaro"),
    "sa-east-1": ("South America (São Paulo)", "BRA", "São Paulo"),
    "eu-west-1": ("Europe (Ireland)", "IRL", "Dublin"),
    "eu-west-2": ("Europe (London)", "GBR", "London"),
    "eu-west-3": ("Europe (Paris)", "FRA", "Paris"),
    "eu-central-1": ("Europe (Frankfurt)", "DEU", "Frankfurt"),
    "eu-central-2": ("Europe (Zurich)", "CHE", "Zurich"),
    "eu-north-1": ("Europe (Stockholm)", "SWE", "Stockholm"),
    "eu-south-1": ("Europe (Milan)", "ITA", "Milan"),
    "eu-south-2": ("Europe (Spain)", "ESP", "Aragón"),
    "af-south-1": ("Africa (Cape Town)", "ZAF", "Cape Town"),
    "me-south-1": ("Middle East (Bahrain)", "BHR", "Bahrain"),
    "me-central-1": ("Middle East (UAE)", "ARE", "UAE"),
    "il-central-1": ("Israel (Tel Aviv)", "ISR", "Tel Aviv"),
    "ap-east-1": ("Asia Pacific (Hong Kong)", "HKG", "Hong Kong"),
    "ap-east-2": ("Asia Pacific (Taipei)", "TWN", "Taipei"),
    "ap-south-1": ("Asia Pacific (Mumbai)", "IND", "Mumbai"),
    "ap-south-2": ("Asia Pacific (Hyderabad)", "IND", "Hyderabad"),
    "ap-southeast-1": ("Asia Pacific (Singapore)", "SGP", "Singapore"),
    "ap-southeast-2": ("Asia Pacific (Sydney)", "AUS", "New South Wales"),
    "ap-southeast-3": ("Asia Pacific (Jakarta)", "IDN", "Jakarta"),
    "ap-southeast-4": ("Asia Pacific (Melbourne)", "AUS", "Victoria"),
    "ap-southeast-5": ("Asia Pacific (Malaysia)", "MYS", "Malaysia"),
    "ap-southeast-6": ("Asia Pacific (New Zealand)", "NZL", "Auckland"),
    "ap-southeast-7": ("Asia Pacific (Thailand)", "THA", "Thailand"),
    "ap-northeast-1": ("Asia Pacific (Tokyo)", "JPN", "Tokyo"),
    "ap-northeast-2": ("Asia Pacific (Seoul)", "KOR", "Seoul"),
    "ap-northeast-3": ("Asia Pacific (Osaka)", "JPN", "Osaka"),
    "cn-north-1": ("China (Beijing), aws-cn partition", "CHN", "Beijing"),
    "cn-northwest-1": ("China (Ningxia), aws-cn partition", "CHN", "Ningxia"),
    "us-gov-west-1": ("AWS GovCloud (US-West)", "USA", "Oregon"),
    "us-gov-east-1": ("AWS GovCloud (US-East)", "USA", "Ohio"),
}

AZURE_REGIONS = {
    "eastus": ("East US", "USA", "Virginia"),
    "eastus2": ("East US 2", "USA", "Virginia"),
    "westus": ("West US", "USA", "California"),
    "westus2": ("West US 2", "USA", "Washington"),
    "westus3": ("West US 3", "USA", "Arizona"),
    "centralus": ("Central US", "USA", "Iowa"),
    "northcentralus": ("North Central US", "USA", "Illinois"),
    "southcentralus": ("South Central US", "USA", "Texas"),
    "westcentralus": ("West Central US", "USA", "Wyoming"),
    "canadacentral": ("Canada Central", "CAN", "Toronto"),
    "canadaeast": ("Canada East", "CAN", "Quebec City"),
    "mexicocentral": ("Mexico Central", "MEX", "Querétaro"),
    "brazilsouth": ("Brazil South", "BRA", "São Paulo State"),
    "brazilsoutheast": ("Brazil Southeast", "BRA", "Rio de Janeiro"),
    "northeurope": ("North Europe", "IRL", "Ireland"),
    "westeurope": ("West Europe", "NLD", "Netherlands"),
    "uksouth": ("UK South", "GBR", "London"),
    "ukwest": ("UK West", "GBR", "Cardiff"),
    "francecentral": ("France Central", "FRA", "Paris"),
    "francesouth": ("France South", "FRA", "Marseille"),
    "germanywestcentral": ("Germany West Central", "DEU", "Frankfurt"),
    "germanynorth": ("Germany North", "DEU", "Berlin"),
    "swedencentral": ("Sweden Central", "SWE", "Gävle"),
    "switzerlandnorth": ("Switzerland North", "CHE", "Zurich"),
    "switzerlandwest": ("Switzerland West", "CHE", "Geneva"),
    "norwayeast": ("Norway East", "NOR", "Oslo"),
    "norwaywest": ("Norway West", "NOR", "Stavanger"),
    "italynorth": ("Italy North", "ITA", "Milan"),
    "polandcentral": ("Poland Central", "POL", "Warsaw"),
    "spaincentral": ("Spain Central", "ESP", "Madrid"),
    "israelcentral": ("Israel Central", "ISR", "Israel"),
    "uaenorth": ("UAE North", "ARE", "Dubai"),
    "uaecentral": ("UAE Central", "ARE", "Abu Dhabi"),
    "qatarcentral": ("Qatar Central", "QAT", "Doha"),
    "southafricanorth": ("South Africa North", "ZAF", "Johannesburg"),
    "southafricawest": ("South Africa West", "ZAF", "Cape Town"),
    "centralindia": ("Central India", "IND", "Pune"),
    "southindia": ("South India", "IND", "Chennai"),
    "westindia": ("West India", "IND", "Mumbai"),
    "japaneast": ("Japan East", "JPN", "Tokyo, Saitama"),
    "japanwest": ("Japan West", "JPN", "Osaka"),
    "koreacentral": ("Korea Central", "KOR", "Seoul"),
    "koreasouth": ("Korea South", "KOR", "Busan"),
    "southeastasia": ("Southeast Asia", "SGP", "Singapore"),
    "eastasia": ("East Asia", "HKG", "Hong Kong"),
    "australiaeast": ("Australia East", "AUS", "New South Wales"),
    "australiasoutheast": ("Australia Southeast", "AUS", "Victoria"),
    "australiacentral": ("Australia Central", "AUS", "Canberra"),
    "australiacentral2": ("Australia Central 2", "AUS", "Canberra"),
    "newzealandnorth": ("New Zealand North", "NZL", "Auckland"),
    "indonesiacentral": ("Indonesia Central", "IDN", "Jakarta"),
    "malaysiawest": ("Malaysia West", "MYS", "Kuala Lumpur"),
}


def _pick_year(values: dict[int, str]) -> int:
    """The full-release year if present, else the latest year before it, else the latest."""
    if FULL_RELEASE_YEAR in values:
        return FULL_RELEASE_YEAR
    earlier = [y for y in values if y < FULL_RELEASE_YEAR]
    return max(earlier) if earlier else max(values)


def country_rows(path: Path) -> list[tuple]:
    by_code: dict[str, dict[int, str]] = defaultdict(dict)
    names: dict[str, str] = {}
    with path.open(newline="", encoding="utf-8") as f:
        for r in csv.DictReader(f):
            by_code[r["iso_code"]][int(r["year"])] = r["carbon_intensity_gco2e_per_kwh"]
            names[r["iso_code"]] = r["country"]
    rows = []
    for code, values in by_code.items():
        year = _pick_year(values)
        value, name = values[year], names[code]
        if code in AGGREGATES:
            rows.append((AGGREGATES[code], "aggregate", name, year, value, OWID_SOURCE, OWID_LICENCE, ""))
            continue
        if code in NON_ISO:
            zone, alias = NON_ISO[code]
            alias_note = f"{zone} (alpha-2 alias; {NON_ISO_NOTE})"
        elif code.startswith("OWID_"):
            raise SystemExit(f"unknown OWID code {code!r}: add it to AGGREGATES or NON_ISO")
        elif code not in ALPHA2:
            raise SystemExit(f"no ISO alpha-2 code for {code!r} ({name}): add it to ALPHA2")
        else:
            zone, alias, alias_note = code, ALPHA2[code], f"{code} (alpha-2 alias)"
        rows.append((zone, "country", name, year, value, OWID_SOURCE, OWID_LICENCE, ""))
        rows.append((alias, "country", name, year, value, OWID_SOURCE, OWID_LICENCE, alias_note))
    return rows


def gcp_rows(path: Path) -> list[tuple]:
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        value_col = next(c for c in reader.fieldnames or () if "carbon intensity" in c.lower())
        return [
            (f"gcp:{r['Google Cloud Region']}", "gcp", r["Location"], GCP_YEAR, r[value_col],
             GCP_SOURCE, GCP_LICENCE, "")
            for r in reader
        ]


def mapped_rows(kind: str, regions: dict, countries: dict[str, tuple]) -> list[tuple]:
    rows = []
    for region, (name, iso3, where) in regions.items():
        c = countries[iso3]
        maps_to = f"{iso3} ({where}; country average used)"
        rows.append((f"{kind}:{region}", kind, name, c[3], c[4], c[5], c[6], maps_to))
    return rows


def build(data_dir: Path) -> list[tuple]:
    rows = country_rows(data_dir / COUNTRY_FILE)
    countries = {r[0]: r for r in rows if r[1] == "country" and not r[7]}
    rows += gcp_rows(data_dir / GCP_FILE)
    rows += mapped_rows("aws", AWS_REGIONS, countries)
    rows += mapped_rows("azure", AZURE_REGIONS, countries)
    zones = [r[0].lower() for r in rows]
    if len(set(zones)) != len(zones):
        raise SystemExit("duplicate zone names in the table")
    return sorted(rows, key=lambda r: (KIND_ORDER.index(r[1]), r[0]))


def write(rows: list[tuple], out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(COLUMNS)
        writer.writerows(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("data_dir", nargs="?", type=Path, default=DEFAULT_DATA_DIR,
                        help="folder with the public inputs (default: ../shared/data)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT,
                        help="CSV to write (default: middleware/data/grid_intensity.csv)")
    args = parser.parse_args(argv)
    for name in (COUNTRY_FILE, GCP_FILE):
        if not (args.data_dir / name).is_file():
            parser.error(f"{args.data_dir / name} not found; pass the data folder as DATA_DIR")
    rows = build(args.data_dir)
    write(rows, args.out)
    counts = {k: sum(r[1] == k for r in rows) for k in KIND_ORDER}
    print(f"wrote {len(rows)} rows to {args.out}: "
          + ", ".join(f"{k} {n}" for k, n in counts.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
