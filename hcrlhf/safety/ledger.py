"""Keeping the safety data honest: fingerprints, a disjointness check, and a δ ledger.

The rules (docs/method.md#the-δ-ledger): the safety set D_s is used once, by the safety test only; testing several
candidates on one D_s must split δ among them (Bonferroni). This module enforces both in code:

* :func:`fingerprint` — a stable, order-independent hash of a prompt set, recorded with the split;
  :func:`canonical_prompt` — the one normal form of a prompt text behind it (and behind every
  "same prompt" comparison of the package).
* :func:`assert_disjoint` — the training side refuses prompts of the safety set.
* :class:`SafetyLedger` — a JSON file recording every test run on each safety set; a test whose δ
  would take the set's total past ``total_delta`` is refused. By the union bound the probability
  that *any* recorded test on a set wrongly passes an unsafe model is then ≤ total_delta.
"""

from __future__ import annotations

import contextlib
import datetime
import glob
import hashlib
import json
import math
import os
import re
import tempfile
import unicodedata
from collections.abc import Iterable
from pathlib import Path

from hcrlhf.safety._checks import check_delta

__all__ = ["fingerprint", "canonical_prompt", "assert_disjoint", "SafetyLedger", "BudgetExceededError", "LEDGER_FORMAT"]

LEDGER_FORMAT = "hcrlhf-safety-ledger"
LEDGER_VERSION = 1
_FINGERPRINT = re.compile(r"^sha256:[0-9a-f]{64}$")
# Spends are sums of floats: allow this much round-off before calling a spend an overspend.
_SPEND_TOLERANCE = 1e-12


class BudgetExceededError(ValueError):
    """A spend would take a safety set's total δ past the ledger's ``total_delta``."""


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


def fingerprint(prompts) -> str:
    """``"sha256:<64 hex>"``: a stable hash of a set of prompt texts.

    Order-independent (the hash of the sorted per-prompt SHA-256 digests, each prompt taken in
    Unicode NFC with whitespace runs collapsed), duplicates counted. The same prompts give the same
    fingerprint on any machine and Python version.
    """
    texts = _prompt_list("fingerprint", "prompts", prompts)
    digests = sorted(_prompt_digest(text) for text in texts)
    combined = hashlib.sha256(f"hcrlhf-prompts-v1:{len(digests)}:".encode())
    for digest in digests:
        combined.update(digest.encode("ascii"))
    return "sha256:" + combined.hexdigest()


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
    """A JSON file recording the δ spent on each safety set.

    ``SafetyLedger(path, total_delta)`` opens ``path`` (creating it on the first spend) with a
    per-safety-set budget ``total_delta``; reopening an existing ledger with a different budget is
    refused (pass ``total_delta=None`` to take the file's). ``spend(fingerprint, delta, label)``
    records one test; if the set's spent δ plus ``delta`` would exceed ``total_delta`` it raises
    :class:`BudgetExceededError` and records nothing. Every spend re-reads the file under a lock,
    so several processes may share one ledger (POSIX: an advisory lock on ``<path>.lock``); every
    write is atomic, and temp files left by a writer killed mid-write are removed by the next spend.

    File layout::

        {"format": "hcrlhf-safety-ledger", "version": 1, "total_delta": 0.1,
         "sets": {"sha256:…": {"spent": 0.05,
                                "tests": [{"delta": 0.05, "label": "…", "time": "2025-…Z"}]}}}
    """

    def __init__(self, path, total_delta: float | None):
        self.path = Path(path)
        if total_delta is not None:
            total_delta = check_delta("SafetyLedger", total_delta, "total_delta")
        data = self._read()
        if data is None:
            if total_delta is None:
                raise ValueError(f"SafetyLedger: total_delta is required to create a new ledger at {self.path}")
        elif total_delta is None:
            total_delta = data["total_delta"]
        elif not math.isclose(data["total_delta"], total_delta, rel_tol=0.0, abs_tol=_SPEND_TOLERANCE):
            raise ValueError(
                f"SafetyLedger: total_delta={total_delta} differs from the ledger's recorded {data['total_delta']} "
                f"at {self.path}; a safety budget cannot be changed after the fact"
            )
        self.total_delta = float(total_delta)

    # -- reading ---------------------------------------------------------------------------

    def _read(self) -> dict | None:
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return None
        try:
            data = json.loads(text)
        except json.JSONDecodeError as error:
            raise ValueError(f"SafetyLedger: {self.path} is not valid JSON ({error})") from None
        self._validate(data)
        return data

    def _validate(self, data) -> None:
        where = f"SafetyLedger: {self.path}"
        if not isinstance(data, dict) or data.get("format") != LEDGER_FORMAT:
            raise ValueError(f"{where} is not an hcrlhf safety ledger")
        if data.get("version") != LEDGER_VERSION:
            raise ValueError(f"{where} has unsupported version {data.get('version')!r}")
        check_delta(where, data.get("total_delta"), "total_delta")
        sets = data.get("sets")
        if not isinstance(sets, dict):
            raise ValueError(f"{where}: 'sets' must be an object")
        for key, record in sets.items():
            _check_fingerprint(where, key)
            try:
                deltas = [float(test["delta"]) for test in record["tests"]]
                spent = float(record["spent"])
            except (KeyError, TypeError, ValueError):
                raise ValueError(f"{where}: set {key} is malformed") from None
            if not math.isclose(math.fsum(deltas), spent, rel_tol=0.0, abs_tol=_SPEND_TOLERANCE):
                raise ValueError(f"{where}: set {key} records spent={spent} but its tests sum to {math.fsum(deltas)}")

    def _data(self) -> dict:
        data = self._read()
        if data is None:
            data = {"format": LEDGER_FORMAT, "version": LEDGER_VERSION, "total_delta": self.total_delta, "sets": {}}
        return data

    def spent(self, fingerprint: str) -> float:
        """δ already spent on the set (0 if never tested)."""
        _check_fingerprint("SafetyLedger.spent", fingerprint)
        record = self._data()["sets"].get(fingerprint)
        return 0.0 if record is None else float(record["spent"])

    def remaining(self, fingerprint: str) -> float:
        """δ still available to the set."""
        return max(0.0, self.total_delta - self.spent(fingerprint))

    def tests(self, fingerprint: str) -> list[dict]:
        """The recorded tests on the set, oldest first (copies)."""
        _check_fingerprint("SafetyLedger.tests", fingerprint)
        record = self._data()["sets"].get(fingerprint)
        return [] if record is None else [dict(test) for test in record["tests"]]

    # -- spending --------------------------------------------------------------------------

    def spend(self, fingerprint: str, delta: float, label: str) -> float:
        """Record a test with failure probability ``delta`` on the set; returns the set's new total.

        Raises :class:`BudgetExceededError` (a ``ValueError``) and records nothing if the total
        would pass ``total_delta``.
        """
        fn = "SafetyLedger.spend"
        _check_fingerprint(fn, fingerprint)
        delta = check_delta(fn, delta)
        if not isinstance(label, str):
            raise TypeError(f"{fn}: label must be a str, got {type(label).__name__}")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with _locked(self.path):
            _remove_stale_temp_files(self.path)
            data = self._data()
            record = data["sets"].setdefault(fingerprint, {"spent": 0.0, "tests": []})
            deltas = [test["delta"] for test in record["tests"]] + [delta]
            total = math.fsum(deltas)
            if total > self.total_delta + _SPEND_TOLERANCE:
                raise BudgetExceededError(
                    f"{fn}: spending delta={delta} on safety set {fingerprint} would bring its total to {total:.6g} "
                    f"> total_delta={self.total_delta} (already spent {record['spent']:.6g} in "
                    f"{len(record['tests'])} test(s)); use a fresh safety set or a smaller delta"
                )
            record["tests"].append(
                {
                    "delta": delta,
                    "label": label,
                    "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="microseconds"),
                }
            )
            record["spent"] = total
            _atomic_write_json(self.path, data)
        return total

    def __repr__(self) -> str:
        return f"SafetyLedger({str(self.path)!r}, total_delta={self.total_delta})"
