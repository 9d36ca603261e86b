"""The candidate / safety split of docs/method.md#data-split (seeded, recorded, fingerprinted, copies
together) and FDC composition."""

import random

import pytest

from hcrlhf.data import PromptSplit, category_counts, compose_by_category, split_dataset, split_prompts
from hcrlhf.safety import fingerprint

PROMPTS = [f"prompt number {i}" for i in range(100)]


def test_split_is_deterministic_and_recorded():
    a = split_prompts(PROMPTS, safety_fraction=0.2, seed=7)
    b = split_prompts(PROMPTS, safety_fraction=0.2, seed=7)
    assert a == b
    assert len(a.safety) == 20 and len(a.candidate) == 80
    assert sorted(a.candidate_indices + a.safety_indices) == list(range(100))
    assert a.seed == 7 and a.record()["seed"] == 7
    assert a.safety_fingerprint == fingerprint(list(a.safety))
    assert a.candidate_fingerprint == fingerprint(list(a.candidate))
    assert a.fingerprint_method == "hcrlhf.safety.fingerprint"
    c = split_prompts(PROMPTS, safety_fraction=0.2, seed=8)
    assert set(c.safety) != set(a.safety)


def test_split_does_not_depend_on_input_order():
    shuffled = list(PROMPTS)
    random.Random(0).shuffle(shuffled)
    a = split_prompts(PROMPTS, seed=3)
    b = split_prompts(shuffled, seed=3)
    assert set(a.safety) == set(b.safety)
    assert a.safety_fingerprint == b.safety_fingerprint


def test_copies_of_a_prompt_stay_on_one_side():
    prompts = [p for p in PROMPTS[:30] for _ in range(3)] + ["prompt   number 0"]  # whitespace variant
    split = split_prompts(prompts, safety_fraction=0.3, seed=1)
    assert not set(split.candidate) & set(split.safety)
    assert split.n_distinct == 30
    both = {" ".join(p.split()) for p in split.candidate} & {" ".join(p.split()) for p in split.safety}
    assert not both
    split.check_training(split.candidate)
    with pytest.raises(ValueError, match="safety"):
        split.check_training([split.safety[0]])


def test_deduplicated_split_keeps_first_copies_and_counts_the_rest(tmp_path):
    prompts = [p for p in PROMPTS[:30] for _ in range(3)] + ["prompt   number 0"]  # whitespace variant
    categories = [f"c{i}" for i in range(len(prompts))]
    split = split_prompts(prompts, safety_fraction=0.3, seed=1, categories=categories, deduplicate=True)
    plain = split_prompts(prompts, safety_fraction=0.3, seed=1, categories=categories)
    assert split.n_duplicates_dropped == len(prompts) - 30 == 61 and plain.n_duplicates_dropped == 0
    assert len(split.safety) == len(set(split.safety)) == 9 and len(split.candidate) == 21
    assert set(split.safety) == set(plain.safety)  # the same split, without the copies
    assert all(prompts.index(prompts[i]) == i for i in split.safety_indices + split.candidate_indices)
    assert split.safety_fingerprint == fingerprint(sorted(set(plain.safety)))
    assert sum(split.safety_categories.values()) == 9
    assert split.record()["n_duplicates_dropped"] == 61
    split.save(tmp_path / "split.json")
    assert PromptSplit.load(tmp_path / "split.json") == split


def test_read_prompt_file_drops_copies(tmp_path):
    import json

    from hcrlhf.pipeline import read_prompt_file

    rows = [{"prompt": p, "category": "EHD"} for p in PROMPTS[:10]] * 4
    rows[10] = {"prompt": "  " + PROMPTS[0].replace(" ", "\n"), "category": "IHD"}  # a re-wrapped copy
    path = tmp_path / "safety.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    prompts, categories = read_prompt_file(path)
    assert prompts == PROMPTS[:10] and categories == ["EHD"] * 10
    from hcrlhf.safety import distinct_prompts

    raw, _ = read_prompt_file(path, distinct=False)
    assert len(raw) == 40 and distinct_prompts(raw)[0] == PROMPTS[:10] and distinct_prompts(raw)[2] == 30
    (tmp_path / "safety.txt").write_text("a\nb\na\n  b \n")
    assert read_prompt_file(tmp_path / "safety.txt") == (["a", "b"], None)


def test_split_seed_none_is_drawn_and_recorded():
    split = split_prompts(PROMPTS, seed=None)
    assert isinstance(split.seed, int)
    assert split_prompts(PROMPTS, seed=split.seed) == split


def test_split_arguments():
    with pytest.raises(ValueError, match="safety_fraction"):
        split_prompts(PROMPTS, safety_fraction=1.0)
    with pytest.raises(ValueError, match="at least 2 distinct"):
        split_prompts(["same", "same "], seed=0)
    with pytest.raises(TypeError, match=r"prompts\[1\]"):
        split_prompts(["a", 3])
    with pytest.raises(TypeError, match="single str"):
        split_prompts("abc")


def test_split_save_load_and_categories(tmp_path):
    categories = ["EHD", "IHD", "MHD", "benign"] * 25
    split = split_prompts(PROMPTS, seed=2, categories=categories)
    assert sum(split.safety_categories.values()) == len(split.safety)
    assert sum(split.candidate_categories.values()) == len(split.candidate)
    split.save(tmp_path / "split.json")
    assert PromptSplit.load(tmp_path / "split.json") == split


def test_split_dataset_keeps_pairs_of_a_prompt_together():
    import datasets

    rows = [{"prompt": f"p{i % 10}", "response_0": "a", "category": "benign"} for i in range(40)]
    candidate, safety, split = split_dataset(datasets.Dataset.from_list(rows), safety_fraction=0.3, seed=0)
    assert len(candidate) + len(safety) == 40
    assert not set(candidate["prompt"]) & set(safety["prompt"])
    assert len(set(safety["prompt"])) == 3 and split.safety_categories == {"benign": 12}


def test_compose_by_category_exact_ratio_and_counts():
    prompts = [f"q{i}" for i in range(200)]
    categories = ["EHD"] * 100 + ["IHD"] * 40 + ["MHD"] * 20 + ["benign"] * 40
    comp = compose_by_category(prompts, categories, {"EHD": 10, "IHD": 3, "MHD": 1}, seed=0)
    assert comp.counts == {"EHD": 100, "IHD": 30, "MHD": 10}
    assert category_counts(comp.categories) == comp.counts
    assert len(set(comp.indices)) == 140
    assert all(categories[i] == c for i, c in zip(comp.indices, comp.categories))
    assert compose_by_category(prompts, categories, "EHD:10,IHD:3,MHD:1", seed=0) == comp
    other = compose_by_category(prompts, categories, {"EHD": 10, "IHD": 3, "MHD": 1}, seed=1)
    assert other.counts == comp.counts and other.indices != comp.indices

    sized = compose_by_category(prompts, categories, {"EHD": 10, "IHD": 3, "MHD": 1}, total=28, seed=0)
    assert sized.counts == {"EHD": 20, "IHD": 6, "MHD": 2}
    with pytest.raises(ValueError, match="MHD needs 21 but has 20"):
        compose_by_category(prompts, categories, {"EHD": 10, "IHD": 3, "MHD": 1}, total=294)
    with pytest.raises(ValueError, match="no prompts of category 'XHD'"):
        compose_by_category(prompts, categories, {"XHD": 1})
    with pytest.raises(ValueError, match=r"ratios\['EHD'\] must be a positive number"):
        compose_by_category(prompts, categories, {"EHD": 0})
