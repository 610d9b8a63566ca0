"""Slim trainers on Hugging Face models with fused alignment losses (``fastalign train``)."""

from fastalign.trainers.checkpoint import CheckpointError
from fastalign.trainers.config import TrainingConfig
from fastalign.trainers.dpo import DPOConfig, DPOTrainer
from fastalign.trainers.kto import KTOConfig, KTOTrainer
from fastalign.trainers.loop import Trainer, TrainResult
from fastalign.trainers.online_dpo import OnlineDPOConfig, OnlineDPOTrainer
from fastalign.trainers.ppo import GRPOConfig, PPOConfig, PPOTrainer
from fastalign.trainers.reference import ReferencePolicy
from fastalign.trainers.reference_free import (
    CPOConfig,
    CPOTrainer,
    ORPOConfig,
    ORPOTrainer,
    SimPOConfig,
    SimPOTrainer,
)
from fastalign.trainers.reward import RewardConfig, RewardTrainer
from fastalign.trainers.sft import SFTConfig, SFTTrainer

__all__ = [
    "CPOConfig",
    "CPOTrainer",
    "CheckpointError",
    "DPOConfig",
    "DPOTrainer",
    "GRPOConfig",
    "KTOConfig",
    "KTOTrainer",
    "ORPOConfig",
    "OnlineDPOConfig",
    "OnlineDPOTrainer",
    "ORPOTrainer",
    "PPOConfig",
    "PPOTrainer",
    "ReferencePolicy",
    "RewardConfig",
    "RewardTrainer",
    "SFTConfig",
    "SFTTrainer",
    "SimPOConfig",
    "SimPOTrainer",
    "TrainResult",
    "Trainer",
    "TrainingConfig",
]
