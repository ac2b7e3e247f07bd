#!/usr/bin/env bash
# The layers alone, in a fresh virtualenv that holds only torch (at the tested version, from
# constraints.txt) and this package installed with --no-deps: `from mbn.nn import MomentumBatchNorm2d`
# works, importing mbn.nn / mbn.models loads neither Lightning nor Hydra, the package's own
# dependencies are torch only, and mbn-train names the extra it lacks (exit code 2).
# Run by .ci/run after `make test`; torch's wheel comes from pip's cache after the first time.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
started=$(date +%s)

"$PYTHON" -m venv "$WORK/venv"
pip=("$WORK/venv/bin/pip" --disable-pip-version-check --quiet)
"${pip[@]}" install -c constraints.txt torch
# Build from a copy: an in-tree build would leave build/ in the checkout.
mkdir "$WORK/src"
cp -r pyproject.toml README.md mbn configs "$WORK/src/"
"${pip[@]}" install --no-deps "$WORK/src"

cd "$WORK"  # import the installed package, not the source tree
"$WORK/venv/bin/python" - <<'PY'
import importlib.metadata
import sys

import torch
from mbn.models import build_model
from mbn.nn import MomentumBatchNorm2d, norm_layer

layer = MomentumBatchNorm2d(4)
assert layer(torch.randn(2, 4, 3, 3)).shape == (2, 4, 3, 3)
model = build_model("resnet18", num_classes=3, norm_layer=norm_layer("mbn"), width=4)
assert model(torch.randn(2, 3, 8, 8)).shape == (2, 3)
framework = {"lightning", "pytorch_lightning", "hydra", "omegaconf"} & {name.partition(".")[0] for name in sys.modules}
assert not framework, f"mbn.nn / mbn.models imported {sorted(framework)}"
base = [r for r in importlib.metadata.requires("mbn") if "extra ==" not in r]
assert [r.split(">")[0].split("=")[0].strip() for r in base] == ["torch"], base
print(f"layers only: mbn {importlib.metadata.version('mbn')} with torch {torch.__version__}: ok")
PY

set +e
message=$("$WORK/venv/bin/mbn-train" 2>&1)
code=$?
set -e
if [ "$code" -ne 2 ] || ! grep -q "install the framework with: pip install 'mbn\[train\]'" <<<"$message"; then
    echo "mbn-train without its extra: expected exit 2 and the install hint, got $code: $message" >&2
    exit 1
fi
echo "$message"
echo "layers-only install check passed in $(( $(date +%s) - started )) s"
