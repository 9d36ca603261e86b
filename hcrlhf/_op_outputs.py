"""Output allocation for every op impl (torch, C++, Triton), in one place so tests can poison it.

A leaf module: it imports only torch (no Triton, nothing from ``hcrlhf.ops`` or
``hcrlhf.kernels``), so both the ops and the Triton launchers can import it without a cycle.

Tests set ``POISON`` to NaN: then every output starts as NaN and an element a kernel forgot to
write is caught instead of passing by luck of uninitialised memory.
"""

from __future__ import annotations

import torch

POISON: float | None = None


def new_outputs(count: int, shape, dtype: torch.dtype, device) -> list[torch.Tensor]:
    """``count`` uninitialised tensors of ``shape`` and ``dtype`` on ``device`` (filled with POISON when set)."""
    outputs = [torch.empty(shape, dtype=dtype, device=device) for _ in range(count)]
    if POISON is not None:
        for out in outputs:
            out.fill_(POISON)
    return outputs
