"""Output allocation for every impl, in one place so tests can poison it.

Tests set ``POISON`` to NaN: then every output starts as NaN and an element a kernel forgot to
write is caught instead of passing by luck of uninitialised memory.
"""

from __future__ import annotations

import torch

POISON: float | None = None


def new_outputs(count: int, shape, dtype: torch.dtype, device) -> list[torch.Tensor]:
    outputs = [torch.empty(shape, dtype=dtype, device=device) for _ in range(count)]
    if POISON is not None:
        for out in outputs:
            out.fill_(POISON)
    return outputs
