"""LM rows: the data of supervised fine-tuning (``sft.path``) and of the RL trainer's pretraining-loss mix
(``ptx_path``). A file holds either prompt/response pairs or plain text, one kind per file; tokenize them with
:func:`hcrlhf.models.tokenize_lm_rows`."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

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
        ValueError: not JSON Lines / JSON, no rows, a row of neither kind, or both kinds in one file.
        UnicodeDecodeError: the file is not UTF-8.
    """
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"{name}={str(path)!r} is not a file")
    raw = file.read_bytes()
    text = raw.decode("utf-8")
    try:
        if file.suffix == ".json":
            rows = json.loads(text)
            if not isinstance(rows, list):
                raise ValueError("a .json file must hold a list of rows")
        else:
            rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    except (json.JSONDecodeError, ValueError) as error:
        raise ValueError(f"{name}={str(path)!r} is not valid JSON Lines / JSON: {error}") from error
    if not rows:
        raise ValueError(f"{name}={str(path)!r} holds no rows")
    kind = None
    for number, row in enumerate(rows, start=1):
        if isinstance(row, dict) and isinstance(row.get("prompt"), str) and isinstance(row.get("response"), str):
            row_kind = "pairs"
        elif isinstance(row, dict) and isinstance(row.get("text"), str):
            row_kind = "text"
        else:
            raise ValueError(f"{name}={str(path)!r} row {number} must be an object with string "
                             "'prompt' and 'response' fields, or a string 'text' field")
        if kind is not None and row_kind != kind:
            raise ValueError(f"{name}={str(path)!r} mixes {kind!r} and {row_kind!r} rows "
                             f"(row {number}); use one kind per file")
        kind = row_kind
    return rows, kind, hashlib.sha256(raw).hexdigest()
