"""``wattspan attribute``: per-request energy and CO2e from a power trace and request / batch files."""

from __future__ import annotations

import argparse
import json
import math
import sys
from typing import Any, TextIO

from ..records import json_safe, printable
from .common import UsageError, carbon_model_from_args

__all__ = ["cmd_attribute", "print_summary", "summarize"]

#: the record fields that say which intensity a request's carbon used (as in RequestRecord)
_INTENSITY_FIELDS = ("intensity_g_per_kwh", "intensity_provider", "intensity_zone", "intensity_hour", "intensity_basis",
                     "market_g_per_kwh", "co2e_market_g", "marginal_g_per_kwh", "co2e_marginal_g")

#: the largest --idle: the trace reader's bound on a reading (wattspan.sources.replay)
_MAX_WATTS = 1e6
#: the longest --power-window-s: a day (facility meters average over 15 minutes at most)
_MAX_WINDOW_S = 86400.0
_MIN_WINDOW_S = 1e-6  # no power sensor averages over less than a microsecond (and 1e-10 s is 0 ns)


def cmd_attribute(args: argparse.Namespace) -> int:
    from ..attribution import jsonl as _io
    from ..samples import SampleKind
    from ..attribution import attribute
    from ..attribution.inputs import TraceError
    from ..errors import InputError
    from ..sources.replay import read_trace_csv

    try:
        idle = None if str(args.idle).strip().lower() == "estimate" else float(args.idle)
        if idle is not None and not (math.isfinite(idle) and 0 <= idle <= _MAX_WATTS):
            raise ValueError
    except ValueError:
        raise UsageError(f"--idle must be a number of watts from 0 to {_MAX_WATTS:g} or 'estimate', got {args.idle!r}") from None
    lag = getattr(args, "board_lag_ms", None)  # in s: parsed by the option's type (wattspan.settings.parse_board_lag_ms)
    if args.out is not None and str(args.out) == "-":  # the usual spelling of standard output
        args.out = None
    if args.summary is not None and str(args.summary) == "-":
        raise UsageError("--summary -: the summary goes to a file (it is printed on standard error anyway)")
    for option, path in (("--out", args.out), ("--summary", args.summary)):
        _check_writable(path, option)  # before the work, not after it
    if args.out is not None and args.summary is not None and _same_file(args.out, args.summary):
        raise UsageError(f"--out and --summary name one file ({args.out}): the summary would overwrite the records")
    for option, path in (("--out", args.out), ("--summary", args.summary)):
        for given, inp in (("--trace", args.trace), ("--requests", args.requests), ("--batches", args.batches)):
            if path is not None and inp is not None and _same_file(path, inp):
                raise UsageError(f"{option} and {given} name one file ({path}): writing it would destroy the input")
    try:
        carbon = carbon_model_from_args(args)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    window_s = getattr(args, "power_window_s", None)
    if window_s is not None and args.power_kind != "average":
        raise UsageError(f"--power-window-s {window_s:g} is the window of averaged readings: add --power-kind average "
                         "(without it power_w is read as instant power and the window has no meaning)")
    try:
        traces = read_trace_csv(args.trace)
        if args.power_kind == "average":
            window = 1.0 if window_s is None else float(window_s)
            if not (math.isfinite(window) and _MIN_WINDOW_S <= window <= _MAX_WINDOW_S):
                raise UsageError(f"--power-window-s must be >= {_MIN_WINDOW_S:g} and <= {_MAX_WINDOW_S:g} seconds, "
                                 f"got {args.power_window_s!r}")
            for tr in traces.values():
                tr.power_kind = SampleKind.AVERAGE
                tr.window_ns = int(window * 1e9)
        requests, rows = _io.read_requests_jsonl(args.requests)
        steps = _io.read_batches_jsonl(args.batches, requests) if args.batches else None
    except InputError as exc:
        raise UsageError(str(exc)) from None

    if steps is not None:
        steps, lines = _doubtful_steps(steps, requests, args.batches)
        for line in lines:
            print(f"wattspan: warning: {line}", file=sys.stderr)
    for line in _untraced(traces, requests, steps, args.trace):
        print(f"wattspan: warning: {line}", file=sys.stderr)
    if isinstance(lag, dict):
        from ..devices import device_key

        for d in sorted(k for k in lag if device_key(k) not in traces):  # "0" and "gpu0" name one device
            print(f"wattspan: warning: --board-lag-ms names {d}, which {args.trace} does not meter "
                  f"(it meters {', '.join(sorted(traces)) or 'no device'}): that lag is not used", file=sys.stderr)
    try:
        result = attribute(traces, requests, steps, idle_w=idle, board_lag_s=lag)
    except TraceError as exc:  # a trace the engine cannot use: one line naming the file, device and reading
        raise UsageError(f"{args.trace}: {exc}") from None
    for line in _over_idle(result, traces):
        print(f"wattspan: warning: {line}", file=sys.stderr)
    from ..carbon import wall_times
    from ..carbon.records import attribution_batch

    # carbon applied by the one function the live meter uses too (no host is metered offline: host_j = 0), as
    # columns; the records are built, written and summed a slice at a time: a day of requests fits in memory
    batch = attribution_batch(result, carbon, wall_s=wall_times(result.requests.start_ns, result.requests.end_ns))
    totals = _Totals()
    out = sys.stdout if args.out is None else _open(args.out, "--out")
    try:
        try:
            for records in _record_slices(result, rows, carbon, batch):
                totals.add(records)
                out.write("".join(json.dumps(r, separators=(",", ":")) + "\n" for r in records))
            out.flush()  # a full disk shows here, not in the interpreter's exit
        except BrokenPipeError:
            raise  # the reader went away: wattspan.cli.main stops quietly
        except OSError as exc:
            where = "standard output" if args.out is None else f"--out {args.out}"
            raise UsageError(f"{where}: cannot write the records: {exc.strerror or exc}") from None
    finally:
        if out is not sys.stdout:
            try:
                out.close()
            except OSError:
                pass
    summary = summarize(result, totals, carbon)
    if args.summary is not None:
        # standard JSON (NaN, a figure with nothing to compute it from, is null): JavaScript, jq and Go read it too
        _write(args.summary, json.dumps(json_safe(summary), indent=2, allow_nan=False) + "\n", "--summary")
    print_summary(summary, file=sys.stderr if args.out is None else sys.stdout)
    return 0


#: tokens a second of one step that no accelerator processes (the fastest prefill is ~1e5-1e6 a second): a
#: count in other units, or a glitch, which would draw the steps' energy to its requests
_MAX_TOKENS_PER_S = 1e8


def _doubtful_steps(steps: Any, requests: Any, path: Any) -> tuple[Any, list[str]]:
    """Batch steps a person should look at, one line each, and the steps to attribute: a step that
    repeats an earlier line exactly (start, end, device and every request's tokens: a log appended
    twice, a hook replayed) is counted once; a step claiming more tokens a second than any accelerator
    processes is named (its requests would draw the energy of the steps around it); requests that run
    on a device with batch steps but appear in none of them are counted (their energy there is only the
    time they share with the steps' requests: is the batches file complete?)."""
    import numpy as np

    from ..attribution import Steps

    out: list[str] = []
    n = len(steps)
    if not n:
        return steps, out
    # exact repeats: the same start, end and device first, then the same entries
    key = np.rec.fromarrays((steps.start_ns, steps.end_ns, steps.device.astype(str)))
    _, first, inv, cnt = np.unique(key, return_index=True, return_inverse=True, return_counts=True)
    inv = inv.ravel()
    drop = np.zeros(n, dtype=bool)
    if (cnt > 1).any():
        bounds = np.concatenate(([0], np.cumsum(np.bincount(steps.entry_step, minlength=n))))

        def entries(i: int) -> tuple[tuple[int, float], ...]:
            lo, hi = bounds[i], bounds[i + 1]
            return tuple(sorted(zip(steps.entry_request[lo:hi].tolist(), steps.entry_tokens[lo:hi].tolist())))
        for r in np.flatnonzero(cnt[inv] > 1).tolist():
            j = int(first[inv[r]])
            if j != r and entries(r) == entries(j):
                drop[r] = True
    k = int(drop.sum())
    if k:
        d0 = int(np.argmax(drop))
        out.append(f"{k} batch step(s) in {path} repeat an earlier line exactly (start, end, device and tokens; the first "
                   f"at start_ns={int(steps.start_ns[d0])}): each is counted once; was the file appended twice?")
        keep = ~drop
        e_keep = keep[steps.entry_step]
        new_index = np.cumsum(keep) - 1
        steps = Steps(start_ns=steps.start_ns[keep], end_ns=steps.end_ns[keep], device=steps.device[keep],
                      entry_step=new_index[steps.entry_step[e_keep]], entry_request=steps.entry_request[e_keep],
                      entry_tokens=steps.entry_tokens[e_keep])
    tok = np.bincount(steps.entry_step, weights=steps.entry_tokens, minlength=len(steps))
    rate = tok / np.maximum((steps.end_ns - steps.start_ns) * 1e-9, 1e-9)
    fast = rate > _MAX_TOKENS_PER_S
    if fast.any():
        i = int(np.argmax(rate))
        out.append(f"{int(fast.sum())} batch step(s) in {path} claim more than {_MAX_TOKENS_PER_S:.0e} tokens a second "
                   f"(the most: {tok[i]:.4g} tokens in {(int(steps.end_ns[i]) - int(steps.start_ns[i])) * 1e-6:.4g} ms at "
                   f"start_ns={int(steps.start_ns[i])}), more than any accelerator processes: their requests draw the "
                   "energy of the steps around them; are the counts tokens?")
    from ..devices import members

    seen = np.zeros(len(requests.ids), dtype=bool)
    seen[steps.entry_request] = True
    stepped = {m for d in set(steps.device.astype(str).tolist()) for m in members(d)}
    rdev, rcode = np.unique(requests.device.astype(str), return_inverse=True)
    on = np.isin(rcode.ravel(), [i for i, d in enumerate(rdev.tolist()) if any(m in stepped for m in members(d))])
    lone = on & ~seen
    if lone.any():
        out.append(f"{int(lone.sum())} of {int(on.sum())} request(s) on devices with batch steps appear in no step of "
                   f"{path}: they get no step's energy there, only a time share of the waits and the idle baseline; "
                   "is the batches file complete?")
    return steps, out


def _untraced(traces: Any, requests: Any, steps: Any, trace_path: Any) -> list[str]:
    """What the trace cannot meter, one line each: requests on a device (or a group's member) it has no
    readings of (two or more), which get no energy of that device (method ``no-trace``); requests wholly
    outside a device's readings; batch steps on such a device; steps naming a request that does not run on every device of the step, whose energy on the
    others goes only to the requests that do."""
    import numpy as np

    from ..devices import members
    from ..samples import SampleKind

    traced = {k for k, v in traces.items() if len(v) >= 2}
    have = ", ".join(sorted(traced)) or "no device"
    out = []
    rdev, rcode = np.unique(requests.device.astype(str), return_inverse=True)
    rcode = rcode.ravel()
    missing: dict[str, int] = {}
    for d, c in zip(rdev.tolist(), np.bincount(rcode, minlength=len(rdev)).tolist()):
        for m in members(d):
            if m not in traced:
                missing[m] = missing.get(m, 0) + int(c)
    for m, c in sorted(missing.items()):
        out.append(f"{c} request(s) run on {m}, which {trace_path} does not meter (it meters {have}): "
                   "no energy of that device is attributed to them")
    for m in sorted(traced):  # requests wholly outside a device's readings: a clock or unit mix-up when all are
        on = np.isin(rcode, [i for i, d in enumerate(rdev.tolist()) if m in members(d)])
        n_on = int(np.count_nonzero(on))
        if not n_on:
            continue
        tr = traces[m]
        t0 = int(tr.t_ns[0]) - (int(tr.window_ns) if tr.power_kind == SampleKind.AVERAGE else 0)
        t1 = int(tr.t_ns[-1])
        k = int(np.count_nonzero(on & ((requests.end_ns <= t0) | (requests.start_ns >= t1))))
        if k:
            out.append(f"{k} of {n_on} request(s) on {m} lie wholly outside its readings ({t0}..{t1} ns): none of its energy "
                       "is attributed to them" + ("; do the requests and the trace use one clock, in nanoseconds?" if k == n_on else ""))
    if steps is not None and len(steps):
        sdev, scode = np.unique(steps.device.astype(str), return_inverse=True)
        scode = scode.ravel()
        for d, c in zip(sdev.tolist(), np.bincount(scode, minlength=len(sdev)).tolist()):
            absent = [m for m in members(d) if m not in traced]
            if absent:
                out.append(f"{c} batch step(s) run on {d}; {trace_path} does not meter {', '.join(absent)}")
        for m in sorted(traced):  # steps wholly outside a device's readings: no reading can fit them
            on_s = np.isin(scode, [i for i, d in enumerate(sdev.tolist()) if m in members(d)])
            n_s = int(np.count_nonzero(on_s))
            if not n_s:
                continue
            tr = traces[m]
            t0 = int(tr.t_ns[0]) - (int(tr.window_ns) if tr.power_kind == SampleKind.AVERAGE else 0)
            t1 = int(tr.t_ns[-1])
            k = int(np.count_nonzero(on_s & ((steps.end_ns <= t0) | (steps.start_ns >= t1))))
            if k:
                out.append(f"{k} of {n_s} batch step(s) on {m} lie wholly outside its readings ({t0}..{t1} ns): no reading "
                           "measures them" + ("; do the batches and the trace use one clock, in nanoseconds?" if k == n_s else ""))
        pairs, counts = np.unique(scode[steps.entry_step] * len(rdev) + rcode[steps.entry_request], return_counts=True)
        wrong = sum(int(c) for code, c in zip(pairs.tolist(), counts.tolist())
                    if not set(members(str(sdev[code // len(rdev)]))) <= set(members(str(rdev[code % len(rdev)]))))
        if wrong:
            out.append(f"{wrong} batch step entr{'y names' if wrong == 1 else 'ies name'} a request that does not run on every device "
                       "of its step: the step's energy on those devices goes only to the requests that do")
        es, er = steps.entry_step, steps.entry_request
        off = (steps.end_ns[es] <= requests.start_ns[er]) | (steps.start_ns[es] >= requests.end_ns[er])
        k = int(np.count_nonzero(off))
        if k:  # billed all the same (a step is the engine's word), but a sign of two clocks
            out.append(f"{k} of {es.shape[0]} batch step entr{'y lies' if k == 1 else 'ies lie'} wholly outside the "
                       "request's start_ns..end_ns: the request is billed for the step all the same; do the batches and "
                       "the requests use one clock?")
        tok = np.bincount(es, weights=steps.entry_tokens, minlength=len(steps))
        named = np.bincount(es, minlength=len(steps)) > 0
        k = int(np.count_nonzero(named & (tok <= 0)))
        if k:  # the split has nothing to go by: equal shares, never left to no one
            out.append(f"{k} of {len(steps)} batch step(s) give 0 tokens to every request they name: each such step's energy "
                       "is split equally among its requests; does the hook report the tokens?")
    return out


#: requests per slice of records built, written and summed at once (about 20 MB of dicts)
_SLICE = 8192


def _record_slices(result: Any, rows: list[dict[str, Any]], carbon: Any, batch: Any) -> Any:
    """The records of ``wattspan attribute``, a list of at most :data:`_SLICE` dicts at a time, in request
    order: the attribution's fields, the carbon batch's, and the tokens as read."""
    band = result.energy_j_low is not None
    priced = carbon.carbon_price_per_tonne > 0
    cost_key = f"carbon_cost_{carbon.currency.lower()}"
    names = ("co2e_g", "co2e_g_low", "co2e_g_high", "embodied_g", *_INTENSITY_FIELDS)
    cols = {k: batch.columns.get(k) for k in names}
    const = {k: batch.const.get(k) for k in names}
    n = len(result.requests)
    for lo in range(0, n, _SLICE):
        records = result.records(lo, lo + _SLICE)
        for i, rec in enumerate(records, lo):
            v = {k: (c[i] if c is not None else const[k]) for k, c in cols.items()}
            rec["co2e_g"] = v["co2e_g"]
            rec["co2e_g_low"] = v["co2e_g_low"] if band else v["co2e_g"]
            rec["co2e_g_high"] = v["co2e_g_high"] if band else v["co2e_g"]
            rec["embodied_g"] = v["embodied_g"]
            rec.update({k: v[k] for k in _INTENSITY_FIELDS})
            if priced:  # the internal carbon price turns grams into money
                rec[cost_key] = float(carbon.cost(v["co2e_g"]))
            row = rows[i]
            for key in ("prompt_tokens", "output_tokens"):
                if key in row:
                    rec[key] = row[key]
        yield records


class _Totals:
    """What the summary needs of the records, added a slice at a time (in request order: the sums are
    the ones a single pass over every record gives)."""

    def __init__(self) -> None:
        self.n = 0
        self.routes: dict[str, dict[str, Any]] = {}
        self.energy_j = 0.0
        self.weighted = 0.0
        self.providers: set[str] = set()
        self.zones: set[str] = set()
        self.hours: set[str] = set()
        self.basis: set[str] = set()
        self.market_g_per_kwh = 0.0
        self.co2e_market_g = 0.0
        self.co2e_marginal_g = 0.0

    def add(self, records: list[dict[str, Any]]) -> None:
        self.n += len(records)
        routes = self.routes
        for r in records:
            k = r.get("route") or "(none)"
            d = routes.setdefault(k, {"requests": 0, "energy_j": 0.0, "co2e_g": 0.0})
            d["requests"] += 1
            d["energy_j"] += r["energy_j"]
            d["co2e_g"] += r["co2e_g"]
            # 90 % bands: half-widths added in quadrature (requests' errors taken as independent;
            # inside one reconciliation window they are anti-correlated, so this is conservative)
            if "energy_j_low" in r:
                d["_h2"] = d.get("_h2", 0.0) + ((r["energy_j_high"] - r["energy_j_low"]) / 2) ** 2
                d["_c2"] = d.get("_c2", 0.0) + ((r.get("co2e_g_high", r["co2e_g"]) - r.get("co2e_g_low", r["co2e_g"])) / 2) ** 2
            self.energy_j += r["energy_j"]
            self.weighted += r["energy_j"] * r.get("intensity_g_per_kwh", 0.0)
            self.providers.add(r.get("intensity_provider", ""))
            self.zones.add(r.get("intensity_zone", ""))
            self.hours.add(r.get("intensity_hour", ""))
            self.basis.add(r.get("intensity_basis", ""))
            self.market_g_per_kwh = max(self.market_g_per_kwh, r.get("market_g_per_kwh", 0.0))
            self.co2e_market_g += r.get("co2e_market_g", 0.0)
            self.co2e_marginal_g += r.get("co2e_marginal_g", 0.0)

    def intensity(self) -> dict[str, Any]:
        """Which intensities the records used: providers, zones, hours, basis; market and marginal totals."""
        return {
            "providers": sorted(self.providers),
            "zones": sorted(self.zones),
            "hours": len(self.hours),
            "basis": sorted(self.basis),
            # None where the requests carry no energy: no weights, no weighted mean
            "energy_weighted_g_per_kwh": self.weighted / self.energy_j if self.energy_j > 0 else None,
            "market_g_per_kwh": self.market_g_per_kwh,
            "co2e_market_g": self.co2e_market_g,
            "co2e_marginal_g": self.co2e_marginal_g,
        }


def _open(path: Any, option: str) -> TextIO:
    """An output file opened for writing; one that cannot be opened is a usage error."""
    try:
        return open(path, "w", encoding="utf-8")
    except OSError as exc:
        raise UsageError(f"{option} {path}: cannot write: {exc.strerror or exc}") from None


def _same_file(a: Any, b: Any) -> bool:
    """Whether two output paths name one file (the same path, or links to one existing file)."""
    import os
    from pathlib import Path

    pa, pb = Path(a), Path(b)
    try:
        if pa.exists() and pb.exists():
            return os.path.samefile(pa, pb)
    except OSError:
        pass
    return pa.resolve() == pb.resolve()


def _over_idle(result: Any, traces: Any) -> list[str]:
    """Devices whose idle baseline bills more over the period than the meter measured: an ``--idle``
    set above the board's mean power, or an estimate from too few readings. The books still close
    (requests plus unattributed are what was measured), but every request's energy there is idle.
    And devices whose energy counter never moved while their power readings show the board drawing
    power: the meter believes the counter, so nothing is measured there."""
    import numpy as np

    out = []
    for name, d in result.devices.items():
        tr = traces.get(name) if hasattr(traces, "get") else None
        pw = getattr(tr, "power_w", None)
        drawn = float(np.nanmean(pw)) if pw is not None and np.isfinite(pw).any() else 0.0
        if d.measured_j <= 0 and drawn > 0 and getattr(tr, "energy_j", None) is not None:
            out.append(f"{name}: the meter measured no energy over the period, yet its power readings average "
                       f"{drawn:.4g} W: does its energy counter move?")
        elif d.measured_j > 0 and d.idle_j > 1.001 * d.measured_j:
            span_s = max((d.t1_ns - d.t0_ns) * 1e-9, 1e-12)
            out.append(f"{name}: the idle baseline ({d.idle_w:.4g} W, {d.idle_source}) is above the mean measured power "
                       f"({d.measured_j / span_s:.4g} W): its requests get no dynamic energy; is the baseline right?")
        elif d.idle_source == "low-quantile" and d.measured_j > 0:
            # never idle, and no step model to take the intercept from: a low quantile of busy readings still
            # holds dynamic power (an idle of 123 W for a 70 W board took the p95 from 5 to 32 %)
            out.append(f"{name}: no idle stretch in its readings and no step model's intercept: the idle baseline is a low "
                       f"quantile of the readings ({d.idle_w:.4g} W), which on a board that is never idle holds dynamic "
                       "power; give the board's idle power with --idle W if you know it")
        elif d.measured_j <= 0 < d.idle_j:
            out.append(f"{name}: the meter measured no energy over the period, yet the idle baseline is {d.idle_w:.4g} W: "
                       "does its energy counter move?")
        out += _trace_doubts(name, tr)
    return out


_UNIT_RATIO = 3.0  # a counter's mean power this many times off its power readings' (either way): a unit slip
_GAP_SPACINGS, _GAP_MIN_S = 50, 1.0
#: more than one accelerator draws on average (W): the largest boards' limits are 1-1.4 kW (B200, MI355X), so a
#: trace averaging above this is in other units (mW read as W, a counter in mJ read as J) or sums several boards
_MAX_DEVICE_W = 3000.0  # a hole in power-only readings: this many median spacings, and at least this long


def _trace_doubts(name: str, tr: Any) -> list[str]:
    """A trace the engine can use but a person should look at: an energy counter whose mean power is
    far from its own power readings' (mJ read as J, Wh as J), and holes in power-only readings (the
    energy across a hole is interpolated between its two ends, not measured)."""
    import numpy as np

    out: list[str] = []
    t, pw, ej = getattr(tr, "t_ns", None), getattr(tr, "power_w", None), getattr(tr, "energy_j", None)
    if t is None or len(t) < 2:
        return out
    if ej is not None and pw is not None:
        fin = np.flatnonzero(np.isfinite(ej))
        p_ok = np.isfinite(pw)
        if len(fin) >= 2 and t[fin[-1]] > t[fin[0]] and p_ok.any():
            counter_w = float(ej[fin[-1]] - ej[fin[0]]) / ((int(t[fin[-1]]) - int(t[fin[0]])) * 1e-9)
            power_w = float(np.mean(pw[p_ok]))
            if counter_w > 0 and power_w > 0 and max(counter_w / power_w, power_w / counter_w) > _UNIT_RATIO:
                out.append(f"{name}: its energy counter averages {counter_w:.4g} W over the trace, its power readings "
                           f"{power_w:.4g} W: the meter believes the counter; are both in their units (J, W; mJ read as J?)")
    mean_w = _mean_power(t, pw, ej)
    if mean_w is not None and mean_w > _MAX_DEVICE_W:
        out.append(f"{name}: its readings average {mean_w:.4g} W, more than any one accelerator draws (the largest "
                   f"boards are rated 1-1.4 kW): are they in their units (power_w in W, not mW; energy_j in J, not mJ)? "
                   "Every request's joules scale with them")
    elif pw is not None:
        hot = np.flatnonzero(pw > _MAX_DEVICE_W)  # (NaN compares False)
        if hot.size:
            i = int(hot[np.argmax(pw[hot])])
            out.append(f"{name}: {hot.size} power reading(s) above {_MAX_DEVICE_W:g} W, more than any one accelerator draws "
                       f"(the most: {pw[i]:.4g} W at t_ns={int(t[i])}): glitches? Their energy goes to the requests in "
                       "flight there")
    counter = ej is not None and bool(np.isfinite(ej).any())
    tt = t[np.isfinite(ej)] if counter and ej is not None else t
    if len(tt) >= 2:
        gaps = np.diff(tt.astype(np.int64))
        med = float(np.median(gaps))
        long = gaps > max(_GAP_SPACINGS * med, _GAP_MIN_S * 1e9)
        k = int(np.count_nonzero(long))
        if k:
            i = int(np.argmax(gaps))
            # a counter holds every joule across a hole, but not when in it they were drawn: spread evenly over it
            what = ("its counter holds the energy across a hole but not when it was drawn: it is spread evenly over the hole"
                    if counter else "the energy across a hole is interpolated between its ends, not measured")
            out.append(f"{name}: {k} hole(s) in its readings longer than {_GAP_SPACINGS} times their median spacing "
                       f"({med * 1e-6:.3g} ms; the longest {gaps[i] * 1e-9:.4g} s after {int(tt[i])} ns): {what}; "
                       "did the sampler stop?")
    return out


def _mean_power(t: Any, pw: Any, ej: Any) -> float | None:
    """The trace's mean power (W): its energy counter's over the time it spans, else its power readings'."""
    import numpy as np

    if ej is not None:
        fin = np.flatnonzero(np.isfinite(ej))
        if len(fin) >= 2 and t[fin[-1]] > t[fin[0]]:
            return float(ej[fin[-1]] - ej[fin[0]]) / ((int(t[fin[-1]]) - int(t[fin[0]])) * 1e-9)
    if pw is not None and np.isfinite(pw).any():
        return float(np.nanmean(pw))
    return None


def _check_writable(path: Any, option: str) -> None:
    """A usage error now for an output that cannot be written (a directory, a missing folder)."""
    if path is None:
        return
    from pathlib import Path

    p = Path(path)
    if p.is_dir():
        raise UsageError(f"{option} {p}: cannot write: Is a directory")
    if not p.parent.is_dir():
        raise UsageError(f"{option} {p}: cannot write: no folder {p.parent}")


def _write(path: Any, text: str, option: str) -> None:
    """Write an output file; a path that cannot be written (a missing folder, a directory) is a usage error."""
    try:
        path.write_text(text, encoding="utf-8")
    except OSError as exc:
        raise UsageError(f"{option} {path}: cannot write: {exc.strerror or exc}") from None


def _unattributed_g(un: float, carbon: Any, totals: Any) -> float:
    ew = totals.intensity().get("energy_weighted_g_per_kwh") if getattr(carbon, "hourly", None) is not None else None
    if ew is None or not math.isfinite(ew):
        return float(carbon.operational_g(un))
    return float(un / 3.6e6 * carbon.pue * ew)


def summarize(result: Any, records: "list[dict[str, Any]] | _Totals", carbon: Any) -> dict[str, Any]:
    """Totals, per device and per route, with the carbon model's provenance. ``records``: the records,
    or their :class:`_Totals` as the command adds them up a slice at a time."""
    if isinstance(records, _Totals):
        totals = records
    else:
        totals = _Totals()
        totals.add(records)
    routes = totals.routes
    for d in routes.values():
        if "_h2" in d:
            h, c = math.sqrt(d.pop("_h2")), math.sqrt(d.pop("_c2"))
            d["energy_j_low"], d["energy_j_high"] = max(d["energy_j"] - h, 0.0), d["energy_j"] + h
            d["co2e_g_low"], d["co2e_g_high"] = max(d["co2e_g"] - c, 0.0), d["co2e_g"] + c
        d["energy_j_per_1k"] = d["energy_j"] / d["requests"] * 1000
        d["co2e_g_per_1k"] = d["co2e_g"] / d["requests"] * 1000
        if carbon.carbon_price_per_tonne > 0:
            d[f"carbon_cost_{carbon.currency.lower()}_per_1k"] = float(carbon.cost(d["co2e_g_per_1k"]))
    measured = result.measured_j
    un = result.unattributed_j
    return {
        "measured_j": measured,
        "attributed_j": result.attributed_j,
        "unattributed_j": un,
        # at the hours the records ran (their energy-weighted intensity), not the yearly value, where an hourly
        # provider priced them: the unattributed energy was drawn in the same hours
        "unattributed_co2e_g": _unattributed_g(un, carbon, totals),
        "requests": totals.n,
        "simulated": any(d.simulated for d in result.devices.values()),
        "carbon": {
            "region": carbon.region,
            "intensity_g_per_kwh": carbon.intensity_g_per_kwh,
            "intensity_source": carbon.intensity_source,
            "pue": carbon.pue,
            "carbon_price_per_tonne": carbon.carbon_price_per_tonne,
            "currency": carbon.currency,
            "embodied": None if carbon.embodied is None else vars(carbon.embodied) if hasattr(carbon.embodied, "__dict__") else str(carbon.embodied),
        },
        "devices": {k: result.devices[k].as_dict() for k in sorted(result.devices, key=_natural)},  # gpu2 before gpu10
        "routes": routes,
        "intensity": totals.intensity(),
    }


def _natural(name: str) -> list[Any]:
    """A device name's sort key: its runs of digits as numbers (gpu2 before gpu10, "1,0" after "0,1")."""
    import re

    return [(0, int(t), "") if t.isdigit() else (1, 0, t) for t in re.split(r"(\d+)", name)]


def print_summary(summary: dict[str, Any], file: TextIO = sys.stdout) -> None:
    w = file.write
    c = summary["carbon"]
    flag = "  [SIMULATED power: no sensor]" if summary["simulated"] else ""
    w(f"measured {summary['measured_j']:.1f} J = attributed {summary['attributed_j']:.1f} J + unattributed {summary['unattributed_j']:.1f} J{flag}\n")
    w(f"carbon: {c['intensity_g_per_kwh']:.0f} gCO2e/kWh ({c['region']}; {c['intensity_source']}), PUE {c['pue']:.2f}\n")
    i = summary.get("intensity")
    if i and i["hours"]:
        ew = i["energy_weighted_g_per_kwh"]
        w((f"per request: {ew:.0f} gCO2e/kWh energy-weighted" if ew is not None else "per request: no energy attributed, no weighted intensity;")
          + f" over {i['hours']} hour(s) from {', '.join(i['providers'])} ({', '.join(i['zones'])}), basis {', '.join(i['basis'])}")
        w(f"; market-based {i['co2e_market_g']:.4g} g at {i['market_g_per_kwh']:g} g/kWh\n" if i["market_g_per_kwh"] else "\n")
    for dev, d in summary["devices"].items():
        m = d.get("model")
        fit = f", fit r2 {m['r2']:.2f} over {m['rows']} readings" if m else ""
        if m and m.get("family"):
            mix = m.get("blend") or {}
            top = sorted(mix.items(), key=lambda kv: -kv[1])
            name = (f"{m['family']}, blended: " + ", ".join(f"{f} {w * 100:.0f} %" for f, w in top[:3])
                    + (f" and {len(top) - 3} more" if len(top) > 3 else "")) if mix else m["family"]
            fit += (f"\n  step model {name} (held-out error {m['cv_error'] * 100:.1f} %, r2 {m['cv_r2']:.2f}: {m['why']});"
                    f" window {d.get('window_s', float('nan')):.3g} s; quality {d.get('quality') or '-'}")
        bp = d.get("band_parts")
        if bp:
            top = sorted(bp.items(), key=lambda kv: -kv[1])[:3]
            fit += "\n  band from " + ", ".join(f"{k} {v * 100:.0f} %" for k, v in top) + " (its variance, mean share over requests)"
        w(f"{printable(dev)}: {d['method']} via {d['sensor']}, idle {d['idle_w']:.1f} W ({d['idle_source']}){fit}\n")
    w(f"{'route':<28}{'requests':>9}{'energy J':>12}{'J/1k req':>12}{'gCO2e':>10}{'g/1k req':>10}\n")
    for route, d in sorted(summary["routes"].items()):
        w(f"{printable(route)[:27]:<28}{d['requests']:>9}{d['energy_j']:>12.2f}{d['energy_j_per_1k']:>12.1f}{d['co2e_g']:>10.4f}{d['co2e_g_per_1k']:>10.3f}\n")
