"""Policy, value, entropy and REINFORCE losses with token-level averaging.

See ``docs/method.md`` §5 (PPO's actor and critic, REINFORCE "vanilla") and ``docs/rl.md``.

Averaging: every loss is ``sum over action tokens of the micro-batch / number of action tokens`` (the
reference's token-level mean, not a mean of per-sequence means). Each function returns a
:class:`LossOutput` that carries both the micro-batch mean (``loss``) and the pieces ``(loss_sum,
num_tokens)``: a trainer that wants one average over a *global* batch split into micro-batches and
data-parallel ranks backpropagates ``loss_sum / global_num_tokens`` instead (with ``global_num_tokens``
all-reduced beforehand).

Inputs follow the action-aligned convention of :mod:`megatron_qrm.rl.advantages`: ``[N, T]`` tensors,
column ``t`` belongs to action ``a_t``; ``action_mask`` is 1 on generated tokens (EOS included). Padding
is read through ``torch.where`` so NaN / inf there affects neither the loss nor its gradient.
Computation is in float32 (bf16 log-probs are up-cast; ``exp`` of a bf16 log-ratio is too coarse for a
0.2 clip range).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

from megatron_qrm.rl.kl import entropy_from_logits, vocab_parallel_entropy

__all__ = [
    "LossOutput",
    "entropy_bonus",
    "entropy_from_logits",
    "masked_sum_count",
    "ppo_policy_loss",
    "reinforce_loss",
    "value_loss",
    "vocab_parallel_entropy",
]


@dataclass
class LossOutput:
    """A token-averaged loss over one micro-batch.

    Attributes:
        loss: 0-dim, ``loss_sum / max(num_tokens, 1)`` (differentiable).
        loss_sum: 0-dim, sum of the per-token losses over action tokens (differentiable).
        num_tokens: 0-dim float, number of action tokens.
        stats: detached 0-dim diagnostics. Keys ending in ``_mean``/``frac`` or named ``approx_kl*`` are
            token means over this micro-batch (multiply by ``num_tokens`` to aggregate exactly); ``*_max``
            / ``*_min`` must be aggregated with max / min.
    """

    loss: torch.Tensor
    loss_sum: torch.Tensor
    num_tokens: torch.Tensor
    stats: dict[str, torch.Tensor] = field(default_factory=dict)


def _float(x: torch.Tensor) -> torch.Tensor:
    return x if x.dtype == torch.float64 else x.float()


def _check(x: torch.Tensor, mask: torch.Tensor, what: str) -> None:
    if x.shape != mask.shape:
        raise ValueError(f"{what}: expected the mask's shape {tuple(mask.shape)}, got {tuple(x.shape)}")


def _masked(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    x = _float(x)
    return torch.where(mask, x, torch.zeros((), dtype=x.dtype, device=x.device))


def masked_sum_count(x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(sum of x over masked entries, number of masked entries)``, both 0-dim float.

    Args:
        x: ``[N, T]`` per-token values.
        mask: ``[N, T]`` 0/1 (float or bool).
    """
    _check(x, mask, "masked_sum_count")
    m = mask.bool()
    xm = _masked(x, m)
    return xm.sum(), m.sum().to(xm.dtype)


def _token_mean(per_token: torch.Tensor, m: torch.Tensor, stats: dict[str, torch.Tensor]) -> LossOutput:
    loss_sum, count = masked_sum_count(per_token, m)
    # clamp: a micro-batch without action tokens gives loss 0 (with a zero gradient), not 0/0
    return LossOutput(loss=loss_sum / count.clamp_min(1.0), loss_sum=loss_sum, num_tokens=count, stats=stats)


@torch.no_grad()
def _mean_stat(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    s, c = masked_sum_count(x.detach(), m)
    return s / c.clamp_min(1.0)


@torch.no_grad()
def _extreme_stat(x: torch.Tensor, m: torch.Tensor, largest: bool) -> torch.Tensor:
    """Max (or min) of ``x`` over masked entries; 0 when nothing is masked (no host sync needed)."""
    x = _float(x.detach())
    fill = -float("inf") if largest else float("inf")
    filled = torch.where(m, x, torch.full_like(x, fill))
    ext = filled.max() if largest else filled.min()
    return torch.where(m.any(), ext, torch.zeros_like(ext))


# --------------------------------------------------------------------------------------------------
# PPO actor
# --------------------------------------------------------------------------------------------------


def ppo_policy_loss(
    logp: torch.Tensor,
    logp_old: torch.Tensor,
    advantages: torch.Tensor,
    action_mask: torch.Tensor,
    clip_eps: float = 0.2,
    clip_eps_high: Optional[float] = None,
    token_weights: Optional[torch.Tensor] = None,
) -> LossOutput:
    """PPO clipped surrogate ``-mean_t min(rho_t A_t, clip(rho_t, 1-eps, 1+eps) A_t)`` (``docs/method.md`` §5).

    ``rho_t = exp(logp - logp_old)``. The advantages are used as given (no whitening — the reference does
    none) and detached.

    Args:
        logp: ``[N, T]`` current-policy log-probs of the sampled actions (requires grad).
        logp_old: ``[N, T]`` behaviour-policy log-probs (rollout time).
        advantages: ``[N, T]``.
        action_mask: ``[N, T]`` 0/1.
        clip_eps: lower clip range (and upper, unless ``clip_eps_high`` is given).
        clip_eps_high: optional asymmetric upper clip range ("clip-higher"); ``None`` = ``clip_eps``.
        token_weights: optional ``[N, T]`` detached per-token weights multiplying the surrogate (the
            rollout-engine importance weights of :func:`truncated_is_weights`).

    Returns:
        :class:`LossOutput`; ``stats``:
        ``clip_frac`` — fraction of tokens whose clipped term is the minimum *and* differs from the
        unclipped one (the gradient is zeroed there); ``ratio_outside_frac`` — fraction with rho outside
        the clip interval; ``approx_kl`` — mean of ``0.5 * (logp - logp_old)^2`` (what the reference logs);
        ``approx_kl_k3`` — mean of ``exp(d) - 1 - d`` with ``d = logp - logp_old`` (k3 estimate of
        ``KL(pi_old || pi_theta)``, unbiased for actions drawn from pi_old); ``ratio_mean``, ``ratio_max``,
        ``ratio_min``; ``advantage_mean``.
    """
    for t, name in ((logp, "logp"), (logp_old, "logp_old"), (advantages, "advantages")):
        _check(t, action_mask, f"ppo_policy_loss({name})")
    m = action_mask.bool()
    high = clip_eps if clip_eps_high is None else clip_eps_high
    # zero the log-ratio on padding *before* exp so inf/NaN there cannot produce inf * 0 = NaN
    log_ratio = _masked(logp, m) - _masked(logp_old, m).detach()
    ratio = torch.exp(log_ratio)
    adv = _masked(advantages, m).detach()
    surr = ratio * adv
    surr_clipped = ratio.clamp(1.0 - clip_eps, 1.0 + high) * adv
    per_token = -torch.minimum(surr, surr_clipped)
    if token_weights is not None:
        per_token = per_token * _masked(token_weights, m).detach()
    with torch.no_grad():
        lr = log_ratio.detach()
        r = ratio.detach()
        stats = {
            "clip_frac": _mean_stat((surr_clipped < surr).float(), m),
            "ratio_outside_frac": _mean_stat(((r < 1.0 - clip_eps) | (r > 1.0 + high)).float(), m),
            "approx_kl": _mean_stat(0.5 * lr.square(), m),
            "approx_kl_k3": _mean_stat(torch.expm1(lr) - lr, m),
            "ratio_mean": _mean_stat(r, m),
            "ratio_max": _extreme_stat(r, m, largest=True),
            "ratio_min": _extreme_stat(r, m, largest=False),
            "advantage_mean": _mean_stat(adv, m),
        }
    return _token_mean(per_token, m, stats)


# --------------------------------------------------------------------------------------------------
# critic
# --------------------------------------------------------------------------------------------------


def value_loss(
    values: torch.Tensor,
    returns: torch.Tensor,
    action_mask: torch.Tensor,
    clip_eps: Optional[float] = None,
    values_old: Optional[torch.Tensor] = None,
) -> LossOutput:
    """Critic MSE ``mean_t (V_t - G_t)^2`` (no 1/2 factor, as the reference).

    With ``clip_eps`` (and ``values_old``) the PPO value clipping is applied:
    ``max((V - G)^2, (V_old + clip(V - V_old, -eps, eps) - G)^2)``. The reference uses no clipping.

    Args:
        values: ``[N, T]`` current critic values ``V(s_t)`` (requires grad).
        returns: ``[N, T]`` targets (detached).
        action_mask: ``[N, T]`` 0/1.
        clip_eps: value clip range, or ``None`` for plain MSE.
        values_old: ``[N, T]`` rollout-time values; required when ``clip_eps`` is set.

    Returns:
        :class:`LossOutput`; ``stats``: ``value_mean``, ``return_mean``, ``value_error_mean`` (mean of
        the unclipped squared error) and, when clipping, ``value_clip_frac`` (tokens where the clipped
        error is the larger one).
    """
    _check(values, action_mask, "value_loss(values)")
    _check(returns, action_mask, "value_loss(returns)")
    m = action_mask.bool()
    v = _masked(values, m)
    g = _masked(returns, m).detach()
    err = (v - g).square()
    stats: dict[str, torch.Tensor] = {}
    if clip_eps is not None:
        if values_old is None:
            raise ValueError("value_loss: clip_eps requires values_old")
        _check(values_old, action_mask, "value_loss(values_old)")
        v_old = _masked(values_old, m).detach()
        v_clipped = v_old + (v - v_old).clamp(-clip_eps, clip_eps)
        err_clipped = (v_clipped - g).square()
        per_token = torch.maximum(err, err_clipped)
        stats["value_clip_frac"] = _mean_stat((err_clipped > err).float(), m)
    else:
        per_token = err
    stats.update(
        value_mean=_mean_stat(v, m),
        return_mean=_mean_stat(g, m),
        value_error_mean=_mean_stat(err, m),
    )
    return _token_mean(per_token, m, stats)


# --------------------------------------------------------------------------------------------------
# entropy
# --------------------------------------------------------------------------------------------------


def entropy_bonus(
    entropy: torch.Tensor,
    action_mask: torch.Tensor,
    coef: float,
) -> LossOutput:
    """Loss term ``-coef * mean_t H(pi(.|s_t))``: add it to the policy loss to *encourage* entropy.

    (The reference PPO uses no entropy bonus; ``coef = 0`` reproduces that.)

    Args:
        entropy: ``[N, T]`` per-state entropy, e.g. from :func:`entropy_from_logits` or
            :func:`vocab_parallel_entropy` (differentiable).
        action_mask: ``[N, T]`` 0/1.
        coef: bonus coefficient.

    Returns:
        :class:`LossOutput`; ``stats``: ``entropy_mean``.
    """
    _check(entropy, action_mask, "entropy_bonus")
    m = action_mask.bool()
    per_token = -coef * _masked(entropy, m)
    return _token_mean(per_token, m, {"entropy_mean": _mean_stat(entropy, m)})


# --------------------------------------------------------------------------------------------------
# REINFORCE
# --------------------------------------------------------------------------------------------------


def reinforce_loss(
    logp: torch.Tensor,
    returns: torch.Tensor,
    action_mask: torch.Tensor,
    token_weights: Optional[torch.Tensor] = None,
) -> LossOutput:
    """Vanilla REINFORCE (``docs/method.md`` §5): ``-mean_t G_t * log pi(a_t|s_t)`` over action tokens.

    No baseline, no ratio, no clipping, no KL — each token's log-prob is weighted by its own return
    (:func:`megatron_qrm.rl.advantages.reinforce_returns_qrm` / ``reinforce_returns_orm``).

    Args:
        logp: ``[N, T]`` current-policy log-probs of the sampled actions (requires grad).
        returns: ``[N, T]`` per-token returns (detached).
        action_mask: ``[N, T]`` 0/1.
        token_weights: optional ``[N, T]`` detached per-token weights (:func:`truncated_is_weights`).

    Returns:
        :class:`LossOutput`; ``stats``: ``return_mean``, ``logp_mean``.
    """
    _check(logp, action_mask, "reinforce_loss(logp)")
    _check(returns, action_mask, "reinforce_loss(returns)")
    m = action_mask.bool()
    g = _masked(returns, m).detach()
    lp = _masked(logp, m)
    per_token = -g * lp
    if token_weights is not None:
        per_token = per_token * _masked(token_weights, m).detach()
    return _token_mean(per_token, m, {"return_mean": _mean_stat(g, m), "logp_mean": _mean_stat(lp, m)})


# --------------------------------------------------------------------------------------------------
# rollout-engine mismatch
# --------------------------------------------------------------------------------------------------


@torch.no_grad()
def truncated_is_weights(logp_old: torch.Tensor, behaviour_logp: torch.Tensor, action_mask: torch.Tensor,
                         cap: float) -> torch.Tensor:
    """Truncated importance-sampling weights for sampling with another engine than the trainer's
    (``--rollout-is-correction``, as verl's / slime's TIS):

        w_t = min(exp(logp_old_t - behaviour_logp_t), cap)     on action tokens, 0 elsewhere

    ``logp_old`` is the trainer's (Megatron) recomputed log-prob of the sampled token, ``behaviour_logp``
    the rollout engine's (vLLM) at sampling time; the policy loss of each token is multiplied by ``w_t``
    (detached), correcting the expectation for tokens drawn from the engine's slightly different
    distribution; the cap bounds the variance. Shapes ``[N, T]``.
    """
    if not cap > 0:
        raise ValueError(f"--rollout-is-cap {cap}: must be positive")
    m = action_mask.bool()
    d = _masked(logp_old, m) - _masked(behaviour_logp, m)
    return torch.where(m, torch.exp(d).clamp(max=cap), torch.zeros((), dtype=d.dtype, device=d.device))
