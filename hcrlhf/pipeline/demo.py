"""The built-in offline demo's config (``hcrlhf demo``); ``configs/demo.yaml`` holds the same settings."""

from __future__ import annotations

import copy

__all__ = ["demo_config", "DEMO", "QUICK"]

#: The default demo (a few minutes on a 2-core CPU). Mirrors configs/demo.yaml (a test keeps them equal).
DEMO = {
    "task": "builtin",
    "task_seed": 0,
    "seed": 0,
    "output_dir": "hcrlhf-demo",
    "reward": {"learning_rate": 2e-3, "max_steps": 60, "epochs": 10, "batch_size": 16, "warmup_ratio": 0.1,
               "max_length": 96, "seed": 0},
    "cost": {"cost_loss": "bt_sign", "learning_rate": 2e-3, "max_steps": 60, "epochs": 10, "batch_size": 16,
             "warmup_ratio": 0.1, "max_length": 96, "seed": 1},
    "rl": {"estimator": "rloo", "total_steps": 150, "prompts_per_step": 16, "samples_per_prompt": 2,
           "max_new_tokens": 40, "actor_lr": 2e-4, "kl_coef": 0.2, "lambda_init": 0.1,
           "cost_window_size": 256, "seed": 0},
    "safety": {"threshold": -3.0, "delta": 0.1, "method": "ttest"},
    "evaluation": {"samples_per_prompt": 4},
}

#: --quick: the same pipeline with fewer RL iterations and one ground-truth sample per prompt (under a minute
#: on a 2-core CPU). Its first 100 iterations are those of the default demo with the same seed.
QUICK_OVERRIDES = {
    "rl": {"total_steps": 100},
    "evaluation": {"samples_per_prompt": 1},
}
QUICK = copy.deepcopy(DEMO)
for _section, _values in QUICK_OVERRIDES.items():
    QUICK[_section].update(_values)


def demo_config(*, quick: bool = False, output_dir: str | None = None, task_cache: str | None = None,
                overwrite: bool = False, progress: bool = True, seed: int | None = None) -> dict:
    """The demo's config mapping (feed it to :func:`hcrlhf.pipeline.run`).

    ``seed`` N (``hcrlhf demo --seed N``) re-draws the candidate / safety split of the built-in task's prompts
    with seed N and seeds the reward model (N), the cost model (N + 1), candidate selection (N) and the safety
    test's sampling (N); the task itself (its prompts, preference pairs and starting policy) stays the same.
    None keeps the task's own split and the seeds above for N = 0, so ``--seed 0`` is the default demo.
    """
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or seed < 0):
        raise ValueError(f"demo_config: seed must be a non-negative int, got {seed!r}")
    config = copy.deepcopy(QUICK if quick else DEMO)
    if seed is not None:
        config["data"] = {"split_seed": seed}
        config["seed"] = seed
        config["reward"]["seed"], config["cost"]["seed"], config["rl"]["seed"] = seed, seed + 1, seed
    if output_dir is not None:
        config["output_dir"] = str(output_dir)
    if task_cache is not None:
        config["task_cache"] = str(task_cache)
    config["overwrite"] = overwrite
    config["progress"] = progress
    return config
