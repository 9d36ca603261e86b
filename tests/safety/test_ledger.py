"""Fingerprints, the disjointness check, and the δ ledger (incl. a process killed mid-write)."""

import hashlib
import json
import math
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
import unicodedata

import pytest

from hcrlhf.safety import BudgetExceededError, SafetyLedger, assert_disjoint, fingerprint, open_ledger
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


def test_a_sets_budget_cannot_change_and_bad_input(tmp_path):
    path = tmp_path / "ledger.json"
    for bad in (1.5, 0.0, -0.1, float("nan"), float("inf"), "0.1", True):
        with pytest.raises(ValueError, match="total_delta"):
            SafetyLedger(path, total_delta=bad)
    # No budget declared and no file: allowed; a set's first test fixes its budget.
    fresh = SafetyLedger(path, total_delta=None)
    assert fresh.budget(PROMPTS) is None and fresh.remaining(PROMPTS) is None
    assert fresh.budget(PROMPTS, 0.05) == 0.05 and not path.exists()
    SafetyLedger(path, 0.1).spend(PROMPTS, 0.01, "first test, budget 0.1 declared")
    before = path.read_bytes()
    for declared in (0.2, 0.05):  # larger or smaller: a set's budget is fixed by its first test
        changed = SafetyLedger(path, total_delta=declared)  # opening checks no budget: the file holds many sets
        for attempt in (lambda c=changed: c.check_spend(PROMPTS, 0.01), lambda c=changed: c.spend(PROMPTS, 0.01, "y")):
            with pytest.raises(ValueError) as error:
                attempt()
            message = str(error.value)
            assert f"total_delta={declared:g} was declared" in message, message
            assert "budget total_delta=0.1 recorded" in message and fingerprint(PROMPTS) in message, message
            assert "cannot change after its first test" in message and str(path) in message, message
            assert "first test, budget 0.1 declared" in message, message
        assert changed.budget(PROMPTS) == 0.1  # the recorded budget, whatever was declared
    assert path.read_bytes() == before
    assert SafetyLedger(path, None).budget(PROMPTS) == 0.1
    SafetyLedger(path, 0.1).spend(PROMPTS, 0.01, "declaring the set's own budget")
    SafetyLedger(path, None).spend(PROMPTS, 0.01, "taking the set's own budget")
    assert SafetyLedger(path, None).spent(PROMPTS) == pytest.approx(0.03)
    ledger = SafetyLedger(path, 0.1)
    with pytest.raises(ValueError, match="fingerprint"):
        ledger.spend("sha256:abc", 0.01, "x")
    with pytest.raises(ValueError, match="delta"):
        ledger.spend(fingerprint(PROMPTS), 0.0, "x")
    with pytest.raises(TypeError, match="label"):
        ledger.spend(fingerprint(PROMPTS), 0.01, None)
    with pytest.raises(ValueError, match="delta"):
        open_ledger(path, None, delta=0.0)


def test_sets_with_different_budgets_share_one_file(tmp_path):
    """One (per-user) file: set A's budget is the δ of its first test (0.1), set B's the one declared (0.2),
    set C's a later, larger δ (0.2): each is checked against its own."""
    path = tmp_path / "ledger.json"
    set_a, set_b, set_c = PROMPTS, [f"set B prompt {i}" for i in range(8)], [f"set C prompt {i}" for i in range(8)]
    open_ledger(path, None, delta=0.1).spend(set_a, 0.1, "demo, δ = 0.1")
    declared = open_ledger(path, 0.2, delta=0.05)  # safety.ledger_total_delta: 0.2, refused on the old file budget
    assert declared.check_spend(set_b, 0.05) == 0.0
    declared.spend(set_b, 0.05, "B, first test")
    open_ledger(path, None, delta=0.15).spend(set_b, 0.15, "B, second test")  # B's budget: 0.2
    open_ledger(path, None, delta=0.2).spend(set_c, 0.2, "C, a later run with δ = 0.2")
    data = json.loads(path.read_text())
    assert data["version"] == 3 and "total_delta" not in data
    assert {key: record["total_delta"] for key, record in data["sets"].items()} == {
        fingerprint(set_a): 0.1, fingerprint(set_b): 0.2, fingerprint(set_c): 0.2}
    ledger = SafetyLedger(path, None)
    assert [ledger.budget(s) for s in (set_a, set_b, set_c)] == [0.1, 0.2, 0.2]
    assert [ledger.spent(s) for s in (set_a, set_b, set_c)] == [pytest.approx(v) for v in (0.1, 0.2, 0.2)]
    assert ledger.remaining(set_a) == pytest.approx(0.0, abs=1e-12)
    before = path.read_bytes()
    # Each set is full against its own budget; check_spend (the up-front check) says the same as spend.
    for safety_set, budget in ((set_a, 0.1), (set_b, 0.2), (set_c, 0.2)):
        for attempt in (lambda s=safety_set: open_ledger(path, None, delta=0.01).check_spend(s, 0.01),
                        lambda s=safety_set: open_ledger(path, None, delta=0.01).spend(s, 0.01, "one more")):
            with pytest.raises(BudgetExceededError, match=rf"of its budget total_delta={budget:g} \(the set's own"):
                attempt()
    assert path.read_bytes() == before
    # A declared budget a first test cannot fit is refused too, and fixes nothing.
    with pytest.raises(BudgetExceededError, match="the budget declared for it is total_delta=0.05"):
        open_ledger(path, 0.05, delta=0.1).check_spend(["a set D prompt"], 0.1)
    assert path.read_bytes() == before


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


# --- the default ledger, the file's budget rules, the overlap rule -------------------------------------


def test_default_ledger_is_one_per_user_location(monkeypatch, tmp_path):
    from hcrlhf.safety import default_ledger_path

    monkeypatch.setenv("HCRLHF_STATE_DIR", str(tmp_path / "state"))
    assert default_ledger_path() == tmp_path / "state" / "safety_ledger.json"
    monkeypatch.delenv("HCRLHF_STATE_DIR")
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "xdg"))
    assert default_ledger_path() == tmp_path / "xdg" / "hcrlhf" / "safety_ledger.json"
    monkeypatch.setenv("XDG_STATE_HOME", "relative/ignored")  # the XDG spec: only absolute paths count
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_ledger_path() == tmp_path / "home" / ".local" / "state" / "hcrlhf" / "safety_ledger.json"


def test_the_test_suite_never_uses_the_real_ledger(_state_dir):
    from hcrlhf.safety import default_ledger_path

    assert default_ledger_path().parent == _state_dir
    assert os.environ["HCRLHF_STATE_DIR"] == str(_state_dir)


def test_the_budget_recorded_with_a_set_wins_over_a_declared_or_stale_one(tmp_path):
    path = tmp_path / "ledger.json"
    # All opened before the file exists: none may spend against what it was opened with.
    small, large, undeclared = SafetyLedger(path, 0.1), SafetyLedger(path, 0.5), SafetyLedger(path, None)
    small.spend(PROMPTS, 0.1, "first")
    before = path.read_bytes()
    for attempt in (lambda: large.check_spend(PROMPTS, 0.3), lambda: large.spend(PROMPTS, 0.3, "declares 0.5")):
        with pytest.raises(ValueError, match=r"total_delta=0\.5 was declared.*budget total_delta=0\.1 recorded"):
            attempt()
    for attempt in (lambda: undeclared.check_spend(PROMPTS, 0.3), lambda: undeclared.spend(PROMPTS, 0.3, "stale")):
        with pytest.raises(BudgetExceededError, match=r"budget total_delta=0\.1"):
            attempt()
    assert path.read_bytes() == before
    data = json.loads(path.read_text())
    assert data["sets"][fingerprint(PROMPTS)]["total_delta"] == 0.1
    assert data["sets"][fingerprint(PROMPTS)]["spent"] == pytest.approx(0.1)
    assert large.budget(PROMPTS) == 0.1 and large.remaining(PROMPTS) == pytest.approx(0.0, abs=1e-12)
    # A fresh set takes the budget declared with its first test (0.5 here, not the other sets' 0.1) ...
    fresh = fingerprint(["a fresh set"])
    large.spend(fresh, 0.2, "fresh set, budget 0.5 declared")
    assert undeclared.budget(fresh) == 0.5 and undeclared.remaining(fresh) == pytest.approx(0.3)
    undeclared.spend(fresh, 0.3, "the rest of its budget")
    # ... and keeps it: 0.1 declared later is a change, and the set is full at 0.5.
    with pytest.raises(ValueError, match="cannot change after its first test"):
        small.spend(fresh, 0.01, "declares 0.1")
    with pytest.raises(BudgetExceededError, match=r"budget total_delta=0\.5"):
        undeclared.spend(fresh, 0.01, "past 0.5")


@pytest.mark.parametrize("bad", [-0.1, 0.0, float("nan"), float("inf"), "0.05", True, None, 1.0])
def test_a_ledger_with_a_bad_delta_is_refused_naming_file_and_entry(tmp_path, bad):
    path = tmp_path / "ledger.json"
    ledger = SafetyLedger(path, 0.1)
    ledger.spend(fingerprint(PROMPTS), 0.05, "honest")
    ledger.spend(fingerprint(PROMPTS), 0.05, "honest too")
    text = path.read_text()
    data = json.loads(text)
    record = data["sets"][fingerprint(PROMPTS)]
    record["tests"].append({"delta": bad, "label": "refund", "time": "2025-01-01T00:00:00+00:00"})
    if isinstance(bad, float) and math.isfinite(bad):
        record["spent"] = math.fsum(float(t["delta"]) for t in record["tests"])  # a consistent-looking refund
    path.write_text(json.dumps(data))  # allow_nan: NaN / Infinity as Python's json writes them
    for opener in (lambda: SafetyLedger(path, 0.1), lambda: ledger.spend(fingerprint(PROMPTS), 0.01, "after the edit"),
                   lambda: ledger.check_spend(PROMPTS, 0.01)):
        with pytest.raises(ValueError) as error:
            opener()
        message = str(error.value)
        assert str(path) in message and fingerprint(PROMPTS) in message and "test #3" in message, message
        assert "refund" in message


_MISSING = object()


@pytest.mark.parametrize("bad", [-0.1, 0.0, float("nan"), float("inf"), "0.1", True, None, 1.0,
                                 pytest.param(_MISSING, id="missing")])
def test_a_ledger_with_a_bad_set_budget_is_refused_naming_file_and_set(tmp_path, bad):
    path = tmp_path / "ledger.json"
    ledger = SafetyLedger(path, 0.1)
    ledger.spend(PROMPTS, 0.05, "honest")
    ledger.spend(fingerprint(["another set"]), 0.05, "honest too")
    data = json.loads(path.read_text())
    record = data["sets"][fingerprint(PROMPTS)]
    if bad is _MISSING:
        del record["total_delta"]
    else:
        record["total_delta"] = bad
    path.write_text(json.dumps(data))  # allow_nan: NaN / Infinity as Python's json writes them
    for opener in (lambda: SafetyLedger(path, None), lambda: ledger.spend(fingerprint(["another set"]), 0.01, "x"),
                   lambda: ledger.check_spend(PROMPTS, 0.01), lambda: ledger.budget(PROMPTS)):
        with pytest.raises(ValueError) as error:
            opener()
        message = str(error.value)
        assert str(path) in message and fingerprint(PROMPTS) in message and "total_delta=" in message, message


def test_a_ledger_with_a_bad_spent_or_old_file_budget_is_refused(tmp_path):
    path = tmp_path / "ledger.json"
    SafetyLedger(path, 0.1).spend(PROMPTS, 0.05, "x")
    data = json.loads(path.read_text())
    key = fingerprint(PROMPTS)
    old = {"format": "hcrlhf-safety-ledger", "version": 2, "total_delta": 0.1,
           "sets": {key: {k: v for k, v in data["sets"][key].items() if k != "total_delta"}}}
    SafetyLedger(path, None)  # the untouched files are fine
    path.write_text(json.dumps(old))
    SafetyLedger(path, None)
    for base, edit, match in ((data, lambda d: d["sets"][key].update(spent="0.05"), "spent"),
                              (data, lambda d: d["sets"][key].update(prompt_digests=["0" * 64]), "digests"),
                              (data, lambda d: d.update(version=True), "unsupported version"),
                              (old, lambda d: d.update(total_delta=-1), "the file's total_delta"),
                              (old, lambda d: d.pop("total_delta"), "the file's total_delta"),
                              (old, lambda d: d.update(version=1, total_delta=float("nan")), "the file's total_delta")):
        edited = json.loads(json.dumps(base))
        edit(edited)
        path.write_text(json.dumps(edited))
        with pytest.raises(ValueError, match=match) as error:
            SafetyLedger(path, None)
        assert str(path) in str(error.value)


@pytest.mark.parametrize("version", [1, 2])
def test_an_old_ledger_gives_each_set_the_files_budget_and_is_written_back_as_version_3(tmp_path, version):
    path = tmp_path / "ledger.json"
    key, reused = fingerprint(PROMPTS), [f"an old set's prompt {i}" for i in range(8)]
    old_test = {"delta": 0.05, "label": "old", "time": "2024-01-01T00:00:00+00:00"}
    sets = {key: {"spent": 0.05, "tests": [old_test]},
            fingerprint(reused): {"spent": 0.02, "tests": [dict(old_test, delta=0.02, label="old, other set")]}}
    if version == 2:  # version 2 stores the digests the overlap rule needs
        sets[fingerprint(reused)]["prompt_digests"] = sorted(
            hashlib.sha256(p.encode()).hexdigest() for p in reused)
    path.write_text(json.dumps({"format": "hcrlhf-safety-ledger", "version": version, "total_delta": 0.1,
                                "sets": sets}))
    before = path.read_bytes()
    ledger = SafetyLedger(path, None)
    assert ledger.spent(PROMPTS) == pytest.approx(0.05) and ledger.budget(PROMPTS) == 0.1
    assert ledger.budget(reused) == 0.1 and ledger.remaining(reused) == pytest.approx(0.08)
    with pytest.raises(BudgetExceededError, match=r"total_delta=0\.1 .*old"):
        ledger.spend(PROMPTS, 0.1, "new")
    with pytest.raises(ValueError, match="cannot change after its first test"):
        SafetyLedger(path, 0.2).check_spend(PROMPTS, 0.01)
    assert path.read_bytes() == before  # reading converts nothing on disk
    ledger.spend(PROMPTS, 0.05, "new")
    data = json.loads(path.read_text())
    assert data["version"] == 3 and "total_delta" not in data
    assert [t["label"] for t in data["sets"][key]["tests"]] == ["old", "new"]
    assert len(data["sets"][key]["prompt_digests"]) == len(PROMPTS)
    # Every set keeps the file's budget, the one not spent on too; the file no longer fixes new sets' budgets.
    assert {k: r["total_delta"] for k, r in data["sets"].items()} == {key: 0.1, fingerprint(reused): 0.1}
    assert data["sets"][fingerprint(reused)]["tests"] == [dict(old_test, delta=0.02, label="old, other set")]
    SafetyLedger(path, 0.3).spend(["a new set"], 0.3, "a new set, budget 0.3 declared")
    assert SafetyLedger(path, None).budget(["a new set"]) == 0.3
    if version == 2:  # the old set's digests still guard against re-use
        from hcrlhf.safety import OverlappingSafetySetError

        with pytest.raises(OverlappingSafetySetError, match="old, other set"):
            ledger.check_spend(reused[1:], 0.01)


SET = [f"safety prompt number {i}" for i in range(20)]


def test_the_same_set_minus_one_prompt_is_refused_unless_declared_new(tmp_path):
    from hcrlhf.safety import OverlappingSafetySetError

    path = tmp_path / "ledger.json"
    ledger = SafetyLedger(path, 0.1)
    ledger.spend(SET, 0.1, "hcrlhf pipeline runs/a")
    smaller = SET[1:]
    assert fingerprint(smaller) != fingerprint(SET)
    before = path.read_bytes()
    for attempt in (lambda: ledger.check_spend(smaller, 0.1), lambda: ledger.spend(smaller, 0.1, "runs/b")):
        with pytest.raises(OverlappingSafetySetError) as error:
            attempt()
        message = str(error.value)
        assert "19 of its 19 prompts (100%)" in message and fingerprint(SET) in message
        assert "runs/a" in message and "allow_overlapping_set" in message and "--allow-overlapping-set" in message
    assert isinstance(error.value, BudgetExceededError) and path.read_bytes() == before
    # More than half old, a few new: still a re-use; so is a subset, and a superset with few new prompts.
    for reused in (SET[:10] + ["new 1", "new 2"], SET[:10], SET + [f"new {i}" for i in range(19)]):
        with pytest.raises(OverlappingSafetySetError):
            ledger.check_spend(reused, 0.1)
    # Under half: a new set (its budget is its own).
    assert ledger.check_spend(SET[:9] + [f"new {i}" for i in range(11)], 0.1) == 0.0
    # Declared new: allowed, and recorded in the entry.
    ledger.spend(smaller, 0.1, "runs/b", allow_overlapping_set=True)
    test = ledger.tests(smaller)[0]
    assert test["allow_overlapping_set"] is True
    assert test["overlaps"] == [{"set": fingerprint(SET), "shared_prompts": 19, "fraction": 1.0}]
    # Whitespace and Unicode variants are the same prompts (the fingerprint's canonical form).
    variants = ["  " + unicodedata.normalize("NFD", p).replace(" ", "\n") for p in SET[2:]]
    with pytest.raises(OverlappingSafetySetError):
        ledger.check_spend(variants, 0.1)


def test_overlap_rule_needs_the_prompts(tmp_path):
    ledger = SafetyLedger(tmp_path / "ledger.json", 0.1)
    ledger.spend(fingerprint(SET), 0.1, "by fingerprint only")  # no digests: the rule cannot see this set
    ledger.check_spend(SET[1:], 0.1)
    data = json.loads((tmp_path / "ledger.json").read_text())
    assert "prompt_digests" not in data["sets"][fingerprint(SET)]


_SPENDER = textwrap.dedent(
    """
    import sys
    from hcrlhf.safety import BudgetExceededError, SafetyLedger

    path, worker = sys.argv[1], int(sys.argv[2])
    ledgers = {"a": SafetyLedger(path, total_delta=0.1), "b": SafetyLedger(path, total_delta=0.05)}
    done = {"a": 0, "b": 0}
    for i in range(10):
        for name in ("a", "b") if worker % 2 else ("b", "a"):
            try:
                ledgers[name].spend([f"{name}: safety prompt {k}" for k in range(8)], 0.001,
                                    f"worker {worker} spend {i}")
                done[name] += 1
            except BudgetExceededError:
                pass
    print(done["a"], done["b"])
    """
)


def test_sixteen_processes_on_one_ledger_stay_exact(tmp_path):
    """16 processes × 10 spends of 0.001 on each of two sets in one file, set a with a budget of 0.1 and set b
    with 0.05: exactly 100 and 50 are recorded."""
    path = tmp_path / "ledger.json"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    children = [subprocess.Popen([sys.executable, "-c", _SPENDER, str(path), str(w)], stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, env=env) for w in range(16)]
    done = []
    for child in children:
        out, err = child.communicate(timeout=300)
        assert child.returncode == 0, err.decode()[-2000:]
        done.append([int(v) for v in out.split()])
    ledger = SafetyLedger(path, None)
    for index, (name, budget, count) in enumerate((("a", 0.1, 100), ("b", 0.05, 50))):
        prompts = [f"{name}: safety prompt {k}" for k in range(8)]
        tests = ledger.tests(prompts)
        assert sum(d[index] for d in done) == len(tests) == count
        assert ledger.spent(prompts) == pytest.approx(budget, abs=1e-12) and ledger.budget(prompts) == budget
        assert len({t["label"] for t in tests}) == count
