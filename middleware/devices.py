"""Device and device-group names: ``0`` -> ``"gpu0"``, ``["gpu0", 1]`` -> ``"gpu0,gpu1"``.

One canonical name per device or group, used by the sources, the meter, the
attribution and the exports alike.
"""

from __future__ import annotations

from collections.abc import Iterable

__all__ = ["SEP", "device_key", "group_key", "is_group", "members"]

SEP = ","


def _one(value: object) -> str:
    s = str(value).strip()
    return f"gpu{s}" if s.isdigit() else s


def group_key(value: object) -> str:
    """The canonical name of a device or a group: ``0`` -> ``gpu0``; ``["gpu0", 1]`` or
    ``"gpu0, gpu1"`` or ``"gpu0+gpu1"`` -> ``"gpu0,gpu1"`` (order kept, repeats dropped)."""
    if isinstance(value, (list, tuple)):
        parts: Iterable[object] = value
    else:
        s = str(value).strip()
        if SEP not in s and "+" not in s:
            return _one(s)
        parts = s.replace("+", SEP).split(SEP)
    out = list(dict.fromkeys(p for p in (_one(v) for v in parts) if p))
    return SEP.join(out)


def members(key: str) -> tuple[str, ...]:
    """The devices of a (canonical) device or group name."""
    return tuple(key.split(SEP)) if SEP in key else (key,)


def is_group(key: str) -> bool:
    return SEP in key


def device_key(value: object) -> str:
    """Trace, request and batch files name a GPU by index (``0``) or by id (``gpu0``), and a
    device group by a list or a comma-separated string (see :mod:`wattspan.attribution.groups`)."""
    if isinstance(value, (list, tuple)) or "," in str(value) or "+" in str(value):
        return group_key(value)
    s = str(value).strip()
    return f"gpu{s}" if s.isdigit() else s
