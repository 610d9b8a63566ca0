"""From files to a trained model: what ``fastalign train KIND`` does, callable from Python too.

``run_job(JOBS["dpo"], DPOConfig(output_dir="out"), model=None, data=None)`` loads and validates
the whole data source (a bad record stops the run before any training), loads the tokenizer and the
model (the shipped tiny Llama when ``model`` is None), encodes the data, trains, and prints a
summary of the final metrics.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from fastalign import assets, data
from fastalign.bench.dpo_memory import loss_memory_report
from fastalign.ops._checks import first_line
from fastalign.trainers import distributed
from fastalign.trainers.config import TrainingConfig, pad_token_id
from fastalign.trainers.dpo import DPOConfig, DPOTrainer
from fastalign.trainers.kto import KTOConfig, KTOTrainer
from fastalign.trainers.loop import Trainer, TrainResult
from fastalign.trainers.online_dpo import OnlineDPOConfig, OnlineDPOTrainer
from fastalign.trainers.ppo import GRPOConfig, PPOConfig, PPOTrainer, encode_prompt_examples
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

__all__ = ["JOBS", "Job", "load_model", "load_tokenizer", "run_job"]


@dataclass(frozen=True)
class Job:
    """One ``fastalign train`` kind: its config, trainer, data format and model class."""

    kind: str
    help: str
    description: str
    config_class: type[TrainingConfig]
    trainer_class: type[Trainer]
    data_kind: str  # the format load_jsonl checks: "sft", "preference", "kto" or "prompt"
    encode: Callable
    default_data: str  # key of fastalign.assets.default_data_path
    default_eval_data: str | None = None
    sequence_classifier: bool = False  # the reward model: a scalar head instead of the LM head
    # extra --options (name -> help) passed to the trainer as keyword arguments
    extra_arguments: dict[str, str] = field(default_factory=dict)
    summary_keys: tuple[str, ...] = ()
    encode_options: tuple[str, ...] = ()  # config fields passed on to ``encode``


_REF_MODEL_HELP = ("a model directory for the frozen reference (default: a copy of the policy "
                   "at the start, or see --reference)")
_REWARD_MODEL_HELP = ("a sequence-classifier directory (num_labels=1, the policy's tokenizer; "
                      "e.g. the output of `fastalign train rm`) scoring prompt + completion; "
                      "replaces the reward functions (with it, --reward-fn and "
                      "--reward-weights are errors)")

# The preference-pair trainers' data: the format, its encoder and the shipped train / eval sets.
_PREFERENCE_DATA = dict(data_kind="preference", encode=data.encode_preference,
                        default_data="dpo", default_eval_data="dpo_eval")
_REFERENCE_FREE_SUMMARY = ("rewards/accuracies", "rewards/margins", "rewards/chosen",
                           "rewards/rejected", "nll_loss", "loss")

JOBS: dict[str, Job] = {
    "sft": Job(
        kind="sft", help="supervised fine-tuning",
        description="SFT on text, messages or prompt/completion data: TRL's token-mean NLL "
                    "through the fused head.",
        config_class=SFTConfig, trainer_class=SFTTrainer, data_kind="sft",
        encode=data.encode_sft, default_data="sft",
        summary_keys=("loss", "entropy", "num_tokens"), encode_options=("assistant_only_loss",),
    ),
    "rm": Job(
        kind="rm", help="a Bradley-Terry reward model",
        description="A reward model (a sequence classifier with one output) on "
                    "prompt/chosen/rejected pairs.",
        config_class=RewardConfig, trainer_class=RewardTrainer, data_kind="preference",
        encode=data.encode_preference, default_data="rm", default_eval_data="dpo_eval",
        sequence_classifier=True,
        summary_keys=("accuracy", "margin", "mean_reward", "loss"),
    ),
    "dpo": Job(
        kind="dpo", help="Direct Preference Optimization and its variants",
        description="DPO on prompt/chosen/rejected pairs: every loss type of "
                    "fastalign.losses.dpo_loss, alone or weighted together.",
        config_class=DPOConfig, trainer_class=DPOTrainer, **_PREFERENCE_DATA,
        extra_arguments={"ref_model": _REF_MODEL_HELP},
        summary_keys=("rewards/accuracies", "rewards/margins", "rewards/chosen",
                      "rewards/rejected", "loss"),
    ),
    "simpo": Job(
        kind="simpo", help="SimPO: reference-free, length-normalised, with a target margin",
        description="SimPO on prompt/chosen/rejected pairs: no reference model; the reward is "
                    "beta times the mean answer log-prob (TRL's CPOTrainer with loss_type "
                    "simpo; --cpo-alpha > 0 adds the NLL term of CPO-SimPO; --alpha is AlphaPO).",
        config_class=SimPOConfig, trainer_class=SimPOTrainer, **_PREFERENCE_DATA,
        summary_keys=_REFERENCE_FREE_SUMMARY,
    ),
    "cpo": Job(
        kind="cpo", help="CPO: reference-free DPO plus NLL on the chosen answers",
        description="CPO on prompt/chosen/rejected pairs: no reference model; the sigmoid loss "
                    "of beta times the summed log-prob difference (or --loss-type hinge, ipo), "
                    "plus --cpo-alpha times the NLL of the chosen answers.",
        config_class=CPOConfig, trainer_class=CPOTrainer, **_PREFERENCE_DATA,
        summary_keys=_REFERENCE_FREE_SUMMARY,
    ),
    "orpo": Job(
        kind="orpo", help="ORPO: NLL plus an odds-ratio preference term, no reference",
        description="ORPO on prompt/chosen/rejected pairs: no reference model; the NLL of the "
                    "chosen answers minus beta times log sigmoid of the log odds ratio of the "
                    "mean answer log-probs.",
        config_class=ORPOConfig, trainer_class=ORPOTrainer, **_PREFERENCE_DATA,
        summary_keys=("rewards/accuracies", "rewards/margins", "log_odds_ratio", "nll_loss",
                      "loss"),
    ),
    "kto": Job(
        kind="kto", help="Kahneman-Tversky Optimization",
        description="KTO on unpaired prompt/completion/label data, with the mismatched-pair KL "
                    "reference point (none with --loss-type apo_zero_unpaired).",
        config_class=KTOConfig, trainer_class=KTOTrainer, data_kind="kto",
        encode=data.encode_kto, default_data="kto",
        extra_arguments={"ref_model": _REF_MODEL_HELP},
        summary_keys=("rewards/margins", "rewards/chosen", "rewards/rejected", "kl", "loss"),
    ),
    "ppo": Job(
        kind="ppo", help="PPO, GRPO, RLOO or TRPO (--mode) with a value head by default",
        description="Online RL: sample completions of the prompts, score them with --reward-fn "
                    "or --reward-model, optimise the clipped objective (--mode trpo: one "
                    "trust-region step per rollout) with the fused head.",
        config_class=PPOConfig, trainer_class=PPOTrainer, data_kind="prompt",
        encode=encode_prompt_examples, default_data="ppo",
        extra_arguments={"ref_model": _REF_MODEL_HELP, "reward_model": _REWARD_MODEL_HELP},
        summary_keys=("reward", "reward_std", "kl", "entropy", "completions/mean_length",
                      "loss/policy", "loss/value"),
    ),
    "grpo": Job(
        kind="grpo", help="GRPO (group-relative advantages, KL in the loss)",
        description="GRPO: groups of --num-generations completions per prompt, advantages "
                    "normalised within each group, beta * k3 KL in the loss.",
        config_class=GRPOConfig, trainer_class=PPOTrainer, data_kind="prompt",
        encode=encode_prompt_examples, default_data="grpo",
        extra_arguments={"ref_model": _REF_MODEL_HELP, "reward_model": _REWARD_MODEL_HELP},
        summary_keys=("reward", "reward_std", "kl", "completions/mean_length", "loss/policy"),
    ),
    "online-dpo": Job(
        kind="online-dpo", help="online DPO: pairs sampled from the policy, ranked by a judge",
        description="Online DPO (Guo et al. 2024): --num-candidates completions per prompt "
                    "(sampled, or --sampler mcts), ranked by --reward-fn, --reward-model or a "
                    "--feedback hook; the best against the worst (or --pairs all) trained by "
                    "any DPO loss type against the frozen reference.",
        config_class=OnlineDPOConfig, trainer_class=OnlineDPOTrainer, data_kind="prompt",
        encode=encode_prompt_examples, default_data="ppo",
        extra_arguments={"ref_model": _REF_MODEL_HELP, "reward_model": _REWARD_MODEL_HELP},
        summary_keys=("objective/scores", "objective/kl", "rewards/accuracies",
                      "rewards/margins", "loss"),
    ),
}


def _check_model_source(model: str, flag: str = "--model") -> dict:
    """The ``from_pretrained`` options that load ``model`` without a long wait or a riddle.

    A local path that does not exist is named as such (not as a bad hub repository id). A hub
    id is looked up once, quickly: transformers would retry every file of a mistyped id or an
    unreachable hub for about a minute before failing. With the hub unreachable, a cached copy
    is loaded from the cache alone.
    """
    looks_local = model.startswith((".", "/", "~")) or model.count("/") > 1  # hub: 'org/name'
    if Path(model).expanduser().exists():
        return {}
    if looks_local:
        raise ValueError(f"{flag} {model!r}: no such directory (give a model directory or a "
                         "Hugging Face hub id such as 'org/name')")
    return _hub_source_options(model, flag)


@functools.lru_cache(maxsize=None)
def _hub_source_options(model: str, flag: str) -> dict:
    from huggingface_hub import constants, model_info, try_to_load_from_cache
    from huggingface_hub.errors import HfHubHTTPError, HFValidationError, RepositoryNotFoundError

    try:
        cached = isinstance(try_to_load_from_cache(model, "config.json"), str)
    except HFValidationError as error:
        raise ValueError(f"{flag} {model!r}: neither a local directory nor a valid hub id "
                         f"({first_line(error)})") from None
    if constants.HF_HUB_OFFLINE:
        if cached:
            return {"local_files_only": True}
        raise ValueError(f"{flag} {model}: not a local directory, and not in the Hugging Face "
                         f"cache (HF_HUB_OFFLINE is set); give a model directory")
    try:
        model_info(model, timeout=10)
    except RepositoryNotFoundError:
        raise ValueError(f"{flag} {model}: no such model on the Hugging Face hub (check the id; "
                         f"a private one needs `hf auth login`), and no such local "
                         f"directory") from None
    except HfHubHTTPError:
        return {}  # the hub answered (gated, rate-limited, ...): loading says what is wrong
    except Exception as error:  # noqa: BLE001  (no connection: the HTTP client's own errors)
        if cached:
            return {"local_files_only": True}
        raise ValueError(f"{flag} {model}: not a local directory, and the Hugging Face hub "
                         f"cannot be reached ({first_line(error)}) with no cached copy; give "
                         f"a model directory, or check the id and the network") from None
    return {}


def load_tokenizer(model: str | None):
    if model is None:
        return assets.load_default_tokenizer()
    source = _check_model_source(model)
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(model, **source)
    except (ValueError, OSError) as error:  # e.g. a Llama folder without tokenizer.model
        raise ValueError(f"--model {model}: no usable tokenizer there ({first_line(error)}); "
                         f"copy the base model's tokenizer files into the folder") from None
    # transformers builds an empty tokenizer for a folder without tokenizer files (GPT-2,
    # Qwen2): every text would encode to no tokens and training would run on nothing.
    if not tokenizer("Hello, world.", add_special_tokens=False)["input_ids"]:
        raise ValueError(f"--model {model}: its tokenizer encodes text to no tokens (a "
                         f"vocabulary of {len(tokenizer)}): the folder has no tokenizer files "
                         f"(tokenizer.json, or vocab.json and merges.txt); copy the base "
                         f"model's tokenizer files into it")
    return tokenizer


def load_model(model: str | None, *, seed: int, sequence_classifier: bool = False,
               pad_token_id: int | None = None, flag: str = "--model") -> torch.nn.Module:
    """A causal LM (or, for the reward model, a sequence classifier with one output)."""
    source = {} if model is None else _check_model_source(model, flag)
    if sequence_classifier:
        from transformers import AutoConfig, AutoModelForSequenceClassification

        config = AutoConfig.from_pretrained(
            str(assets.default_model_dir()) if model is None else model, num_labels=1, **source)
        if config.pad_token_id is None:
            config.pad_token_id = pad_token_id  # finds each sequence's last token
        if model is None:  # random init from the shipped config, seeded
            with torch.random.fork_rng():
                torch.manual_seed(seed)
                return AutoModelForSequenceClassification.from_config(config)
        return AutoModelForSequenceClassification.from_pretrained(model, config=config, **source)
    if model is None:
        return assets.build_default_model(seed=seed)
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model, **source)


def add_lora(model: torch.nn.Module, *, r: int, targets: str = "auto") -> torch.nn.Module:
    """Wrap ``model`` with PEFT LoRA adapters of rank ``r`` on the comma-separated ``targets``
    (``auto``: PEFT's default modules for the model's architecture).

    Only the adapters train, and the reference is the same model with the adapters disabled (no
    second copy of the weights). The LM head cannot take adapters: the fused ops read its weight
    directly."""
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise ValueError(f"lora_r must be an integer >= 1, got {r!r}")
    try:
        import peft
    except ImportError:
        raise ValueError("--lora-r needs the peft package: pip install peft") from None
    modules = [name.strip() for name in targets.split(",") if name.strip()]
    if not modules:
        raise ValueError(f"lora_targets must name at least one module, got {targets!r}")
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    head_names = {name.rsplit(".", 1)[-1] for name, module in model.named_modules()
                  if head is not None and module is head}
    on_head = [name for name in modules if name in head_names]
    if on_head:
        raise ValueError(f"--lora-targets {targets}: LoRA on the LM head ({', '.join(on_head)}) "
                         f"is not supported, the fused ops read its weight directly; target the "
                         f"attention or MLP projections (or auto)")
    target_modules = None if modules == ["auto"] else modules
    config = peft.LoraConfig(r=r, lora_alpha=2 * r, target_modules=target_modules,
                             lora_dropout=0.0)
    try:
        return peft.get_peft_model(model, config)
    except ValueError as error:  # unknown module names, or no default for the architecture
        raise ValueError(f"--lora-targets {targets}: {first_line(error)}") from None


def _load_examples(job: Job, source, tokenizer, config: TrainingConfig, *, split: str,
                   columns, option: str) -> list[dict]:
    columns = data.parse_columns(columns, name="--data-columns")
    try:
        records = data.load_records(source, job.data_kind, split=split, columns=columns)
    except data.DatasetsNotInstalled as error:
        raise data.DataError(f"{option} {error}") from None
    try:
        examples = job.encode(records, tokenizer, max_length=config.max_length,
                              max_prompt_length=config.max_prompt_length,
                              **{name: getattr(config, name) for name in job.encode_options})
    except data.DataError as error:
        raise data.DataError(f"{source}: {error}") from None
    data.check_tokens_to_train_on(examples, job.data_kind, source)
    return examples


def run_job(job: Job, config: TrainingConfig, *, model: str | None = None,
            data: str | Path | None = None, eval_data: str | Path | None = None,
            data_split: str = "train", eval_split: str = "test",
            data_columns: dict[str, str] | str | None = None,
            lora_r: int | None = None, lora_targets: str = "auto",
            print_summary: bool = True, **extra) -> TrainResult:
    """Load, validate, encode, train and summarise; see the module docstring. ``data`` and
    ``eval_data`` are any source of ``fastalign.data.load_records``: ``data_split`` and
    ``eval_split`` pick the split of a dataset folder or hub id, ``data_columns`` renames the
    columns of both to the format's keys."""
    if not isinstance(config, job.config_class):
        raise TypeError(f"{job.kind} takes a {job.config_class.__name__}, got "
                        f"{type(config).__name__}")
    with _transformers_progress_bars(config.progress):
        return _run_job(job, config, model=model, data=data, eval_data=eval_data,
                        splits=(data_split, eval_split), columns=data_columns, lora_r=lora_r,
                        lora_targets=lora_targets, print_summary=print_summary, **extra)


@contextlib.contextmanager
def _transformers_progress_bars(enabled: bool):
    """With ``progress`` off, the bars of transformers (loading and writing model shards) and of
    datasets (reading a Parquet, CSV, ... source) go too."""
    from transformers.utils import logging as transformers_logging

    libraries = [transformers_logging]
    if not enabled and importlib.util.find_spec("datasets") is not None:
        from datasets.utils import logging as datasets_logging

        libraries.append(datasets_logging)
    were_enabled = [library.is_progress_bar_enabled() for library in libraries]
    if not enabled:
        for library in libraries:
            library.disable_progress_bar()
    try:
        yield
    finally:
        for library, was_enabled in zip(libraries, were_enabled):
            if was_enabled and not enabled:
                library.enable_progress_bar()


def _run_job(job: Job, config: TrainingConfig, *, model, data, eval_data, splits, columns, lora_r,
             lora_targets, print_summary, **extra) -> TrainResult:
    if eval_data is None and data is None and job.default_eval_data:
        eval_data = assets.default_data_path(job.default_eval_data)
    if data is None:
        data = assets.default_data_path(job.default_data)
    tokenizer = load_tokenizer(model)
    # Every record of both sources is checked before the model is even loaded.
    train_examples = _load_examples(job, data, tokenizer, config, split=splits[0],
                                    columns=columns, option="--data")
    eval_examples = _load_examples(job, eval_data, tokenizer, config, split=splits[1],
                                   columns=columns, option="--eval-data") if eval_data else None
    pad_id = pad_token_id(tokenizer)
    policy = load_model(model, seed=config.seed, sequence_classifier=job.sequence_classifier,
                        pad_token_id=pad_id)
    if lora_r is not None:
        policy = add_lora(policy, r=lora_r, targets=lora_targets)
    kwargs = {}
    for name, value in extra.items():
        if value is None:
            continue
        if name in ("ref_model", "reward_model"):
            value = load_model(value, seed=config.seed, flag="--" + name.replace("_", "-"),
                               sequence_classifier=name == "reward_model", pad_token_id=pad_id)
        kwargs[name] = value
    trainer = job.trainer_class(policy, tokenizer, train_examples, config,
                                eval_examples=eval_examples, **kwargs)
    try:
        result = trainer.train()
        if print_summary and trainer.dist.is_main:
            print(format_summary(job, trainer, result))
    except BaseException:
        trainer.release_engine()
        distributed.shutdown(wait_for_others=False)
        raise
    trainer.release_engine()
    distributed.shutdown()
    return result


def format_summary(job: Job, trainer: Trainer, result: TrainResult) -> str:
    processes = ""
    if trainer.dist.enabled:
        processes = f" on {trainer.dist.world_size} processes ({trainer.dist.strategy})"
    lines = [f"fastalign train {job.kind}: {result.step} steps{processes}, output in "
             f"{result.output_dir}"]
    for title, metrics, prefix in (("last training step", result.metrics, ""),
                                   ("held-out data", result.eval_metrics, "eval/")):
        shown = [(key, metrics[prefix + key]) for key in job.summary_keys
                 if prefix + key in metrics]
        if shown:
            lines.append(f"  {title}: " + ", ".join(f"{key} {value:.4f}" for key, value in shown))
    if isinstance(trainer, DPOTrainer) and trainer.config.memory_report \
            and not trainer.dist.enabled:
        config = trainer.config
        indices = range(min(config.batch_size, len(trainer.train_examples)))
        batch = trainer.batch(indices)
        if batch.pop("cu_seqlens", None) is not None:  # the report measures padded [2B, T] rows
            padded = data.PreferenceCollator(pad_token_id(trainer.tokenizer))(
                [trainer.train_examples[i] for i in indices])
            batch.update({key: value.to(trainer.device) for key, value in padded.items()})
        lines.append(loss_memory_report(
            trainer.model, batch, trainer.batch_reference_logps(batch),
            options=config.loss_options, impl=config.impl,
            gradients_in_forward=config.gradients_in_forward and not config.padding_free))
    for name, path in result.files.items():
        if not name.startswith("plot:"):
            lines.append(f"  {name}: {path}")
    plots = [path for name, path in result.files.items() if name.startswith("plot:")]
    if plots:
        lines.append(f"  plots: {len(plots)} PNG files in {plots[0].parent}")
    return "\n".join(lines)
