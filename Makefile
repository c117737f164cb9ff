# dccl-sim: `make run` and `make test` set everything up in a project-local virtual environment first.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
# what `make run` needs (the package and its dependencies); what the tests, lint and benchmarks need on top of it
RUN_STAMP := $(VENV)/.installed-run
STAMP := $(VENV)/.installed
# the benchmark's Flower side by side (part 5) runs in an environment of its own: flwr[simulation] pins another Ray
FLOWER_VENV := .venv-flower
FLOWER_STAMP := $(FLOWER_VENV)/.installed
FLOWER_REQUIREMENTS := experiments/bench/flower-requirements.txt
# torch: an installed one is kept; otherwise this CPU build is installed (extra pip arguments, e.g. a CPU wheel
# index, go in TORCH_PIP_ARGS).
TORCH_SPEC ?= torch==2.13.0
TORCH_PIP_ARGS ?=
# e.g. make bench BENCH_ARGS="--quick" (a couple of minutes) or BENCH_ARGS="--max-devices 100000"
BENCH_ARGS ?=
ARGS ?=

.PHONY: install run test lint format data bench bench-flower-env results-check clean

install: $(STAMP)

$(PY):
	$(PYTHON) -m venv $(VENV)

# uv resolves and unpacks the package's dependencies in parallel: 3 s here where pip took 20 s (12 of them
# resolving, one index query at a time). It is installed into the venv by pip; where it cannot install (an index
# configured for pip alone), pip does. torch stays with pip, which reads TORCH_PIP_ARGS and the machine's pip settings.
INSTALL = ($(PY) -m pip install --quiet --no-compile uv && $(VENV)/bin/uv pip install --quiet --python $(PY) $(1)) || \
	$(PY) -m pip install --quiet --no-compile $(1)

# the installed files are byte-compiled on every core (pip compiles them one at a time: 34 s of a 55 s install
# here), skipping tests and the parts of Ray and torch a simulation never imports: 13 s for the ~5,400 files left
# against 22 s for all ~11,900. compileall skips files already compiled and goes on past one that does not compile
COMPILE_SKIP := /(tests?|testing)/|/site-packages/(ray/(rllib|data|train|tune|llm|serve|air)|torch/_inductor|networkx|pip|setuptools|fontTools|pygments/lexers)/
COMPILE = $(PY) -m compileall -q -j 0 -x '$(COMPILE_SKIP)' \
	"$$($(PY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')" > /dev/null || true

$(RUN_STAMP): pyproject.toml | $(PY)
	@$(PY) -c "import torch" 2>/dev/null && echo "keeping installed torch" || \
		$(PY) -m pip install --quiet --no-compile $(TORCH_PIP_ARGS) "$(TORCH_SPEC)"
	$(call INSTALL,-e .)
	@$(COMPILE)
	@touch $(RUN_STAMP)

$(STAMP): $(RUN_STAMP)
	$(call INSTALL,-e ".[dev]")
	@$(COMPILE)
	@touch $(STAMP)

run: $(RUN_STAMP)
	$(VENV)/bin/dccl-sim run $(ARGS)

test: $(STAMP)
	$(PY) -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check dccl_sim tests experiments examples
	$(VENV)/bin/ruff format --check dccl_sim tests experiments examples

format: $(STAMP)
	$(VENV)/bin/ruff format dccl_sim tests experiments examples
	$(VENV)/bin/ruff check --fix dccl_sim tests experiments examples

data: $(RUN_STAMP)
	$(VENV)/bin/dccl-sim data ml100k --out data/ml100k

# the benchmark harness, package `bench` under experiments/ (see its NOTES.md): writes experiments/bench/results/
# *.json and README_table.md
bench: $(STAMP)
	PYTHONPATH=$(CURDIR)/experiments$${PYTHONPATH:+:$$PYTHONPATH} $(PY) -m bench $(BENCH_ARGS)

# re-run one cell of every published strategies table on the current code and name what moved (exit 1 if anything did)
results-check: $(STAMP)
	PYTHONPATH=$(CURDIR)/experiments$${PYTHONPATH:+:$$PYTHONPATH} $(PY) experiments/results_check.py

# .venv-flower for the benchmark's part 5 (Flower side by side; see experiments/bench/NOTES.md): torch as above,
# Flower with its own Ray, dccl-sim's other dependencies, and this checkout's dccl-sim without its Ray pin. `make
# bench` runs part 5 in it where it exists.
bench-flower-env: $(FLOWER_STAMP)

$(FLOWER_STAMP): $(FLOWER_REQUIREMENTS) pyproject.toml
	test -x $(FLOWER_VENV)/bin/python || $(PYTHON) -m venv $(FLOWER_VENV)
	@$(FLOWER_VENV)/bin/python -c "import torch" 2>/dev/null && echo "keeping installed torch" || \
		$(FLOWER_VENV)/bin/python -m pip install --quiet $(TORCH_PIP_ARGS) "$(TORCH_SPEC)"
	$(FLOWER_VENV)/bin/python -m pip install --quiet -r $(FLOWER_REQUIREMENTS)
	$(FLOWER_VENV)/bin/python -m pip install --quiet --no-deps -e .
	@touch $(FLOWER_STAMP)

clean:
	rm -rf $(VENV) $(FLOWER_VENV) runs .pytest_cache .ruff_cache
