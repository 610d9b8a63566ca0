"""PPO for language models: masked statistics, KL penalties and controllers, clipped losses.

Layer 3 of fastalign (`docs/STYLE.md`): loss math in plain PyTorch on the per-token outputs of the
ops (log-probabilities, values, entropies), following `docs/ALGORITHMS.md` §4 and §8.

Conventions shared by every function here:

* Per-token tensors are ``[B, T]`` floating point; ``mask`` is ``[B, T]``, bool or 0/1 (any
  nonzero entry counts as one response token). Padding may hold anything, even inf or NaN: masked
  out positions are replaced by 0 before any arithmetic that could spread them, so they get
  neither value nor gradient.
* Arithmetic runs in float32 (float64 when any input is float64); half-precision inputs are
  upcast, so losses and statistics come back in float32 (or float64).
* A masked mean over no tokens is 0, never NaN.
* Losses return ``(loss, metrics)``: ``loss`` a 0-d tensor carrying the gradient, ``metrics`` a
  dict of detached 0-d float32 tensors.

GAE lives elsewhere (the ``fastalign.gae`` op); ``masked_whiten`` whitens its advantages.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from fastalign.losses._common import (
    check_float_tensor,
    check_non_negative,
    check_positive,
    compute_dtype,
    metric,
)

__all__ = [
    "AGGREGATION_MODES",
    "KL_ESTIMATORS",
    "AdaptiveKLController",
    "FixedKLController",
    "KLController",
    "ShapedRewards",
    "aggregate_token_loss",
    "kl_penalty",
    "kl_shaped_rewards",
    "masked_mean",
    "masked_var",
    "masked_whiten",
    "ppo_policy_loss",
    "ppo_total_loss",
    "ppo_value_loss",
]

Metrics = dict[str, torch.Tensor]

KL_ESTIMATORS = ("k1", "k2", "k3", "abs")

# Canonical token-aggregation modes and the names other libraries use for the same thing
# (verl's ``loss_agg_mode`` spellings, with underscores).
AGGREGATION_MODES = ("grpo", "dapo", "dr_grpo")
_AGGREGATION_ALIASES = {
    "grpo": "grpo",
    "seq_mean_token_mean": "grpo",
    "dapo": "dapo",
    "token_mean": "dapo",
    "dr_grpo": "dr_grpo",
    "seq_mean_token_sum_norm": "dr_grpo",
}
# Every accepted spelling of a mode.
AGGREGATION_NAMES = tuple(_AGGREGATION_ALIASES)


# ----------------------------------------------------------------------------------------------
# Argument checks (shared with grpo.py)
# ----------------------------------------------------------------------------------------------


def _check_tokens(name: str, value, *, like: torch.Tensor | None = None,
                  like_name: str = "") -> None:
    """A floating-point tensor: ``[B, T]`` when ``like`` is None, else of ``like``'s shape."""
    check_float_tensor(name, value)
    if like is None:
        if value.dim() != 2:
            raise ValueError(f"{name} must be 2-D [B, T], got shape {tuple(value.shape)}")
    elif value.shape != like.shape:
        raise ValueError(
            f"{name} must have the shape of {like_name} {tuple(like.shape)}, "
            f"got {tuple(value.shape)}"
        )
    if like is not None and value.device != like.device:
        raise ValueError(f"{name} must be on the same device as {like_name}, got {value.device} "
                         f"and {like.device}")


def _as_bool_mask(mask, like: torch.Tensor, like_name: str) -> torch.Tensor:
    """Check ``mask`` (bool or 0/1, the shape of ``like``) and return it as a bool tensor."""
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"mask must be a torch.Tensor, got {type(mask).__name__}")
    if mask.dtype.is_complex:
        raise TypeError(f"mask must be a bool or 0/1 tensor, got {mask.dtype}")
    if mask.shape != like.shape:
        raise ValueError(
            f"mask must have the shape of {like_name} {tuple(like.shape)}, got {tuple(mask.shape)}"
        )
    if mask.device != like.device:
        raise ValueError(f"mask must be on the same device as {like_name}, got {mask.device} "
                         f"and {like.device}")
    return mask if mask.dtype == torch.bool else mask != 0


def _check_choice(name: str, value, choices) -> str:
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a string, got {type(value).__name__}")
    if value not in choices:
        raise ValueError(f"unknown {name} {value!r}; valid values are: {', '.join(choices)}")
    return value


def _check_aggregation(name: str, value) -> str:
    """An ``aggregate_token_loss`` mode given to a loss as ``name``: the error names that argument
    (the caller's), not ``mode``."""
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a string, got {type(value).__name__}")
    if value not in _AGGREGATION_ALIASES:
        raise ValueError(f"{name}: unknown mode {value!r}; valid values are: "
                         f"{', '.join(_AGGREGATION_ALIASES)}")
    return value


def _check_clip(clip, clip_high) -> tuple[float, float]:
    """(ε_low, ε_high): ε_low in (0, 1) so that 1 − ε_low stays positive; ε_high > 0."""
    low = check_positive("clip", clip)
    if low >= 1:
        raise ValueError(f"clip must lie in (0, 1) (the ratio is clipped to [1 - clip, ...]), "
                         f"got {low}")
    high = low if clip_high is None else check_positive("clip_high", clip_high)
    return low, high


def _check_dual_clip(dual_clip) -> float | None:
    if dual_clip is None:
        return None
    value = check_positive("dual_clip", dual_clip)
    if value <= 1:
        raise ValueError(f"dual_clip must be > 1 (Ye et al. 2020), got {value}")
    return value


def _check_max_len(max_len) -> int | None:
    if max_len is None:
        return None
    if not isinstance(max_len, int) or isinstance(max_len, bool):
        raise TypeError(f"max_len must be an int, got {type(max_len).__name__}")
    if max_len <= 0:
        raise ValueError(f"max_len must be > 0, got {max_len}")
    return max_len


def _zero_outside(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``x`` where ``mask``, else 0; a NaN/inf in padding reaches neither value nor gradient."""
    return torch.where(mask, x, torch.zeros((), dtype=x.dtype, device=x.device))


# ----------------------------------------------------------------------------------------------
# Masked statistics
# ----------------------------------------------------------------------------------------------


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of ``x`` over the positions where ``mask`` is set; 0 where no position is set.

    Args:
        x: floating-point tensor of any shape (usually ``[B, T]``).
        mask: bool or 0/1 tensor with the shape of ``x``.
        dim: reduce over this dimension only (e.g. ``dim=1``: one mean per sequence); ``None``
            reduces everything to a 0-d tensor.

    Returns:
        float32 (float64 for float64 ``x``); 0-d, or ``x``'s shape without ``dim``.
    """
    check_float_tensor("x", x)
    mask = _as_bool_mask(mask, x, "x")
    if dim is not None and (not isinstance(dim, int) or isinstance(dim, bool)):
        raise TypeError(f"dim must be an int or None, got {type(dim).__name__}")
    x = x.to(compute_dtype(x))
    total = _zero_outside(x, mask).sum() if dim is None else _zero_outside(x, mask).sum(dim)
    count = mask.sum() if dim is None else mask.sum(dim)
    return total / count.clamp(min=1).to(x.dtype)


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance of ``x`` over the masked positions (a 0-d tensor).

    With ``unbiased`` the Bessel factor n / (n − 1) is applied when n > 1 masked positions exist;
    for n ≤ 1 the (biased) value is returned instead of NaN: 0 for a single token or for none.

    Args:
        x: floating-point tensor; mask: bool or 0/1 with the same shape.

    Returns:
        0-d float32 (float64 for float64 ``x``).
    """
    mean = masked_mean(x, mask)
    mask = _as_bool_mask(mask, x, "x")
    # Zeroed outside the mask before squaring: a NaN/inf in padding must not reach the gradient
    # through the square (masked_mean's where() blocks only the value of a non-finite square).
    centred = _zero_outside(x.to(mean.dtype) - mean, mask)
    var = masked_mean(centred * centred, mask)
    if unbiased:
        n = mask.sum().to(var.dtype)
        var = torch.where(n > 1, var * n / (n - 1).clamp(min=1), var)
    return var


def masked_whiten(
    x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, *, eps: float = 1e-8
) -> torch.Tensor:
    """Whiten ``x`` over the masked tokens: (x − mean) / sqrt(var + eps) (§8, "whiten A").

    Mean and (unbiased) variance are taken over the masked positions of the whole tensor, as in
    TRL's PPO. With ``shift_mean=False`` the mean is added back (only the scale changes), the
    usual choice for rewards. Positions outside ``mask`` are set to 0 in the output.

    Args:
        x: floating-point tensor of any shape, e.g. advantages ``[B, T]``.
        mask: bool or 0/1 tensor with the shape of ``x``.
        shift_mean: subtract the mean (True) or keep it (False).
        eps: added to the variance; > 0.

    Returns:
        Same shape as ``x``, float32 (float64 for float64 ``x``). Differentiable.
    """
    eps = check_positive("eps", eps)
    mean = masked_mean(x, mask)
    var = masked_var(x, mask, unbiased=True)
    mask = _as_bool_mask(mask, x, "x")
    xf = _zero_outside(x.to(mean.dtype), mask)  # padding's NaN/inf stays out of every gradient
    whitened = (xf - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return _zero_outside(whitened, mask)


# ----------------------------------------------------------------------------------------------
# Sampled KL estimators and the KL coefficient
# ----------------------------------------------------------------------------------------------


def kl_penalty(
    logps: torch.Tensor, ref_logps: torch.Tensor, *, estimator: str = "k1"
) -> torch.Tensor:
    """Per-token sampled estimate of KL(π_θ ‖ π_ref) at the sampled tokens (§4; Schulman 2020).

    With logr = ref_logps − logps (tokens sampled from π_θ):

    * ``"k1"``: −logr (unbiased, high variance, can be negative);
    * ``"k2"``: ½·logr² (biased, low variance);
    * ``"k3"``: (e^{logr} − 1) − logr, computed as ``expm1(logr) − logr`` (unbiased, ≥ 0);
    * ``"abs"``: |logr|.

    Gradients flow to ``logps`` (and to ``ref_logps`` if it requires grad).

    Args:
        logps, ref_logps: floating-point tensors of one shape (usually ``[B, T]``).
        estimator: one of ``KL_ESTIMATORS``.

    Returns:
        Tensor of that shape, float32 (float64 for float64 inputs). No masking is applied.
    """
    check_float_tensor("logps", logps)
    _check_tokens("ref_logps", ref_logps, like=logps, like_name="logps")
    _check_choice("estimator", estimator, KL_ESTIMATORS)
    dtype = compute_dtype(logps, ref_logps)
    logr = ref_logps.to(dtype) - logps.to(dtype)
    if estimator == "k1":
        return -logr
    if estimator == "k2":
        return 0.5 * logr * logr
    if estimator == "k3":
        # expm1 keeps e^{logr} − 1 accurate for small logr, where k3 ≈ logr²/2.
        return torch.expm1(logr) - logr
    return logr.abs()


class KLController:
    """Interface of a KL-coefficient controller: ``.value`` and ``.update(current_kl, n_steps)``."""

    value: float

    def update(self, current_kl: float | torch.Tensor, n_steps: int) -> float:
        raise NotImplementedError

    def state_dict(self) -> dict[str, float]:
        raise NotImplementedError

    def load_state_dict(self, state: dict[str, float]) -> None:
        raise NotImplementedError


def _check_current_kl(current_kl) -> float:
    if isinstance(current_kl, torch.Tensor):
        if current_kl.numel() != 1:
            raise ValueError(f"current_kl must be a scalar, got shape {tuple(current_kl.shape)}")
        current_kl = float(current_kl.detach())
    if not isinstance(current_kl, (int, float)) or isinstance(current_kl, bool):
        raise TypeError(f"current_kl must be a float or a 0-d tensor, "
                        f"got {type(current_kl).__name__}")
    current_kl = float(current_kl)
    if not math.isfinite(current_kl):
        # A NaN would poison the coefficient for the rest of training; refuse it loudly.
        raise ValueError(f"current_kl must be finite, got {current_kl}")
    return current_kl


def _check_n_steps(n_steps) -> int:
    if not isinstance(n_steps, int) or isinstance(n_steps, bool):
        raise TypeError(f"n_steps must be an int, got {type(n_steps).__name__}")
    if n_steps < 0:
        raise ValueError(f"n_steps must be >= 0, got {n_steps}")
    return n_steps


def _check_state(state, keys: tuple[str, ...]) -> None:
    if not isinstance(state, dict):
        raise TypeError(f"state must be a dict, got {type(state).__name__}")
    missing = [k for k in keys if k not in state]
    if missing:
        raise ValueError(f"state is missing {', '.join(missing)}")


class AdaptiveKLController(KLController):
    """Adaptive KL coefficient (Ziegler et al. 2019, "Fine-Tuning LMs from Human Preferences").

    After each batch, ``update(KL, n_steps)`` moves β towards the value that keeps the measured KL
    near ``target`` (§8):

        e = clip(KL / target − 1, −0.2, 0.2);     β ← β · (1 + e · n_steps / horizon)

    ``n_steps`` is the number of samples (episodes) the KL was measured on, as in the paper and
    TRL; ``current_kl`` is the mean per-sequence KL (summed over tokens).

    Args:
        init_kl_coef: starting β > 0.
        target: target KL > 0.
        horizon: number of samples over which an error of 0.2 changes β by 20 %; > 0.
    """

    def __init__(self, init_kl_coef: float, target: float, horizon: float) -> None:
        self.value = check_positive("init_kl_coef", init_kl_coef)
        self.target = check_positive("target", target)
        self.horizon = check_positive("horizon", horizon)

    def update(self, current_kl: float | torch.Tensor, n_steps: int) -> float:
        """Update and return β from the KL measured on ``n_steps`` samples."""
        current_kl = _check_current_kl(current_kl)
        n_steps = _check_n_steps(n_steps)
        error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon
        return self.value

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value, "target": self.target, "horizon": self.horizon}

    def load_state_dict(self, state: dict[str, float]) -> None:
        _check_state(state, ("value", "target", "horizon"))
        self.value = check_positive("state['value']", state["value"])
        self.target = check_positive("state['target']", state["target"])
        self.horizon = check_positive("state['horizon']", state["horizon"])

    def __repr__(self) -> str:
        return (f"AdaptiveKLController(value={self.value}, target={self.target}, "
                f"horizon={self.horizon})")


class FixedKLController(KLController):
    """A constant KL coefficient with the interface of ``AdaptiveKLController``.

    Args:
        kl_coef: β ≥ 0.
    """

    def __init__(self, kl_coef: float) -> None:
        self.value = check_non_negative("kl_coef", kl_coef)

    def update(self, current_kl: float | torch.Tensor, n_steps: int) -> float:
        """Check the arguments and return the unchanged β."""
        _check_current_kl(current_kl)
        _check_n_steps(n_steps)
        return self.value

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, float]) -> None:
        _check_state(state, ("value",))
        self.value = check_non_negative("state['value']", state["value"])

    def __repr__(self) -> str:
        return f"FixedKLController(value={self.value})"


class ShapedRewards(NamedTuple):
    """Per-token rewards ``[B, T]`` and their KL part alone (both detached)."""

    rewards: torch.Tensor
    non_score_rewards: torch.Tensor


def kl_shaped_rewards(
    scores: torch.Tensor,
    logps: torch.Tensor,
    ref_logps: torch.Tensor,
    mask: torch.Tensor,
    *,
    kl_coef: float | torch.Tensor,
    estimator: str = "k1",
) -> ShapedRewards:
    """Per-token PPO rewards: a KL penalty on every response token, the score on the last one.

    Ziegler et al. 2019 (§2.2) and Stiennon et al. 2020 (§3.4): R(x, y) = r(x, y) − β·KL, spread
    over tokens as

        non_score_t = −β · k(t)   on response tokens (``mask``), 0 elsewhere;
        reward_t    = non_score_t + score · 1[t is the last masked token of its row].

    A row without masked tokens gets no reward at all (not even its score). The result is
    detached: these are rewards, not a loss.

    Args:
        scores: ``[B]`` floating-point scores (reward model or reward function).
        logps, ref_logps: ``[B, T]`` log-probabilities of the sampled tokens under the policy at
            rollout time and under the reference model.
        mask: ``[B, T]`` bool or 0/1, response tokens.
        kl_coef: β ≥ 0 (e.g. ``controller.value``); a float or a 0-d tensor.
        estimator: KL estimator k of ``kl_penalty`` ("k1" by default, as in §8).

    Returns:
        ``ShapedRewards(rewards, non_score_rewards)``, each ``[B, T]`` float32 (float64 for float64
        inputs).
    """
    _check_tokens("logps", logps)
    _check_tokens("ref_logps", ref_logps, like=logps, like_name="logps")
    mask = _as_bool_mask(mask, logps, "logps")
    check_float_tensor("scores", scores)
    if scores.shape != logps.shape[:1]:
        raise ValueError(f"scores must have shape [B] = [{logps.shape[0]}], "
                         f"got {tuple(scores.shape)}")
    if isinstance(kl_coef, torch.Tensor):
        if kl_coef.numel() != 1:
            raise ValueError(f"kl_coef must be a scalar, got shape {tuple(kl_coef.shape)}")
        kl_coef = float(kl_coef.detach())
    kl_coef = check_non_negative("kl_coef", kl_coef)
    with torch.no_grad():
        dtype = compute_dtype(logps, ref_logps, scores)
        kl = kl_penalty(logps.detach(), ref_logps.detach(), estimator=estimator).to(dtype)
        non_score = _zero_outside(-kl_coef * kl, mask)
        rewards = non_score.clone()
        if mask.shape[1] > 0:
            # Index of the last masked position of each row (−1 when the row has none).
            positions = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
            last = torch.where(mask, positions, -1).amax(dim=1)
            score = torch.where(last >= 0, scores.detach().to(dtype), 0)
            rewards.scatter_add_(1, last.clamp(min=0).unsqueeze(1), score.unsqueeze(1))
    return ShapedRewards(rewards, non_score)


# ----------------------------------------------------------------------------------------------
# Token aggregation
# ----------------------------------------------------------------------------------------------


def aggregate_token_loss(
    per_token_loss: torch.Tensor,
    mask: torch.Tensor,
    *,
    mode: str = "grpo",
    max_len: int | None = None,
) -> torch.Tensor:
    """Reduce a per-token loss ``[B, T]`` to a scalar, one of three normalisations (§8).

    * ``"grpo"`` (alias ``"seq_mean_token_mean"``): the masked mean of each sequence, then the
      mean over all B sequences (Shao et al. 2024). A sequence with no tokens counts as 0.
    * ``"dapo"`` (alias ``"token_mean"``): the mean over every masked token of the batch, so long
      sequences weigh more (Yu et al. 2025, DAPO "token-level policy gradient loss").
    * ``"dr_grpo"`` (alias ``"seq_mean_token_sum_norm"``): sum over masked tokens divided by the
      constant B · max_len, removing the length bias (Liu et al. 2025, Dr. GRPO).

    Args:
        per_token_loss: ``[B, T]`` floating point.
        mask: ``[B, T]`` bool or 0/1.
        mode: see above.
        max_len: the "dr_grpo" constant; defaults to T. Ignored by the other modes.

    Returns:
        0-d tensor, float32 (float64 for float64 input). All-masked input gives 0.
    """
    _check_tokens("per_token_loss", per_token_loss)
    mask = _as_bool_mask(mask, per_token_loss, "per_token_loss")
    mode = _AGGREGATION_ALIASES[_check_choice("mode", mode, tuple(_AGGREGATION_ALIASES))]
    max_len = _check_max_len(max_len)
    loss = _zero_outside(per_token_loss.to(compute_dtype(per_token_loss)), mask)
    batch, length = loss.shape
    if mode == "grpo":
        per_sequence = loss.sum(1) / mask.sum(1).clamp(min=1).to(loss.dtype)
        return per_sequence.sum() / max(batch, 1)
    if mode == "dapo":
        return loss.sum() / mask.sum().clamp(min=1).to(loss.dtype)
    return loss.sum() / max(batch * (length if max_len is None else max_len), 1)


# ----------------------------------------------------------------------------------------------
# PPO losses
# ----------------------------------------------------------------------------------------------


def ppo_policy_loss(
    logps: torch.Tensor,
    old_logps: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    clip: float = 0.2,
    clip_high: float | None = None,
    dual_clip: float | None = None,
    loss_agg: str = "token_mean",
    max_len: int | None = None,
) -> tuple[torch.Tensor, Metrics]:
    """PPO clipped surrogate policy loss (Schulman et al. 2017, eq. 7; §8).

    Per token, with ρ = exp(logp − logp_old):

        ℓ = max(−A·ρ, −A·clip(ρ, 1 − ε, 1 + ε_high))

    and with a dual clip c > 1 (Ye et al. 2020, "Mastering Complex Control in MOBA Games with
    Deep RL", eq. 5), for A < 0 only: ℓ ← min(ℓ, −A·c), which bounds the loss when ρ ≫ 1.
    Asymmetric ``clip_high`` is DAPO's "clip-higher" (Yu et al. 2025). The per-token loss is
    aggregated by ``aggregate_token_loss`` (``loss_agg``, masked token mean by default).

    Args:
        logps: ``[B, T]`` log-probabilities under the current policy (carries the gradient).
        old_logps: ``[B, T]`` log-probabilities at rollout time (treated as constants).
        advantages: ``[B, T]`` advantages (treated as constants), e.g. whitened GAE.
        mask: ``[B, T]`` bool or 0/1, response tokens.
        clip: ε in (0, 1).
        clip_high: upper ε (> 0); defaults to ``clip``.
        dual_clip: c > 1 or None (off).
        loss_agg: an ``aggregate_token_loss`` mode; "token_mean" (= "dapo") by default.
        max_len: the constant of the "dr_grpo" / "seq_mean_token_sum_norm" mode.

    Returns:
        ``(loss, metrics)``; loss 0-d float32 (float64 for float64 inputs). Metrics:
        ``policy/approx_kl`` (½·masked mean (logp − logp_old)²), ``policy/clipfrac`` (fraction of
        masked tokens where the clipped branch is strictly active), ``policy/ratio_mean``,
        ``policy/dual_clipfrac`` (only with ``dual_clip``).
    """
    _check_tokens("logps", logps)
    _check_tokens("old_logps", old_logps, like=logps, like_name="logps")
    _check_tokens("advantages", advantages, like=logps, like_name="logps")
    mask = _as_bool_mask(mask, logps, "logps")
    low, high = _check_clip(clip, clip_high)
    dual_clip = _check_dual_clip(dual_clip)
    _check_aggregation("loss_agg", loss_agg)

    dtype = compute_dtype(logps, old_logps, advantages)
    log_ratio = _zero_outside(logps.to(dtype) - old_logps.detach().to(dtype), mask)
    adv = _zero_outside(advantages.detach().to(dtype), mask)
    ratio = torch.exp(log_ratio)
    unclipped = -adv * ratio
    clipped = -adv * ratio.clamp(1.0 - low, 1.0 + high)
    per_token = torch.maximum(unclipped, clipped)
    metrics = {
        "policy/approx_kl": metric(0.5 * masked_mean(log_ratio.detach() ** 2, mask)),
        "policy/clipfrac": metric(masked_mean((clipped > unclipped).to(dtype), mask)),
        "policy/ratio_mean": metric(masked_mean(ratio.detach(), mask)),
    }
    if dual_clip is not None:
        bound = -adv * dual_clip
        dual_active = (adv < 0) & (per_token > bound)
        per_token = torch.where(adv < 0, torch.minimum(per_token, bound), per_token)
        metrics["policy/dual_clipfrac"] = metric(masked_mean(dual_active.to(dtype), mask))
    loss = aggregate_token_loss(per_token, mask, mode=loss_agg, max_len=max_len)
    return loss, metrics


def ppo_value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    *,
    clip: float | None = 0.2,
    loss_agg: str = "token_mean",
    max_len: int | None = None,
) -> tuple[torch.Tensor, Metrics]:
    """Clipped value loss of PPO (Schulman et al. 2017; the OpenAI baselines / Ziegler 2019 form).

    Per token, with V_clip = clip(V, V_old − ε, V_old + ε):

        ℓ = ½ · max((V − R)², (V_clip − R)²)

    aggregated by ``aggregate_token_loss`` (masked token mean by default, as in §8).

    Args:
        values: ``[B, T]`` current value predictions (carries the gradient).
        old_values: ``[B, T]`` values at rollout time (constants).
        returns: ``[B, T]`` return targets R = A + V_old (constants).
        mask: ``[B, T]`` bool or 0/1.
        clip: ε_v > 0, or None for the plain squared error ½·(V − R)².
        loss_agg, max_len: as in ``ppo_policy_loss``.

    Returns:
        ``(loss, metrics)`` with metrics ``value/clipfrac`` (fraction of masked tokens where the
        clipped error is the larger), ``value/mean`` (masked mean V), ``value/error`` (masked mean
        of (V − R)²).
    """
    _check_tokens("values", values)
    _check_tokens("old_values", old_values, like=values, like_name="values")
    _check_tokens("returns", returns, like=values, like_name="values")
    mask = _as_bool_mask(mask, values, "values")
    if clip is not None:
        clip = check_positive("clip", clip)
    _check_aggregation("loss_agg", loss_agg)

    dtype = compute_dtype(values, old_values, returns)
    v = _zero_outside(values.to(dtype), mask)
    v_old = _zero_outside(old_values.detach().to(dtype), mask)
    ret = _zero_outside(returns.detach().to(dtype), mask)
    error = (v - ret) ** 2
    if clip is None:
        per_token = error
        clipfrac = torch.zeros((), dtype=dtype, device=v.device)
    else:
        v_clipped = v_old + (v - v_old).clamp(-clip, clip)
        error_clipped = (v_clipped - ret) ** 2
        per_token = torch.maximum(error, error_clipped)
        clipfrac = masked_mean((error_clipped > error).to(dtype), mask)
    loss = 0.5 * aggregate_token_loss(per_token, mask, mode=loss_agg, max_len=max_len)
    metrics = {
        "value/clipfrac": metric(clipfrac),
        "value/mean": metric(masked_mean(v.detach(), mask)),
        "value/error": metric(masked_mean(error.detach(), mask)),
    }
    return loss, metrics


def ppo_total_loss(
    policy_loss: torch.Tensor,
    value_loss: torch.Tensor,
    entropy: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    *,
    vf_coef: float = 0.1,
    ent_coef: float = 0.0,
) -> tuple[torch.Tensor, Metrics]:
    """The PPO objective to minimise: L_pg + c_v·L_v − c_ent·(masked mean entropy) (§8; Schulman
    et al. 2017, eq. 9).

    Args:
        policy_loss, value_loss: 0-d losses from ``ppo_policy_loss`` and ``ppo_value_loss``.
        entropy: ``[B, T]`` per-token entropies, or None (no bonus; then ``ent_coef`` is unused).
        mask: ``[B, T]`` bool or 0/1; required with ``entropy``.
        vf_coef: c_v ≥ 0 (0.1 as in TRL's PPO).
        ent_coef: c_ent ≥ 0.

    Returns:
        ``(loss, metrics)`` with ``loss/policy``, ``loss/value``, ``loss/total`` and, with
        ``entropy``, ``policy/entropy``.
    """
    for name, value in (("policy_loss", policy_loss), ("value_loss", value_loss)):
        check_float_tensor(name, value)
        if value.dim() != 0:
            raise ValueError(f"{name} must be a 0-d tensor, got shape {tuple(value.shape)}")
    vf_coef = check_non_negative("vf_coef", vf_coef)
    ent_coef = check_non_negative("ent_coef", ent_coef)
    total = policy_loss + vf_coef * value_loss
    metrics = {"loss/policy": metric(policy_loss), "loss/value": metric(value_loss)}
    if entropy is not None:
        _check_tokens("entropy", entropy)
        if mask is None:
            raise ValueError("mask is required when entropy is given")
        mean_entropy = masked_mean(entropy, mask)
        total = total - ent_coef * mean_entropy
        metrics["policy/entropy"] = metric(mean_entropy)
    metrics["loss/total"] = metric(total)
    return total, metrics
