"""What the subcommands share: the usage error, the optional-dependency check, the carbon options."""

from __future__ import annotations

import argparse
from typing import Any

__all__ = ["UsageError", "carbon_model_from_args", "carbon_options", "need"]


class UsageError(Exception):
    """A bad command line or input file: printed as ``wattspan: error: ...``, exit status 2."""


def need(*modules: str, extra: str) -> None:
    """Optional parts print the exact install line when their dependencies are missing."""
    import importlib.util

    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise UsageError(f"this command needs {', '.join(missing)}: pip install 'wattspan[{extra}]'")


def carbon_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("carbon")
    g.add_argument("--region", default="world", help="grid region: aws:us-east-1, gcp:europe-west1, azure:westeurope, FR, ... (default: world)")
    g.add_argument("--intensity", type=float, default=None, help="grid intensity in gCO2e/kWh (overrides --region's table value)")
    g.add_argument("--pue", type=float, default=None, help="power usage effectiveness (default: the provider's published fleet value, else 1.0)")
    g.add_argument("--embodied-kg", type=float, default=None, help="embodied kgCO2e per device (enables the embodied share)")
    g.add_argument("--lifetime-years", type=float, default=4.0, help="device lifetime for the embodied share (default 4)")
    g.add_argument("--utilisation", type=float, default=1.0, help="fraction of its lifetime the device serves (default 1)")
    g.add_argument("--carbon-price", type=float, default=0.0, help="internal carbon price per tonne CO2e (default 0)")
    g.add_argument("--intensity-provider", default="auto", help="hourly intensity: auto (the 2023 hourly profile for DE, FR, GB, US-CAL-CISO, else the yearly table), table, profile, electricitymaps, watttime, gb-carbon-intensity")
    g.add_argument("--market-g-per-kwh", type=float, default=0.0, help="market-based gCO2e/kWh (your contract's or supplier's), reported beside the location-based figure")
    g.add_argument("--marginal-provider", default=None, help="a provider of marginal intensity reported beside (watttime)")


def carbon_model_from_args(args: argparse.Namespace) -> Any:
    from ..carbon import CarbonModel, Embodied

    embodied = None
    if args.embodied_kg is not None:
        embodied = Embodied(kgco2e_per_device=float(args.embodied_kg), lifetime_years=float(args.lifetime_years), utilisation=float(args.utilisation))
    pue = None if args.pue is None else float(args.pue)
    model = CarbonModel.for_region(args.region, pue=pue, embodied=embodied, carbon_price_per_tonne=float(args.carbon_price))
    if args.intensity is not None:
        from dataclasses import replace

        model = replace(model, intensity_g_per_kwh=float(args.intensity), intensity_source="given on the command line")
    # hourly intensity (issue 11); a fixed --intensity is one value at every hour
    return model.with_hourly("table" if args.intensity is not None else args.intensity_provider,
                             market_g_per_kwh=float(args.market_g_per_kwh), marginal_provider=args.marginal_provider)
