"""hcrlhf.integrations.apply_to_trl: every patched TRL function gives TRL's answer (values, gradients,
dtypes, masking), the patch reverts cleanly, unsupported TRL versions are refused, and a TRL RLOOTrainer
run is the same patched and unpatched (docs/integrations.md).

Accuracy rule (docs/ops.md#how-the-kernels-are-tested), with TRL's own function as the low-precision
baseline: max |hcrlhf − truth| ≤ 2 · max |TRL − truth| + atol, errors measured against float64 on the very
same input values.
"""

from __future__ import annotations

import contextlib
import inspect
import sys
import time
import types

import pytest
import torch

trl = pytest.importorskip("trl", reason="TRL is not installed: pip install 'hcrlhf[integrations]'")

from hcrlhf.integrations import (  # noqa: E402
    SUPPORTED_TRL_VERSIONS,
    UnsupportedTRLVersionError,
    apply_to_trl,
    call_counts,
    is_applied,
    reset_call_counts,
    revert_trl,
    trl_patched,
)
from hcrlhf.integrations.trl import _supported_version  # noqa: E402

if not _supported_version(trl.__version__):
    pytest.skip(f"TRL {trl.__version__} installed; these tests cover TRL {', '.join(SUPPORTED_TRL_VERSIONS)}",
                allow_module_level=True)

import trl.kernels  # noqa: E402
import trl.kernels.chunked_logprob as trl_chunked_logprob  # noqa: E402
import trl.trainer.utils as trl_utils  # noqa: E402

# TRL's originals, read before any test patches anything.
TRL_CHUNKED = trl_chunked_logprob.ChunkedLogProbFunction
TRL_SELECTIVE = trl_utils.selective_log_softmax
TRL_ENTROPY = trl_utils.entropy_from_logits
TRL_BOTH = trl_utils.selective_log_softmax_and_entropy
ORIGINALS = {"ChunkedLogProbFunction": TRL_CHUNKED, "selective_log_softmax": TRL_SELECTIVE,
             "entropy_from_logits": TRL_ENTROPY, "selective_log_softmax_and_entropy": TRL_BOTH}
ATOL = {  # (values, gradients), as for the ops themselves (docs/ops.md#how-the-kernels-are-tested)
    "token": {torch.float32: (2e-5, 1e-6), torch.bfloat16: (2e-5, 1e-5), torch.float64: (1e-10, 1e-12)},
    "linear": {torch.float32: (2e-5, 2e-6), torch.bfloat16: (2e-5, 1e-4)},
}


@pytest.fixture(autouse=True)
def _unpatched():
    """Every test starts and ends with TRL unpatched and the call counters at zero."""
    revert_trl()
    reset_call_counts()
    yield
    revert_trl()
    assert trl_utils.selective_log_softmax is TRL_SELECTIVE and trl.kernels.ChunkedLogProbFunction is TRL_CHUNKED


def assert_close(name, got, baseline, truth, atol):
    """The accuracy rule above, plus TRL's shape and dtype."""
    assert got.shape == baseline.shape, f"{name}: shape {tuple(got.shape)} != TRL's {tuple(baseline.shape)}"
    assert got.dtype == baseline.dtype, f"{name}: dtype {got.dtype} != TRL's {baseline.dtype}"
    assert torch.isfinite(got).all(), f"{name}: non-finite values"
    if not got.numel():
        return
    err = (got.double() - truth).abs().max().item()
    ref_err = (baseline.double() - truth).abs().max().item()
    assert err <= 2 * ref_err + atol, f"{name}: max error {err:.3e} > 2 * TRL's {ref_err:.3e} + {atol:.1e}"


def grads_of(outputs, upstream, inputs):
    """d(Σ upstream_i · output_i)/d inputs, in float64 for the comparison."""
    loss = sum((out.double() * g).sum() for out, g in zip(outputs, upstream) if out is not None)
    return [g.double() for g in torch.autograd.grad(loss, inputs)]


def random_case(shape, vocab, dtype, masked, generator):
    logits = (torch.randn(*shape, vocab, generator=generator, dtype=torch.float64) * 3).to(dtype)
    index = torch.randint(0, vocab, shape, generator=generator)
    row_mask = (torch.rand(shape, generator=generator) < 0.7) if masked else None
    return logits, index, row_mask


def truth_logp_entropy(logits, index, temperature, row_mask):
    """float64 log-probs and entropy of the (already rounded) logits; masked rows 0."""
    log_p = (logits.double() / temperature).log_softmax(-1)
    logp = log_p.gather(-1, index[..., None]).squeeze(-1)
    entropy = -(log_p.exp() * log_p).sum(-1)
    if row_mask is not None:
        logp, entropy = logp.masked_fill(~row_mask, 0.0), entropy.masked_fill(~row_mask, 0.0)
    return logp, entropy


def patched_function(name):
    apply_to_trl()
    return getattr(trl_utils, name)


# ------------------------------------------------------------------------------------ token-level functions
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("shape", [(3, 17), (5,)])
def test_selective_log_softmax_matches_trl(dtype, temperature, masked, shape):
    generator = torch.Generator().manual_seed(11)
    logits, index, row_mask = random_case(shape, 131, dtype, masked, generator)
    upstream = [torch.randn(shape, generator=generator, dtype=torch.float64)]
    ours_fn = patched_function("selective_log_softmax")
    assert ours_fn is not TRL_SELECTIVE

    x_trl, x_ours, x_64 = (x.clone().requires_grad_() for x in (logits, logits, logits.double()))
    theirs = TRL_SELECTIVE(x_trl, index, temperature, row_mask)
    ours = ours_fn(x_ours, index, temperature=temperature, row_mask=row_mask)
    truth, _ = truth_logp_entropy(x_64, index, temperature, row_mask)
    atol_value, atol_grad = ATOL["token"][dtype]
    assert_close("logp", ours, theirs, truth.detach(), atol_value)
    (g_ours,), (g_trl,), (g_64,) = (grads_of([o], upstream, [x]) for o, x in
                                    ((ours, x_ours), (theirs, x_trl), (truth, x_64)))
    assert_close("d logp/d logits", g_ours.to(dtype), g_trl.to(dtype), g_64, atol_grad)
    if masked:
        assert (ours[~row_mask] == 0).all() and (g_ours[~row_mask] == 0).all()
    assert call_counts()["selective_log_softmax"] == {"hcrlhf": 1, "trl": 0}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_entropy_from_logits_matches_trl(dtype):
    generator = torch.Generator().manual_seed(12)
    logits, _, _ = random_case((4, 9), 257, dtype, False, generator)
    upstream = [torch.randn(4, 9, generator=generator, dtype=torch.float64)]
    ours_fn = patched_function("entropy_from_logits")
    x_trl, x_ours, x_64 = (x.clone().requires_grad_() for x in (logits, logits, logits.double()))
    theirs, ours = TRL_ENTROPY(x_trl), ours_fn(x_ours, chunk_size=2)
    _, truth = truth_logp_entropy(x_64, torch.zeros(4, 9, dtype=torch.long), 1.0, None)
    atol_value, atol_grad = ATOL["token"][dtype]
    assert_close("entropy", ours, theirs, truth.detach(), atol_value)
    (g_ours,), (g_trl,), (g_64,) = (grads_of([o], upstream, [x]) for o, x in
                                    ((ours, x_ours), (theirs, x_trl), (truth, x_64)))
    assert_close("d entropy/d logits", g_ours.to(dtype), g_trl.to(dtype), g_64, atol_grad)
    assert call_counts()["entropy_from_logits"] == {"hcrlhf": 1, "trl": 0}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("temperature", [1.0, 1.3])
@pytest.mark.parametrize("entropy_requires_grad", [True, False])
def test_selective_log_softmax_and_entropy_matches_trl(dtype, temperature, entropy_requires_grad):
    generator = torch.Generator().manual_seed(13)
    logits, index, row_mask = random_case((3, 11), 97, dtype, True, generator)
    upstream = [torch.randn(3, 11, generator=generator, dtype=torch.float64) for _ in range(2)]
    ours_fn = patched_function("selective_log_softmax_and_entropy")
    x_trl, x_ours, x_64 = (x.clone().requires_grad_() for x in (logits, logits, logits.double()))
    theirs = TRL_BOTH(x_trl, index, entropy_requires_grad, temperature, row_mask)
    ours = ours_fn(x_ours, index, entropy_requires_grad=entropy_requires_grad, temperature=temperature,
                   row_mask=row_mask)
    truth = truth_logp_entropy(x_64, index, temperature, row_mask)
    if not entropy_requires_grad:
        truth = (truth[0], truth[1].detach())
    atol_value, atol_grad = ATOL["token"][dtype]
    for name, got, base, exact in zip(("logp", "entropy"), ours, theirs, truth):
        assert_close(name, got, base, exact.detach(), atol_value)
        assert got.requires_grad == base.requires_grad, name
        assert (got[~row_mask] == 0).all(), name
    live = [i for i in range(2) if theirs[i].requires_grad]
    pick = lambda outs: [outs[i] for i in live]
    g_ours, g_trl, g_64 = (grads_of(pick(o), pick(upstream), [x])[0] for o, x in
                           ((ours, x_ours), (theirs, x_trl), (truth, x_64)))
    assert_close("gradient", g_ours.to(dtype), g_trl.to(dtype), g_64, atol_grad)


def test_token_functions_hand_unsupported_calls_to_trl():
    generator = torch.Generator().manual_seed(14)
    logits, _, _ = random_case((2, 5), 31, torch.float32, False, generator)
    topk = torch.randint(0, 31, (2, 5, 3), generator=generator)
    ours_fn = patched_function("selective_log_softmax")
    tiny_temperature = ours_fn(logits, topk[..., 0], temperature=1e-5)  # below hcrlhf's 1e-4 floor
    torch.testing.assert_close(tiny_temperature, TRL_SELECTIVE(logits, topk[..., 0], 1e-5), rtol=0, atol=0)
    assert call_counts()["selective_log_softmax"] == {"hcrlhf": 0, "trl": 1}
    with pytest.raises(ValueError, match="temperature must be positive"):
        ours_fn(logits, topk[..., 0], temperature=0.0)
    both_fn = patched_function("selective_log_softmax_and_entropy")  # (..., K) index beside the entropy
    for got, want in zip(both_fn(logits, topk), TRL_BOTH(logits, topk), strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert call_counts()["selective_log_softmax_and_entropy"] == {"hcrlhf": 0, "trl": 1}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("masked", [False, True])
def test_selective_log_softmax_several_entries_per_row(dtype, masked):
    """An index of shape (..., K) (K entries per row, e.g. top-k tokens) and a row_mask of its shape: served by
    hcrlhf, equal to TRL's result and to float64 (values and gradient)."""
    generator = torch.Generator().manual_seed(15)
    logits64 = torch.randn(2, 5, 31, generator=generator, dtype=torch.float64) * 3
    topk = torch.randint(0, 31, (2, 5, 4), generator=generator)
    topk[0, 1, 2] = topk[0, 1, 0]  # a repeated entry: its gradient counts twice
    row_mask = (torch.rand(2, 5, 4, generator=generator) > 0.3).long() if masked else None
    upstream = torch.randn(2, 5, 4, generator=generator, dtype=torch.float64)
    ours_fn = patched_function("selective_log_softmax")
    outs, grads = [], []
    rounded = logits64.to(dtype)  # the float64 truth is of the logits as rounded to `dtype`
    for fn, x in ((ours_fn, rounded), (TRL_SELECTIVE, rounded), (TRL_SELECTIVE, rounded.double())):
        x = x.clone().requires_grad_()
        out = fn(x, topk, 0.7, row_mask)
        (out.double() * upstream).sum().backward()
        outs.append(out)
        grads.append(x.grad)
    ours, theirs, truth = outs
    assert call_counts()["selective_log_softmax"] == {"hcrlhf": 1, "trl": 0}
    assert ours.dtype == theirs.dtype == dtype and ours.shape == (2, 5, 4)
    if masked:
        assert bool((ours[row_mask == 0] == 0).all())
    if dtype == torch.float32:
        torch.testing.assert_close(ours.double(), truth, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(grads[0].double(), grads[2], rtol=1e-6, atol=1e-6)
    else:  # bf16 results are rounded once (half an ulp); the upstream gradient is rounded to bf16 at the output too
        torch.testing.assert_close(ours.double(), truth, rtol=2**-8, atol=1e-3)
        torch.testing.assert_close(grads[0].double(), grads[2], rtol=2**-6, atol=2e-2)
    if dtype == torch.bfloat16:  # hcrlhf rounds once from float32: at least as close to float64 as TRL's bf16 math
        assert (ours.double() - truth).abs().max() <= (theirs.double() - truth).abs().max()


# ------------------------------------------------------------------------------------ ChunkedLogProbFunction
def chunked_case(dtype, n_tokens, with_bias, generator):
    hidden = torch.randn(n_tokens, 24, generator=generator, dtype=torch.float64).to(dtype)
    weight = (torch.randn(101, 24, generator=generator, dtype=torch.float64) / 3).to(dtype)
    bias = (torch.randn(101, generator=generator, dtype=torch.float64) / 3).to(dtype) if with_bias else None
    targets = torch.randint(0, 101, (n_tokens,), generator=generator)
    return hidden, weight, bias, targets


def leaves(hidden, weight, bias, dtype=None):
    """Fresh leaf copies (in ``dtype``, default their own) of the three inputs; None stays None."""
    return [None if t is None else t.to(dtype or t.dtype).clone().requires_grad_() for t in (hidden, weight, bias)]


def chunked_truth(exact, targets, temperature, logit_scale):
    """float64 (log_probs, entropy) of float64 leaves ``exact`` (hidden, weight, bias)."""
    logits = exact[0] @ exact[1].T + (0 if exact[2] is None else exact[2])
    return truth_logp_entropy(logits * logit_scale, targets, temperature, None)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("temperature", "logit_scale"), [(1.0, 1.0), (0.7, 1.0), (0.9, 0.5)])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("outputs", [("log_probs", "entropy"), ("log_probs",)])
def test_chunked_logprob_function_matches_trl(dtype, temperature, logit_scale, with_bias, outputs):
    generator = torch.Generator().manual_seed(21)
    hidden, weight, bias, targets = chunked_case(dtype, 37, with_bias, generator)
    upstream = [torch.randn(37, generator=generator, dtype=torch.float64) for _ in range(2)]
    apply_to_trl()
    ours_cls = trl.kernels.ChunkedLogProbFunction
    assert ours_cls is not TRL_CHUNKED and trl_utils._ChunkedLogProbFunction is ours_cls

    args = (targets, temperature, 4096, None, logit_scale, outputs)
    mine, base = leaves(hidden, weight, bias), leaves(hidden, weight, bias)
    exact = leaves(hidden, weight, bias, torch.float64)
    ours = ours_cls.apply(mine[0], mine[1], mine[2], *args)
    theirs = TRL_CHUNKED.apply(base[0], base[1], base[2], *args)
    assert len(ours) == 5 and ours[2:] == (None, None, None)
    assert (ours[1] is None) == (theirs[1] is None) == ("entropy" not in outputs)
    truth = chunked_truth(exact, targets, temperature, logit_scale)  # float64, from the same rounded inputs
    atol_value, atol_grad = ATOL["linear"][dtype]
    for name, got, theirs_i, exact_i in zip(("log_probs", "entropy"), ours[:2], theirs[:2], truth):
        if got is not None:
            assert_close(name, got, theirs_i, exact_i.detach(), atol_value)  # float32, as TRL's
    params = [i for i in range(3) if mine[i] is not None]
    g_ours = grads_of(ours[:2], upstream, [mine[i] for i in params])
    g_trl = grads_of(theirs[:2], upstream, [base[i] for i in params])
    g_64 = grads_of(truth, upstream, [exact[i] for i in params])
    for i, a, b, c in zip(params, g_ours, g_trl, g_64):
        assert_close(f"grad {('hidden', 'weight', 'bias')[i]}", a.to(dtype), b.to(dtype), c, atol_grad)
    assert call_counts()["ChunkedLogProbFunction"] == {"hcrlhf": 1, "trl": 0}


def test_chunked_logprob_function_under_autocast_and_with_no_tokens():
    generator = torch.Generator().manual_seed(22)
    hidden, weight, bias, targets = chunked_case(torch.float32, 19, True, generator)
    upstream = [torch.randn(19, generator=generator, dtype=torch.float64) for _ in range(2)]
    apply_to_trl()
    ours_cls, outputs = trl.kernels.ChunkedLogProbFunction, ("log_probs", "entropy")
    mine, base = leaves(hidden, weight, bias), leaves(hidden, weight, bias)
    # TRL projects in the autocast dtype: the truth is float64 from the bf16-rounded inputs
    exact = [t.to(torch.bfloat16).double().requires_grad_() for t in (hidden, weight, bias)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = ours_cls.apply(*mine, targets, 1.0, 4096, None, 1.0, outputs)
        theirs = TRL_CHUNKED.apply(*base, targets, 1.0, 4096, None, 1.0, outputs)
    truth = chunked_truth(exact, targets, 1.0, 1.0)
    for name, got, ref, exact_i in zip(("log_probs", "entropy"), ours[:2], theirs[:2], truth):
        assert_close(name, got, ref, exact_i.detach(), ATOL["linear"][torch.bfloat16][0])
    g_ours, g_trl, g_64 = (grads_of(o[:2], upstream, x) for o, x in ((ours, mine), (theirs, base), (truth, exact)))
    for name, a, b, c in zip(("hidden", "weight", "bias"), g_ours, g_trl, g_64):
        # gradients in the leaves' float32, as TRL's; both carry the bf16 rounding of the projection
        assert_close(f"grad {name}", a.float(), b.float(), c, ATOL["linear"][torch.bfloat16][1])
    assert all(x.grad is None for x in mine)  # autograd.grad, not .backward

    # an all-masked micro-batch: no tokens, and the output still reaches the parameters
    empty = leaves(hidden[:0], weight, None)
    logp, entropy, *_ = ours_cls.apply(empty[0], empty[1], None, targets[:0], 1.0, 4096, None, 1.0, outputs)
    assert logp.shape == entropy.shape == (0,) and logp.dtype == entropy.dtype == torch.float32
    (logp.sum() + entropy.sum()).backward()
    assert empty[1].grad is not None and (empty[1].grad == 0).all()


def test_chunked_logprob_function_hands_unsupported_calls_to_trl():
    generator = torch.Generator().manual_seed(23)
    hidden, weight, bias, targets = chunked_case(torch.float32, 9, True, generator)
    ours_cls = (apply_to_trl(), trl.kernels.ChunkedLogProbFunction)[1]
    cases = [
        (1.0, 4096, None, 1.0, ("log_probs", "entropy", "is_top1")),  # SFT's outputs
        (1.0, 4096, None, 1.0, trl_chunked_logprob.OPTIONAL_OUTPUTS),  # the default: every output
        (1.0, 4096, 30.0, 1.0, ("log_probs",)),  # logit soft-capping (Gemma)
    ]
    for args in cases:
        ours = ours_cls.apply(hidden, weight, bias, targets, *args)
        theirs = TRL_CHUNKED.apply(hidden, weight, bias, targets, *args)
        for a, b in zip(ours, theirs):
            assert (a is None and b is None) or torch.equal(a, b)
    assert call_counts()["ChunkedLogProbFunction"] == {"hcrlhf": 0, "trl": len(cases)}


# ------------------------------------------------------------------------------------ patching
def trl_attributes_holding(objects):
    """(module, attribute) of every loaded trl module attribute that *is* one of ``objects``."""
    found = []
    for name, module in list(sys.modules.items()):
        if module is None or not (name == "trl" or name.startswith("trl.")):
            continue
        found += [(name, attr) for attr, value in list(vars(module).items()) if any(value is o for o in objects)]
    return sorted(found)


def test_replacements_have_trl_signatures():
    apply_to_trl()

    def params(fn, drop_first=False):
        items = list(inspect.signature(fn).parameters.values())[1 if drop_first else 0:]
        return [(p.name, p.kind, p.default) for p in items]

    for name in ("selective_log_softmax", "entropy_from_logits", "selective_log_softmax_and_entropy"):
        assert params(getattr(trl_utils, name)) == params(ORIGINALS[name]), name
    assert params(trl.kernels.ChunkedLogProbFunction.apply) == params(TRL_CHUNKED.forward, drop_first=True)


def test_patch_and_revert_round_trip(monkeypatch):
    before = trl_attributes_holding(ORIGINALS.values())
    expected = {("trl.kernels", "ChunkedLogProbFunction"), ("trl.kernels.chunked_logprob", "ChunkedLogProbFunction"),
                ("trl.trainer.utils", "_ChunkedLogProbFunction"), ("trl.trainer.utils", "selective_log_softmax"),
                ("trl.trainer.utils", "entropy_from_logits"),
                ("trl.trainer.utils", "selective_log_softmax_and_entropy")}
    assert expected <= set(before)
    # a trl module that imported a function by name before the patch (as the experimental trainers do)
    early = types.ModuleType("trl._hcrlhf_test_early")
    early.selective_log_softmax = TRL_SELECTIVE
    monkeypatch.setitem(sys.modules, early.__name__, early)
    before = trl_attributes_holding(ORIGINALS.values())

    apply_to_trl()
    assert is_applied()
    assert trl_attributes_holding(ORIGINALS.values()) == []
    assert early.selective_log_softmax is trl_utils.selective_log_softmax is not TRL_SELECTIVE
    # one imported after the patch copies hcrlhf's function; revert restores it too
    late = types.ModuleType("trl._hcrlhf_test_late")
    late.entropy_from_logits = trl_utils.entropy_from_logits
    monkeypatch.setitem(sys.modules, late.__name__, late)
    replacement = trl_utils.selective_log_softmax
    apply_to_trl()  # idempotent: the same objects stay in place
    assert trl_utils.selective_log_softmax is replacement

    revert_trl()
    assert not is_applied()
    assert trl_attributes_holding(ORIGINALS.values()) == sorted(before + [(late.__name__, "entropy_from_logits")])
    assert early.selective_log_softmax is TRL_SELECTIVE and late.entropy_from_logits is TRL_ENTROPY
    revert_trl()  # a no-op

    apply_to_trl(impl="torch")
    apply_to_trl(impl="auto")  # switching the engine swaps the replacements, never stacks them
    assert trl_attributes_holding(ORIGINALS.values()) == []
    revert_trl()
    assert trl_utils.selective_log_softmax is TRL_SELECTIVE

    with pytest.raises(RuntimeError, match="boom"), trl_patched():
        assert trl.kernels.ChunkedLogProbFunction is not TRL_CHUNKED
        raise RuntimeError("boom")
    assert trl.kernels.ChunkedLogProbFunction is TRL_CHUNKED and not is_applied()
    with pytest.raises(ValueError, match="impl must be one of"):
        apply_to_trl(impl="cuda")


@pytest.mark.parametrize("version", ["1.15.0", "1.17.0", "2.0.0.dev0", "unknown"])
def test_unsupported_trl_versions_are_refused(monkeypatch, version):
    monkeypatch.setattr(trl, "__version__", version)
    with pytest.raises(UnsupportedTRLVersionError, match=r"supports TRL 1\.16\.0, found TRL " + version):
        apply_to_trl()
    assert not is_applied() and trl_utils.selective_log_softmax is TRL_SELECTIVE


def test_a_local_build_of_the_supported_release_is_accepted(monkeypatch):
    monkeypatch.setattr(trl, "__version__", SUPPORTED_TRL_VERSIONS[-1] + "+local")
    apply_to_trl()
    assert is_applied()


# ------------------------------------------------------------------------------------ end to end
def rloo_run(task, output_dir, patched: bool):
    """Three RLOOTrainer steps on the built-in task's tiny Qwen2 policy: (log history, initial and final
    weights). Two generation batches of 4 prompts x 2 samples at temperature 0.9, each used for two
    optimizer steps (num_iterations=2: the second step is off-policy, so its loss is not 0), with a
    reference model (beta > 0, so KL is logged and enters the rewards)."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM
    from trl import RLOOConfig, RLOOTrainer

    raw = {task.template.format_prompt(p): p for p in task.split.candidate[:16]}

    def reward(prompts, completions, **_):  # on-topic words, plus a little for variety
        return [len(set(c.split()) & set(raw[p].split())) + 0.1 * len(set(c.split()))
                for p, c in zip(prompts, completions)]

    config = RLOOConfig(
        output_dir=str(output_dir), max_steps=3, per_device_train_batch_size=8, num_generations=2,
        num_iterations=2, max_completion_length=10, temperature=0.9, beta=0.05, optim="sgd", learning_rate=0.5,
        logging_steps=1, seed=0, use_cpu=True, bf16=False, report_to="none", save_strategy="no",
        dataloader_num_workers=0, disable_tqdm=True,
    )
    model = AutoModelForCausalLM.from_pretrained(task.policy_path, attn_implementation="eager")
    initial = {k: v.detach().clone() for k, v in model.state_dict().items()}
    with trl_patched() if patched else contextlib.nullcontext():  # patched before the trainer exists, as documented
        trainer = RLOOTrainer(model=model, reward_funcs=reward, args=config,
                              train_dataset=Dataset.from_dict({"prompt": list(raw)}),
                              processing_class=task.load_tokenizer(padding_side="left"))
        trainer.train()
    final = {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}
    return trainer.state.log_history, initial, final


def test_rloo_trainer_is_the_same_patched_and_unpatched(task, tmp_path):
    """Same seed, same model, with and without apply_to_trl: the same completions, the logged metrics
    within rel 1e-5 / abs 5e-5 and the final weights within 1e-5, while training moves them by ~5e-2.

    Why these tolerances: the two runs differ only by float32 rounding in the log-probs and entropies
    (~1e-7 relative). The logged loss and grad norm are float32 sums whose terms (per-sequence
    advantage x ratio, per-token gradients) are up to ~10 and largely cancel, so their differences are
    absolute, ~1e-7 x the terms: measured <= 3e-5 on a grad norm of 11 and 2e-6 on one of 0.02 that
    cancels down from terms ~10 (abs 5e-5 + rel 1e-5 leaves a margin of >= 4x). Weights: measured
    1.2e-7 (one float32 ulp at |w| ~ 1). A kernel that got a convention wrong (temperature, masking,
    entropy) moves these by 1e-3 .. 1e-2. The optimizer is SGD: Adam's first steps normalise each
    coordinate by its own gradient (update ~ lr * sign(g)), so a coordinate whose gradient cancels to
    ~0 turns rounding noise into an O(lr) difference (measured 2e-4 for lr 3e-3) and hides real errors
    of the same sign; with SGD the weight difference is lr times the gradient difference."""
    start = time.perf_counter()
    plain_logs, initial, plain = rloo_run(task, tmp_path / "plain", patched=False)
    assert call_counts()["ChunkedLogProbFunction"] == {"hcrlhf": 0, "trl": 0}
    ours_logs, initial_again, ours = rloo_run(task, tmp_path / "ours", patched=True)
    # policy + reference log-probs for each of the 2 generation batches, and the 3 training forwards
    assert call_counts()["ChunkedLogProbFunction"] == {"hcrlhf": 7, "trl": 0}

    assert all(torch.equal(initial[k], initial_again[k]) for k in initial)
    moved = max((plain[k] - initial[k]).abs().max().item() for k in plain)
    assert moved > 1e-2, f"training hardly moved the weights (max change {moved:.2e}): the comparison is empty"
    worst = max((ours[k] - plain[k]).abs().max().item() for k in plain)
    assert worst <= 1e-5, f"final weights differ by {worst:.3e} between the patched and the unpatched run"

    steps = [entry for entry in plain_logs if "loss" in entry]
    assert len(steps) == 3 and len(ours_logs) == len(plain_logs)
    assert any(abs(entry["loss"]) > 1e-3 for entry in steps), "no step had a non-trivial loss"
    assert any(entry.get("kl", 0.0) > 1e-2 for entry in steps), "the KL to the reference model never grew"
    for theirs_entry, ours_entry in zip(plain_logs, ours_logs):
        assert theirs_entry.keys() == ours_entry.keys()
        for key, value in theirs_entry.items():
            if any(word in key for word in ("runtime", "per_second", "time")):
                continue
            if "length" in key or key in ("num_tokens", "step", "epoch"):  # the same completions were sampled
                assert ours_entry[key] == value, (key, theirs_entry.get("step"))
            elif isinstance(value, float):
                assert ours_entry[key] == pytest.approx(value, rel=1e-5, abs=5e-5), (key, theirs_entry.get("step"))
    print(f"RLOO e2e: two 3-step runs in {time.perf_counter() - start:.1f} s, max weight difference {worst:.2e}")
