"""Sampled KL estimators, the KL coefficient's controllers and KL-shaped rewards (RLHF's PPO).

``kl_penalty`` estimates KL(π_θ ‖ π_ref) at the sampled tokens (Schulman 2020); the exact KL over
the whole vocabulary is the ``linear_kl`` op. Controllers move the coefficient β between batches
(Ziegler et al. 2019); ``kl_shaped_rewards`` spreads −β·KL over the response tokens and adds the
score on the last one.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from fastalign.losses._common import compute_dtype
from fastalign.losses.masked import zero_outside
from fastalign.ops._checks import (
    check_choice,
    check_float_tensor,
    check_non_negative,
    check_per_token,
    check_positive,
    check_token_mask,
)

KL_ESTIMATORS = ("k1", "k2", "k3", "abs")


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
    check_per_token("ref_logps", ref_logps, like=logps, like_name="logps")
    check_choice("estimator", estimator, KL_ESTIMATORS)
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
    check_per_token("logps", logps)
    check_per_token("ref_logps", ref_logps, like=logps, like_name="logps")
    mask = check_token_mask(mask, logps, "logps")
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
        non_score = zero_outside(-kl_coef * kl, mask)
        rewards = non_score.clone()
        if mask.shape[1] > 0:
            # Index of the last masked position of each row (−1 when the row has none).
            positions = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
            last = torch.where(mask, positions, -1).amax(dim=1)
            score = torch.where(last >= 0, scores.detach().to(dtype), 0)
            rewards.scatter_add_(1, last.clamp(min=0).unsqueeze(1), score.unsqueeze(1))
    return ShapedRewards(rewards, non_score)
