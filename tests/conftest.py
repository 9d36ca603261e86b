"""Shared test set-up: Triton runs in its interpreter when there is no GPU, Hypothesis is derandomised, every
test starts from the same global RNG state, a seed fixture, the `gpu` marker (skipped without CUDA), and
isolation from the real per-user δ ledger (HCRLHF_STATE_DIR points at a temporary directory: one for the
session, set before any session or module fixture runs, and a fresh one per test).

Hypothesis profiles (registered below, before any test module defines a property test):
* "derandomized" (the default, CI and local): examples are drawn from a seed derived from each test
  function, so every run on every machine tests the same examples and a red CI run reproduces as it is;
  no example database (nothing replayed from, or written to, a local .hypothesis/); no per-example
  deadline and no too_slow health check (both are wall-clock limits, flaky on a loaded 2-core machine).
* "random": set HCRLHF_HYPOTHESIS_RANDOM=1 to explore fresh random examples on each run (with the local
  example database, so a counterexample found is replayed next time) when hunting for new failures.
`pytest --hypothesis-profile=NAME` overrides the choice.
"""

import os
import random

import numpy as np
import torch

# Must happen before anything imports triton: the interpreter is chosen when kernels are defined.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
    # Tests run many small ops, where a second intra-op thread costs more than it gives
    # (and CI has 2 cores). The C++ kernels use OpenMP threads, unaffected by this.
    torch.set_num_threads(1)

import pytest  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

HAS_CUDA = torch.cuda.is_available()

_NO_WALL_CLOCK = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("derandomized", derandomize=True, database=None, **_NO_WALL_CLOCK)
settings.register_profile("random", derandomize=False, print_blob=True, **_NO_WALL_CLOCK)
settings.load_profile("random" if os.environ.get("HCRLHF_HYPOTHESIS_RANDOM") == "1" else "derandomized")


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session", autouse=True)
def _session_state_dir(tmp_path_factory):
    """The per-user state (the default δ ledger) of session- and module-scoped fixtures: never the real one."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HCRLHF_STATE_DIR", str(tmp_path_factory.mktemp("hcrlhf-state-session")))
        yield


@pytest.fixture(autouse=True)
def _state_dir(tmp_path_factory, monkeypatch):
    """A fresh per-user state directory for each test (subprocesses inherit it): a test never touches the
    real default ledger (~/.local/state/hcrlhf) nor sees another test's spends."""
    path = tmp_path_factory.mktemp("hcrlhf-state")
    monkeypatch.setenv("HCRLHF_STATE_DIR", str(path))
    return path


@pytest.fixture(autouse=True)
def _seed_global_rngs():
    """Every test starts from the same state of the global generators (torch, numpy's legacy one, random),
    whatever ran before it: a draw without an explicit generator is reproducible alone or in the suite."""
    torch.manual_seed(0)
    np.random.seed(0)  # noqa: NPY002 - the legacy global generator is the one being pinned
    random.seed(0)


@pytest.fixture
def seed():
    """Seeds torch's global generator so each test draws fresh but reproducible random inputs."""
    value = 1234
    torch.manual_seed(value)
    return value


@pytest.fixture
def generator(seed):
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="session")
def task(tmp_path_factory):
    """The built-in offline task (hcrlhf.data.builtin), built once per test session."""
    from hcrlhf.data.builtin import make_task

    return make_task(tmp_path_factory.getbasetemp() / "hcrlhf-builtin", seed=0)
