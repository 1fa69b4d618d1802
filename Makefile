# The two commands of the README's quick start, and what they need.
#   make demo   - install into .venv and run `wattspan demo` (no GPU, no service needed)
#   make test   - install into .venv, install the test backends, run the whole suite
PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python
PIP     = $(PY) -m pip

.PHONY: demo test install install-test backends clean

$(VENV)/.installed: pyproject.toml
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
	bash .ci/install_backends.sh

test: install backends
	WATTSPAN_REQUIRE_BACKENDS=1 $(VENV)/bin/pytest -q

clean:
	rm -rf $(VENV) .venv-phoenix build *.egg-info .pytest_cache .hypothesis
