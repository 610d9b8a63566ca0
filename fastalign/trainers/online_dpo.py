"""Online DPO (Guo et al. 2024, "Direct Language Model Alignment from Online AI Feedback"):
preference pairs sampled from the current policy and ranked by a judge, every step.

One micro-batch is ``batch_size`` prompts (``{"prompt_ids"}``, ``PromptCollator``):

1. **Candidates**: ``num_candidates`` completions per prompt from the policy, sampled as PPO samples
   them (``PPOTrainer.generate``: temperature, top-k, top-p, ``max_new_tokens``), or, with
   ``sampler="mcts"``, the best distinct answers of a Monte Carlo tree search over chunks of
   tokens guided by the judge's scores (``mcts.py``).
2. **Ranking**: the judge orders each prompt's candidates: the reward functions or a reward
   model (``PPOTrainer.score``; ties keep the sampling order), or a feedback hook
   ``rank(prompt, candidates) -> indices best first`` (``feedback.py``). Every hook ranking is
   written to ``feedback_log.jsonl`` as it arrives, keyed by step, prompt and candidates: a run
   resumed from a checkpoint samples the same candidates again and replays the rankings instead
   of asking twice. Best-of-n is the ranking's first candidate.
3. **Pairs**: the best against the worst candidate (``pairs="best-worst"``), or every ordered pair
   of the ranking (``"all"``), stacked chosen-on-rejected and trained by ``DPOTrainer``'s loss
   (any ``loss_type`` of ``dpo_loss``) against the frozen reference (a copy of the initial policy,
   or the PEFT policy with its adapters disabled).

Metrics carry TRL's ``OnlineDPOTrainer`` names: ``objective/kl`` (the mean over candidates of
the summed log-ratio of their sampled tokens), ``objective/entropy`` (mean of minus their summed
log-probs), ``objective/non_score_reward`` (−β·kl), ``val/contain_eos_token`` and ``beta``; with a
scoring judge also ``objective/scores`` (every candidate's score), ``objective/scores_margin``
(chosen minus rejected) and ``objective/rlhf_reward`` (score + non-score reward); and the DPO
loss's ``rewards/*``, ``logps/*`` and ``logits/*`` on the pairs.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from fastalign import hf
from fastalign.data import PromptCollator
from fastalign.ops._checks import check_field_choice, check_field_int, check_field_number
from fastalign.trainers.config import pad_token_id
from fastalign.trainers.dpo import DPOConfig, DPOTrainer
from fastalign.trainers.feedback import (
    FeedbackFn,
    FeedbackLog,
    ask,
    feedback_key,
    resolve_feedback,
)
from fastalign.trainers.mcts import mcts_search
from fastalign.trainers.metrics import Metrics
from fastalign.trainers.ppo import PPOTrainer
from fastalign.trainers.ppo_config import ROLLOUT_REFERENCE_MODES, PPOConfig
from fastalign.trainers.reference import ReferenceTrainer
from fastalign.trainers.reward_functions import RewardFn, RewardFunctions
from fastalign.trainers.rollout import completion_length, decode_texts

__all__ = ["PAIRS", "SAMPLERS", "OnlineDPOConfig", "OnlineDPOTrainer"]

SAMPLERS = ("sample", "mcts")
PAIRS = ("best-worst", "all")


def _as_in_ppo(name: str):
    """PPOConfig's option ``name`` (default and help), for the options both trainers share."""
    source = PPOConfig.__dataclass_fields__[name]
    return dataclasses.field(default=source.default, metadata=source.metadata)


@dataclass
class OnlineDPOConfig(DPOConfig):
    """Online DPO options: DPO's loss options, PPO's sampling and reward options, and the
    candidates, sampler, pairs and feedback hook. ``batch_size`` counts prompts."""

    num_candidates: int = dataclasses.field(default=2, metadata={"help": (
        "completions sampled per prompt and ranked by the judge, >= 2 (best-of-n: the best is "
        "chosen)")})
    max_new_tokens: int = _as_in_ppo("max_new_tokens")
    top_k: int = _as_in_ppo("top_k")
    top_p: float = _as_in_ppo("top_p")
    sampler: str = dataclasses.field(default="sample", metadata={"help": (
        "how the candidates are drawn: sample (temperature, top-k, top-p) or mcts (a Monte Carlo "
        "tree search over chunks of tokens, its rollouts scored by the judge: the best distinct "
        "answers; needs --reward-fn or --reward-model)")})
    mcts_simulations: int = dataclasses.field(default=16, metadata={"help": (
        "mcts: simulations (expand, roll out, score) per prompt, >= num-candidates")})
    mcts_chunk_tokens: int = dataclasses.field(default=4, metadata={"help": (
        "mcts: tokens of the chunk each expansion samples")})
    mcts_exploration: float = dataclasses.field(default=1.0, metadata={"help": (
        "mcts: the exploration constant c of UCT, Q + c sqrt(ln N / n), >= 0")})
    pairs: str = dataclasses.field(default="best-worst", metadata={"help": (
        "the pairs trained per prompt: best-worst (the best candidate against the worst) or all "
        "(every pair of the ranking)")})
    reference: str = _as_in_ppo("reference")  # no precomputed log-probs of online samples
    reward_fn: str | None = _as_in_ppo("reward_fn")
    reward_weights: tuple[float, ...] | None = _as_in_ppo("reward_weights")
    missing_eos_penalty: float | None = _as_in_ppo("missing_eos_penalty")
    feedback: str | None = dataclasses.field(default=None, metadata={"help": (
        "rank the candidates by a feedback hook instead of the reward: terminal (asks on the "
        "terminal), jsonl (writes feedback_requests.jsonl in the output directory, reads "
        "feedback_responses.jsonl) or module:function, rank(prompt, candidates) -> candidate "
        "indices best first; 'none': the reward")})

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("num_candidates", "max_new_tokens"):
            check_field_int(name, getattr(self, name), minimum=2 if name == "num_candidates"
                            else 1)
        check_field_int("top_k", self.top_k, minimum=0)
        check_field_number("top_p", self.top_p, low=0.0, high=1.0, high_inclusive=True)
        check_field_choice("sampler", self.sampler, SAMPLERS)
        check_field_int("mcts_simulations", self.mcts_simulations, minimum=self.num_candidates)
        check_field_int("mcts_chunk_tokens", self.mcts_chunk_tokens, minimum=1)
        check_field_number("mcts_exploration", self.mcts_exploration, low=0.0, inclusive=True)
        check_field_choice("pairs", self.pairs, PAIRS)
        if self.max_prompt_length >= self.max_length:
            raise ValueError(f"max_prompt_length ({self.max_prompt_length}) must be smaller than "
                             f"max_length ({self.max_length}) to leave room for the completion")
        if self.reference == "precomputed":
            raise ValueError("reference='precomputed' is impossible for online DPO: the "
                             "candidates are sampled during training; use 'copy' or 'adapters'")
        check_field_choice("reference", self.reference, ROLLOUT_REFERENCE_MODES)
        for name in ("padding_free", "memory_report"):
            if getattr(self, name):
                raise ValueError(f"{name} is not supported by online DPO yet; drop it")
        if self.missing_eos_penalty is not None:
            check_field_number("missing_eos_penalty", self.missing_eos_penalty, low=0.0,
                               inclusive=True)
        if self.feedback is not None:
            if not isinstance(self.feedback, str):  # a checkpoint records the options as data
                raise ValueError(f"feedback must be a name such as 'terminal' or "
                                 f"'module:function', got {type(self.feedback).__name__}; pass "
                                 f"a callable as OnlineDPOTrainer(feedback=...)")
            resolve_feedback(self.feedback, self.output_dir)  # a bad name fails now
            _check_feedback_alone(self, "feedback")
        if self.reward_fn is not None:
            RewardFunctions(self.reward_fn, self.reward_weights)
        elif self.reward_weights is not None:
            raise ValueError("reward_weights weighs the functions of reward_fn, which is None")


def _check_feedback_alone(config: OnlineDPOConfig, hook: str) -> None:
    """A feedback hook replaces the reward functions (left at their default); chosen ones, or
    MCTS, which scores hundreds of rollouts, would need a scoring judge the hook is not."""
    chosen = [f"{name}={getattr(config, name)!r}" for name in ("reward_fn", "reward_weights",
                                                                "missing_eos_penalty")
              if getattr(config, name) != getattr(type(config), name)]
    if chosen:
        raise ValueError(f"a feedback hook ({hook}) ranks the candidates instead of the reward, "
                         f"but {' and '.join(chosen)} were given too: drop one")
    if config.sampler == "mcts":
        raise ValueError(f"sampler='mcts' scores every rollout of its search with the judge, "
                         f"which must be --reward-fn or --reward-model, not a feedback hook "
                         f"({hook}): use sampler='sample'")


class OnlineDPOTrainer(ReferenceTrainer):
    """Online DPO on a Hugging Face causal LM; see the module docstring.

    Args:
        model, tokenizer: the policy (a causal LM or PEFT model) and its tokenizer (needs eos).
        train_examples: ``{"prompt_ids"}`` examples (``ppo.encode_prompt_examples``).
        config: an :class:`OnlineDPOConfig`.
        ref_model: the frozen reference (default: a copy of the policy, or its adapters off).
        reward_model: a sequence classifier with one output scoring prompt + completion (as
            ``PPOTrainer``'s); replaces ``config.reward_fn``.
        reward_fn, reward_weights: reward functions (and weights) overriding the config's.
        feedback: a hook ``rank(prompt, candidates) -> indices best first`` (or a name, as
            ``config.feedback``) replacing the reward.
        eval_examples: prompts whose greedy completions are scored (scoring judges only).

    Example::

        trainer = OnlineDPOTrainer(model, tokenizer, encode_prompt_examples(records, tokenizer),
                                   OnlineDPOConfig(output_dir="out", max_steps=50),
                                   feedback=lambda prompt, candidates: [1, 0])
        trainer.train()
    """

    name = "online-dpo"

    # PPO's sampling, scoring and greedy evaluation, which read the config's sampling options,
    # the token ids and the judge below.
    generate = PPOTrainer.generate
    score = PPOTrainer.score
    _sequences = PPOTrainer._sequences
    _evaluate_greedy = PPOTrainer._evaluate_greedy
    # DPO's loss on chosen-on-rejected pairs, and its reference log-probs.
    pair_loss = DPOTrainer.compute_loss
    _loss_with_gradients_in_forward = DPOTrainer._loss_with_gradients_in_forward
    reference_logps = DPOTrainer.reference_logps

    def __init__(self, model: nn.Module, tokenizer, train_examples: Sequence[dict],
                 config: OnlineDPOConfig, *, ref_model: nn.Module | None = None,
                 reward_model: nn.Module | None = None,
                 reward_fn: RewardFn | str | Sequence[RewardFn | str] | None = None,
                 reward_weights: Sequence[float] | None = None,
                 feedback: FeedbackFn | str | None = None,
                 eval_examples: Sequence[dict] | None = None) -> None:
        if not isinstance(config, OnlineDPOConfig):
            raise TypeError(f"OnlineDPOTrainer takes an OnlineDPOConfig, got "
                            f"{type(config).__name__}")
        if tokenizer is None or tokenizer.eos_token_id is None:
            raise ValueError("the tokenizer needs an eos token: completions end with it")
        judges = [name for name, value in (("reward_model", reward_model),
                                           ("reward_fn", reward_fn), ("feedback", feedback),
                                           ("config.feedback", config.feedback))
                  if value is not None]
        if len(judges) > 1:
            raise ValueError(f"pass one judge, not {' and '.join(judges)}")
        if reward_weights is not None and reward_fn is None:
            raise ValueError("reward_weights= weighs the functions of reward_fn=, which is not "
                             "given (config.reward_weights weighs config.reward_fn)")
        super().__init__(model, tokenizer, train_examples, config,
                         collator=PromptCollator(pad_token_id=pad_token_id(tokenizer)),
                         ref_model=ref_model, eval_examples=eval_examples)
        self.pad_id, self.eos_id = pad_token_id(tokenizer), tokenizer.eos_token_id
        self.reward_model, self.rewards, self.feedback = None, None, None
        if feedback is not None or config.feedback is not None:
            _check_feedback_alone(config, "feedback=" if feedback is not None else
                                  "config.feedback")
            self.feedback = resolve_feedback(feedback if feedback is not None else
                                             config.feedback, config.output_dir)
        elif reward_model is not None:
            if config.reward_fn != type(config).reward_fn or config.reward_weights is not None:
                raise ValueError("a reward model replaces the reward functions: drop "
                                 "--reward-fn and --reward-weights, or --reward-model")
            if getattr(reward_model.config, "pad_token_id", None) is None:
                raise ValueError("reward_model.config.pad_token_id is not set: set it to the "
                                 "tokenizer's pad token id (the classifier finds each "
                                 "sequence's last token by it)")
            self.reward_model = reward_model.to(self.device).eval().requires_grad_(False)
        elif reward_fn is not None or config.reward_fn is not None:
            self.rewards = RewardFunctions(*((reward_fn, reward_weights) if reward_fn is not None
                                             else (config.reward_fn, config.reward_weights)))
        else:
            raise ValueError("no judge: pass reward_model, reward_fn or feedback, or set "
                             "config.reward_fn or config.feedback")
        suffix = "" if self.dist.rank == 0 else f".rank{self.dist.rank}"
        self.feedback_log = FeedbackLog(self.output_dir / f"feedback_log{suffix}.jsonl")

    # -- what the loop needs --------------------------------------------------------------------

    def count_input_tokens(self, batch: dict) -> int | None:
        return None  # TRL's OnlineDPOTrainer logs no num_tokens

    def before_training(self) -> None:
        self.feedback_log.reset()

    def load_extra_state(self, state: dict) -> None:
        super().load_extra_state(state)
        self.feedback_log.load()

    @torch.no_grad()
    def evaluate(self) -> Metrics:
        """PPO's greedy evaluation (``eval/reward``...), with a scoring judge; none with a hook."""
        return {} if self.feedback is not None else PPOTrainer.evaluate(self)

    # -- one micro-batch: candidates, ranking, pairs, loss --------------------------------------

    def compute_loss(self, batch: dict) -> tuple[torch.Tensor, Metrics]:
        config = self.config
        k = config.num_candidates
        examples = [self.train_examples[i] for i in batch["indices"].tolist()]
        prompt_ids = batch["input_ids"].repeat_interleave(k, dim=0)
        prompt_lengths = batch["prompt_lengths"].repeat_interleave(k, dim=0)
        with torch.no_grad():
            if config.sampler == "mcts":
                completion_ids = self._mcts_candidates(batch, examples)
            else:
                completion_ids, _ = self.generate(
                    prompt_ids, batch["attention_mask"].repeat_interleave(k, dim=0), sample=True)
            has_eos = (completion_ids == self.eos_id).any(dim=1)
            input_ids, attention_mask, labels = self._sequences(prompt_ids, prompt_lengths,
                                                                completion_ids)
            candidate_examples = [example for example in examples for _ in range(k)]
            rankings, scores = self.rank(prompt_ids, prompt_lengths, completion_ids, input_ids,
                                         attention_mask, candidate_examples)
            options = dict(labels=labels, attention_mask=attention_mask,
                           temperature=config.temperature, impl=config.impl)
            policy_logps = hf.sequence_logprobs(self.model, input_ids, **options).sum_logps
            ref_logps = self.reference.sequence_logprobs(input_ids, **options).sum_logps
        chosen, rejected = self._pairs(rankings)
        rows = torch.tensor(chosen + rejected, device=self.device)
        loss, metrics = self.pair_loss({"input_ids": input_ids[rows],
                                        "attention_mask": attention_mask[rows],
                                        "labels": labels[rows]})
        kl = (policy_logps - ref_logps).float()
        metrics |= {
            "objective/kl": float(kl.mean()),
            "objective/entropy": float(-policy_logps.float().mean()),
            "objective/non_score_reward": float(-config.beta * kl.mean()),
            "val/contain_eos_token": float(has_eos.float().mean()),
            "beta": config.beta,
        }
        if scores is not None:
            margin = scores[chosen] - scores[rejected]
            metrics |= {
                "objective/scores": float(scores.nanmean()),
                "objective/scores_margin": float(margin.nanmean()),
                "objective/rlhf_reward": float((scores - config.beta * kl.cpu()).nanmean()),
            }
        return loss, metrics

    def rank(self, prompt_ids: torch.Tensor, prompt_lengths: torch.Tensor,
             completion_ids: torch.Tensor, input_ids: torch.Tensor,
             attention_mask: torch.Tensor, examples: Sequence[dict]
             ) -> tuple[list[list[int]], torch.Tensor | None]:
        """Each prompt's ranking of its ``num_candidates`` consecutive candidates (indices best
        first), and the candidates' scores [N] on the CPU (None with a feedback hook)."""
        k = self.config.num_candidates
        if self.feedback is None:
            scores = self._judge_scores(prompt_ids, prompt_lengths, completion_ids, input_ids,
                                        attention_mask, examples)
            # NaN (no reward function scored it) ranks last; the sort keeps ties in order.
            keys = torch.nan_to_num(scores, nan=-torch.inf).view(-1, k).tolist()
            return [sorted(range(k), key=lambda i, row=row: -row[i]) for row in keys], scores
        prompts, completions = decode_texts(self.tokenizer, prompt_ids, prompt_lengths,
                                            completion_ids, eos_id=self.eos_id)
        rankings = []
        for start in range(0, len(completions), k):
            prompt = examples[start].get("prompt", prompts[start])  # the data's, as PPO's score
            candidates = completions[start:start + k]
            key = feedback_key(self.step, prompt, candidates)
            ranking = self.feedback_log.get(key)
            if ranking is None:
                ranking = ask(self.feedback, copy.deepcopy(prompt), list(candidates),
                              step=self.step)
                self.feedback_log.add(key, self.step, ranking)
            rankings.append(ranking)
        return rankings, None

    def _judge_scores(self, prompt_ids, prompt_lengths, completion_ids, input_ids,
                      attention_mask, examples) -> torch.Tensor:
        """The scoring judge's float32 scores [N] on the CPU, less ``missing_eos_penalty`` for a
        completion without eos."""
        _, _, scores, _ = self.score(prompt_ids, prompt_lengths, completion_ids, input_ids,
                                     attention_mask, examples=examples)
        scores = scores.float().cpu()
        if self.config.missing_eos_penalty is not None:
            has_eos = (completion_ids == self.eos_id).any(dim=1).cpu()
            scores = scores - self.config.missing_eos_penalty * (~has_eos).float()
        return scores

    def _pairs(self, rankings: list[list[int]]) -> tuple[list[int], list[int]]:
        """The chosen and rejected candidate rows of every prompt's pairs."""
        k = self.config.num_candidates
        chosen, rejected = [], []
        for prompt, ranking in enumerate(rankings):
            if self.config.pairs == "best-worst":
                ordered = [(ranking[0], ranking[-1])]
            else:
                ordered = [(ranking[a], ranking[b]) for a in range(k) for b in range(a + 1, k)]
            for better, worse in ordered:
                chosen.append(prompt * k + better)
                rejected.append(prompt * k + worse)
        return chosen, rejected

    # -- the MCTS sampler -----------------------------------------------------------------------

    def _mcts_candidates(self, batch: dict, examples: Sequence[dict]) -> torch.Tensor:
        """[B·k, C] candidate ids (padded after eos) from ``mcts_search``: the policy samples the
        chunks and rollouts after prompt + partial answer, the judge scores the answers."""
        config = self.config
        width = batch["input_ids"].shape[1]
        prompts = [ids[width - length:] for ids, length in zip(
            batch["input_ids"].tolist(), batch["prompt_lengths"].tolist())]

        def sample(trees: list[int], prefixes: list[list[int]], tokens: int) -> list[list[int]]:
            rows = self.collator([{"prompt_ids": prompts[tree] + prefix}
                                  for tree, prefix in zip(trees, prefixes)])
            with self._max_new_tokens(tokens):
                sampled, _ = self.generate(rows["input_ids"].to(self.device),
                                           rows["attention_mask"].to(self.device), sample=True)
            return [ids[:completion_length(ids, self.eos_id)] for ids in sampled.tolist()]

        def score(trees: list[int], answers: list[list[int]]) -> list[float]:
            tree_rows = torch.tensor(trees, device=batch["input_ids"].device)
            prompt_ids = batch["input_ids"][tree_rows]
            prompt_lengths = batch["prompt_lengths"][tree_rows]
            completion_ids = self._padded(answers)
            input_ids, attention_mask, _ = self._sequences(prompt_ids, prompt_lengths,
                                                           completion_ids)
            scores = self._judge_scores(prompt_ids, prompt_lengths, completion_ids, input_ids,
                                        attention_mask, [examples[tree] for tree in trees])
            return torch.nan_to_num(scores, nan=0.0).tolist()  # unscored: 0, as in the sum

        found = mcts_search(len(prompts), sample=sample, score=score,
                            count=config.num_candidates, simulations=config.mcts_simulations,
                            chunk_tokens=config.mcts_chunk_tokens,
                            max_new_tokens=min(config.max_new_tokens, config.max_length - width),
                            eos_id=self.eos_id,
                            exploration=config.mcts_exploration,
                            branching=config.num_candidates)
        return self._padded([answer for answers in found for answer in answers])

    def _padded(self, answers: list[list[int]]) -> torch.Tensor:
        """Token lists as one [N, C] tensor, padded on the right (at least one column)."""
        ids = torch.full((len(answers), max(1, *map(len, answers))), self.pad_id,
                         dtype=torch.long)
        for row, answer in enumerate(answers):
            ids[row, :len(answer)] = torch.tensor(answer, dtype=torch.long)
        return ids.to(self.device)

    @contextlib.contextmanager
    def _max_new_tokens(self, tokens: int):
        """``generate`` with another completion budget (a shallow copy of the config: the run's
        own options stay as they are)."""
        config = self.config
        self.config = copy.copy(config)
        self.config.max_new_tokens = tokens
        try:
            yield
        finally:
            self.config = config
