"""Slim trainers on Hugging Face models with fused alignment losses (``fastalign train``)."""

from fastalign.trainers.base import ReferencePolicy, Trainer, TrainingConfig, TrainResult
from fastalign.trainers.checkpoint import CheckpointError
from fastalign.trainers.dpo import DPOConfig, DPOTrainer

__all__ = [
    "CheckpointError",
    "DPOConfig",
    "DPOTrainer",
    "ReferencePolicy",
    "TrainResult",
    "Trainer",
    "TrainingConfig",
]
