"""Readers of a user's files: lines end at "\\n" only, and every error names the file and the line."""

import json

import pytest

from hcrlhf.data import load_preferences, read_lm_rows, split_prompts
from hcrlhf.data.files import numbered_lines, read_json_rows, read_prompt_file
from hcrlhf.safety import SafetyLedger

# Characters str.splitlines() treats as line ends but JSON and a text prompt allow inside one line.
NOT_LINE_ENDS = ["\u2028", "\u2029", "\x0c", "\x0b", "\x1c", "\x1d", "\x1e", "\x85"]


@pytest.mark.parametrize("separator", NOT_LINE_ENDS)
def test_jsonl_row_with_a_unicode_line_separator_is_one_row(tmp_path, separator):
    prompt = f"first half{separator}second half"
    path = tmp_path / "prompts.jsonl"
    # ensure_ascii=False writes U+2028 / U+2029 raw, as hcrlhf's own writers do.
    path.write_text(json.dumps({"prompt": prompt}, ensure_ascii=False) + "\n"
                    + json.dumps({"prompt": "other"}) + "\n", encoding="utf-8")
    prompts, _ = read_prompt_file(path)
    assert prompts == [prompt, "other"]


@pytest.mark.parametrize("separator", NOT_LINE_ENDS)
def test_text_prompt_file_does_not_split_a_prompt_at_a_control_character(tmp_path, separator):
    path = tmp_path / "prompts.txt"
    path.write_text(f"one{separator}prompt\nsecond prompt\n", encoding="utf-8")
    assert read_prompt_file(path, distinct=False)[0] == [f"one{separator}prompt", "second prompt"]


def test_windows_line_ends_and_bom_are_read(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_bytes("\ufeffa\r\nb\r\n\r\nc".encode())
    assert read_prompt_file(path)[0] == ["a", "b", "c"]
    assert list(numbered_lines("x\r\ny\n")) == [(1, "x"), (2, "y")]


def test_invalid_json_line_names_file_and_line(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text('{"prompt": "a"}\n\n{"prompt": "b"\n', encoding="utf-8")
    with pytest.raises(ValueError, match=rf"{path}:3: not valid JSON"):
        read_prompt_file(path)


def test_non_utf8_file_names_file_line_and_byte(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_bytes(b"fine\nalso fine\nbad \xff here\n")
    with pytest.raises(ValueError, match=rf"{path}:3: not UTF-8 text \(byte 0xff at offset 19\)"):
        read_prompt_file(path)
    jsonl = tmp_path / "rows.jsonl"
    jsonl.write_bytes(b'{"text": "ok"}\n{"text": "\xe9"}\n')
    with pytest.raises(ValueError, match=rf"sft.path: {jsonl}:2: not UTF-8"):
        read_lm_rows(jsonl, name="sft.path")
    with pytest.raises(ValueError, match=rf"{jsonl}:2: not UTF-8"):
        load_preferences(str(jsonl))


def test_a_list_as_category_is_refused_naming_file_and_line(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text('{"prompt": "a", "category": "EHD"}\n{"prompt": "b", "category": ["EHD", "IHD"]}\n',
                    encoding="utf-8")
    with pytest.raises(ValueError, match=rf"{path}:2: 'category' must be a string .*list"):
        read_prompt_file(path)
    with pytest.raises(TypeError, match=r"categories\[1\] must be a str or None, got list"):
        split_prompts(["a", "b", "c"], categories=["EHD", ["EHD"], None])


def test_row_without_a_prompt_names_file_and_line(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text('{"prompt": "a"}\n{"question": "b"}\n', encoding="utf-8")
    with pytest.raises(ValueError, match=rf"{path}:2: a row must be a string or an object with a string 'prompt'"):
        read_prompt_file(path)


def test_directory_given_as_a_file(tmp_path, monkeypatch):
    with pytest.raises(IsADirectoryError, match=rf"prompt file: {tmp_path} is a directory"):
        read_prompt_file(tmp_path)
    with pytest.raises(ValueError, match=rf"SafetyLedger: {tmp_path} is a directory; .*safety_ledger.json"):
        SafetyLedger(tmp_path)
    state = tmp_path / "state-file"
    state.write_text("")
    monkeypatch.setenv("HCRLHF_STATE_DIR", str(state))
    from hcrlhf.safety.ledger import default_ledger_path

    with pytest.raises(ValueError, match=r"is a file, not a directory \(\$HCRLHF_STATE_DIR must name a directory\)"):
        SafetyLedger(default_ledger_path())


def test_lm_rows_errors_name_the_line(tmp_path):
    path = tmp_path / "sft.jsonl"
    path.write_text('{"text": "a"}\n{"prompt": "p", "response": "r"}\n', encoding="utf-8")
    with pytest.raises(ValueError, match=rf"sft.path: {path}:2: a 'pairs' row in a file of 'text' rows"):
        read_lm_rows(path, name="sft.path")
    text = "line one\u2028still one"
    path.write_text(json.dumps({"text": text}, ensure_ascii=False) + "\n", encoding="utf-8")
    assert read_lm_rows(path, name="sft.path")[0] == [{"text": text}]


def test_preference_rows_keep_unicode_line_separators(tmp_path):
    row = {"prompt": "p\u2028q", "response_0": "a\u2029b", "response_1": "c", "better_response_id": 0,
           "safer_response_id": 1, "is_response_0_safe": False, "is_response_1_safe": True}
    path = tmp_path / "prefs.jsonl"
    path.write_text(json.dumps(row, ensure_ascii=False) + "\n", encoding="utf-8")
    dataset = load_preferences(str(path))
    assert dataset[0]["prompt"] == "p\u2028q" and dataset[0]["response_0"] == "a\u2029b"


def test_json_list_file_error_names_the_line(tmp_path):
    path = tmp_path / "prompts.json"
    path.write_text('[\n  "a",\n  "b",,\n]\n', encoding="utf-8")
    with pytest.raises(ValueError, match=rf"{path}:3: not valid JSON"):
        read_json_rows(path, what="prompt file")


def test_utf16_without_bom_or_nul_characters_are_refused(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_bytes("how do i bake bread\nsecond prompt\n".encode("utf-16-le"))  # valid UTF-8, full of NULs
    with pytest.raises(ValueError, match=rf"{path}:1: holds NUL characters \(a UTF-16 or binary file\?\)"):
        read_prompt_file(path)
