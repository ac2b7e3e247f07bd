# Two commands matter (see README): `make demo` and `make test`. Both set up the venv first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.mbn-installed
# The exact versions this project is tested with (scripts/freeze_constraints.py writes it);
# pyproject.toml only declares the supported ranges.
CONSTRAINTS := constraints.txt
# pytest workers: the suite is CPU-bound and sized for 2 cores.
WORKERS ?= 2

.PHONY: setup test test-threads demo bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml $(CONSTRAINTS)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip
	# torch first, at the tested version: an unconstrained resolve would pull a multi-GB build.
	$(BIN)/pip install -c $(CONSTRAINTS) torch torchvision
	# The framework's extras (training, sweeps, comparison) and the test tools, at the tested versions.
	$(BIN)/pip install -c $(CONSTRAINTS) -e '.[all,dev]'
	touch $@

# One BLAS/OpenMP thread per worker: with -n 2 on 2 cores, more threads only oversubscribe (3x slower).
test: setup
	OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 WANDB_MODE=offline $(BIN)/python -m pytest -n $(WORKERS) --dist worksteal --durations=15

# The numerically sensitive tests (marker `numerics`) again with 2 and then 4 threads: a float
# reduction's order depends on the thread count as it does on the machine, so their tolerances must
# hold under both (what another machine would see). CI runs it after `make test`. One worker and
# passive OpenMP waits: two workers of 2 threads each on 2 cores took 13 min for the 2-thread pass.
test-threads: setup
	for threads in 2 4; do \
		OMP_NUM_THREADS=$$threads MKL_NUM_THREADS=$$threads OMP_WAIT_POLICY=PASSIVE WANDB_MODE=offline \
			$(BIN)/python -m pytest -n 1 -m numerics -q --durations=5 || exit 1; \
	done

demo: setup
	$(BIN)/mbn-train -m experiment=demo
	$(BIN)/mbn-compare outputs/sweeps/demo --out outputs/compare/demo --baseline bn --interval ci95 --metric final_test_acc1

bench: setup
	$(BIN)/python scripts/bench_norms.py
	$(BIN)/python scripts/bench_loop.py

clean:
	rm -rf outputs multirun .pytest_cache
