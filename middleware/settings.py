"""wattspan's configuration: one frozen object read from the ``WATTSPAN_*`` environment.

:func:`get_settings` reads and validates every variable at once and returns a
:class:`Settings`; a bad value raises :class:`SettingsError`, whose message names
the variable, the value given and what is allowed. The middleware and the default
meter read it when they are built (at the server's start: the ASGI lifespan
startup), so a bad variable stops the server with that one message instead of a
traceback per request.

===============================  ===========================================  =================
variable                         meaning                                      default
===============================  ===========================================  =================
``WATTSPAN_DEVICE``              the accelerator that serves this app         ``gpu0``
``WATTSPAN_REGION``              grid region for CO2e (``aws:us-east-1``,     ``world``
                                 ``FR``, ...)
``WATTSPAN_PUE``                 power usage effectiveness, 1.0..3.0          the provider's
``WATTSPAN_SAMPLE_INTERVAL_S``   seconds between sensor polls, 0.001..10      ``0.01``
``WATTSPAN_SIMULATE``            use the simulated source even with a GPU     ``0``
``WATTSPAN_PEERS``               share the device with this host's other      ``1``
                                 worker processes
``WATTSPAN_PEER_DIR``            where the peers' sockets live                ``$TMPDIR/wattspan-<uid>/peers``
``WATTSPAN_PEER_GROUP``          a name that keeps unrelated apps on one      (none)
                                 device apart
``WATTSPAN_OTEL``                export through OpenTelemetry when the app    ``1``
                                 uses it
``WATTSPAN_LEDGER``              the zero-argument middleware writes the      (none)
                                 ledger to this SQLite file
``WATTSPAN_REQUEST_ID_HEADER``   echo the request id in this response header  (none)
``WATTSPAN_STEPS_TOKEN``         shared secret of the batch-step relay        (a per-user file)
``WATTSPAN_PSEUDONYM_KEY``       the proxy's secret key of the API-key        (a key file beside
                                 pseudonyms (HMAC-SHA-256)                    the ledger, else
                                                                              per process)
``WATTSPAN_BOARD_LAG_MS``        the boards' electrical lag (power trails     (searched where
                                 the work), ms, measured once on fine         the readings are
                                 readings: ``4``, or ``gpu0=4,gpu1=4``        50 ms apart or
                                                                              closer)
===============================  ===========================================  =================
"""

from __future__ import annotations

import math
import os
import re
import threading
from dataclasses import dataclass, field
from typing import Mapping

__all__ = ["DEVICES_PATTERN", "Settings", "SettingsError", "get_settings", "parse_board_lag_ms"]

_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off", "")
_LABEL = re.compile(r"[A-Za-z0-9_.:-]{1,64}")
_DEVICES = re.compile(r"[A-Za-z0-9_.:-]{1,64}(,[A-Za-z0-9_.:-]{1,64}){0,63}")  # a device or a device group
DEVICES_PATTERN = _DEVICES  # for the command line's --device
_GROUP = re.compile(r"[A-Za-z0-9_.-]{1,64}")
_HEADER = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]{1,64}")  # an HTTP token (RFC 9110)
MIN_SAMPLE_INTERVAL_S = 0.001
MAX_SAMPLE_INTERVAL_S = 10.0


#: what ``WATTSPAN_BOARD_LAG_MS`` / ``--board-lag-ms`` take
BOARD_LAG_MS_ALLOWED = ("milliseconds from 0 to 1000 (the boards' electrical lag; 0: none), "
                        "or device=ms pairs joined by commas, e.g. gpu0=4,gpu1=4")


def parse_board_lag_ms(text: str | None) -> float | dict[str, float] | None:
    """The boards' electrical lag written in ms (``"4"``, or ``"gpu0=4, gpu1=0"``), in seconds:
    one value, or one per device (as ``attribute(..., board_lag_s=...)`` and ``Meter(board_lag_s=...)``
    take it); ``None`` for none given (empty). :class:`ValueError` (``BOARD_LAG_MS_ALLOWED``) otherwise."""
    if text is None or not text.strip():
        return None

    def ms(v: str) -> float:
        try:
            x = float(v)
        except ValueError:
            x = math.nan
        if not (math.isfinite(x) and 0 <= x <= 1000):
            raise ValueError(BOARD_LAG_MS_ALLOWED)
        return x / 1000.0

    text = text.strip()
    if "=" not in text:
        return ms(text)
    out: dict[str, float] = {}
    for part in text.split(","):
        dev, sep, v = (x.strip() for x in part.partition("="))
        if not sep or not _LABEL.fullmatch(dev) or dev in out:
            raise ValueError(BOARD_LAG_MS_ALLOWED)
        out[dev] = ms(v)
    return out


class SettingsError(ValueError):
    """A ``WATTSPAN_*`` variable with a bad value: ``var``, ``value``, ``allowed``."""

    def __init__(self, var: str, value: str, allowed: str) -> None:
        self.var, self.value, self.allowed = var, value, allowed
        super().__init__(f"{var}={value!r} is not valid: {allowed}")


@dataclass(frozen=True)
class Settings:
    """Validated configuration (see the module doc for each variable)."""

    device: str = "gpu0"
    region: str = "world"
    pue: float | None = None
    sample_interval_s: float = 0.01
    simulate: bool = False
    peers: bool = True
    peer_dir: str | None = None
    peer_group: str | None = None
    otel: bool = True
    ledger: str | None = None
    request_id_header: str | None = None
    steps_token: str | None = field(default=None, repr=False)  # secrets: never in a repr, a log or a traceback
    pseudonym_key: str | None = field(default=None, repr=False)
    #: the boards' electrical lag in s (one value, or per device), for ``Meter(board_lag_s=...)``
    board_lag_s: float | Mapping[str, float] | None = field(default=None, hash=False)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> "Settings":
        """Read and validate every ``WATTSPAN_*`` variable; :class:`SettingsError` on the first bad one."""
        env = os.environ if environ is None else environ

        def get(name: str) -> str | None:
            v = env.get("WATTSPAN_" + name)
            return None if v is None else v.strip()

        def boolean(name: str, default: bool) -> bool:
            v = get(name)
            if v is None:
                return default
            if v.lower() in _TRUE:
                return True
            if v.lower() in _FALSE:
                return False
            raise SettingsError("WATTSPAN_" + name, v, "use 1/true/yes/on or 0/false/no/off")

        def number(name: str, lo: float, hi: float, what: str) -> float | None:
            v = get(name)
            if v is None or v == "":
                return None
            try:
                f = float(v)
            except ValueError:
                f = math.nan
            if not (math.isfinite(f) and lo <= f <= hi):
                raise SettingsError("WATTSPAN_" + name, v, f"a number from {lo:g} to {hi:g} ({what})")
            return f

        def pattern(name: str, rx: re.Pattern[str], what: str) -> str | None:
            v = get(name)
            if v is None or v == "":
                return None
            if not rx.fullmatch(v):
                raise SettingsError("WATTSPAN_" + name, v, what)
            return v

        device = pattern("DEVICE", _DEVICES, "a device name of 1..64 characters [A-Za-z0-9_.:-], e.g. gpu0, or a group "
                         "of up to 64 such names joined by commas, e.g. gpu0,gpu1,gpu2,gpu3") or "gpu0"
        region = get("REGION") or "world"
        pue = number("PUE", 1.0, 3.0, "power usage effectiveness: facility energy / IT energy, e.g. 1.1")
        interval = number("SAMPLE_INTERVAL_S", MIN_SAMPLE_INTERVAL_S, MAX_SAMPLE_INTERVAL_S, "seconds between sensor polls")
        try:  # the region must be one the carbon table knows
            from .carbon import CarbonModel

            CarbonModel.for_region(region, pue=pue)
        except ValueError as exc:
            raise SettingsError("WATTSPAN_REGION", region, str(exc)) from None
        peer_dir = get("PEER_DIR") or None
        ledger = get("LEDGER") or None
        if ledger is not None:
            # set by docker or k8s, with no shell to expand it: "~/x.sqlite" had made a folder "~" here
            ledger = os.path.expanduser(ledger)
            from ._paths import writable_dir, writable_file

            try:  # a folder, /dev/null, a path this process cannot write: refused at start, not records dropped later
                if os.path.lexists(ledger):
                    writable_file(ledger, "the path")
                else:  # the writer makes its folders
                    writable_dir(os.path.dirname(ledger) or ".", "its folder")
            except ValueError as exc:
                raise SettingsError("WATTSPAN_LEDGER", ledger, f"a SQLite file this process can write ({exc})") from None
        token = get("STEPS_TOKEN") or None
        if token is not None and len(token) < 16:
            raise SettingsError("WATTSPAN_STEPS_TOKEN", "*" * len(token), "a secret of at least 16 characters")
        pkey = get("PSEUDONYM_KEY") or None
        if pkey is not None and len(pkey.encode("utf-8")) < 32:
            raise SettingsError("WATTSPAN_PSEUDONYM_KEY", "*" * len(pkey), "a secret of at least 32 characters "
                                "(e.g. python -c 'import secrets; print(secrets.token_hex(32))')")
        try:
            board_lag_s = parse_board_lag_ms(get("BOARD_LAG_MS"))
        except ValueError as exc:
            raise SettingsError("WATTSPAN_BOARD_LAG_MS", get("BOARD_LAG_MS") or "", str(exc)) from None
        return cls(
            device=device,
            region=region,
            pue=pue,
            sample_interval_s=0.01 if interval is None else interval,
            simulate=boolean("SIMULATE", False),
            peers=boolean("PEERS", True),
            peer_dir=peer_dir,
            peer_group=pattern("PEER_GROUP", _GROUP, "a group name of 1..64 characters [A-Za-z0-9_.-]"),
            otel=boolean("OTEL", True),
            ledger=ledger,
            request_id_header=pattern("REQUEST_ID_HEADER", _HEADER, "an HTTP header name such as x-request-id"),
            steps_token=token,
            pseudonym_key=pkey,
            board_lag_s=board_lag_s,
        )


_cache: tuple[tuple[tuple[str, str], ...], Settings] | None = None
_lock = threading.Lock()


def get_settings() -> Settings:
    """The process's settings, read from ``WATTSPAN_*`` once (again only if those variables change)."""
    global _cache
    key = tuple(sorted((k, v) for k, v in os.environ.items() if k.startswith("WATTSPAN_")))
    c = _cache
    if c is not None and c[0] == key:
        return c[1]
    with _lock:
        s = Settings.from_env()
        _cache = (key, s)
        return s
