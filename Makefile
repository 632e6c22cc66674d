# One-command set-up: `make demo` and `make test` create .venv, install, and run.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# The CPU build of torch this machine class carries; pyproject accepts a range.
TORCH_PIN ?= torch==2.13.0

.PHONY: install demo test wheel-check bench clean

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_PIN)"
	$(PY) -m pip install -q -e ".[test]"
	touch $@

install: $(VENV)/.installed

demo: install
	$(PY) examples/quickstart.py

test: install
	$(PY) -m pytest -q

# Build the sdist and wheel, install the wheel alone into a fresh venv and run it there.
wheel-check: install
	TORCH_PIN="$(TORCH_PIN)" PY=$(PY) .ci/check_wheel

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .hypothesis
