"""The training loop every fastalign trainer shares.

A trainer is a :class:`Trainer` subclass that writes one method, ``compute_loss(batch)`` (PPO
writes ``training_step`` instead, because one step is a rollout and several updates). Everything
else lives here, once, or in the module that owns it:

* **Data order**: a :class:`~fastalign.trainers.data_order.BatchStream` of seeded permutations.
* **The step**: ``grad_accum_steps`` micro-batches, each ``loss / grad_accum_steps`` backward
  (optionally under bf16 autocast), gradient clipping, AdamW, and a learning rate with linear
  warm-up then linear or cosine decay to 0 at the last step (``total_steps``: ``max_steps``, or
  as many steps as ``num_epochs`` passes over the data take).
* **Checkpoints** every ``save_steps`` (``checkpoint.py``: atomic, verified, and resumed to the
  same weights and metrics as an uninterrupted run).
* **Metrics** (``metrics.py``): one JSON line per step in ``metrics.jsonl``, and at the end
  ``metrics.csv`` and PNG curves in ``plots/``; a tqdm bar shows progress.
* **Output**: ``save_pretrained`` of the model and tokenizer into ``output_dir``, loadable by
  ``transformers.AutoModelForCausalLM.from_pretrained(output_dir)``.
* **Several processes** (``distributed.py``): every use of the model goes through one wrapped
  module, ``engine``; each rank takes its slice of every global micro-batch.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import gc
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fastalign import hf
from fastalign.trainers import checkpoint, distributed
from fastalign.trainers.config import TrainingConfig
from fastalign.trainers.data_order import BatchStream
from fastalign.trainers.metrics import (
    Metrics,
    MetricsLog,
    as_floats,
    mean_logits_by_side,
    mean_metrics,
    report_targets,
    scored_mean_logits,
)

__all__ = ["TrainResult", "Trainer"]


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
        _check_model_and_examples(model, train_examples, eval_examples)
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
        self.num_tokens_seen = 0  # input tokens of every rank's training batches (TRL's num_tokens)
        tensorboard = "tensorboard" in report_targets(config.report_to)
        self.metrics_log = MetricsLog(
            self.output_dir, tensorboard_dir=self.output_dir / "runs" if tensorboard else None)
        self._engine: nn.Module | None = None
        self._optimizer: torch.optim.Optimizer | None = None
        self._scheduler = None

    # -- what subclasses write ------------------------------------------------------------------

    def compute_loss(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict]:
        """The loss of one micro-batch (a 0-d tensor) and its metrics (0-d tensors or floats)."""
        raise NotImplementedError

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def count_input_tokens(self, batch: dict) -> int | None:
        """The input tokens a training micro-batch feeds the model (its attended tokens, or every
        token of a padding-free row), counted into ``num_tokens`` as TRL counts them; None for
        trainers whose TRL counterpart logs no ``num_tokens``."""
        mask = batch.get("attention_mask")
        return int(batch["input_ids"].numel() if mask is None else mask.sum())

    def tokens_seen(self, local_tokens: int) -> Metrics:
        """``num_tokens``: the running total over every rank, after this step's ``local_tokens``
        (checkpointed, so that a resumed run goes on counting)."""
        self.num_tokens_seen += sum(self.gathered([local_tokens]))
        return {"num_tokens": float(self.num_tokens_seen)}

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

    def stream_batches_per_step(self) -> int:
        """Global micro-batches one step takes from the stream (what ``num_epochs`` counts)."""
        return self.config.grad_accum_steps

    @functools.cached_property
    def data_fingerprint(self) -> dict[str, Any]:
        """The training examples' count and SHA-256, which checkpoints record and a resume must
        match; hashed once per run, not at every checkpoint."""
        return checkpoint.data_fingerprint(self.train_examples)

    @property
    def total_steps(self) -> int:
        """``max_steps``, or the steps that ``num_epochs`` passes over the data take (the last
        step may run into the next epoch when an epoch's micro-batches do not fill it). Read
        from the config each time: a config changed after construction counts."""
        if self.config.num_epochs is None:
            return self.config.max_steps
        batches = self.config.num_epochs * self.stream.batches_per_epoch
        # rounded first: a float product such as 0.1 * 30 lands just above the whole number
        return max(1, math.ceil(round(batches / self.stream_batches_per_step(), 9)))

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

    def release_engine(self) -> None:
        """Drop the DDP / FSDP wrapper while the process group is still alive.

        DDP's reducer sits in reference cycles, so without this it is freed only at interpreter
        exit, after the process group is gone; with gloo its communication threads then abort
        the process ("terminate called without an active exception"), now and then, on a loaded
        machine. ``self.engine`` rebuilds it if it is used again.
        """
        self._engine = None
        gc.collect()

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

    def fused_pair_step(self, batch: dict, loss_module: type, loss_options,
                        **loss_kwargs) -> tuple[torch.Tensor, Metrics]:
        """A preference step through a fused loss module, which forms the head's gradients in
        forward: the backbone on a padded chosen-on-rejected ``batch``, then
        ``loss_module(options=loss_options, ...)(hidden, weight, labels, bias=..., **loss_kwargs)``,
        and TRL's ``logits/chosen`` and ``logits/rejected``."""
        labels = batch["labels"]
        hidden = hf.final_hidden_states(self.model, batch["input_ids"],
                                        attention_mask=batch.get("attention_mask"))
        head = hf.lm_head(self.model)
        hidden, weight, bias = hf.head_inputs(hidden, head)
        options = head.options(self.config.temperature)
        loss_fn = loss_module(options=loss_options, impl=self.config.impl, **options)
        with hf.no_autocast(hidden.device.type):
            loss, metrics = loss_fn(hidden, weight, labels, bias=bias, **loss_kwargs)
            logits = scored_mean_logits(hidden, weight, labels, bias=bias, **options)
        chosen_rows = torch.arange(len(labels), device=self.device) < len(labels) // 2
        return loss, metrics | mean_logits_by_side(logits, chosen_rows,
                                                     across_ranks=self.all_ranks_mean)

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
        """Linear warm-up to the peak over ``warmup_steps``, then decay to 0 at the last step."""
        warmup, total = self.config.warmup_steps, self.total_steps
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
        tokens: int | None = 0
        accum = self.config.grad_accum_steps
        for micro_step in range(accum):
            batch = self.batch(self.local_indices(self.stream.next()))
            count = self.count_input_tokens(batch)
            tokens = None if count is None else tokens + count
            # Gradients are reduced across ranks once per step, in the last backward.
            sync = contextlib.nullcontext() if micro_step == accum - 1 else \
                distributed.no_gradient_sync(self.engine, self.dist)
            with sync:
                with self.autocast():
                    loss, metrics = self.engine(self.compute_loss, batch)
                (loss / accum).backward()
            parts.append((as_floats(metrics) | {"loss": float(loss.detach())},
                          len(batch["indices"])))
        metrics = self.merge_metrics(self.gathered(parts))
        if tokens is not None:
            metrics |= self.tokens_seen(tokens)
        return metrics | self.optimizer_step()

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
        """Run (or resume) training to ``total_steps``; save the model, metrics and plots."""
        config = self.config
        main = self.dist.is_main
        checkpoint.prepare_output_dir(self)
        if main:
            self.output_dir.mkdir(parents=True, exist_ok=True)
        distributed.barrier(self.dist)
        self.engine  # noqa: B018  (wrap for DDP / FSDP once the subclass is set up)
        if not (config.resume and checkpoint.resume_training(self)):
            checkpoint.seed_everything(config.seed)
            if main:
                self.metrics_log.reset()
            self.before_training()
        from tqdm.auto import tqdm

        bar = tqdm(total=self.total_steps, initial=self.step, desc=f"fastalign {self.name}",
                   disable=not (config.progress and main), dynamic_ncols=True)
        metrics: Metrics = {}
        eval_metrics: Metrics = {}
        while self.step < self.total_steps:
            metrics = self.training_step() | {"learning_rate": self.scheduler.get_last_lr()[0],
                                              "epoch": self.stream.epochs_done}
            self.scheduler.step()
            self.step += 1
            if config.eval_steps and self.step % config.eval_steps == 0:
                eval_metrics = self.evaluate()
                metrics |= eval_metrics
            if main and (self.step % config.logging_steps == 0 or self.step == self.total_steps):
                self.metrics_log.log({"step": self.step} | metrics)
            bar.update(1)
            bar.set_postfix({k: f"{v:.4g}" for k, v in metrics.items()
                             if k in ("loss", "rewards/accuracies", "eval/rewards/accuracies",
                                      "accuracy", "reward", "kl")})
            if config.save_steps and self.step % config.save_steps == 0:
                self.save_checkpoint()
        bar.close()
        self.metrics_log.close()
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
        return checkpoint.save_training_checkpoint(self)

    def save_outputs(self) -> dict[str, Path]:
        """The model (``save_pretrained``), tokenizer, extra modules, metrics CSV and plots.

        A PEFT model is saved twice: its adapters in ``adapter/`` and, merged into the base
        weights, as a plain model in the output directory itself. With several ranks, rank 0
        writes (the others return an empty dict)."""
        if self.dist.strategy == "fsdp":
            model_state, modules_state, _ = checkpoint.gathered_states(
                self, with_optimizer=False)
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
        if self.metrics_log.tensorboard_dir is not None:
            files["tensorboard"] = self.metrics_log.tensorboard_dir
        if self.metrics_log.records:
            files["metrics_csv"] = self.metrics_log.write_csv()
            if self.config.plots:
                for path in self.metrics_log.plot(self.output_dir / "plots", self.name):
                    files[f"plot:{path.stem}"] = path
        distributed.barrier(self.dist)
        return files


def _check_model_and_examples(model, train_examples, eval_examples) -> None:
    """A loaded model and encoded examples, said plainly before anything starts: a path string
    or raw JSONL records would otherwise fail deep inside (``'str' object has no attribute
    'to'``, ``KeyError: 'prompt_ids'``)."""
    if not isinstance(model, nn.Module):
        hint = ""
        if isinstance(model, (str, os.PathLike)):
            hint = (f"; load it first, e.g. AutoModelForCausalLM.from_pretrained({str(model)!r}) "
                    f"(or `fastalign train --model {model}`)")
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}{hint}")
    for name, examples in (("train_examples", train_examples),
                           ("eval_examples", eval_examples or [])):
        first = next(iter(examples), None)
        if first is not None and (not isinstance(first, dict)
                                  or not {"prompt_ids", "packed"} & set(first)):
            got = f"keys {sorted(first)}" if isinstance(first, dict) else type(first).__name__
            raise ValueError(
                f"{name} must be encoded examples (token ids such as 'prompt_ids'), got {got}: "
                f"encode the records first with fastalign.data's encode_sft, encode_preference, "
                f"encode_kto or encode_prompts")
