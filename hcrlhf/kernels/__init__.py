"""Triton kernels of hcrlhf, installed as ``hcrlhf.kernels``.

Import these modules only through :mod:`hcrlhf.ops`, which checks inputs and picks the impl.
Each module holds ``@triton.jit`` kernels plus a thin launcher. On a CPU they run only under the
Triton interpreter (``TRITON_INTERPRET=1``, set before triton is imported).
"""
