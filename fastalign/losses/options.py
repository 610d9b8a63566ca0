"""The options of each loss family as small frozen objects, validated once when built.

A training run spells its loss options once (the CLI config, or a user's call), builds one of
these, and passes it whole to the fused module and the loss: nothing below re-checks it, and no
layer re-spells its fields. The loss functions still take the options one by one as keywords
(``dpo_loss(..., beta=0.1)``), which builds the object for that call; ``options=`` passes a
prepared one instead. The names and defaults are TRL's.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

from fastalign.losses.grpo import GRPOVariant
from fastalign.losses.kl import KL_ESTIMATORS
from fastalign.losses.masked import AGGREGATION_NAMES
from fastalign.losses.ppo import check_clip, check_dual_clip
from fastalign.ops._checks import (
    check_bool,
    check_choice,
    check_finite,
    check_in_range,
    check_non_negative,
    check_positive,
    normalize_names,
)

__all__ = [
    "CPO_LOSS_TYPES",
    "CPOOptions",
    "DPOOptions",
    "DPO_LOSS_TYPES",
    "F_DIVERGENCES",
    "KTO_LOSS_TYPES",
    "KTOOptions",
    "ORPOOptions",
    "PPOOptions",
    "SimPOOptions",
]

DPO_LOSS_TYPES = (
    "sigmoid", "robust", "hinge", "ipo", "exo_pair", "nca_pair", "bco_pair", "sppo_hard",
    "apo_zero", "apo_down", "discopop", "sft", "aot", "aot_unpaired", "sigmoid_norm",
)
# The loss types whose formula contains the label smoothing ε; the others ignore it.
SMOOTHED_LOSS_TYPES = ("sigmoid", "robust", "exo_pair", "aot", "aot_unpaired")
CPO_LOSS_TYPES = ("sigmoid", "hinge", "ipo")
KTO_LOSS_TYPES = ("kto", "apo_zero_unpaired")
# The loss types that sort the batch, so that a per-pair weight would land on another pair.
SORTING_LOSS_TYPES = ("aot", "aot_unpaired")
# The f-divergence that regularises toward the reference (Wang et al., 2023): reverse KL is DPO's.
F_DIVERGENCES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")


class _Options:
    """What every options object shares: building it from a loss call's keywords."""

    @classmethod
    def from_arguments(cls, options, **values):
        """``options`` if given (every value then left at its default), else ``cls(**values)``.

        A call that passes both ``options=`` and a different ``beta=`` would otherwise drop one of
        them silently.
        """
        if options is None:
            return cls(**values)
        if not isinstance(options, cls):
            raise TypeError(f"options must be a {cls.__name__} or None, got "
                            f"{type(options).__name__}")
        fields = {field.name: field for field in dataclasses.fields(cls)}
        also_given = [name for name, value in values.items()
                      if name in fields and value != fields[name].default]
        if also_given:
            raise TypeError(f"pass the loss options either as options= or one by one, not both "
                            f"(also given: {', '.join(also_given)})")
        return options

    def _set(self, name: str, value) -> None:
        object.__setattr__(self, name, value)  # normalising a frozen field, in __post_init__ only


@dataclass(frozen=True)
class DPOOptions(_Options):
    """Options of :func:`fastalign.losses.dpo_loss` (see it for their meaning).

    ``loss_type`` may be one name or several; it is kept as a tuple. ``loss_weights`` has one
    finite weight per loss type (None: all 1).

    Two options act before the loss, where per-token log-probs exist, so :func:`dpo_loss` itself
    only checks them: ``ld_alpha`` (LD-DPO, in [0, 1]; None: plain sums) is how the sequence
    log-probs are summed (:func:`~fastalign.losses.ld_sequence_logps`), and ``use_weighting``
    (WPO) asks :class:`~fastalign.FusedDPOLoss` and the DPO trainer for per-pair weights
    (:func:`~fastalign.losses.wpo_sequence_weights`), which ``dpo_loss`` then requires.
    """

    beta: float = 0.1
    loss_type: str | tuple[str, ...] = "sigmoid"
    label_smoothing: float = 0.0
    loss_weights: tuple[float, ...] | None = None
    discopop_tau: float = 0.05
    bco_delta: float = 0.0
    f_divergence_type: str = "reverse_kl"
    f_alpha_divergence_coef: float = 0.5
    ld_alpha: float | None = None
    use_weighting: bool = False

    def __post_init__(self) -> None:
        if self.ld_alpha is not None:
            self._set("ld_alpha", check_in_range("ld_alpha", self.ld_alpha, 0.0, 1.0,
                                                 high_inclusive=True))
        check_bool("use_weighting", self.use_weighting)
        if self.f_divergence_type not in F_DIVERGENCES:
            raise ValueError(f"f_divergence_type must be one of {', '.join(F_DIVERGENCES)}, got "
                             f"{self.f_divergence_type!r}")
        self._set("f_alpha_divergence_coef",
                  check_finite("f_alpha_divergence_coef", self.f_alpha_divergence_coef))
        loss_types = tuple(normalize_names("loss_type", self.loss_type, DPO_LOSS_TYPES))
        self._set("loss_type", loss_types)
        self._set("beta", check_positive("beta", self.beta))
        label_smoothing = check_in_range(
            "label_smoothing", self.label_smoothing, 0.0, 0.5, high_inclusive=False
        )
        self._set("label_smoothing", label_smoothing)
        self._set("discopop_tau", check_positive("discopop_tau", self.discopop_tau))
        self._set("bco_delta", check_finite("bco_delta", self.bco_delta))
        sorting = [t for t in loss_types if t in SORTING_LOSS_TYPES]
        if self.use_weighting and sorting:
            raise ValueError(f"use_weighting cannot weight loss_type {sorting[0]!r}: it sorts the "
                             f"batch, so a pair's weight would multiply another pair's term")
        if label_smoothing > 0 and not any(t in SMOOTHED_LOSS_TYPES for t in loss_types):
            raise ValueError(
                f"label_smoothing={label_smoothing} has no effect with "
                f"loss_type={list(loss_types)}: only {', '.join(SMOOTHED_LOSS_TYPES)} use it; "
                f"set label_smoothing=0.0"
            )
        if "exo_pair" in loss_types and label_smoothing == 0:
            raise ValueError(
                "loss_type 'exo_pair' needs label_smoothing > 0 (its loss contains log ε); "
                "1e-3 is the usual value"
            )
        weights = self.loss_weights
        if weights is not None:
            if isinstance(weights, (str, bytes)) or not isinstance(weights, Sequence):
                raise TypeError(
                    f"loss_weights must be a sequence of floats or None, got "
                    f"{type(weights).__name__}"
                )
            if len(weights) != len(loss_types):
                raise ValueError(
                    f"loss_weights must have one weight per loss type: got {len(weights)} "
                    f"weights for {len(loss_types)} loss types {list(loss_types)}"
                )
            weights = tuple(check_finite(f"loss_weights[{i}]", w) for i, w in enumerate(weights))
        self._set("loss_weights", weights)

    @property
    def weights(self) -> tuple[float, ...]:
        """One weight per loss type (1.0 each without ``loss_weights``)."""
        return self.loss_weights or (1.0,) * len(self.loss_type)


@dataclass(frozen=True)
class SimPOOptions(_Options):
    """Options of :func:`fastalign.losses.simpo_loss`."""

    beta: float = 2.0
    gamma: float = 0.5
    label_smoothing: float = 0.0
    alpha: float = 0.0
    alphapo_alpha: float = 0.0

    # SimPO's reward is the answer's mean token log-prob.
    length_averaged = True

    def __post_init__(self) -> None:
        self._set("beta", check_positive("beta", self.beta))
        self._set("gamma", check_finite("gamma", self.gamma))
        self._set("label_smoothing", check_in_range(
            "label_smoothing", self.label_smoothing, 0.0, 0.5, high_inclusive=False))
        self._set("alpha", check_non_negative("alpha", self.alpha))
        self._set("alphapo_alpha", check_finite("alphapo_alpha", self.alphapo_alpha))


@dataclass(frozen=True)
class CPOOptions(_Options):
    """Options of :func:`fastalign.losses.cpo_loss`.

    ``alpha`` is the weight of the NLL term (TRL's ``cpo_alpha``); ``alphapo_alpha`` the reward
    shape of AlphaPO (TRL's ``alpha``), named apart so that the two never mix.
    """

    beta: float = 0.1
    label_smoothing: float = 0.0
    alpha: float = 1.0
    loss_type: str = "sigmoid"
    alphapo_alpha: float = 0.0

    def __post_init__(self) -> None:
        self._set("beta", check_positive("beta", self.beta))
        self._set("label_smoothing", check_in_range(
            "label_smoothing", self.label_smoothing, 0.0, 0.5, high_inclusive=False))
        self._set("alpha", check_non_negative("alpha", self.alpha))
        check_choice("loss_type", self.loss_type, CPO_LOSS_TYPES)
        self._set("alphapo_alpha", check_finite("alphapo_alpha", self.alphapo_alpha))
        if self.label_smoothing > 0 and self.loss_type != "sigmoid":
            raise ValueError(f"label_smoothing={self.label_smoothing} has no effect with "
                             f"loss_type={self.loss_type!r}: only 'sigmoid' uses it; set "
                             f"label_smoothing=0.0")

    @property
    def length_averaged(self) -> bool:
        """True where the loss reads each answer's mean token log-prob (ipo), not its sum."""
        return self.loss_type == "ipo"


@dataclass(frozen=True)
class ORPOOptions(_Options):
    """Options of :func:`fastalign.losses.orpo_loss`."""

    beta: float = 0.1

    # ORPO's odds are those of the answer's mean token probability.
    length_averaged = True

    def __post_init__(self) -> None:
        self._set("beta", check_positive("beta", self.beta))


@dataclass(frozen=True)
class KTOOptions(_Options):
    """Options of :func:`fastalign.losses.kto_loss`."""

    beta: float = 0.1
    desirable_weight: float = 1.0
    undesirable_weight: float = 1.0
    loss_type: str = "kto"

    def __post_init__(self) -> None:
        check_choice("loss_type", self.loss_type, KTO_LOSS_TYPES)
        self._set("beta", check_positive("beta", self.beta))
        self._set("desirable_weight", check_non_negative("desirable_weight",
                                                         self.desirable_weight))
        self._set("undesirable_weight", check_non_negative("undesirable_weight",
                                                           self.undesirable_weight))

    @property
    def uses_kl(self) -> bool:
        """Whether the loss has KTO's reference point (the KL of mismatched pairs)."""
        return self.loss_type == "kto"


@dataclass(frozen=True)
class PPOOptions(_Options, GRPOVariant):
    """Options of :class:`fastalign.FusedPPOLoss` (PPO, GRPO and RLOO updates).

    clip / clip_high / dual_clip: the ratio's clip range (ε_low, ε_high) and dual clip;
    kl_coef and kl_estimator: the KL term (a sampled estimator, or "exact" over the vocabulary);
    vf_coef and vf_clip: the value loss; ent_coef: the entropy bonus; loss_agg: how token losses
    are reduced ("token_mean", "grpo", "dapo", "dr_grpo" and their aliases);
    use_bias_correction_kl: the KL term weighted by the ratio; and, keyword-only, the fields of
    ``GRPOVariant``: TRL's GRPO loss types and options (``grpo_loss``), which replace PPO's
    surrogate and, for loss_type, the aggregation of loss_agg.
    """

    clip: float = 0.2
    clip_high: float | None = None
    dual_clip: float | None = None
    kl_coef: float = 0.0
    kl_estimator: str = "k3"
    vf_coef: float = 0.1
    vf_clip: float | None = 0.2
    ent_coef: float = 0.0
    loss_agg: str = "token_mean"
    use_bias_correction_kl: bool = False

    @property
    def variant(self) -> GRPOVariant:
        """The GRPO-family surrogate these options choose (their ``GRPOVariant`` fields)."""
        return GRPOVariant(**{field.name: getattr(self, field.name)
                              for field in dataclasses.fields(GRPOVariant)})

    @property
    def aggregation(self) -> str:
        """How token losses are reduced: ``loss_type``'s aggregation, else ``loss_agg``."""
        return self.aggregation_for(self.loss_agg)

    def __post_init__(self) -> None:
        for name in ("kl_coef", "vf_coef", "ent_coef"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not value >= 0:
                raise ValueError(f"PPO options: {name} must be a number >= 0, got {value!r}")
        estimators = (*KL_ESTIMATORS, "exact")  # the sampled estimators, or the exact KL
        if self.kl_estimator not in estimators:
            raise ValueError(f"PPO options: kl_estimator must be one of {estimators}, got "
                             f"{self.kl_estimator!r}")
        if self.loss_agg not in AGGREGATION_NAMES:
            raise ValueError(f"PPO options: loss_agg must be one of {AGGREGATION_NAMES}, got "
                             f"{self.loss_agg!r}")
        check_clip(self.clip, self.clip_high)
        check_dual_clip(self.dual_clip)
        if not isinstance(self.use_bias_correction_kl, bool):
            raise ValueError(f"PPO options: use_bias_correction_kl must be True or False, got "
                             f"{self.use_bias_correction_kl!r}")
        GRPOVariant.__post_init__(self)
        if self.dual_clip is not None and not self.plain:
            raise ValueError("PPO options: dual_clip bounds PPO's clipped loss only; it cannot be "
                             "combined with loss_type, importance_sampling_level='sequence', "
                             "off_policy_mask_threshold or top_entropy_quantile")
        if self.vf_clip is not None:
            check_positive("vf_clip", self.vf_clip)
