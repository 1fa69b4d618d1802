"""Real backends for the tests, started by the tests: Arize Phoenix and Prometheus.

``bash .ci/install_backends.sh`` installs both (Phoenix into ``.venv-phoenix``,
Prometheus from Debian's apt). A test that needs one is skipped, saying how
to install it, when it is missing - or fails, when ``WATTSPAN_REQUIRE_BACKENDS=1``
(CI sets it so a broken install cannot pass as skips).

Fixtures (a test module imports them: ``from .backends import phoenix  # noqa: F401``;
or ``conftest.py`` makes them visible everywhere with
``from .backends import otel_prometheus, phoenix, prometheus  # noqa: F401``):

* ``phoenix`` (session): a :class:`Phoenix` serving OTLP/HTTP and OTLP/gRPC
  on free loopback ports, with a temporary working directory (SQLite);
* ``prometheus`` (function): a :class:`Prometheus` on a free loopback port,
  scraping ``127.0.0.1:<target_port>`` every second;
* ``otel_prometheus`` (function): an OpenTelemetry ``MeterProvider`` whose
  Prometheus exporter serves ``/metrics`` on that target port.

Every process is started in its own process group and terminated (then
killed) at teardown. The context managers :func:`start_phoenix` and
:func:`start_prometheus` do the same outside pytest fixtures.

Phoenix's gRPC server binds every interface (``[::]``) whatever
``PHOENIX_HOST`` says; the tests only ever talk to it on 127.0.0.1.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]
PHOENIX_BIN = Path(os.environ.get("WATTSPAN_PHOENIX_BIN", REPO / ".venv-phoenix" / "bin" / "phoenix"))
INSTALL_HINT = "run `bash .ci/install_backends.sh` (or `make backends`)"

__all__ = [
    "Phoenix",
    "Prometheus",
    "PrometheusExporter",
    "free_port",
    "otel_prometheus",
    "phoenix",
    "prometheus",
    "prometheus_bin",
    "start_phoenix",
    "start_prometheus",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _unavailable(what: str) -> None:
    msg = f"{what} is not installed: {INSTALL_HINT}"
    if os.environ.get("WATTSPAN_REQUIRE_BACKENDS", "") == "1":
        pytest.fail(msg + " (WATTSPAN_REQUIRE_BACKENDS=1)", pytrace=False)
    pytest.skip(msg)


def _get_json(url: str, timeout_s: float = 5.0) -> Any:
    with urllib.request.urlopen(url, timeout=timeout_s) as r:
        return json.load(r)


def _port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def _tail(path: Path, n: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return "(no log)"


class _Process:
    """A child in its own process group, with its output in ``log``; always stopped."""

    def __init__(self, argv: list[str], *, env: dict[str, str], log: Path, cwd: Path) -> None:
        self.log = log
        self._fh = open(log, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(argv, env=env, cwd=cwd, stdout=self._fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)

    def wait_ready(self, what: str, ready: Callable[[], bool], timeout_s: float) -> float:
        """Poll ``ready`` until true; returns the seconds it took. Fails with the log's tail."""
        t0 = time.monotonic()
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{what} exited with code {self.proc.returncode} while starting; its log:\n{_tail(self.log)}")
            try:
                if ready():
                    return time.monotonic() - t0
            except (OSError, urllib.error.URLError, ValueError):
                pass
            if time.monotonic() - t0 > timeout_s:
                raise RuntimeError(f"{what} was not ready after {timeout_s:.0f} s; its log:\n{_tail(self.log)}")
            time.sleep(0.1)

    def stop(self, timeout_s: float = 10.0) -> None:
        p = self.proc
        try:
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
                try:
                    p.wait(timeout_s)
                except subprocess.TimeoutExpired:
                    os.killpg(p.pid, signal.SIGKILL)
                    p.wait(timeout_s)
        finally:
            self._fh.close()


def _child_env(**extra: str) -> dict[str, str]:
    # The test process may carry OTEL_* settings meant for itself; a backend must not read them.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "PHOENIX_"))}
    env.update(extra)
    return env


# ---------------------------------------------------------------------------- Phoenix


@dataclass(frozen=True)
class Phoenix:
    """A running Phoenix. ``traces_url`` takes OTLP/HTTP, ``grpc_endpoint`` OTLP/gRPC
    (``http://127.0.0.1:PORT``, plaintext). Spans land in the project named by the
    resource attribute ``openinference.project.name`` (default ``"default"``)."""

    http_url: str
    grpc_endpoint: str
    working_dir: Path
    startup_s: float
    log: Path

    @property
    def traces_url(self) -> str:
        return f"{self.http_url}/v1/traces"

    def spans(self, project: str = "default", *, limit: int = 1000) -> list[dict]:
        """The project's spans as Phoenix's REST API returns them (``[]`` if it has none yet)."""
        url = f"{self.http_url}/v1/projects/{urllib.parse.quote(project, safe='')}/spans?limit={limit}"
        try:
            return _get_json(url)["data"]
        except urllib.error.HTTPError as e:
            if e.code == 404:  # Phoenix creates a project with its first span
                return []
            raise

    def wait_for_spans(self, project: str, n: int, *, timeout_s: float = 30.0, where: Callable[[dict], bool] = lambda s: True) -> list[dict]:
        """Poll until ``project`` has at least ``n`` spans matching ``where``; returns those."""
        deadline = time.monotonic() + timeout_s
        while True:
            got = [s for s in self.spans(project) if where(s)]
            if len(got) >= n or time.monotonic() > deadline:
                if len(got) < n:
                    raise AssertionError(f"Phoenix project {project!r} has {len(got)} matching spans after {timeout_s} s, expected {n}; log:\n{_tail(self.log)}")
                return got
            time.sleep(0.1)


@contextmanager
def start_phoenix(*, working_dir: Path | None = None, timeout_s: float = 120.0) -> Iterator[Phoenix]:
    """Start ``phoenix serve`` on free loopback ports; stop it on exit."""
    if not PHOENIX_BIN.exists():
        raise FileNotFoundError(f"{PHOENIX_BIN} not found: {INSTALL_HINT}")
    with tempfile.TemporaryDirectory(prefix="wattspan-phoenix-") as tmp:
        wd = Path(working_dir) if working_dir is not None else Path(tmp)
        http_port, grpc_port = free_port(), free_port()
        while grpc_port == http_port:
            grpc_port = free_port()
        env = _child_env(
            PHOENIX_TELEMETRY_ENABLED="false",
            PHOENIX_WORKING_DIR=str(wd),
            PHOENIX_HOST="127.0.0.1",
            PHOENIX_PORT=str(http_port),
            PHOENIX_GRPC_PORT=str(grpc_port),
        )
        proc = _Process([str(PHOENIX_BIN), "serve"], env=env, log=Path(tmp) / "phoenix.log", cwd=Path(tmp))
        try:
            url = f"http://127.0.0.1:{http_port}"

            def ready() -> bool:
                with urllib.request.urlopen(f"{url}/readyz", timeout=2) as r:
                    return r.status == 200 and _port_open(grpc_port)

            took = proc.wait_ready("Phoenix", ready, timeout_s)
            yield Phoenix(url, f"http://127.0.0.1:{grpc_port}", wd, took, proc.log)
        finally:
            proc.stop()


@pytest.fixture(scope="session")
def phoenix() -> Iterator[Phoenix]:
    """A Phoenix server for the whole session (it takes ~10-15 s to start)."""
    if not PHOENIX_BIN.exists():
        _unavailable(f"Arize Phoenix ({PHOENIX_BIN.relative_to(REPO) if PHOENIX_BIN.is_relative_to(REPO) else PHOENIX_BIN})")
    with start_phoenix() as ph:
        yield ph


# ---------------------------------------------------------------------------- Prometheus


def prometheus_bin() -> str | None:
    """``$WATTSPAN_PROMETHEUS_BIN``, else ``prometheus`` on PATH, else Debian's ``/usr/bin/prometheus``."""
    for cand in (os.environ.get("WATTSPAN_PROMETHEUS_BIN"), shutil.which("prometheus"), "/usr/bin/prometheus"):
        if cand and os.access(cand, os.X_OK):
            return cand
    return None


@dataclass(frozen=True)
class Prometheus:
    """A running Prometheus at ``url`` scraping ``targets`` every ``scrape_interval_s``;
    ``target_port`` is the first target's port."""

    url: str
    targets: tuple[str, ...]
    scrape_interval_s: float
    startup_s: float
    log: Path

    @property
    def target_port(self) -> int:
        return int(self.targets[0].rsplit(":", 1)[1])

    def query(self, promql: str) -> list[dict]:
        """An instant PromQL query: the result vector (``[{"metric": {...}, "value": [t, "v"]}]``)."""
        body = _get_json(f"{self.url}/api/v1/query?" + urllib.parse.urlencode({"query": promql}))
        if body.get("status") != "success":
            raise AssertionError(f"PromQL {promql!r} failed: {body}")
        return body["data"]["result"]

    def wait_for(self, promql: str, ok: Callable[[list[dict]], bool], *, timeout_s: float = 20.0) -> list[dict]:
        """Poll ``promql`` until ``ok(result)``; returns the result (or fails with the last one)."""
        deadline = time.monotonic() + timeout_s
        while True:
            res = self.query(promql)
            if ok(res):
                return res
            if time.monotonic() > deadline:
                targets = _get_json(f"{self.url}/api/v1/targets")["data"]["activeTargets"]
                health = [(t["scrapeUrl"], t["health"], t.get("lastError")) for t in targets]
                raise AssertionError(f"PromQL {promql!r} still {res} after {timeout_s} s; targets: {health}")
            time.sleep(0.2)


@contextmanager
def start_prometheus(targets: list[str], *, scrape_interval_s: float = 1.0, timeout_s: float = 30.0) -> Iterator[Prometheus]:
    """Start Prometheus on a free loopback port with a temporary config and storage."""
    binary = prometheus_bin()
    if binary is None:
        raise FileNotFoundError(f"no prometheus binary on PATH: {INSTALL_HINT}")
    if not targets:
        raise ValueError("start_prometheus needs at least one host:port target")
    with tempfile.TemporaryDirectory(prefix="wattspan-prometheus-") as tmp:
        t = Path(tmp)
        interval = f"{max(1, round(scrape_interval_s * 1000))}ms"
        cfg = {
            "global": {"scrape_interval": interval, "scrape_timeout": interval, "evaluation_interval": interval},
            "scrape_configs": [{"job_name": "wattspan", "static_configs": [{"targets": list(targets)}]}],
        }
        (t / "prometheus.yml").write_text(json.dumps(cfg))  # JSON is YAML
        port = free_port()
        proc = _Process(
            [
                binary,
                f"--config.file={t / 'prometheus.yml'}",
                f"--storage.tsdb.path={t / 'data'}",
                f"--web.listen-address=127.0.0.1:{port}",
                "--log.level=warn",
            ],
            env=_child_env(),
            log=t / "prometheus.log",
            cwd=t,
        )
        try:
            url = f"http://127.0.0.1:{port}"

            def ready() -> bool:
                with urllib.request.urlopen(f"{url}/-/ready", timeout=2) as r:
                    return r.status == 200

            took = proc.wait_ready("Prometheus", ready, timeout_s)
            yield Prometheus(url, tuple(targets), scrape_interval_s, took, proc.log)
        finally:
            proc.stop()


@pytest.fixture
def prometheus() -> Iterator[Prometheus]:
    """A Prometheus (starts in well under a second) scraping ``127.0.0.1:<target_port>`` every 1 s."""
    if prometheus_bin() is None:
        _unavailable("Prometheus (the `prometheus` binary)")
    with start_prometheus([f"127.0.0.1:{free_port()}"], scrape_interval_s=1.0) as prom:
        yield prom


@dataclass
class PrometheusExporter:
    """An OpenTelemetry MeterProvider exported through ``/metrics`` at ``metrics_url``."""

    meter_provider: Any
    metrics_url: str
    registry: Any = field(repr=False)


@pytest.fixture
def otel_prometheus(prometheus: Prometheus) -> Iterator[PrometheusExporter]:
    """The OTel Prometheus exporter serving on ``prometheus.target_port`` (its own registry)."""
    prometheus_client = pytest.importorskip("prometheus_client")
    pytest.importorskip("opentelemetry.exporter.prometheus")
    from opentelemetry.exporter.prometheus import PrometheusMetricReader
    from opentelemetry.sdk.metrics import MeterProvider

    registry = prometheus_client.CollectorRegistry()
    reader = PrometheusMetricReader(registry=registry)
    mp = MeterProvider(metric_readers=[reader])
    server, thread = prometheus_client.start_http_server(prometheus.target_port, addr="127.0.0.1", registry=registry)
    try:
        yield PrometheusExporter(mp, f"http://127.0.0.1:{prometheus.target_port}/metrics", registry)
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)
        mp.shutdown()
