"""Public fused ops of hcrlhf: ``from hcrlhf import ops``.

Every op takes ``impl="auto" | "triton" | "cpp" | "torch"`` (see :mod:`hcrlhf.ops._dispatch`).
"""

from hcrlhf.ops._dispatch import IMPLS, ImplUnavailableError, cpp_available, triton_available
from hcrlhf.ops.gae import gae
from hcrlhf.ops.rloo_advantages import RLOOAdvantages, rloo_advantages
from hcrlhf.ops.safe_advantages import SafeAdvantages, safe_advantages

__all__ = [
    "IMPLS",
    "ImplUnavailableError",
    "RLOOAdvantages",
    "SafeAdvantages",
    "cpp_available",
    "gae",
    "rloo_advantages",
    "safe_advantages",
    "triton_available",
]
