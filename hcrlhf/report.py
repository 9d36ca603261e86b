"""The report directory of a pipeline run: ``report.json``, ``report.md`` and PNG plots.

* ``training.png`` — candidate selection over iterations: mean reward, mean cost, the pessimistic bound
  U = μ̂ + k·σ̂ against τ, and λ;
* ``safety_costs.png`` — histogram of the safety-set costs with their mean, the UCB and τ marked;
* ``score_models.png`` — the reward and cost models' training loss (when they were trained).

:func:`write_report` writes them all from the report dict; :func:`load_report` reads report.json back.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

__all__ = ["write_report", "load_report", "render_markdown", "plot_training", "plot_safety_costs"]


def _json_default(value):
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "item"):
        return value.item()
    if isinstance(value, tuple):
        return list(value)
    return str(value)


def _clean(value):
    """NaN / Inf become None so that report.json is strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def load_report(directory) -> dict:
    """report.json of a report directory."""
    return json.loads((Path(directory) / "report.json").read_text(encoding="utf-8"))


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def plot_training(curve: list[dict], path, *, threshold: float | None = None) -> Path | None:
    """2×2 panels over iterations: reward, cost, pessimistic bound vs τ, λ."""
    if not curve:
        return None
    plt = _pyplot()
    steps = [m["step"] for m in curve]
    fig, axes = plt.subplots(2, 2, figsize=(10, 7), constrained_layout=True)
    panels = [
        (axes[0, 0], "reward/mean", "mean reward of the rollouts", "tab:blue"),
        (axes[0, 1], "cost/mean", "mean cost of the rollouts", "tab:red"),
        (axes[1, 0], "cost/bound", "pessimistic cost bound U = μ̂ + k·σ̂", "tab:purple"),
        (axes[1, 1], "lambda", "Lagrange multiplier λ", "tab:green"),
    ]
    for ax, key, title, color in panels:
        values = [m.get(key, float("nan")) for m in curve]
        ax.plot(steps, values, color=color, marker="." if len(steps) <= 60 else None, linewidth=1.5)
        ax.set_title(title)
        ax.set_xlabel("iteration")
        ax.grid(alpha=0.3)
        if key in ("cost/mean", "cost/bound") and threshold is not None:
            ax.axhline(threshold, color="black", linestyle="--", linewidth=1, label=f"τ = {threshold:g}")
            ax.legend(loc="best")
    fig.suptitle("Candidate selection (Lagrangian RL under the pessimistic cost bound)")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def plot_safety_costs(costs: list[float], path, *, ucb: float, threshold: float, mean: float, verdict: str,
                      delta: float, method: str) -> Path | None:
    """Histogram of the safety-set costs with the mean, the (1 − δ) UCB and τ marked."""
    if not costs:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.8), constrained_layout=True)
    bins = min(40, max(8, int(math.sqrt(len(costs))) * 2))
    ax.hist(costs, bins=bins, color="tab:gray", alpha=0.75, edgecolor="white", label=f"costs (n = {len(costs)})")
    ax.axvline(mean, color="tab:blue", linewidth=1.5, label=f"mean = {mean:.3g}")
    ax.axvline(ucb, color="tab:red", linewidth=2, label=f"UCB (1 − δ = {1 - delta:g}, {method}) = {ucb:.3g}")
    ax.axvline(threshold, color="black", linestyle="--", linewidth=2, label=f"τ = {threshold:g}")
    ax.set_xlabel("cost of the candidate's response (safety set)")
    ax.set_ylabel("responses")
    color = "tab:green" if verdict == "PASS" else "tab:red"
    ax.set_title(f"Safety test: {verdict}", color=color, fontweight="bold")
    ax.legend(loc="best", fontsize=9)
    ax.grid(alpha=0.3)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def plot_score_models(training: dict, path) -> Path | None:
    curves = {name: training[name].get("loss_curve") for name in ("reward_model", "cost_model")
              if isinstance(training.get(name), dict) and training[name].get("loss_curve")}
    if not curves:
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(curves), figsize=(5 * len(curves), 3.8), constrained_layout=True, squeeze=False)
    for ax, (name, curve) in zip(axes[0], curves.items()):
        ax.plot([c["step"] for c in curve], [c["loss"] for c in curve], color="tab:blue")
        final = training[name].get("final_eval") or {}
        title = name.replace("_", " ")
        if "accuracy" in final:
            title += f" (held-out pair accuracy {final['accuracy']:.3f})"
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("optimiser step")
        ax.set_ylabel("training loss")
        ax.grid(alpha=0.3)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def _fmt(value, digits: int = 4) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return str(value)


def _decoding(settings, seed=None, batch_size=None) -> str:
    """Every decoding setting of a record (``hcrlhf.models.generation.decoding_settings``), in one line."""
    if not isinstance(settings, dict):
        return _fmt(settings)
    parts = [f"{k}={v}" for k, v in settings.items() if k != "transformers_version"]
    parts += [f"{name}={value}" for name, value in (("seed", seed), ("batch_size", batch_size)) if value is not None]
    version = settings.get("transformers_version")
    note = f" (transformers {version}; every other setting unset: off)" if version else ""
    return "`" + ", ".join(parts) + "`" + note


def _expected_cost_lines(truth: dict) -> list[str]:
    """J_C, the expected cost under the cost model that the safety test bounds, next to τ: was the verdict right?"""
    starting, candidate = truth["starting_policy"].get("expected_cost"), truth["candidate"].get("expected_cost")
    if not candidate:
        return []
    tau = candidate["threshold"]
    lines = ["", f"Expected cost J_C (the cost model's mean cost — transformed as in the test — that the safety test "
                 f"bounds), estimated on {candidate['prompts']}, {candidate['n_prompts']} prompts × "
                 f"{candidate['samples_per_prompt']} samples, ± one standard error over prompts:", "",
             "| policy | J_C | ± s.e. | τ | J_C > τ |", "|---|---|---|---|---|"]
    for name, value in (("starting policy", starting), ("candidate", candidate)):
        if value:
            lines.append(f"| {name} | {_fmt(value['mean'])} | {_fmt(value['stderr'])} | {_fmt(tau)} | "
                         f"{'yes' if value['above_threshold'] else 'no'} |")
    if truth.get("returned") and candidate["above_threshold"]:
        lines += ["", "The returned candidate's estimated J_C is above τ: either the estimate is noisy or this run is "
                      "one of the at most δ-probability failures the guarantee allows."]
    return lines


def _policy_label(truth: dict, name: str) -> str:
    return name.replace("_", " ") + (" (returned)" if name == "candidate" and truth.get("returned") else "")


#: The rows of the over-safety table: (key in ground_truth[policy]["over_safety"], label).
OVER_SAFETY_GROUPS = (("benign", "benign"), ("harmful", "harmful (EHD, IHD, MHD)"))


def _over_safety_lines(truth: dict) -> list[str]:
    """The safety states (docs/method.md#over-safety) of each policy's responses, per prompt group."""
    policies = [n for n in ("starting_policy", "candidate") if truth[n].get("over_safety")]
    if not policies:
        return []
    lines = ["", "Safety states of the responses (docs/method.md#over-safety: under-safe = unsafe, harm ≥ 0.5; "
                 "over-safe = safe but a refusal or helpfulness ≤ 0 on a benign prompt; truly safe = every other "
                 "safe response), as fractions of each group's responses:", "",
             "| policy | prompts | n | under-safe | truly safe | over-safe |", "|---|---|---|---|---|---|"]
    for name in policies:
        for key, label in OVER_SAFETY_GROUPS:
            g = truth[name]["over_safety"].get(key)
            if g:
                lines.append(f"| {_policy_label(truth, name)} | {label} | {g['n']} | {_fmt(g['under_safe_rate'])} | "
                             f"{_fmt(g['truly_safe_rate'])} | {_fmt(g['over_safe_rate'])} |")
    return lines


def render_markdown(report: dict) -> str:
    """report.md from the report dict."""
    lines = ["# hcrlhf report", ""]
    verdict = report.get("verdict")
    if verdict is not None:
        if report.get("returned_model"):
            lines += [f"**Verdict: {verdict}** — returned model: `{report['returned_model']}/` (paths are relative to "
                      "this directory)", ""]
        else:
            kept = (f" The candidate is kept in `{report['candidate']}/`, marked `NOT_RETURNED.md`, for inspection "
                    "only." if report.get("candidate") else "")
            lines += [f"**Verdict: {verdict}** — no model is returned.{kept}", ""]
    else:
        untested = (f" The candidate in `{report['candidate']}/` is untested and not returned."
                    if report.get("candidate") else "")
        lines += [f"Stages run: `{report.get('stages')}` (no safety test).{untested}", ""]
    if report.get("previous_run"):
        lines += [f"An earlier run in this directory returned a model; `--overwrite` moved it, whole, to "
                  f"`{report['previous_run']}/`.", ""]
    test = report.get("safety_test")
    if test:
        lines += ["## Safety test", "",
                  "| UCB | mean | std | n | δ | τ | method | validity |", "|---|---|---|---|---|---|---|---|",
                  f"| {_fmt(test['ucb'])} | {_fmt(test['mean'])} | {_fmt(test['std'])} | {test['n']} | "
                  f"{_fmt(test['delta'])} | {_fmt(test['threshold'])} | {test['method']} | {test['validity']} |", ""]
        if test["validity"] == "asymptotic":
            lines += ["The t-test bound is only asymptotically valid (it under-covers on skewed or rare-event costs); "
                      "use an exact method (betting with `cost_transform: sigmoid`, or clopper_pearson with "
                      "`cost_transform: unsafe_indicator`) for a finite-sample guarantee.", ""]
        spent, budget = _fmt(test.get("ledger_spent")), _fmt(test.get("ledger_total_delta"))
        lines += [f"Cost transform: `{test.get('cost_transform')}`. Ledger: `{test.get('ledger')}` "
                  f"(δ spent on this safety set: {spent} of {budget}). "
                  f"Decoding (the guarantee covers responses sampled this way; also the returned model's "
                  f"`generation_config.json`): "
                  f"{_decoding(test.get('decoding'), test.get('sampling_seed'), test.get('batch_size'))}.", "",
                  "![safety costs](safety_costs.png)", ""]
    truth = report.get("ground_truth")
    if truth:
        lines += ["## Ground truth (built-in task)", "",
                  f"On the safety prompts, {truth['samples_per_prompt']} sampled responses per prompt"
                  + (f"; decoding {_decoding(truth['decoding'], truth.get('sampling_seed'))}"
                     if truth.get("decoding") else "") + ".", "",
                  "| policy | unsafe rate | mean harm | mean helpfulness | helpful rate | refusal rate (benign) | "
                  "refusal rate (harmful) |", "|---|---|---|---|---|---|---|"]
        for name in ("starting_policy", "candidate"):
            s = truth[name]
            groups = s.get("over_safety") or {}
            lines.append(f"| {_policy_label(truth, name)} | {_fmt(s['unsafe_rate'])} | {_fmt(s['mean_harm'])} | "
                         f"{_fmt(s['mean_helpfulness'])} | {_fmt(s['helpful_rate'])} | "
                         f"{_fmt(groups.get('benign', {}).get('refusal_rate'))} | "
                         f"{_fmt(groups.get('harmful', {}).get('refusal_rate'))} |")
        categories = sorted(truth["starting_policy"].get("by_category", {}))
        if categories:
            for key, what in (("unsafe_rate", "Unsafe rate"), ("refusal_rate", "Refusal rate")):
                if all(key in truth[n]["by_category"].get(c, {}) for n in ("starting_policy", "candidate")
                       for c in categories):
                    lines += ["", f"{what} by prompt category (starting → candidate): " + ", ".join(
                        f"{c} {_fmt(truth['starting_policy']['by_category'][c][key], 3)} → "
                        f"{_fmt(truth['candidate']['by_category'][c][key], 3)}" for c in categories)]
        lines += _over_safety_lines(truth)
        lines += _expected_cost_lines(truth)
        lines.append("")
    training = report.get("training", {})
    if training:
        lines += ["## Training", ""]
        sft = training.get("sft")
        if sft:
            lines.append(
                f"- SFT of the starting policy: {sft['steps']} steps (batch {sft['batch_size']}, lr "
                f"{sft['learning_rate']:g}) in {sft['seconds']:.1f} s on {sft['n_rows']} rows of `{sft['data']}` "
                f"({sft['removed_safety_rows']} on safety prompts removed); NLL per target token "
                f"{sft['first_nll']:.4f} → {sft['last_nll']:.4f}; saved to `{sft['source']}` (the starting "
                "policy and KL reference of candidate selection)")
        for name in ("reward_model", "cost_model"):
            t = training.get(name)
            if not t:
                continue
            final = t.get("final_eval") or {}
            extra = f", sign accuracy {_fmt(final['sign_accuracy'])}" if "sign_accuracy" in final else ""
            how = f"trained {t.get('steps')} steps in {_fmt(t.get('seconds'))} s" if t.get("trained") else "loaded"
            lines.append(f"- {name.replace('_', ' ')}: {how} from `{t.get('source')}`; held-out pair accuracy "
                         f"{_fmt(final.get('accuracy'))}{extra}")
        rl = training.get("rl")
        if rl:
            final = rl.get("final", {})
            lines.append(f"- candidate selection ({rl['estimator']}): {rl['steps']} iterations in "
                         f"{_fmt(rl['seconds'])} s; last iteration: reward {_fmt(final.get('reward/mean'))}, cost "
                         f"{_fmt(final.get('cost/mean'))}, bound {_fmt(final.get('cost/bound'))}, "
                         f"λ {_fmt(final.get('lambda'))} "
                         f"(the {rl.get('config', {}).get('lambda_update', 'official')} λ rule; its next value, "
                         f"{_fmt(final.get('lambda_next'))}, did not train the candidate)")
            if rl.get("rollout_decoding"):
                lines.append(f"- rollout decoding: {_decoding(rl['rollout_decoding'])}")
            lines += ["", "![training](training.png)"]
        dpo = training.get("dpo")
        if dpo:
            cfg = dpo.get("config", {})
            last = (dpo.get("curve") or [{}])[-1]
            kept = (f"; the AMA mask kept {_fmt(dpo.get('kept_fraction'))} of the response tokens"
                    if dpo.get("method") == "ADPO" else "")
            lines.append(f"- candidate selection ({dpo.get('method')}, chosen = the {cfg.get('preference')} response, "
                         f"β {_fmt(cfg.get('beta'))}): {dpo.get('steps')} steps on {dpo.get('n_pairs')} preference "
                         f"pairs in {_fmt(dpo.get('seconds'))} s; last step: loss {_fmt(last.get('loss'))}, accuracy "
                         f"{_fmt(last.get('accuracy'))}{kept}. No cost constraint in training: the safety test alone "
                         "decides")
        if any(training.get(n, {}).get("loss_curve") for n in ("reward_model", "cost_model")):
            lines += ["", "![score models](score_models.png)"]
        lines.append("")
    data = report.get("data", {})
    if data:
        split = data.get("split", {})
        sizes = data.get("split_sizes", {})
        lines += ["## Data", "", "| | |", "|---|---|"]
        for key, value in sizes.items():
            lines.append(f"| {key.replace('_', ' ')} | {value} |")
        lines += [f"| split seed | {split.get('seed')} |", f"| safety fraction | {split.get('safety_fraction')} |",
                  f"| safety set fingerprint | `{split.get('safety_fingerprint')}` |",
                  f"| candidate set fingerprint | `{split.get('candidate_fingerprint')}` |"]
        for key in ("preferences_removed_safety_rows", "eval_preferences_removed_safety_rows"):
            if key in data:
                lines.append(f"| {key.replace('_', ' ')} | {data[key]} |")
        lines.append("")
    timings = report.get("timings_s")
    if timings:
        lines += ["## Timings (s)", "", " · ".join(f"{k}: {v:.1f}" for k, v in timings.items()), ""]
    lines += ["The full record (config, fingerprints, metrics) is in `report.json`.", ""]
    return "\n".join(lines)


def write_report(directory, report: dict) -> dict:
    """Write report.json, report.md and the plots into ``directory``; returns ``{name: path}``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    files = {}
    training = report.get("training", {})
    rl = training.get("rl")
    test = report.get("safety_test")
    plots = {}
    threshold = None
    if test:
        threshold = test["threshold"] if test.get("cost_transform", "none") == "none" else None
    elif report.get("config"):
        threshold = report["config"].get("rl", {}).get("cost_threshold")
    if rl and rl.get("curve"):
        rl_threshold = report.get("config", {}).get("rl", {}).get("cost_threshold", threshold)
        plots["training"] = plot_training(rl["curve"], directory / "training.png", threshold=rl_threshold)
    if test:
        plots["safety_costs"] = plot_safety_costs(test["costs"], directory / "safety_costs.png", ucb=test["ucb"],
                                                  threshold=test["threshold"], mean=test["mean"],
                                                  verdict=test["verdict"], delta=test["delta"], method=test["method"])
    plots["score_models"] = plot_score_models(training, directory / "score_models.png")
    report["plots"] = {k: v.name for k, v in plots.items() if v is not None}
    files.update({k: v for k, v in plots.items() if v is not None})
    text = json.dumps(_clean(report), indent=1, default=_json_default, allow_nan=False)
    (directory / "report.json").write_text(text + "\n", encoding="utf-8")
    (directory / "report.md").write_text(render_markdown(report), encoding="utf-8")
    files["report.json"] = directory / "report.json"
    files["report.md"] = directory / "report.md"
    return files
