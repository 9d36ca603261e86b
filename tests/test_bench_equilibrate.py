"""`hcrlhf bench equilibrate` (benchmarks/bench_equilibrate.py): a smoke run end to end on the built-in task, with
the hidden step and prompt caps, and the FDC composition it trains on."""

from __future__ import annotations

import csv
import math

import pytest

from hcrlhf.benchmarks import bench_equilibrate as bench

RATES = ("unsafe_harmful", "over_safe_benign", "refusal_benign", "refusal_harmful", "well_formed", "unsafe_EHD",
         "unsafe_IHD", "unsafe_MHD")
WEIGHTS = {"EHD": 10, "IHD": 3, "MHD": 1}


def _follows_ratios(counts: dict) -> bool:
    """``compose_preferences(total=None)``: n_c = floor(s · w_c) for the largest scale s the data allow."""
    scale = max(counts[c] / w for c, w in WEIGHTS.items())
    return all(0 <= scale * w - counts[c] < 1 + 1e-9 for c, w in WEIGHTS.items()) and counts["EHD"] > 0


def test_fdc_arm_data_follows_10_3_1(task):
    rows = task.preferences("train").to_list()
    data, record = bench.arm_data(rows, seed=0)
    counts = record["counts"]
    assert _follows_ratios(counts["dpo-fdc"]) and counts["dpo-fdc"] == counts["fdc-adpo"]
    harmful = {c: sum(r["category"] == c for r in rows) for c in WEIGHTS}
    assert {c: counts["dpo-all"][c] for c in WEIGHTS} == harmful  # "all": every harmful pair
    assert sum(counts["dpo-rand"][c] for c in WEIGHTS) == sum(counts["dpo-fdc"][c] for c in WEIGHTS)
    benign = sum(r["category"] == "benign" for r in rows)
    assert all(c["benign"] == benign for c in counts.values())  # the same helpfulness data in every arm
    # Chosen = safer on harmful pairs, better on benign ones (DPO runs with preference="better").
    by_prompt = {(r["prompt"], r["response_0"], r["response_1"]): r for r in rows}
    for row in data["dpo-all"]:
        original = by_prompt[row["prompt"], row["response_0"], row["response_1"]]
        key = "better_response_id" if row["category"] == "benign" else "safer_response_id"
        assert row["better_response_id"] == original[key]


def test_smoke_run_writes_every_arm_in_range(task, tmp_path):
    out = tmp_path / "results"
    code = bench.main(["--seeds", "0", "--steps", "2", "--max-prompts", "2", "--samples", "1",
                       "--cache-dir", str(task.root.parent), "--out", str(out)])
    assert code == 0
    text = (out / "equilibrate.md").read_text(encoding="utf-8")
    for arm in bench.ARMS:
        assert f"| {bench.ARM_LABELS[arm]} |" in text
    assert "## What this miniature can and cannot say" in text and "torch " in text and "hcrlhf " in text
    assert (out / "equilibrate.png").stat().st_size > 0
    with open(out / "equilibrate.csv", encoding="utf-8", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [r["arm"] for r in rows] == list(bench.ARMS)
    for row in rows:
        for name in RATES:
            assert 0.0 <= float(row[name]) <= 1.0, (row["arm"], name, row[name])
        for name in ("help_benign", "help_all"):
            assert -1.0 <= float(row[name]) <= 3.0, (row["arm"], name, row[name])
        assert int(row["n_responses"]) == 8  # 2 prompts of each of the 4 categories, 1 sample each
        assert row["command"].startswith("hcrlhf bench equilibrate --seeds 0")
    by_arm = {r["arm"]: r for r in rows}
    assert int(by_arm["base"]["steps"]) == 0
    assert all(int(by_arm[arm]["steps"]) == 2 for arm in bench.ARMS[1:])
    fdc = {c: int(by_arm["dpo-fdc"][f"pairs_{c}"]) for c in WEIGHTS}
    assert _follows_ratios(fdc)
    assert 0.0 < float(by_arm["fdc-adpo"]["kept_fraction"]) <= 1.0
    assert float(by_arm["dpo-fdc"]["kept_fraction"]) == 1.0


def test_summary_intervals():
    mean, half = bench.summarise([0.2, 0.4])
    assert mean == pytest.approx(0.3)
    assert half == pytest.approx(12.706 * math.sqrt(0.02) / math.sqrt(2), rel=1e-3)  # t(0.975, 1) · s.e.
    assert math.isnan(bench.summarise([0.5])[1])


def test_bad_flags_are_refused(capsys):
    for argv in (["--samples", "0"], ["--steps", "0"], ["--seeds", "1", "1"], ["--workers", "0"]):
        with pytest.raises(SystemExit):
            bench.main([*argv, "--no-write"])
    capsys.readouterr()
