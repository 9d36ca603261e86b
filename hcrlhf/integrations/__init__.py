"""Integrations of hcrlhf's kernels into other RLHF libraries (docs/integrations.md).

``from hcrlhf.integrations import apply_to_trl; apply_to_trl()`` routes TRL's log-prob path through
``hcrlhf.ops`` (:mod:`hcrlhf.integrations.trl`). Importing this package does not import TRL: it is an
optional dependency (``pip install 'hcrlhf[integrations]'``), loaded by ``apply_to_trl``.
"""

from hcrlhf.integrations.trl import (
    SUPPORTED_TRL_VERSIONS,
    UnsupportedTRLVersionError,
    apply_to_trl,
    call_counts,
    is_applied,
    reset_call_counts,
    revert_trl,
    trl_patched,
)

__all__ = [
    "SUPPORTED_TRL_VERSIONS",
    "UnsupportedTRLVersionError",
    "apply_to_trl",
    "call_counts",
    "is_applied",
    "reset_call_counts",
    "revert_trl",
    "trl_patched",
]
