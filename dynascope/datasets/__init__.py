"""Small datasets bundled with dynascope (no download needed)."""

from __future__ import annotations

import gzip
from importlib import resources

import numpy as np
import torch

__all__ = ["load_digits"]


def load_digits() -> tuple[torch.Tensor, torch.Tensor]:
    """The UCI optical-recognition digits (as in scikit-learn's ``load_digits``):
    1797 images of 8x8 pixels with values 0..16, flattened to 64 columns.

    Returns ``(X, y)``: ``X`` float32 of shape (1797, 64) scaled to [0, 1]
    (divided by 16), ``y`` int64 labels 0..9. Rows are in file order.
    """
    ref = resources.files("dynascope.datasets") / "digits.csv.gz"
    with ref.open("rb") as raw, gzip.open(raw, "rt") as f:
        data = np.loadtxt(f, delimiter=",", dtype=np.float32)
    if data.ndim != 2 or data.shape[1] != 65:
        raise ValueError(f"bundled digits.csv.gz has shape {data.shape}, expected (1797, 65)")
    x = torch.from_numpy(data[:, :64] / 16.0).contiguous()
    y = torch.from_numpy(data[:, 64].astype(np.int64))
    return x, y
