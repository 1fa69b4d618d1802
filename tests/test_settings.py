"""Configuration is read and validated once, at start: a bad WATTSPAN_* variable stops the
server with one message naming it, never a traceback per request (reliability item 8)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from wattspan.settings import Settings, SettingsError

from .conftest import free_port

ROOT = Path(__file__).resolve().parents[1]

BAD = [
    ("WATTSPAN_PUE", "abc"),
    ("WATTSPAN_PUE", "-1"),
    ("WATTSPAN_PUE", "nan"),
    ("WATTSPAN_REGION", "nowhere"),
    ("WATTSPAN_SAMPLE_INTERVAL_S", "-1"),
    ("WATTSPAN_SAMPLE_INTERVAL_S", "1e-7"),
    ("WATTSPAN_PEERS", "maybe"),
    ("WATTSPAN_REQUEST_ID_HEADER", "bad header"),
    ("WATTSPAN_DEVICE", "gpu 0\n"),
    ("WATTSPAN_BOARD_LAG_MS", "4ms"),
    ("WATTSPAN_BOARD_LAG_MS", "-1"),
    ("WATTSPAN_BOARD_LAG_MS", "5000"),
    ("WATTSPAN_BOARD_LAG_MS", "gpu0=4,gpu0=5"),
    ("WATTSPAN_BOARD_LAG_MS", "gpu 0=4"),
    ("WATTSPAN_BOARD_LAG_MS", "=4"),
    ("WATTSPAN_LEDGER", "/dev/null"),  # not a file: it served, failing every write, records held then dropped
    ("WATTSPAN_LEDGER", "/proc/1/x.sqlite"),
]


def test_the_pseudonym_key_is_checked_and_never_shown():
    with pytest.raises(SettingsError) as err:
        Settings.from_env({"WATTSPAN_PSEUDONYM_KEY": "too-short-secret"})
    assert err.value.var == "WATTSPAN_PSEUDONYM_KEY" and "too-short-secret" not in str(err.value)
    s = Settings.from_env({"WATTSPAN_PSEUDONYM_KEY": "k" * 32, "WATTSPAN_STEPS_TOKEN": "t" * 16})
    assert s.pseudonym_key == "k" * 32 and "k" * 32 not in repr(s) and "t" * 16 not in repr(s)


@pytest.mark.parametrize("var,value", BAD)
def test_a_bad_variable_names_itself_the_value_and_what_is_allowed(var, value):
    with pytest.raises(SettingsError) as err:
        Settings.from_env({var: value})
    msg = str(err.value)
    assert err.value.var == var and var in msg and repr(value.strip()) in msg and "not valid" in msg


def test_the_ledger_path_is_expanded_as_a_shell_would(monkeypatch, tmp_path):
    # set by docker or k8s with no shell: "~/x.sqlite" had made a folder named "~" in the working directory
    monkeypatch.setenv("HOME", str(tmp_path))
    assert Settings.from_env({"WATTSPAN_LEDGER": "~/data/x.sqlite"}).ledger == str(tmp_path / "data" / "x.sqlite")


def test_good_variables_are_read_into_one_frozen_object():
    s = Settings.from_env({"WATTSPAN_PUE": "1.2", "WATTSPAN_REGION": "FR", "WATTSPAN_SAMPLE_INTERVAL_S": "0.001",
                           "WATTSPAN_PEERS": "off", "WATTSPAN_LEDGER": "x.sqlite", "WATTSPAN_REQUEST_ID_HEADER": "X-Request-Id"})
    assert (s.pue, s.region, s.sample_interval_s, s.peers, s.ledger, s.request_id_header) == (1.2, "FR", 0.001, False, "x.sqlite", "X-Request-Id")
    with pytest.raises(Exception):
        s.pue = 2.0  # frozen
    assert Settings.from_env({}) == Settings()
    # the boards' electrical lag, in ms, read in seconds: one value or per device (empty: none)
    assert Settings.from_env({"WATTSPAN_BOARD_LAG_MS": "0.25"}).board_lag_s == 0.00025
    assert Settings.from_env({"WATTSPAN_BOARD_LAG_MS": " gpu0=4, gpu1=0 "}).board_lag_s == {"gpu0": 0.004, "gpu1": 0.0}
    assert Settings.from_env({"WATTSPAN_BOARD_LAG_MS": ""}).board_lag_s is None


def test_the_meter_refuses_a_sample_interval_below_one_millisecond():
    from wattspan import Meter

    with pytest.raises(ValueError, match="between 0.001 and 10"):
        Meter(sample_interval_s=1e-7, autostart=False)


@pytest.mark.parametrize("var,value", [BAD[0], BAD[3], BAD[5], ("WATTSPAN_BOARD_LAG_MS", "4ms")])
def test_the_server_refuses_to_start_with_one_clear_message(var, value):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "WATTSPAN_SIMULATE": "1", "WATTSPAN_OTEL": "0", "WATTSPAN_PEERS": "0", var: value}
    t0 = time.monotonic()
    p = subprocess.run([sys.executable, "-m", "uvicorn", "tests.durability_app:app", "--port", str(free_port())],
                       env=env, cwd=ROOT, capture_output=True, text=True, timeout=60)
    out = p.stdout + p.stderr
    assert p.returncode != 0 and time.monotonic() - t0 < 30
    assert var in out and "refusing to start" in out and "Traceback" not in out, out


def _cli(*args: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "wattspan.cli", *args], env={**os.environ, **env}, capture_output=True, text=True, timeout=60)


def test_the_cli_applies_a_variable_only_to_the_subcommand_being_run():
    assert _cli("--help", env={"WATTSPAN_REQUESTS": "x"}).returncode == 0
    p = _cli("report", "--db", "/nonexistent/ledger.sqlite", env={"WATTSPAN_CONCURRENCY": "abc"})
    assert "Traceback" not in p.stderr and "CONCURRENCY" not in p.stderr
    p = _cli("demo", "--embeddings", "0", env={"WATTSPAN_CONCURRENCY": "abc"})
    assert p.returncode == 2 and "WATTSPAN_CONCURRENCY='abc'" in p.stderr and "--concurrency" in p.stderr and "Traceback" not in p.stderr
