"""LM rows: the data of supervised fine-tuning (``sft.path``) and of the RL trainer's pretraining-loss mix
(``ptx_path``). A file holds either prompt/response pairs or plain text, one kind per file; tokenize them with
:func:`hcrlhf.models.tokenize_lm_rows`."""

from __future__ import annotations

import hashlib
from pathlib import Path

from hcrlhf.data.files import read_json_rows, read_text

__all__ = ["read_lm_rows"]


def read_lm_rows(path, *, name: str = "path") -> tuple[list[dict], str, str]:
    """The LM rows of a JSON Lines file (or a ``.json`` list).

    Args:
        path: the file. Every row is ``{"prompt": str, "response": str}`` ("pairs": the prompt is context,
            the response and an EOS are the targets) or every row is ``{"text": str}`` ("text").
        name: the setting the errors name, e.g. ``"sft.path"``.

    Returns:
        ``(rows, kind, sha256)``: the rows (dicts, as read), their kind ("pairs" | "text") and the hex
        SHA-256 of the file's bytes.

    Raises:
        FileNotFoundError: ``path`` is not a file.
        ValueError: not UTF-8, not JSON Lines / JSON, no rows, a row of neither kind, or both kinds in one
            file — naming the file and line.
    """
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"{name}={str(path)!r} is not a file")
    raw = file.read_bytes()
    text = read_text(file, what=name)
    if file.suffix == ".json" and not text.lstrip().startswith("["):
        raise ValueError(f"{name}: {file} must hold a JSON list of rows (or use JSON Lines, .jsonl)")
    rows, wheres = read_json_rows(file, what=name, text=text)
    if not rows:
        raise ValueError(f"{name}: {file} holds no rows")
    kind = None
    for row, where in zip(rows, wheres):
        if isinstance(row, dict) and isinstance(row.get("prompt"), str) and isinstance(row.get("response"), str):
            row_kind = "pairs"
        elif isinstance(row, dict) and isinstance(row.get("text"), str):
            row_kind = "text"
        else:
            raise ValueError(f"{name}: {where}: a row must be an object with string 'prompt' and 'response' "
                             "fields, or a string 'text' field")
        if kind is not None and row_kind != kind:
            raise ValueError(f"{name}: {where}: a {row_kind!r} row in a file of {kind!r} rows; use one kind "
                             "per file")
        kind = row_kind
    return rows, kind, hashlib.sha256(raw).hexdigest()
