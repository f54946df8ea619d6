"""The models of an RL run and how each starts: actor (trained), reference (frozen initial actor, PPO with KL),
reward model (frozen; a DPO-RM with its reference), critic (PPO; by default the reward model's backbone with
a fresh value head). All share one TP/PP layout."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from megatron_qrm import checkpointing
from megatron_qrm.config import ModelConfig
from megatron_qrm.errors import UserError
from megatron_qrm.models import LoRAConfig, PrecisionConfig, build_model
from megatron_qrm.models.lora import is_lora_param
from megatron_qrm.rl.config import RLConfig
from megatron_qrm.training.engine import build_optimizer, wrap_ddp


@dataclass
class Roles:
    """The models of one RL run (DDP-wrapped where trained)."""

    actor: torch.nn.Module
    """The policy being trained (DDP)."""
    actor_optimizer: object
    actor_scheduler: object
    reference: Optional[torch.nn.Module]
    """Frozen initial actor (PPO with ``kl_coef > 0``), else None."""
    reward: Optional[torch.nn.Module]
    """Frozen reward model (None with a rule-based reward)."""
    reward_reference: Optional[torch.nn.Module]
    """Reference of a fully fine-tuned DPO-RM (a LoRA DPO-RM's reference is its own base)."""
    critic: Optional[torch.nn.Module]
    """Value model (PPO, DDP), else None."""
    critic_optimizer: object = None
    critic_scheduler: object = None


def offload(model, on: bool, enabled: bool) -> None:
    """Move a frozen model off the GPU between the phases that use it (``--offload``)."""
    if enabled and torch.cuda.is_available() and model is not None:
        model.to("cuda" if on else "cpu")


def _without_lora(key: str) -> bool:
    return not is_lora_param(key)


def _frozen(model_cfg: ModelConfig, role: str, checkpoint: str, kw: dict, lora: Optional[LoRAConfig] = None,
            key_filter=None) -> torch.nn.Module:
    model = build_model(model_cfg, role, lora=lora, **kw)
    checkpointing.load_checkpoint(checkpoint, model, load_rng=False, model_key_filter=key_filter)
    return model.eval()


def _reward_models(cfg: RLConfig, rm_cfg: Optional[dict], kw: dict) -> tuple[Optional[torch.nn.Module],
                                                                           Optional[torch.nn.Module]]:
    """(reward model, DPO-RM reference or None)."""
    if rm_cfg is None:
        return None, None
    rm_model_cfg = ModelConfig.from_dict(rm_cfg["model"])
    rm_kind = rm_cfg.get("reward_loss", {}).get("kind", "qrm")
    rm_lora = LoRAConfig(**{k: (tuple(v) if k == "targets" else v) for k, v in rm_cfg.get("lora", {}).items()})
    reward = _frozen(rm_model_cfg, "policy" if rm_kind == "dpo" else "reward", cfg.reward_model, kw, lora=rm_lora)
    if rm_kind != "dpo" or rm_lora.enabled:
        return reward, None
    if not cfg.dpo_reference:
        raise UserError("the DPO-RM was fully fine-tuned: pass --reference-checkpoint with its reference model")
    return reward, _frozen(rm_model_cfg, "policy", cfg.dpo_reference, kw, key_filter=_without_lora)


def _critic(cfg: RLConfig, actor_cfg: dict, rm_cfg: Optional[dict], kw: dict):
    """(critic DDP, optimizer, scheduler); the backbone from ``critic_init``'s source with a fresh value head
    (as the paper and the reference re-initialise it), or a whole critic checkpoint."""
    if cfg.critic_init == "checkpoint":
        src, src_cfg = cfg.critic_checkpoint, checkpointing.read_config(cfg.critic_checkpoint)
    elif cfg.critic_init == "actor":
        src, src_cfg = cfg.actor, actor_cfg
    else:
        src, src_cfg = cfg.reward_model, rm_cfg
    critic = wrap_ddp(build_model(ModelConfig.from_dict(src_cfg["model"]), "critic", lora=cfg.critic_lora, **kw),
                      cfg.critic_optim)
    optimizer, scheduler = build_optimizer(critic, cfg.critic_optim, cfg.train_iters)
    if not cfg.load:  # a resume loads the critic from the RL checkpoint
        keep_head = cfg.critic_init == "checkpoint"
        checkpointing.load_checkpoint(
            src, critic, load_rng=False,
            model_key_filter=lambda k: not is_lora_param(k) and (keep_head or not k.startswith("output_layer.")))
    return critic, optimizer, scheduler


def build_roles(cfg: RLConfig, actor_cfg: dict, rm_cfg: Optional[dict]) -> Roles:
    """Build and load every model of the run (``cfg``: the resolved config of
    :func:`megatron_qrm.rl.run_setup.resolve_rl_run`). With ``cfg.load`` the trained roles are left for the
    RL checkpoint to fill."""
    model_cfg = ModelConfig.from_dict(actor_cfg["model"])
    kw = dict(precision=PrecisionConfig(bf16=cfg.bf16), sequence_parallel=cfg.parallel.sequence_parallel,
              transformer_impl=cfg.transformer_impl, seed=cfg.parallel.seed, local_attention=cfg.local_attention)
    actor = wrap_ddp(build_model(model_cfg, "policy", **kw), cfg.actor_optim)
    actor_opt, actor_sched = build_optimizer(actor, cfg.actor_optim, cfg.train_iters)
    if not cfg.load:
        checkpointing.load_checkpoint(cfg.actor, actor, load_rng=False, model_key_filter=_without_lora)
    reference = (_frozen(model_cfg, "policy", cfg.actor, kw, key_filter=_without_lora)
                 if cfg.algo == "ppo" and cfg.kl_coef > 0 else None)
    reward, reward_reference = _reward_models(cfg, rm_cfg, kw)
    critic = critic_opt = critic_sched = None
    if cfg.algo == "ppo":
        critic, critic_opt, critic_sched = _critic(cfg, actor_cfg, rm_cfg, kw)
    return Roles(actor, actor_opt, actor_sched, reference, reward, reward_reference, critic, critic_opt, critic_sched)
