"""Which power sources answer on this machine: NVML, RAPL, else the labelled simulated source."""

from __future__ import annotations


__all__ = ["default_sources", "measured_sources", "simulate_devices"]

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


_WANTED: dict[str, None] = {}  # devices an app said it serves on (simulate_devices), in order
_MAX_SIMULATED = 64


def simulate_devices(names: object) -> None:
    """Devices this process serves on (a device, a group ``"gpu0,gpu1"``, or a list), for the
    simulated source to meter where no GPU answers: it meters ``gpu0`` and the members of
    ``WATTSPAN_DEVICE`` else, and a proxy routing a model to ``gpu4`` got 0 J there. Call it
    before the first request (the default sampler is built then); at most 64 devices."""
    from ..devices import group_key, members

    for d in members(group_key(names)) if not isinstance(names, (list, tuple)) else [m for n in names for m in members(group_key(n))]:
        if d and len(_WANTED) < _MAX_SIMULATED:
            _WANTED.setdefault(d, None)


def _simulated_devices() -> list[str]:
    from ..devices import members
    from ..settings import SettingsError, get_settings

    names: dict[str, None] = {"gpu0": None}
    try:
        names.update(dict.fromkeys(members(get_settings().device)))
    except SettingsError:  # a bad variable: the server refuses to start on it elsewhere
        pass
    names.update(_WANTED)
    return list(names)[:_MAX_SIMULATED]


def default_sources() -> list[PowerSource]:
    """NVML if a GPU answers; RAPL if readable; else the labelled simulated GPU, one for each device the
    app serves on (``gpu0``, ``WATTSPAN_DEVICE``'s members, :func:`simulate_devices`)."""
    found = measured_sources()
    if not any(getattr(s, "name", "") == "nvml" for s in found):
        from ..sources.simulated import SimulatedSource

        devices = _simulated_devices()
        log.warning("no GPU power sensor: using the SIMULATED source for %s (labelled 'simulated' in every output)", ", ".join(devices))
        found.insert(0, SimulatedSource(devices=devices))
    return found
