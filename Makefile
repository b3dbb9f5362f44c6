# make demo: explain the built-in network's layers.  make test: the test suite.
# Both create or refresh .venv first (the stamp file is rebuilt when pyproject.toml changes).
VENV   ?= .venv
PYTHON ?= python3
TORCH  ?= torch==2.13.0
PY     := $(VENV)/bin/python

.PHONY: demo test clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet "$(TORCH)"
	$(PY) -m pip install --quiet -e ".[test]"
	touch $@

demo: $(VENV)/.installed
	$(VENV)/bin/zeroskip demo

# The tests run on every core (pytest-xdist), sharing one kernel cache (tests/conftest.py).
test: $(VENV)/.installed
	$(PY) -m pytest -q -n auto

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .hypothesis
