"""The benchmark code paths (benchmarks/): real peer rows agree with our ops, floors are lower bounds, results files.

Tiny shapes only; the timings themselves are not checked (a shared CPU is too noisy), the plumbing is.
"""

import csv
import inspect
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

from hcrlhf import ops
from hcrlhf.benchmarks import bench_advantages, bench_logprobs, harness, peers

pytest.importorskip("trl")
pytest.importorskip("verl")
pytest.importorskip("openrlhf")

needs_cpp = pytest.mark.skipif(not ops.cpp_available(), reason="the C++ kernels are not built")
ROOT = Path(__file__).resolve().parent.parent
TINY_TOKEN = dict(B=2, T=5, V=257, device="cpu")


# ------------------------------------------------------------------------------- the peers are the real code


def test_peer_functions_are_the_installed_libraries():
    import trl.trainer.utils
    import verl.trainer.ppo.core_algos
    import verl.utils.torch_functional

    assert peers.trl_utils() is trl.trainer.utils
    assert peers.verl_functional() is verl.utils.torch_functional
    assert peers.verl_core_algos() is verl.trainer.ppo.core_algos
    utils = peers.openrlhf_utils()
    assert utils.__name__ == "openrlhf.models.utils" and utils.__file__.endswith("openrlhf/models/utils.py")
    gae = peers.openrlhf_gae()
    assert inspect.unwrap(gae.func).__code__.co_filename.endswith("openrlhf/trainer/ppo_utils/experience_maker.py")
    assert set(peers.versions()) == {"trl", "verl", "openrlhf"}
    assert "not installed" not in peers.versions().values()


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("impl", [i for i in bench_logprobs.TOKEN_PEERS if not i.startswith("torch.compile")]
                         + ["ours"])
def test_token_rows_match_float64(impl, dtype):
    if impl == "ours" and not ops.cpp_available():
        pytest.skip("the C++ kernels are not built")
    spec = dict(TINY_TOKEN, op="token_logprobs", dtype=dtype, impl=impl)
    out_err, grad_err = bench_logprobs.reference_errors(spec, with_grad=True)
    # the peers return bf16 log-probs for bf16 logits (about 3 significant digits); ours float32
    out_tol = 1e-5 if dtype == "float32" or impl == "ours" else 5e-2
    assert out_err < out_tol
    assert grad_err < (1e-6 if dtype == "float32" else 1e-2)


@needs_cpp
def test_peer_log_probs_equal_ours_directly():
    fn, (logits, labels), _ = bench_logprobs.build(dict(TINY_TOKEN, op="token_logprobs", dtype="float32", impl="ours"))
    ours = fn(logits, labels)
    for name, peer in bench_logprobs.TOKEN_PEERS.items():
        if not name.startswith("torch.compile"):
            torch.testing.assert_close(peer(logits, labels), ours, rtol=1e-5, atol=1e-5, msg=name)
    # and one value by hand: log p_y = x_y - log sum_v exp(x_v)
    x, y = logits[0, 0].double(), labels[0, 0]
    assert abs(ours[0, 0].item() - (x[y] - torch.log(torch.exp(x).sum())).item()) < 1e-5


@pytest.mark.parametrize("impl", [i for i in bench_logprobs.ENTROPY_PEERS if not i.startswith("torch.compile")])
def test_entropy_rows_match_float64(impl):
    spec = dict(TINY_TOKEN, op="token_logprobs+entropy", dtype="float32", impl=impl)
    out_err, grad_err = bench_logprobs.reference_errors(spec, with_grad=True)
    assert out_err < 1e-5 and grad_err < 1e-6


def test_torch_compile_row_matches_float64():
    spec = dict(TINY_TOKEN, op="token_logprobs", dtype="float32", impl="torch.compile(log_softmax+gather)")
    out_err, grad_err = bench_logprobs.reference_errors(spec, with_grad=True)
    assert out_err < 1e-5 and grad_err < 1e-6


@pytest.mark.parametrize("impl", ["TRL ChunkedLogProbFunction", "unfused matmul + log_softmax+gather", "ours (torch)"])
def test_linear_rows_match_float64(impl):
    spec = dict(op="linear_logprobs", device="cpu", dtype="float32", N=6, H=8, V=300, impl=impl)
    out_err, grad_err = bench_logprobs.reference_errors(spec, with_grad=True)
    assert out_err < 1e-5 and grad_err < 1e-5


def test_reference_errors_catch_a_wrong_peer(monkeypatch):
    """The agreement column can fail: a peer that forgets the normaliser, or gets the gradient's sign wrong."""
    spec = dict(TINY_TOKEN, op="token_logprobs", dtype="float32", impl="Safe RLHF log_softmax+gather")
    unnormalised = lambda logits, labels: logits.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    monkeypatch.setitem(bench_logprobs.TOKEN_PEERS, spec["impl"], unnormalised)
    assert bench_logprobs.reference_errors(spec, with_grad=False)[0] > 0.1

    class FlippedGrad(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x

        @staticmethod
        def backward(ctx, grad):
            return -grad

    flipped = lambda logits, labels: peers.safe_rlhf_logprobs(FlippedGrad.apply(logits), labels)
    monkeypatch.setitem(bench_logprobs.TOKEN_PEERS, spec["impl"], flipped)
    out_err, grad_err = bench_logprobs.reference_errors(spec, with_grad=True)
    assert out_err < 1e-5 and grad_err > 0.1


@needs_cpp
@pytest.mark.parametrize("op", bench_advantages.OPS)
def test_advantage_rows_match_float64(op):
    x = bench_advantages.make_inputs(6, 9, torch.device("cpu"), seed=3)
    table = bench_advantages.calls(op, x)
    if not table:
        pytest.skip(f"{op} is not in this hcrlhf")
    assert any(not label.startswith(("cpp", "torch")) for label in table)  # a peer row is there
    for label, (fn, extract) in table.items():
        error = bench_advantages.max_error(extract(fn()), bench_advantages.reference(op, label, x), x["mask"])
        assert error < 1e-5, (op, label, error)


def test_openrlhf_gae_is_the_python_loop_and_matches_the_reference():
    from hcrlhf.reference import gae

    x = bench_advantages.make_inputs(3, 7, torch.device("cpu"), seed=1)
    rewards, values, mask = x["reward_values"], x["cost_values"], x["mask"]
    got, returns = peers.openrlhf_gae()(values, rewards, mask.float(), 0.9, 0.8)
    loop, _ = peers.python_loop_gae(rewards, values, mask, 0.9, 0.8)
    want = gae(rewards.double(), values.double(), mask, 0.9, 0.8)[0]
    torch.testing.assert_close(got, loop)
    assert (got.double() - want)[mask].abs().max() < 1e-5


# ------------------------------------------------------------------------------------------------ the floor


def test_benchmarks_refuse_a_patched_peer():
    from hcrlhf.integrations import trl_patched

    peers.assert_unpatched()
    with trl_patched(), pytest.raises(RuntimeError, match="patched trl"):
        peers.logprob_paths("cpu")
    peers.assert_unpatched()


def test_timing_keeps_the_fastest_sample():
    timing = harness.Timing.from_samples([3.0, 1.0, 2.0, 5.0, 4.0])
    assert (timing.min, timing.median) == (1.0, 3.0)


def test_memory_floor_is_below_a_measured_read():
    """A read-only op's fastest time is not below bytes / the best read bandwidth (re-measured if it seems so).

    The op reads the buffer once and does more per element than the bandwidth's yardstick (a sum), as the
    log-prob kernels do; timing the yardstick itself against its own best would be a coin toss."""
    buf = torch.randn(1 << 18)  # 1 MiB
    fastest = harness.time_device(lambda: torch.logsumexp(buf, 0), torch.device("cpu"), reps=20, warmup=2).min
    floor = harness.refined_floor(lambda refresh: harness.memory_floor("cpu", buf.numel() * 4, refresh=refresh),
                                  fastest)
    assert 0 < floor <= fastest


def test_memory_floor_is_bytes_over_the_best_read_bandwidth():
    """Not a loose bound either: the floor of reading a buffer is within 1.5x of the best time of a sum over it."""
    nbytes = 1 << 22
    floor = harness.memory_floor("cpu", nbytes)
    assert floor == pytest.approx(nbytes / harness.read_bandwidth("cpu", nbytes))
    buf = torch.ones(nbytes // 4)
    best_sum = min(harness.time_device(lambda: buf.sum(), torch.device("cpu"), reps=20, warmup=2).min
                   for _ in range(3))
    assert floor <= 1.5 * best_sum


def test_memory_floor_takes_the_larger_of_read_and_write():
    read_only = harness.memory_floor("cpu", 1 << 20)
    both = harness.memory_floor("cpu", 1 << 20, 1 << 22)
    assert both >= read_only
    assert both == pytest.approx(max(read_only, (1 << 22) / harness.write_bandwidth("cpu", 1 << 22)))


def test_refined_floor_remeasures_until_the_fastest_sample_is_above_it():
    calls = []

    def floor_fn(refresh):
        calls.append(refresh)
        return 2.0 if not refresh else 0.5

    assert harness.refined_floor(floor_fn, fastest=1.0) == 0.5
    assert calls == [False, True]
    calls.clear()
    assert harness.refined_floor(lambda refresh: calls.append(refresh) or 0.1, fastest=1.0) == 0.1
    assert calls == [False]


def test_check_floors_fails_below_one_and_warns_on_request(capsys):
    ok = [{"x floor (fastest)": "1.000"}, {"x floor (fastest)": "3.2"}, {"x floor (fastest)": ""}]
    assert harness.check_floors(ok) == 0
    with pytest.raises(harness.FloorViolation, match="1 measured time"):
        harness.check_floors([*ok, {"impl": "x", "x floor (fastest)": "0.97"}])
    assert harness.check_floors([{"x floor (fastest)": "0.5"}], mode="warn") == 1
    assert "below the floor" in capsys.readouterr().err


@needs_cpp
def test_token_rows_floor_and_columns():
    rows = bench_logprobs.run_token(torch.device("cpu"), [(2, 4, 300, torch.float32)], budget_s=0.05, reps=3,
                                    memory=False)
    impls = {row["impl"] for row in rows}
    assert set(bench_logprobs.TOKEN_PEERS) <= impls and "ours" in impls
    assert {row["mode"] for row in rows} == {"fwd", "bwd", "fwd+bwd"}
    for row in rows:
        assert float(row["x floor"]) >= float(row["x floor (fastest)"]) > 0
        if row["mode"] != "bwd":
            assert float(row["max abs err vs f64"]) < 1e-5


# ------------------------------------------------------------------------------------------- results files


def test_write_results_to_out_replaces_its_section(tmp_path):
    out = tmp_path / "gpu.md"
    harness.write_results("first", [{"a": 1}], "cpu", out=out, notes="one")
    harness.write_results("second", [{"b": 2}], "cpu", out=out)
    harness.write_results("first", [{"a": 3}], "cpu", out=out)
    text = out.read_text()
    assert text.count("## first") == 1 and "| 3 |" in text and "| 1 |" not in text and "## second" in text
    for name in ("trl", "verl", "openrlhf", "torch", "triton", "hcrlhf commit"):
        assert f"{name}: " in text
    with open(tmp_path / "gpu-first.csv") as f:
        assert list(csv.DictReader(f)) == [{"a": "3"}]


def test_gpu_check_dry_run_writes_every_section():
    out = Path(tempfile.mkdtemp(prefix="hcrlhf-gpu-check-test-")) / "dry.md"
    result = subprocess.run([sys.executable, "-m", "hcrlhf.benchmarks.gpu_check", "--dry-run", "--device", "cpu",
                             "--out", str(out)], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    text = out.read_text()
    for section in ("logprobs", "advantages", "train_step", "pytest-benchmark", "gpu_check"):
        assert f"## {section}\n" in text, section
    assert "## gpu tests" not in text  # a dry run runs no gpu tests
    assert "every step passed" in text
    for label in ("TRL selective_log_softmax", "verl logprobs_from_logits", "OpenRLHF log_probs_from_logits",
                  "torch.compile(log_softmax+gather)", "TRL ChunkedLogProbFunction",
                  "OpenRLHF get_advantages_and_returns", "verl compute_gae_advantage_return", "| rloo | hcrlhf |"):
        assert label in text, label
