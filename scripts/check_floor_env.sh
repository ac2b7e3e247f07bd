#!/usr/bin/env bash
# The floor: a fresh virtualenv with the lowest versions pyproject.toml's ranges allow
# (constraints-floor.txt, written by scripts/resolve_floor_constraints.py: torch 2.3, Lightning 2.6.0,
# Hydra 1.3.2, ...) and this package. There it runs the layers' and models' tests, one tiny mbn-train
# run (W&B offline and TensorBoard on), one tiny sweep and mbn-compare on it, and checks that
# trainer.compile=true, which needs a newer torch, is refused in one line with exit code 2. Run by .ci/run after `make test`,
# which tests the ceiling (constraints.txt). torch's CUDA wheels make the install the slow part.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
started=$(date +%s)

"$PYTHON" -m venv "$WORK/venv"
bin=$WORK/venv/bin
# Editable, as `make setup` installs it: mbn-train reads the checkout's configs/.
"$bin/pip" install --disable-pip-version-check --quiet -c constraints-floor.txt -e '.[all,dev]'
"$bin/pip" check
installed=$(date +%s)
"$bin/python" -c "import torch, torchvision, pytorch_lightning, hydra; print('floor:', *(f'{m.__name__} {m.__version__}' for m in (torch, torchvision, pytorch_lightning, hydra)))"

export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 WANDB_MODE=offline WANDB_SILENT=true WANDB_DIR=$WORK
"$bin/python" -m pytest -q -p no:cacheprovider -n 2 tests/nn tests/models
tested=$(date +%s)

tiny=(data=fake data.source.num_train=64 data.source.num_test=32 data.source.image_size=8 data.batch_size=8
      data.eval_batch_size=32 model.width=4 trainer.num_threads=1 "output_root=$WORK/outputs")
"$bin/mbn-train" "${tiny[@]}" norm=mbn epochs=2 "logger=[csv,wandb,tensorboard]"
"$bin/mbn-train" -m "${tiny[@]}" epochs=1 "logger=[csv]" norm=bn,mbn sweep_name=floor
"$bin/mbn-compare" "$WORK/outputs/sweeps/floor" --out "$WORK/compare" --baseline bn --metric final_test_acc1

set +e
message=$("$bin/mbn-train" "${tiny[@]}" trainer.compile=true 2>&1)
code=$?
set -e
if [ "$code" -ne 2 ] || [ "$(wc -l <<<"$message")" -ne 1 ] || ! grep -q "trainer.compile: needs torch >=" <<<"$message"; then
    echo "trainer.compile=true on the floor's torch: expected one line and exit 2, got $code: $message" >&2
    exit 1
fi
echo "$message"
echo "floor env check passed in $(( $(date +%s) - started )) s (install $(( installed - started )) s, tests $(( tested - installed )) s)"
