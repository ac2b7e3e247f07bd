# Two commands matter (see README): `make demo` and `make test`. Both set up the venv first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.mbn-installed
# pytest workers: the suite is CPU-bound and sized for 2 cores.
WORKERS ?= 2

.PHONY: setup test demo bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip
	# torch first and pinned: an unpinned resolve would pull a multi-GB build.
	$(BIN)/pip install torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install -e '.[dev]'
	touch $@

# One BLAS/OpenMP thread per worker: with -n 2 on 2 cores, more threads only oversubscribe (3x slower).
test: setup
	OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 WANDB_MODE=offline $(BIN)/python -m pytest -n $(WORKERS) --durations=15

demo: setup
	$(BIN)/mbn-train -m experiment=demo
	$(BIN)/mbn-compare outputs/sweeps/demo --out outputs/compare/demo

bench: setup
	$(BIN)/python scripts/bench_norms.py
	$(BIN)/python scripts/bench_loop.py

clean:
	rm -rf outputs multirun .pytest_cache
