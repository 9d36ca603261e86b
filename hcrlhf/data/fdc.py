"""FDC for preference data (docs/method.md#fdc-for-preference-data) and pluggable prompt-category labellers.

Equilibrate RLHF (Tan et al., 2025) composes safety preference data by prompt category — explicit harmful
(EHD), implicit harmful (IHD) and mixed (MHD) — in the ratio 10k : 3k : 1k. :func:`compose_preferences` does
that for preference pairs: it validates the rows (:func:`~hcrlhf.data.load_preferences`), labels the rows that
carry no ``category`` with a :class:`CategoryLabeller`, and draws the rows per category with
:func:`~hcrlhf.data.compose_by_category` (largest remainder, seeded).

Labellers (each a callable ``prompt -> category or None``; None means "cannot tell"):

* :func:`builtin_labeller` — the built-in task's own categories (exact lookup);
* :class:`KeywordLabeller` — a documented rule on word lists (user-overridable);
* :class:`JudgeLabeller` — any ``generate(text) -> str`` callable (an LLM judge) with :data:`JUDGE_PROMPT`.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable
from typing import Protocol, runtime_checkable

from hcrlhf.data.preferences import FDC_CATEGORIES, load_preferences, preferences_from_rows
from hcrlhf.data.prompts import compose_by_category, parse_ratios
from hcrlhf.safety.ledger import canonical_prompt

__all__ = [
    "CategoryLabeller",
    "builtin_labeller",
    "KeywordLabeller",
    "JudgeLabeller",
    "JUDGE_PROMPT",
    "DEFAULT_HARM_WORDS",
    "DEFAULT_INTENT_WORDS",
    "compose_preferences",
    "parse_judge_output",
]

DEFAULT_FDC_RATIOS = "EHD:10,IHD:3,MHD:1"
_CATEGORY_LOOKUP = {c.lower(): c for c in FDC_CATEGORIES}


@runtime_checkable
class CategoryLabeller(Protocol):
    """Anything callable as ``labeller(prompt) -> category or None``.

    The category is one of :data:`~hcrlhf.data.FDC_CATEGORIES` (``"EHD"``, ``"IHD"``, ``"MHD"``, ``"benign"``;
    case-insensitive); None means the labeller cannot tell (the row is then left out of a composition and
    counted). A labeller may also have a ``record() -> dict`` method, whose result a composition records.
    """

    def __call__(self, prompt: str) -> str | None: ...


def _normalise_category(value, who: str) -> str | None:
    if value is None:
        return None
    category = _CATEGORY_LOOKUP.get(value.strip().lower()) if isinstance(value, str) else None
    if category is None:
        raise ValueError(f"{who}: a labeller must return one of {', '.join(FDC_CATEGORIES)} or None, got {value!r}")
    return category


# ------------------------------------------------------------------------------------------ built-in


class _BuiltinLabeller:
    def __init__(self):
        from hcrlhf.data.builtin import all_prompts

        self._table = {canonical_prompt(text): category for text, category, _ in all_prompts()}

    def __call__(self, prompt: str) -> str | None:
        return self._table.get(canonical_prompt(prompt))

    def record(self) -> dict:
        return {"kind": "builtin", "prompts": len(self._table)}

    def __repr__(self) -> str:
        return "builtin_labeller()"


def builtin_labeller() -> CategoryLabeller:
    """The built-in task's categories: an exact lookup of the prompt (up to Unicode NFC and whitespace, as
    :func:`~hcrlhf.safety.canonical_prompt`) among :func:`hcrlhf.data.builtin.all_prompts`; None for a prompt
    that is not one of the built-in world's."""
    return _BuiltinLabeller()


# ------------------------------------------------------------------------------------------ keywords

#: Words and phrases that name a harmful item or act (explicit harmful content), in English, for
#: PKU-SafeRLHF-style prompts: weapons and explosives, poisons and agents, drugs, malware and intrusion, theft
#: and fraud, violence, abuse, trafficking, self-harm. Matched as described in :class:`KeywordLabeller`.
DEFAULT_HARM_WORDS = (
    # weapons, explosives, poisons
    "weapon", "gun", "firearm", "rifle", "ammunition", "explosive", "bomb", "grenade", "detonator", "napalm",
    "molotov", "poison", "toxin", "cyanide", "arsenic", "ricin", "anthrax", "sarin", "nerve agent", "bioweapon",
    "chemical weapon",
    # drugs
    "drug", "cocaine", "heroin", "meth", "methamphetamine", "fentanyl", "lsd", "mdma", "opioid", "overdose",
    # cybercrime
    "malware", "ransomware", "spyware", "keylogger", "computer virus", "trojan", "botnet", "ddos", "phishing",
    "hack into", "hacker", "sql injection",
    # theft, fraud, economic crime
    "steal", "stole", "stolen", "theft", "shoplift", "shoplifting", "rob", "robbed", "robbing", "robbery",
    "burglary", "burglar", "lockpick", "pick a lock", "hotwire", "counterfeit", "forgery", "fraud", "scam",
    "launder", "money laundering", "embezzle", "tax evasion", "bribe", "extort", "extortion", "blackmail",
    "ponzi", "insider trading", "identity theft",
    # violence, abuse, trafficking
    "kill", "murder", "assassinate", "stab", "stabbed", "stabbing", "strangle", "torture", "kidnap",
    "kidnapped", "kidnapping", "abduct", "rape", "assault", "arson", "terrorist", "terrorism", "massacre",
    "genocide", "human trafficking", "traffick", "smuggle", "child pornography", "stalk", "dox", "harass",
    "racial slur",
    # self-harm
    "suicide", "self-harm", "self harm",
)

#: Words and phrases that show malicious intent toward someone without naming harmful content: revenge,
#: wanting someone hurt or suffering, acting against someone behind their back. Matched as described in
#: :class:`KeywordLabeller`.
DEFAULT_INTENT_WORDS = (
    "get back at", "revenge", "payback", "get even with", "make them pay", "make him pay", "make her pay",
    "teach them a lesson", "teach him a lesson", "teach her a lesson", "wronged", "suffers", "make them suffer",
    "make him suffer", "make her suffer", "hurt my", "hurt him", "hurt her", "hurt them", "hurt someone",
    "hurt somebody", "hurt people", "harm my", "harm him", "harm her", "harm them", "harm someone",
    "harm people", "punish my", "humiliate", "ruin his", "ruin her", "ruin their", "ruin my", "destroy his",
    "destroy her", "destroy their", "without them knowing", "without him knowing", "without her knowing",
    "without anyone knowing", "without getting caught", "not get caught", "get away with", "behind their back",
    "behind his back", "behind her back", "spy on", "frame my", "frame him", "frame her", "threaten",
    "intimidate", "manipulate",
)
_INFLECTIONS = ("", "s", "es", "ed", "d", "ing", "er", "ers")
_TOKEN = re.compile(r"[a-z0-9]+(?:['’-][a-z0-9]+)*")


def _tokens(text: str) -> list[str]:
    return _TOKEN.findall(text.lower())


def _phrase_list(words, what: str) -> tuple[tuple[str, ...], ...]:
    if isinstance(words, str):
        raise TypeError(f"KeywordLabeller: {what} must be a collection of words or phrases, not a single str")
    phrases = []
    for word in words:
        if not isinstance(word, str):
            raise TypeError(f"KeywordLabeller: {what} must hold strings, got {type(word).__name__} {word!r}")
        tokens = tuple(_tokens(word))
        if not tokens:
            raise ValueError(f"KeywordLabeller: {what} holds {word!r}, which has no word in it")
        phrases.append(tokens)
    return tuple(dict.fromkeys(phrases))


def _word_matches(listed: str, token: str) -> bool:
    return token.startswith(listed) and token[len(listed):] in _INFLECTIONS


def _find(phrases, tokens: list[str]) -> list[str]:
    """The listed phrases that occur in ``tokens`` (each word possibly inflected), in list order."""
    hits = []
    for phrase in phrases:
        n = len(phrase)
        if any(all(_word_matches(w, t) for w, t in zip(phrase, tokens[start:start + n]))
               for start in range(len(tokens) - n + 1)):
            hits.append(" ".join(phrase))
    return hits


class KeywordLabeller:
    """A rule-based FDC labeller on two word lists.

    The rule. The prompt is lower-cased and split into words (runs of letters and digits, joined across an
    inner ``'``, ``’`` or ``-``: "self-harm" is one word). A listed word or phrase (split the same way)
    *occurs* when its words appear consecutively in the prompt, each possibly followed by one of the endings
    ``s es ed d ing er ers`` ("poison" occurs in "poisoning", "hurt my" in "hurting my"; irregular forms
    such as "robbed" are listed separately). Then:

    * **explicit harm** — a harm word occurs (the prompt names a harmful item or act);
    * **malicious intent** — an intent word occurs;
    * both → ``"MHD"``; explicit harm only → ``"EHD"``; intent only → ``"IHD"``; neither → ``"benign"``.

    The labeller never returns None. It is a heuristic: it ignores negation ("how do i avoid poisoning my
    dog" is EHD) and context ("a surprise party without them knowing" is IHD); check a sample of its labels,
    or use a :class:`JudgeLabeller`, before trusting a composition built on it.

    Args:
        harm_words: replaces :data:`DEFAULT_HARM_WORDS`.
        intent_words: replaces :data:`DEFAULT_INTENT_WORDS`.
        extra_harm_words, extra_intent_words: added to the lists (defaults or replacements).
    """

    def __init__(self, harm_words=None, intent_words=None, *, extra_harm_words=(), extra_intent_words=()):
        harm = list(DEFAULT_HARM_WORDS if harm_words is None else _listed(harm_words, "harm_words"))
        intent = list(DEFAULT_INTENT_WORDS if intent_words is None else _listed(intent_words, "intent_words"))
        self.harm_words = _phrase_list(harm + _listed(extra_harm_words, "extra_harm_words"), "harm_words")
        self.intent_words = _phrase_list(intent + _listed(extra_intent_words, "extra_intent_words"), "intent_words")
        if not self.harm_words and not self.intent_words:
            raise ValueError("KeywordLabeller: both word lists are empty; every prompt would be 'benign'")

    def matches(self, prompt: str) -> tuple[list[str], list[str]]:
        """``(harm words found, intent words found)`` in ``prompt`` — why it got its label."""
        if not isinstance(prompt, str):
            raise TypeError(f"KeywordLabeller: prompt must be a str, got {type(prompt).__name__}")
        tokens = _tokens(prompt)
        return _find(self.harm_words, tokens), _find(self.intent_words, tokens)

    def __call__(self, prompt: str) -> str:
        harm, intent = self.matches(prompt)
        if harm and intent:
            return "MHD"
        if harm:
            return "EHD"
        if intent:
            return "IHD"
        return "benign"

    def record(self) -> dict:
        return {"kind": "keyword", "harm_words": len(self.harm_words), "intent_words": len(self.intent_words)}

    def __repr__(self) -> str:
        return f"KeywordLabeller({len(self.harm_words)} harm words, {len(self.intent_words)} intent words)"


def _listed(words, what: str) -> list:
    if isinstance(words, str):
        raise TypeError(f"KeywordLabeller: {what} must be a collection of words or phrases, not a single str")
    return list(words)


# -------------------------------------------------------------------------------------------- judge

#: The judge prompt of :class:`JudgeLabeller`; ``{prompt}`` is replaced by the prompt to label (by plain text
#: replacement, so braces elsewhere are kept as they are).
JUDGE_PROMPT = """\
You label user prompts for safety training data. Put the user prompt below in exactly one category:

EHD (explicit harmful): the prompt asks for harmful content - it names a harmful item or act (a poison, a \
weapon, malware, drugs, stealing, violence...) - but shows no intent to harm anyone (e.g. it is for a novel, \
a class or curiosity).
IHD (implicit harmful): the prompt shows malicious intent toward someone (revenge, wanting them to suffer, \
acting against them without their knowledge) but names no harmful item or act.
MHD (mixed harmful): the prompt both names harmful content and shows malicious intent.
BENIGN: the prompt does neither.

User prompt:
<<<
{prompt}
>>>

Answer with one word: EHD, IHD, MHD or BENIGN.
Category:"""

_JUDGE_LABELS = {"ehd": "EHD", "ihd": "IHD", "mhd": "MHD", "benign": "benign"}
_JUDGE_WORD = re.compile(r"[a-z]+")


def parse_judge_output(output) -> str | None:
    """The category a judge's output names, or None when it is unparseable.

    The parse rule: the output (a str) is lower-cased and split into runs of letters; the runs equal to
    ``ehd``, ``ihd``, ``mhd`` or ``benign`` are the labels it names. Exactly one distinct label named →
    that category (``"EHD"``, ``"IHD"``, ``"MHD"`` or ``"benign"``), however often it is repeated
    ("IHD", "Category: ihd.", "**MHD**" parse); none, or two different ones ("EHD or IHD"), or an output that
    is not a str → None.
    """
    if not isinstance(output, str):
        return None
    named = {_JUDGE_LABELS[w] for w in _JUDGE_WORD.findall(output.lower()) if w in _JUDGE_LABELS}
    return named.pop() if len(named) == 1 else None


class JudgeLabeller:
    """An FDC labeller that asks a judge: ``generate(JUDGE_PROMPT with the prompt in it) -> str``, parsed with
    :func:`parse_judge_output`.

    ``generate`` is any callable from text to text — an LLM behind an API, a local ``transformers`` pipeline
    wrapped to return only the new text (an echo of the judge prompt names every label and is unparseable).
    Its exceptions propagate. An unparseable output gives None (the row is left out of a composition) and is
    counted: ``n_calls``, ``n_unparseable``, and the first ``keep_unparseable`` ``(prompt, output)`` pairs in
    ``unparseable``. Answers are cached per prompt (up to :func:`~hcrlhf.safety.canonical_prompt`), so each
    distinct prompt costs one call.

    Args:
        generate: the judge.
        judge_prompt: the template; must contain ``{prompt}``. Defaults to :data:`JUDGE_PROMPT`.
        keep_unparseable: how many unparseable outputs to keep for inspection.
    """

    def __init__(self, generate: Callable[[str], str], *, judge_prompt: str = JUDGE_PROMPT,
                 keep_unparseable: int = 20):
        if not callable(generate):
            raise TypeError(f"JudgeLabeller: generate must be callable (text -> text), got {type(generate).__name__}")
        if not isinstance(judge_prompt, str) or "{prompt}" not in judge_prompt:
            raise ValueError("JudgeLabeller: judge_prompt must be a str containing '{prompt}'")
        self.generate = generate
        self.judge_prompt = judge_prompt
        self.keep_unparseable = keep_unparseable
        self.n_calls = 0
        self.n_unparseable = 0
        self.unparseable: list[tuple[str, object]] = []
        self._cache: dict[str, str | None] = {}

    def judge_text(self, prompt: str) -> str:
        """The text handed to ``generate`` for ``prompt``."""
        return self.judge_prompt.replace("{prompt}", prompt)

    def __call__(self, prompt: str) -> str | None:
        if not isinstance(prompt, str):
            raise TypeError(f"JudgeLabeller: prompt must be a str, got {type(prompt).__name__}")
        key = canonical_prompt(prompt)
        if key in self._cache:
            return self._cache[key]
        output = self.generate(self.judge_text(prompt))
        self.n_calls += 1
        category = parse_judge_output(output)
        if category is None:
            self.n_unparseable += 1
            if len(self.unparseable) < self.keep_unparseable:
                self.unparseable.append((prompt, output))
        self._cache[key] = category
        return category

    def record(self) -> dict:
        return {"kind": "judge", "calls": self.n_calls, "unparseable": self.n_unparseable}

    def __repr__(self) -> str:
        return f"JudgeLabeller({self.generate!r})"


# -------------------------------------------------------------------------------------- composition


def _ratio_weights(ratios) -> dict[str, float]:
    weights = parse_ratios(ratios)
    out = {}
    for name, weight in weights.items():
        category = _CATEGORY_LOOKUP.get(str(name).strip().lower())
        if category is None:
            raise ValueError(f"compose_preferences: ratios name {name!r}, which is not an FDC category "
                             f"({', '.join(FDC_CATEGORIES)})")
        if category in out:
            raise ValueError(f"compose_preferences: ratios name the category {category!r} twice")
        out[category] = weight
    return out


def compose_preferences(dataset_or_rows, ratios=DEFAULT_FDC_RATIOS, *, total: int | None = None, seed: int = 0,
                        labeller: CategoryLabeller | None = None):
    """Compose preference pairs by FDC category (docs/method.md#fdc-for-preference-data).

    Args:
        dataset_or_rows: preference pairs in the PKU-SafeRLHF schema — a ``datasets.Dataset`` or a list of
            dicts — each optionally with a ``category`` (EHD / IHD / MHD / benign). Every row is validated
            (:func:`~hcrlhf.data.load_preferences`; a bad row raises).
        ratios: ``{category: weight}`` or ``"EHD:10,IHD:3,MHD:1"`` (the default, Equilibrate RLHF's 10k : 3k : 1k);
            FDC categories only (case-insensitive); categories not named are left out.
        total: number of rows to draw, split over the categories by largest remainder; None: the largest set
            with exactly the ratios' proportions (see :func:`~hcrlhf.data.compose_by_category`, which draws).
            The unit is a preference row (a pair), not a distinct prompt.
        seed: seed of the draw (without replacement within each category, then a seeded shuffle).
        labeller: a :class:`CategoryLabeller` for the rows without a ``category`` (called once per distinct
            prompt). Rows it returns None for are left out of the draw and counted. Rows that have a
            category keep it.

    Returns:
        ``(dataset, record)``: the drawn rows as a ``datasets.Dataset`` with a filled ``category`` column, and
        a dict with ``counts`` and ``available`` per category, ``ratios``, ``seed``, ``total``, ``n``,
        ``n_input`` and ``labels`` (``{"from_column", "by_labeller", "unlabelled"}`` row counts, and
        ``labeller``: its ``record()`` or ``repr``).

    Raises:
        ValueError: rows without a category and no labeller (saying how many and how to fix it), a category
            with too few rows for the ratios, bad ratios or rows, or a labeller returning a non-category.
    """
    fn = "compose_preferences"
    weights = _ratio_weights(ratios)
    dataset = load_preferences(dataset_or_rows)
    rows = dataset.to_list()
    if labeller is not None and not callable(labeller):
        raise TypeError(f"{fn}: labeller must be callable (prompt -> category or None), got {type(labeller).__name__}")
    missing = [i for i, r in enumerate(rows) if r.get("category") is None]
    if missing and labeller is None:
        raise ValueError(
            f"{fn}: {len(missing)} of {len(rows)} preference rows have no category (first at row {missing[0]}); "
            "pass labeller= (hcrlhf.data.builtin_labeller() for the built-in task, KeywordLabeller(), or a "
            "JudgeLabeller(generate)) or add a 'category' column (EHD / IHD / MHD / benign) to the data")
    labelled: dict[str, str | None] = {}
    for i in missing:
        key = canonical_prompt(rows[i]["prompt"])
        if key not in labelled:
            labelled[key] = _normalise_category(labeller(rows[i]["prompt"]), fn)
        rows[i]["category"] = labelled[key]
    unlabelled = sum(rows[i]["category"] is None for i in missing)
    if unlabelled:
        warnings.warn(f"{fn}: the labeller could not label {unlabelled} of {len(missing)} rows; they are left out "
                      "of the composition", stacklevel=2)
    try:
        composition = compose_by_category([r["prompt"] for r in rows], [r["category"] for r in rows], weights,
                                          total=total, seed=seed)
    except ValueError as error:  # the same check, in this function's unit: preference rows
        message = str(error).removeprefix("compose_by_category: ").replace("not enough prompts", "not enough "
                                                                           "preference rows")
        raise ValueError(f"{fn}: {message.replace('no prompts of', 'no preference rows of')}") from None
    chosen = [rows[i] for i in composition.indices]
    record = composition.record()
    labeller_record = None
    if labeller is not None:
        labeller_record = labeller.record() if callable(getattr(labeller, "record", None)) else repr(labeller)
    record.update(total=total, n_input=len(rows), labels={
        "from_column": len(rows) - len(missing), "by_labeller": len(missing) - unlabelled, "unlabelled": unlabelled,
        "labeller": labeller_record})
    return preferences_from_rows(chosen), record
