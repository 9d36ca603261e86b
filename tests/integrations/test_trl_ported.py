"""TRL's own unit tests of the token-level functions that apply_to_trl patches, restated and run against
the patched functions (so hcrlhf computes wherever the integration serves the call).

Ported from github.com/huggingface/trl at commit f2cd57710ae345ea6428ae95363267fcf38a3dc8
(tests/test_utils.py: TestSelectiveLogSoftmax, TestEntropyFromLogits; the newest snapshot available
here, whose tests of these two functions are unchanged in substance in the 1.16.0 release the
integration supports). TRL's chunked log-prob kernel has no CPU unit tests there.
"""

from __future__ import annotations

import pytest
import torch

trl = pytest.importorskip("trl", reason="TRL is not installed: pip install 'hcrlhf[integrations]'")

from hcrlhf.integrations import SUPPORTED_TRL_VERSIONS, apply_to_trl, call_counts, reset_call_counts, revert_trl  # noqa: E402
from hcrlhf.integrations.trl import _supported_version  # noqa: E402

if not _supported_version(trl.__version__):
    pytest.skip(f"TRL {trl.__version__} installed; these tests cover TRL {', '.join(SUPPORTED_TRL_VERSIONS)}",
                allow_module_level=True)

import trl.trainer.utils as trl_utils  # noqa: E402

HALF = (torch.float16, torch.bfloat16)
# TRL's tests expect half-precision results bit for bit equal to torch's half-precision log_softmax
# (selective_log_softmax) or to its formula evaluated in half precision (entropy_from_logits). hcrlhf
# computes in float32 and rounds once, so it differs by up to an ulp (log-probs) or less than TRL's own
# half-precision error (entropy): the documented convention difference (docs/integrations.md, "TRL's
# own tests"). The assertions stay as TRL wrote them, expected to fail there (not strict: a case may
# agree by chance); test_half_precision_is_closer_to_float64 asserts what hcrlhf guarantees instead.
HALF_DIFFERS = pytest.mark.xfail(reason="hcrlhf rounds the float32 result once; TRL's expectation is "
                                        "torch's half-precision arithmetic (docs/integrations.md)", strict=False)
DTYPES = [torch.float64, torch.float32, pytest.param(torch.float16, marks=HALF_DIFFERS),
          pytest.param(torch.bfloat16, marks=HALF_DIFFERS)]


@pytest.fixture(autouse=True)
def _patched():
    revert_trl()
    reset_call_counts()
    apply_to_trl()
    yield
    revert_trl()


@pytest.mark.parametrize("dtype", DTYPES)
def test_ported_selective_log_softmax(dtype):
    torch.manual_seed(0)
    vocab_size, batch_size, seq_len = 1024, 4, 32
    input_ids = torch.randint(0, vocab_size, (batch_size, seq_len))
    logits = torch.randn(batch_size, seq_len, vocab_size, dtype=dtype)
    expected = logits.log_softmax(-1).gather(-1, input_ids[..., None]).squeeze(-1)
    actual = trl_utils.selective_log_softmax(logits, input_ids)
    if dtype in HALF:
        assert torch.equal(actual, expected)  # TRL: half precision is computed exactly (fp32, one rounding)
    else:
        torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)
    assert call_counts()["selective_log_softmax"] == {"hcrlhf": 1, "trl": 0}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("k", [1, 8])
def test_ported_selective_log_softmax_multi_index(dtype, k):
    """An index of shape (..., K): served by ops.token_logprobs's several-labels-per-row form."""
    torch.manual_seed(1)
    vocab_size, batch_size, seq_len = 1024, 4, 32
    index = torch.randint(0, vocab_size, (batch_size, seq_len, k))
    logits = torch.randn(batch_size, seq_len, vocab_size, dtype=dtype)
    expected = logits.log_softmax(-1).gather(-1, index)
    actual = trl_utils.selective_log_softmax(logits, index)
    assert actual.shape == (batch_size, seq_len, k)
    if dtype in HALF:
        assert torch.equal(actual, expected)
    else:
        torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)
    assert call_counts()["selective_log_softmax"] == {"hcrlhf": 1, "trl": 0}


@pytest.mark.parametrize("shape", [(768,), (32, 768), (8, 16, 768), (2, 4, 8, 768)])
@pytest.mark.parametrize("chunk_size", [1, 16])
@pytest.mark.parametrize("dtype", DTYPES)
def test_ported_entropy_from_logits(dtype, chunk_size, shape):
    torch.manual_seed(2)
    logits = torch.randn(*shape, dtype=dtype)
    if dtype in HALF:  # TRL's expectation in half precision: its own formula, evaluated in that dtype
        log_p = logits.log_softmax(-1)
        expected = -(log_p.exp() * log_p).sum(-1)
    else:
        p = logits.softmax(-1)
        expected = -(p * p.log()).sum(-1)
    actual = trl_utils.entropy_from_logits(logits, chunk_size=chunk_size)
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)
    assert call_counts()["entropy_from_logits"] == {"hcrlhf": 1, "trl": 0}


@pytest.mark.parametrize("dtype", HALF)
def test_half_precision_is_closer_to_float64(dtype):
    """What the integration guarantees where TRL's half-precision expectations differ: on the inputs of
    the two tests above, hcrlhf's log-probs and entropies are at least as close to the float64 answer
    as TRL's expectations (torch's half-precision log_softmax and TRL's formula in half precision)."""
    torch.manual_seed(0)
    input_ids = torch.randint(0, 1024, (4, 32))
    logits = torch.randn(4, 32, 1024, dtype=dtype)
    log_p64 = logits.double().log_softmax(-1)
    truth_logp = log_p64.gather(-1, input_ids[..., None]).squeeze(-1)
    truth_entropy = -(log_p64.exp() * log_p64).sum(-1)
    trl_logp = logits.log_softmax(-1).gather(-1, input_ids[..., None]).squeeze(-1)
    log_p = logits.log_softmax(-1)
    trl_entropy = -(log_p.exp() * log_p).sum(-1)
    ours_logp = trl_utils.selective_log_softmax(logits, input_ids)
    ours_entropy = trl_utils.entropy_from_logits(logits)
    assert ours_logp.dtype == ours_entropy.dtype == dtype
    for ours, theirs, truth in ((ours_logp, trl_logp, truth_logp), (ours_entropy, trl_entropy, truth_entropy)):
        assert (ours.double() - truth).abs().max() <= (theirs.double() - truth).abs().max()
        # within one ulp of the float64 answer, rounded to the dtype
        ulp = torch.finfo(dtype).eps * truth.abs().clamp(min=1)
        assert ((ours.double() - truth).abs() <= ulp).all()
