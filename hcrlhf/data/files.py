"""Reading a user's data files: every error names the file and line; lines end at ``\\n`` only.

``str.splitlines`` also ends a line at form feed, the information separators ``\\x1c``–``\\x1e``,
``\\x85``, U+2028 and U+2029. JSON allows U+2028/U+2029 raw inside strings (and ``json.dumps(...,
ensure_ascii=False)``, which hcrlhf itself uses, writes them raw), so splitting a JSON Lines file that
way refuses valid rows, and splitting a text prompt file that way cuts one prompt in two without a
word. Here a line ends at ``\\n`` (a ``\\r`` before it is dropped, for Windows files) and nowhere else.
"""

from __future__ import annotations

import json
from pathlib import Path

__all__ = ["read_text", "numbered_lines", "read_json_rows", "read_prompt_file", "JSON_SUFFIXES"]

#: Suffixes read as JSON / JSON Lines (anything else is a text file of one prompt a line).
JSON_SUFFIXES = (".json", ".jsonl")


def read_text(path, *, what: str) -> str:
    """The file's text, decoded as UTF-8 (a leading byte-order mark dropped).

    Raises:
        FileNotFoundError: no such file. IsADirectoryError: ``path`` is a directory.
        ValueError: not UTF-8 — naming the file, the line and the byte offset of the first bad byte — or
            holding NUL characters (UTF-16 without a byte-order mark decodes as UTF-8 full of them).
    """
    file = Path(path).expanduser()
    if file.is_dir():
        raise IsADirectoryError(f"{what}: {file} is a directory; expected a file")
    if not file.exists():
        raise FileNotFoundError(f"{what}: {file} does not exist")
    raw = file.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        line = raw.count(b"\n", 0, error.start) + 1
        raise ValueError(f"{what}: {file}:{line}: not UTF-8 text (byte 0x{raw[error.start]:02x} at offset "
                         f"{error.start}); save the file as UTF-8") from None
    if "\x00" in text:  # valid UTF-8, but no prompt holds NUL: UTF-16 saved without a byte-order mark, most likely
        at = text.index("\x00")
        raise ValueError(f"{what}: {file}:{text.count(chr(10), 0, at) + 1}: holds NUL characters (a UTF-16 or "
                         "binary file?); save the file as UTF-8 text")
    return text[1:] if text.startswith("\ufeff") else text


def numbered_lines(text: str):
    """``(line_number, line)`` for each line of ``text``, split on ``\\n`` only (one trailing ``\\r``
    dropped), numbered from 1; a final empty line after the last ``\\n`` is not yielded."""
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    for number, line in enumerate(lines, start=1):
        yield number, line[:-1] if line.endswith("\r") else line


def read_json_rows(path, *, what: str, text: str | None = None) -> tuple[list, list[str]]:
    """Rows of a JSON Lines file (one JSON value a line; blank lines skipped), or of a ``.json`` file
    holding one JSON list, and where each came from (``"file:line"`` / ``"file[i]"``) for error messages.

    Raises:
        ValueError: a line (or the file) that is not valid JSON, naming file and line.
    """
    file = Path(path).expanduser()
    text = read_text(file, what=what) if text is None else text
    if file.suffix.lower() == ".json" and text.lstrip().startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as error:
            raise ValueError(f"{what}: {file}:{error.lineno}: not valid JSON ({error.msg})") from None
        return rows, [f"{file}[{index}]" for index in range(len(rows))]
    rows, wheres = [], []
    for number, line in numbered_lines(text):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as error:
            raise ValueError(f"{what}: {file}:{number}: not valid JSON ({error.msg}, column {error.colno})") \
                from None
        wheres.append(f"{file}:{number}")
    return rows, wheres


def read_prompt_file(path, prompt_column: str = "prompt", *, distinct: bool = True) -> tuple[list[str], list | None]:
    """``(prompts, categories or None)`` from a JSON Lines / JSON file of rows (``prompt``, optional
    string ``category``), a JSON list of strings, or a text file with one prompt a line (lines end at
    ``\\n`` only; blank lines skipped; each line stripped).

    With ``distinct`` (the default) only the first copy of each prompt is kept (copies: the same
    :func:`hcrlhf.safety.canonical_prompt`, as in the fingerprint), so that a safety test counts each prompt
    once; pass ``distinct=False`` and :func:`hcrlhf.safety.distinct_prompts` to count the copies dropped.

    Raises:
        ValueError: not UTF-8, invalid JSON, a row without a string prompt, a category that is not a
            string, or no prompts — each naming the file and line.
    """
    file = Path(path).expanduser()
    what = "prompt file"
    if file.suffix.lower() in JSON_SUFFIXES:
        rows, wheres = read_json_rows(file, what=what)
        prompts, categories = [], []
        for row, where in zip(rows, wheres):
            if isinstance(row, str):
                prompts.append(row)
                categories.append(None)
                continue
            if not isinstance(row, dict) or not isinstance(row.get(prompt_column), str):
                raise ValueError(f"{what}: {where}: a row must be a string or an object with a string "
                                 f"{prompt_column!r}, got {_short(row)}")
            category = row.get("category")
            if category is not None and not isinstance(category, str):
                raise ValueError(f"{what}: {where}: 'category' must be a string (or absent), got "
                                 f"{type(category).__name__} {_short(category)}")
            prompts.append(row[prompt_column])
            categories.append(category)
    else:
        prompts = [line.strip() for _, line in numbered_lines(read_text(file, what=what)) if line.strip()]
        categories = [None] * len(prompts)
    if not prompts:
        raise ValueError(f"{what}: {file} holds no prompts")
    if distinct:
        from hcrlhf.safety.ledger import distinct_prompts

        prompts, categories, _ = distinct_prompts(prompts, categories)
    return prompts, (categories if any(c is not None for c in categories) else None)


def _short(value, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."
