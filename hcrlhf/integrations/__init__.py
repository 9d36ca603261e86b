"""Integrations of hcrlhf's kernels into other RLHF libraries (docs/integrations.md).

``from hcrlhf.integrations import apply_to_trl; apply_to_trl()`` routes TRL's log-prob path through
``hcrlhf.ops`` (:mod:`hcrlhf.integrations.trl`); ``apply_to_verl()`` (:mod:`hcrlhf.integrations.verl`)
and ``apply_to_openrlhf()`` (:mod:`hcrlhf.integrations.openrlhf`) do the same for verl's and OpenRLHF's
log-prob, entropy, KL and advantage functions. Importing this package imports none of the peers: they
are optional dependencies, loaded by the ``apply_to_*`` calls. ``call_counts``, ``is_applied`` and
``reset_call_counts`` here are TRL's; each peer's module has its own.
"""

from hcrlhf.integrations.openrlhf import (
    SUPPORTED_OPENRLHF_VERSIONS,
    UnsupportedOpenRLHFVersionError,
    apply_to_openrlhf,
    load_openrlhf_module,
    openrlhf_patched,
    revert_openrlhf,
)
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
from hcrlhf.integrations.verl import (
    SUPPORTED_VERL_VERSIONS,
    UnsupportedVerlVersionError,
    apply_to_verl,
    revert_verl,
    verl_patched,
)

__all__ = [
    "SUPPORTED_OPENRLHF_VERSIONS",
    "SUPPORTED_TRL_VERSIONS",
    "SUPPORTED_VERL_VERSIONS",
    "UnsupportedOpenRLHFVersionError",
    "UnsupportedTRLVersionError",
    "UnsupportedVerlVersionError",
    "apply_to_openrlhf",
    "apply_to_trl",
    "apply_to_verl",
    "call_counts",
    "is_applied",
    "load_openrlhf_module",
    "openrlhf_patched",
    "reset_call_counts",
    "revert_openrlhf",
    "revert_trl",
    "revert_verl",
    "trl_patched",
    "verl_patched",
]
