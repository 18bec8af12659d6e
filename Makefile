# Quickstart: `make demo` and `make test` each create .venv when missing, install, then run.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
WORK   ?= work
# `make demo` keeps the demo's budget from its own start: the install counts (seconds since 1970)
MAKE_STARTED := $(shell date +%s)
DEMO_BUDGET  ?= 15
# torch/torchvision versions that install from local disk here; elsewhere pip takes the
# newest release allowed by pyproject's ranges when TORCH_SPEC is set empty.
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1

.PHONY: demo test lint install clean benchmarks

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(VENV)/.installed: $(BIN)/python pyproject.toml
	@if [ -n "$(TORCH_SPEC)" ] && ! $(BIN)/python -c "import torch, torchvision" 2>/dev/null; then \
		$(BIN)/pip install -q $(TORCH_SPEC); fi
	$(BIN)/pip install -q -e ".[dev]"
	touch $@

install: $(VENV)/.installed

demo: install
	$(BIN)/leanvl demo --out $(WORK)/demo --budget $(DEMO_BUDGET) --budget-from $(MAKE_STARTED)

test: install
	$(BIN)/python -m pytest -q tests

lint: install
	$(BIN)/ruff check src tests benchmarks

benchmarks: install
	$(BIN)/python benchmarks/decode_throughput.py
	$(BIN)/python benchmarks/synth_time.py

clean:
	rm -rf $(WORK) .pytest_cache build *.egg-info src/*.egg-info
