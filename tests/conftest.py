"""Shared test set-up: Triton runs in its interpreter when there is no GPU, a seed fixture, the
`gpu` marker (skipped without CUDA), and isolation from the real per-user δ ledger (HCRLHF_STATE_DIR
points at a temporary directory: one for the session, set before any session or module fixture runs,
and a fresh one per test)."""

import os

import torch

# Must happen before anything imports triton: the interpreter is chosen when kernels are defined.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
    # Tests run many small ops, where a second intra-op thread costs more than it gives
    # (and CI has 2 cores). The C++ kernels use OpenMP threads, unaffected by this.
    torch.set_num_threads(1)

import pytest  # noqa: E402

HAS_CUDA = torch.cuda.is_available()


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
