"""The end-to-end HC-RLHF pipeline: ``hcrlhf.pipeline.run(config)``.

split → (optional SFT) → reward model → cost model → candidate selection → safety test (recorded in the δ
ledger) → the model or NO SOLUTION FOUND, with a report directory (:mod:`hcrlhf.report`). The config format is in
:mod:`hcrlhf.pipeline.config`; :func:`demo_config` gives the built-in offline demo's.
"""

from hcrlhf.data.files import read_prompt_file
from hcrlhf.pipeline.config import (
    ConfigError,
    DataConfig,
    EvaluationConfig,
    ModelsConfig,
    PipelineConfig,
    SafetyConfig,
    SFTConfig,
    config_reference,
    load_config,
)
from hcrlhf.pipeline.core import CANDIDATE_META, STAGES, PipelineResult, default_task_cache, run
from hcrlhf.pipeline.demo import demo_config
from hcrlhf.pipeline.safety_stage import run_safety_test
from hcrlhf.pipeline.sampling import Decoding, cost_transform, sample_and_score

__all__ = [
    "run",
    "PipelineResult",
    "STAGES",
    "CANDIDATE_META",
    "ConfigError",
    "PipelineConfig",
    "DataConfig",
    "ModelsConfig",
    "SafetyConfig",
    "EvaluationConfig",
    "SFTConfig",
    "load_config",
    "config_reference",
    "demo_config",
    "default_task_cache",
    "Decoding",
    "sample_and_score",
    "cost_transform",
    "read_prompt_file",
    "run_safety_test",
]
