"""hcrlhf: High-Confidence Safe RLHF with fused kernels.

Kernel users: ``from hcrlhf import ops``. See README.md for the method and the commands.
"""

from hcrlhf._version import __version__

__all__ = ["__version__"]
