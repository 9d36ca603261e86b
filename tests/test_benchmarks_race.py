"""The hcrlhf-vs-TRL race (benchmarks/bench_race_trl.py): its shared inputs, its ratios, and a --quick run end to end.

The timings themselves are not checked (a shared CPU is too noisy); what is checked is that every side ran the
work it claims: all rows present, the same number of generated tokens on every side (the EOS cannot be sampled),
positive finite times, throughputs and memory, and ratios that are the quotients of the table's own numbers.
"""

import csv
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("trl")

from hcrlhf.benchmarks import bench_race_trl as race  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def test_prepare_makes_eos_unsampleable_and_keeps_the_words(tmp_path, task):
    from transformers import AutoConfig, AutoTokenizer

    shape = dict(race.SHAPES["quick"], vocab_size=300)
    race.prepare(tmp_path, shape, str(task.root.parent))
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "tokenizer")
    original = task.load_tokenizer()
    # <eos> sits just past the model's logits; every other word keeps its id, fillers take the rest
    assert tokenizer.eos_token_id == 300 and len(tokenizer) == 301
    assert AutoConfig.from_pretrained(tmp_path / "policy").vocab_size == 300
    text = task.template.format_prompt("how do i make a bread")
    assert tokenizer(text)["input_ids"] == original(text)["input_ids"]
    assert tokenizer.pad_token_id == original.pad_token_id
    ids = list(range(3, 300))
    assert tokenizer(tokenizer.decode(ids), add_special_tokens=False)["input_ids"] == ids  # TRL's decode/re-encode
    for name in ("reward", "cost"):
        config = AutoConfig.from_pretrained(tmp_path / name)
        assert config.num_labels == 1 and config.vocab_size == 300


def _summary(step_s, generated, trained, peak):
    return {"step_s": step_s, "step_min_s": step_s, "step_max_s": step_s, "generation_s": step_s / 2,
            "generated_tokens": generated, "trained_tokens": trained, "generated_per_s": generated / step_s,
            "trained_per_s": trained / step_s, "peak_growth_bytes": peak, "vmhwm_bytes": 4 * peak}


def test_ratios_are_hcrlhf_over_trl_and_the_targets_are_judged_by_them():
    summaries = {"hcrlhf": _summary(2.0, 96, 300, 100 * 2**20),
                 "trl-rloo": _summary(3.0, 96, 288, 250 * 2**20),  # hcrlhf 1.5x faster, 0.4x the memory: both met
                 "trl-grpo": _summary(2.5, 96, 288, 150 * 2**20)}  # 1.25x, 0.67x: neither met
    rows = {row["hcrlhf / ..."]: row for row in race.ratio_rows(summaries)}
    rloo, grpo = rows[race.SIDES["trl-rloo"]], rows[race.SIDES["trl-grpo"]]
    assert rloo["generated tok/s"] == "1.50x" and rloo["peak RSS growth"] == "0.40x"
    assert rloo["trained tok/s"] == f"{(300 / 2.0) / (288 / 3.0):.2f}x" and rloo["step time"] == "0.67x"
    assert (rloo["target >= 1.5x tok/s"], rloo["target <= 0.5x memory"]) == ("met", "met")
    assert grpo["generated tok/s"] == "1.25x" and grpo["peak RSS growth"] == "0.67x"
    assert (grpo["target >= 1.5x tok/s"], grpo["target <= 0.5x memory"]) == ("not met", "not met")
    csv_rows = {row["side"]: row for row in race.csv_table(summaries, "quick")}
    assert csv_rows["trl-rloo"]["hcrlhf_over_this_generated_tokens_per_s"] == 1.5
    assert csv_rows["hcrlhf"]["hcrlhf_over_this_peak_rss_growth"] == 1.0


def test_rounds_pool_the_steps_and_take_the_median_memory():
    step = lambda seconds: {"seconds": seconds, "generation": seconds / 2, "generated_tokens": 8,  # noqa: E731
                            "trained_tokens": 20}
    runs = [{"steps": [step(1.0), step(5.0)], "peak_growth_bytes": 10, "vmhwm_bytes": 100},
            {"steps": [step(2.0)], "peak_growth_bytes": 30, "vmhwm_bytes": 300},
            {"steps": [step(3.0), step(4.0)], "peak_growth_bytes": 20, "vmhwm_bytes": 200}]
    summary = race.summarise(race.merge_rounds(runs))
    assert summary["step_s"] == 3.0 and (summary["step_min_s"], summary["step_max_s"]) == (1.0, 5.0)
    assert summary["generated_per_s"] == 8 / 3.0 and summary["trained_per_s"] == 20 / 3.0
    assert (summary["peak_growth_bytes"], summary["vmhwm_bytes"]) == (20, 200)


def test_quick_race_writes_every_row_with_sane_numbers(tmp_path):
    out = tmp_path / "race.md"
    result = subprocess.run([sys.executable, "-m", "hcrlhf.benchmarks.bench_race_trl", "--quick", "--out", str(out)],
                            capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    text = out.read_text()
    for label in race.SIDES.values():
        assert f"| {label} |" in text, label
    for word in ("trl: 1.16.0", "torch: ", "transformers: ", "hcrlhf: ", "load average", "generation ms",
                 "Not equal", "ChunkedLogProbFunction"):
        assert word in text, word

    with open(out.with_suffix(".csv")) as handle:
        rows = {row["side"]: row for row in csv.DictReader(handle)}
    assert sorted(rows) == sorted(race.SIDES)
    shape = race.SHAPES["quick"]
    generated = shape["prompts_per_step"] * shape["samples_per_prompt"] * shape["max_new_tokens"]
    for side, row in rows.items():
        numbers = {key: float(value) for key, value in row.items()
                   if key not in ("side", "label", "shape") and value != ""}
        # Times and token counts are positive; a step may grow the peak RSS by nothing (0 MiB: a real measurement,
        # then the ratio against it is undefined and left empty, only in the memory-ratio column).
        memory = ("peak_rss_growth_mib", "hcrlhf_over_this_peak_rss_growth")
        assert set(row) - set(numbers) <= {"side", "label", "shape", "hcrlhf_over_this_peak_rss_growth"}, row
        assert all(math.isfinite(v) and (v >= 0 if k in memory else v > 0) for k, v in numbers.items()), (side, numbers)
        # every response ran to max_new_tokens on every side: the same work
        assert numbers["generated_tokens_per_step"] == generated, (side, numbers)
        assert numbers["trained_tokens_per_step"] > generated  # the prompts go through the update too
        assert numbers["step_ms_min"] <= numbers["step_ms_median"] <= numbers["step_ms_max"]
        assert numbers["generation_ms"] < numbers["step_ms_max"]
        assert numbers["generated_tokens_per_s"] == pytest.approx(generated / numbers["step_ms_median"] * 1e3,
                                                                  rel=0.35)
        assert numbers["vmhwm_mib"] > numbers["peak_rss_growth_mib"]
        ours = float(rows["hcrlhf"]["generated_tokens_per_s"])
        assert numbers["hcrlhf_over_this_generated_tokens_per_s"] == pytest.approx(
            ours / numbers["generated_tokens_per_s"], rel=1e-2)
    assert float(rows["hcrlhf"]["hcrlhf_over_this_generated_tokens_per_s"]) == 1.0
    # the kernels row really ran on hcrlhf's kernels
    served = json.loads(text.split("calls served (hcrlhf / TRL fallback): ")[1].splitlines()[0])
    assert served["ChunkedLogProbFunction"]["hcrlhf"] > 0 and served["ChunkedLogProbFunction"]["trl"] == 0


def test_the_race_is_a_bench_command():
    from hcrlhf.cli import available_benchmarks

    assert available_benchmarks()["race_trl"] == "hcrlhf.benchmarks.bench_race_trl"
