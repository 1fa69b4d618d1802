"""Setup: the process's default meter and sampler, and what they are wired to.

The one place that decides, from the environment, what a process meters and
where the records go:

* :func:`default_sources` / :func:`measured_sources`: the power sources that
  answer here (NVML, RAPL, else the labelled simulated source);
* :func:`get_default_meter`: the process's :class:`~wattspan.Meter` (made on first
  use by the middleware and the engine hooks), with the ledger of
  ``WATTSPAN_LEDGER`` and OpenTelemetry export set up when the application uses
  it (:func:`_auto_otel`) as its sinks;
* :func:`get_default_sampler`: the process's :class:`~wattspan.sampler.Sampler`;
* the one fork hook: a forked worker gets its own meter and sampler.
"""

from __future__ import annotations

import os
import threading
from typing import Any

from .logs import get_logger
from .meter import Meter
from .sampler import Sampler
from .meter.discovery import default_sources, measured_sources

__all__ = ["default_sources", "get_default_meter", "get_default_sampler", "measured_sources", "set_default_meter"]

log = get_logger(__name__)


_default: Meter | None = None
_default_lock = threading.Lock()


def get_default_meter(**kw: Any) -> Meter:
    """The process's meter, created on first use with ``kw`` (or the defaults).

    It shares what it serves with the other worker processes of this user on
    this host (``peers``), unless ``WATTSPAN_PEERS=0``; with ``WATTSPAN_LEDGER``
    set it writes every record to that ledger; with ``WATTSPAN_BOARD_LAG_MS`` it
    fits the step models through that electrical lag (``board_lag_s``). Raises
    :class:`wattspan.settings.SettingsError` for a bad ``WATTSPAN_*`` variable.
    """
    global _default
    from .settings import get_settings

    with _default_lock:
        if _default is None:
            s = get_settings()
            kw.setdefault("peers", s.peers)
            if s.board_lag_s is not None:
                kw.setdefault("board_lag_s", s.board_lag_s)  # WATTSPAN_BOARD_LAG_MS
            if s.ledger and "sinks" not in kw:
                from .export.ledger import Ledger

                kw["sinks"] = [Ledger(s.ledger)]
            _default = Meter(**kw)
            _auto_otel(_default)
        return _default


_OTEL_VARS = ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_TRACES_EXPORTER", "OTEL_METRICS_EXPORTER")


def _auto_otel(meter: Meter) -> None:
    """Export the default meter's records through OpenTelemetry when the app uses it.

    An SDK TracerProvider the application set up itself gets wattspan's span
    processor in front of its own processors (``wattspan.export.otel.wrap_provider``),
    and energy metrics go to the global MeterProvider; with no provider but
    ``OTEL_*`` exporter variables set, wattspan configures both from them.
    ``WATTSPAN_OTEL=0`` turns this off. Failures are logged, never raised.
    """
    from .settings import get_settings

    if not get_settings().otel:
        return
    try:
        from opentelemetry import trace as trace_api

        from .export import otel
    except ImportError:
        return
    try:
        provider = trace_api.get_tracer_provider()
        if otel.is_sdk_provider(provider):
            otel.wrap_provider(provider, meter=meter)
            otel.connect_metrics(meter, otel.EnergyMetrics(health=lambda: meter.sampler.health() if meter.sampler else {}))
        elif any(os.environ.get(v) for v in _OTEL_VARS):
            otel.configure_from_env(meter=meter)
    except Exception:
        log.exception("could not set up OpenTelemetry export; records still go to the other sinks")


def set_default_meter(meter: Meter | None) -> None:
    global _default
    with _default_lock:
        _default = meter


_sampler: Sampler | None = None
_sampler_kw: dict[str, Any] | None = None
_sampler_lock = threading.Lock()


def get_default_sampler(**kw: Any) -> Sampler:
    """The process's sampler, created and started on first use.

    ``kw``: ``sources`` (default: whatever answers here, see
    :func:`default_sources`), ``interval_s``, ``capacity``. Later
    calls return the same sampler; passing different ``kw`` then is an error.
    A forked child gets its own on its first call.
    """
    global _sampler, _sampler_kw
    with _sampler_lock:
        if _sampler is not None and not _sampler.closed:
            if kw and kw != _sampler_kw:
                raise ValueError(f"the default sampler already exists with {_sampler_kw or 'the defaults'}; "
                                 f"cannot re-create it with {kw}")
            return _sampler
        opts = dict(kw)
        sources = opts.pop("sources", None)
        if sources is None:
            sources = default_sources()
        _sampler = Sampler(sources, **opts).start()
        _sampler_kw = dict(kw)
        return _sampler


def _reset_after_fork() -> None:
    global _default, _default_lock, _sampler, _sampler_kw, _sampler_lock
    _default = None
    _default_lock = threading.Lock()  # another thread may have held it at fork time
    _sampler = None
    _sampler_kw = None
    _sampler_lock = threading.Lock()


if hasattr(os, "register_at_fork"):  # a forked worker gets its own meter and sampler
    os.register_at_fork(after_in_child=_reset_after_fork)
