#!/usr/bin/env bash
# The GPU check: on a machine with one CUDA GPU, run every GPU path of this project once, in under
# 8 minutes, and write a short report (report.txt, report.json, logs.txt) to OUT:
#   tiny real `mbn-train trainer=gpu` runs (bf16-mixed) of BN and MBN, `trainer.compile=true`, a
#   stacked `-m ... stack=4` sweep, scripts/bench_norms.py and scripts/bench_stack.py with
#   --device cuda, peak GPU memory, and every failing step with the first line of its failure.
# A failing step does not stop the check; the exit code is 1 when any step failed.
#
#   scripts/gpu_check.sh OUT                 # on the GPU machine
#   scripts/gpu_check.sh --dry-run OUT       # anywhere: every command composes (dry_run=true; tiny CPU benchmarks)
#   scripts/gpu_check.sh --help              # options (--work, --budget, --only, --data-root)
#
# Python: $PYTHON when set (an interpreter with torch and this package's training extra, e.g.
# PYTHON=python3 with PYTHONPATH holding what it lacks); else the checkout's .venv, built with
# `make setup` (needs network access) when it is not there yet. The steps and the report:
# scripts/gpu_check.py.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
if [ -z "${PYTHON:-}" ]; then
    if [ ! -e "$ROOT/.venv/.mbn-installed" ]; then
        echo "gpu_check: no .venv yet: building it with make setup (or set PYTHON to an interpreter that has mbn's dependencies)" >&2
        make -C "$ROOT" setup
    fi
    PYTHON="$ROOT/.venv/bin/python"
fi
if ! command -v "$PYTHON" >/dev/null; then
    echo "gpu_check: no Python at PYTHON=$PYTHON" >&2
    exit 2
fi
exec "$PYTHON" "$ROOT/scripts/gpu_check.py" "$@"
