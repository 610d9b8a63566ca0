"""Online vs offline alignment, measured on the shipped task with one judge and equal budgets.

The shipped task: prompts asking for help (``prompts.jsonl``), preference pairs answering them
politely (chosen) or rudely (rejected) (``preferences.jsonl``), and the ``"polite"`` reward
function that scores exactly that difference. It is the judge of every method here:

* ``dpo`` (offline): DPO on the shipped pairs; the judge is never called while training (the
  pairs were labelled beforehand: ``labels`` counts the comparisons it consumed);
* ``online-dpo``: DPO on pairs of its own samples ranked by the judge (Guo et al. 2024);
* ``grpo``, ``ppo``, ``trpo``: RL on the judge's scores of its own samples.

Each method trains the same model from the same seed for the same number of optimizer steps on
the same number of prompts per step. Every ``eval_every`` steps (and at step 0) one evaluation,
identical for all, samples one completion per held-out prompt (``preferences_eval.jsonl``'s
prompts, never trained on) from a seeded generator that leaves the training's random state alone,
and measures the judge's mean reward and the exact KL(π‖π_ref) to the initial model, summed over
each completion's tokens and averaged over completions (``fastalign.hf.token_kl``: no logits
held). The judge calls spent so far are counted per method.

``python -m fastalign.bench.online_offline --out DIR`` (``make online-offline``) writes
``online_offline.csv`` (one row per method and evaluation), ``online_offline.png`` (reward and
KL against steps, reward against judge calls) and ``online_offline.md`` (the final row of each
method).
"""

from __future__ import annotations

import argparse
import copy
import csv
import dataclasses
import json
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from fastalign import assets, data, hf

__all__ = ["METHODS", "JudgeEvaluation", "Method", "main", "run_comparison"]

CSV_COLUMNS = ("method", "step", "judge_calls", "labels", "judge_reward", "kl_to_reference",
               "seconds")


@dataclasses.dataclass(frozen=True)
class Method:
    """One contender: its ``fastalign train`` kind, data, config overrides, and the judge calls
    (or pre-labelled comparisons) one optimizer step spends."""

    kind: str
    overrides: dict
    judge_calls_per_step: Callable[[object], int]
    labels_per_step: Callable[[object], int] = lambda config: 0


def _samples_per_step(config) -> int:
    return config.batch_size * config.grad_accum_steps * getattr(config, "num_generations", 1)


def _candidates_per_step(config) -> int:
    return config.batch_size * config.grad_accum_steps * config.num_candidates


# Learning rates are each method's own working value on the tiny model (a shared one would
# favour one method); everything else that sets the budget is shared: steps, prompts per step.
METHODS: dict[str, Method] = {
    "dpo": Method("dpo", {"lr": 5e-4, "beta": 0.1},
                  judge_calls_per_step=lambda config: 0,
                  labels_per_step=lambda config: config.batch_size * config.grad_accum_steps),
    "online-dpo": Method("online-dpo", {"lr": 5e-4, "beta": 0.1, "reward_fn": "polite",
                                        "num_candidates": 4},
                         judge_calls_per_step=_candidates_per_step),
    "grpo": Method("grpo", {"lr": 5e-4, "reward_fn": "polite", "num_generations": 4},
                   judge_calls_per_step=_samples_per_step),
    "ppo": Method("ppo", {"lr": 5e-4, "reward_fn": "polite", "num_generations": 4},
                  judge_calls_per_step=_samples_per_step),
    "trpo": Method("ppo", {"mode": "trpo", "reward_fn": "polite", "num_generations": 4},
                   judge_calls_per_step=_samples_per_step),
}


class JudgeEvaluation:
    """The held-out measurement every method gets: judge reward and exact KL to the reference.

    Args:
        tokenizer: the models' tokenizer.
        reference: the initial policy, frozen (a copy is kept).
        prompts: held-out prompt records (``{"prompt": ...}``).
        judge: a reward function ``judge(prompts=[...], completions=[...]) -> [float]``.
        max_new_tokens: the longest completion.
        seed: seeds the sampling of every evaluation alike.
    """

    def __init__(self, tokenizer, reference: torch.nn.Module, prompts: list[dict],
                 judge: Callable, *, max_new_tokens: int = 48, seed: int = 1234) -> None:
        from fastalign.trainers.ppo import encode_prompt_examples

        self.tokenizer = tokenizer
        self.reference = copy.deepcopy(reference).eval().requires_grad_(False)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None \
            else tokenizer.eos_token_id
        self.eos_id = tokenizer.eos_token_id
        examples = encode_prompt_examples(prompts, tokenizer)
        self.batch = data.PromptCollator(pad_token_id=self.pad_id)(examples)
        self.judge = judge
        self.max_new_tokens = max_new_tokens
        self.seed = seed

    @torch.no_grad()
    def __call__(self, model: torch.nn.Module) -> dict[str, float]:
        from transformers import GenerationConfig

        from fastalign.trainers.rollout import (
            decode_texts,
            pad_after_first_eos,
            prompts_with_completions,
        )

        device = next(model.parameters()).device
        prompt_ids = self.batch["input_ids"].to(device)
        generation = GenerationConfig(
            do_sample=True, temperature=1.0, top_k=0, top_p=1.0, num_beams=1,
            max_new_tokens=self.max_new_tokens, pad_token_id=self.pad_id,
            eos_token_id=self.eos_id, use_cache=True)
        was_training = model.training
        model.eval()
        # Sampling draws from the global generator: fork it, so that training goes on exactly as
        # it would without the evaluation.
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(self.seed)
            output = model.generate(input_ids=prompt_ids,
                                    attention_mask=self.batch["attention_mask"].to(device),
                                    generation_config=generation)
        model.train(was_training)
        completion_ids, _ = pad_after_first_eos(output[:, prompt_ids.shape[1]:].cpu(),
                                                eos_id=self.eos_id, pad_id=self.pad_id)
        lengths = self.batch["prompt_lengths"]
        prompts, completions = decode_texts(self.tokenizer, self.batch["input_ids"], lengths,
                                            completion_ids, eos_id=self.eos_id)
        rewards = torch.tensor([float(score) for score in
                                self.judge(prompts=prompts, completions=completions)])
        input_ids, attention_mask, labels = prompts_with_completions(
            self.batch["input_ids"], lengths, completion_ids, eos_id=self.eos_id,
            pad_id=self.pad_id)
        self.reference.to(device)
        kl = hf.token_kl(model, self.reference, input_ids.to(device),
                         attention_mask=attention_mask.to(device))
        completion_tokens = (labels[:, 1:] != -100).to(device)
        kl_per_completion = (kl * completion_tokens).sum(1)
        return {"judge_reward": float(rewards.mean()),
                "kl_to_reference": float(kl_per_completion.mean())}


def _held_out_prompts(limit: int) -> list[dict]:
    path = assets.default_data_path("dpo_eval")
    records = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    prompts, seen = [], set()
    for record in records:
        if record["prompt"] not in seen:
            seen.add(record["prompt"])
            prompts.append({"prompt": record["prompt"]})
    return prompts[:limit]


def run_method(name: str, *, steps: int, eval_every: int, batch_size: int, out: Path,
               evaluation: JudgeEvaluation, seed: int = 0) -> list[dict]:
    """Train one method for ``steps`` steps, evaluating every ``eval_every``; its CSV rows."""
    from fastalign.trainers.run import (
        JOBS,
        _load_examples,
        _transformers_progress_bars,
        load_model,
        load_tokenizer,
    )

    method = METHODS[name]
    job = JOBS[method.kind]
    fields = {field.name for field in dataclasses.fields(job.config_class)}
    overrides = {key: value for key, value in method.overrides.items() if key in fields}
    missing = set(method.overrides) - fields
    if missing:
        raise ValueError(f"{name}: {job.config_class.__name__} has no option(s) "
                         f"{sorted(missing)}")
    config = job.config_class(output_dir=str(out / name), max_steps=steps, batch_size=batch_size,
                              eval_steps=eval_every, seed=seed, progress=False, overwrite=True,
                              **overrides)
    tokenizer = load_tokenizer(None)
    examples = _load_examples(job, assets.default_data_path(job.default_data), tokenizer, config,
                              split="train", columns=None, option="--data")
    policy = load_model(None, seed=seed, pad_token_id=tokenizer.pad_token_id)
    trainer = job.trainer_class(policy, tokenizer, examples, config)
    rows: list[dict] = []
    started = time.perf_counter()

    def evaluate() -> dict[str, float]:
        measured = evaluation(trainer.model)
        rows.append({"method": name, "step": trainer.step,
                     "judge_calls": trainer.step * method.judge_calls_per_step(config),
                     "labels": trainer.step * method.labels_per_step(config),
                     **measured, "seconds": round(time.perf_counter() - started, 1)})
        return {f"eval/{key}": value for key, value in measured.items()}

    evaluate()  # step 0: the common starting point
    trainer.evaluate = evaluate  # the loop calls it every eval_steps
    with _transformers_progress_bars(False):
        trainer.train()
    trainer.release_engine()
    return rows


def run_comparison(out: str | Path, *, methods: list[str] | None = None, steps: int = 40,
                   eval_every: int = 10, batch_size: int = 8, held_out: int = 32,
                   seed: int = 0) -> list[dict]:
    """Run every method (default: all of ``METHODS``); write the CSV, plot and table."""
    from fastalign.trainers.reward_functions import resolve_reward_fn
    from fastalign.trainers.run import load_model, load_tokenizer

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    methods = list(METHODS) if methods is None else methods
    unknown = [name for name in methods if name not in METHODS]
    if unknown:
        raise ValueError(f"unknown method(s) {unknown}; choose from {list(METHODS)}")
    tokenizer = load_tokenizer(None)
    reference = load_model(None, seed=seed, pad_token_id=tokenizer.pad_token_id)
    evaluation = JudgeEvaluation(tokenizer, reference, _held_out_prompts(held_out),
                                 resolve_reward_fn("polite"))
    rows: list[dict] = []
    for name in methods:
        rows += run_method(name, steps=steps, eval_every=eval_every, batch_size=batch_size,
                           out=out / "runs", evaluation=evaluation, seed=seed)
        write_csv(out / "online_offline.csv", rows)  # what is done survives a later failure
    write_table(out / "online_offline.md", rows, steps=steps, batch_size=batch_size,
                held_out=held_out)
    plot(out / "online_offline.png", rows)
    return rows


def write_csv(path: Path, rows: list[dict]) -> None:
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {torch.get_num_threads()} threads, torch {torch.__version__}"


def write_table(path: Path, rows: list[dict], *, steps: int, batch_size: int,
                held_out: int) -> None:
    lines = [f"Shipped task, judge `polite`, {steps} steps × {batch_size} prompts (pairs for "
             f"dpo), {held_out} held-out prompts; {machine()}.", "",
             "| method | judge reward at step 0 | judge reward | KL to reference (nats per "
             "completion) | judge calls | pre-labelled pairs |",
             "|---|---|---|---|---|---|"]
    for name in dict.fromkeys(row["method"] for row in rows):
        mine = [row for row in rows if row["method"] == name]
        first, last = mine[0], mine[-1]
        lines.append(f"| {name} | {first['judge_reward']:.3f} | {last['judge_reward']:.3f} | "
                     f"{last['kl_to_reference']:.3f} | {last['judge_calls']} | "
                     f"{last['labels']} |")
    path.write_text("\n".join(lines) + "\n")


def plot(path: Path, rows: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for i, name in enumerate(dict.fromkeys(row["method"] for row in rows)):
        mine = [row for row in rows if row["method"] == name]
        steps = [row["step"] for row in mine]
        style = {"marker": "o", "label": name, "color": f"C{i}"}  # one colour a method throughout
        axes[0].plot(steps, [row["judge_reward"] for row in mine], **style)
        axes[1].plot(steps, [row["kl_to_reference"] for row in mine], **style)
        if mine[-1]["judge_calls"]:
            axes[2].plot([row["judge_calls"] for row in mine],
                         [row["judge_reward"] for row in mine], **style)
    axes[0].set(title="held-out judge reward", xlabel="optimizer step", ylabel="mean reward")
    axes[1].set(title="KL(π ‖ π_ref), exact", xlabel="optimizer step",
                ylabel="nats per completion")
    axes[2].set(title="reward per judge call (online methods)", xlabel="judge calls",
                ylabel="mean reward")
    for axis in axes:
        axis.grid(alpha=0.3)
        if axis.get_legend_handles_labels()[0]:
            axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fastalign.bench.online_offline",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="benchmarks/results/online_offline")
    parser.add_argument("--methods", default=",".join(METHODS),
                        help="comma-separated, from " + ", ".join(METHODS))
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--eval-every", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--held-out", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    for name in ("steps", "eval_every", "batch_size", "held_out"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    try:
        run_comparison(args.out, methods=[m for m in args.methods.split(",") if m],
                       steps=args.steps, eval_every=args.eval_every,
                       batch_size=args.batch_size, held_out=args.held_out, seed=args.seed)
    except ValueError as error:
        parser.error(str(error).splitlines()[0])
    print(Path(args.out, "online_offline.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
