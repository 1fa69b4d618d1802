#!/usr/bin/env bash
# Install the real backends the test suite exports to, idempotently:
#   * Arize Phoenix (OTLP traces over HTTP and gRPC) in its own venv, .venv-phoenix
#     (its dependency pins must not touch the project's .venv);
#   * Prometheus (scrapes the OpenTelemetry Prometheus exporter) from Debian's apt;
#   * Chromium and chromedriver (the dashboard's headless-browser test) from Debian's apt.
# A second run does nothing but print the versions. Any failure stops the script with a
# message that says what could not be installed and how to fix it.
#
# Environment: PYTHON (default python3), PHOENIX_VENV (default .venv-phoenix),
# PHOENIX_SPEC (default "arize-phoenix"), WATTSPAN_SKIP_PROMETHEUS=1 / WATTSPAN_SKIP_PHOENIX=1 / WATTSPAN_SKIP_CHROMIUM=1
# to leave one out.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python3}"
PHOENIX_VENV="${PHOENIX_VENV:-.venv-phoenix}"
PHOENIX_SPEC="${PHOENIX_SPEC:-arize-phoenix}"

die() {
    echo "install_backends: ERROR: $*" >&2
    exit 1
}

# ---------------------------------------------------------------- Phoenix
install_phoenix() {
    if [ -x "$PHOENIX_VENV/bin/phoenix" ] && "$PHOENIX_VENV/bin/python" -c "import importlib.util as u, sys; sys.exit(u.find_spec(\"phoenix\") is None)" 2>/dev/null; then
        echo "install_backends: Phoenix already installed in $PHOENIX_VENV"
    else
        echo "install_backends: installing $PHOENIX_SPEC into $PHOENIX_VENV (takes a few minutes)"
        "$PYTHON" -m venv "$PHOENIX_VENV" \
            || die "could not create the virtualenv $PHOENIX_VENV with '$PYTHON -m venv' (on Debian: apt-get install python3-venv)"
        "$PHOENIX_VENV/bin/python" -m pip install -q --upgrade pip \
            || die "could not upgrade pip in $PHOENIX_VENV (is a package index reachable?)"
        "$PHOENIX_VENV/bin/python" -m pip install -q "$PHOENIX_SPEC" \
            || die "pip could not install '$PHOENIX_SPEC' into $PHOENIX_VENV (is PyPI reachable? see pip's error above)"
        [ -x "$PHOENIX_VENV/bin/phoenix" ] || die "'$PHOENIX_SPEC' installed but $PHOENIX_VENV/bin/phoenix is missing"
    fi
    local v
    v="$("$PHOENIX_VENV/bin/python" -c 'from importlib.metadata import version; print(version("arize-phoenix"))')" \
        || die "Phoenix in $PHOENIX_VENV does not import; remove $PHOENIX_VENV and rerun"
    echo "install_backends: arize-phoenix $v ($PHOENIX_VENV/bin/phoenix)"
}

# ---------------------------------------------------------------- Prometheus
find_prometheus() {
    command -v prometheus 2>/dev/null || { [ -x /usr/bin/prometheus ] && echo /usr/bin/prometheus; } || true
}

install_prometheus() {
    local bin
    bin="$(find_prometheus)"
    if [ -z "$bin" ]; then
        command -v apt-get >/dev/null || die "Prometheus is not installed and apt-get is missing: install a prometheus binary onto PATH"
        local sudo=""
        if [ "$(id -u)" != 0 ]; then
            command -v sudo >/dev/null || die "installing Prometheus with apt-get needs root (or sudo)"
            sudo="sudo"
        fi
        echo "install_backends: installing Debian's prometheus with apt-get"
        export DEBIAN_FRONTEND=noninteractive
        # The package's postinst starts a service where an init system runs; the tests start
        # their own prometheus on a free port with a temporary config, so we refuse that.
        local policy=/usr/sbin/policy-rc.d created_policy=""
        if [ ! -e "$policy" ]; then
            printf '#!/bin/sh\nexit 101\n' | $sudo tee "$policy" >/dev/null && $sudo chmod +x "$policy" && created_policy=1
        fi
        if ! $sudo apt-get install -y -q --no-install-recommends prometheus >/dev/null 2>&1; then
            $sudo apt-get update -q >/dev/null || die "apt-get update failed (is the Debian mirror reachable?)"
            $sudo apt-get install -y -q --no-install-recommends prometheus \
                || { [ -n "$created_policy" ] && $sudo rm -f "$policy"; die "apt-get could not install prometheus (see apt's error above)"; }
        fi
        [ -n "$created_policy" ] && $sudo rm -f "$policy"
        bin="$(find_prometheus)"
        [ -n "$bin" ] || die "apt-get installed prometheus but no prometheus binary is on PATH"
    else
        echo "install_backends: Prometheus already installed at $bin"
    fi
    echo "install_backends: $("$bin" --version 2>&1 | head -n 1)"
}

# ---------------------------------------------------------------- Chromium (the dashboard's browser test)
install_chromium() {
    if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then
        echo "install_backends: Chromium already installed at $(command -v chromium)"
    else
        command -v apt-get >/dev/null || die "Chromium is not installed and apt-get is missing: put chromium and chromedriver on PATH"
        local sudo=""
        if [ "$(id -u)" != 0 ]; then
            command -v sudo >/dev/null || die "installing Chromium with apt-get needs root (or sudo)"
            sudo="sudo"
        fi
        echo "install_backends: installing Debian's chromium and chromium-driver with apt-get"
        export DEBIAN_FRONTEND=noninteractive
        if ! $sudo apt-get install -y -q --no-install-recommends chromium chromium-driver >/dev/null 2>&1; then
            $sudo apt-get update -q >/dev/null || die "apt-get update failed (is the Debian mirror reachable?)"
            $sudo apt-get install -y -q --no-install-recommends chromium chromium-driver \
                || die "apt-get could not install chromium chromium-driver (see apt's error above)"
        fi
        command -v chromedriver >/dev/null || die "apt-get installed chromium-driver but no chromedriver is on PATH"
    fi
    echo "install_backends: $(chromedriver --version 2>&1 | head -n 1)"
}

[ "${WATTSPAN_SKIP_PHOENIX:-0}" = 1 ] || install_phoenix
[ "${WATTSPAN_SKIP_PROMETHEUS:-0}" = 1 ] || install_prometheus
[ "${WATTSPAN_SKIP_CHROMIUM:-0}" = 1 ] || install_chromium
echo "install_backends: done"
