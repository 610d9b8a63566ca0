"""What every fastalign trainer shares: options, the training loop, checkpoints and metrics.

A trainer is a :class:`Trainer` subclass that writes one method, ``compute_loss(batch)`` (PPO
writes ``training_step`` instead, because one step is a rollout and several updates). Everything
else lives here, once:

* **Data order** (:class:`BatchStream`): each epoch is a permutation of the examples drawn from a
  generator seeded by ``(seed, epoch)``; the stream's state is two integers, so a resumed run
  takes exactly the micro-batches the uninterrupted run would have taken, none lost or repeated.
* **The step**: ``grad_accum_steps`` micro-batches, each ``loss / grad_accum_steps`` backward
  (optionally under bf16 autocast), gradient clipping, AdamW, and a learning rate with linear
  warm-up then linear or cosine decay to 0 at ``max_steps``.
* **Checkpoints** every ``save_steps`` (atomic, verified, see ``checkpoint.py``): model,
  optimizer, scheduler, every random generator and the data position, so that resuming gives the
  same weights and metrics as an uninterrupted run (on CPU, where kernels are deterministic).
* **Metrics**: one JSON line per step in ``metrics.jsonl`` (flushed as it goes), and at the end
  ``metrics.csv`` and PNG curves in ``plots/``; a tqdm bar shows progress.
* **Output**: ``save_pretrained`` of the model and tokenizer into ``output_dir``, loadable by
  ``transformers.AutoModelForCausalLM.from_pretrained(output_dir)``.
"""

from __future__ import annotations

import contextlib
import copy
import csv
import dataclasses
import json
import math
import os
import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fastalign import hf
from fastalign.ops._backends import IMPLEMENTATIONS
from fastalign.ops.sequence import SequenceLogprobs
from fastalign.trainers import distributed
from fastalign.trainers.checkpoint import load_latest, save_checkpoint

__all__ = ["BatchStream", "Metrics", "MetricsLog", "ReferencePolicy", "ReferenceTrainer", "Trainer",
           "TrainingConfig", "TrainResult", "as_floats", "mean_metrics", "option", "pad_token_id"]

Metrics = dict[str, float]
LR_SCHEDULES = ("linear", "cosine", "constant")
REFERENCE_MODES = ("auto", "copy", "precomputed", "adapters")


def option(default, help: str):
    """A config field with its ``--help`` text (the CLI builds its options from these)."""
    if isinstance(default, (list, dict)):
        raise TypeError("mutable defaults are not options")
    return dataclasses.field(default=default, metadata={"help": help})


@dataclass
class TrainingConfig:
    """Options shared by every trainer (the CLI exposes each as ``--option-name``).

    Steps count optimizer updates; one step consumes ``batch_size × grad_accum_steps`` examples.
    """

    output_dir: str = option("fastalign-output", "where the model, metrics, plots and "
                             "checkpoints go")
    max_steps: int = option(100, "optimizer steps to train for")
    batch_size: int = option(8, "examples per micro-batch (preference pairs for dpo and rm, "
                             "prompts for ppo and grpo)")
    grad_accum_steps: int = option(1, "micro-batches per optimizer step")
    lr: float = option(1e-4, "peak learning rate of AdamW")
    weight_decay: float = option(0.0, "AdamW weight decay")
    adam_betas: tuple[float, float] = option((0.9, 0.999), "AdamW betas, as B1,B2")
    warmup_steps: int = option(0, "steps of linear learning-rate warm-up")
    lr_schedule: str = option("linear", "decay after warm-up: linear or cosine (to 0 at "
                              "max-steps), or constant")
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
    resume: bool = option(False, "continue from the newest good checkpoint in output-dir")
    progress: bool = option(True, "show a tqdm progress bar")
    plots: bool = option(True, "write PNG training curves at the end")
    device: str = option("auto", "auto (cuda if available, else cpu), cpu, cuda or cuda:N")
    impl: str = option("auto", "fused-op implementation: auto, triton, cpp or reference")
    distributed: str = option("auto", "several processes (torchrun, accelerate launch): ddp, "
                              "fsdp (FSDP2: layers and head sharded), or auto (fsdp under "
                              "accelerate's --use_fsdp, else ddp; none for one process)")

    def __post_init__(self) -> None:
        positive = ("max_steps", "batch_size", "grad_accum_steps", "max_length",
                    "max_prompt_length", "logging_steps")
        for name in positive:
            check_int(name, getattr(self, name), minimum=1)
        for name in ("warmup_steps", "eval_steps", "save_steps", "seed"):
            check_int(name, getattr(self, name), minimum=0)
        if self.save_total_limit is not None:
            check_int("save_total_limit", self.save_total_limit, minimum=1)
        check_float("lr", self.lr, positive=True)
        check_float("temperature", self.temperature, positive=True)
        check_float("weight_decay", self.weight_decay, positive=False)
        if self.max_grad_norm is not None:
            check_float("max_grad_norm", self.max_grad_norm, positive=True)
        if (not isinstance(self.adam_betas, (tuple, list)) or len(self.adam_betas) != 2
                or not all(isinstance(b, (int, float)) and 0 <= b < 1 for b in self.adam_betas)):
            raise ValueError(f"adam_betas must be two numbers in [0, 1), got {self.adam_betas!r}")
        check_choice("lr_schedule", self.lr_schedule, LR_SCHEDULES)
        check_choice("distributed", self.distributed, distributed.STRATEGIES)
        check_choice("impl", self.impl, IMPLEMENTATIONS)
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


def check_int(name: str, value, *, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def check_float(name: str, value, *, positive: bool) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < 0 or (positive and value == 0):
        raise ValueError(f"{name} must be a finite number {'> 0' if positive else '>= 0'}, got "
                         f"{value!r}")


def check_choice(name: str, value, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}, got {value!r}")


def pad_token_id(tokenizer) -> int:
    """The id to pad batches with: the tokenizer's pad token, else its eos token."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise ValueError("the tokenizer has neither a pad token nor an eos token to pad with")
    return pad


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


# ----------------------------------------------------------------------------------------------
# Data order
# ----------------------------------------------------------------------------------------------


class BatchStream:
    """Endless micro-batches of example indices: a fresh seeded permutation every epoch.

    The state (``epoch``, ``position`` in the epoch's permutation) is all a resumed run needs to
    continue with exactly the next micro-batch. The last micro-batch of an epoch may be smaller,
    unless ``drop_last`` (KTO needs full batches: its KL pairs need two examples).
    """

    def __init__(self, num_examples: int, batch_size: int, seed: int, *, shuffle: bool = True,
                 drop_last: bool = False):
        if num_examples < 1:
            raise ValueError("the training data has no examples")
        if drop_last and num_examples < batch_size:
            raise ValueError(f"the training data has {num_examples} examples, fewer than one "
                             f"batch of {batch_size}")
        self.num_examples, self.batch_size = num_examples, batch_size
        self.seed, self.shuffle, self.drop_last = seed, shuffle, drop_last
        self.epoch, self.position = 0, 0
        self._order = self._permutation(0)

    def _permutation(self, epoch: int) -> list[int]:
        if not self.shuffle:
            return list(range(self.num_examples))
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.num_examples, generator=generator).tolist()

    def next(self) -> list[int]:
        left = self.num_examples - self.position
        if left <= 0 or (self.drop_last and left < self.batch_size):
            self.epoch, self.position = self.epoch + 1, 0
            self._order = self._permutation(self.epoch)
        indices = self._order[self.position:self.position + self.batch_size]
        self.position += len(indices)
        return indices

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self._order = self._permutation(self.epoch)


# ----------------------------------------------------------------------------------------------
# Metrics
# ----------------------------------------------------------------------------------------------


class MetricsLog:
    """Per-step metrics: ``metrics.jsonl`` during training, ``metrics.csv`` and plots after."""

    def __init__(self, output_dir: Path):
        self.path = output_dir / "metrics.jsonl"
        self.records: list[dict[str, Any]] = []

    def restore(self, up_to_step: int) -> None:
        """Keep the records of steps ≤ ``up_to_step`` (a resumed run rewrites the ones after)."""
        self.records = []
        if self.path.exists():
            for line in self.path.read_text().splitlines():
                if line.strip():
                    record = json.loads(line)
                    if record["step"] <= up_to_step:
                        self.records.append(record)
        tmp = self.path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(json.dumps(record) + "\n" for record in self.records))
        os.replace(tmp, self.path)

    def reset(self) -> None:
        self.records = []
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text("")

    def log(self, record: dict[str, Any]) -> None:
        self.records.append(record)
        with open(self.path, "a") as file:
            file.write(json.dumps(record) + "\n")

    def write_csv(self) -> Path:
        path = self.path.with_suffix(".csv")
        keys = sorted({key for record in self.records for key in record},
                      key=lambda key: (key != "step", key))
        with open(path, "w", newline="") as file:
            writer = csv.DictWriter(file, fieldnames=keys)
            writer.writeheader()
            writer.writerows(self.records)
        return path

    def plot(self, plots_dir: Path, title: str) -> list[Path]:
        """One PNG per metric family (the part of the name before '/'), one line per metric."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        families: dict[str, list[str]] = {}
        for key in sorted({key for record in self.records for key in record} - {"step"}):
            families.setdefault(key.split("/")[0] if "/" in key else key, []).append(key)
        plots_dir.mkdir(parents=True, exist_ok=True)
        paths = []
        for family, keys in families.items():
            figure, axes = plt.subplots(figsize=(6, 3.5))
            for key in keys:
                points = [(r["step"], r[key]) for r in self.records if key in r]
                if points:
                    steps, values = zip(*points)
                    axes.plot(steps, values, marker="." if len(points) < 40 else None, label=key)
            axes.set_xlabel("step")
            axes.set_title(f"{title}: {family}")
            axes.grid(alpha=0.3)
            axes.legend(fontsize=8)
            figure.tight_layout()
            path = plots_dir / f"{family.replace('/', '_')}.png"
            figure.savefig(path, dpi=100)
            plt.close(figure)
            paths.append(path)
        return paths


def mean_metrics(parts: Sequence[tuple[dict[str, float], int]]) -> Metrics:
    """Average metric dicts, each weighted by its number of examples."""
    totals: dict[str, float] = {}
    weights: dict[str, int] = {}
    for metrics, weight in parts:
        for key, value in metrics.items():
            totals[key] = totals.get(key, 0.0) + float(value) * weight
            weights[key] = weights.get(key, 0) + weight
    return {key: totals[key] / weights[key] for key in totals}


def as_floats(metrics: dict[str, Any]) -> Metrics:
    return {key: float(value) for key, value in metrics.items()}


# ----------------------------------------------------------------------------------------------
# The reference policy
# ----------------------------------------------------------------------------------------------


class ReferencePolicy:
    """The frozen reference π_ref of DPO, KTO and PPO, in one of three forms.

    * ``copy``: a frozen model (``ref_model``, or a deep copy of the policy at the start).
    * ``adapters``: the policy itself, a PEFT model, with its LoRA adapters disabled: no second
      copy of the weights at all.
    * ``precomputed``: log-probs computed once before training (by a copy that is then freed);
      the trainer stores them per example. Only sequence-level statistics can be precomputed.

    ``auto`` is ``adapters`` for a PEFT policy and ``copy`` otherwise.
    """

    def __init__(self, policy: nn.Module, ref_model: nn.Module | None, mode: str, *,
                 device: torch.device | None = None):
        check_choice("reference", mode, REFERENCE_MODES)
        if mode == "auto":
            mode = "adapters" if ref_model is None and hf.is_peft_model(policy) else "copy"
        if mode == "adapters":
            if ref_model is not None:
                raise ValueError("reference='adapters' uses the policy with its adapters "
                                 "disabled; do not pass ref_model as well")
            if not hf.is_peft_model(policy):
                raise ValueError("reference='adapters' needs a PEFT (LoRA) policy; use "
                                 "reference='copy' or 'precomputed' for a full model")
        self.mode, self.policy = mode, policy
        self.model = None
        if mode in ("copy", "precomputed"):
            self.model = ref_model if ref_model is not None else copy.deepcopy(policy)
            self.model.requires_grad_(False)
            self.model.eval()
            if device is not None:
                self.model.to(device)

    @contextlib.contextmanager
    def active(self) -> Iterator[nn.Module]:
        """The reference model to run, in eval mode and without autograd."""
        if self.model is not None:
            with torch.no_grad():
                yield self.model
            return
        was_training = self.policy.training
        self.policy.eval()  # no dropout in the reference pass
        try:
            with torch.no_grad(), hf.adapters_disabled(self.policy):
                yield self.policy
        finally:
            self.policy.train(was_training)

    def sequence_logprobs(self, input_ids, labels, attention_mask, **options) -> SequenceLogprobs:
        with self.active() as model:
            return hf.sequence_logprobs(model, input_ids, labels, attention_mask, **options)

    def release(self) -> None:
        """Free the copy once precomputed log-probs have been taken."""
        self.model = None


# ----------------------------------------------------------------------------------------------
# The trainer
# ----------------------------------------------------------------------------------------------


@dataclass
class TrainResult:
    """What ``Trainer.train`` returns: the last step, its metrics, and where things were written."""

    step: int
    metrics: Metrics
    eval_metrics: Metrics
    output_dir: Path
    files: dict[str, Path]


class Trainer:
    """The shared loop. Subclasses set ``name`` and write ``compute_loss`` (or ``training_step``).

    Args:
        model: a Hugging Face causal LM (or a PEFT model wrapping one).
        tokenizer: its tokenizer, saved next to the model at the end.
        train_examples: encoded examples (``fastalign.data.encode_*``), indexed by the stream.
        config: the options; a subclass of :class:`TrainingConfig` for trainer-specific ones.
        collator: turns a list of examples into a batch dict of tensors.
        eval_examples: optional held-out examples, evaluated every ``eval_steps`` and at the end.
    """

    name = "train"
    drop_last = False  # True: every training micro-batch has exactly batch_size examples

    def __init__(self, model: nn.Module, tokenizer, train_examples: Sequence[dict],
                 config: TrainingConfig, *, collator: Callable[[list[dict]], dict],
                 eval_examples: Sequence[dict] | None = None) -> None:
        self.config = config
        self.dist, self.device = distributed.init(config.distributed, config.device)
        if self.dist.strategy == "fsdp" and hf.is_peft_model(model):
            raise ValueError("LoRA (PEFT) models are not supported under FSDP yet; train them "
                             "with distributed='ddp' (the adapters are small)")
        self.output_dir = Path(config.output_dir)
        self.model = model.to(self.device)
        self.tokenizer = tokenizer
        self.train_examples = list(train_examples)
        self.eval_examples = list(eval_examples) if eval_examples else []
        self.collator = collator
        if config.gradient_checkpointing:
            # Recompute activations in backward; the fused head never held logits anyway.
            if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5
                model.activation_checkpointing_enable()
            else:
                model.gradient_checkpointing_enable(
                    gradient_checkpointing_kwargs={"use_reentrant": False})
            if hasattr(model, "enable_input_require_grads"):
                model.enable_input_require_grads()
        # One stream of global micro-batches (batch_size per rank); each rank takes its slice.
        # With several ranks every global batch is full, so that no rank ever gets none.
        self.stream = BatchStream(len(self.train_examples),
                                  config.batch_size * self.dist.world_size, config.seed,
                                  drop_last=self.drop_last or self.dist.enabled)
        self.step = 0
        self.metrics_log = MetricsLog(self.output_dir)
        self._engine: nn.Module | None = None
        self._optimizer: torch.optim.Optimizer | None = None
        self._scheduler = None

    # -- what subclasses write ------------------------------------------------------------------

    def compute_loss(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict]:
        """The loss of one micro-batch (a 0-d tensor) and its metrics (0-d tensors or floats)."""
        raise NotImplementedError

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def extra_state(self) -> dict[str, Any]:
        """Trainer-specific state to checkpoint (a KL controller, precomputed log-probs, ...)."""
        return {}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        pass

    def modules_to_save(self) -> dict[str, nn.Module]:
        """Extra modules (a value head) saved as ``<name>.pt`` next to the model."""
        return {}

    def before_training(self) -> None:
        """Called once before the first step of a fresh (not resumed) run."""

    def merge_metrics(self, parts: Sequence[tuple[dict[str, float], int]]) -> Metrics:
        """One step's metrics from every micro-batch of every rank (metrics, examples)."""
        return mean_metrics(parts)

    def global_micro_batches(self, parts: Sequence) -> int:
        """How many global micro-batches ``parts`` (every rank's micro-batches) make up: counts
        and sums are reported per global micro-batch, as one process with the global batch
        would report them."""
        return max(1, -(-len(parts) // self.dist.world_size))

    # -- the model, through DDP / FSDP ----------------------------------------------------------

    @property
    def engine(self) -> nn.Module:
        """The model (and ``modules_to_save``) in one :class:`distributed.ModelCall`, wrapped by
        DDP or FSDP when several processes train: ``self.engine(fn, *args)`` runs ``fn`` as its
        forward. Every use of the model's parameters goes through it. Built on first use, after
        subclasses have set up (a reference copy must be taken before FSDP shards the model)."""
        if self._engine is None:
            call = distributed.ModelCall(self.model, self.modules_to_save())
            self._engine = distributed.wrap(call, self.dist, self.device)
        return self._engine

    def local_indices(self, indices: Sequence[int]) -> list[int]:
        """This rank's slice of a global micro-batch."""
        size = self.config.batch_size
        return list(indices[self.dist.rank * size:(self.dist.rank + 1) * size])

    def all_ranks_mean(self, value: torch.Tensor) -> torch.Tensor:
        """The mean of a per-rank number over the ranks (itself in one process); no gradient."""
        if not self.dist.enabled:
            return value
        total = value.detach().clone()
        torch.distributed.all_reduce(total)
        return total / self.dist.world_size

    def gathered(self, parts: list) -> list:
        """Every rank's list items (metrics parts), concatenated in rank order."""
        return [part for rank_parts in distributed.gather_objects(parts, self.dist)
                for part in rank_parts]

    # -- the loop -----------------------------------------------------------------------------

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        if self._optimizer is None:
            self.engine  # noqa: B018  (FSDP replaces the parameters: shard before the optimizer)
            params = self.trainable_parameters()
            if not params:
                raise ValueError("the model has no parameter that requires grad")
            self._optimizer = torch.optim.AdamW(
                params, lr=self.config.lr, betas=tuple(self.config.adam_betas),
                weight_decay=self.config.weight_decay)
            self._scheduler = torch.optim.lr_scheduler.LambdaLR(self._optimizer, self._lr_factor)
        return self._optimizer

    @property
    def scheduler(self):
        self.optimizer  # noqa: B018  (creates both)
        return self._scheduler

    def _lr_factor(self, step: int) -> float:
        """Linear warm-up to the peak over ``warmup_steps``, then decay to 0 at ``max_steps``."""
        warmup, total = self.config.warmup_steps, self.config.max_steps
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if self.config.lr_schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        if self.config.lr_schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        return 1.0 - progress

    def autocast(self):
        """bf16 autocast when asked for (the fused ops take bf16 hidden states and head)."""
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.config.bf16)

    def batch(self, indices: Sequence[int], examples: Sequence[dict] | None = None) -> dict:
        examples = self.train_examples if examples is None else examples
        batch = self.collator([examples[i] for i in indices])
        batch = {k: v.to(self.device) if isinstance(v, torch.Tensor) else v
                 for k, v in batch.items()}
        batch["indices"] = torch.tensor(list(indices), dtype=torch.long, device=self.device)
        batch["split"] = "train" if examples is self.train_examples else "eval"
        return batch

    def training_step(self) -> Metrics:
        """One optimizer update over ``grad_accum_steps`` micro-batches; returns its metrics."""
        self.model.train()
        parts = []
        accum = self.config.grad_accum_steps
        for micro_step in range(accum):
            batch = self.batch(self.local_indices(self.stream.next()))
            # Gradients are reduced across ranks once per step, in the last backward.
            sync = contextlib.nullcontext() if micro_step == accum - 1 else \
                distributed.no_gradient_sync(self.engine, self.dist)
            with sync:
                with self.autocast():
                    loss, metrics = self.engine(self.compute_loss, batch)
                (loss / accum).backward()
            parts.append((as_floats(metrics) | {"loss": float(loss.detach())},
                          len(batch["indices"])))
        return self.merge_metrics(self.gathered(parts)) | self.optimizer_step()

    def optimizer_step(self) -> Metrics:
        """Clip, step and zero the gradients; returns the gradient norm before clipping."""
        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        max_norm = self.config.max_grad_norm
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm else float("inf"))
        if hasattr(norm, "full_tensor"):  # FSDP: a DTensor, replicated on every rank
            norm = norm.full_tensor()
        if not torch.isfinite(norm):
            raise FloatingPointError(
                f"step {self.step + 1}: the gradient norm is {float(norm)}; stopping rather than "
                "writing NaN into the weights (lower --lr, or check the data)")
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return {"grad_norm": float(norm)}

    def eval_batches(self, count: int) -> list[range]:
        """The evaluation micro-batches over ``count`` examples, in order: ``batch_size`` each,
        the last one smaller (with ``drop_last``, a lone last example joins the one before, since
        such trainers cannot score a batch of one)."""
        size = self.config.batch_size
        starts = list(range(0, count, size))
        if self.drop_last and len(starts) > 1 and count - starts[-1] == 1:
            starts.pop()
        return [range(start, stop) for start, stop in zip(starts, [*starts[1:], count])]

    @torch.no_grad()
    def evaluate(self) -> Metrics:
        """``compute_loss`` metrics averaged over ``eval_examples`` (in order), as ``eval/...``."""
        if not self.eval_examples:
            return {}
        was_training = self.model.training
        self.model.eval()
        parts = []
        batches = self.eval_batches(len(self.eval_examples))
        # Ranks take turns; every rank runs as many forwards as the others (FSDP's gathers must
        # pair up), so the last round is padded with a repeat that counts for nothing.
        world, rank = self.dist.world_size, self.dist.rank
        rounds = -(-len(batches) // world)
        for turn in range(rounds):
            index = turn * world + rank
            indices = batches[min(index, len(batches) - 1)]
            batch = self.batch(indices, self.eval_examples)
            with self.autocast():
                loss, metrics = self.engine(self.compute_loss, batch)
            weight = len(indices) if index < len(batches) else 0
            parts.append((as_floats(metrics) | {"loss": float(loss)}, weight))
        self.model.train(was_training)
        merged = self.merge_metrics([part for part in self.gathered(parts) if part[1] > 0])
        return {f"eval/{key}": value for key, value in merged.items()}

    def train(self) -> TrainResult:
        """Run (or resume) training to ``max_steps``; save the model, metrics and plots."""
        config = self.config
        main = self.dist.is_main
        if main:
            self.output_dir.mkdir(parents=True, exist_ok=True)
        distributed.barrier(self.dist)
        self.engine  # noqa: B018  (wrap for DDP / FSDP once the subclass is set up)
        if not (config.resume and self._resume()):
            _seed_everything(config.seed)
            if main:
                self.metrics_log.reset()
            self.before_training()
        from tqdm.auto import tqdm

        bar = tqdm(total=config.max_steps, initial=self.step, desc=f"fastalign {self.name}",
                   disable=not (config.progress and main), dynamic_ncols=True)
        metrics: Metrics = {}
        eval_metrics: Metrics = {}
        while self.step < config.max_steps:
            metrics = self.training_step() | {"lr": self.scheduler.get_last_lr()[0]}
            self.scheduler.step()
            self.step += 1
            if config.eval_steps and self.step % config.eval_steps == 0:
                eval_metrics = self.evaluate()
                metrics |= eval_metrics
            if main and (self.step % config.logging_steps == 0 or self.step == config.max_steps):
                self.metrics_log.log({"step": self.step} | metrics)
            bar.update(1)
            bar.set_postfix({k: f"{v:.4g}" for k, v in metrics.items()
                             if k in ("loss", "rewards/accuracies", "eval/rewards/accuracies",
                                      "reward", "kl")})
            if config.save_steps and self.step % config.save_steps == 0:
                self.save_checkpoint()
        bar.close()
        if self.eval_examples and not (config.eval_steps and self.step % config.eval_steps == 0):
            eval_metrics = self.evaluate()
        files = self.save_outputs()
        return TrainResult(self.step, metrics, eval_metrics, self.output_dir, files)

    # -- checkpoints and outputs --------------------------------------------------------------

    @property
    def checkpoint_root(self) -> Path:
        return self.output_dir / "checkpoints"

    def save_checkpoint(self) -> Path | None:
        """Write a checkpoint (rank 0 writes; with several ranks, every rank must call it)."""
        model_state, modules_state, optim_state = self._full_states(with_optimizer=True)
        state = {
            "step": self.step,
            "trainer": self.name,
            "config": dataclasses.asdict(self.config),
            "model": model_state,
            "modules": modules_state,
            "optimizer": optim_state,
            # Optimizer state keyed by parameter names (several ranks) or by position (one).
            "layout": "distributed" if self.dist.enabled else "single",
            "scheduler": self.scheduler.state_dict(),
            "stream": self.stream.state_dict(),
            "rng": distributed.gather_objects(_rng_state(), self.dist),
            "extra": self.extra_state(),
        }
        path = None
        if self.dist.is_main:
            path = save_checkpoint(self.checkpoint_root, self.step, state,
                                   keep=self.config.save_total_limit)
        distributed.barrier(self.dist)
        return path

    def _full_states(self, *, with_optimizer: bool) -> tuple[dict, dict, dict | None]:
        """(model, extra modules, optimizer) states, whole, on rank 0 (gathered under FSDP)."""
        if not self.dist.enabled:
            optim = self.optimizer.state_dict() if with_optimizer else None
            return (self.model.state_dict(),
                    {name: m.state_dict() for name, m in self.modules_to_save().items()}, optim)
        full, optim = distributed.full_state_dicts(
            self.engine, self.optimizer if with_optimizer else None, self.dist)
        modules = {name: distributed.strip_prefix(full, f"extra.{name}.")
                   for name in self.modules_to_save()}
        return distributed.strip_prefix(full, "model."), modules, optim

    def _resume(self) -> bool:
        """Load the newest good checkpoint; False when there is none (a fresh start)."""
        latest = load_latest(self.checkpoint_root)
        if latest is None:
            return False
        step, state = latest
        if state.get("trainer") != self.name:
            raise ValueError(f"{self.checkpoint_root} holds a {state.get('trainer')!r} run, not "
                             f"{self.name!r}; use another --output directory")
        layout = "distributed" if self.dist.enabled else "single"
        rngs = state["rng"] if isinstance(state["rng"], list) else [state["rng"]]  # one rank
        if state.get("layout", "single") != layout or len(rngs) != self.dist.world_size:
            raise ValueError(
                f"{self.checkpoint_root} was written by {len(rngs)} process(es); resume it with "
                f"as many (this run has {self.dist.world_size})")
        if self.dist.enabled:
            full = {f"model.{key}": value for key, value in state["model"].items()}
            for name, module_state in state["modules"].items():
                full |= {f"extra.{name}.{key}": value for key, value in module_state.items()}
            distributed.load_full_state_dicts(self.engine, self.optimizer, full,
                                              state["optimizer"])
        else:
            self.model.load_state_dict(state["model"])
            for name, module in self.modules_to_save().items():
                module.load_state_dict(state["modules"][name])
            self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.stream.load_state_dict(state["stream"])
        self.load_extra_state(state["extra"])
        _set_rng_state(rngs[self.dist.rank])
        self.step = step
        if self.dist.is_main:
            self.metrics_log.restore(step)
        return True

    def save_outputs(self) -> dict[str, Path]:
        """The model (``save_pretrained``), tokenizer, extra modules, metrics CSV and plots.

        A PEFT model is saved twice: its adapters in ``adapter/`` and, merged into the base
        weights, as a plain model in the output directory itself. With several ranks, rank 0
        writes (the others return an empty dict)."""
        if self.dist.strategy == "fsdp":
            model_state, modules_state, _ = self._full_states(with_optimizer=False)
            if self.dist.is_main:
                self.model.save_pretrained(self.output_dir, state_dict=model_state)
        if not self.dist.is_main:
            distributed.barrier(self.dist)
            return {}
        if self.dist.strategy == "fsdp":
            for name, module_state in modules_state.items():
                torch.save(module_state, self.output_dir / f"{name}.pt")
        elif hf.is_peft_model(self.model):
            # The adapters alone (peft loads them onto the base model), and the merged model, so
            # that transformers loads the output directory back without peft.
            self.model.save_pretrained(self.output_dir / "adapter")
            copy.deepcopy(self.model).merge_and_unload().save_pretrained(self.output_dir)
        else:
            self.model.save_pretrained(self.output_dir)
        if self.tokenizer is not None:
            self.tokenizer.save_pretrained(self.output_dir)
        if self.dist.strategy != "fsdp":
            for name, module in self.modules_to_save().items():
                torch.save(module.state_dict(), self.output_dir / f"{name}.pt")
        files = {"model": self.output_dir, "metrics": self.metrics_log.path}
        if self.metrics_log.records:
            files["metrics_csv"] = self.metrics_log.write_csv()
            if self.config.plots:
                for path in self.metrics_log.plot(self.output_dir / "plots", self.name):
                    files[f"plot:{path.stem}"] = path
        distributed.barrier(self.dist)
        return files


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)  # seeds CUDA generators too


def _rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class ReferenceTrainer(Trainer):
    """A trainer whose loss compares the policy with a frozen reference (DPO, KTO).

    It holds the :class:`ReferencePolicy` and, with ``config.reference == "precomputed"``, the
    tables of reference log-probs computed once before training (``[n, k]`` per split, rows in
    example order), which checkpoints carry so that a resumed run needs no reference model.
    Subclasses write ``reference_logps(batch)`` ([B, k], from the reference model) and read the
    batch's values through ``batch_reference_logps``.
    """

    def __init__(self, model: nn.Module, tokenizer, train_examples: Sequence[dict],
                 config: TrainingConfig, *, collator: Callable[[list[dict]], dict],
                 ref_model: nn.Module | None = None,
                 eval_examples: Sequence[dict] | None = None) -> None:
        super().__init__(model, tokenizer, train_examples, config, collator=collator,
                         eval_examples=eval_examples)
        self.reference = ReferencePolicy(self.model, ref_model, config.reference,
                                         device=self.device)
        self.precomputed: dict[str, torch.Tensor] = {}

    def reference_logps(self, batch: dict) -> torch.Tensor:
        """[B, k] reference log-probs of the batch's examples, from the reference model."""
        raise NotImplementedError

    def batch_reference_logps(self, batch: dict) -> torch.Tensor:
        """The batch's rows of the precomputed table, or ``reference_logps`` without one."""
        if self.precomputed:
            return self.precomputed[batch["split"]].to(self.device)[batch["indices"]]
        return self.reference_logps(batch)

    def before_training(self) -> None:
        if self.reference.mode == "precomputed":
            self.precomputed = {"train": self._reference_table(self.train_examples)}
            if self.eval_examples:
                self.precomputed["eval"] = self._reference_table(self.eval_examples)
            self.reference.release()

    def extra_state(self) -> dict[str, Any]:
        return {"precomputed": self.precomputed}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.precomputed = state.get("precomputed", {})
        if self.reference.mode == "precomputed":
            self.reference.release()

    def _reference_table(self, examples: Sequence[dict]) -> torch.Tensor:
        rows = []
        size = self.config.batch_size
        for start in range(0, len(examples), size):
            batch = self.batch(range(start, min(start + size, len(examples))), examples)
            with self.autocast():  # every rank computes the whole table (it is small)
                rows.append(self.engine(self.reference_logps, batch).float().cpu())
        return torch.cat(rows)
