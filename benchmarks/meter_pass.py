"""The live meter's CPU per request in its pass, driven by hand (no event loop, no thread): min of 5.

    python benchmarks/meter_pass.py [dict] [sink]

A meter on a replayed constant 300 W trace (as in benchmarks/overhead_app.py), 3 batches of
3,000 ended requests, each pass timed with time.thread_time; ``dict`` hands the labels as a
dict (the middleware before RequestLabels) instead of a RequestLabels; ``sink`` gives the meter
a sink that takes the records (without one, as in the overhead benchmark's wattspan variant, the
meter counts the final requests and builds no record). Prints us/request.
"""

import os, sys, time
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import numpy as np
from wattspan import DeviceTrace, Meter
from wattspan.carbon import CarbonModel
from wattspan.sources.replay import ReplaySource
from wattspan.records import RequestLabels
N = 3000
def once(labels_kind):
    t = np.arange(0, 3600 * 10**9, 5 * 10**6, dtype=np.int64)
    trace = DeviceTrace("gpu0", t, np.full(len(t), 300.0), energy_j=300.0 * t * 1e-9, sensor="constant")
    from wattspan.meter import BatchCallback

    sinks = [BatchCallback(lambda records: None)] if "sink" in sys.argv[1:] else []
    m = Meter(sources=[ReplaySource([trace], loop=True)], carbon=CarbonModel(intensity_g_per_kwh=400.0), idle_w=100.0, autostart=False,
              lag_s=0.0, sinks=sinks)
    m._setup(); m.sampler.stop()
    m.sampler.poll_now(); time.sleep(0.01); m.sampler.poll_now()
    t0 = time.monotonic_ns()
    m._pass()
    time.sleep(0.3)
    total = 0.0
    for rep in range(3):
        base = time.monotonic_ns() - 250_000_000
        for i in range(N):
            rid = f"r{rep}-{i}"
            s = base + i * 50_000
            m.begin(rid, "gpu0", s)
            lab = RequestLabels("/", "GET", 200, "", "", 0, 0, 0, 0) if labels_kind == "nt" else {"route": "/", "http_method": "GET", "status_code": 200, "model": "", "tenant": "", "trace_id": 0, "span_id": 0, "prompt_tokens": 0, "output_tokens": 0}
            m.end(rid, "gpu0", s + 40_000, lab)
        time.sleep(0.05)
        m.sampler.poll_now()
        c0 = time.thread_time()
        m._pass()
        total += time.thread_time() - c0
    assert m.counters["records"] == 3 * N, m.counters
    m.sampler.close()
    return total / (3 * N) * 1e6
kind = "dict" if "dict" in sys.argv[1:] else "nt"
print(kind, "with a sink" if "sink" in sys.argv[1:] else "no sink", "meter pass us/request: min of 5", round(min(once(kind) for _ in range(5)), 2))
