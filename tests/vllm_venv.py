"""The real-vLLM tests' shared setup: the vLLM virtualenv, its environment, the tiny model, and the
loader that makes a script run in that virtualenv import *this* checkout's wattspan.

vLLM lives in its own virtualenv (``.venv-vllm``, made by ``.ci/install_vllm.sh``, or
``$WATTSPAN_VLLM_VENV``; its pins must not touch ``.venv``), so the tests run the server and
the engine as subprocesses of its Python. Without it they skip, with the reason; under CI
(``CI=true``) or with ``WATTSPAN_REQUIRE_BACKENDS=1`` a missing vLLM fails instead.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
VENV = Path(os.environ.get("WATTSPAN_VLLM_VENV", ROOT / ".venv-vllm"))
VPY = VENV / "bin" / "python"
REQUIRED = os.environ.get("CI", "").lower() in ("1", "true", "yes") or os.environ.get("WATTSPAN_REQUIRE_BACKENDS") == "1"
VLLM_ENV = {
    "VLLM_TARGET_DEVICE": "cpu",
    "VLLM_CPU_KVCACHE_SPACE": "1",  # GiB
    "VLLM_CPU_OMP_THREADS_BIND": "nobind",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "VLLM_NO_USAGE_STATS": "1",
    "DO_NOT_TRACK": "1",
    "TOKENIZERS_PARALLELISM": "false",
}

#: The head of a script run by the vLLM virtualenv's Python as ``VPY script.py MODEL_DIR CHECKOUT``:
#: it imports wattspan from CHECKOUT (``sys.argv[2]``), whichever checkout the virtualenv's
#: editable install points at.
CHECKOUT_LOADER = r"""
import importlib.util, os, sys
ROOT = sys.argv[2]
for _name, _sub in (("wattspan", "middleware"), ("wattspan.integrations", "integrations")):
    _spec = importlib.util.spec_from_file_location(_name, os.path.join(ROOT, _sub, "__init__.py"),
                                                   submodule_search_locations=[os.path.join(ROOT, _sub)])
    _mod = importlib.util.module_from_spec(_spec)
    sys.modules[_name] = _mod
    _spec.loader.exec_module(_mod)
"""


def require_vllm() -> None:
    """Skip (or, when required, fail) unless the vLLM virtualenv imports vLLM and wattspan's plugin."""
    why = None
    if not VPY.exists():
        why = f"real vLLM is not installed in {VENV.name}: run `bash .ci/install_vllm.sh` (`make test` does)"
    else:
        r = subprocess.run([str(VPY), "-c", "import vllm, wattspan.integrations.vllm"], capture_output=True, text=True, timeout=300)
        if r.returncode != 0:
            why = f"vLLM in {VENV.name} does not import ({r.stderr.strip().splitlines()[-1:] or '?'}); rerun .ci/install_vllm.sh"
    if why:
        if REQUIRED:
            pytest.fail(why + " [required: CI or WATTSPAN_REQUIRE_BACKENDS=1]")
        pytest.skip(why)


def vllm_env(**extra: str) -> dict[str, str]:
    """This process's environment without OTEL_/WATTSPAN_/VLLM_ variables, plus VLLM_ENV and ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "WATTSPAN_", "VLLM_"))}
    return {**env, **VLLM_ENV, **extra}


def vllm_script(body: str) -> str:
    """A script for the vLLM virtualenv: :data:`CHECKOUT_LOADER`, then ``body``."""
    return CHECKOUT_LOADER + body


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    """A tiny random Llama with a locally trained tokenizer (tests/vllm_tiny_model.py): nothing is downloaded."""
    require_vllm()
    out = tmp_path_factory.mktemp("tiny-llama")
    r = subprocess.run([str(VPY), str(ROOT / "tests" / "vllm_tiny_model.py"), str(out)], capture_output=True, text=True,
                       timeout=300, env={**os.environ, **VLLM_ENV})
    assert r.returncode == 0, r.stderr[-3000:]
    return out
