"""Fingerprints, the disjointness check, and the δ ledger (incl. a process killed mid-write)."""

import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
import unicodedata

import pytest

from hcrlhf.safety import BudgetExceededError, SafetyLedger, assert_disjoint, fingerprint
from hcrlhf.safety import ledger as ledger_module

PROMPTS = ["How do I bake bread?", "Tell me a joke.", "Explain entropy in one paragraph.", "Café au lait?"]

# --- fingerprint ------------------------------------------------------------------------------------


def test_fingerprint_is_the_documented_stable_hash():
    digests = sorted(
        hashlib.sha256(" ".join(unicodedata.normalize("NFC", p).split()).encode()).hexdigest() for p in PROMPTS
    )
    expected = hashlib.sha256(f"hcrlhf-prompts-v1:{len(PROMPTS)}:".encode() + "".join(digests).encode()).hexdigest()
    assert fingerprint(PROMPTS) == "sha256:" + expected
    # Frozen value: a change here breaks every recorded split and ledger.
    assert fingerprint(["a", "b"]) == "sha256:22a5e6e225171bc3d6b8d20b68b5a607e4a0a5c38fae2f4e4fbaa4565fc936fc"


def test_fingerprint_ignores_order_and_formatting_but_not_content():
    assert fingerprint(PROMPTS) == fingerprint(list(reversed(PROMPTS)))
    assert fingerprint(PROMPTS) == fingerprint(tuple(p for p in PROMPTS))
    decomposed = [unicodedata.normalize("NFD", p) for p in PROMPTS]
    assert decomposed != PROMPTS and fingerprint(decomposed) == fingerprint(PROMPTS)
    assert fingerprint(["  How do I\nbake   bread? "] + PROMPTS[1:]) == fingerprint(PROMPTS)
    assert fingerprint(PROMPTS[:-1]) != fingerprint(PROMPTS)
    assert fingerprint(PROMPTS + PROMPTS[:1]) != fingerprint(PROMPTS)  # duplicates count
    assert fingerprint(["How do I bake bread!"] + PROMPTS[1:]) != fingerprint(PROMPTS)


def test_fingerprint_bad_input():
    with pytest.raises(TypeError, match="prompts"):
        fingerprint("a single string")
    with pytest.raises(TypeError, match=r"prompts\[1\]"):
        fingerprint(["ok", 3])
    with pytest.raises(ValueError, match="prompts"):
        fingerprint([])


# --- assert_disjoint ------------------------------------------------------------------------------


def test_assert_disjoint_with_prompts():
    assert_disjoint(["What is 2+2?", "Name a color."], PROMPTS)
    with pytest.raises(ValueError, match=r"1 of 2 train_prompts"):
        assert_disjoint(["What is 2+2?", "tell  me a joke. ".replace("tell", "Tell")], PROMPTS)


def test_assert_disjoint_with_a_fingerprint():
    safety = fingerprint(PROMPTS)
    assert_disjoint(["What is 2+2?"], safety)
    with pytest.raises(ValueError, match="safety set itself"):
        assert_disjoint(list(reversed(PROMPTS)), safety)
    with pytest.raises(ValueError, match="fingerprint"):
        assert_disjoint(["x"], "not-a-fingerprint")


# --- the ledger ---------------------------------------------------------------------------------


def test_ledger_records_persists_and_refuses_overspending(tmp_path):
    path = tmp_path / "ledger.json"
    safety = fingerprint(PROMPTS)
    ledger = SafetyLedger(path, total_delta=0.1)
    assert ledger.spent(safety) == 0.0 and not path.exists()
    assert ledger.spend(safety, 0.05, "candidate A") == pytest.approx(0.05)
    reopened = SafetyLedger(path, total_delta=0.1)
    assert reopened.spent(safety) == pytest.approx(0.05)
    assert [t["label"] for t in reopened.tests(safety)] == ["candidate A"]
    before = path.read_bytes()
    with pytest.raises(BudgetExceededError, match="total_delta"):
        reopened.spend(safety, 0.06, "candidate B")
    assert path.read_bytes() == before  # nothing recorded
    assert isinstance(BudgetExceededError("x"), ValueError)
    reopened.spend(safety, 0.05, "candidate B")  # exactly the budget is allowed
    assert reopened.remaining(safety) == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(BudgetExceededError):
        reopened.spend(safety, 1e-6, "candidate C")
    other = fingerprint(["another safety set"])
    assert reopened.spend(other, 0.1, "other set") == pytest.approx(0.1)  # budgets are per set
    data = json.loads(path.read_text())
    assert data["format"] == "hcrlhf-safety-ledger" and set(data["sets"]) == {safety, other}
    assert path.stat().st_mode & 0o777 == 0o644  # not mkstemp's 0600
    path.chmod(0o640)
    reopened.spend(fingerprint(["a third set"]), 0.01, "keeps permissions")
    assert path.stat().st_mode & 0o777 == 0o640


def test_ledger_many_small_spends_add_up_exactly(tmp_path):
    ledger = SafetyLedger(tmp_path / "l.json", total_delta=0.1)
    safety = fingerprint(PROMPTS)
    for i in range(10):
        ledger.spend(safety, 0.01, f"test {i}")
    with pytest.raises(BudgetExceededError):
        ledger.spend(safety, 0.001, "one too many")
    assert len(ledger.tests(safety)) == 10


def test_ledger_budget_cannot_change_and_bad_input(tmp_path):
    path = tmp_path / "ledger.json"
    with pytest.raises(ValueError, match="total_delta"):
        SafetyLedger(path, total_delta=None)
    with pytest.raises(ValueError, match="total_delta"):
        SafetyLedger(path, total_delta=1.5)
    SafetyLedger(path, 0.1).spend(fingerprint(PROMPTS), 0.01, "x")
    with pytest.raises(ValueError, match="total_delta"):
        SafetyLedger(path, total_delta=0.2)
    assert SafetyLedger(path, None).total_delta == 0.1
    ledger = SafetyLedger(path, 0.1)
    with pytest.raises(ValueError, match="fingerprint"):
        ledger.spend("sha256:abc", 0.01, "x")
    with pytest.raises(ValueError, match="delta"):
        ledger.spend(fingerprint(PROMPTS), 0.0, "x")
    with pytest.raises(TypeError, match="label"):
        ledger.spend(fingerprint(PROMPTS), 0.01, None)


def test_ledger_detects_corruption_and_tampering(tmp_path):
    path = tmp_path / "ledger.json"
    SafetyLedger(path, 0.1).spend(fingerprint(PROMPTS), 0.02, "x")
    data = json.loads(path.read_text())
    data["sets"][fingerprint(PROMPTS)]["spent"] = 0.0  # someone "refunds" δ by hand
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="sum to"):
        SafetyLedger(path, 0.1)
    path.write_text('{"format": "hcrlhf-safety-ledger", "ver')
    with pytest.raises(ValueError, match="not valid JSON"):
        SafetyLedger(path, 0.1)


def test_failed_write_leaves_the_old_ledger_and_no_temp_file(tmp_path, monkeypatch):
    path = tmp_path / "ledger.json"
    ledger = SafetyLedger(path, 0.1)
    ledger.spend(fingerprint(PROMPTS), 0.01, "first")
    before = path.read_bytes()

    def crash(src, dst):
        raise OSError("simulated crash before the rename")

    monkeypatch.setattr(ledger_module.os, "replace", crash)
    with pytest.raises(OSError, match="simulated"):
        ledger.spend(fingerprint(PROMPTS), 0.01, "second")
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ledger.json", "ledger.json.lock"]


# --- a writer killed mid-write ------------------------------------------------------------------------

_CHILD = textwrap.dedent(
    """
    import json, os, stat, sys, time
    from hcrlhf.safety import ledger as module

    path, writer = sys.argv[1], sys.argv[2]
    real_fsync = os.fsync
    announce = False

    def slow_fsync(fd):  # a slow disk; announces "in-write" while a write is in flight
        if stat.S_ISREG(os.fstat(fd).st_mode):
            if announce:
                print("in-write", flush=True)
            time.sleep(0.5 if announce else 0.05)  # long enough for the parent to react under load
        real_fsync(fd)

    module.os.fsync = slow_fsync

    if writer == "naive":  # the control: an in-place, chunked, non-atomic write
        def naive(target, data):
            text = json.dumps(data, indent=2, sort_keys=True)
            with open(target, "w") as handle:
                for start in range(0, len(text), 1 << 16):
                    handle.write(text[start:start + (1 << 16)])
                    handle.flush()
                    slow_fsync(handle.fileno())
        module._atomic_write_json = naive

    ledger = module.SafetyLedger(path, total_delta=0.9)
    sets = [f"sha256:{i:064x}" for i in range(20)]
    i = 0
    while True:
        ledger.spend(sets[i % 20], 1e-7, "x" * 300)
        i += 1
        if i == 1:
            announce = True
            print("ready", flush=True)
    """
)


def _seed_ledger(path, tests_per_set=150):
    """A large ledger (~1 MB), so that each rewrite takes a while."""
    sets = {}
    for i in range(20):
        tests = [{"delta": 1e-7, "label": "x" * 300, "time": "2025-01-01T00:00:00.000000+00:00"}] * tests_per_set
        sets[f"sha256:{i:064x}"] = {"spent": sum(t["delta"] for t in tests), "tests": tests}
    data = {"format": "hcrlhf-safety-ledger", "version": 1, "total_delta": 0.9, "sets": sets}
    path.write_text(json.dumps(data))
    return 20 * tests_per_set


def _kill_rounds(tmp_path, writer, kills):
    """For each entry of ``kills``: start the writer, SIGKILL it ("random": at a random moment;
    "in-write": while a write is in flight), then inspect the ledger."""
    path = tmp_path / "ledger.json"
    count = _seed_ledger(path)
    rng = random.Random(1234)
    outcomes = []
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    for kill in kills:
        child = subprocess.Popen(
            [sys.executable, "-c", _CHILD, str(path), writer], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env
        )
        try:
            line = child.stdout.readline()
            assert line.strip() == b"ready", child.stderr.read().decode()[-2000:]
            if kill == "random":
                time.sleep(rng.uniform(0.0, 0.3))
            else:
                while child.stdout.readline().strip() != b"in-write":
                    pass
        finally:
            child.send_signal(signal.SIGKILL)
            child.wait()
        temp_files = [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
        try:
            ledger = SafetyLedger(path, None)
            new_count = sum(len(ledger.tests(f"sha256:{i:064x}")) for i in range(20))
            outcomes.append((kill, "ok", len(temp_files)))
            assert new_count >= count, "a committed spend was lost"
            count = new_count
        except ValueError as error:
            outcomes.append((kill, f"corrupt: {str(error)[:80]}", len(temp_files)))
    return outcomes, count


def test_ledger_survives_a_writer_killed_mid_write(tmp_path):
    seeded = 3000
    outcomes, count = _kill_rounds(tmp_path, "atomic", ["in-write", "random", "in-write", "random"])
    assert all(state == "ok" for _, state, _ in outcomes), outcomes
    assert count > seeded  # the writers made progress before they were killed
    # A kill in flight leaves the temp file behind, and the ledger intact.
    assert all(temps >= 1 for kill, _, temps in outcomes if kill == "in-write"), outcomes
    # The next writer (holding the lock) clears what the killed ones left behind.
    SafetyLedger(tmp_path / "ledger.json", None).spend(fingerprint(PROMPTS), 0.01, "after the crashes")
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_kill_harness_catches_a_non_atomic_writer(tmp_path):
    outcomes, _ = _kill_rounds(tmp_path, "naive", ["in-write"])
    assert outcomes[0][1].startswith("corrupt"), outcomes
