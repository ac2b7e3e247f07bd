"""The layers and backbones import only torch: none of the framework's Lightning/Hydra stack."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
FRAMEWORK_MODULES = ("lightning", "pytorch_lightning", "hydra", "omegaconf", "wandb", "tensorboard", "pandas", "torchvision")


def test_importing_the_layers_and_backbones_pulls_in_no_framework_module():
    code = (
        "import json, sys\n"
        "from mbn.nn import MomentumBatchNorm2d, norm_layer\n"
        "from mbn.models import build_model\n"
        "import torch\n"
        "model = build_model('resnet18', num_classes=3, norm_layer=norm_layer('mbn'), width=4)\n"
        "assert model(torch.randn(2, 3, 8, 8)).shape == (2, 3)\n"
        "print(json.dumps(sorted({name.partition('.')[0] for name in sys.modules})))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT,
                          env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr
    loaded = set(json.loads(proc.stdout.strip().splitlines()[-1]))
    assert "torch" in loaded and "mbn" in loaded
    assert not loaded & set(FRAMEWORK_MODULES)
