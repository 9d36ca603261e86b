"""The private C++ entry points check their layout arguments themselves (docs/ops.md#token_logprobs).

``hcrlhf._C.token_logprobs_forward`` / ``_backward`` take a buffer plus (rows, inner, stride_outer,
stride_inner, vocab) and labels. The public op always passes a consistent layout, but the entry
points must not trust it: a bad layout or label raises ValueError / IndexError before anything is
read. Each call runs in a subprocess, so an out-of-bounds read that crashes fails the test instead of
killing pytest.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from numerics import require_impl

from hcrlhf import ops

# A prelude run in the subprocess: a contiguous (4, 10) float32 buffer and a valid call of each entry
# point; CASE (substituted below) changes some arguments, and the outcome is printed as JSON.
PRELUDE = """
import json
import numpy as np
from hcrlhf import _C

rows, V = 4, 10
logits = np.random.default_rng(0).standard_normal((rows, V)).astype(np.float32)
fwd = dict(logits=logits, kind=0, rows=rows, inner=rows, stride_outer=0, stride_inner=V, vocab=V,
           labels=np.arange(rows, dtype=np.int64), inv_temp=1.0, ignore_index=-100,
           logp=np.empty(rows, np.float32), stats=np.empty((rows, 2), np.float32), entropy=None)
bwd = dict(logits=logits, kind=0, rows=rows, inner=rows, stride_outer=0, stride_inner=V, vocab=V,
           labels=np.arange(rows, dtype=np.int64), stats=np.zeros((rows, 2), np.float32), entropy=None,
           grad_logp=np.ones(rows, np.float32), grad_entropy=None, inv_temp=1.0, ignore_index=-100,
           grad=np.empty((rows, V), np.float32), grad_stride_outer=0, grad_stride_inner=V)
"""

RUN = """
try:
    getattr(_C, ENTRY)(**ARGS)
    print(json.dumps({"outcome": "returned"}))
except Exception as exc:
    print(json.dumps({"outcome": type(exc).__name__, "message": str(exc)}))
"""

BAD = {
    # name: (entry point, changes to its arguments as Python source, expected exception)
    "huge_stride": ("token_logprobs_forward", "stride_inner=1 << 40", "IndexError"),
    "huge_outer_stride": ("token_logprobs_forward", "inner=2, stride_outer=1 << 40", "IndexError"),
    "overflowing_stride": ("token_logprobs_forward", "stride_inner=(1 << 62) + 1", "IndexError"),
    "too_many_rows": ("token_logprobs_forward",
                      "rows=5, inner=5, labels=np.zeros(5, np.int64), logp=np.empty(5, np.float32), "
                      "stats=np.empty((5, 2), np.float32)", "IndexError"),
    "row_past_the_end": ("token_logprobs_forward", "stride_inner=11", "IndexError"),
    "vocab_past_the_end": ("token_logprobs_forward", "vocab=11", "IndexError"),
    "negative_stride": ("token_logprobs_forward", "stride_inner=-10", "ValueError"),
    "zero_inner": ("token_logprobs_forward", "inner=0", "ValueError"),
    "empty_buffer": ("token_logprobs_forward", "logits=np.empty((0, 10), np.float32)", "IndexError"),
    "label_past_vocab": ("token_logprobs_forward", "labels=np.array([0, 1, 10, 3], np.int64)", "IndexError"),
    "negative_label": ("token_logprobs_forward", "labels=np.array([0, -5, 2, 3], np.int64)", "IndexError"),
    "float_labels": ("token_logprobs_forward", "labels=np.zeros(4, np.float64)", "ValueError"),
    "bf16_rows_past_the_end": ("token_logprobs_forward",
                               "logits=logits.view(np.int16)[:, :10], kind=1, stride_inner=21", "IndexError"),
    "bwd_huge_stride": ("token_logprobs_backward", "stride_inner=1 << 40", "IndexError"),
    "bwd_label_past_vocab": ("token_logprobs_backward", "labels=np.array([0, 1, 2, 99], np.int64)", "IndexError"),
    "bwd_grad_too_small": ("token_logprobs_backward", "grad=np.empty((3, 10), np.float32)", "IndexError"),
    "bwd_grad_huge_stride": ("token_logprobs_backward", "grad_stride_inner=1 << 40", "IndexError"),
    "bwd_negative_grad_stride": ("token_logprobs_backward", "grad_stride_outer=-1, inner=2", "ValueError"),
}


def run_case(entry: str, changes: str) -> dict:
    program = PRELUDE + textwrap.dedent(f"""
        ENTRY = {entry!r}
        ARGS = dict({"fwd" if entry.endswith("forward") else "bwd"}, {changes})
    """) + RUN
    result = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, (
        f"{entry}({changes}) crashed the interpreter (exit status {result.returncode}: an out-of-bounds "
        f"access?)\n{result.stderr[-2000:]}"
    )
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("name", sorted(BAD))
def test_bad_layouts_raise_instead_of_reading_out_of_bounds(name):
    require_impl("cpp")
    entry, changes, expected = BAD[name]
    outcome = run_case(entry, changes)
    assert outcome["outcome"] == expected, f"{entry}({changes}): {outcome}, expected {expected}"
    assert "token_logprobs" in outcome["message"] or "labels" in outcome["message"], outcome["message"]


@pytest.mark.parametrize("changes", [
    "",  # the prelude's call: 4 rows filling the buffer exactly
    "rows=2, inner=2, stride_inner=20, labels=np.arange(2), logp=np.empty(2, np.float32), "
    "stats=np.empty((2, 2), np.float32)",  # every other row: the last one ends at the buffer's end
    "rows=4, inner=2, stride_outer=20, stride_inner=10",  # two independent strides
    "logits=logits[:, :7], vocab=7, labels=np.arange(4)",  # a view whose rows are padded
    "labels=np.array([0, -100, 2, -100])",  # the ignore index is not range-checked
])
def test_valid_layouts_still_run(changes):
    require_impl("cpp")
    assert run_case("token_logprobs_forward", changes) == {"outcome": "returned"}


def test_public_op_layouts_pass_the_checks():
    """The layouts ops.token_logprobs derives (views, transposes, inplace backward) all pass."""
    require_impl("cpp")
    base = torch.randn(3, 6, 301)
    labels = torch.randint(0, 301, (3, 6))
    for logits, y in ((base[:, :-1], labels[:, 1:]), (base.transpose(0, 1), labels.T), (base[1], labels[1])):
        x = (logits * 1.0).requires_grad_(False).clone().requires_grad_()
        lp = ops.token_logprobs(x * 1.0, y, return_entropy=True, impl="cpp", inplace_backward=True)
        (lp[0].sum() + lp[1].sum()).backward()
        assert torch.isfinite(x.grad).all()
