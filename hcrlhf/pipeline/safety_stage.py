"""The safety test stage (docs/method.md#the-safety-test), shared by the pipeline (stage 5) and ``hcrlhf safety-test``.

:func:`run_safety_test` samples one response per safety prompt with the deployment decoding, scores it with
the cost model, transforms the costs, runs the test — whose δ is spent in the ledger *before* the verdict is
read — and writes the stage's files.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path

from hcrlhf import distributed
from hcrlhf.models.generation import decoding_settings, generation_config
from hcrlhf.pipeline.sampling import Decoding, cost_transform, sample_and_score_on_ranks

__all__ = ["run_safety_test"]


def run_safety_test(policy, tokenizer, prompts: Sequence[str], cost_model, *, settings, decoding: Decoding, template,
                    ledger, label: str, seed: int = 0, max_prompt_length: int | None = None,
                    progress: bool = False, output_dir=None, record_extra: dict | None = None,
                    categories: Sequence | None = None,
                    harm: Callable[[str, str], float] | None = None) -> tuple[object, dict]:
    """Run the safety test of ``policy`` on the safety prompts.

    Args:
        policy: the candidate (a Hugging Face causal LM, on its device).
        tokenizer: its tokenizer (the cost model's too).
        prompts: the n safety prompts D_s (read here for the first and only time), distinct (a copy is refused:
            it would count twice in n), each with text, n at least what ``settings.method`` needs (2). These,
            and the settings, are checked before anything is sampled.
        cost_model: a :class:`hcrlhf.models.ScoreModel` (its end score is the raw cost).
        settings: a :class:`hcrlhf.pipeline.config.SafetyConfig`: τ (``threshold``), δ, ``method``,
            ``cost_range``, ``cost_transform`` (with ``sigmoid_scale`` / ``unsafe_above``) and ``batch_size``
            and ``allow_overlapping_set`` are used here; the decoding and the ledger come in resolved
            (``decoding``, ``ledger``).
        decoding: the deployment decoding (the guarantee is about responses decoded this way).
        template: the prompt template (see :func:`hcrlhf.data.get_template`).
        ledger: the :class:`hcrlhf.safety.SafetyLedger` the test's δ is spent in (a test that would overspend
            the set's budget raises :class:`hcrlhf.safety.BudgetExceededError` and records nothing).
        label: the ledger entry's label.
        seed: the sampling seed.
        max_prompt_length: prompts are cut to this many tokens (None: not cut).
        progress: show a progress bar.
        output_dir: when given, write ``safety_test.json`` (the record), ``safety_samples.jsonl`` (one row per
            prompt: prompt, response, raw_cost, cost, and category / true_harm when known) and
            ``safety_costs.png`` there.
        record_extra: entries put in the record right after the test result's (e.g. what was tested).
        categories: the n prompts' categories: in the samples, and the mean cost per category in the record.
        harm: ``harm(prompt, response)``, a known true harm (the built-in task): in the samples, and the true
            unsafe rate (harm ≥ 0.5) of the tested responses in the record.

    Returns:
        ``(result, record)``: the :class:`hcrlhf.safety.SafetyTestResult` and a JSON-ready dict: the result's
        fields, ``record_extra``, ``cost_transform``, ``decoding`` (every setting of the explicit generation
        config sampled with, :func:`hcrlhf.models.generation.decoding_settings`), ``sampling_seed``,
        ``batch_size`` and ``max_prompt_length`` (with the decoding, what the sampled responses depend on),
        ``ledger`` (path), ``ledger_spent`` (δ spent on this safety set, this test included),
        ``ledger_total_delta`` (the safety set's budget), ``costs`` (the n transformed costs) and the category /
        harm summaries when given.
    """
    from hcrlhf.safety import distinct_prompts
    from hcrlhf.safety._checks import (
        check_delta,
        check_method,
        check_method_range,
        check_prompt_texts,
        check_real,
        check_safety_set_size,
    )

    fn = "run_safety_test"
    s = settings
    # Everything the test will check that does not depend on the costs is checked here, before any sampling.
    prompts = check_prompt_texts(fn, prompts)
    _, _, copies = distinct_prompts(prompts)
    if copies:
        raise ValueError(f"{fn}: prompts hold {copies} copies of prompts already in them (same text up to Unicode NFC "
                         "and whitespace); each prompt may count once in n: drop the copies first "
                         "(hcrlhf.safety.distinct_prompts)")
    method = check_method(fn, s.method)
    check_safety_set_size(fn, len(prompts), method, name="prompts")
    check_delta(fn, s.delta)
    check_real(fn, "threshold", s.threshold)
    check_method_range(fn, method, None if s.cost_range is None else tuple(s.cost_range))
    if categories is not None and len(categories) != len(prompts):
        raise ValueError(f"{fn}: categories has {len(categories)} entries for {len(prompts)} prompts")
    # Under several processes each rank samples its block of the prompts; prompt i's noise comes from (seed, i),
    # so the responses are those one process would sample. Rank 0 then runs the test (spending δ once) and
    # writes the files; every rank returns its result.
    responses, raw_costs = sample_and_score_on_ranks(policy, tokenizer, prompts, template=template, decoding=decoding,
                                                     cost_model=cost_model, batch_size=s.batch_size, seed=seed,
                                                     max_prompt_length=max_prompt_length, progress=progress,
                                                     desc="safety test")
    return distributed.on_main(_test_and_record, prompts, responses, raw_costs, settings=s, decoding=decoding,
                               tokenizer=tokenizer, ledger=ledger, label=label, seed=seed,
                               max_prompt_length=max_prompt_length, output_dir=output_dir,
                               record_extra=record_extra, categories=categories, harm=harm)


def _test_and_record(prompts, responses, raw_costs, *, settings, decoding, tokenizer, ledger, label, seed,
                     max_prompt_length, output_dir, record_extra, categories, harm):
    from hcrlhf.safety import safety_test

    s = settings
    costs = cost_transform(raw_costs, s.cost_transform, sigmoid_scale=s.sigmoid_scale, unsafe_above=s.unsafe_above)
    result = safety_test(costs, s.threshold, s.delta, s.method,
                         cost_range=None if s.cost_range is None else tuple(s.cost_range), ledger=ledger,
                         safety_set=prompts, label=label, allow_overlapping_set=s.allow_overlapping_set)
    harms = [harm(p, r) for p, r in zip(prompts, responses)] if harm is not None else None
    record = {**result.to_dict(), **(record_extra or {}), "cost_transform": s.cost_transform,
              "decoding": decoding_settings(generation_config(decoding, tokenizer)), "sampling_seed": seed,
              "batch_size": s.batch_size, "max_prompt_length": max_prompt_length, "ledger": str(ledger.path),
              "ledger_spent": ledger.spent(result.fingerprint), "ledger_total_delta": ledger.budget(result.fingerprint),
              "costs": costs}
    if categories:
        by_category: dict = {}
        for category, cost in zip(categories, costs):
            by_category.setdefault(category, []).append(cost)
        record["mean_cost_by_category"] = {k: sum(v) / len(v) for k, v in sorted(by_category.items())}
    if harms is not None:
        record["true_unsafe_rate_of_tested_responses"] = sum(h >= 0.5 for h in harms) / len(harms)
    if output_dir is not None:
        _write_outputs(Path(output_dir), result, record, prompts, responses, raw_costs, costs, categories, harms)
    return result, record


def _write_outputs(out: Path, result, record, prompts, responses, raw_costs, costs, categories, harms) -> None:
    from hcrlhf.report import plot_safety_costs

    out.mkdir(parents=True, exist_ok=True)
    (out / "safety_test.json").write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
    with open(out / "safety_samples.jsonl", "w", encoding="utf-8") as handle:
        for index, (prompt, response) in enumerate(zip(prompts, responses)):
            row = {"prompt": prompt, "response": response, "raw_cost": raw_costs[index], "cost": costs[index]}
            if categories:
                row["category"] = categories[index]
            if harms is not None:
                row["true_harm"] = harms[index]
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
    plot_safety_costs(costs, out / "safety_costs.png", ucb=result.ucb, threshold=result.threshold, mean=result.mean,
                      verdict=result.verdict, delta=result.delta, method=result.method)
