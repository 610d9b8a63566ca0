"""Paired preference losses on per-sequence log-probabilities: DPO and variants (ALGORITHMS.md §5).

Inputs are one number per sequence, ``[B]``: the summed (or, where stated, length-averaged)
log-probability of the chosen answer y_w and of the rejected answer y_l under the policy and, for
the reference-based losses, under the frozen reference model. They come from ``linear_logprobs``
plus a sequence reduction (§3); nothing here touches logits.

Every loss returns ``(loss, metrics)``: ``loss`` is a 0-d tensor, the mean over the batch, in
float32 (float64 when any input is float64), differentiable with respect to every floating input
(the reference log-probs normally carry no gradient: compute them under ``torch.no_grad()``);
``metrics`` maps TRL's metric names to detached 0-d float32 tensors.

Numerics: every log σ(x) is ``F.logsigmoid`` and every 1 − σ(x) is σ(−x), so margins of ±1e3 and
beyond give finite losses and gradients.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from fastalign.losses._common import Metrics, compute_dtype, log1mexp, metric
from fastalign.losses.options import (
    DPO_LOSS_TYPES,
    SORTING_LOSS_TYPES,
    CPOOptions,
    DPOOptions,
    ORPOOptions,
    SimPOOptions,
)
from fastalign.ops._checks import (
    check_lengths,
    check_per_sequence,
    check_per_token,
    check_token_mask,
)

__all__ = ["DPO_LOSS_TYPES", "dpo_loss", "simpo_loss", "cpo_loss", "orpo_loss",
           "ld_sequence_logps", "wpo_sequence_weights"]



# ----------------------------------------------------------------------------------------------
# Shared pieces
# ----------------------------------------------------------------------------------------------


def _smoothed_logistic(u: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    """−(1−ε)·log σ(u) − ε·log σ(−u): the logistic loss for a label flipped with probability ε."""
    loss = -F.logsigmoid(u)
    if label_smoothing > 0:
        loss = (1 - label_smoothing) * loss - label_smoothing * F.logsigmoid(-u)
    return loss


def _pair_metrics(
    chosen_rewards: torch.Tensor,
    rejected_rewards: torch.Tensor,
    chosen_wins: torch.Tensor,
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
) -> Metrics:
    """TRL's DPO/CPO/ORPO metrics: batch means of the rewards, their margin and the policy logps."""
    return {
        "rewards/chosen": metric(chosen_rewards.mean()),
        "rewards/rejected": metric(rejected_rewards.mean()),
        "rewards/accuracies": metric(chosen_wins.to(chosen_rewards.dtype).mean()),
        "rewards/margins": metric((chosen_rewards - rejected_rewards).mean()),
        "logps/chosen": metric(policy_chosen_logps.mean()),
        "logps/rejected": metric(policy_rejected_logps.mean()),
    }


def _check_optional_nll(chosen_nll, batch_size: int) -> None:
    if chosen_nll is None:
        return
    if not isinstance(chosen_nll, torch.Tensor):
        raise TypeError(
            f"chosen_nll must be a torch.Tensor or None, got {type(chosen_nll).__name__}"
        )
    if not chosen_nll.dtype.is_floating_point:
        raise TypeError(f"chosen_nll must be a floating-point tensor, got {chosen_nll.dtype}")
    if tuple(chosen_nll.shape) not in ((), (batch_size,)):
        raise ValueError(
            f"chosen_nll must be 0-d or [B] = [{batch_size}], got shape {tuple(chosen_nll.shape)}"
        )


# ----------------------------------------------------------------------------------------------
# From per-token log-probs to what the DPO loss reads: LD-DPO sums and WPO weights
# ----------------------------------------------------------------------------------------------


def ld_sequence_logps(
    chosen_token_logps: torch.Tensor,
    chosen_mask: torch.Tensor,
    rejected_token_logps: torch.Tensor,
    rejected_mask: torch.Tensor,
    ld_alpha: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Length-desensitised sequence log-probs of LD-DPO: Liu et al., 2024, "Length
    Desensitization in Direct Preference Optimization".

    For a pair with n_w chosen and n_l rejected answer tokens and n = min(n_w, n_l), each answer's
    log-prob is the sum over its first n answer tokens plus ``ld_alpha`` times the sum over the
    rest (only the longer answer has any), so that the extra length of the verbose answer weighs
    less: ``ld_alpha = 1`` is the plain sum, 0 cuts both answers to the shared length. "First"
    counts answer tokens only (the mask's ones, in order), as TRL's ``ld_alpha``. Apply the same
    to the policy's and the reference's log-probs (the masks are the same).

    Args:
        chosen_token_logps: [B, T_w] float per-token log-probs of the chosen sequences.
        chosen_mask: [B, T_w] bool (or 0/1), True on the chosen answers' tokens.
        rejected_token_logps: [B, T_l] float, the rejected sequences (T_l may differ from T_w).
        rejected_mask: [B, T_l] bool (or 0/1).
        ld_alpha: the weight of the tokens past the shared length, in [0, 1].

    Returns:
        ``(chosen [B], rejected [B])`` in the dtype of the log-probs, differentiable with respect
        to them.
    """
    check_per_token("chosen_token_logps", chosen_token_logps)
    check_per_token("rejected_token_logps", rejected_token_logps)
    chosen_mask = check_token_mask(chosen_mask, chosen_token_logps, "chosen_token_logps")
    rejected_mask = check_token_mask(rejected_mask, rejected_token_logps, "rejected_token_logps")
    if rejected_token_logps.shape[0] != chosen_token_logps.shape[0]:
        raise ValueError(f"chosen_token_logps and rejected_token_logps must hold the same number "
                         f"of sequences, got {tuple(chosen_token_logps.shape)} and "
                         f"{tuple(rejected_token_logps.shape)}")
    ld_alpha = DPOOptions(ld_alpha=ld_alpha).ld_alpha  # the one check of the value

    shared = torch.minimum(chosen_mask.sum(-1), rejected_mask.sum(-1))[:, None]

    def weighted_sum(logps: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        rank = mask.long().cumsum(-1)  # 1 at the first answer token, 2 at the second, ...
        weights = torch.where(rank <= shared, 1.0, ld_alpha) * mask
        return (logps * weights.to(logps.dtype)).sum(-1)

    return (weighted_sum(chosen_token_logps, chosen_mask),
            weighted_sum(rejected_token_logps, rejected_mask))


@torch.no_grad()
def wpo_sequence_weights(
    token_logps: torch.Tensor,
    token_log_sum_sq_probs: torch.Tensor,
    token_mask: torch.Tensor,
) -> torch.Tensor:
    """WPO's weight of each sequence: Zhou et al., 2024, "WPO: Enhancing RLHF with Weighted
    Preference Optimization".

    w = exp(mean over the answer's tokens of [log p(y_t) − log Σ_v p_v²]): the answer's
    length-normalised probability under the policy, each token's probability taken relative to
    the distribution's own Σ_v p_v² so that flat and peaked distributions weigh alike (TRL's
    ``use_weighting``). A pair's weight is w_chosen·w_rejected; it carries no gradient.

    Args:
        token_logps: [B, T] float per-token log-probs log p(y_t).
        token_log_sum_sq_probs: [B, T] float log Σ_v p_v² at the same positions
            (``fastalign.linear_logit_stats(..., log_sum_sq_probs=True)``).
        token_mask: [B, T] bool (or 0/1), True on answer tokens.

    Returns:
        [B] float32 (float64 for float64 inputs) weights in (0, 1]·e^(…); 1 for a sequence
        without answer tokens. Detached.
    """
    check_per_token("token_logps", token_logps)
    check_per_token("token_log_sum_sq_probs", token_log_sum_sq_probs, like=token_logps,
                    like_name="token_logps")
    dtype = compute_dtype(token_logps, token_log_sum_sq_probs)
    mask = check_token_mask(token_mask, token_logps, "token_logps").to(dtype)
    aligned = (token_logps.to(dtype) - token_log_sum_sq_probs.to(dtype)) * mask
    return torch.exp(aligned.sum(-1) / mask.sum(-1).clamp(min=1))


def _padded_halves(name: str, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if values.dim() != 2:
        raise ValueError(f"{name} needs padded per-token log-probs [2B, T], got shape "
                         f"{tuple(values.shape)} (packed, padding-free batches are not supported)")
    return values.chunk(2)


def pair_sequence_logps(sequences, ld_alpha: float | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen [B], rejected [B]) sequence log-probs of a chosen-on-rejected ``SequenceLogprobs``
    ([2B, ...]): the sums, or with ``ld_alpha`` the LD-DPO sums of :func:`ld_sequence_logps`."""
    if ld_alpha is None:
        return sequences.sum_logps.chunk(2)
    chosen, rejected = _padded_halves("ld_alpha", sequences.token_logps)
    chosen_mask, rejected_mask = sequences.token_mask.chunk(2)
    return ld_sequence_logps(chosen, chosen_mask, rejected, rejected_mask, ld_alpha)


def wpo_pair_weights(sequences) -> torch.Tensor:
    """[B] WPO pair weights w_chosen·w_rejected of a chosen-on-rejected ``SequenceLogprobs``
    ([2B, ...]) computed with ``return_log_sum_sq_probs=True``."""
    _padded_halves("use_weighting", sequences.token_logps)
    if sequences.token_log_sum_sq_probs is None:
        raise ValueError("use_weighting needs log Σ_v p_v² of each position: compute the "
                         "sequence log-probs with return_log_sum_sq_probs=True")
    weights = wpo_sequence_weights(sequences.token_logps, sequences.token_log_sum_sq_probs,
                                   sequences.token_mask)
    chosen, rejected = weights.chunk(2)
    return chosen * rejected


# ----------------------------------------------------------------------------------------------
# DPO family (with a reference model)
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Pairs:
    """A batch of preference pairs as the DPO-family formulas read it, all [B] in one dtype.

    ρ_w, ρ_l are the chosen / rejected log-ratios log π_θ − log π_ref; s_w, s_l the scores
    f'(exp ρ) of the chosen f-divergence (ρ itself for DPO's reverse KL); n_w, n_l the answer
    lengths where given.
    """

    policy_chosen: torch.Tensor
    policy_rejected: torch.Tensor
    ref_chosen: torch.Tensor
    ref_rejected: torch.Tensor
    rho_w: torch.Tensor
    rho_l: torch.Tensor
    s_w: torch.Tensor
    s_l: torch.Tensor
    n_w: torch.Tensor | None
    n_l: torch.Tensor | None


# exp() of a larger float32 or bfloat16 argument overflows; float16's limit is lower.
_EXP_LIMIT = {torch.float16: 11.0}


def _f_divergence_scores(logratios: torch.Tensor, kind: str, alpha: float) -> torch.Tensor:
    """s = f'(t) at t = π_θ/π_ref = exp(ρ), constants dropped (Wang et al., 2023, "Beyond Reverse
    KL: Generalizing Direct Preference Optimization with Diverse Divergence Constraints"):
    reverse KL ρ (DPO), forward KL −e^{−ρ}, Jensen-Shannon log σ(ρ), α-divergence
    e^{(α−1)ρ}/(α−1) (ρ again at α = 1, its limit). TRL 1.16 keeps the constants (its scores are
    0 at ρ = 0) and refuses these divergences with the loss types that score each answer on its
    own; here those types accept them, and ipo and sigmoid_norm, which divide each score by its
    own length, differ from TRL's by the constant times 1/|y_w| − 1/|y_l|."""
    if kind == "reverse_kl":
        return logratios
    if kind == "forward_kl":
        return -torch.exp(-logratios)
    if kind == "js_divergence":
        return F.logsigmoid(logratios)
    if abs(alpha - 1.0) < 1e-6:
        return logratios
    # The exponent is clamped where exp() would overflow (as TRL): an inf would make the loss NaN.
    exponent = ((alpha - 1.0) * logratios).clamp(max=_EXP_LIMIT.get(logratios.dtype, 80.0))
    return torch.exp(exponent) / (alpha - 1.0)


def _dpo_per_example(
    loss_type: str,
    pairs: _Pairs,
    *,
    beta: float,
    label_smoothing: float,
    discopop_tau: float,
    bco_delta: float,
) -> torch.Tensor:
    """The [B] per-example loss of one loss type (see :func:`dpo_loss` for the formulas)."""
    s_w, s_l = pairs.s_w, pairs.s_l
    eps = label_smoothing
    u = beta * (s_w - s_l)  # β·Δ, the DPO logit
    if loss_type == "sigmoid":
        return _smoothed_logistic(u, eps)
    if loss_type == "robust":
        # Unbiased under label noise ε: the smoothing term enters with a + sign and 1/(1 − 2ε).
        return (-(1 - eps) * F.logsigmoid(u) + eps * F.logsigmoid(-u)) / (1 - 2 * eps)
    if loss_type == "hinge":
        return torch.relu(1 - u)
    if loss_type == "ipo":
        if pairs.n_w is not None:  # (policy − ref)/n = policy/n − ref/n: the averaged ratio
            s_w, s_l = s_w / pairs.n_w, s_l / pairs.n_l
        return (s_w - s_l - 1 / (2 * beta)) ** 2
    if loss_type == "sigmoid_norm":  # the DPO logit on length-averaged scores
        return -F.logsigmoid(beta * (s_w / pairs.n_w - s_l / pairs.n_l))
    if loss_type == "exo_pair":
        # Reverse KL between the model's pair distribution σ(±u) and the smoothed labels (1−ε, ε).
        return (torch.sigmoid(u) * (F.logsigmoid(u) - math.log(1 - eps))
                + torch.sigmoid(-u) * (F.logsigmoid(-u) - math.log(eps)))
    if loss_type == "nca_pair":
        return (-F.logsigmoid(beta * s_w) - 0.5 * F.logsigmoid(-beta * s_w)
                - 0.5 * F.logsigmoid(-beta * s_l))
    if loss_type == "bco_pair":
        return -F.logsigmoid(beta * s_w - bco_delta) - F.logsigmoid(-(beta * s_l - bco_delta))
    if loss_type == "sppo_hard":
        return (s_w - 1 / (2 * beta)) ** 2 + (s_l + 1 / (2 * beta)) ** 2
    rho_w, rho_l = pairs.rho_w, pairs.rho_l
    if loss_type == "apo_zero":  # push chosen up, rejected down: (1 − σ(βρ_w)) + σ(βρ_l)
        return torch.sigmoid(-beta * rho_w) + torch.sigmoid(beta * rho_l)
    if loss_type == "apo_down":  # push chosen down, rejected further down: σ(βρ_w) + (1 − σ(u))
        return torch.sigmoid(beta * rho_w) + torch.sigmoid(-u)
    if loss_type == "discopop":
        # (1 − m)·(−log σ(u)) + m·e^{−u}, m = σ(u/τ). m·e^{−u} is formed as exp(log σ(u/τ) − u):
        # for u ≪ 0, e^{−u} alone overflows and 0·inf would give NaN; the product itself is tiny.
        modulation_log = F.logsigmoid(u / discopop_tau)
        return torch.sigmoid(-u / discopop_tau) * -F.logsigmoid(u) + torch.exp(modulation_log - u)
    if loss_type in ("aot", "aot_unpaired"):
        # Distributional dominance by optimal transport in one dimension: the batch's sorted
        # margins are compared quantile by quantile, so the k-th term pairs the k-th smallest
        # values, not the k-th example.
        if loss_type == "aot":  # the policy's chosen−rejected margins over the reference's
            first = pairs.policy_chosen - pairs.policy_rejected
            second = pairs.ref_chosen - pairs.ref_rejected
        else:  # the chosen log-ratios over the rejected ones, each sorted on its own
            first, second = rho_w, rho_l
        # Stable: tied values keep their order, so each gets a well-defined gradient.
        delta = torch.sort(first, stable=True).values - torch.sort(second, stable=True).values
        return _smoothed_logistic(beta * delta, eps)
    if loss_type == "sft":
        return -pairs.policy_chosen / pairs.n_w
    raise AssertionError(f"unhandled loss type {loss_type!r}")  # normalize_names refused it


def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    *,
    beta: float = 0.1,
    loss_type: str | Sequence[str] = "sigmoid",
    label_smoothing: float = 0.0,
    loss_weights: Sequence[float] | None = None,
    chosen_lengths: torch.Tensor | None = None,
    rejected_lengths: torch.Tensor | None = None,
    discopop_tau: float = 0.05,
    bco_delta: float = 0.0,
    f_divergence_type: str = "reverse_kl",
    f_alpha_divergence_coef: float = 0.5,
    chosen_nll: torch.Tensor | None = None,
    pair_weights: torch.Tensor | None = None,
    ld_alpha: float | None = None,
    use_weighting: bool = False,
    options: DPOOptions | None = None,
) -> tuple[torch.Tensor, Metrics]:
    """Direct Preference Optimization and its variants, as in TRL's ``DPOTrainer``.

    DPO: Rafailov et al., 2023, "Direct Preference Optimization: Your Language Model is Secretly a
    Reward Model". With ρ_w = log π_θ(y_w|x) − log π_ref(y_w|x), ρ_l likewise, Δ = ρ_w − ρ_l and
    u = β·Δ, the per-pair losses (ALGORITHMS.md §5) are:

    - sigmoid: −(1−ε)·log σ(u) − ε·log σ(−u). DPO; with ε > 0, cDPO (Mitchell, 2023, "A note on
      DPO with noisy preferences & relationship to IPO").
    - robust: [−(1−ε)·log σ(u) + ε·log σ(−u)] / (1 − 2ε). Chowdhury et al., 2024, "Provably
      Robust DPO: Aligning Language Models with Noisy Feedback".
    - hinge: relu(1 − u). SLiC, Zhao et al., 2023, "SLiC-HF: Sequence Likelihood Calibration with
      Human Feedback"; Liu et al., 2024, "Statistical Rejection Sampling Improves Preference
      Optimization".
    - ipo: (Δ − 1/(2β))² on length-averaged log-probs. Azar et al., 2023, "A General Theoretical
      Paradigm to Understand Learning from Human Preferences".
    - exo_pair: σ(u)·[log σ(u) − log(1−ε)] + σ(−u)·[log σ(−u) − log ε]. Ji et al., 2024, "Towards
      Efficient Exact Optimization of Language Model Alignment".
    - nca_pair: −log σ(βρ_w) − ½·log σ(−βρ_w) − ½·log σ(−βρ_l). Chen et al., 2024, "Noise
      Contrastive Alignment of Language Models with Explicit Rewards".
    - bco_pair: −log σ(βρ_w − δ) − log σ(−(βρ_l − δ)). Jung et al., 2024, "Binary Classifier
      Optimization for Large Language Model Alignment".
    - sppo_hard: (ρ_w − 1/(2β))² + (ρ_l + 1/(2β))². Wu et al., 2024, "Self-Play Preference
      Optimization for Language Model Alignment".
    - apo_zero: (1 − σ(βρ_w)) + σ(βρ_l); apo_down: σ(βρ_w) + (1 − σ(u)). D'Oosterlinck et al.,
      2024, "Anchored Preference Optimization and Contrastive Revisions".
    - discopop: (1 − m)·(−log σ(u)) + m·e^{−u} with m = σ(u/τ). Chris Lu et al., 2024,
      "Discovering Preference Optimization Algorithms with and for Large Language Models".
    - sft: −log π_θ(y_w|x) / |y_w|, the length-averaged NLL of the chosen answer; combined with
      sigmoid it is RPO (Pang et al., 2024, "Iterative Reasoning Preference Optimization").
    - sigmoid_norm: −log σ(β·(ρ_w/|y_w| − ρ_l/|y_l|)), DPO on length-averaged log-ratios (TRL's
      name; needs both lengths).
    - aot: −(1−ε)·log σ(βδ_k) − ε·log σ(−βδ_k), δ_k = sort(logp_w − logp_l)_k −
      sort(ref_w − ref_l)_k: the policy's margins dominate the reference's quantile by quantile;
      aot_unpaired: the same with δ_k = sort(ρ_w)_k − sort(ρ_l)_k. Melnyk et al., 2024,
      "Distributional Preference Alignment of LLMs via Optimal Transport". Both couple the
      examples of a batch through the sort.

    With ``f_divergence_type`` other than reverse_kl (Wang et al., 2023, "Beyond Reverse KL:
    Generalizing Direct Preference Optimization with Diverse Divergence Constraints"), every
    formula above except apo_zero, apo_down's first term, aot and aot_unpaired reads the scores
    s = f'(π_θ/π_ref) in place of ρ: forward_kl −e^{−ρ}, js_divergence log σ(ρ), alpha_divergence
    e^{(α−1)ρ}/(α−1) (constants dropped, unlike TRL 1.16; the exponent clamped at 80, 11 in
    float16).

    Two options of TRL's DPO act before this function, on per-token log-probs: LD-DPO's
    ``ld_alpha`` (pass sequence log-probs from :func:`ld_sequence_logps`) and WPO's
    ``use_weighting`` (pass ``pair_weights`` from :func:`wpo_sequence_weights`);
    :class:`~fastalign.FusedDPOLoss` and the DPO trainer do both from ``options``.

    Args:
        policy_chosen_logps: [B] float, log π_θ(y_w|x) summed over the answer's tokens.
        policy_rejected_logps: [B] float, log π_θ(y_l|x).
        ref_chosen_logps: [B] float, log π_ref(y_w|x).
        ref_rejected_logps: [B] float, log π_ref(y_l|x).
        beta: β > 0, the inverse temperature of the implicit reward β·ρ.
        loss_type: one of ``DPO_LOSS_TYPES``, or a list of distinct ones to combine.
        label_smoothing: ε in [0, 0.5), the assumed probability that a label is flipped. Used by
            sigmoid (cDPO), robust, exo_pair, aot and aot_unpaired; exo_pair needs ε > 0 (1e-3 is
            usual). TRL 1.16's sigmoid ignores ε (plain DPO), here it is cDPO. ε > 0 when none of
            the requested loss types uses it raises a ValueError (TRL 1.16 ignores it silently);
            in a combination, the types that do not use it ignore it.
        loss_weights: one finite weight per entry of ``loss_type`` (default all 1.0): the loss is
            the mean over the batch of Σ_k w_k·loss_k.
        chosen_lengths: optional [B] number of answer tokens in y_w (integer or float, each > 0).
            Required by sft and sigmoid_norm. ipo divides the policy and reference log-probs by
            the lengths when both ``chosen_lengths`` and ``rejected_lengths`` are given; without
            lengths it takes the inputs as already length-averaged (as TRL, which averages them
            before the loss).
            Zero lengths raise rather than being clamped (a sequence with no answer tokens is a
            data bug); the check costs one device sync.
        rejected_lengths: optional [B] number of answer tokens in y_l (used by ipo and
            sigmoid_norm).
        discopop_tau: τ > 0, the temperature of DiscoPOP's modulation σ(u/τ).
        bco_delta: δ, the reward shift of bco_pair. The default 0 is TRL 1.16's bco_pair (which
            has no shift) and ALGORITHMS.md's formula; the BCO paper's δ is a running mean of
            the rewards β·ρ, which a caller may keep and pass.
        f_divergence_type: the divergence to the reference: reverse_kl (DPO), forward_kl,
            js_divergence or alpha_divergence (see above).
        f_alpha_divergence_coef: α of alpha_divergence (any finite number; 1 is reverse KL).
        chosen_nll: optional NLL of the chosen answers for the sft term, 0-d (TRL's token mean
            over every chosen token of the batch) or [B]; then sft needs no ``chosen_lengths``.
        pair_weights: optional [B] weights, each pair's summed loss (every loss type, sft
            included) multiplied by its own, without gradient: WPO's w_chosen·w_rejected from
            :func:`wpo_sequence_weights`. Required with ``options.use_weighting``; refused with
            aot and aot_unpaired, whose k-th term is not the k-th pair's.
        ld_alpha: LD-DPO's α in [0, 1], checked here but applied by whoever sums the per-token
            log-probs (:func:`ld_sequence_logps`): the four inputs are taken as already weighted.
        use_weighting: WPO; then ``pair_weights`` must be given.
        options: a prepared :class:`~fastalign.losses.DPOOptions` instead of ``beta``,
            ``loss_type``, ``label_smoothing``, ``loss_weights``, ``discopop_tau`` and
            ``bco_delta``, ``f_divergence_type`` and ``f_alpha_divergence_coef`` (which must
            then be left at their defaults).

    Returns:
        ``(loss, metrics)``: loss is 0-d float32 (float64 for float64 inputs). Metrics, detached
        0-d float32: "rewards/chosen" = mean β·ρ_w, "rewards/rejected" = mean β·ρ_l,
        "rewards/accuracies" = mean 1[ρ_w > ρ_l], "rewards/margins" = mean β·(ρ_w − ρ_l),
        "logps/chosen" and "logps/rejected" = batch means of the policy log-probs, all from the
        inputs as given (never length-averaged); with several loss types, also "loss/<type>",
        the batch mean of each unweighted term (without ``pair_weights``). The rewards stay β·ρ
        whatever the loss types and weights, as in TRL 1.16.
    """
    batch_size = check_per_sequence(
        policy_chosen_logps=policy_chosen_logps,
        policy_rejected_logps=policy_rejected_logps,
        ref_chosen_logps=ref_chosen_logps,
        ref_rejected_logps=ref_rejected_logps,
        pair_weights=pair_weights,
    )
    options = DPOOptions.from_arguments(
        options, beta=beta, loss_type=loss_type, label_smoothing=label_smoothing,
        loss_weights=loss_weights, discopop_tau=discopop_tau, bco_delta=bco_delta,
        f_divergence_type=f_divergence_type, f_alpha_divergence_coef=f_alpha_divergence_coef,
        ld_alpha=ld_alpha, use_weighting=use_weighting)
    loss_types, beta = options.loss_type, options.beta
    _check_optional_nll(chosen_nll, batch_size)
    if "sft" in loss_types and chosen_lengths is None and chosen_nll is None:
        raise ValueError(
            "loss_type 'sft' needs chosen_lengths ([B] answer token counts) to average the NLL, "
            "or chosen_nll"
        )
    if "sigmoid_norm" in loss_types and (chosen_lengths is None or rejected_lengths is None):
        raise ValueError(
            "loss_type 'sigmoid_norm' needs chosen_lengths and rejected_lengths ([B] answer token "
            "counts) to length-average the log-ratios"
        )
    if (chosen_lengths is None) != (rejected_lengths is None) and "ipo" in loss_types:
        raise ValueError(
            "loss_type 'ipo' needs both chosen_lengths and rejected_lengths (to length-average "
            "the log-probs) or neither (inputs already averaged)"
        )
    if options.use_weighting and pair_weights is None:
        raise ValueError("use_weighting (WPO) needs pair_weights: [B] per-pair weights, e.g. "
                         "w_chosen * w_rejected from wpo_sequence_weights")
    sorting = [name for name in loss_types if name in SORTING_LOSS_TYPES]
    if pair_weights is not None and sorting:
        raise ValueError(f"pair_weights cannot weight loss_type {sorting[0]!r}: it sorts the "
                         f"batch, so a pair's weight would multiply another pair's term")
    if chosen_lengths is not None:
        check_lengths("chosen_lengths", chosen_lengths, batch_size)
    if rejected_lengths is not None:
        check_lengths("rejected_lengths", rejected_lengths, batch_size)

    dtype = compute_dtype(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps,
                          ref_rejected_logps)
    policy_chosen = policy_chosen_logps.to(dtype)
    policy_rejected = policy_rejected_logps.to(dtype)
    chosen_logratios = policy_chosen - ref_chosen_logps.to(dtype)
    rejected_logratios = policy_rejected - ref_rejected_logps.to(dtype)
    n_w = None if chosen_lengths is None else chosen_lengths.to(dtype)
    n_l = None if rejected_lengths is None else rejected_lengths.to(dtype)
    f_kind, f_alpha = options.f_divergence_type, options.f_alpha_divergence_coef
    pairs = _Pairs(policy_chosen, policy_rejected, ref_chosen_logps.to(dtype),
                   ref_rejected_logps.to(dtype), chosen_logratios, rejected_logratios,
                   _f_divergence_scores(chosen_logratios, f_kind, f_alpha),
                   _f_divergence_scores(rejected_logratios, f_kind, f_alpha), n_w, n_l)

    total = None
    terms = {}
    for name, weight in zip(loss_types, options.weights):
        if name == "sft" and chosen_nll is not None:
            terms[name] = chosen_nll.to(dtype).expand(batch_size)
            total = weight * terms[name] if total is None else total + weight * terms[name]
            continue
        term = _dpo_per_example(
            name, pairs, beta=beta, label_smoothing=options.label_smoothing,
            discopop_tau=options.discopop_tau, bco_delta=options.bco_delta,
        )
        terms[name] = term
        total = weight * term if total is None else total + weight * term
    if pair_weights is not None:
        total = total * pair_weights.detach().to(dtype)
    loss = total.mean()

    metrics = _pair_metrics(
        beta * chosen_logratios, beta * rejected_logratios, chosen_logratios > rejected_logratios,
        policy_chosen, policy_rejected,
    )
    if len(loss_types) > 1:
        metrics.update({f"loss/{name}": metric(term.mean()) for name, term in terms.items()})
    return loss, metrics


# ----------------------------------------------------------------------------------------------
# Reference-free losses
# ----------------------------------------------------------------------------------------------


def _reference_free_inputs(policy_chosen_logps, policy_rejected_logps, chosen_nll):
    batch_size = check_per_sequence(
        policy_chosen_logps=policy_chosen_logps, policy_rejected_logps=policy_rejected_logps
    )
    _check_optional_nll(chosen_nll, batch_size)
    dtype = compute_dtype(policy_chosen_logps, policy_rejected_logps, chosen_nll)
    chosen, rejected = policy_chosen_logps.to(dtype), policy_rejected_logps.to(dtype)
    nll = -chosen if chosen_nll is None else chosen_nll.to(dtype)
    return chosen, rejected, nll


def _alphapo_rewards(logps: torch.Tensor, alphapo_alpha: float) -> torch.Tensor:
    """AlphaPO's reward r = (1 − p^(−α))/α of an answer with log-prob log p; log p itself at α = 0
    (its limit). Gupta et al., 2025, "AlphaPO: Reward Shape Matters for LLM Alignment".

    Formed as −expm1(−α·log p)/α, accurate for small α·log p. r grows with log p for every α, so
    the order of two answers, and hence the accuracy metric, is that of their log-probs. For
    α > 0, p^(−α) overflows once α·|log p| passes about 88 (float32): AlphaPO is meant for
    length-averaged log-probs, as SimPO's."""
    if alphapo_alpha == 0:
        return logps
    return -torch.expm1(-alphapo_alpha * logps) / alphapo_alpha


def _reference_free_metrics(chosen, rejected, reward_w, reward_l, beta, nll) -> Metrics:
    # The accuracy compares the unscaled rewards: β·a and β·b may round to one number when a > b.
    metrics = _pair_metrics(beta * reward_w, beta * reward_l, reward_w > reward_l, chosen,
                            rejected)
    metrics["nll_loss"] = metric(nll.mean())
    return metrics


def simpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    *,
    beta: float = 2.0,
    gamma: float = 0.5,
    label_smoothing: float = 0.0,
    alpha: float = 0.0,
    chosen_nll: torch.Tensor | None = None,
    alphapo_alpha: float = 0.0,
    options: SimPOOptions | None = None,
) -> tuple[torch.Tensor, Metrics]:
    """SimPO: Meng, Xia & Chen, 2024, "SimPO: Simple Preference Optimization with a Reference-Free
    Reward".

    With u = β·(mean_logp_w − mean_logp_l) − γ, the per-pair loss is the smoothed logistic loss
    −(1−ε)·log σ(u) − ε·log σ(−u), as TRL's ``CPOTrainer`` with ``loss_type="simpo"`` (which
    writes u = β·(Δ − γ/β)). ``alpha > 0`` adds α·NLL(y_w), TRL's CPO-SimPO. ``alphapo_alpha``
    ≠ 0 is AlphaPO (Gupta et al., 2025, "AlphaPO: Reward Shape Matters for LLM Alignment"; TRL's
    ``alpha``): each mean log-prob m is replaced by the reward (1 − e^{−α·m})/α before the margin.

    Args:
        policy_chosen_logps: [B] float, log π_θ(y_w|x) averaged over the answer's tokens.
        policy_rejected_logps: [B] float, the same for y_l.
        beta: β > 0, the reward scale.
        gamma: γ, the target reward margin (finite; 0.5 to 1.6 in the paper's sweeps).
        label_smoothing: ε in [0, 0.5).
        alpha: α >= 0, the weight of the NLL term (0: pure SimPO).
        alphapo_alpha: AlphaPO's reward shape α (finite; 0: SimPO's reward m itself).
        chosen_nll: optional NLL of y_w, [B] per-sequence or 0-d; default −policy_chosen_logps,
            the per-sequence mean NLL since the inputs are averages.
        options: a prepared :class:`~fastalign.losses.SimPOOptions` instead of the options above.

    Returns:
        ``(loss, metrics)``: loss 0-d; metrics "rewards/chosen" = mean β·mean_logp_w (β·r with
        AlphaPO), "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
        "logps/rejected" (as TRL's CPOTrainer) and "nll_loss" (mean NLL, logged even if α = 0).
    """
    chosen, rejected, nll = _reference_free_inputs(
        policy_chosen_logps, policy_rejected_logps, chosen_nll
    )
    options = SimPOOptions.from_arguments(options, beta=beta, gamma=gamma,
                                          label_smoothing=label_smoothing, alpha=alpha,
                                          alphapo_alpha=alphapo_alpha)
    beta, gamma = options.beta, options.gamma
    label_smoothing, alpha = options.label_smoothing, options.alpha
    reward_w = _alphapo_rewards(chosen, options.alphapo_alpha)
    reward_l = _alphapo_rewards(rejected, options.alphapo_alpha)

    losses = _smoothed_logistic(beta * (reward_w - reward_l) - gamma, label_smoothing)
    loss = losses.mean()
    if alpha > 0:
        loss = loss + alpha * nll.mean()
    return loss, _reference_free_metrics(chosen, rejected, reward_w, reward_l, beta, nll)


def cpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    *,
    beta: float = 0.1,
    chosen_nll: torch.Tensor | None = None,
    label_smoothing: float = 0.0,
    alpha: float = 1.0,
    loss_type: str = "sigmoid",
    alphapo_alpha: float = 0.0,
    options: CPOOptions | None = None,
) -> tuple[torch.Tensor, Metrics]:
    """CPO: Xu et al., 2024, "Contrastive Preference Optimization: Pushing the Boundaries of LLM
    Performance in Machine Translation".

    loss = mean_B[−(1−ε)·log σ(u) − ε·log σ(−u)] + α·mean_B NLL(y_w), u = β·(logp_w − logp_l):
    DPO with the reference dropped, plus a behaviour-cloning term on the chosen answer. This is
    TRL's ``CPOTrainer`` with ``loss_type="sigmoid"``; its other two loss types replace the first
    term with hinge, mean_B relu(1 − u) (SLiC, Zhao et al., 2023, "SLiC-HF: Sequence Likelihood
    Calibration with Human Feedback"), or ipo, mean_B (Δ − 1/(2β))² with Δ = logp_w − logp_l on
    length-averaged log-probs (Azar et al., 2023, "A General Theoretical Paradigm to Understand
    Learning from Human Preferences"). ``alphapo_alpha`` ≠ 0 replaces each log-prob ℓ by the
    AlphaPO reward (1 − e^{−α·ℓ})/α (Gupta et al., 2025, "AlphaPO: Reward Shape Matters for LLM
    Alignment"; TRL's ``alpha``), in every loss type.

    Args:
        policy_chosen_logps: [B] float, log π_θ(y_w|x) summed over the answer's tokens
            (averaged for ipo, as TRL; ``CPOOptions.length_averaged`` says which).
        policy_rejected_logps: [B] float, log π_θ(y_l|x).
        beta: β > 0.
        chosen_nll: the NLL term, [B] per-sequence (e.g. the per-token mean NLL of each y_w) or
            0-d (e.g. TRL's token mean over the whole batch). Default: −policy_chosen_logps,
            which with summed inputs is the *summed* NLL per sequence; pass the per-token mean
            explicitly to match TRL's scale.
        label_smoothing: ε in [0, 0.5).
        alpha: α >= 0, the weight of the NLL term (TRL's ``cpo_alpha``).
        loss_type: sigmoid (CPO), hinge or ipo (see above); label smoothing needs sigmoid.
        alphapo_alpha: AlphaPO's reward shape α (finite; 0: the log-probs themselves).
        options: a prepared :class:`~fastalign.losses.CPOOptions` instead of the options above.

    Returns:
        ``(loss, metrics)``: loss 0-d; metrics "rewards/chosen" = mean β·logp_w (β·r with
        AlphaPO), "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
        "logps/rejected" and "nll_loss" (as TRL's CPOTrainer).
    """
    chosen, rejected, nll = _reference_free_inputs(
        policy_chosen_logps, policy_rejected_logps, chosen_nll
    )
    options = CPOOptions.from_arguments(options, beta=beta, label_smoothing=label_smoothing,
                                        alpha=alpha, loss_type=loss_type,
                                        alphapo_alpha=alphapo_alpha)
    beta, label_smoothing, alpha = options.beta, options.label_smoothing, options.alpha
    reward_w = _alphapo_rewards(chosen, options.alphapo_alpha)
    reward_l = _alphapo_rewards(rejected, options.alphapo_alpha)
    margin = reward_w - reward_l

    if options.loss_type == "hinge":
        losses = torch.relu(1 - beta * margin)
    elif options.loss_type == "ipo":
        losses = (margin - 1 / (2 * beta)) ** 2
    else:
        losses = _smoothed_logistic(beta * margin, label_smoothing)
    loss = losses.mean()
    if alpha > 0:
        loss = loss + alpha * nll.mean()
    return loss, _reference_free_metrics(chosen, rejected, reward_w, reward_l, beta, nll)


def orpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    *,
    beta: float = 0.1,
    chosen_nll: torch.Tensor | None = None,
    options: ORPOOptions | None = None,
) -> tuple[torch.Tensor, Metrics]:
    """ORPO: Hong, Lee & Thorne, 2024, "ORPO: Monolithic Preference Optimization without Reference
    Model".

    With p = exp(mean_logp), log odds(y) = log(p / (1 − p)) = mean_logp − log(1 − exp(mean_logp)),
    computed with a stable log1mexp, and L = log odds(y_w) − log odds(y_l):
    loss = mean_B NLL(y_w) − β·mean_B log σ(L)  (β is the paper's λ), as TRL's ``ORPOTrainer``.

    Args:
        policy_chosen_logps: [B] float, log π_θ(y_w|x) averaged over the answer's tokens (≤ 0).
            A value of exactly 0 (p = 1, infinite odds) is clamped to −tiny, so the odds term is
            finite there and passes no gradient to that input.
        policy_rejected_logps: [B] float, the same for y_l.
        beta: β > 0 (λ in the paper), the weight of the odds-ratio term.
        chosen_nll: optional NLL of y_w, [B] or 0-d (TRL 1.16 uses the token mean over the
            batch's chosen prompts and answers; the fused module and trainer pass the mean over
            the answers only);
            default −policy_chosen_logps, the per-sequence mean NLL.
        options: a prepared :class:`~fastalign.losses.ORPOOptions` instead of the options above.

    Returns:
        ``(loss, metrics)``: loss 0-d; metrics "rewards/chosen" = mean β·mean_logp_w,
        "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
        "logps/rejected", "nll_loss", "log_odds_ratio" = mean log σ(L) and
        "log_odds_chosen" = mean L (TRL's names).
    """
    chosen, rejected, nll = _reference_free_inputs(
        policy_chosen_logps, policy_rejected_logps, chosen_nll
    )
    beta = ORPOOptions.from_arguments(options, beta=beta).beta

    below_zero = -torch.finfo(chosen.dtype).tiny
    chosen_c, rejected_c = chosen.clamp(max=below_zero), rejected.clamp(max=below_zero)
    log_odds = (chosen_c - log1mexp(chosen_c)) - (rejected_c - log1mexp(rejected_c))
    log_odds_ratio = F.logsigmoid(log_odds)
    loss = nll.mean() - beta * log_odds_ratio.mean()

    metrics = _pair_metrics(beta * chosen, beta * rejected, chosen > rejected, chosen, rejected)
    metrics["nll_loss"] = metric(nll.mean())
    metrics["log_odds_ratio"] = metric(log_odds_ratio.mean())
    metrics["log_odds_chosen"] = metric(log_odds.mean())
    return loss, metrics
