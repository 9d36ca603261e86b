"""The `hcrlhf` command: version, the advantage benchmark, and exit codes."""

import subprocess
import sys

import pytest


def run_cli(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "hcrlhf.cli", *args], capture_output=True, text=True,
                          timeout=timeout)


def test_version():
    import hcrlhf

    result = run_cli("--version")
    assert result.returncode == 0
    assert result.stdout.strip() == f"hcrlhf {hcrlhf.__version__}"


def test_bench_advantages_small_run_prints_the_table():
    result = run_cli("bench", "advantages", "--device", "cpu", "--shapes", "4x16", "--ops", "gae", "rloo_advantages")
    assert result.returncode == 0, result.stderr
    assert "| op | B | T | impl |" in result.stdout
    for label in ("peer (Python loop)", "peer (Python)", "| gae | 4 | 16 |", "| rloo_advantages | 4 | 16 |"):
        assert label in result.stdout


@pytest.mark.parametrize("args", [("bench", "nope"), ("bench", "advantages", "--shapes", "3x"), ()])
def test_bad_usage_exits_2(args):
    assert run_cli(*args).returncode == 2
