# coordinator_agent — `make run` and `make test` work on a fresh machine: they create the
# virtualenv, install the package and start RabbitMQ and Consul (installing them when absent).
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: help install services tools run test faults unit integration lint bench demo clean

help:
	@echo "make run       coordinator + demo agents with a trickle of tasks (Ctrl-C to stop)"
	@echo "make test      lint, then the whole suite against real RabbitMQ and Consul"
	@echo "make faults    the fault-injection suite, on a RabbitMQ node of its own (~5 min)"
	@echo "make lint      ruff + mypy (strict)"
	@echo "make services  make sure RabbitMQ and Consul are running on loopback"
	@echo "make bench     benchmarks with their baselines (prints ratios)"

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev,bench,fast]'
	touch $(STAMP)

install: $(STAMP)

services:
	bash scripts/services.sh all

tools:
	bash scripts/tools.sh all

run: install services
	$(BIN)/coordinator-agent demo --forever --agents 3 --rate 2

demo: install services
	$(BIN)/coordinator-agent demo --agents 3 --tasks 30

lint: install
	$(BIN)/ruff check .
	$(BIN)/mypy

unit: install
	$(BIN)/python -m pytest tests/unit -q

integration: install services
	$(BIN)/python -m pytest tests/integration -q

test: install services tools lint
	$(BIN)/python -m pytest -q -ra

# The fault suite starts its own RabbitMQ node (scripts/faults-broker.sh: port 5682, node
# faults@localhost) and always stops it; the shared broker is never paused or restarted.
faults: install services
	rm -f var/faults/figures.jsonl
	COORDINATOR_TEST_FAULTS=1 $(BIN)/python -m pytest tests/faults -q -ra -s --timeout 600

bench: install services
	$(BIN)/python bench/run_all.py

clean:
	rm -rf $(VENV) var build *.egg-info .pytest_cache .mypy_cache .ruff_cache
