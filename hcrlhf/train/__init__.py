"""Training: supervised fine-tuning (:func:`train_sft`), reward and cost models, and the Lagrangian RL trainer
(PPO/RLOO, optional PTX mix and LoRA)."""

from hcrlhf.train.dpo import DPOConfig, DPOResult, dpo_loss, train_dpo  # DPO / ADPO (hcrlhf/train/dpo.py)
from hcrlhf.train.losses import COST_LOSSES, cost_loss, reward_loss
from hcrlhf.train.rl_checkpoint import CheckpointError
from hcrlhf.train.rl_config import SafeRLConfig
from hcrlhf.train.rl_trainer import Rollout, SafeRLTrainer, TrainingDivergedError
from hcrlhf.train.score_training import (
    ScoreTrainingConfig,
    ScoreTrainingResult,
    evaluate_score_model,
    train_cost_model,
    train_reward_model,
    train_score_model,
)
from hcrlhf.train.sft import train_sft

__all__ = [
    "COST_LOSSES",
    "cost_loss",
    "reward_loss",
    "ScoreTrainingConfig",
    "ScoreTrainingResult",
    "evaluate_score_model",
    "train_cost_model",
    "train_reward_model",
    "train_score_model",
    "SafeRLConfig",
    "SafeRLTrainer",
    "Rollout",
    "TrainingDivergedError",
    "CheckpointError",
    "train_sft",
    # DPO / ADPO (hcrlhf/train/dpo.py; ama_mask, masked_sequence_logps, preference_logps live there)
    "DPOConfig",
    "DPOResult",
    "dpo_loss",
    "train_dpo",
]
