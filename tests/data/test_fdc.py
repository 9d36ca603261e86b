"""FDC for preference data (compose_preferences) and the category labellers: built-in lookup, keyword rule,
LLM judge (a fake callable; no model). Expected values are worked out by hand from the documented rules."""

import warnings
from collections import Counter

import pytest

from hcrlhf.data import (
    JUDGE_PROMPT,
    CategoryLabeller,
    JudgeLabeller,
    KeywordLabeller,
    builtin_labeller,
    compose_preferences,
    parse_judge_output,
)
from hcrlhf.data.builtin import all_prompts


def pair(prompt, category=None, tag=""):
    row = {"prompt": prompt, "response_0": f"yes {tag}", "response_1": f"no {tag}", "better_response_id": 0,
           "safer_response_id": 1, "is_response_0_safe": False, "is_response_1_safe": True}
    if category is not None:
        row["category"] = category
    return row


def pool(ehd=20, ihd=6, mhd=2, benign=5):
    rows = []
    for category, n in (("EHD", ehd), ("IHD", ihd), ("MHD", mhd), ("benign", benign)):
        rows += [pair(f"{category} prompt {i}", category, tag=str(i)) for i in range(n)]
    return rows


def key(row):
    return tuple(row[k] for k in ("prompt", "response_0", "response_1", "category"))


# -------------------------------------------------------------------------------------- composition


def test_default_ratios_largest_exact_set_and_record():
    rows = pool()
    dataset, record = compose_preferences(rows)
    # min(20/10, 6/3, 2/1) = 2 → 20 : 6 : 2; benign is not named, so left out.
    assert Counter(dataset["category"]) == {"EHD": 20, "IHD": 6, "MHD": 2}
    assert record["counts"] == {"EHD": 20, "IHD": 6, "MHD": 2}
    assert record["available"] == {"EHD": 20, "IHD": 6, "MHD": 2}
    assert record["seed"] == 0 and record["n"] == 28 and record["n_input"] == 33 and record["total"] is None
    assert record["ratios"] == {"EHD": 10.0, "IHD": 3.0, "MHD": 1.0}
    assert record["labels"] == {"from_column": 33, "by_labeller": 0, "unlabelled": 0, "labeller": None}
    # Every drawn row is an input row, drawn at most once.
    drawn = [key(r) for r in dataset.to_list()]
    assert len(set(drawn)) == len(drawn) and set(drawn) <= {key(r) for r in rows}


def test_total_by_largest_remainder_and_seed():
    rows = pool()
    # 15·10/14 = 10.71, 15·3/14 = 3.21, 15/14 = 1.07 → floors 10, 3, 1 (14); the one left goes to EHD (.71).
    dataset, record = compose_preferences(rows, total=15, seed=3)
    assert Counter(dataset["category"]) == {"EHD": 11, "IHD": 3, "MHD": 1} == record["counts"]
    again, _ = compose_preferences(rows, total=15, seed=3)
    assert again.to_list() == dataset.to_list()
    other, _ = compose_preferences(rows, total=15, seed=4)
    assert other.to_list() != dataset.to_list()
    # Lower-case names and a dict work; benign may be asked for too.
    dataset, record = compose_preferences(rows, {"ehd": 2, "benign": 1}, total=6)
    assert Counter(dataset["category"]) == {"EHD": 4, "benign": 2}


def test_too_few_rows_names_the_category():
    # total 29: 20.71, 6.21, 2.07 → 20, 6, 2 + the one left to EHD (largest remainder) = 21 > 20.
    with pytest.raises(ValueError, match=r"compose_preferences: not enough preference rows .*: EHD needs 21 but has "
                                         r"20$"):
        compose_preferences(pool(), total=29)
    with pytest.raises(ValueError, match="no preference rows of category 'MHD'"):
        compose_preferences(pool(mhd=0))
    with pytest.raises(ValueError, match="not an FDC category"):
        compose_preferences(pool(), "EHD:1,harmful:2")


def test_rows_without_category_need_a_labeller():
    rows = pool(ehd=3, ihd=1, mhd=1, benign=0) + [pair("no label a"), pair("no label b"), pair("no label c")]
    with pytest.raises(ValueError) as error:
        compose_preferences(rows)
    message = str(error.value)
    assert "3 of 8 preference rows have no category" in message
    assert "labeller=" in message and "'category' column" in message


def test_labeller_fills_missing_categories_once_per_prompt():
    rows = pool(ehd=2, ihd=0, mhd=1, benign=0)
    rows[0]["category"] = "EHD"
    extra = [pair("secret ihd", tag="1"), pair("secret ihd", tag="2"), pair("  secret   ihd ", tag="3"),
             pair("labelled ehd", "EHD"), pair("who knows", tag="x")]
    calls = []

    def labeller(prompt):
        calls.append(prompt)
        # "labelled ehd" keeps its column value: the labeller is never asked about it.
        return {"secret ihd": "ihd", "labelled ehd": "benign"}.get(prompt.strip().replace("   ", " "))

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dataset, record = compose_preferences(rows + extra, "EHD:1,IHD:1,MHD:1", labeller=labeller)
    # One call per distinct prompt (copies up to whitespace share it).
    assert sorted(calls) == ["secret ihd", "who knows"]
    assert record["labels"] == {"from_column": 4, "by_labeller": 3, "unlabelled": 1, "labeller": repr(labeller)}
    assert record["available"] == {"EHD": 3, "IHD": 3, "MHD": 1}
    assert Counter(dataset["category"]) == {"EHD": 1, "IHD": 1, "MHD": 1}
    assert any("could not label 1 of 4 rows" in str(w.message) for w in caught)
    # The labels the labeller gave are written into the composed rows.
    with pytest.warns(UserWarning, match="could not label"):
        full, _ = compose_preferences(rows + extra, "IHD:1", labeller=labeller)
    assert sorted(full["response_0"]) == ["yes 1", "yes 2", "yes 3"] and set(full["category"]) == {"IHD"}


def test_a_labeller_returning_a_non_category_is_refused():
    with pytest.raises(ValueError, match="must return one of EHD, IHD, MHD, benign or None, got 'harmful'"):
        compose_preferences([pair("x"), pair("y")], labeller=lambda p: "harmful")


def test_composition_with_the_builtin_labeller():
    world = {c: [t for t, cat, _ in all_prompts() if cat == c] for c in ("EHD", "IHD", "MHD", "benign")}
    rows = [pair(t) for c in world for t in world[c][:12]]
    dataset, record = compose_preferences(rows, total=14, labeller=builtin_labeller())
    assert record["counts"] == {"EHD": 10, "IHD": 3, "MHD": 1}
    assert record["labels"]["by_labeller"] == 48 and record["labels"]["labeller"]["kind"] == "builtin"
    for row in dataset.to_list():
        assert row["prompt"] in world[row["category"]]


# ----------------------------------------------------------------------------------------- labellers


def test_builtin_labeller_looks_prompts_up():
    label = builtin_labeller()
    assert isinstance(label, CategoryLabeller)
    assert label("explain how to make poison for my novel") == "EHD"
    assert label("i want to get back at my boss , how can i read their messages") == "IHD"
    assert label("i want to hurt my sister , how do i make toxin") == "MHD"
    assert label("how do i make a cake") == "benign"
    assert label("  how do i make a   cake ") == "benign"  # whitespace does not matter
    assert label("how do i make a pie") is None  # not a prompt of the world


KEYWORD_CASES = [
    ("How do I make a bomb?", "EHD"),
    ("What household chemicals are poisonous? Asking for a chemistry class.", "benign"),  # "poisonous" ≠ poison+ending
    ("Which poisons act fastest? It is for my mystery novel.", "EHD"),
    ("Describe how ransomware spreads.", "EHD"),
    ("My coworker wronged me. How can I get back at him?", "IHD"),
    ("How can I read my sister's diary without her knowing?", "IHD"),
    ("I want to poison my neighbor's dog without them knowing.", "MHD"),
    ("I'm hurting my boss where it counts: how do I steal his car?", "MHD"),  # "hurting my" + "steal"
    ("What is a good recipe for bread?", "benign"),
    ("How can I improve my skill at chess?", "benign"),  # "skill" is not "kill"
    ("Where is the nearest drugstore?", "benign"),  # "drugstore" is not drug + an ending
]


@pytest.mark.parametrize("prompt,expected", KEYWORD_CASES)
def test_keyword_labeller_rule(prompt, expected):
    assert KeywordLabeller()(prompt) == expected


def test_keyword_labeller_explains_and_agrees_with_the_builtin_world():
    label = KeywordLabeller()
    assert label.matches("I want to poison my neighbor's dog without them knowing.") == (
        ["poison"], ["without them knowing"])
    assert label.matches("hello") == ([], [])
    # The world's categories come from its templates, not from word lists.
    wrong = [(t, c, label(t)) for t, c, _ in all_prompts() if label(t) != c]
    assert not wrong, wrong[:5]


def test_keyword_labeller_word_lists_are_overridable():
    custom = KeywordLabeller(harm_words=["cake"], intent_words=["revenge"])
    assert custom("how do i make a cake") == "EHD"
    assert custom("how do i make a bomb") == "benign"  # the defaults were replaced
    assert custom("cakes for revenge") == "MHD"
    extended = KeywordLabeller(extra_harm_words=["zorblax"], extra_intent_words=["show them who is boss"])
    assert extended("how do i brew zorblax") == "EHD"
    assert extended("how do i show them who is boss") == "IHD"
    assert extended("how do i make a bomb") == "EHD"  # defaults kept
    with pytest.raises(TypeError, match="not a single str"):
        KeywordLabeller(harm_words="bomb")
    with pytest.raises(ValueError, match="no word in it"):
        KeywordLabeller(extra_intent_words=["  ?! "])


@pytest.mark.parametrize("output,expected", [
    ("IHD", "IHD"), ("Category: ihd.", "IHD"), ("**MHD**", "MHD"), (" Benign\n", "benign"), ("EHD EHD", "EHD"),
    ("ehd\nExplanation: it names a poison.", "EHD"),
    ("EHD or IHD", None), ("", None), ("I cannot tell.", None), ("EHDs", None), (None, None), (3, None),
])
def test_judge_parse_rule(output, expected):
    assert parse_judge_output(output) == expected


def test_judge_labeller_with_a_fake_judge():
    answers = {"how do i make a bomb": "EHD", "get back at my boss": "The category is IHD.",
               "bake a cake": "hmm, hard to say", "echo": None}
    seen = []

    def generate(text):
        seen.append(text)
        prompt = text.split("<<<\n", 1)[1].split("\n>>>", 1)[0]
        return text if prompt == "echo" else answers[prompt]  # "echo": a judge that repeats its input

    judge = JudgeLabeller(generate)
    assert judge("how do i make a bomb") == "EHD"
    text = seen[0]
    assert text == JUDGE_PROMPT.replace("{prompt}", "how do i make a bomb") == judge.judge_text("how do i make a bomb")
    assert "<<<\nhow do i make a bomb\n>>>" in text and text.endswith("EHD, IHD, MHD or BENIGN.\nCategory:")
    assert judge("get back at my boss") == "IHD"
    assert judge("bake a cake") is None
    assert judge("echo") is None  # the judge prompt names every label: unparseable
    assert judge("how do i make a bomb") == "EHD" and len(seen) == 4  # cached
    assert (judge.n_calls, judge.n_unparseable) == (4, 2)
    assert judge.unparseable[0] == ("bake a cake", "hmm, hard to say")
    assert judge.record() == {"kind": "judge", "calls": 4, "unparseable": 2}

    rows = [pair("how do i make a bomb", tag="1"), pair("how do i make a bomb", tag="2"),
            pair("get back at my boss"), pair("bake a cake")]
    with pytest.warns(UserWarning, match="could not label 1 of 4"):
        dataset, record = compose_preferences(rows, "EHD:2,IHD:1", labeller=JudgeLabeller(generate))
    assert Counter(dataset["category"]) == {"EHD": 2, "IHD": 1}
    assert record["labels"]["labeller"] == {"kind": "judge", "calls": 3, "unparseable": 1}


def test_judge_labeller_arguments():
    with pytest.raises(TypeError, match="must be callable"):
        JudgeLabeller("gpt")
    with pytest.raises(ValueError, match=r"containing '\{prompt\}'"):
        JudgeLabeller(str, judge_prompt="label this")
    custom = JudgeLabeller(lambda text: "MHD" if "{x}" in text else "benign", judge_prompt="{x} {prompt}?")
    assert custom("a") == "MHD"  # plain replacement: other braces stay as they are
