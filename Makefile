# Quick start: `make demo` (train + evaluate on the embedded SynthCity data) and `make test`.
# Both create .venv if it is missing and reuse it otherwise.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The install stamp is keyed by pyproject.toml's content: a changed pyproject reinstalls.
PYPROJECT_HASH := $(shell $(PYTHON) -c "import hashlib;print(hashlib.sha256(open('pyproject.toml','rb').read()).hexdigest()[:12])")
STAMP := $(VENV)/.seg-installed-$(PYPROJECT_HASH)

# Demo budget: a short SynthCity run of 300 iterations. trainer.amp=auto: fp16 on a GPU; on a
# CPU bf16 where it computes bfloat16 natively (AVX512-BF16, AMX), float32 elsewhere
# (docs/benchmarks.md: on 2 cores, torch threads and precision decide the speed, loader
# workers do not).
DEMO_EXPERIMENT ?= synthcity_ohem
DEMO_ITERS ?= 300
DEMO_ARGS ?=
TEST_ARGS ?=

.PHONY: help install data demo test lint format clean

help:
	@echo "make demo     set up .venv, make SynthCity, train briefly, evaluate, show where results are"
	@echo "make test     set up .venv, run the test suite"
	@echo "make data     make the SynthCity dataset under data/synthcity (if missing)"
	@echo "make lint     ruff check + ruff format --check + lint-imports (the floors)"

$(STAMP):
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install -e '.[dev,deploy]'
	@rm -f $(VENV)/.seg-installed-*
	@touch $(STAMP)

# The stamp covers the dependencies; the editable link to this checkout is re-made (cheaply,
# without dependencies) when the venv was installed from another clone, e.g. a cached CI venv.
install: $(STAMP)
	@(cd / && $(abspath $(PY)) -c "import pathlib,sys,seg; sys.exit(pathlib.Path(seg.__file__).resolve().parent != pathlib.Path('$(CURDIR)/seg').resolve())") 2>/dev/null \
		|| $(PY) -m pip install --quiet --no-deps -e .

data: install
	$(PY) tools/make_synthcity.py

demo: data
	@set -e; run_dir=outputs/demo/$$(date +%Y-%m-%d_%H-%M-%S); \
	$(PY) tools/train.py +experiment=$(DEMO_EXPERIMENT) trainer.max_iters=$(DEMO_ITERS) \
		trainer.amp=auto hydra.run.dir=$$run_dir $(DEMO_ARGS); \
	$(PY) tools/eval.py ckpt=$$run_dir/checkpoints/last.pt; \
	echo; \
	echo "Run directory : $$run_dir"; \
	echo "Checkpoints   : $$run_dir/checkpoints/last.pt (and best.pt, by val mIoU)"; \
	echo "Metrics       : $$run_dir/checkpoints/metrics.json and metrics.md"; \
	echo "TensorBoard   : $$run_dir (event files)"; \
	echo "Open it with  : $(VENV)/bin/tensorboard --logdir outputs"

test: install
	$(PY) -m pytest $(TEST_ARGS)

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/lint-imports --no-cache

format: install
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

clean:
	rm -rf outputs multirun .pytest_cache .ruff_cache
