"""report.md: the numbers it quotes are those of the run (no training, no models)."""

from hcrlhf.report import render_markdown


def _report(curve, final):
    rl = {"estimator": "ppo", "steps": len(curve), "seconds": 1.0, "config": {"lambda_update": "pid"},
          "final": final, "curve": curve}
    return {"stages": "train", "training": {"rl": rl}}


def test_report_lambda_is_the_one_the_candidate_was_trained_with():
    """training.png plots metrics["lambda"] (the λ each iteration used); report.md must quote the last of those,
    not ``lambda_next`` (the multiplier after the last update, which no iteration used)."""
    curve = [{"step": 1, "lambda": 1.0, "lambda_next": 3.96}, {"step": 2, "lambda": 3.96, "lambda_next": 4.346}]
    final = {"reward/mean": 0.5, "cost/mean": -1.0, "cost/bound": -0.5, **curve[-1]}
    markdown = render_markdown(_report(curve, final))
    line = next(line for line in markdown.splitlines() if line.startswith("- candidate selection"))
    assert f"λ {curve[-1]['lambda']:.4g} (" in line, line
    assert "λ 4.346" not in line, line
    assert "next value, 4.346," in line, line  # labelled as the next value, not as the candidate's
