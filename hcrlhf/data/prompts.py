"""Prompt sets, the candidate/safety split (docs/method.md#data-split) and FDC category composition
(docs/method.md#equilibrate-rlhf).

The split shuffles the *distinct* prompts once with a recorded seed and puts a fraction of them in the
safety set D_s, used once by the safety test only. Copies of one prompt (the same text up to Unicode
NFC and whitespace, e.g. several preference pairs on one prompt) always land on the same side, and the
result does not depend on the order of the input; ``deduplicate=True`` keeps only the first copy (what the
pipeline does, so that the safety test counts each prompt once) and records how many were dropped. The
split records the seed and the fingerprint of D_s (:func:`hcrlhf.safety.fingerprint`);
:meth:`PromptSplit.check_training` refuses training prompts from D_s.
"""

from __future__ import annotations

import json
import math
import random
import secrets
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

from hcrlhf.data.preferences import FDC_CATEGORIES
from hcrlhf.safety.ledger import assert_disjoint, canonical_prompt, fingerprint

__all__ = [
    "PromptSplit",
    "split_prompts",
    "split_dataset",
    "prompt_set",
    "category_counts",
    "CategoryComposition",
    "compose_by_category",
    "parse_ratios",
]

SPLIT_FORMAT = "hcrlhf-prompt-split-v1"


# Recorded with every split: the function that made its fingerprints.
FINGERPRINT_METHOD = "hcrlhf.safety.fingerprint"


def _text_list(fn: str, name: str, prompts) -> list[str]:
    if isinstance(prompts, (str, bytes)):
        raise TypeError(f"{fn}: {name} must be a collection of strings, not a single {type(prompts).__name__}")
    texts = list(prompts)
    for index, text in enumerate(texts):
        if not isinstance(text, str):
            raise TypeError(f"{fn}: {name}[{index}] must be a str, got {type(text).__name__}")
    return texts


@dataclass(frozen=True)
class PromptSplit:
    """The candidate / safety split (docs/method.md#data-split).

    Attributes:
        candidate_indices, safety_indices: positions in the input (ascending).
        candidate, safety: the prompts at those positions.
        seed: the shuffle seed.
        safety_fraction: the requested fraction of distinct prompts in D_s.
        n_distinct: distinct prompts in the input.
        safety_fingerprint: fingerprint of D_s (``sha256:...``); ``candidate_fingerprint`` likewise.
        fingerprint_method: which function made them.
        candidate_categories / safety_categories: per-category counts when categories were given.
        n_duplicates_dropped: copies of a prompt dropped before the split (``deduplicate=True``; 0 otherwise).
    """

    candidate_indices: tuple[int, ...]
    safety_indices: tuple[int, ...]
    candidate: tuple[str, ...]
    safety: tuple[str, ...]
    seed: int
    safety_fraction: float
    n_distinct: int
    safety_fingerprint: str
    candidate_fingerprint: str
    fingerprint_method: str
    candidate_categories: dict = field(default_factory=dict)
    safety_categories: dict = field(default_factory=dict)
    n_duplicates_dropped: int = 0

    def check_training(self, prompts) -> None:
        """Raise ``ValueError`` if any of ``prompts`` belongs to the safety set."""
        assert_disjoint(list(prompts), list(self.safety))

    def record(self) -> dict:
        """What a report records: seed, sizes, fingerprints, category counts (no prompt texts)."""
        return {
            "format": SPLIT_FORMAT,
            "seed": self.seed,
            "safety_fraction": self.safety_fraction,
            "n_candidate": len(self.candidate),
            "n_safety": len(self.safety),
            "n_distinct": self.n_distinct,
            "safety_fingerprint": self.safety_fingerprint,
            "candidate_fingerprint": self.candidate_fingerprint,
            "fingerprint_method": self.fingerprint_method,
            "candidate_categories": dict(self.candidate_categories),
            "safety_categories": dict(self.safety_categories),
            "n_duplicates_dropped": self.n_duplicates_dropped,
        }

    def save(self, path) -> None:
        """Write the split (with indices and prompts) as JSON."""
        data = asdict(self)
        data["format"] = SPLIT_FORMAT
        Path(path).write_text(json.dumps(data, indent=1, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")

    @classmethod
    def load(cls, path) -> PromptSplit:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        if data.pop("format", None) != SPLIT_FORMAT:
            raise ValueError(f"PromptSplit.load: {path} is not a {SPLIT_FORMAT} file")
        for key in ("candidate_indices", "safety_indices", "candidate", "safety"):
            data[key] = tuple(data[key])
        return cls(**data)


def split_prompts(prompts, *, safety_fraction: float = 0.2, seed: int | None = 0, categories=None,
                  deduplicate: bool = False) -> PromptSplit:
    """Split prompts into candidate data D_c and safety data D_s (docs/method.md#data-split).

    Args:
        prompts: N prompt strings (duplicates allowed; copies stay together).
        safety_fraction: fraction of *distinct* prompts put in D_s, in (0, 1); at least one distinct
            prompt goes to each side.
        seed: the shuffle seed (``None`` draws one, which is then recorded).
        categories: optional N FDC categories aligned with ``prompts``, counted per side.
        deduplicate: keep only the first copy of each prompt (same :func:`~hcrlhf.safety.canonical_prompt`):
            the indices point at first copies, the others are on neither side and counted in
            ``n_duplicates_dropped``. The split itself is the same either way. Use it for a prompt pool
            whose safety side is tested (one response per *distinct* prompt); leave it off to split rows
            that legitimately repeat a prompt (preference pairs, :func:`split_dataset`).

    Returns:
        a :class:`PromptSplit`. Same prompts (in any order) and seed → the same split.
    """
    fn = "split_prompts"
    texts = _text_list(fn, "prompts", prompts)
    if not (isinstance(safety_fraction, (int, float)) and 0.0 < safety_fraction < 1.0):
        raise ValueError(f"{fn}: safety_fraction must be in (0, 1), got {safety_fraction!r}")
    if seed is None:
        seed = secrets.randbelow(2**31)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"{fn}: seed must be an int or None, got {type(seed).__name__}")
    if categories is not None:
        categories = list(categories)
        if len(categories) != len(texts):
            raise ValueError(f"{fn}: categories must have one entry per prompt ({len(texts)}), got {len(categories)}")
        for index, category in enumerate(categories):
            if category is not None and not isinstance(category, str):
                raise TypeError(f"{fn}: categories[{index}] must be a str or None, got {type(category).__name__} "
                                f"{category!r}")
    groups: dict[str, list[int]] = {}
    for index, text in enumerate(texts):
        groups.setdefault(canonical_prompt(text), []).append(index)
    dropped = 0
    if deduplicate:
        dropped = len(texts) - len(groups)
        groups = {key: indices[:1] for key, indices in groups.items()}
    if len(groups) < 2:
        raise ValueError(f"{fn}: prompts must hold at least 2 distinct prompts, got {len(groups)}")
    keys = sorted(groups)  # sorted first: the split does not depend on the input order
    random.Random(seed).shuffle(keys)
    n_safety = min(max(round(safety_fraction * len(keys)), 1), len(keys) - 1)
    safety_idx = sorted(i for key in keys[:n_safety] for i in groups[key])
    candidate_idx = sorted(i for key in keys[n_safety:] for i in groups[key])
    candidate = tuple(texts[i] for i in candidate_idx)
    safety = tuple(texts[i] for i in safety_idx)
    assert_disjoint(list(candidate), list(safety))
    return PromptSplit(
        candidate_indices=tuple(candidate_idx),
        safety_indices=tuple(safety_idx),
        candidate=candidate,
        safety=safety,
        seed=seed,
        safety_fraction=float(safety_fraction),
        n_distinct=len(keys),
        safety_fingerprint=fingerprint(list(safety)),
        candidate_fingerprint=fingerprint(list(candidate)),
        fingerprint_method=FINGERPRINT_METHOD,
        candidate_categories=category_counts([categories[i] for i in candidate_idx]) if categories else {},
        safety_categories=category_counts([categories[i] for i in safety_idx]) if categories else {},
        n_duplicates_dropped=dropped,
    )


def split_dataset(dataset, *, safety_fraction: float = 0.2, seed: int | None = 0, prompt_column: str = "prompt"):
    """Split a ``datasets.Dataset`` by its prompts: ``(candidate_dataset, safety_dataset, PromptSplit)``."""
    if prompt_column not in dataset.column_names:
        raise ValueError(f"split_dataset: prompt_column {prompt_column!r} is not a column of the dataset")
    categories = list(dataset["category"]) if "category" in dataset.column_names else None
    split = split_prompts(list(dataset[prompt_column]), safety_fraction=safety_fraction, seed=seed,
                          categories=categories)
    return dataset.select(split.candidate_indices), dataset.select(split.safety_indices), split


def prompt_set(source, *, prompt_column: str = "prompt", category_column: str = "category"):
    """Distinct prompts of a dataset or list of rows/strings, in order of first appearance.

    Returns:
        ``(prompts, categories)`` — ``categories`` is a list aligned with ``prompts`` or None when the
        source has no categories.
    """
    if hasattr(source, "column_names"):
        prompts = list(source[prompt_column])
        cats = list(source[category_column]) if category_column in source.column_names else None
    else:
        rows = list(source)
        if rows and isinstance(rows[0], dict):
            prompts = [r[prompt_column] for r in rows]
            cats = [r.get(category_column) for r in rows] if any(category_column in r for r in rows) else None
        else:
            prompts, cats = rows, None
    prompts = _text_list("prompt_set", "prompts", prompts)
    seen, out, out_cats = set(), [], []
    for index, text in enumerate(prompts):
        key = canonical_prompt(text)
        if key in seen:
            continue
        seen.add(key)
        out.append(text)
        if cats is not None:
            out_cats.append(cats[index])
    return out, (out_cats if cats is not None else None)


def category_counts(categories) -> dict[str, int]:
    """``{category: count}`` in FDC order, then any others (None counted as ``"none"``)."""
    counts = Counter("none" if c is None else c for c in categories)
    ordered = {c: counts.pop(c) for c in FDC_CATEGORIES if c in counts}
    ordered.update(sorted(counts.items()))
    return ordered


def parse_ratios(ratios) -> dict[str, float]:
    """``{"EHD": 10, "IHD": 3, "MHD": 1}`` or ``"EHD:10,IHD:3,MHD:1"`` → a dict of positive weights."""
    fn = "compose_by_category"
    if isinstance(ratios, str):
        parsed = {}
        for part in ratios.split(","):
            name, sep, value = part.partition(":")
            if not sep:
                raise ValueError(f"{fn}: ratios string must look like 'EHD:10,IHD:3,MHD:1', got {ratios!r}")
            try:
                parsed[name.strip()] = float(value)
            except ValueError:
                raise ValueError(f"{fn}: ratio for {name.strip()!r} is not a number: {value!r}") from None
        ratios = parsed
    if not isinstance(ratios, dict) or not ratios:
        raise ValueError(f"{fn}: ratios must be a non-empty dict of category -> weight, got {ratios!r}")
    for name, value in ratios.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
            raise ValueError(f"{fn}: ratios[{name!r}] must be a positive number, got {value!r}")
    return {name: float(value) for name, value in ratios.items()}


@dataclass(frozen=True)
class CategoryComposition:
    """A prompt set composed by category ratios.

    Attributes:
        indices: chosen positions in the input, in the (seeded) order they were drawn per category,
            categories interleaved by a final seeded shuffle.
        prompts, categories: the chosen prompts and their categories.
        counts: ``{category: count}`` chosen; ``available``: how many there were.
        ratios, seed: as requested.
    """

    indices: tuple[int, ...]
    prompts: tuple[str, ...]
    categories: tuple[str, ...]
    counts: dict
    available: dict
    ratios: dict
    seed: int

    def record(self) -> dict:
        return {"counts": dict(self.counts), "available": dict(self.available), "ratios": dict(self.ratios),
                "seed": self.seed, "n": len(self.indices)}


def _largest_remainder(total: int, weights: dict[str, float]) -> dict[str, int]:
    scale = total / sum(weights.values())
    exact = {k: w * scale for k, w in weights.items()}
    counts = {k: math.floor(v) for k, v in exact.items()}
    left = total - sum(counts.values())
    for k in sorted(exact, key=lambda k: (-(exact[k] - counts[k]), list(weights).index(k)))[:left]:
        counts[k] += 1
    return counts


def compose_by_category(prompts, categories, ratios, *, total: int | None = None, seed: int = 0) -> CategoryComposition:
    """Draw a prompt set whose categories follow ``ratios`` (FDC), e.g. EHD:IHD:MHD = 10:3:1.

    See docs/method.md#equilibrate-rlhf.

    Args:
        prompts: N prompts; categories: N category labels aligned with them.
        ratios: ``{category: weight}`` or ``"EHD:10,IHD:3,MHD:1"``; categories not named are left out.
        total: size of the set; counts per category by largest remainder. ``None``: the largest set with
            exactly the ratios' proportions (integer multiples; each category's count is
            ``floor(scale·weight)`` for the largest scale the available prompts allow).
        seed: seed of the draw (without replacement, within each category).

    Raises:
        ValueError: a category has fewer prompts than its count needs (naming it), or a bad argument.
    """
    fn = "compose_by_category"
    texts = _text_list(fn, "prompts", prompts)
    categories = list(categories)
    if len(categories) != len(texts):
        raise ValueError(f"{fn}: categories must have one entry per prompt ({len(texts)}), got {len(categories)}")
    weights = parse_ratios(ratios)
    by_category: dict[str, list[int]] = {}
    for index, category in enumerate(categories):
        by_category.setdefault(category, []).append(index)
    available = {k: len(by_category.get(k, [])) for k in weights}
    for k, n in available.items():
        if n == 0:
            present = sorted(map(str, by_category))
            raise ValueError(f"{fn}: no prompts of category {k!r} (categories present: {present})")
    if total is None:
        scale = min(available[k] / w for k, w in weights.items())
        counts = {k: math.floor(scale * w + 1e-9) for k, w in weights.items()}
    else:
        if isinstance(total, bool) or not isinstance(total, int) or total < 1:
            raise ValueError(f"{fn}: total must be a positive int or None, got {total!r}")
        counts = _largest_remainder(total, weights)
    short = {k: (counts[k], available[k]) for k in weights if counts[k] > available[k]}
    if short:
        detail = ", ".join(f"{k} needs {need} but has {have}" for k, (need, have) in short.items())
        raise ValueError(f"{fn}: not enough prompts for the ratios: {detail}")
    rng = random.Random(seed)
    chosen = []
    for k in weights:
        pool = list(by_category[k])
        rng.shuffle(pool)
        chosen.extend(pool[: counts[k]])
    rng.shuffle(chosen)
    return CategoryComposition(
        indices=tuple(chosen),
        prompts=tuple(texts[i] for i in chosen),
        categories=tuple(categories[i] for i in chosen),
        counts=counts,
        available=available,
        ratios=weights,
        seed=seed,
    )
