"""Advantage estimators as a table: one function per (algorithm, advantage) choice, picked once per run.

Each estimator maps the gathered rollout quantities (:class:`EstimatorInputs`, every DP rank's rows) to an
:class:`~megatron_qrm.rl.advantages.AdvantageOutput` (advantages and critic targets ``[N, T]``), using the
math of :mod:`megatron_qrm.rl.advantages`. :func:`estimator_name` says which one a run uses, from the
algorithm, ``--advantage`` and the reward model's kind; the run configuration resolves it once
(:mod:`megatron_qrm.rl.run_setup`) and the trainer looks it up in :data:`ESTIMATORS`.

| name | used for | advantages | critic target |
|---|---|---|---|
| ``qrm`` | PPO + Q-RM (Algorithm 1) | ``Z_std - beta*KL - V`` | ``Z_std`` |
| ``qrm-reference`` | PPO + Q-RM, the reference code's variant | ``Z/sigma - beta*abs(dlogp) - c_V*V/sigma_V`` | ``r`` |
| ``gae`` | PPO + ORM / DPO-RM | GAE on sigma-normalised, KL-penalised shaped rewards | ``A + V`` |
| ``reinforce`` | REINFORCE + Q-RM / DPO-RM | standardised credits as token returns | same |
| ``reinforce-orm`` | REINFORCE + ORM | the standardised sequence reward on every token | same |
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

from megatron_qrm.errors import UserError
from megatron_qrm.rl import advantages as adv


@dataclass(frozen=True)
class EstimatorInputs:
    """The rollout batch of every data-parallel rank, ``[N, T]`` each (0 outside ``mask``).

    Attributes:
        rewards: per-token rewards: the credits of a Q-RM / DPO-RM, the ORM's sequence reward on the last
            action (zeros elsewhere).
        sequence_reward: ``[N]`` the ORM's sequence reward; None for token-level reward models.
        values: critic ``V(s_t)`` (zeros without a critic).
        kl: per-state KL(pi || pi_ref) (zeros without a reference model).
        logp_old: behaviour log-probs (qrm-reference only; zeros when absent).
        logp_ref: reference log-probs (qrm-reference only; ``logp_old`` when absent).
        mask: action mask, 1 at generated tokens.
    """

    rewards: torch.Tensor
    sequence_reward: Optional[torch.Tensor]
    values: torch.Tensor
    kl: torch.Tensor
    logp_old: torch.Tensor
    logp_ref: torch.Tensor
    mask: torch.Tensor


@dataclass(frozen=True)
class EstimatorSettings:
    """The hyperparameters estimators read (from the run's RLConfig)."""

    kl_coef: float
    value_coef: float
    gamma: float
    lam: float
    reinforce_center: bool
    eos_rescore: bool


Estimator = Callable[[EstimatorInputs, EstimatorSettings], adv.AdvantageOutput]


def _qrm(x: EstimatorInputs, s: EstimatorSettings) -> adv.AdvantageOutput:
    return adv.qrm_advantages(x.rewards, x.values, x.kl, x.mask, kl_coef=s.kl_coef)


def _qrm_reference(x: EstimatorInputs, s: EstimatorSettings) -> adv.AdvantageOutput:
    return adv.qrm_reference_advantages(x.rewards, x.values, x.logp_old, x.logp_ref, x.mask,
                                        kl_coef=s.kl_coef, value_coef=s.value_coef)


def _gae(x: EstimatorInputs, s: EstimatorSettings) -> adv.AdvantageOutput:
    # ORM: sigma over the score broadcast to every action (the reference's), then on the last token only
    shaped = (adv.orm_token_rewards(x.sequence_reward, x.mask, normalize=True) if x.sequence_reward is not None
              else adv.normalize_by_std(x.rewards, x.mask))
    shaped = adv.add_kl_penalty(shaped, x.kl, x.mask, s.kl_coef)
    return adv.gae_advantages(shaped, x.values, x.mask, gamma=s.gamma, lam=s.lam)


def _returns_only(returns: torch.Tensor) -> adv.AdvantageOutput:
    return adv.AdvantageOutput(advantages=returns, returns=returns)


def _reinforce(x: EstimatorInputs, s: EstimatorSettings) -> adv.AdvantageOutput:
    return _returns_only(adv.reinforce_returns_qrm(x.rewards, x.mask, center=s.reinforce_center,
                                                   eos_rescore=s.eos_rescore))


def _reinforce_orm(x: EstimatorInputs, s: EstimatorSettings) -> adv.AdvantageOutput:
    # centred (R - mean) / std over sequences; --no-reward-centering: the reference's broadcast reward
    # divided by sigma over tokens, uncentred (docs/rl.md)
    if s.reinforce_center:
        return _returns_only(adv.reinforce_returns_orm(x.sequence_reward, x.mask))
    return _returns_only(adv.orm_token_rewards(x.sequence_reward, x.mask, last_token_only=False, normalize=True))


ESTIMATORS: dict[str, Estimator] = {
    "qrm": _qrm,
    "qrm-reference": _qrm_reference,
    "gae": _gae,
    "reinforce": _reinforce,
    "reinforce-orm": _reinforce_orm,
}

#: ``--advantage`` choices of PPO (REINFORCE has none: its estimator follows from the reward model)
PPO_ADVANTAGES = ("qrm", "qrm-reference", "gae")


def estimator_name(algo: str, advantage: Optional[str], reward_kind: str) -> str:
    """The estimator of a run: REINFORCE by reward kind; PPO ``--advantage`` (default ``qrm`` for a Q-RM,
    ``gae`` for ORM / DPO-RM). Raises ``ValueError`` for a Q-RM advantage without a Q-RM."""
    if algo == "reinforce":
        return "reinforce-orm" if reward_kind == "orm" else "reinforce"
    name = advantage or ("qrm" if reward_kind == "qrm" else "gae")
    if name not in PPO_ADVANTAGES:
        raise UserError(f"--advantage {name}: choose one of {', '.join(PPO_ADVANTAGES)}")
    if name in ("qrm", "qrm-reference") and reward_kind != "qrm":
        raise UserError(f"--advantage {name} needs a Q-RM; the reward model is {reward_kind} (use --advantage gae)")
    return name
