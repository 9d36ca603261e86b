"""Pure-torch executable specifications of every op (docs/ops.md).

Plain, loop-friendly and float64-capable. They define correctness: kernels are compared with
them and they are never edited to agree with a kernel.
"""

from hcrlhf.reference.gae import gae
from hcrlhf.reference.group_advantages import group_advantages
from hcrlhf.reference.linear_logprobs import linear_logprobs
from hcrlhf.reference.rloo_advantages import rloo_advantages
from hcrlhf.reference.safe_advantages import kl_penalty, last_valid_index, masked_whiten, safe_advantages
from hcrlhf.reference.token_logprobs import token_logprobs

__all__ = ["gae", "kl_penalty", "last_valid_index", "masked_whiten", "rloo_advantages", "safe_advantages"]
__all__ += ["group_advantages", "linear_logprobs", "token_logprobs"]
