# dccl-sim: `make run` and `make test` set everything up in a project-local virtual environment first.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# torch: an installed one is kept; otherwise this CPU build is installed (extra pip arguments, e.g. a CPU wheel
# index, go in TORCH_PIP_ARGS).
TORCH_SPEC ?= torch==2.13.0
TORCH_PIP_ARGS ?=
# e.g. make bench BENCH_ARGS="--quick" (a couple of minutes) or BENCH_ARGS="--max-devices 100000"
BENCH_ARGS ?=
ARGS ?=

.PHONY: install run test lint format data bench clean

install: $(STAMP)

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(PY)
	@$(PY) -c "import torch" 2>/dev/null && echo "keeping installed torch" || \
		$(PY) -m pip install --quiet $(TORCH_PIP_ARGS) "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e ".[dev]"
	@touch $(STAMP)

run: $(STAMP)
	$(VENV)/bin/dccl-sim run $(ARGS)

test: $(STAMP)
	$(PY) -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check dccl_sim tests experiments
	$(VENV)/bin/ruff format --check dccl_sim tests experiments

format: $(STAMP)
	$(VENV)/bin/ruff format dccl_sim tests experiments
	$(VENV)/bin/ruff check --fix dccl_sim tests experiments

data: $(STAMP)
	$(VENV)/bin/dccl-sim data ml100k --out data/ml100k

# the benchmark harness, package `bench` under experiments/ (see its NOTES.md): writes experiments/bench/results/
# *.json and README_table.md
bench: $(STAMP)
	PYTHONPATH=$(CURDIR)/experiments$${PYTHONPATH:+:$$PYTHONPATH} $(PY) -m bench $(BENCH_ARGS)

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
