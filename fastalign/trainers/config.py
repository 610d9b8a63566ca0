"""The options every trainer shares, and the checks that reject a bad one before training starts.

A config is a dataclass whose fields are made with :func:`option`: the default and the ``--help``
text travel together, and ``fastalign train`` builds its command line from them
(``fastalign.trainers.cli``). Each config validates itself in ``__post_init__``, so a bad value
fails on construction with a message naming the option, never halfway through a run.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from fastalign import IMPLEMENTATIONS
from fastalign.ops._checks import (
    check_field_choice,
    check_field_float,
    check_field_int,
)
from fastalign.trainers.distributed import STRATEGIES
from fastalign.trainers.metrics import report_targets

__all__ = ["LR_SCHEDULES", "REFERENCE_MODES", "RESUMABLE_CHANGES", "TrainingConfig", "option",
           "pad_token_id"]

LR_SCHEDULES = ("linear", "cosine", "constant")
REFERENCE_MODES = ("auto", "copy", "precomputed", "adapters")
# The --reference help of the trainers that can take a precomputed reference (DPO, KTO).
REFERENCE_HELP = ("the reference model: copy (a frozen copy), precomputed (log-probs computed "
                  "once), adapters (a PEFT policy with its adapters disabled) or auto (adapters "
                  "for PEFT, else copy)")

# The options a resumed run may change: where and how it runs, how long, and what it writes.
# Every other option shapes the trajectory (data order, batches, the loss, the optimizer), so a
# resumed run that changed one would silently continue a different run than the checkpoint's.
RESUMABLE_CHANGES = frozenset({
    "output_dir", "resume", "overwrite", "max_steps", "num_epochs", "logging_steps", "eval_steps",
    "save_steps", "save_total_limit", "progress", "plots", "device", "impl", "distributed",
    "memory_report", "report_to",
})
# The --gradients-in-forward help of the preference trainers whose step is a fused loss module.
GRADIENTS_IN_FORWARD_HELP = (
    "form the LM head's gradients in the forward pass, a chunk of whole pairs at a time (the "
    "fused loss module: 6*N*H*V FLOPs, holds one chunk's logits); false streams the head "
    "(8*N*H*V, no logits held)")
# The --padding-free help of the trainers that can pack their micro-batches (SFT, DPO).
PADDING_FREE_HELP = ("put each micro-batch's sequences back to back in one row, without "
                     "padding, positions restarting at each sequence (fewer tokens through the "
                     "model; checked at the start that the model keeps the sequences apart)")


def option(default, help: str):
    """A config field with its ``--help`` text (the CLI builds its options from these)."""
    if isinstance(default, (list, dict)):
        raise TypeError("mutable defaults are not options")
    return dataclasses.field(default=default, metadata={"help": help})


@dataclass
class TrainingConfig:
    """Options shared by every trainer (the CLI exposes each as ``--option-name``).

    Steps count optimizer updates; one step consumes ``batch_size × grad_accum_steps`` examples.
    The run lasts ``max_steps``, or, when ``num_epochs`` is set, as many steps as that many passes
    over the training data take (``Trainer.total_steps``); ``num_epochs`` wins over ``max_steps``.
    """

    output_dir: str = option("fastalign-output", "where the model, metrics, plots and "
                             "checkpoints go")
    max_steps: int = option(100, "optimizer steps to train for (ignored when num-epochs is set)")
    num_epochs: float | None = option(None, "train for this many passes over the training data "
                                      "instead of max-steps (fractions allowed): the steps are "
                                      "ceil(epochs x micro-batches per epoch / grad-accum-steps); "
                                      "ppo and grpo count one batch of prompts per step")
    batch_size: int = option(8, "examples per micro-batch (preference pairs for dpo and rm, "
                             "prompts for ppo and grpo)")
    grad_accum_steps: int = option(1, "micro-batches per optimizer step")
    lr: float = option(1e-4, "peak learning rate of AdamW")
    weight_decay: float = option(0.0, "AdamW weight decay")
    adam_betas: tuple[float, float] = option((0.9, 0.999), "AdamW betas, as B1,B2")
    warmup_steps: int = option(0, "steps of linear learning-rate warm-up")
    lr_schedule: str = option("linear", "decay after warm-up: linear or cosine (to 0 at "
                              "the last step), or constant")
    max_grad_norm: float | None = option(1.0, "clip the gradient norm to this ('none': no "
                                         "clipping)")
    seed: int = option(0, "seed of data order, dropout and sampling")
    bf16: bool = option(False, "bfloat16 autocast for the model and the fused head")
    gradient_checkpointing: bool = option(False, "recompute activations in backward to save "
                                          "memory")
    max_length: int = option(512, "longest prompt + completion in tokens (the completion's end "
                             "is cut)")
    max_prompt_length: int = option(256, "longest prompt in tokens (its start is cut)")
    temperature: float = option(1.0, "the policy's logits are divided by it")
    logging_steps: int = option(1, "write metrics every N steps")
    eval_steps: int = option(0, "evaluate on the eval data every N steps (0: only at the end)")
    save_steps: int = option(0, "write a checkpoint every N steps (0: none)")
    save_total_limit: int | None = option(2, "keep only the newest N checkpoints ('none': all)")
    resume: bool = option(False, "continue the run in output-dir from its newest good "
                          "checkpoint (its options must match this run's)")
    overwrite: bool = option(False, "start over in an output-dir that holds an earlier run, "
                             "deleting its checkpoints, metrics, plots and TensorBoard events")
    progress: bool = option(True, "show a tqdm progress bar")
    plots: bool = option(True, "write PNG training curves at the end")
    report_to: str = option("none", "also send every logged metric to: none, or tensorboard "
                            "(event files in output-dir/runs; needs pip install tensorboard)")
    device: str = option("auto", "auto (cuda if available, else cpu), cpu, cuda or cuda:N")
    impl: str = option("auto", "fused-op implementation: auto, triton, cpp or reference")
    distributed: str = option("auto", "several processes (torchrun, accelerate launch): ddp, "
                              "fsdp (FSDP2: layers and head sharded), or auto (fsdp under "
                              "accelerate's --use_fsdp, else ddp; none for one process)")

    def __post_init__(self) -> None:
        positive = ("max_steps", "batch_size", "grad_accum_steps", "max_length",
                    "max_prompt_length", "logging_steps")
        for name in positive:
            check_field_int(name, getattr(self, name), minimum=1)
        for name in ("warmup_steps", "eval_steps", "save_steps", "seed"):
            check_field_int(name, getattr(self, name), minimum=0)
        if self.save_total_limit is not None:
            check_field_int("save_total_limit", self.save_total_limit, minimum=1)
        check_field_float("lr", self.lr, positive=True)
        check_field_float("temperature", self.temperature, positive=True)
        check_field_float("weight_decay", self.weight_decay, positive=False)
        if self.num_epochs is not None:
            check_field_float("num_epochs", self.num_epochs, positive=True)
        if self.max_grad_norm is not None:
            check_field_float("max_grad_norm", self.max_grad_norm, positive=True)
        if (not isinstance(self.adam_betas, (tuple, list)) or len(self.adam_betas) != 2
                or not all(isinstance(b, (int, float)) and 0 <= b < 1 for b in self.adam_betas)):
            raise ValueError(f"adam_betas must be two numbers in [0, 1), got {self.adam_betas!r}")
        if self.resume and self.overwrite:
            raise ValueError("resume and overwrite exclude each other: resume continues the run "
                             "in output_dir, overwrite deletes it")
        check_field_choice("lr_schedule", self.lr_schedule, LR_SCHEDULES)
        check_field_choice("distributed", self.distributed, STRATEGIES)
        check_field_choice("impl", self.impl, IMPLEMENTATIONS)
        report_targets(self.report_to)
        for field in dataclasses.fields(self):  # subclasses' switches too
            value = getattr(self, field.name)
            if field.type in ("bool", bool) and not isinstance(value, bool):
                raise ValueError(f"{field.name} must be True or False, got {value!r}")
        if self.device != "auto":
            try:
                torch.device(self.device)
            except (RuntimeError, TypeError):
                raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got "
                                 f"{self.device!r}") from None


def pad_token_id(tokenizer) -> int:
    """The id to pad batches with: the tokenizer's pad token, else its eos token."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise ValueError("the tokenizer has neither a pad token nor an eos token to pad with")
    return pad
