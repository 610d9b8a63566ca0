"""Fused loss modules: from final hidden states and the LM head straight to an alignment loss.

``FusedDPOLoss`` (every DPO-family loss type), ``FusedSimPOLoss``, ``FusedCPOLoss``,
``FusedORPOLoss`` (reference-free), ``FusedKTOLoss`` and ``FusedPPOLoss`` (PPO and GRPO).

Each module computes per-token log-probs from the hidden states and the head without
materialising the [tokens × vocab] logits, reduces per sequence with the causal shift and
masking done once (``fastalign.ops.sequence``), and hands the result to the plain-PyTorch loss of
``fastalign.losses``. When gradients are wanted and the loss separates over groups of whole
sequences (DPO's pairs, KTO's examples, PPO's completions: every loss here but the sorting
``aot`` types and GRPO's batch entropy quantile), the head's gradients are formed in forward,
chunk of whole groups by chunk (``fastalign.ops.sequence_loss``: 6·N·H·V FLOPs, prompts and
padding skipped); otherwise ``fastalign.linear_logprobs`` streams the head and its backward
recomputes the logits (8·N·H·V). ``gradients_in_forward=False`` forces the latter.
Their values and gradients equal those of the materialised-logits computation (tests say so).

Layout conventions, shared by all three modules:

* ``hidden`` is ``[B, T, H]``: the final hidden states of a causal LM *before* its head.
* ``labels`` is ``[B, T]``, aligned with ``input_ids`` as in Hugging Face: the token id where a
  token is scored (the response) and ``ignore_index`` (-100) on prompt and padding. The modules
  shift internally: the hidden state at position t is scored on ``labels[:, t + 1]``.
* Per-token inputs (old log-probs, advantages, values, ...) are ``[B, T − 1]``: entry t belongs to
  token t + 1, the layout of ``SequenceLogprobs.token_logps``.
"""

from __future__ import annotations

import torch
from torch import nn

from fastalign.losses._common import compute_dtype
from fastalign.losses.dpo import (
    cpo_loss,
    dpo_loss,
    orpo_loss,
    pair_sequence_logps,
    simpo_loss,
    wpo_pair_weights,
)
from fastalign.losses.grpo import aggregate_policy_loss, grpo_policy_terms
from fastalign.losses.kl import kl_penalty
from fastalign.losses.kto import kto_loss
from fastalign.losses.masked import masked_mean, zero_outside
from fastalign.losses.options import (
    SORTING_LOSS_TYPES,
    CPOOptions,
    DPOOptions,
    KTOOptions,
    ORPOOptions,
    PPOOptions,
    SimPOOptions,
)
from fastalign.losses.ppo import check_clip, ppo_policy_loss, ppo_value_loss
from fastalign.ops._backends import IMPLEMENTATIONS, resolve_impl
from fastalign.ops._checks import check_bool, check_head, check_per_token, check_positive
from fastalign.ops.linear_kl import linear_kl
from fastalign.ops.sequence import (
    SequenceLogprobs,
    next_token_targets,
    sequence_logprobs_from_labels,
)
from fastalign.ops.sequence_loss import (
    pair_groups,
    sequence_logprobs_in_chunks,
    sequence_loss_with_head_grads,
    single_groups,
)

Metrics = dict[str, torch.Tensor]


class _FusedSequenceLoss(nn.Module):
    """The fused op's options, and (hidden, head, labels) → sequence log-probs."""

    def __init__(self, *, temperature: float = 1.0, softcap: float | None = None,
                 ignore_index: int = -100, impl: str = "auto",
                 gradients_in_forward: bool = True) -> None:
        super().__init__()
        # Bad options fail here, at construction, not at the first batch of a training run.
        check_bool("gradients_in_forward", gradients_in_forward)
        check_positive("temperature", temperature)
        check_positive("softcap", softcap, optional=True)
        if not isinstance(ignore_index, int) or isinstance(ignore_index, bool):
            raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
        if impl not in IMPLEMENTATIONS:
            raise ValueError(f"impl must be one of {IMPLEMENTATIONS}, got {impl!r}")
        self.temperature = temperature
        self.softcap = softcap
        self.ignore_index = ignore_index
        self.impl = impl
        self.gradients_in_forward = gradients_in_forward

    def sequence_loss(self, hidden, weight, labels, bias, loss_of, *, groups_of,
                      in_forward: bool, return_entropy: bool = False,
                      return_log_sum_sq_probs: bool = False):
        """``(loss, metrics, sequences)``: ``loss_of(sequences)`` of the policy's
        ``sequences = self.sequence_logprobs(...)``, with the head's gradients formed in forward
        when ``in_forward`` (``forms_gradients_in_forward``'s answer; ``sequences`` are then
        detached); ``groups_of(S, device)`` gives the groups of sequences the loss separates
        over."""
        if in_forward:
            return sequence_loss_with_head_grads(
                hidden, weight, labels, loss_of, groups=groups_of(hidden.shape[0], hidden.device),
                bias=bias, temperature=self.temperature, softcap=self.softcap,
                ignore_index=self.ignore_index, return_entropy=return_entropy,
                return_log_sum_sq_probs=return_log_sum_sq_probs, impl=self.impl)
        sequences = self.sequence_logprobs(hidden, weight, labels, bias,
                                           return_entropy=return_entropy,
                                           return_log_sum_sq_probs=return_log_sum_sq_probs)
        return (*loss_of(sequences), sequences)

    def forms_gradients_in_forward(self, hidden, weight, bias, *, separable: bool = True,
                                   constants=()) -> bool:
        """Whether the head's gradients are formed in forward: wanted, exact (the loss
        separates over groups of sequences: ``separable``) and possible (an implementation with
        row passes; ``constants``, the other tensors the loss reads, need no gradient)."""
        if not (self.gradients_in_forward and separable and torch.is_grad_enabled()):
            return False
        head = (hidden, weight, bias)
        if not all(x is None or isinstance(x, torch.Tensor) for x in head) \
                or not isinstance(hidden, torch.Tensor):
            return False  # the checks of the streamed path name what is wrong
        if not any(x is not None and x.requires_grad for x in head):
            return False  # evaluation: the forward pass alone is a third of the work
        if any(isinstance(x, torch.Tensor) and x.requires_grad for x in constants):
            return False  # their gradients come from autograd through the streamed path
        return resolve_impl(self.impl, hidden.device, hidden.dtype) != "reference"

    def sequence_logprobs(self, hidden, weight, labels, bias=None, *, return_entropy=False,
                          return_log_sum_sq_probs=False) -> SequenceLogprobs:
        return sequence_logprobs_from_labels(
            hidden, weight, labels, bias=bias, temperature=self.temperature,
            softcap=self.softcap, ignore_index=self.ignore_index, return_entropy=return_entropy,
            return_log_sum_sq_probs=return_log_sum_sq_probs, impl=self.impl,
        )

    def reference_logprobs(self, ref_hidden, ref_weight, labels, ref_bias=None, *,
                           weight=None, hidden_name: str = "ref_hidden",
                           groups_of=None) -> SequenceLogprobs:
        """The reference model's log-probs: a frozen model, so no graph is recorded.

        The reference head is checked under its own names (``ref_hidden``, ``ref_weight``,
        ``ref_bias``) and must cover the vocabulary of the policy's ``weight``: a reference head
        of another vocabulary scores other tokens, silently. With ``groups_of`` (when the
        policy's gradients are formed in forward), it is scored by the same chunked arithmetic
        as the policy (``sequence_logprobs_in_chunks``)."""
        check_head("ref_", ref_hidden, ref_weight, ref_bias)
        if isinstance(weight, torch.Tensor) and weight.dim() == 2 \
                and ref_weight.shape[0] != weight.shape[0]:
            raise ValueError(f"weight and ref_weight must cover the same vocabulary, got V = "
                             f"{weight.shape[0]} and {ref_weight.shape[0]}")
        if isinstance(labels, torch.Tensor) and tuple(ref_hidden.shape[:-1]) != tuple(labels.shape):
            raise ValueError(f"{hidden_name}'s leading shape {tuple(ref_hidden.shape[:-1])} "
                             f"must equal the labels' shape {tuple(labels.shape)}")
        ref_bias = None if ref_bias is None else ref_bias.detach()
        with torch.no_grad():
            if groups_of is not None:
                return sequence_logprobs_in_chunks(
                    ref_hidden.detach(), ref_weight.detach(), labels,
                    groups=groups_of(ref_hidden.shape[0], ref_hidden.device), bias=ref_bias,
                    temperature=self.temperature, softcap=self.softcap,
                    ignore_index=self.ignore_index, impl=self.impl)
            return self.sequence_logprobs(ref_hidden.detach(), ref_weight.detach(), labels,
                                          ref_bias)


def _check_reference(ref_hidden, ref_weight, precomputed: dict, module: str) -> bool:
    """True to compute the reference log-probs from a head, False to use precomputed ones."""
    head_given = ref_hidden is not None or ref_weight is not None
    given = [name for name, value in precomputed.items() if value is not None]
    if head_given and given:
        raise ValueError(f"{module}: pass either ref_hidden and ref_weight or "
                         f"{' and '.join(precomputed)}, not both")
    if head_given:
        if ref_hidden is None or ref_weight is None:
            raise ValueError(f"{module}: ref_hidden and ref_weight must be given together")
        return True
    if len(given) != len(precomputed):
        raise ValueError(
            f"{module} needs reference log-probs: pass ref_hidden and ref_weight (a reference head "
            f"computed in the same call) or {' and '.join(precomputed)} (precomputed)"
        )
    return False


def _split_pairs(name: str, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if values.shape[0] == 0:
        raise ValueError(f"{name} is an empty batch: it must stack at least one chosen and one "
                         f"rejected sequence ([2B, ...] with B >= 1)")
    if values.shape[0] % 2:
        raise ValueError(
            f"{name} must stack the chosen answers then the rejected ones along dim 0 ([2B, ...]), "
            f"got an odd batch of {values.shape[0]}"
        )
    return values.chunk(2)


class FusedDPOLoss(_FusedSequenceLoss):
    """DPO-family loss (any ``loss_type`` of :func:`fastalign.losses.dpo_loss`) from hidden states.

    ``hidden`` and ``labels`` stack the B chosen sequences first and the B rejected ones after, as
    TRL's concatenated forward does: ``[2B, T, H]`` and ``[2B, T]``. The reference log-probs come
    either from a reference head in the same call (``ref_hidden`` [2B, T, H_ref], ``ref_weight``)
    or precomputed (``ref_chosen_logps``, ``ref_rejected_logps``, [B] summed log-probs).

    Example::

        loss_fn = FusedDPOLoss(beta=0.1, loss_type="sigmoid")
        loss, metrics = loss_fn(policy_hidden, model.lm_head.weight, labels,
                                ref_hidden=ref_hidden, ref_weight=ref_model.lm_head.weight)
    """

    def __init__(self, *, beta: float = 0.1, loss_type="sigmoid", label_smoothing: float = 0.0,
                 loss_weights=None, temperature: float = 1.0, softcap: float | None = None,
                 ignore_index: int = -100, impl: str = "auto", gradients_in_forward: bool = True,
                 options: DPOOptions | None = None, **loss_options) -> None:
        super().__init__(temperature=temperature, softcap=softcap, ignore_index=ignore_index,
                         impl=impl, gradients_in_forward=gradients_in_forward)
        # Bad options fail here, at construction, not at the first batch of a training run.
        self.options = DPOOptions.from_arguments(
            options, beta=beta, loss_type=loss_type, label_smoothing=label_smoothing,
            loss_weights=loss_weights, **loss_options)

    def forward(self, hidden, weight, labels, *, bias=None, ref_hidden=None, ref_weight=None,
                ref_bias=None, ref_chosen_logps=None,
                ref_rejected_logps=None) -> tuple[torch.Tensor, Metrics]:
        from_head = _check_reference(
            ref_hidden, ref_weight,
            {"ref_chosen_logps": ref_chosen_logps, "ref_rejected_logps": ref_rejected_logps},
            "FusedDPOLoss",
        )
        options = self.options
        if isinstance(hidden, torch.Tensor) and hidden.dim() > 0:
            _split_pairs("hidden", hidden)
        # Not separable over pairs: the sorting loss types compare quantiles across the batch;
        # WPO weighs each pair's sft term, the NLL of every chosen answer of the batch, by the
        # pair's weight, so a pair's gradient would read the other pairs' weights.
        coupled = any(name in SORTING_LOSS_TYPES for name in options.loss_type) or (
            options.use_weighting and "sft" in options.loss_type)
        in_forward = self.forms_gradients_in_forward(
            hidden, weight, bias, separable=not coupled,
            constants=(ref_chosen_logps, ref_rejected_logps))
        if from_head:
            reference = self.reference_logprobs(ref_hidden, ref_weight, labels, ref_bias,
                                                weight=weight,
                                                groups_of=pair_groups if in_forward else None)
            ref_chosen_logps, ref_rejected_logps = pair_sequence_logps(reference,
                                                                       options.ld_alpha)

        def loss_of(policy: SequenceLogprobs):
            _split_pairs("hidden", policy.sum_logps)
            chosen_logps, rejected_logps = pair_sequence_logps(policy, options.ld_alpha)
            # A sequence without response tokens has log-prob 0 and averages to 0, not 0/0.
            chosen_lengths, rejected_lengths = policy.lengths.clamp(min=1).chunk(2)
            pair_weights = wpo_pair_weights(policy) if options.use_weighting else None
            return dpo_loss(
                chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps,
                chosen_lengths=chosen_lengths, rejected_lengths=rejected_lengths,
                chosen_nll=_chosen_token_nll(policy), pair_weights=pair_weights, options=options,
            )

        loss, metrics, _ = self.sequence_loss(hidden, weight, labels, bias, loss_of,
                                              groups_of=pair_groups, in_forward=in_forward,
                                              return_log_sum_sq_probs=options.use_weighting)
        return loss, metrics


def _chosen_token_nll(policy: SequenceLogprobs) -> torch.Tensor:
    """The NLL of the chosen answers as TRL's SFT terms take it: the mean over every chosen
    response token of the batch (the first half of a chosen-on-rejected stack), 0-d."""
    chosen_sums, _ = policy.sum_logps.chunk(2)
    return -chosen_sums.sum() / policy.lengths.chunk(2)[0].sum().clamp(min=1)


class _FusedReferenceFreeLoss(_FusedSequenceLoss):
    """SimPO / CPO / ORPO from hidden states: no reference model, chosen stacked on rejected.

    As TRL's CPO trainer does, the NLL term on the chosen answers is the mean over all chosen
    response tokens of the batch (a 0-d tensor); TRL's ORPO averages it over the prompt tokens
    too. SimPO, ORPO and CPO's ipo compare length-averaged log-probs, CPO's sigmoid and hinge
    summed ones (the options' ``length_averaged``).
    """

    loss_fn = None  # set by subclasses, with the options class that loss takes
    options_class = None

    def __init__(self, *, temperature: float = 1.0, softcap: float | None = None,
                 ignore_index: int = -100, impl: str = "auto", gradients_in_forward: bool = True,
                 options=None, **loss_options) -> None:
        super().__init__(temperature=temperature, softcap=softcap, ignore_index=ignore_index,
                         impl=impl, gradients_in_forward=gradients_in_forward)
        self.options = type(self).options_class.from_arguments(options, **loss_options)

    def forward(self, hidden, weight, labels, *, bias=None) -> tuple[torch.Tensor, Metrics]:
        if isinstance(hidden, torch.Tensor) and hidden.dim() > 0:
            _split_pairs("hidden", hidden)

        def loss_of(policy: SequenceLogprobs):
            per_sequence = policy.mean_logps if self.options.length_averaged else policy.sum_logps
            chosen_logps, rejected_logps = _split_pairs("hidden", per_sequence)
            return type(self).loss_fn(chosen_logps, rejected_logps,
                                      chosen_nll=_chosen_token_nll(policy), options=self.options)

        loss, metrics, _ = self.sequence_loss(
            hidden, weight, labels, bias, loss_of, groups_of=pair_groups,
            in_forward=self.forms_gradients_in_forward(hidden, weight, bias))
        return loss, metrics


class FusedSimPOLoss(_FusedReferenceFreeLoss):
    """SimPO (Meng et al., 2024) from hidden states: ``FusedSimPOLoss(beta=2.0, gamma=0.5)``.

    ``alpha > 0`` adds the NLL of the chosen answers (CPO-SimPO); ``alphapo_alpha`` ≠ 0 is
    AlphaPO."""

    loss_fn = staticmethod(simpo_loss)
    options_class = SimPOOptions


class FusedCPOLoss(_FusedReferenceFreeLoss):
    """CPO (Xu et al., 2024) from hidden states: ``FusedCPOLoss(beta=0.1, alpha=1.0)``;
    ``loss_type`` "hinge" or "ipo" and AlphaPO's ``alphapo_alpha`` as :func:`cpo_loss`."""

    loss_fn = staticmethod(cpo_loss)
    options_class = CPOOptions


class FusedORPOLoss(_FusedReferenceFreeLoss):
    """ORPO (Hong et al., 2024) from hidden states: ``FusedORPOLoss(beta=0.1)``."""

    loss_fn = staticmethod(orpo_loss)
    options_class = ORPOOptions


class FusedKTOLoss(_FusedSequenceLoss):
    """KTO loss from hidden states: unpaired examples, each desirable or not.

    ``hidden`` [B, T, H] and ``labels`` [B, T] hold the (prompt, completion) examples;
    ``desirable`` [B] bool says which are good. KTO's reference point is the KL of mismatched pairs
    (prompt i with the completion of another example, see ``kto_mismatched_indices``):
    ``kl_hidden`` / ``kl_labels`` are that batch run through the policy (and ``ref_kl_hidden``
    through the reference). Without them the reference point is 0. Reference log-probs come from
    a reference head in the same call or precomputed (``ref_logps``, ``ref_kl_logps``).
    ``loss_type="apo_zero_unpaired"`` (see :func:`~fastalign.losses.kto_loss`) takes no KL batch.
    """

    def __init__(self, *, beta: float = 0.1, desirable_weight: float = 1.0,
                 undesirable_weight: float = 1.0, loss_type: str = "kto",
                 temperature: float = 1.0, softcap: float | None = None,
                 ignore_index: int = -100, impl: str = "auto", gradients_in_forward: bool = True,
                 options: KTOOptions | None = None) -> None:
        super().__init__(temperature=temperature, softcap=softcap, ignore_index=ignore_index,
                         impl=impl, gradients_in_forward=gradients_in_forward)
        self.options = KTOOptions.from_arguments(options, beta=beta,
                                                 desirable_weight=desirable_weight,
                                                 undesirable_weight=undesirable_weight,
                                                 loss_type=loss_type)

    def forward(self, hidden, weight, labels, desirable, *, kl_hidden=None, kl_labels=None,
                bias=None, ref_hidden=None, ref_weight=None, ref_bias=None, ref_kl_hidden=None,
                ref_logps=None, ref_kl_logps=None) -> tuple[torch.Tensor, Metrics]:
        with_kl = kl_hidden is not None
        if with_kl != (kl_labels is not None):
            raise ValueError("FusedKTOLoss: kl_hidden and kl_labels must be given together")
        if not with_kl and (ref_kl_logps is not None or ref_kl_hidden is not None):
            raise ValueError("FusedKTOLoss: ref_kl_logps / ref_kl_hidden were given without "
                             "kl_hidden and kl_labels (the mismatched batch through the policy)")
        precomputed = {"ref_logps": ref_logps}
        if with_kl:
            precomputed["ref_kl_logps"] = ref_kl_logps
        from_head = _check_reference(ref_hidden, ref_weight, precomputed, "FusedKTOLoss")
        if from_head and with_kl and ref_kl_hidden is None:
            raise ValueError("FusedKTOLoss: with kl_hidden and a reference head, pass "
                             "ref_kl_hidden (the mismatched batch through the reference model)")

        policy_kl_logps = None
        if with_kl:  # the reference point is detached: its log-probs need no graph
            with torch.no_grad():
                policy_kl_logps = self.sequence_logprobs(kl_hidden, weight, kl_labels,
                                                         bias).sum_logps
        in_forward = self.forms_gradients_in_forward(hidden, weight, bias,
                                                     constants=(ref_logps, ref_kl_logps))
        if from_head:
            ref_logps = self.reference_logprobs(
                ref_hidden, ref_weight, labels, ref_bias, weight=weight,
                groups_of=single_groups if in_forward else None).sum_logps
            if with_kl:
                ref_kl_logps = self.reference_logprobs(ref_kl_hidden, ref_weight, kl_labels,
                                                       ref_bias, weight=weight,
                                                       hidden_name="ref_kl_hidden").sum_logps

        def loss_of(policy: SequenceLogprobs):
            return kto_loss(policy.sum_logps, ref_logps, policy_kl_logps,
                            ref_kl_logps if with_kl else None, desirable, options=self.options)

        loss, metrics, _ = self.sequence_loss(hidden, weight, labels, bias, loss_of,
                                              groups_of=single_groups, in_forward=in_forward)
        return loss, metrics


class FusedPPOLoss(_FusedSequenceLoss):
    """PPO / GRPO optimisation loss from hidden states (ALGORITHMS.md §8).

    ``L = L_clip + kl_coef·agg(KL) + vf_coef·L_value − ent_coef·mean entropy``, where the clipped
    surrogate and the KL term are aggregated over tokens by ``loss_agg`` ("token_mean", or
    "grpo", "dapo", "dr_grpo"). GRPO is ``loss_agg="grpo", kl_coef=0.04, kl_estimator="k3"``
    with one advantage per sequence. The value loss is added when ``values`` are given (from a
    value head; they carry its gradient).

    The KL to the reference is either a sampled estimate at the taken tokens (``kl_estimator``
    "k1", "k2", "k3" or "abs", from ``ref_logps``) or, with ``kl_estimator="exact"``, the exact
    KL(π‖π_ref) over the whole vocabulary at every response position, streamed from
    ``ref_hidden`` and ``ref_weight`` by ``fastalign.linear_kl`` (no logits of either head). That
    one pass over the two heads gives the policy's log-probs and entropies too: the policy head
    is streamed once, not once for the log-probs and again for the KL.

    Inputs: ``hidden`` [B, T, H], ``labels`` [B, T] (response token ids, ``ignore_index``
    elsewhere), ``old_logps`` [B, T − 1] (rollout log-probs), ``advantages`` [B, T − 1] or [B];
    optionally ``ref_logps``, ``values``, ``old_values``, ``returns`` [B, T − 1], or
    ``ref_hidden`` [B, T, H_ref] and ``ref_weight`` [V, H_ref] for the exact KL.

    TRL's GRPO loss types and options (``loss_type``, ``importance_sampling_level``,
    ``off_policy_mask_threshold``, ``top_entropy_quantile``, the SAPO and VESPO parameters, see
    ``fastalign.losses.grpo_loss``) replace the clipped surrogate; the entropies the entropy mask
    needs come from the fused op. ``use_bias_correction_kl`` multiplies a sampled KL estimate by
    the importance ratio (the exact KL's gradient needs no correction: it is left as it is).
    """

    def __init__(self, *, clip: float = 0.2, clip_high: float | None = None,
                 dual_clip: float | None = None, kl_coef: float = 0.0, kl_estimator: str = "k3",
                 vf_coef: float = 0.1, vf_clip: float | None = 0.2, ent_coef: float = 0.0,
                 loss_agg: str = "token_mean", temperature: float = 1.0,
                 softcap: float | None = None, ignore_index: int = -100,
                 impl: str = "auto", gradients_in_forward: bool = True,
                 options: PPOOptions | None = None, **variant_options) -> None:
        super().__init__(temperature=temperature, softcap=softcap, ignore_index=ignore_index,
                         impl=impl, gradients_in_forward=gradients_in_forward)
        self.options = PPOOptions.from_arguments(
            options, clip=clip, clip_high=clip_high, dual_clip=dual_clip, kl_coef=kl_coef,
            kl_estimator=kl_estimator, vf_coef=vf_coef, vf_clip=vf_clip, ent_coef=ent_coef,
            loss_agg=loss_agg, **variant_options)

    def forward(self, hidden, weight, labels, old_logps, advantages, *, bias=None, ref_logps=None,
                ref_hidden=None, ref_weight=None, ref_bias=None, values=None, old_values=None,
                returns=None) -> tuple[torch.Tensor, Metrics]:
        options = self.options
        variant = options.variant
        return_entropy = options.ent_coef > 0 or variant.top_entropy_quantile < 1
        if options.kl_estimator == "exact" and ref_hidden is not None and ref_weight is not None:
            logps, mask, token_entropy, exact_kl = self._logprobs_and_exact_kl(
                hidden, weight, bias, labels, ref_hidden, ref_weight, ref_bias, return_entropy)
            loss, metrics = self._policy_loss(logps, mask, token_entropy, exact_kl, old_logps,
                                              advantages, ref_logps)
        else:
            def loss_of(policy: SequenceLogprobs):
                return self._policy_loss(policy.token_logps, policy.token_mask,
                                         policy.token_entropy, None, old_logps, advantages,
                                         ref_logps)

            # The top-entropy mask thresholds at a quantile of the whole batch's entropies.
            in_forward = self.forms_gradients_in_forward(
                hidden, weight, bias, separable=variant.top_entropy_quantile == 1,
                constants=(old_logps, advantages, ref_logps))
            loss, metrics, policy = self.sequence_loss(
                hidden, weight, labels, bias, loss_of, groups_of=single_groups,
                in_forward=in_forward, return_entropy=return_entropy)
            mask = policy.token_mask
        if values is not None:
            if old_values is None or returns is None:
                raise ValueError("FusedPPOLoss: values need old_values and returns as well")
            value_loss, value_metrics = ppo_value_loss(
                values, old_values, returns, mask, clip=options.vf_clip, loss_agg=options.loss_agg)
            metrics.update(value_metrics)
            metrics["loss/value"] = value_loss.detach()
            loss = loss + options.vf_coef * value_loss
        metrics["loss/total"] = loss.detach()
        return loss, metrics

    def _policy_loss(self, logps, mask, token_entropy, exact_kl, old_logps, advantages,
                     ref_logps) -> tuple[torch.Tensor, Metrics]:
        """Everything of the loss that reads the policy's log-probs and entropies ([B, T − 1]):
        the clipped surrogate (or a GRPO variant), the KL term and the entropy bonus."""
        options = self.options
        variant = options.variant
        if isinstance(advantages, torch.Tensor) and advantages.dim() == 1:
            if advantages.shape[0] != logps.shape[0]:
                raise ValueError(f"advantages must be [B, T - 1] = {tuple(logps.shape)} or one "
                                 f"per sequence [B] = [{logps.shape[0]}], got "
                                 f"{tuple(advantages.shape)}")
            advantages = advantages[:, None].expand_as(logps)  # one advantage per sequence (GRPO)
        entropy_mask, ratio = mask, None
        if variant.plain:
            loss, metrics = ppo_policy_loss(
                logps, old_logps, advantages, mask, clip=options.clip,
                clip_high=options.clip_high, dual_clip=options.dual_clip,
                loss_agg=options.loss_agg,
            )
        else:
            check_per_token("old_logps", old_logps, like=logps, like_name="logps")
            check_per_token("advantages", advantages, like=logps, like_name="logps")
            dtype = compute_dtype(logps, old_logps, advantages)
            low, high = check_clip(options.clip, options.clip_high)
            terms = grpo_policy_terms(
                zero_outside(logps.to(dtype), mask),
                zero_outside(old_logps.detach().to(dtype), mask),
                zero_outside(advantages.detach().to(dtype), mask), mask, clip_low=low,
                clip_high=high, variant=variant, entropies=token_entropy)
            loss = aggregate_policy_loss(terms.per_token, mask, options.aggregation)
            metrics, entropy_mask, ratio = dict(terms.metrics), terms.entropy_mask, terms.ratio
            # The names PPO's surrogate logs, so that a trainer's metrics do not depend on it.
            log_ratio = zero_outside(logps.detach().to(dtype) - old_logps.to(dtype), mask)
            metrics["policy/approx_kl"] = 0.5 * masked_mean(log_ratio ** 2, mask)
            metrics["policy/ratio_mean"] = metrics.pop("ratio_mean")
        metrics["loss/policy"] = loss.detach()
        kl = exact_kl if exact_kl is not None else self._kl(logps, ref_logps)
        if kl is not None:
            metrics["kl"] = masked_mean(kl.detach(), mask)
            if options.kl_coef > 0:
                if options.use_bias_correction_kl and options.kl_estimator != "exact":
                    if ratio is None:  # PPO's surrogate: the token-level ratio
                        ratio = torch.exp(zero_outside(logps - old_logps.detach(), mask))
                    kl = kl * ratio
                kl_term = aggregate_policy_loss(kl, mask, options.aggregation)
                loss = loss + options.kl_coef * kl_term
        if token_entropy is not None:
            metrics["entropy"] = masked_mean(token_entropy.detach(), mask)
            if options.ent_coef > 0:  # over the tokens the policy loss uses, as TRL
                loss = loss - options.ent_coef * masked_mean(token_entropy, entropy_mask)
        return loss, metrics

    def _logprobs_and_exact_kl(self, hidden, weight, bias, labels, ref_hidden, ref_weight,
                               ref_bias, return_entropy):
        """Per-token (logps, mask, entropy or None, exact KL), [B, T − 1] each, from one
        ``linear_kl`` pass over the policy and reference heads (the same values as
        ``sequence_logprobs_from_labels`` followed by ``linear_kl``)."""
        # Position t of the hidden states predicts token t + 1: the last one predicts nothing.
        targets = next_token_targets(labels, ignore_index=self.ignore_index)
        check_head("", hidden, weight, bias)
        if hidden.dim() != 3 or labels.dim() != 2:
            raise ValueError(f"FusedPPOLoss: hidden must be [B, T, H] and labels [B, T], got "
                             f"{tuple(hidden.shape)} and {tuple(labels.shape)}")
        positions = targets != self.ignore_index
        kl, logps, *entropy = linear_kl(
            hidden, weight, ref_hidden.detach(), ref_weight.detach(), mask=positions, bias=bias,
            ref_bias=None if ref_bias is None else ref_bias.detach(),
            temperature=self.temperature, softcap=self.softcap, impl=self.impl,
            targets=targets, ignore_index=self.ignore_index, return_entropy=return_entropy)
        entropy = entropy[0][:, :-1] if entropy else None
        return logps[:, :-1], positions[:, :-1], entropy, kl[:, :-1]

    def _kl(self, logps, ref_logps) -> torch.Tensor | None:
        """Per-token sampled KL estimate, [B, T − 1], or None when no reference was given."""
        options = self.options
        if options.kl_estimator == "exact":  # without a reference head (else the one pass)
            if options.kl_coef > 0:
                raise ValueError("FusedPPOLoss: kl_estimator='exact' needs ref_hidden "
                                 "[B, T, H_ref] and ref_weight [V, H_ref]")
            return None
        if ref_logps is None:
            if options.kl_coef > 0:
                raise ValueError("FusedPPOLoss: kl_coef > 0 needs ref_logps [B, T − 1] (or "
                                 "kl_estimator='exact' with ref_hidden and ref_weight)")
            return None
        return kl_penalty(logps, ref_logps, estimator=options.kl_estimator)
