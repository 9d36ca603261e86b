"""Loading and validating preference pairs in the PKU-SafeRLHF schema (docs/method.md#reward-and-cost-models).

Each row: ``prompt``, ``response_0``, ``response_1`` (non-empty strings), ``better_response_id`` and
``safer_response_id`` (0 or 1), ``is_response_0_safe`` and ``is_response_1_safe`` (booleans), and
optionally ``category`` (one of the FDC categories EHD / IHD / MHD / benign, docs/method.md#equilibrate-rlhf).

Every row is checked. Bad rows either raise one ``ValueError`` that lists each bad row's number and
reasons (``on_error="raise"``, the default) or are dropped and reported (``on_error="skip"``): nothing
is ever trained on a bad row silently.
"""

from __future__ import annotations

import json
import logging
import numbers
import os
import re
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from hcrlhf.data.files import numbered_lines, read_text

__all__ = [
    "PREFERENCE_COLUMNS",
    "FDC_CATEGORIES",
    "RowProblem",
    "PreferenceLoadReport",
    "DatasetUnavailableError",
    "validate_preference_row",
    "validate_preference_rows",
    "load_preferences",
    "preferences_from_rows",
]

logger = logging.getLogger(__name__)

PREFERENCE_COLUMNS = (
    "prompt",
    "response_0",
    "response_1",
    "better_response_id",
    "safer_response_id",
    "is_response_0_safe",
    "is_response_1_safe",
)
#: FDC prompt categories (Equilibrate RLHF): explicit, implicit and mixed harmful, and benign.
FDC_CATEGORIES = ("EHD", "IHD", "MHD", "benign")
_CATEGORY_LOOKUP = {c.lower(): c for c in FDC_CATEGORIES}
_TEXT_FIELDS = ("prompt", "response_0", "response_1")
_ID_FIELDS = ("better_response_id", "safer_response_id")
_SAFE_FIELDS = ("is_response_0_safe", "is_response_1_safe")
_FILE_SUFFIXES = {".json": "json", ".jsonl": "jsonl", ".parquet": "parquet"}
_SPLIT_NAMES = ("train", "test", "validation", "valid", "val", "dev", "eval")
_MAX_LISTED = 50


class DatasetUnavailableError(OSError):
    """A Hugging Face dataset id could not be loaded (typically: no network)."""


@dataclass
class RowProblem:
    """What is wrong with one row.

    Attributes:
        row: the row's number (0-based) among the rows read for this split.
        reasons: one message per problem.
        where: ``"file:line"`` for JSON Lines (1-based line), ``"file[i]"`` for JSON/Parquet, or None.
    """

    row: int
    reasons: list[str]
    where: str | None = None

    def describe(self) -> str:
        location = f" ({self.where})" if self.where else ""
        return f"row {self.row}{location}: " + "; ".join(self.reasons)


@dataclass
class PreferenceLoadReport:
    """What :func:`load_preferences` read, kept and dropped.

    Attributes:
        source: the source as given.
        split: the split loaded.
        n_read: rows read.
        n_kept: rows kept.
        problems: the bad rows (dropped under ``on_error="skip"``).
        files: the local files read (empty for a Hub dataset or in-memory rows).
    """

    source: str
    split: str
    n_read: int
    n_kept: int
    problems: list[RowProblem] = field(default_factory=list)
    files: list[str] = field(default_factory=list)

    @property
    def n_dropped(self) -> int:
        return len(self.problems)

    @property
    def reason_counts(self) -> dict[str, int]:
        """How many rows had each kind of problem (the reason text up to its first ':' or ',')."""
        counts = Counter()
        for problem in self.problems:
            for kind in {_reason_kind(r) for r in problem.reasons}:
                counts[kind] += 1
        return dict(sorted(counts.items()))

    def summary(self) -> str:
        text = f"{self.source!r} split {self.split!r}: read {self.n_read} rows, kept {self.n_kept}"
        if self.problems:
            kinds = ", ".join(f"{k}: {v}" for k, v in self.reason_counts.items())
            text += f", dropped {self.n_dropped} ({kinds})"
        return text

    def to_dict(self) -> dict:
        return {
            "source": self.source, "split": self.split, "n_read": self.n_read, "n_kept": self.n_kept,
            "n_dropped": self.n_dropped, "reason_counts": self.reason_counts, "files": list(self.files),
            "problems": [{"row": p.row, "where": p.where, "reasons": list(p.reasons)} for p in self.problems],
        }


def _reason_kind(reason: str) -> str:
    for sep in (":", ","):
        reason = reason.split(sep, 1)[0]
    return reason.strip()


def _as_label_id(value) -> int | None:
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, numbers.Integral):
        return int(value) if int(value) in (0, 1) else None
    if isinstance(value, numbers.Real) and float(value).is_integer() and float(value) in (0.0, 1.0):
        return int(value)
    return None


def _as_safe_label(value) -> bool | None:
    # numpy.bool_ is not a bool subclass; ints 0/1 are accepted (some exports store labels as ints).
    if isinstance(value, bool) or type(value).__name__ == "bool_":
        return bool(value)
    if isinstance(value, numbers.Integral) and int(value) in (0, 1):
        return bool(int(value))
    return None


def validate_preference_row(row) -> tuple[dict | None, list[str]]:
    """Check one row; return ``(normalised row or None, reasons)``.

    The normalised row has exactly the schema columns (plus ``category`` when the row has one), with
    ids as ``int`` and safety labels as ``bool``. Reasons are empty for a good row.
    """
    if not isinstance(row, dict):
        return None, [f"row is not an object (got {type(row).__name__})"]
    reasons = []
    out = {}
    for name in _TEXT_FIELDS:
        value = row.get(name)
        if name not in row or value is None:
            reasons.append(f"missing field '{name}'")
        elif not isinstance(value, str):
            reasons.append(f"'{name}' must be a string, got {type(value).__name__}")
        elif not value.strip():
            reasons.append(f"empty '{name}'")
        else:
            out[name] = value
    for name in _ID_FIELDS:
        if name not in row or row[name] is None:
            reasons.append(f"missing field '{name}'")
            continue
        label = _as_label_id(row[name])
        if label is None:
            reasons.append(f"'{name}' must be 0 or 1, got {row[name]!r}")
        else:
            out[name] = label
    for name in _SAFE_FIELDS:
        if name not in row or row[name] is None:
            reasons.append(f"missing field '{name}'")
            continue
        label = _as_safe_label(row[name])
        if label is None:
            reasons.append(f"'{name}' must be a boolean, got {row[name]!r}")
        else:
            out[name] = label
    if all(k in out for k in ("safer_response_id", *_SAFE_FIELDS)):
        safer = out["safer_response_id"]
        safe = (out["is_response_0_safe"], out["is_response_1_safe"])
        if not safe[safer] and safe[1 - safer]:
            reasons.append(
                f"inconsistent safety labels: safer_response_id={safer} but response_{safer} is labelled "
                f"unsafe and response_{1 - safer} safe"
            )
    if "category" in row and row["category"] is not None:
        value = row["category"]
        category = _CATEGORY_LOOKUP.get(value.strip().lower()) if isinstance(value, str) else None
        if category is None:
            reasons.append(f"'category' must be one of {', '.join(FDC_CATEGORIES)}, got {value!r}")
        else:
            out["category"] = category
    return (None if reasons else out), reasons


def validate_preference_rows(rows, wheres=None) -> tuple[list[dict], list[RowProblem]]:
    """Validate rows; return ``(good normalised rows, problems)``. ``wheres`` optionally locates each row."""
    good, problems = [], []
    for index, row in enumerate(rows):
        normalised, reasons = validate_preference_row(row)
        if reasons:
            problems.append(RowProblem(index, reasons, None if wheres is None else wheres[index]))
        else:
            good.append(normalised)
    return good, problems


# ----------------------------------------------------------------------------------------- reading


def _read_file(path: Path) -> tuple[list, list[str]]:
    """Rows and their locations from one JSON / JSONL / Parquet file. Unparseable JSON lines become
    ``_BadLine`` placeholders so that they are reported with their line number."""
    kind = _FILE_SUFFIXES[path.suffix.lower()]
    if kind == "parquet":
        import pyarrow.parquet as pq

        rows = pq.read_table(path).to_pylist()
        return rows, [f"{path.name}[{i}]" for i in range(len(rows))]
    text = read_text(path, what="load_preferences")
    if kind == "json" and text.lstrip().startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as error:
            raise ValueError(f"load_preferences: {path} is not valid JSON: {error}") from None
        return data, [f"{path.name}[{i}]" for i in range(len(data))]
    if kind == "json" and text.lstrip().startswith("{"):
        # A single object: either one row, or {"data"/"rows"/"train": [...]}, or JSON Lines in a .json file.
        try:
            data = json.loads(text)
        except json.JSONDecodeError:
            data = None
        if isinstance(data, dict):
            for key in ("data", "rows"):
                if isinstance(data.get(key), list):
                    return data[key], [f"{path.name}[{i}]" for i in range(len(data[key]))]
            return [data], [f"{path.name}[0]"]
    rows, wheres = [], []
    for line_number, line in numbered_lines(text):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as error:
            rows.append(_BadLine(str(error)))
        wheres.append(f"{path.name}:{line_number}")
    return rows, wheres


class _BadLine:
    def __init__(self, error: str):
        self.error = error


def _split_of(path: Path, root: Path) -> str | None:
    parts = [p.lower() for p in path.relative_to(root).with_suffix("").parts]
    for part in reversed(parts):
        for token in part.replace("-", "_").replace(".", "_").split("_"):
            if token in _SPLIT_NAMES:
                return {"valid": "validation", "val": "validation", "dev": "validation", "eval": "validation"}.get(
                    token, token
                )
    return None


def _local_files(path: Path, split: str) -> list[Path]:
    fn = "load_preferences"
    if path.is_file():
        if path.suffix.lower() not in _FILE_SUFFIXES:
            raise ValueError(f"{fn}: source {str(path)!r} must be a .json, .jsonl or .parquet file")
        return [path]
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in _FILE_SUFFIXES
                   and not any(part.startswith(".") for part in p.relative_to(path).parts))
    if not files:
        raise ValueError(f"{fn}: directory {str(path)!r} holds no .json, .jsonl or .parquet files")
    by_split: dict[str | None, list[Path]] = {}
    for file in files:
        by_split.setdefault(_split_of(file, path), []).append(file)
    wanted = {"valid": "validation", "val": "validation", "dev": "validation", "eval": "validation"}.get(split, split)
    if wanted in by_split:
        return by_split[wanted]
    if set(by_split) == {None} and split == "train":
        return files  # no file names a split: the whole directory is the train split (as in `datasets`)
    found = sorted(k for k in by_split if k is not None)
    raise ValueError(
        f"{fn}: directory {str(path)!r} has no files for split {split!r} (splits found: {found or 'none'})")


_HUB_ID = re.compile(r"^[A-Za-z0-9_.-]+(/[A-Za-z0-9_.-]+)?$")


def _looks_like_path(source: str) -> bool:
    """A Hub id is ``name`` or ``owner/name``; anything else (or a file suffix) is taken as a path."""
    return not _HUB_ID.match(source) or Path(source).suffix.lower() in _FILE_SUFFIXES or source.startswith(".")


def _read_hub(source: str, split: str) -> list:
    try:
        import datasets

        dataset = datasets.load_dataset(source, split=split)
    except Exception as error:  # noqa: BLE001 - any failure here is reported as "unavailable"
        raise DatasetUnavailableError(
            f"load_preferences: {source!r} is not a local file or directory, and loading it as a Hugging Face "
            f"dataset id failed ({type(error).__name__}: {error}). Hub datasets need network access; offline, "
            "pass a local JSON / JSONL / Parquet file or directory instead."
        ) from error
    missing = [c for c in PREFERENCE_COLUMNS if c not in dataset.column_names]
    if missing:
        raise ValueError(
            f"load_preferences: dataset {source!r} split {split!r} lacks the columns {missing} of the "
            f"PKU-SafeRLHF schema (it has {dataset.column_names})"
        )
    keep = [c for c in (*PREFERENCE_COLUMNS, "category") if c in dataset.column_names]
    return dataset.select_columns(keep).to_list()


def preferences_from_rows(rows):
    """A ``datasets.Dataset`` with the schema columns from already-validated (normalised) rows."""
    import datasets

    features = {
        "prompt": datasets.Value("string"),
        "response_0": datasets.Value("string"),
        "response_1": datasets.Value("string"),
        "better_response_id": datasets.Value("int64"),
        "safer_response_id": datasets.Value("int64"),
        "is_response_0_safe": datasets.Value("bool"),
        "is_response_1_safe": datasets.Value("bool"),
    }
    has_category = any("category" in r for r in rows)
    if has_category:
        features["category"] = datasets.Value("string")
    columns = {name: [r.get(name) for r in rows] for name in features}
    return datasets.Dataset.from_dict(columns, features=datasets.Features(features))


def load_preferences(source, *, split: str = "train", on_error: str = "raise", return_report: bool = False):
    """Load preference pairs in the PKU-SafeRLHF schema and validate every row.

    Args:
        source: a local ``.json`` (array, or JSON Lines), ``.jsonl`` or ``.parquet`` file; a directory of
            them (files are assigned to splits by name, ``train*.jsonl``, ``data/test-0000.parquet``...;
            with no split names the whole directory is ``train``); a ``datasets.Dataset`` or a list of
            dicts; or a Hugging Face dataset id (e.g. ``"PKU-Alignment/PKU-SafeRLHF"``), used only when
            ``source`` is not an existing local path (needs network access).
        split: the split to load (ignored for a single file, a Dataset or a list).
        on_error: ``"raise"`` — any bad row raises one ``ValueError`` listing every bad row's number and
            reasons; ``"skip"`` — bad rows are dropped, a warning says how many and why, and the
            report (``return_report=True``) lists them.
        return_report: also return a :class:`PreferenceLoadReport`.

    Returns:
        a ``datasets.Dataset`` with the columns of :data:`PREFERENCE_COLUMNS` (+ ``category`` when the
        source has it), or ``(dataset, report)`` with ``return_report``.

    Raises:
        FileNotFoundError: a path-like source that does not exist.
        DatasetUnavailableError: a Hub id that could not be loaded (e.g. offline).
        ValueError: bad rows (with ``on_error="raise"``), an empty source, or no valid row left.
    """
    fn = "load_preferences"
    if on_error not in ("raise", "skip"):
        raise ValueError(f"{fn}: on_error must be 'raise' or 'skip', got {on_error!r}")
    if not isinstance(split, str) or not split:
        raise ValueError(f"{fn}: split must be a non-empty string, got {split!r}")
    files: list[str] = []
    wheres = None
    try:
        import datasets

        is_dataset = isinstance(source, datasets.Dataset)
    except ImportError:  # pragma: no cover - datasets is a core dependency
        is_dataset = False
    if is_dataset:
        label, rows = f"<Dataset of {len(source)} rows>", source.to_list()
    elif isinstance(source, (list, tuple)):
        label, rows = f"<list of {len(source)} rows>", list(source)
    elif isinstance(source, (str, os.PathLike)):
        label = os.fspath(source)
        path = Path(label).expanduser()
        if path.exists():
            rows, wheres = [], []
            for file in _local_files(path, split):
                file_rows, file_wheres = _read_file(file)
                rows.extend(file_rows)
                wheres.extend(file_wheres)
                files.append(str(file))
        elif isinstance(source, os.PathLike) or _looks_like_path(label):
            raise FileNotFoundError(f"{fn}: source {label!r} does not exist")
        else:
            rows = _read_hub(label, split)
    else:
        raise TypeError(
            f"{fn}: source must be a path, a Hugging Face dataset id, a datasets.Dataset or a list of dicts, "
            f"got {type(source).__name__}"
        )
    if not rows:
        raise ValueError(f"{fn}: source {label!r} split {split!r} has no rows")

    good, problems = [], []
    for index, row in enumerate(rows):
        if isinstance(row, _BadLine):
            normalised, reasons = None, [f"not valid JSON: {row.error}"]
        else:
            normalised, reasons = validate_preference_row(row)
        if reasons:
            problems.append(RowProblem(index, reasons, None if wheres is None else wheres[index]))
        else:
            good.append(normalised)
    report = PreferenceLoadReport(label, split, len(rows), len(good), problems, files)
    if problems:
        listed = "\n  ".join(p.describe() for p in problems[:_MAX_LISTED])
        more = f"\n  ... and {len(problems) - _MAX_LISTED} more" if len(problems) > _MAX_LISTED else ""
        if on_error == "raise":
            raise ValueError(
                f"{fn}: {len(problems)} of {len(rows)} rows of {label!r} (split {split!r}) are invalid "
                f"(pass on_error='skip' to drop them):\n  {listed}{more}"
            )
        message = f"{fn}: dropped {len(problems)} invalid rows: {report.summary()}"
        logger.warning("%s\n  %s%s", message, listed, more)
        warnings.warn(message, stacklevel=2)
    if not good:
        raise ValueError(f"{fn}: no valid rows left in {label!r} split {split!r}")
    if any("category" in r for r in good) and not all("category" in r for r in good):
        # A column that only some rows fill is kept, with None where absent.
        for r in good:
            r.setdefault("category", None)
    dataset = preferences_from_rows(good)
    return (dataset, report) if return_report else dataset
