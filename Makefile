# make demo: explain the built-in network's layers.  make test: the test suite.
# make gpu-check: on a machine with an NVIDIA GPU, the prepared GPU run (benchmarks/gpu_check.py).
# Both create or refresh .venv first (the stamp file is rebuilt when pyproject.toml changes).
VENV   ?= .venv
PYTHON ?= python3
TORCH  ?= torch==2.13.0
PY     := $(VENV)/bin/python

.PHONY: demo test gpu-check clean

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

# Under 8 minutes: correctness and autotuning in the loop on the GPU, then the tuned suite. It
# runs on the machine's own Python (its CUDA build of torch, its Triton), not the CPU venv.
gpu-check:
	PYTHONPATH=$(CURDIR) $(PYTHON) benchmarks/gpu_check.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .hypothesis
