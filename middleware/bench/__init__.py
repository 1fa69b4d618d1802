"""``wattspan bench``: should this model serve on demand or in batches, and what will a
million calls cost in energy and CO2e, here or in another region?

Register the command with :func:`add_bench_arguments` (options on a subparser) and
:func:`run_bench` (``args -> exit status``). The pure arithmetic is in
:mod:`wattspan.bench.projection`.
"""

from .runner import BenchConfig, BenchError, add_bench_arguments, config_from_args, run_bench

__all__ = ["BenchConfig", "BenchError", "add_bench_arguments", "config_from_args", "run_bench"]
