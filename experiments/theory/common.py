"""Output helpers shared by the theory studies: the output dir, CSV/JSON writers and figure saving."""

from __future__ import annotations

import argparse
import io
import os
from pathlib import Path
from typing import Any, Sequence

import matplotlib

matplotlib.use("Agg")  # headless: the studies run in terminals and CI
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from mbn.utils.io import atomic_write, atomic_write_json  # noqa: E402

DEFAULT_OUT_ROOT = Path("outputs/experiments/theory")


def base_parser(description: str, default_out: str, default_seed: int = 0) -> argparse.ArgumentParser:
    """Parser with the options every theory study shares: ``--out``, ``--seed``, ``--quick``.

    Args:
        description: what the study checks (shown by ``--help``).
        default_out: name of the default output sub-dir under ``outputs/experiments/theory``.
        default_seed: default random seed.
    """
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT_ROOT / default_out,
                        help="output dir for the JSON/CSV numbers and PNG figures")
    parser.add_argument("--seed", type=int, default=default_seed, help="random seed")
    parser.add_argument("--quick", action="store_true",
                        help="small sample counts (seconds; what the tests run)")
    return parser


def positive_int(value: str) -> int:
    """``argparse`` type for a count that must be >= 1."""
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value!r}")
    return number


def write_csv(path: str | os.PathLike, rows: Sequence[dict[str, Any]]) -> Path:
    """Write ``rows`` (one dict per line, same keys) as a CSV file atomically."""
    buffer = io.StringIO()
    pd.DataFrame(list(rows)).to_csv(buffer, index=False, float_format="%.6g")
    payload = buffer.getvalue().encode()
    return atomic_write(path, lambda f: f.write(payload))


def write_json(path: str | os.PathLike, data: Any) -> Path:
    """Write ``data`` as JSON atomically (see :func:`mbn.utils.io.atomic_write_json`)."""
    return atomic_write_json(path, data)


def save_figure(fig: plt.Figure, path: str | os.PathLike, dpi: int = 90) -> Path:
    """Save ``fig`` as a small PNG and close it.

    The published copies are committed, so the image is reduced to a 256-colour palette (line plots
    lose nothing visible; the file shrinks about 3x).
    """
    from PIL import Image

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi, bbox_inches="tight", facecolor="white")
    plt.close(fig)
    buffer.seek(0)
    with Image.open(buffer) as image:
        paletted = image.convert("RGB").quantize(colors=256, method=Image.Quantize.MEDIANCUT)
    out = io.BytesIO()
    paletted.save(out, format="PNG", optimize=True)
    payload = out.getvalue()
    return atomic_write(path, lambda f: f.write(payload))
