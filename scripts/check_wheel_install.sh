#!/usr/bin/env bash
# What a new user gets from the built wheel, away from the checkout: build the wheel, install it with
# its extras (at the tested versions, constraints.txt) into a fresh virtualenv, and from an empty
# directory run what the README promises: every experiment config as a dry run (single and -m), one
# tiny real run, a stacked sweep, mbn-compare --baseline bn on it, a user-config experiment
# (--config-dir), and bad keys/values that each give one line and exit 2.
# Run by .ci/run after `make test`; torch's wheel comes from pip's cache after the first time.
set -euo pipefail
cd "$(dirname "$0")/.."
CHECKOUT=$PWD
PYTHON=${PYTHON:-python3}
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
started=$(date +%s)

# Build from a copy, as `pip install .` would; the checkout's .venv has hatchling (the [dev] extra).
mkdir "$WORK/src"
cp -r pyproject.toml README.md mbn configs "$WORK/src/"
if [ -x .venv/bin/python ] && .venv/bin/python -c "import hatchling" 2>/dev/null; then
    .venv/bin/python -m pip wheel --quiet --no-deps --no-build-isolation -w "$WORK/dist" "$WORK/src"
else
    "$PYTHON" -m pip wheel --quiet --no-deps -w "$WORK/dist" "$WORK/src"
fi
wheel=$(ls "$WORK"/dist/mbn-*.whl)

"$PYTHON" -m venv "$WORK/venv"
pip=("$WORK/venv/bin/pip" --disable-pip-version-check --quiet)
"${pip[@]}" install -c constraints.txt torch torchvision
"${pip[@]}" install -c constraints.txt "mbn[all] @ file://$wheel"
bin="$WORK/venv/bin"
echo "wheel installed in $(( $(date +%s) - started )) s"

mkdir "$WORK/empty"
cd "$WORK/empty"  # nothing of the checkout on the path: the installed package only
export WANDB_MODE=offline WANDB_SILENT=true MBN_OUTPUT_ROOT="$WORK/empty/outputs" MBN_CACHE_DIR="$WORK/cache"
unset PYTHONPATH
configs=$("$bin/python" -c "import mbn.cli.config as c, sys; assert 'site-packages' in str(c.CONFIG_DIR), c.CONFIG_DIR; print(c.CONFIG_DIR)")
echo "configs: $configs"

fail() { echo "wheel check failed: $*" >&2; exit 1; }
tiny=(data=fake data.source.num_train=64 data.source.num_test=32 data.source.image_size=8 data.batch_size=8
      model.width=4 epochs=1 trainer.num_threads=1 'logger=[csv]')

# Every experiment config composes and plans, as a single run and as a sweep (stand-in data paths).
touch "$WORK/cifar10-jpeg.tar.gz"
for path in "$configs"/experiment/*.yaml; do
    experiment=$(basename "$path" .yaml)
    stand_ins=("paths.data_root=$WORK" "data.source.root=$WORK")
    grep -q "override /data: \(cifar100\|imagenet\|imagefolder\)" "$path" || stand_ins=("paths.data_root=$WORK")
    "$bin/mbn-train" "experiment=$experiment" "${stand_ins[@]}" dry_run=true | grep -q "would start" \
        || fail "experiment=$experiment as a single dry run"
    "$bin/mbn-train" -m "experiment=$experiment" "${stand_ins[@]}" dry_run=true | grep -q "nothing was run" \
        || fail "experiment=$experiment as a sweep dry run"
done
echo "every experiment config composes (single run and -m)"

# One tiny real run.
# (Its own output root: the sweep below would find this run of the same config and skip that job.)
"$bin/mbn-train" "${tiny[@]}" norm=mbn output_root=single | tee "$WORK/run.log" | grep -q "^mbn-train: completed" \
    || { cat "$WORK/run.log"; fail "tiny run"; }

# A stacked sweep, then its comparison to BN.
"$bin/mbn-train" -m "${tiny[@]}" norm=bn,mbn seed=0,1 stack=2 sweep_name=wheel >"$WORK/sweep.log" \
    || { cat "$WORK/sweep.log"; fail "stacked sweep"; }
grep -q "sweep done: 4 completed" "$WORK/sweep.log" || { cat "$WORK/sweep.log"; fail "stacked sweep summary"; }
"$bin/mbn-compare" outputs/sweeps/wheel --baseline bn --interval ci95 >"$WORK/compare.log" \
    || { cat "$WORK/compare.log"; fail "mbn-compare"; }
grep -q "difference to bn" "$WORK/compare.log" || { cat "$WORK/compare.log"; fail "mbn-compare difference table"; }

# The README's user-config example: an experiment of one's own on the shipped groups.
mkdir -p my_configs/experiment
cat >my_configs/experiment/my_exp.yaml <<'YAML'
# @package _global_
defaults:
  - override /data: fake
  - override /norm: mbn
sweep_name: my_exp
epochs: 1
model: {width: 4}
data: {batch_size: 8, source: {num_train: 64, num_test: 32, image_size: 8}}
YAML
"$bin/mbn-train" --config-dir my_configs experiment=my_exp 'logger=[csv]' | grep -q "^mbn-train: completed" \
    || fail "user-config experiment"

# Every bad key or value: one line, exit 2 (single run and sweep).
for bad in "+trainer.sync_batchnorm=true" "+foo=1" "data.batchsize=2" "data.batch_size=0" "norm=foo"; do
    for mode in single multirun; do
        args=("${tiny[@]}" "$bad")
        [ "$mode" = multirun ] && args=(-m "${args[@]}" seed=0,1)
        set +e
        message=$("$bin/mbn-train" "${args[@]}" 2>&1)
        code=$?
        set -e
        [ "$code" -eq 2 ] && [ "$(wc -l <<<"$message")" -eq 1 ] && grep -q "^mbn-train: invalid config: " <<<"$message" \
            || fail "$bad ($mode): expected one line and exit 2, got $code: $message"
    done
done
echo "bad keys and values: one line, exit 2"
echo "wheel install check passed in $(( $(date +%s) - started )) s"
