"""Which power sources answer on this machine: NVML, RAPL, else the labelled simulated source."""

from __future__ import annotations


__all__ = ["default_sources", "measured_sources"]

from typing import TYPE_CHECKING

from ..logs import get_logger

if TYPE_CHECKING:
    from ..sources import PowerSource

log = get_logger(__name__)


def measured_sources() -> list[PowerSource]:
    """The real sensors that answer: NVML (unless ``WATTSPAN_SIMULATE``), then RAPL."""
    from ..settings import get_settings
    from ..sources import PowerSource, SourceUnavailable

    found: list[PowerSource] = []
    if not get_settings().simulate:
        try:
            from ..sources.nvml import NvmlSource

            found.append(NvmlSource())
        except SourceUnavailable as exc:
            log.info("no NVML GPU (%s)", exc)
        except Exception:  # a failure the source did not foresee: this sensor is skipped, not every other one
            log.exception("wattspan: opening the NVML source failed; GPUs are not metered through NVML")
    try:
        from ..sources.rapl import RaplSource

        found.append(RaplSource())
    except SourceUnavailable as exc:
        log.info("no RAPL (%s)", exc)
    except Exception:
        log.exception("wattspan: opening the RAPL source failed; the CPU is not metered through RAPL")
    return found


def default_sources() -> list[PowerSource]:
    """NVML if a GPU answers; RAPL if readable; else the labelled simulated GPU."""
    found = measured_sources()
    if not any(getattr(s, "name", "") == "nvml" for s in found):
        from ..sources.simulated import SimulatedSource

        log.warning("no GPU power sensor: using the SIMULATED source (labelled 'simulated' in every output)")
        found.insert(0, SimulatedSource())
    return found
