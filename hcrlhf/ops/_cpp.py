"""Handing CPU tensors to the C++ extension as numpy views (zero-copy where dtypes allow)."""

from __future__ import annotations

import numpy as np
import torch


def as_numpy(x: torch.Tensor, dtype: torch.dtype) -> np.ndarray:
    """A numpy view of `x` in `dtype` with x's strides; copies only when the dtype differs."""
    return x.detach().to(dtype).numpy()


def mask_as_numpy(mask: torch.Tensor) -> np.ndarray:
    """A bool numpy view of the mask; non-bool masks (0/1 numbers) become bool in one pass."""
    mask = mask.detach()
    return (mask if mask.dtype == torch.bool else mask != 0).numpy()

