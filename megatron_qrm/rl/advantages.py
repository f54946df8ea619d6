"""Reward shaping, advantages and returns for PPO / REINFORCE with token-level reward models.

See ``docs/method.md`` §5 (Algorithm 1, the paper's PPO with Q-RM; REINFORCE) and ``docs/rl.md`` "Differences
from the reference code" (what the reference code does instead, D1-D4; GAE for the ORM / DPO-RM baselines).

Batch convention
----------------
A rollout batch of ``N`` sequences is right-padded to ``T`` columns. ``action_mask`` ``[N, T]`` is 1 at
every column ``t`` whose action ``a_t`` is a generated response token (the EOS included) and 0 on prompt
and padding. Every per-token tensor is aligned to actions:

* ``token_rewards[:, t]`` — the reward model's credit for ``(s_t, a_t)`` (Q-RM ``Z(s_t, a_t)``, read at the
  hidden state of ``a_t`` itself; or a DPO-RM log-ratio);
* ``values[:, t]`` — the critic's ``V(s_t)``, the state *before* ``a_t`` (the reference reads the value at
  the post-action position during collection, D5; producing the right column is the caller's job);
* ``logp_old[:, t]``, ``logp_ref[:, t]`` — ``log pi(a_t | s_t)`` under the behaviour / reference policy;
* ``kl[:, t]`` — any per-token KL estimate at ``s_t`` (:mod:`megatron_qrm.rl.kl`).

Masking: every function reads inputs only where ``action_mask`` is 1 (``torch.where``, not multiplication,
so NaN / inf garbage on padding can never leak in) and returns exact zeros elsewhere. Batch statistics are
over *all action tokens of the batch* (not per sequence), optionally over a data-parallel ``group`` so
that the statistics of a rollout batch sharded over DP ranks are those of the whole batch, as in the paper.

Degenerate batches: when a standard deviation is ``<= eps`` (e.g. every reward equal — the reference
divides by zero there) the normalised quantity is defined as 0 instead of dividing.

Everything is computed in float32 (float64 inputs stay float64) and without gradient tracking concerns:
these are rollout-time quantities; callers run them under ``torch.no_grad()``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

__all__ = [
    "AdvantageOutput",
    "add_kl_penalty",
    "dpo_token_rewards",
    "gae_advantages",
    "last_action_mask",
    "masked_mean_std",
    "normalize_by_std",
    "orm_token_rewards",
    "qrm_advantages",
    "qrm_reference_advantages",
    "reinforce_returns_orm",
    "reinforce_returns_qrm",
]


@dataclass
class AdvantageOutput:
    """Advantages and critic targets for one rollout batch.

    Attributes:
        advantages: ``[N, T]`` float, 0 outside ``action_mask``.
        returns: ``[N, T]`` float critic regression targets, 0 outside ``action_mask``.
        reward_mean: 0-dim, the mean subtracted from the token rewards (0 when not centred); ``None`` when
            the estimator does not normalise rewards (GAE).
        reward_std: 0-dim, the std the token rewards were divided by (before the ``eps`` guard); ``None``
            when not normalised.
        value_std: 0-dim, the std the values were divided by (reference variant only), else ``None``.
    """

    advantages: torch.Tensor
    returns: torch.Tensor
    reward_mean: Optional[torch.Tensor] = None
    reward_std: Optional[torch.Tensor] = None
    value_std: Optional[torch.Tensor] = None


# --------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------


def _float(x: torch.Tensor) -> torch.Tensor:
    return x if x.dtype == torch.float64 else x.float()


def _check(x: torch.Tensor, mask: torch.Tensor, what: str) -> None:
    if x.dim() != 2 or x.shape != mask.shape:
        raise ValueError(f"{what}: expected [N, T] tensors of the mask's shape {tuple(mask.shape)}, got {tuple(x.shape)}")


def _masked(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``x`` (float) with exact zeros where ``mask == 0`` — NaN/inf on padding cannot survive."""
    x = _float(x)
    return torch.where(mask.bool(), x, torch.zeros((), dtype=x.dtype, device=x.device))


def _all_reduce(x: torch.Tensor, group: Optional[dist.ProcessGroup]) -> torch.Tensor:
    """Sum over ``group`` (no-op without an initialised process group or with ``group=None``)."""
    if group is None or not (dist.is_available() and dist.is_initialized()) or dist.get_world_size(group) == 1:
        return x
    x = x.clone()
    dist.all_reduce(x, op=dist.ReduceOp.SUM, group=group)
    return x


def _safe_scale(x: torch.Tensor, std: torch.Tensor, eps: float) -> torch.Tensor:
    """``x / std``, or zeros when ``std <= eps`` (all values equal: no information, and no 1/0)."""
    inv = torch.where(std > eps, 1.0 / std.clamp_min(eps), torch.zeros_like(std))
    return x * inv


def masked_mean_std(
    x: torch.Tensor,
    mask: torch.Tensor,
    group: Optional[dist.ProcessGroup] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and *population* std of ``x`` over every masked entry of the batch (not per row).

    Two passes (mean first, then the mean squared deviation) rather than ``E[x^2] - E[x]^2``, which
    cancels catastrophically in float32 when the rewards have a large common offset.

    Args:
        x: ``[N, T]`` (any shape equal to ``mask``'s) values.
        mask: same shape, 0/1 (float or bool).
        group: optional process group (data parallel) over which the batch is sharded; sums and counts are
            all-reduced so every rank gets the statistics of the whole batch.

    Returns:
        ``(mean, std)`` 0-dim float tensors; both 0 when no entry is masked.
    """
    if x.shape != mask.shape:
        raise ValueError(f"masked_mean_std: shape mismatch {tuple(x.shape)} vs {tuple(mask.shape)}")
    xm = _masked(x, mask)
    count = mask.bool().sum().to(xm.dtype)
    sum_count = _all_reduce(torch.stack([xm.sum(), count]), group)
    n = sum_count[1].clamp_min(1.0)
    mean = sum_count[0] / n
    dev = torch.where(mask.bool(), xm - mean, torch.zeros_like(xm))
    var = _all_reduce(dev.square().sum(), group) / n
    return mean, var.sqrt()


def last_action_mask(action_mask: torch.Tensor) -> torch.Tensor:
    """``[N, T]`` bool, True at the last action of each row (the EOS, or the last kept token when cut).

    Args:
        action_mask: ``[N, T]`` 0/1.

    Returns:
        ``[N, T]`` bool with at most one True per row (none for rows without actions).
    """
    m = action_mask.bool()
    n_cols = m.shape[-1]
    # (column + 1) on actions, 0 elsewhere: the argmax is the last action; empty rows are masked out below
    pos = torch.arange(1, n_cols + 1, device=m.device).expand_as(m)
    last = torch.where(m, pos, torch.zeros_like(pos)).argmax(dim=-1, keepdim=True)  # [N, 1]
    onehot = torch.zeros_like(m).scatter_(-1, last, True)
    return onehot & m.any(dim=-1, keepdim=True)


def normalize_by_std(
    rewards: torch.Tensor,
    mask: torch.Tensor,
    center: bool = False,
    eps: float = 1e-8,
    group: Optional[dist.ProcessGroup] = None,
) -> torch.Tensor:
    """Divide rewards by their population std over all masked tokens of the batch (reference default).

    Args:
        rewards: ``[N, T]``.
        mask: ``[N, T]`` 0/1 action mask.
        center: also subtract the batch mean (the paper's standardisation, D1).
        eps: std at or below which the result is all zeros.
        group: optional data-parallel group for the statistics.

    Returns:
        ``[N, T]`` float, 0 outside ``mask``.
    """
    _check(rewards, mask, "normalize_by_std")
    mean, std = masked_mean_std(rewards, mask, group)
    x = _masked(rewards, mask)
    if center:
        x = x - mean
    return _masked(_safe_scale(x, std, eps), mask)


# --------------------------------------------------------------------------------------------------
# PPO with Q-RM
# --------------------------------------------------------------------------------------------------


def qrm_advantages(
    token_rewards: torch.Tensor,
    values: torch.Tensor,
    kl: torch.Tensor,
    action_mask: torch.Tensor,
    kl_coef: float = 0.01,
    eps: float = 1e-8,
    group: Optional[dist.ProcessGroup] = None,
) -> AdvantageOutput:
    """The paper's Algorithm 1 (``docs/method.md`` §5 "PPO"): advantages without GAE.

        Z_std = (Z - mu) / sigma        (mu, sigma over all action tokens of the batch, population std)
        A_t   = Z_std(s_t, a_t) - kl_coef * KL(s_t) - V(s_t)
        G_t   = Z_std(s_t, a_t)         (critic target; the KL term is *not* part of it)

    Args:
        token_rewards: ``[N, T]`` Q-RM credits ``Z(s_t, a_t)``.
        values: ``[N, T]`` critic values ``V(s_t)``.
        kl: ``[N, T]`` per-token KL at ``s_t`` — Algorithm 1 uses the full-distribution KL
            (:func:`megatron_qrm.rl.kl.full_kl`); any estimator is accepted. It is a constant of the
            policy update (the advantages are detached by :func:`megatron_qrm.rl.losses.ppo_policy_loss`).
        action_mask: ``[N, T]`` 0/1.
        kl_coef: beta of Algorithm 1.
        eps: sigma at or below which ``Z_std`` is 0 (all rewards equal).
        group: optional data-parallel group for mu and sigma.

    Returns:
        :class:`AdvantageOutput` with ``reward_mean = mu`` and ``reward_std = sigma``.
    """
    for t, name in ((token_rewards, "token_rewards"), (values, "values"), (kl, "kl")):
        _check(t, action_mask, f"qrm_advantages({name})")
    mu, sigma = masked_mean_std(token_rewards, action_mask, group)
    z_std = _masked(_safe_scale(_masked(token_rewards, action_mask) - mu, sigma, eps), action_mask)
    adv = z_std - kl_coef * _masked(kl, action_mask) - _masked(values, action_mask)
    return AdvantageOutput(advantages=_masked(adv, action_mask), returns=z_std, reward_mean=mu, reward_std=sigma)


def qrm_reference_advantages(
    token_rewards: torch.Tensor,
    values: torch.Tensor,
    logp_old: torch.Tensor,
    logp_ref: torch.Tensor,
    action_mask: torch.Tensor,
    kl_coef: float = 0.01,
    value_coef: float = 0.01,
    eps: float = 1e-8,
    group: Optional[dist.ProcessGroup] = None,
) -> AdvantageOutput:
    """The reference code's Q-RM advantages (differences D1-D4 from Algorithm 1: ``docs/rl.md``).

        r_t = Z_t / sigma_Z - kl_coef * |logp_old - logp_ref|     (KL subtracted *after* scaling)
        A_t = r_t - value_coef * V_t / sigma_V
        G_t = r_t                                                 (critic target includes the KL term)

    ``sigma_Z``, ``sigma_V``: population std over all action tokens of the batch; the values are *not*
    centred before dividing (the std itself is the usual centred std).

    Args:
        token_rewards: ``[N, T]`` Q-RM credits ``Z``.
        values: ``[N, T]`` critic values.
        logp_old: ``[N, T]`` behaviour-policy log-probs of the sampled actions.
        logp_ref: ``[N, T]`` reference-policy log-probs of the same actions.
        action_mask: ``[N, T]`` 0/1.
        kl_coef: lambda (0.01 in the PPO script; the code default is 0.1).
        value_coef: c_V (hard-coded 0.01 in the reference).
        eps: guard for sigma_Z / sigma_V (0 => the scaled quantity is 0).
        group: optional data-parallel group for the statistics.

    Returns:
        :class:`AdvantageOutput` with ``reward_mean = 0``, ``reward_std = sigma_Z``, ``value_std = sigma_V``.
    """
    for t, name in ((token_rewards, "token_rewards"), (values, "values"), (logp_old, "logp_old"),
                    (logp_ref, "logp_ref")):
        _check(t, action_mask, f"qrm_reference_advantages({name})")
    _, sigma_z = masked_mean_std(token_rewards, action_mask, group)
    _, sigma_v = masked_mean_std(values, action_mask, group)
    kl = (_masked(logp_old, action_mask) - _masked(logp_ref, action_mask)).abs()
    r = _safe_scale(_masked(token_rewards, action_mask), sigma_z, eps) - kl_coef * kl
    v_scaled = _safe_scale(_masked(values, action_mask), sigma_v, eps)
    adv = r - value_coef * v_scaled
    return AdvantageOutput(
        advantages=_masked(adv, action_mask),
        returns=_masked(r, action_mask),
        reward_mean=torch.zeros_like(sigma_z),
        reward_std=sigma_z,
        value_std=sigma_v,
    )


# --------------------------------------------------------------------------------------------------
# GAE (baselines)
# --------------------------------------------------------------------------------------------------


def gae_advantages(
    rewards: torch.Tensor,
    values: torch.Tensor,
    action_mask: torch.Tensor,
    gamma: float = 0.9,
    lam: float = 0.8,
) -> AdvantageOutput:
    """Generalised advantage estimation over the masked response (the baselines' estimator, ``docs/rl.md``), vectorised over the batch.

    For action columns ``t`` (``m_t = 1``), computed backwards in time:

        delta_t = r_t + gamma * m_{t+1} * V_{t+1} - V_t
        A_t     = delta_t + gamma * lam * m_{t+1} * A_{t+1}
        G_t     = A_t + V_t

    Terminal treatment: the last action of a response (the EOS, or the last kept token of a response cut
    at the length limit) is terminal — its next value is 0, so ``A = r - V`` there. A response cut without
    an EOS is thus *not* bootstrapped, matching the reference. Any column with ``m = 0`` (prompt, padding,
    or a hole inside a row) ends the recursion: nothing flows across it, so right padding never
    contributes, and several responses packed into one row separated by non-action columns stay independent.

    Deliberate difference from the reference: the reference starts its backward loop at the second-to-last
    *window* column and fixes ``A = 0`` at the last window column. Its actions are stored at predicting
    positions, so that column can never be an action there; with our action-aligned tensors a response
    that fills the window does end in the last column, and we give that action its proper
    ``A = r - V`` (with the reference's rule its advantage would silently be 0 while its return is V).

    Args:
        rewards: ``[N, T]`` per-token rewards (shaped: e.g. ORM on the last action, DPO credits, minus a KL
            penalty — see :func:`orm_token_rewards`, :func:`dpo_token_rewards`, :func:`add_kl_penalty`).
        values: ``[N, T]`` raw critic values ``V(s_t)``.
        action_mask: ``[N, T]`` 0/1.
        gamma: discount (0.9 in the reference).
        lam: GAE lambda (0.8 in the reference).

    Returns:
        :class:`AdvantageOutput` (no reward statistics); advantages are not whitened (as the reference).
    """
    _check(rewards, action_mask, "gae_advantages(rewards)")
    _check(values, action_mask, "gae_advantages(values)")
    m = action_mask.bool()
    r = _masked(rewards, m)
    v = _masked(values, m).to(r.dtype)
    n_rows, n_cols = r.shape
    adv = torch.zeros_like(r)
    next_value = torch.zeros(n_rows, dtype=r.dtype, device=r.device)  # m_{t+1} * V_{t+1}
    next_adv = torch.zeros_like(next_value)  # m_{t+1} * A_{t+1}
    # the only loop: the recursion over time; each step is a vectorised update of all N rows
    for t in range(n_cols - 1, -1, -1):
        delta = r[:, t] + gamma * next_value - v[:, t]
        a_t = torch.where(m[:, t], delta + gamma * lam * next_adv, torch.zeros_like(delta))
        adv[:, t] = a_t
        # a non-action column carries zeros backwards (r, v and a_t are all 0 there)
        next_value = v[:, t]
        next_adv = a_t
    returns = _masked(adv + v, m)
    return AdvantageOutput(advantages=adv, returns=returns)


# --------------------------------------------------------------------------------------------------
# reward shaping for the baselines
# --------------------------------------------------------------------------------------------------


def orm_token_rewards(
    seq_rewards: torch.Tensor,
    action_mask: torch.Tensor,
    last_token_only: bool = True,
    normalize: bool = False,
    eps: float = 1e-8,
    group: Optional[dist.ProcessGroup] = None,
) -> torch.Tensor:
    """Place a sequence-level (ORM) score on the response's action tokens.

    Args:
        seq_rewards: ``[N]`` one score per sequence.
        action_mask: ``[N, T]`` 0/1.
        last_token_only: put the score on the final action only (EOS, or last kept token), 0 elsewhere;
            ``False`` broadcasts it to every action.
        normalize: reproduce the reference's ORM scaling (``docs/rl.md``): divide by the population std of the
            score *broadcast to every action token* (so long responses weigh more in sigma), computed before
            zeroing the non-final positions. (Normalising after placing with :func:`normalize_by_std` would
            instead take the std over a mostly-zero matrix.)
        eps: sigma guard for ``normalize``.
        group: optional data-parallel group for sigma.

    Returns:
        ``[N, T]`` float, 0 outside ``action_mask``.
    """
    if seq_rewards.dim() != 1 or seq_rewards.shape[0] != action_mask.shape[0]:
        raise ValueError(f"orm_token_rewards: seq_rewards must be [N={action_mask.shape[0]}], got {tuple(seq_rewards.shape)}")
    broadcast = _masked(_float(seq_rewards).unsqueeze(-1).expand(action_mask.shape), action_mask)
    if normalize:
        broadcast = normalize_by_std(broadcast, action_mask, center=False, eps=eps, group=group)
    if last_token_only:
        return _masked(broadcast, last_action_mask(action_mask))
    return broadcast


def dpo_token_rewards(
    logp_dpo: torch.Tensor,
    logp_ref_dpo: torch.Tensor,
    action_mask: torch.Tensor,
    beta: float = 0.1,
) -> torch.Tensor:
    """DPO-RM token credit ``beta * (log pi_DPO(a_t|s_t) - log pi_ref(a_t|s_t))`` on each action.

    Alignment: both inputs must be action-aligned like ``action_mask`` (column ``t`` holds the log-prob of
    action ``a_t``, i.e. the logits at ``s_t`` gathered at ``a_t``). Each action then gets *its own*
    log-ratio — this fixes the reference's off-by-one (Q4), where action ``k`` received the log-ratio of
    action ``k+1``, the first action's ratio was dropped and the EOS got the padding token's.

    Args:
        logp_dpo: ``[N, T]`` DPO-model log-probs of the sampled actions.
        logp_ref_dpo: ``[N, T]`` log-probs of the same actions under the DPO reference model.
        action_mask: ``[N, T]`` 0/1.
        beta: the DPO temperature (0.1).

    Returns:
        ``[N, T]`` float, 0 outside ``action_mask``.
    """
    _check(logp_dpo, action_mask, "dpo_token_rewards(logp_dpo)")
    _check(logp_ref_dpo, action_mask, "dpo_token_rewards(logp_ref_dpo)")
    return beta * (_masked(logp_dpo, action_mask) - _masked(logp_ref_dpo, action_mask))


def add_kl_penalty(
    rewards: torch.Tensor,
    kl: torch.Tensor,
    action_mask: torch.Tensor,
    kl_coef: float,
) -> torch.Tensor:
    """``rewards - kl_coef * kl`` on action tokens, 0 elsewhere (reward-side KL shaping, as the reference's baselines).

    Args:
        rewards: ``[N, T]`` token rewards.
        kl: ``[N, T]`` per-token KL estimate (the reference uses :func:`megatron_qrm.rl.kl.kl_abs`).
        action_mask: ``[N, T]`` 0/1.
        kl_coef: lambda.

    Returns:
        ``[N, T]`` float.
    """
    _check(rewards, action_mask, "add_kl_penalty(rewards)")
    _check(kl, action_mask, "add_kl_penalty(kl)")
    return _masked(rewards, action_mask) - kl_coef * _masked(kl, action_mask)


# --------------------------------------------------------------------------------------------------
# REINFORCE returns (docs/method.md §5 "REINFORCE")
# --------------------------------------------------------------------------------------------------


def reinforce_returns_qrm(
    token_rewards: torch.Tensor,
    action_mask: torch.Tensor,
    center: bool = True,
    eos_rescore: bool = False,
    eps: float = 1e-8,
    group: Optional[dist.ProcessGroup] = None,
) -> torch.Tensor:
    """Per-token REINFORCE return from Q-RM credits: the normalised credit of the token itself.

    ``center=True`` gives the paper's ``Z_std = (Z - mu) / sigma``; ``center=False`` the reference's
    ``Z / sigma`` (D1). With ``eos_rescore`` (reference behaviour) the final action's return is replaced by
    the mean of that response's normalised returns, the mean being taken *before* the replacement and
    including the final action's own value.

    Args:
        token_rewards: ``[N, T]`` Q-RM credits.
        action_mask: ``[N, T]`` 0/1.
        center: subtract the batch mean.
        eos_rescore: re-score the last action of each response with the response's mean.
        eps: sigma guard (all credits equal => returns 0).
        group: optional data-parallel group for mu / sigma (the per-response mean is always local).

    Returns:
        ``[N, T]`` float returns, 0 outside ``action_mask``.
    """
    _check(token_rewards, action_mask, "reinforce_returns_qrm")
    r = normalize_by_std(token_rewards, action_mask, center=center, eps=eps, group=group)
    if eos_rescore:
        count = action_mask.bool().sum(dim=-1, keepdim=True).to(r.dtype).clamp_min(1.0)
        row_mean = r.sum(dim=-1, keepdim=True) / count  # [N, 1], r is already 0 off the mask
        r = torch.where(last_action_mask(action_mask), row_mean.expand_as(r), r)
    return r


def reinforce_returns_orm(
    seq_rewards: torch.Tensor,
    action_mask: torch.Tensor,
    normalize: bool = True,
    eps: float = 1e-8,
    group: Optional[dist.ProcessGroup] = None,
) -> torch.Tensor:
    """Sequence reward broadcast to every action token of its response.

    With ``normalize`` the sequence rewards are standardised, ``(R - mean) / std`` (population std), over
    the batch's *sequences* (each counted once, whatever its length); sequences with no action do not enter
    the statistics.

    Args:
        seq_rewards: ``[N]`` per-sequence rewards.
        action_mask: ``[N, T]`` 0/1.
        normalize: standardise over sequences.
        eps: std guard (all equal => returns 0).
        group: optional data-parallel group for the statistics.

    Returns:
        ``[N, T]`` float, 0 outside ``action_mask``.
    """
    if seq_rewards.dim() != 1 or seq_rewards.shape[0] != action_mask.shape[0]:
        raise ValueError(f"reinforce_returns_orm: seq_rewards must be [N={action_mask.shape[0]}], got {tuple(seq_rewards.shape)}")
    has_action = action_mask.bool().any(dim=-1)  # [N]
    r = _masked(seq_rewards, has_action)
    if normalize:
        mean, std = masked_mean_std(r, has_action, group)
        r = _safe_scale(r - mean, std, eps)
    return _masked(r.unsqueeze(-1).expand(action_mask.shape), action_mask)
