"""Public fused ops of hcrlhf: ``from hcrlhf import ops``.

Every op takes ``impl="auto" | "triton" | "cpp" | "torch"`` (see :mod:`hcrlhf.ops._dispatch`).
The kernel entry points are ``torch.library`` custom ops (``torch.ops.hcrlhf.*``), so the ops run
inside ``torch.compile(fullgraph=True)`` (docs/ops.md#torchcompile).
"""

from hcrlhf.ops._dispatch import IMPLS, ImplUnavailableError, cpp_available, triton_available
from hcrlhf.ops.gae import gae
from hcrlhf.ops.group_advantages import GroupAdvantages, group_advantages
from hcrlhf.ops.kl_penalty import kl_penalty
from hcrlhf.ops.linear_logprobs import linear_logprobs
from hcrlhf.ops.rloo_advantages import RLOOAdvantages, rloo_advantages
from hcrlhf.ops.safe_advantages import SafeAdvantages, safe_advantages
from hcrlhf.ops.token_logprobs import token_logprobs

__all__ = [
    "IMPLS",
    "GroupAdvantages",
    "ImplUnavailableError",
    "RLOOAdvantages",
    "SafeAdvantages",
    "cpp_available",
    "gae",
    "group_advantages",
    "kl_penalty",
    "linear_logprobs",
    "rloo_advantages",
    "safe_advantages",
    "token_logprobs",
    "triton_available",
]
