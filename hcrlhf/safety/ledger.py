"""Keeping the safety data honest: fingerprints, a disjointness check, and a δ ledger.

The rules (docs/method.md#the-δ-ledger): the safety set D_s is used once, by the safety test only; testing several
candidates on one D_s must split δ among them (Bonferroni). This module enforces both in code:

* :func:`fingerprint` — a stable, order-independent hash of a prompt set, recorded with the split;
  :func:`canonical_prompt` — the one normal form of a prompt text behind it (and behind every
  "same prompt" comparison of the package).
* :func:`assert_disjoint` — the training side refuses prompts of the safety set.
* :class:`SafetyLedger` — a JSON file recording every test run on each safety set and the set's own
  budget ``total_delta``, fixed when the set is first tested (the budget declared by the caller, else
  the δ of that first test) and never changed after; a test whose δ would take the set's total past
  its budget is refused, and so is a new set that re-uses most of an earlier one (:data:`OVERLAP_LIMIT`)
  unless it is declared new. By the union bound the probability that *any* recorded test on a set
  wrongly passes an unsafe model is then ≤ that set's total_delta. One file holds sets with different
  budgets (the per-user default ledger holds every set a user tests).
* :func:`default_ledger_path` — the one per-user ledger every run uses unless told otherwise
  (``$HCRLHF_STATE_DIR``, else ``$XDG_STATE_HOME/hcrlhf``, else ``~/.local/state/hcrlhf``; file
  ``safety_ledger.json``), so that new output folders, moved runs and re-runs share one record;
  :func:`open_ledger` opens a ledger the way the pipeline and ``hcrlhf safety-test`` do.
* :func:`distinct_prompts` — drops copies of a prompt (same :func:`canonical_prompt`), so that n counts
  each safety prompt once.
"""

from __future__ import annotations

import contextlib
import datetime
import glob
import hashlib
import json
import math
import numbers
import os
import re
import tempfile
import unicodedata
from collections.abc import Iterable
from pathlib import Path

from hcrlhf.safety._checks import check_delta

__all__ = ["fingerprint", "canonical_prompt", "distinct_prompts", "assert_disjoint", "SafetyLedger",
           "BudgetExceededError", "OverlappingSafetySetError", "LEDGER_FORMAT", "OVERLAP_LIMIT", "STATE_DIR_ENV",
           "state_dir", "default_ledger_path", "open_ledger"]

LEDGER_FORMAT = "hcrlhf-safety-ledger"
# Version 2 added the per-set "prompt_digests" (for the overlap rule) and validates every delta. Version 3
# moves the budget from the file to each set ("total_delta" per set, none for the file). Version 1 and 2
# files are read — each of their sets gets the file's total_delta as its budget (version 1 sets have no
# digests) — and written back as version 3 on the next spend.
LEDGER_VERSION = 3
_READABLE_VERSIONS = (1, 2, 3)
#: Environment variable naming hcrlhf's per-user state directory (where the default ledger lives).
STATE_DIR_ENV = "HCRLHF_STATE_DIR"
LEDGER_FILE_NAME = "safety_ledger.json"
#: A safety set new to a ledger that shares at least this fraction of its distinct prompts with one
#: earlier set of the ledger is refused unless declared new (``allow_overlapping_set``).
OVERLAP_LIMIT = 0.5
_DIGEST = re.compile(r"^[0-9a-f]{64}$")
_FINGERPRINT = re.compile(r"^sha256:[0-9a-f]{64}$")
# Spends are sums of floats: allow this much round-off before calling a spend an overspend.
_SPEND_TOLERANCE = 1e-12


class BudgetExceededError(ValueError):
    """A spend would take a safety set's total δ past the set's budget ``total_delta``."""


class OverlappingSafetySetError(BudgetExceededError):
    """A safety set new to the ledger re-uses at least :data:`OVERLAP_LIMIT` of an earlier set's prompts
    (and was not declared new): it would get a fresh δ for data already tested."""


def state_dir() -> Path:
    """hcrlhf's per-user state directory: ``$HCRLHF_STATE_DIR`` if set, else ``$XDG_STATE_HOME/hcrlhf``
    (when that is an absolute path, as the XDG spec asks), else ``~/.local/state/hcrlhf``."""
    value = os.environ.get(STATE_DIR_ENV)
    if value:
        return Path(value).expanduser().absolute()
    xdg = os.environ.get("XDG_STATE_HOME")
    if xdg and os.path.isabs(xdg):
        return Path(xdg) / "hcrlhf"
    return Path("~/.local/state/hcrlhf").expanduser()


def default_ledger_path() -> Path:
    """The default δ ledger, one per user: ``state_dir() / "safety_ledger.json"``.

    Keyed by the safety set's fingerprint, it makes a safety set's budget follow the *data*, not the
    output folder: a re-run, a new output folder or a moved run directory cannot test a set again.
    """
    return state_dir() / LEDGER_FILE_NAME


def open_ledger(path=None, total_delta: float | None = None, *, delta: float) -> SafetyLedger:
    """The ledger a safety test of ``delta`` spends in, opened as the pipeline and ``hcrlhf safety-test`` do.

    Args:
        path: the ledger file (None: :func:`default_ledger_path`).
        total_delta: the budget of the safety set tested (``safety.ledger_total_delta``, ``hcrlhf safety-test
            --ledger-total-delta``; None: the set's own). It is fixed for a set new to the ledger; for a set
            already tested, a budget that differs from the one recorded with it is refused when the test is
            checked or spent (a set's budget cannot change after its first test).
        delta: the test's δ: the budget of a set new to the ledger when ``total_delta`` is None.

    The file's other sets keep their own budgets: opening it checks no budget.
    """
    check_delta("open_ledger", delta)
    path = default_ledger_path() if path is None else Path(path).expanduser()
    return SafetyLedger(path, total_delta)


def canonical_prompt(text: str) -> str:
    """The canonical form of a prompt text: Unicode NFC, whitespace runs collapsed to one space, stripped.

    Two texts are "the same prompt" (for :func:`fingerprint`, :func:`assert_disjoint`, the split and the
    removal of safety-set rows from training data) iff their canonical forms are equal. NFC so that the same
    text typed or decoded differently hashes alike; whitespace collapsed so that a re-wrapped copy of a
    safety prompt still counts as the same prompt. Case is kept. Changing this changes every fingerprint
    (and so every existing ledger's keys).
    """
    return " ".join(unicodedata.normalize("NFC", text).split())


def _prompt_list(fn: str, name: str, prompts) -> list[str]:
    if isinstance(prompts, (str, bytes)):
        raise TypeError(f"{fn}: {name} must be a collection of prompt strings, not a single {type(prompts).__name__}")
    if not isinstance(prompts, Iterable):
        raise TypeError(f"{fn}: {name} must be a collection of prompt strings, got {type(prompts).__name__}")
    texts = list(prompts)
    for index, text in enumerate(texts):
        if not isinstance(text, str):
            raise TypeError(f"{fn}: {name}[{index}] must be a str, got {type(text).__name__}")
    if not texts:
        raise ValueError(f"{fn}: {name} must not be empty")
    return texts


def _prompt_digest(text: str) -> str:
    return hashlib.sha256(canonical_prompt(text).encode("utf-8")).hexdigest()


def _fingerprint_of_digests(digests: list[str]) -> str:
    combined = hashlib.sha256(f"hcrlhf-prompts-v1:{len(digests)}:".encode())
    for digest in sorted(digests):
        combined.update(digest.encode("ascii"))
    return "sha256:" + combined.hexdigest()


def distinct_prompts(prompts, categories=None) -> tuple[list[str], list | None, int]:
    """``(prompts, categories, n_dropped)``: the first copy of each prompt, in input order.

    Two texts are copies iff their :func:`canonical_prompt` forms are equal (the rule behind
    :func:`fingerprint`). ``categories`` (aligned with ``prompts``, or None) keep the first copy's entry.
    A safety test must see each prompt once: a copy adds nothing to the evidence but would count
    in n and so narrow the confidence bound.
    """
    texts = _prompt_list("distinct_prompts", "prompts", prompts)
    if categories is not None:
        categories = list(categories)
        if len(categories) != len(texts):
            raise ValueError(f"distinct_prompts: categories must have one entry per prompt ({len(texts)}), "
                             f"got {len(categories)}")
    seen: set[str] = set()
    keep = []
    for index, text in enumerate(texts):
        key = canonical_prompt(text)
        if key not in seen:
            seen.add(key)
            keep.append(index)
    return ([texts[i] for i in keep], None if categories is None else [categories[i] for i in keep],
            len(texts) - len(keep))


def fingerprint(prompts) -> str:
    """``"sha256:<64 hex>"``: a stable hash of a set of prompt texts.

    Order-independent (the hash of the sorted per-prompt SHA-256 digests, each prompt taken in
    Unicode NFC with whitespace runs collapsed), duplicates counted. The same prompts give the same
    fingerprint on any machine and Python version.
    """
    texts = _prompt_list("fingerprint", "prompts", prompts)
    return _fingerprint_of_digests([_prompt_digest(text) for text in texts])


def _check_fingerprint(fn: str, value) -> str:
    if not isinstance(value, str) or not _FINGERPRINT.match(value):
        raise ValueError(
            f"{fn}: fingerprint must be a string 'sha256:<64 hex digits>' from fingerprint(), got {value!r}"
        )
    return value


def assert_disjoint(train_prompts, safety_fingerprint_or_prompts) -> None:
    """Raise ``ValueError`` if training would read the safety set.

    Args:
        train_prompts: the prompts the training side is about to use.
        safety_fingerprint_or_prompts: the safety set's prompt texts (checked element by element:
            no training prompt may equal a safety prompt up to NFC/whitespace), or its
            :func:`fingerprint` (then only checked to not be the training set itself — a set hash
            cannot reveal individual members, so pass the prompts where they are at hand).
    """
    fn = "assert_disjoint"
    train = _prompt_list(fn, "train_prompts", train_prompts)
    safety = safety_fingerprint_or_prompts
    if isinstance(safety, str):
        _check_fingerprint(fn, safety)
        if fingerprint(train) == safety:
            raise ValueError(f"{fn}: train_prompts are the safety set itself (fingerprint {safety})")
        return
    safety_texts = _prompt_list(fn, "safety_fingerprint_or_prompts", safety)
    safety_digests = {_prompt_digest(text) for text in safety_texts}
    leaked = [index for index, text in enumerate(train) if _prompt_digest(text) in safety_digests]
    if leaked:
        examples = ", ".join(f"#{i}: {train[i][:60]!r}" for i in leaked[:3])
        raise ValueError(
            f"{fn}: {len(leaked)} of {len(train)} train_prompts belong to the safety set (e.g. {examples}); "
            "nothing in training may read the safety data"
        )


def _fsync_directory(directory: Path) -> None:
    with contextlib.suppress(OSError):  # some filesystems/OSes cannot open or fsync a directory
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _atomic_write_json(path: Path, data: dict) -> None:
    """Write ``data`` so that ``path`` holds either the old or the new JSON, never a mix.

    Temp file in the same directory (so the rename stays on one filesystem) → flush → fsync →
    os.replace (atomic on POSIX and Windows) → fsync the directory (so the rename itself survives a
    power cut).
    """
    text = json.dumps(data, indent=2, sort_keys=True, allow_nan=False) + "\n"
    try:
        mode = path.stat().st_mode & 0o777  # keep the ledger's permissions
    except FileNotFoundError:
        mode = 0o644  # mkstemp's 0600 would hide the ledger from co-workers
    fd, temp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with contextlib.suppress(OSError):
            os.chmod(temp_name, mode)
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp_name, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temp_name)
        raise
    _fsync_directory(path.parent)


def _remove_stale_temp_files(path: Path) -> None:
    """Delete temp files left by writers that died mid-write (call only while holding the lock:
    a live writer holds it for as long as its temp file exists)."""
    for stale in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
        with contextlib.suppress(OSError):
            stale.unlink()


@contextlib.contextmanager
def _locked(path: Path):
    """Exclusive advisory lock (POSIX flock on ``<path>.lock``) around a read-modify-write."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows: single-writer use only
        yield
        return
    with open(path.with_name(path.name + ".lock"), "a") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock.fileno(), fcntl.LOCK_UN)


class SafetyLedger:
    """A JSON file recording, per safety set, its budget and the δ spent on it.

    ``SafetyLedger(path, total_delta)`` opens ``path`` (creating it on the first spend); the file is read and
    validated now, but no budget is compared: one file (by default the per-user one) holds sets with
    different budgets. ``total_delta`` is the budget the caller declares for the safety set it tests
    (None: the set's own). Each set's budget is fixed when the set is first recorded — the declared
    ``total_delta``, else the δ of its first test — and never changes: a declared budget that differs from
    a set's recorded one is refused (``ValueError``) when that set is checked or spent on.

    ``spend(safety_set, delta, label)`` records one test; it raises :class:`BudgetExceededError` and records
    nothing if the set's spent δ plus ``delta`` would exceed **the set's** budget (re-read from the file
    under the lock: an object opened before another process recorded the set never spends against a stale
    or a declared budget), and :class:`OverlappingSafetySetError` if the set is new to the ledger but shares
    at least :data:`OVERLAP_LIMIT` of its distinct prompts with an earlier set, unless
    ``allow_overlapping_set`` declares it new (recorded with the test). :meth:`check_spend` asks the same
    without recording. Several processes may share one ledger (POSIX: an advisory lock on
    ``<path>.lock``); every write is atomic, and temp files left by a writer killed mid-write are removed
    by the next spend.

    A ledger that was edited into breaking its rules is refused as a whole, naming the file, the set and
    the entry: every test's ``delta`` and every set's ``total_delta`` must be a number in (0, 1) (a
    negative, zero or non-finite delta would give budget back), each set's ``spent`` must be the sum of its
    tests' deltas, and a set's ``prompt_digests`` must hash to its fingerprint.

    File layout, version 3 (``prompt_digests``: the sorted SHA-256 digests of the set's canonical prompts,
    the input of its fingerprint; absent for sets spent on by fingerprint only, which the overlap rule
    cannot see)::

        {"format": "hcrlhf-safety-ledger", "version": 3,
         "sets": {"sha256:…": {"total_delta": 0.1, "spent": 0.05, "prompt_digests": ["…", …],
                                "tests": [{"delta": 0.05, "label": "…", "time": "2025-…Z"}]}}}

    A test on a set declared new despite an overlap also records ``"allow_overlapping_set": true`` and
    ``"overlaps": [{"set": "sha256:…", "shared_prompts": k, "fraction": f}]``. Version 1 and 2 files (one
    ``total_delta`` for the whole file, none per set) are read with the file's budget as each set's, and
    written back as version 3 by the next spend.
    """

    def __init__(self, path, total_delta: float | None = None):
        self.path = Path(path).expanduser()
        if self.path.is_dir():
            raise ValueError(f"SafetyLedger: {self.path} is a directory; the ledger is one JSON file "
                             f"(e.g. {self.path / LEDGER_FILE_NAME})")
        for parent in self.path.parents:
            if parent.exists() and not parent.is_dir():
                raise ValueError(f"SafetyLedger: {self.path} cannot be a file: {parent} is a file, not a directory"
                                 + (f" (${STATE_DIR_ENV} must name a directory)" if parent == state_dir() else ""))
        #: The budget declared for the set tested (None: each set's own); see :meth:`budget`.
        self.total_delta = None if total_delta is None else check_delta("SafetyLedger", total_delta, "total_delta")
        self._read()  # refuse an invalid file now, before any work

    # -- reading ---------------------------------------------------------------------------

    def _read(self) -> dict | None:
        """The file's data, validated, in the current version's layout (older versions converted);
        None if there is no file."""
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return None
        try:
            data = json.loads(text)
        except json.JSONDecodeError as error:
            raise ValueError(f"SafetyLedger: {self.path} is not valid JSON ({error})") from None
        self._validate(data)
        if data["version"] < 3:  # the file's budget becomes each set's
            file_budget = float(data.pop("total_delta"))
            for record in data["sets"].values():
                record["total_delta"] = file_budget
            data["version"] = LEDGER_VERSION
        return data

    def _validate(self, data) -> None:
        where = f"SafetyLedger: {self.path}"
        if not isinstance(data, dict) or data.get("format") != LEDGER_FORMAT:
            raise ValueError(f"{where} is not an hcrlhf safety ledger")
        version = data.get("version")
        if isinstance(version, bool) or version not in _READABLE_VERSIONS:
            raise ValueError(f"{where} has unsupported version {version!r}")
        if version < 3:  # one budget for the whole file
            total = data.get("total_delta")
            if not _is_delta(total):
                raise ValueError(f"{where} (version {version}): the file's total_delta must be a number in the open "
                                 f"interval (0, 1), got {total!r}")
        sets = data.get("sets")
        if not isinstance(sets, dict):
            raise ValueError(f"{where}: 'sets' must be an object")
        for key, record in sets.items():
            _check_fingerprint(where, key)
            if not isinstance(record, dict) or not isinstance(record.get("tests"), list):
                raise ValueError(f"{where}: set {key} is malformed (it needs 'spent' and a list of 'tests')")
            if version >= 3:
                budget = record.get("total_delta")
                if not _is_delta(budget):
                    raise ValueError(
                        f"{where}: set {key} has total_delta={budget!r}; a set's budget must be a number in the "
                        "open interval (0, 1) (a missing, negative, zero, non-finite or non-numeric budget is "
                        "refused), so the ledger is refused"
                    )
            for index, test in enumerate(record["tests"]):
                entry = f"{where}: set {key}, test #{index + 1}"
                if not isinstance(test, dict) or "delta" not in test:
                    raise ValueError(f"{entry} is malformed (each test needs a 'delta')")
                if not _is_delta(test["delta"]):
                    raise ValueError(
                        f"{entry} (label {test.get('label')!r}, time {test.get('time')!r}) has delta "
                        f"{test['delta']!r}; every delta must be a number in the open interval (0, 1): a negative, "
                        "zero, non-finite or non-numeric delta would give budget back, so the ledger is refused"
                    )
            spent = record.get("spent")
            if isinstance(spent, bool) or not isinstance(spent, numbers.Real) or not math.isfinite(spent):
                raise ValueError(f"{where}: set {key} has spent={spent!r}, which is not a finite number")
            deltas = [float(test["delta"]) for test in record["tests"]]
            if not math.isclose(math.fsum(deltas), spent, rel_tol=0.0, abs_tol=_SPEND_TOLERANCE):
                raise ValueError(f"{where}: set {key} records spent={spent} but its tests sum to {math.fsum(deltas)}")
            digests = record.get("prompt_digests")
            if digests is not None:
                if not isinstance(digests, list) or not digests or not all(
                        isinstance(d, str) and _DIGEST.match(d) for d in digests):
                    raise ValueError(f"{where}: set {key} has malformed prompt_digests")
                if _fingerprint_of_digests(digests) != key:
                    raise ValueError(f"{where}: set {key}'s prompt_digests do not hash to its fingerprint")

    def _data(self) -> dict:
        data = self._read()
        if data is None:
            data = {"format": LEDGER_FORMAT, "version": LEDGER_VERSION, "sets": {}}
        return data

    def _resolve(self, fn: str, safety_set) -> tuple[str, list[str] | None]:
        """(fingerprint, sorted prompt digests or None) of a fingerprint or a collection of prompts."""
        if isinstance(safety_set, str):
            return _check_fingerprint(fn, safety_set), None
        texts = _prompt_list(fn, "safety_set", safety_set)
        digests = sorted(_prompt_digest(text) for text in texts)
        return _fingerprint_of_digests(digests), digests

    def spent(self, safety_set) -> float:
        """δ already spent on the set (its fingerprint or its prompts; 0 if never tested)."""
        key, _ = self._resolve("SafetyLedger.spent", safety_set)
        record = self._data()["sets"].get(key)
        return 0.0 if record is None else float(record["spent"])

    def budget(self, safety_set, delta: float | None = None) -> float | None:
        """The set's budget: the one recorded with it; for a set new to the ledger, the budget its first test
        would fix — the declared ``total_delta``, else ``delta`` (that test's δ), else None (not fixed yet)."""
        key, _ = self._resolve("SafetyLedger.budget", safety_set)
        record = self._data()["sets"].get(key)
        if record is not None:
            return float(record["total_delta"])
        if self.total_delta is not None:
            return self.total_delta
        return None if delta is None else check_delta("SafetyLedger.budget", delta)

    def remaining(self, safety_set) -> float | None:
        """δ still available to the set, against its budget (:meth:`budget`; None for a set new to the ledger
        without a declared budget: its first test fixes the budget)."""
        key, _ = self._resolve("SafetyLedger.remaining", safety_set)
        record = self._data()["sets"].get(key)
        if record is None:
            return self.total_delta
        return max(0.0, float(record["total_delta"]) - float(record["spent"]))

    def tests(self, safety_set) -> list[dict]:
        """The recorded tests on the set, oldest first (copies)."""
        key, _ = self._resolve("SafetyLedger.tests", safety_set)
        record = self._data()["sets"].get(key)
        return [] if record is None else [dict(test) for test in record["tests"]]

    # -- spending --------------------------------------------------------------------------

    def _check(self, fn: str, data: dict, key: str, digests, delta: float, allow_overlapping_set: bool):
        """Raise if ``delta`` may not be spent on the set; else return (its new total, its budget, the overlaps
        found). ``data`` is the file as just read: the set's recorded budget is the one that counts."""
        record = data["sets"].get(key)
        if record is None:  # new to the ledger: this test fixes its budget
            budget = delta if self.total_delta is None else self.total_delta
        else:
            budget = float(record["total_delta"])
            if self.total_delta is not None and not math.isclose(self.total_delta, budget, rel_tol=0.0,
                                                                 abs_tol=_SPEND_TOLERANCE):
                raise ValueError(self._budget_change_message(fn, key, record))
        tests = [] if record is None else record["tests"]
        total = math.fsum([float(test["delta"]) for test in tests] + [delta])
        if total > budget + _SPEND_TOLERANCE:
            raise BudgetExceededError(self._budget_message(fn, key, record, digests, delta, total, budget))
        overlaps = []
        if record is None and digests is not None:  # new to the ledger: does it re-use an earlier set?
            mine = set(digests)
            for other, other_record in data["sets"].items():
                theirs = other_record.get("prompt_digests")
                if not theirs:
                    continue
                shared = len(mine.intersection(theirs))
                if shared and shared / len(mine) >= OVERLAP_LIMIT:
                    overlaps.append({"set": other, "shared_prompts": shared, "fraction": round(shared / len(mine), 6)})
            if overlaps and not allow_overlapping_set:
                raise OverlappingSafetySetError(self._overlap_message(fn, key, len(mine), overlaps, data))
        return total, budget, overlaps

    def check_spend(self, safety_set, delta: float, *, allow_overlapping_set: bool = False) -> float:
        """Would :meth:`spend` of ``delta`` on the set be allowed now? Raises exactly as :meth:`spend` would
        (:class:`BudgetExceededError`, :class:`OverlappingSafetySetError`, ``ValueError`` for a declared budget
        that differs from the set's) and records nothing; returns the δ already spent on the set. For refusing
        *before* hours of work; the spend itself checks again."""
        fn = "SafetyLedger.check_spend"
        key, digests = self._resolve(fn, safety_set)
        delta = check_delta(fn, delta)
        data = self._data()
        self._check(fn, data, key, digests, delta, allow_overlapping_set)
        record = data["sets"].get(key)
        return 0.0 if record is None else float(record["spent"])

    def spend(self, safety_set, delta: float, label: str, *, allow_overlapping_set: bool = False) -> float:
        """Record a test with failure probability ``delta`` on the set; returns the set's new total.

        Args:
            safety_set: the set's prompts (then the overlap rule applies and their digests are stored) or
                its :func:`fingerprint` (then the overlap rule cannot be applied).
            delta: the test's δ.
            label: a note for the entry (who tested, where).
            allow_overlapping_set: declare a set that shares at least :data:`OVERLAP_LIMIT` of its prompts
                with an earlier set of the ledger a new sample (recorded with the test).

        A set new to the ledger is recorded with its budget: the declared ``total_delta``, else ``delta``.
        Raises :class:`BudgetExceededError` (a ``ValueError``) and records nothing if the total would pass the
        set's budget; :class:`OverlappingSafetySetError` (a :class:`BudgetExceededError`) if the set re-uses an
        earlier one and is not declared new; ``ValueError`` if the declared ``total_delta`` differs from the
        budget recorded with the set.
        """
        fn = "SafetyLedger.spend"
        key, digests = self._resolve(fn, safety_set)
        delta = check_delta(fn, delta)
        if not isinstance(label, str):
            raise TypeError(f"{fn}: label must be a str, got {type(label).__name__}")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with _locked(self.path):
            _remove_stale_temp_files(self.path)
            data = self._data()  # re-read under the lock: the set's budget and spends, never a stale copy
            total, budget, overlaps = self._check(fn, data, key, digests, delta, allow_overlapping_set)
            record = data["sets"].setdefault(key, {"total_delta": budget, "spent": 0.0, "tests": []})
            if digests is not None and "prompt_digests" not in record:
                record["prompt_digests"] = digests
            test = {
                "delta": delta,
                "label": label,
                "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="microseconds"),
            }
            if allow_overlapping_set:
                test["allow_overlapping_set"] = True
            if overlaps:
                test["overlaps"] = overlaps
            record["tests"].append(test)
            record["spent"] = total
            data["version"] = LEDGER_VERSION
            _atomic_write_json(self.path, data)
        return total

    # -- messages --------------------------------------------------------------------------

    @staticmethod
    def _history(tests: list[dict], limit: int = 3) -> str:
        shown = [f"δ={float(t['delta']):g} at {t.get('time', '?')} by {t.get('label', '?')!r}" for t in tests[-limit:]]
        more = f"{len(tests) - limit} earlier test(s), then " if len(tests) > limit else ""
        return more + "; ".join(shown)

    def _budget_message(self, fn, key, record, digests, delta, total, budget) -> str:
        tests = [] if record is None else record["tests"]
        stored = None if record is None else record.get("prompt_digests")
        n = len(set(stored or digests or []))
        size = f" ({n} prompts)" if n else ""
        if tests:
            history = (f"it has already spent δ={float(record['spent']):.6g} of its budget total_delta={budget:g} "
                       f"(the set's own, fixed by its first test) in {len(tests)} test(s): {self._history(tests)}")
        elif record is not None:
            history = f"its budget is total_delta={budget:g} (the set's own)"
        else:
            history = (f"the budget declared for it is total_delta={budget:g} (safety.ledger_total_delta, "
                       "hcrlhf safety-test --ledger-total-delta)")
        return (
            f"{fn}: refused before spending: safety set {key}{size} cannot take a test of delta={delta:g}: {history}; "
            f"this test would bring its total to {total:.6g}. Each safety set is tested once, or δ is split across "
            "its tests, so a re-run, a new output folder or a moved run directory cannot test it again. Use a fresh "
            "safety set: `hcrlhf demo --seed N` re-draws the built-in split (data.split_seed / data.seed for your "
            "own data), or new held-out prompts; or a smaller delta, if budget is left. Pointing safety.ledger "
            "(hcrlhf safety-test --ledger) at another file starts a separate budget for the same data: that is "
            f"your explicit decision, recorded in the run's config. Ledger: {self.path}"
        )

    def _budget_change_message(self, fn, key, record) -> str:
        budget = float(record["total_delta"])
        first = record["tests"][0] if record["tests"] else {}
        return (
            f"{fn}: refused before spending: total_delta={self.total_delta:g} was declared, but safety set {key} "
            f"has the budget total_delta={budget:g} recorded with it (fixed by its first test, at "
            f"{first.get('time', '?')} by {first.get('label', '?')!r}; spent so far δ={float(record['spent']):.6g}). "
            "A safety set's budget cannot change after its first test (the guarantee of the tests already run "
            "on it is stated with that budget). Leave the budget unset (safety.ledger_total_delta: null, no "
            f"--ledger-total-delta) to use the set's own, or declare {budget:g}. Ledger: {self.path}"
        )

    def _overlap_message(self, fn, key, n, overlaps, data) -> str:
        parts = []
        for overlap in sorted(overlaps, key=lambda o: -o["fraction"])[:3]:
            other = data["sets"][overlap["set"]]
            parts.append(f"{overlap['shared_prompts']} of its {n} prompts ({overlap['fraction']:.0%}) are in "
                         f"safety set {overlap['set']} ({len(set(other['prompt_digests']))} prompts; spent δ="
                         f"{float(other['spent']):.6g}: {self._history(other['tests'], 2)})")
        return (
            f"{fn}: refused before spending: safety set {key} is new to the ledger, but "
            + "; ".join(parts)
            + f". A set sharing {OVERLAP_LIMIT:.0%} or more of its prompts with an earlier one would get a fresh δ "
            "for data already tested. Use fresh held-out prompts (e.g. `hcrlhf demo --seed N` re-draws the split); "
            "or, if these prompts truly are a new sample, declare the set new with safety.allow_overlapping_set: "
            "true (hcrlhf safety-test --allow-overlapping-set) — the declaration is recorded in the ledger. "
            f"Ledger: {self.path}"
        )

    def __repr__(self) -> str:
        return f"SafetyLedger({str(self.path)!r}, total_delta={self.total_delta})"


def _is_delta(value) -> bool:
    return (not isinstance(value, bool) and isinstance(value, numbers.Real) and math.isfinite(value)
            and 0.0 < float(value) < 1.0)
