"""impl selection: auto, the HCRLHF_IMPL override, and clear errors for impls that cannot run."""

import pytest
import torch

from hcrlhf import ops
from hcrlhf.ops import _dispatch
from hcrlhf.ops._dispatch import ImplUnavailableError, resolve_impl

CPU = torch.device("cpu")


def test_auto_on_cpu_prefers_cpp_when_built():
    expected = "cpp" if ops.cpp_available() else "torch"
    assert resolve_impl("auto", CPU, op="gae") == expected


def test_auto_on_cuda_uses_triton_except_for_float64():
    cuda = torch.device("cuda")
    assert resolve_impl("auto", cuda, op="gae") == "triton"
    assert resolve_impl("auto", cuda, op="gae", float64=True) == "torch"


def test_environment_variable_replaces_auto_only(monkeypatch):
    monkeypatch.setenv("HCRLHF_IMPL", "torch")
    assert resolve_impl("auto", CPU, op="gae") == "torch"
    assert resolve_impl("triton", CPU, op="gae") == "triton"  # an explicit argument wins
    monkeypatch.setenv("HCRLHF_IMPL", "bogus")
    with pytest.raises(ValueError, match="HCRLHF_IMPL must be one of"):
        resolve_impl("auto", CPU, op="gae")


def test_unknown_impl_is_named():
    with pytest.raises(ValueError, match=r"gae: impl must be one of .*'gpu'"):
        resolve_impl("gpu", CPU, op="gae")


def test_triton_on_cpu_without_interpreter_explains_the_alternatives(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ImplUnavailableError, match="needs CUDA tensors.*TRITON_INTERPRET=1"):
        resolve_impl("triton", CPU, op="gae")


def test_cpp_on_cuda_is_refused():
    with pytest.raises(ImplUnavailableError, match="CPU tensors only"):
        resolve_impl("cpp", torch.device("cuda"), op="gae")


def test_missing_extension_explains_how_to_build_it(monkeypatch):
    monkeypatch.setattr(_dispatch, "_load_cpp", lambda: (None, "No module named 'hcrlhf._C'"))
    with pytest.raises(ImplUnavailableError, match=r"pip install -e \..*HCRLHF_SKIP_EXT"):
        ops.gae(torch.randn(2, 3), torch.randn(2, 3), torch.ones(2, 3, dtype=torch.bool), impl="cpp")
    # auto falls back to the reference, which computes the same result
    adv, _ = ops.gae(torch.ones(1, 2), torch.zeros(1, 2), torch.ones(1, 2, dtype=torch.bool), gamma=1.0, gae_lambda=1.0)
    torch.testing.assert_close(adv, torch.tensor([[2.0, 1.0]]))


def test_outputs_do_not_require_grad():
    rewards = torch.randn(2, 4, requires_grad=True)
    adv, ret = ops.gae(rewards, torch.randn(2, 4), torch.ones(2, 4, dtype=torch.bool), impl="torch")
    assert not adv.requires_grad and not ret.requires_grad


def test_float64_goes_only_to_impls_that_compute_in_float64():
    if ops.cpp_available():
        assert resolve_impl("auto", CPU, op="x", float64=True) == "cpp"
    assert resolve_impl("auto", CPU, op="x", float64=True, float64_impls=("torch",)) == "torch"
    with pytest.raises(TypeError, match=r"x: impl='cpp' computes in float32.*'torch'"):
        resolve_impl("cpp", CPU, op="x", float64=True, float64_impls=("torch",))
