"""The documentation stands on its own: no file points outside the repository, and every relative link in
README.md and docs/*.md reaches an existing file (and, with ``#anchor``, an existing heading there)."""

from __future__ import annotations

import re
import shutil
import subprocess
import unicodedata
from pathlib import Path
from urllib.parse import unquote

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOC_FILES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

# Pointers to the team's briefs, which live outside the repository. Built from pieces so that this file
# does not match itself.
OUTSIDE = re.compile("|".join([
    re.escape("SPEC" + ".md"),
    re.escape("DESIGN" + ".md"),
    re.escape("ANCHORS" + ".md"),
    re.escape("../" + "shared"),
    r"\bSPEC" + r"\s*§",  # "SPEC §2.3"
]))

FENCE = re.compile(r"^\s*(```|~~~)")
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
LINK = re.compile(r"!?\[(?:[^\]\\]|\\.)*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
INLINE_CODE = re.compile(r"(`+)(?:(?!\1).)+?\1")


def tracked_files() -> list[Path]:
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    # Tracked files and new files not yet added (but not ignored ones): what the next commit may hold.
    command = ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"]
    listing = subprocess.run(command, cwd=ROOT, capture_output=True, check=True).stdout
    return [ROOT / name for name in listing.decode("utf-8").split("\0") if name]


def test_no_file_points_outside_the_repository():
    offenders = []
    for path in tracked_files():
        relative = path.relative_to(ROOT).as_posix()
        if path.name.upper().startswith("CHANGELOG") or relative == "tests/test_docs.py" or not path.is_file():
            continue
        text = path.read_bytes().decode("utf-8", errors="ignore")
        for number, line in enumerate(text.splitlines(), 1):
            match = OUTSIDE.search(line)
            if match:
                offenders.append(f"{relative}:{number}: {match.group(0)!r} in {line.strip()[:100]!r}")
    assert not offenders, (
        "files point to briefs outside the repository; point to docs/ instead "
        "(docs/ops.md, docs/method.md, docs/architecture.md, docs/adding-an-op.md):\n" + "\n".join(offenders)
    )


def _prose_lines(text: str):
    """(line number, line) outside fenced code blocks."""
    fenced = False
    for number, line in enumerate(text.splitlines(), 1):
        if FENCE.match(line):
            fenced = not fenced
            continue
        if not fenced:
            yield number, line


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: markup dropped, lower case, punctuation removed, spaces to hyphens."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # links and images: keep the text
    text = re.sub(r"<[^>]+>", "", text)  # inline HTML
    text = text.replace("`", "").replace("*", "")
    text = re.sub(r"(?<!\w)_+|_+(?!\w)", "", text)  # _emphasis_ markers, not snake_case
    text = unicodedata.normalize("NFC", text).strip().lower()
    text = "".join(ch for ch in text if ch in " -_" or unicodedata.category(ch)[0] in "LNM")
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    found: set[str] = set()
    counts: dict[str, int] = {}
    for _, line in _prose_lines(path.read_text(encoding="utf-8")):
        match = HEADING.match(line)
        if not match:
            continue
        base = slug(match.group(2))
        count = counts.get(base, 0)
        counts[base] = count + 1
        found.add(base if count == 0 else f"{base}-{count}")
    return found


def links(path: Path):
    """(line number, target) of every markdown link or image outside code."""
    for number, line in _prose_lines(path.read_text(encoding="utf-8")):
        for match in LINK.finditer(INLINE_CODE.sub("", line)):
            yield number, match.group(1)


def test_slug_follows_github():
    assert slug("The δ ledger") == "the-δ-ledger"
    assert slug("safe_advantages") == "safe_advantages"
    assert slug("Dispatch and implementations") == "dispatch-and-implementations"
    assert slug("From `hcrlhf.ops` to a kernel (C++/Triton)") == "from-hcrlhfops-to-a-kernel-ctriton"


def test_doc_files_exist():
    names = {path.name for path in DOC_FILES if path.parent.name == "docs"}
    assert {"README.md", "ops.md", "method.md", "architecture.md", "adding-an-op.md"} <= names


@pytest.mark.parametrize("doc", DOC_FILES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_relative_links_resolve(doc):
    problems = []
    for number, target in links(doc):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):  # http:, https:, mailto:, ...
            continue
        file_part, _, anchor = target.partition("#")
        destination = (doc.parent / unquote(file_part)).resolve() if file_part else doc
        where = f"{doc.relative_to(ROOT).as_posix()}:{number}: {target}"
        if not destination.exists():
            problems.append(f"{where}: no such file")
            continue
        if ROOT not in destination.parents and destination != ROOT:
            problems.append(f"{where}: points outside the repository")
            continue
        if anchor:
            if destination.suffix.lower() != ".md":
                problems.append(f"{where}: an anchor into a file that is not markdown")
            elif unquote(anchor).lower() not in anchors(destination):
                problems.append(f"{where}: no heading with anchor #{anchor} in {destination.name}")
    assert not problems, "broken links:\n" + "\n".join(problems)
