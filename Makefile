# Two commands on a fresh machine with Python 3.11+ and make:
#   make demo   installs into .venv if needed, runs the digits benchmark
#   make test   installs into .venv if needed, runs the test suite
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test overhead clean

install: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[test,experiments]"
	@touch $(STAMP)

# Digits: every method, 3 seeds, learning rates from experiments/tuned.json.
demo: $(STAMP)
	$(BIN)/python -m experiments.benchmark --dataset digits --seeds 3 --out runs/demo

# Measurement cost benchmark (README, Performance); 6-10 minutes on 2 cores.
overhead: $(STAMP)
	$(BIN)/python -m experiments.overhead --out runs/overhead

test: $(STAMP)
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
