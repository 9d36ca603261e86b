"""load_preferences: every bad row is named with its row number and reason; skip drops and reports."""

import json
import re
from pathlib import Path

import pytest

from hcrlhf.data import PREFERENCE_COLUMNS, DatasetUnavailableError, load_preferences

FIXTURE = Path(__file__).parent / "fixtures" / "preferences_mixed.jsonl"
GOOD_ROWS = [0, 5, 8]
BAD_ROWS = {  # row -> a fragment of the reason that must be reported for it
    1: "empty 'prompt'",
    2: "'better_response_id' must be 0 or 1, got 2",
    3: "inconsistent safety labels",
    4: "missing field 'response_1'",
    6: "not valid JSON",
    7: "'is_response_0_safe' must be a boolean",
    9: "'category' must be one of",
}


def _row(**overrides):
    row = {"prompt": "p", "response_0": "a", "response_1": "b", "better_response_id": 1, "safer_response_id": 0,
           "is_response_0_safe": True, "is_response_1_safe": False}
    row.update(overrides)
    return row


def test_raise_lists_every_bad_row_with_its_reason():
    with pytest.raises(ValueError) as info:
        load_preferences(FIXTURE)
    message = str(info.value)
    assert f"{len(BAD_ROWS)} of 10 rows" in message
    lines = {int(m.group(1)): line for line in message.splitlines() if (m := re.match(r"\s*row (\d+) ", line))}
    assert sorted(lines) == sorted(BAD_ROWS), message
    for row, reason in BAD_ROWS.items():
        assert reason in lines[row], f"row {row}: expected {reason!r} in {lines[row]!r}"
        assert f"preferences_mixed.jsonl:{row + 1}" in lines[row]  # the file line is named too
    for row in GOOD_ROWS:
        assert row not in lines


def test_skip_drops_bad_rows_and_reports_them():
    with pytest.warns(UserWarning, match=f"dropped {len(BAD_ROWS)} invalid rows"):
        dataset, report = load_preferences(FIXTURE, on_error="skip", return_report=True)
    assert len(dataset) == len(GOOD_ROWS)
    assert report.n_read == 10 and report.n_kept == 3 and report.n_dropped == len(BAD_ROWS)
    assert [p.row for p in report.problems] == sorted(BAD_ROWS)
    assert report.reason_counts["inconsistent safety labels"] == 1
    assert set(PREFERENCE_COLUMNS) <= set(dataset.column_names) and "category" in dataset.column_names
    assert list(dataset["category"]) == [None, "EHD", "IHD"]
    assert list(dataset["is_response_1_safe"]) == [True, False, False]
    json.dumps(report.to_dict())  # serialisable for reports


def test_consistent_unsafe_pairs_are_accepted():
    # safer labelled unsafe is fine when the other is unsafe too; safer safe + other unsafe is fine.
    rows = [_row(safer_response_id=0, is_response_0_safe=False, is_response_1_safe=False),
            _row(safer_response_id=1, is_response_0_safe=False, is_response_1_safe=True)]
    assert len(load_preferences(rows)) == 2
    with pytest.raises(ValueError, match="row 0: inconsistent safety labels"):
        load_preferences([_row(safer_response_id=1, is_response_0_safe=True, is_response_1_safe=False)])


def test_bools_are_not_ids_and_whitespace_is_empty():
    with pytest.raises(ValueError) as info:
        load_preferences([_row(better_response_id=True), _row(response_0="   ")])
    assert "row 0: 'better_response_id' must be 0 or 1, got True" in str(info.value)
    assert "row 1: empty 'response_0'" in str(info.value)


def test_all_bad_rows_skip_still_raises():
    with pytest.warns(UserWarning), pytest.raises(ValueError, match="no valid rows"):
        load_preferences([_row(prompt="")], on_error="skip")


def test_json_array_parquet_and_directory_splits(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [_row(prompt=f"p{i}") for i in range(4)]
    (tmp_path / "array.json").write_text(json.dumps(rows))
    assert list(load_preferences(tmp_path / "array.json")["prompt"]) == ["p0", "p1", "p2", "p3"]

    data = tmp_path / "repo" / "data"
    data.mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows[:3]), data / "train-00000-of-00001.parquet")
    with open(data / "test.jsonl", "w") as handle:
        handle.write(json.dumps(rows[3]) + "\n")
    assert list(load_preferences(tmp_path / "repo", split="train")["prompt"]) == ["p0", "p1", "p2"]
    assert list(load_preferences(tmp_path / "repo", split="test")["prompt"]) == ["p3"]
    with pytest.raises(ValueError, match="no files for split 'validation'"):
        load_preferences(tmp_path / "repo", split="validation")
    # A bad Parquet row is named with its file and index.
    pq.write_table(pa.Table.from_pylist([rows[0], _row(safer_response_id=5)]), tmp_path / "bad.parquet")
    with pytest.raises(ValueError, match=r"row 1 \(bad.parquet\[1\]\): 'safer_response_id' must be 0 or 1"):
        load_preferences(tmp_path / "bad.parquet")


def test_bad_arguments_and_missing_paths(tmp_path):
    with pytest.raises(ValueError, match="on_error"):
        load_preferences(FIXTURE, on_error="ignore")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_preferences(tmp_path / "nope.jsonl")
    with pytest.raises(FileNotFoundError):
        load_preferences("./relative/missing.jsonl")
    with pytest.raises(TypeError, match="source must be"):
        load_preferences(42)


def test_hub_id_failure_says_offline(monkeypatch):
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach the Hub")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(DatasetUnavailableError, match="need network access") as info:
        load_preferences("PKU-Alignment/PKU-SafeRLHF")
    assert "PKU-Alignment/PKU-SafeRLHF" in str(info.value)


def test_hub_dataset_missing_columns_is_named(monkeypatch):
    import datasets

    fake = datasets.Dataset.from_list([{"prompt": "p", "response_0": "a"}])
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: fake)
    with pytest.raises(ValueError, match="lacks the columns .*response_1"):
        load_preferences("someone/some-dataset")
