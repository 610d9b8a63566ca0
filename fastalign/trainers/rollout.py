"""What one PPO / GRPO / RLOO rollout holds, and the token bookkeeping of building it.

Sampling returns completions after left-padded prompts; the updates want each row re-laid as
prompt + completion, right-padded, with ``labels`` marking the completion tokens only. The
functions here do that on token ids alone (no model), so that ``PPOTrainer`` keeps to sampling,
scoring and updating.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fastalign.trainers.metrics import Metrics

__all__ = ["IGNORE_INDEX", "Rollout", "completion_length", "completion_metrics", "decode_texts",
           "pad_after_first_eos", "prompts_with_completions"]

IGNORE_INDEX = -100


@dataclass
class Rollout:
    """One rollout: N = batch_size × num_generations completions and what the updates need.

    Sequences are [N, T] (prompt + completion, right-padded); per-token tensors are [N, T − 1],
    entry t belonging to token t + 1 (``FusedPPOLoss``'s layout); ``advantages`` are [N, T − 1]
    (ppo) or [N] (grpo, rloo). With ``kl_estimator="exact"`` the reference is kept as its final
    hidden states (``ref_hidden``) instead of its log-probs (``ref_logps`` is None).
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor
    mask: torch.Tensor
    old_logps: torch.Tensor
    advantages: torch.Tensor
    scores: torch.Tensor
    raw_scores: torch.Tensor | None = None  # before the missing-eos penalty
    ref_logps: torch.Tensor | None = None
    ref_hidden: torch.Tensor | None = None  # [N, T, H_ref], for kl_estimator="exact"
    old_values: torch.Tensor | None = None
    returns: torch.Tensor | None = None
    prompts: list | None = None  # as the reward functions saw them: texts or message lists
    completions: list | None = None
    reward_scores: torch.Tensor | None = None  # [N, F] per reward function (NaN: None), CPU
    has_eos: torch.Tensor | None = None  # [N] bool: the completion ended with eos
    metrics: Metrics | None = None

    def __len__(self) -> int:
        return self.input_ids.shape[0]


def completion_metrics(lengths: torch.Tensor, has_eos: torch.Tensor) -> Metrics:
    """TRL's ``completions/*`` metrics of completion ``lengths`` [N] (tokens, eos included):
    mean, min and max; ``clipped_ratio``, the share cut off at the token limit (no eos); and the
    mean, min and max over the completions that did end (0 when none did)."""
    lengths, ended = lengths.float(), lengths[has_eos].float()
    if len(ended) == 0:
        ended = torch.zeros(1)
    return {
        "completions/mean_length": float(lengths.mean()),
        "completions/min_length": float(lengths.min()),
        "completions/max_length": float(lengths.max()),
        "completions/clipped_ratio": float((~has_eos).float().mean()),
        "completions/mean_terminated_length": float(ended.mean()),
        "completions/min_terminated_length": float(ended.min()),
        "completions/max_terminated_length": float(ended.max()),
    }


def completion_length(ids: list[int], eos_id: int) -> int:
    """Tokens up to and including the first eos (all of them without one)."""
    return ids.index(eos_id) + 1 if eos_id in ids else len(ids)


def pad_after_first_eos(completion: torch.Tensor, *, eos_id: int, pad_id: int
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Generated ids [N, C] with everything after each row's first eos set to ``pad_id``, and
    ``has_eos`` [N] bool (``generate`` already pads finished rows; a custom stopping rule might
    not)."""
    is_eos = completion == eos_id
    has_eos = is_eos.any(dim=1)
    after = (is_eos.cumsum(dim=1) - is_eos.long()) > 0
    return completion.masked_fill(after, pad_id), has_eos


def prompts_with_completions(prompt_ids: torch.Tensor, prompt_lengths: torch.Tensor,
                             completion_ids: torch.Tensor, *, eos_id: int, pad_id: int
                             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Left-padded prompts [N, P] (``prompt_lengths`` real tokens each) followed by their
    completions [N, C], re-laid right-padded: input_ids, attention_mask and labels [N, T] on the
    CPU, ``labels`` being the completion ids (up to the first eos) and -100 elsewhere."""
    rows, label_rows = [], []
    width = prompt_ids.shape[1]
    for ids, length, completion in zip(prompt_ids.tolist(), prompt_lengths.tolist(),
                                       completion_ids.tolist()):
        completion = completion[:completion_length(completion, eos_id)]
        prompt = ids[width - length:]
        rows.append(prompt + completion)
        label_rows.append([IGNORE_INDEX] * len(prompt) + completion)
    longest = max(len(row) for row in rows)
    input_ids = torch.full((len(rows), longest), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), longest), dtype=torch.long)
    labels = torch.full((len(rows), longest), IGNORE_INDEX, dtype=torch.long)
    for i, (row, label_row) in enumerate(zip(rows, label_rows)):
        input_ids[i, :len(row)] = torch.tensor(row)
        attention_mask[i, :len(row)] = 1
        labels[i, :len(row)] = torch.tensor(label_row)
    return input_ids, attention_mask, labels


def decode_texts(tokenizer, prompt_ids: torch.Tensor, prompt_lengths: torch.Tensor,
                 completion_ids: torch.Tensor, *, eos_id: int) -> tuple[list[str], list[str]]:
    """The prompts' and completions' texts (special tokens skipped), as a reward function reads
    them."""
    width = prompt_ids.shape[1]
    prompts = [tokenizer.decode(ids[width - length:], skip_special_tokens=True)
               for ids, length in zip(prompt_ids.tolist(), prompt_lengths.tolist())]
    completions = [tokenizer.decode(ids[:completion_length(ids, eos_id)],
                                    skip_special_tokens=True)
                   for ids in completion_ids.tolist()]
    return prompts, completions
