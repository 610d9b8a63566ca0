"""The names ``fastalign.trainers.base`` used to define, kept importable from here.

What was one module is now one module per job: :mod:`~fastalign.trainers.config` (options and
their checks), :mod:`~fastalign.trainers.data_order`, :mod:`~fastalign.trainers.metrics`,
:mod:`~fastalign.trainers.reference` (the reference policy), :mod:`~fastalign.trainers.checkpoint`
(save, resume, random-generator state) and :mod:`~fastalign.trainers.loop` (the trainer). New code
imports from those; nothing inside fastalign imports this module. (The ``noqa`` names were
never in ``__all__`` but were imported from here all the same.)
"""

from fastalign.trainers.config import (
    LR_SCHEDULES,  # noqa: F401
    REFERENCE_MODES,  # noqa: F401
    TrainingConfig,
    check_choice,  # noqa: F401
    check_float,  # noqa: F401
    check_int,  # noqa: F401
    option,
    pad_token_id,
)
from fastalign.trainers.data_order import BatchStream
from fastalign.trainers.distributed import resolve_device  # noqa: F401
from fastalign.trainers.loop import Trainer, TrainResult
from fastalign.trainers.metrics import Metrics, MetricsLog, as_floats, mean_metrics
from fastalign.trainers.reference import ReferencePolicy, ReferenceTrainer

__all__ = ["BatchStream", "Metrics", "MetricsLog", "ReferencePolicy", "ReferenceTrainer", "Trainer",
           "TrainingConfig", "TrainResult", "as_floats", "mean_metrics", "option", "pad_token_id"]
