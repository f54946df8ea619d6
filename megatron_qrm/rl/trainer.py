"""`qrm train-ppo` / `qrm train-reinforce`: RL of a policy with token-level rewards.

One iteration, read top to bottom (the paper's Algorithm 1 for PPO + Q-RM):

1. take ``--rollout-batch-size`` prompts (split over data-parallel ranks), sample responses with a
   KV cache;
2. score: Q-RM credits Z(s_t, a_t) per token (or ORM / DPO-RM baselines), actor and reference
   log-probs, KL(pi || pi_ref) per state, critic values (PPO);
3. advantages over the whole rollout batch (all data-parallel ranks): ``qrm`` (Z standardised,
   A = Z_std - beta*KL - V, value target Z_std, no GAE), ``qrm-reference``, or ``gae``;
   REINFORCE: Z_std as the token return;
4. update the actor (clipped surrogate / policy gradient), then the critic, in micro/global batches;
5. log, evaluate every ``--eval-interval`` iterations, checkpoint at the iteration boundary.

Roles: actor (trained), reference (frozen initial actor), reward (frozen), critic (PPO; by default
the reward model's backbone with a fresh head). All share one TP/PP layout.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

from megatron_qrm import checkpointing, parallel
from megatron_qrm.config import ModelConfig, ParallelConfig, check_parallel_layout
from megatron_qrm.data import PromptDataConfig, PromptDataset, load_tokenizer
from megatron_qrm.data.chat import resolve_chat_template
from megatron_qrm.data.sampler import GlobalBatchSampler
from megatron_qrm.models import LoRAConfig, PrecisionConfig, build_model
from megatron_qrm.models.lora import is_lora_param, lora_disabled
from megatron_qrm.rl import advantages as adv
from megatron_qrm.rl import losses as rl_losses
from megatron_qrm.rewards.losses import last_token_values
from megatron_qrm.rl.experience import (
    head_scores,
    mask_padded_vocab,
    policy_logprobs,
    policy_logprobs_and_full_kl,
    retokenize_for_reward,
    shift_right,
    token_logprobs,
)
from megatron_qrm.rl.kl import kl_penalty, vocab_parallel_entropy
from megatron_qrm.rl.rollout import Rollout, SamplingConfig
from megatron_qrm.rl.update_batching import update_forward_step, update_microbatches
from megatron_qrm.data.packing import unsupported_reason
from megatron_qrm.data.tokenizer import check_tokenizer_identity
from megatron_qrm.errors import NonFiniteError
from megatron_qrm.training.engine import (
    NonFiniteGuard,
    OptimConfig,
    build_optimizer,
    reduce_metric_sums,
    run_global_batch,
    wrap_ddp,
)
from megatron_qrm.training.metrics_log import MetricsLogger

log = logging.getLogger("megatron_qrm")


@dataclass
class RLConfig:
    algo: str  # "ppo" | "reinforce"
    prompts: PromptDataConfig
    reward_model: Optional[str]  # checkpoint of a Q-RM / ORM / DPO-RM (qrm train-rm or convert_hf)
    actor: Optional[str] = None  # initial policy checkpoint (SFT); the reference starts from it too
    load: Optional[str] = None  # resume an RL run (its --save)
    save: Optional[str] = None
    tokenizer: Optional[str] = None
    dpo_reference: Optional[str] = None  # full fine-tuned DPO-RM: its reference model
    critic_init: str = "reward"  # reward | actor | checkpoint
    critic_checkpoint: Optional[str] = None
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    rollout_batch_size: int = 3072  # prompts per iteration (global)
    samples_per_prompt: int = 1
    generation_batch_size: int = 64  # sequences per generate() call on a rank
    forward_micro_batch_size: int = 8  # scoring passes
    micro_batch_size: int = 2  # update: sequences per micro-batch
    global_batch_size: int = 16  # update: sequences per optimizer step (all DP ranks)
    ppo_epochs: int = 1
    train_iters: int = 12
    advantage: Optional[str] = None  # qrm | qrm-reference | gae (default by reward type)
    kl_coef: float = 0.01
    kl_estimator: str = "full"  # full | k1 | k3 | abs
    clip_eps: float = 0.2
    value_clip: Optional[float] = None
    value_coef: float = 0.01  # qrm-reference only
    entropy_coef: float = 0.0
    gamma: float = 0.9
    lam: float = 0.8
    eos_rescore: bool = False
    reinforce_center: bool = True
    actor_optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=5e-6, clip_grad=0.0))
    critic_optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-5, clip_grad=0.0))
    critic_lora: LoRAConfig = field(default_factory=LoRAConfig)
    eval_data: Optional[str] = None
    eval_interval: int = 1
    eval_max_prompts: Optional[int] = None
    task: Optional[str] = None  # answer checker for Pass@1 (gsm8k | math | registered task)
    save_interval: int = 1
    log_dir: Optional[str] = None
    tensorboard: bool = True
    wandb_project: Optional[str] = None
    wandb_run_name: Optional[str] = None
    offload: bool = False
    allow_retokenize: bool = False
    exit_interval: Optional[int] = None
    bf16: bool = False
    transformer_impl: str = "auto"
    local_attention: str = "auto"  # local spec core attention: sdpa | unfused
    max_nonfinite_steps: int = 3  # skipped non-finite update steps in a row before the run stops
    # actor/critic updates on packed sequences (rl/update_batching.py): micro-batches of up to pack_tokens
    # tokens (default micro_batch_size x the rollout's padded length), no padding computed
    pack_sequences: bool = True
    pack_tokens: Optional[int] = None
    allow_tokenizer_change: bool = False
    # sampling engine (rl/rollout_engine.py): "megatron" (the project's KV-cache decoder on the actor) or
    # "vllm" (an in-process vLLM engine refitted from the actor after every update; docs/vllm.md)
    rollout_engine: str = "megatron"
    # vLLM engine settings (rl/vllm_engine.VLLMEngineConfig; None: its defaults)
    vllm: Optional[object] = None
    # --rollout-is-correction: multiply each token's policy loss by min(exp(logp_old - behaviour_logp), cap)
    # (rl/losses.truncated_is_weights); corrects for the rollout engine's distribution differing from the
    # trainer's. Off: the update treats the engine's samples as the trainer's own.
    rollout_is_correction: bool = False
    rollout_is_cap: float = 2.0


# ----------------------------------------------------------------------------- roles
@dataclass
class Roles:
    actor: torch.nn.Module  # DDP-wrapped
    actor_optimizer: object
    actor_scheduler: object
    reference: Optional[torch.nn.Module]
    reward: torch.nn.Module
    reward_reference: Optional[torch.nn.Module]  # DPO-RM with a separate reference
    critic: Optional[torch.nn.Module]
    critic_optimizer: object = None
    critic_scheduler: object = None


def _read(path: str, what: str) -> dict:
    if not path or checkpointing.resolve_checkpoint(path) is None:
        raise FileNotFoundError(f"{what} {path!r}: no complete checkpoint there")
    return checkpointing.read_config(path)


def _probe_tokenizers_match(a, b) -> bool:
    probes = ["The answer is 42.", "Sort ascending: 3 1 2", " x = y + 7\nTherefore"]
    return a.vocab_size == b.vocab_size and a.eos_id == b.eos_id and all(a.encode(p) == b.encode(p) for p in probes)


def _offload(model, on: bool, enabled: bool) -> None:
    """Move a frozen model off the GPU between the phases that use it (``--offload``)."""
    if enabled and torch.cuda.is_available() and model is not None:
        model.to("cuda" if on else "cpu")


def build_roles(cfg: RLConfig, actor_cfg: dict, rm_cfg: dict) -> Roles:
    model_cfg = ModelConfig.from_dict(actor_cfg["model"])
    prec = PrecisionConfig(bf16=cfg.bf16)
    kw = dict(precision=prec, sequence_parallel=cfg.parallel.sequence_parallel, transformer_impl=cfg.transformer_impl,
              seed=cfg.parallel.seed, local_attention=cfg.local_attention)

    actor = build_model(model_cfg, "policy", **kw)
    actor_ddp = wrap_ddp(actor, cfg.actor_optim)
    actor_opt, actor_sched = build_optimizer(actor_ddp, cfg.actor_optim, cfg.train_iters)
    if not cfg.load:  # a resume loads everything below from the RL checkpoint
        checkpointing.load_checkpoint(cfg.actor, actor_ddp, load_rng=False, model_key_filter=lambda k: not is_lora_param(k))

    reference = None
    if cfg.algo == "ppo" and cfg.kl_coef > 0:
        reference = build_model(model_cfg, "policy", **kw)
        checkpointing.load_checkpoint(cfg.actor, reference, load_rng=False, model_key_filter=lambda k: not is_lora_param(k))
        reference.eval()

    reward = reward_reference = None
    if rm_cfg is not None:
        rm_model_cfg = ModelConfig.from_dict(rm_cfg["model"])
        rm_kind = rm_cfg.get("reward_loss", {}).get("kind", "qrm")
        rm_lora = LoRAConfig(**{k: (tuple(v) if k == "targets" else v) for k, v in rm_cfg.get("lora", {}).items()})
        reward = build_model(rm_model_cfg, "policy" if rm_kind == "dpo" else "reward", lora=rm_lora, **kw)
        checkpointing.load_checkpoint(cfg.reward_model, reward, load_rng=False)
        reward.eval()
    if rm_cfg is not None and rm_kind == "dpo" and not rm_lora.enabled:
        if not cfg.dpo_reference:
            raise ValueError("the DPO-RM was fully fine-tuned: pass --dpo-reference with its reference model")
        reward_reference = build_model(rm_model_cfg, "policy", **kw)
        checkpointing.load_checkpoint(cfg.dpo_reference, reward_reference, load_rng=False,
                                      model_key_filter=lambda k: not is_lora_param(k))
        reward_reference.eval()

    critic = critic_opt = critic_sched = None
    if cfg.algo == "ppo":
        if cfg.critic_init == "reward" and rm_cfg is None:
            cfg.critic_init = "actor"  # rule-based rewards: no reward backbone to start from
        if cfg.critic_init == "checkpoint":
            src, src_cfg = cfg.critic_checkpoint, _read(cfg.critic_checkpoint, "--critic-checkpoint")
        elif cfg.critic_init == "actor":
            src, src_cfg = cfg.actor, actor_cfg
        else:
            src, src_cfg = cfg.reward_model, rm_cfg
        critic = build_model(ModelConfig.from_dict(src_cfg["model"]), "critic", lora=cfg.critic_lora, **kw)
        critic_ddp = wrap_ddp(critic, cfg.critic_optim)
        critic_opt, critic_sched = build_optimizer(critic_ddp, cfg.critic_optim, cfg.train_iters)
        if not cfg.load:
            # the backbone from the source; a fresh value head (as the paper/reference re-initialise it)
            keep_head = cfg.critic_init == "checkpoint"
            checkpointing.load_checkpoint(
                src, critic_ddp, load_rng=False,
                model_key_filter=lambda k: not is_lora_param(k) and (keep_head or not k.startswith("output_layer.")))
        critic = critic_ddp
    return Roles(actor_ddp, actor_opt, actor_sched, reference, reward, reward_reference, critic, critic_opt, critic_sched)


# ----------------------------------------------------------------------------- rollouts
def _merge_rollouts(parts: list[Rollout], pad_id: int) -> dict[str, torch.Tensor]:
    length = max(r.tokens.shape[1] for r in parts)

    def pad(t, value):
        return torch.nn.functional.pad(t, (0, length - t.shape[1]), value=value)

    tokens = torch.cat([pad(r.tokens, pad_id) for r in parts])
    return {
        "tokens": tokens,
        "position_ids": torch.arange(length).expand(tokens.shape[0], length).contiguous(),
        "action_mask": torch.cat([pad(r.action_mask, 0.0) for r in parts]),
        "behaviour_logp": torch.cat([pad(r.logprobs, 0.0) for r in parts]),
        "prompt_lens": torch.cat([r.prompt_lens for r in parts]),
        "response_lens": torch.cat([r.response_lens for r in parts]),
        "finished": torch.cat([r.finished for r in parts]),
    }


def _dp_gather_rows(t: torch.Tensor) -> torch.Tensor:
    """All rows of a per-rank [n, L] tensor from every data-parallel rank (padded to a common L)."""
    group = ps.get_data_parallel_group()
    size = ps.get_data_parallel_world_size()
    if size == 1:
        return t
    shape = torch.tensor([t.shape[0], t.shape[1]])
    shapes = parallel.all_gather_host(shape, group=group)
    n_max, l_max = int(max(s[0] for s in shapes)), int(max(s[1] for s in shapes))
    padded = torch.zeros(n_max, l_max, dtype=t.dtype)
    padded[: t.shape[0], : t.shape[1]] = t
    out = parallel.all_gather_host(padded, group=group)
    return torch.cat([o[: int(s[0])] for o, s in zip(out, shapes)])


# ----------------------------------------------------------------------------- the trainer
RewardFn = Callable[[dict], torch.Tensor]


class RLTrainer:
    """``reward_fn(exp) -> credits [N, L]`` replaces the reward model (rule-based token rewards, e.g.
    the demo's checker or a test's synthetic reward); ``rm_kind`` then says how to treat them."""

    def __init__(self, cfg: RLConfig, reward_fn: Optional[RewardFn] = None, reward_kind: str = "qrm"):
        self.cfg = cfg
        self.reward_fn = reward_fn
        cfg.actor_optim.check()
        cfg.critic_optim.check("--critic-lr")
        if cfg.value_clip is not None and not (cfg.value_clip > 0):
            raise ValueError(f"--value-clip {cfg.value_clip}: must be positive")
        parallel.initialize(cfg.parallel)
        resume_dir = checkpointing.resolve_checkpoint(os.path.join(cfg.load, "actor")) if cfg.load else None
        if cfg.load and resume_dir is None and cfg.load != cfg.save:
            raise FileNotFoundError(f"--load {cfg.load}: no RL checkpoint (expected {cfg.load}/actor/latest)")
        self.resume_dir = resume_dir
        if resume_dir is None:
            cfg.load = None
            if not cfg.actor:
                raise ValueError("--actor-checkpoint (the initial policy) is required")
        # every checkpoint named by a flag is resolved ONCE: what is loaded, checked and recorded is the
        # same directory even while another run writes a newer `latest` there
        if cfg.actor:
            cfg.actor = checkpointing.resolve_or_fail(cfg.actor, "--actor-checkpoint")
        if reward_fn is None and cfg.reward_model:
            cfg.reward_model = checkpointing.resolve_or_fail(cfg.reward_model, "--reward-model")
        actor_src = resume_dir or cfg.actor
        actor_cfg = _read(actor_src, "--actor-checkpoint")
        if resume_dir and not cfg.actor:  # the reference (and an actor-initialised critic) start from it
            cfg.actor = actor_cfg.get("rl", {}).get("initial_actor")
            if not cfg.actor:
                raise ValueError(f"--load {cfg.load}: the checkpoint does not record the initial policy; pass "
                                 f"--actor-checkpoint")
        if reward_fn is None:
            if cfg.reward_model is None:
                raise ValueError("--reward-model is required")
            rm_cfg = _read(cfg.reward_model, "--reward-model")
            self.rm_kind = rm_cfg.get("reward_loss", {}).get("kind", "qrm")
        else:
            rm_cfg, self.rm_kind = None, reward_kind
        self.model_cfg = ModelConfig.from_dict(actor_cfg["model"])
        check_parallel_layout(self.model_cfg, cfg.parallel, dist.get_world_size())

        tok_path = cfg.tokenizer or actor_cfg.get("tokenizer")
        if not tok_path:
            raise ValueError("--tokenizer is required: the actor checkpoint does not record one")
        self.tokenizer = load_tokenizer(tok_path)
        self.tokenizer_path = tok_path
        self.tokenizer_change = check_tokenizer_identity(actor_cfg, self.tokenizer, tok_path, checkpoint=actor_src,
                                                         allow_change=cfg.allow_tokenizer_change)
        rm_tok = (rm_cfg or {}).get("tokenizer")
        if rm_cfg is not None and not (rm_tok and os.path.abspath(rm_tok) != os.path.abspath(tok_path)):
            # the reward model reads the actor's tokens: they must be the ids it was trained on
            check_tokenizer_identity(rm_cfg, self.tokenizer, tok_path, checkpoint=cfg.reward_model,
                                     flag="--tokenizer (for --reward-model)", allow_change=cfg.allow_tokenizer_change)
        self.rm_tokenizer = None  # set when responses must be re-tokenised for the reward model
        if rm_tok and os.path.abspath(rm_tok) != os.path.abspath(tok_path):
            other = load_tokenizer(rm_tok)
            check_tokenizer_identity(rm_cfg, other, rm_tok, checkpoint=cfg.reward_model,
                                     flag="the reward model's recorded tokenizer", allow_change=cfg.allow_tokenizer_change)
            if not _probe_tokenizers_match(self.tokenizer, other):
                if not cfg.allow_retokenize:
                    raise ValueError(f"the reward model's tokenizer ({rm_tok}) differs from the actor's ({tok_path}); "
                                     f"its credits would not line up with the actor's tokens. Pass "
                                     f"--allow-retokenize to accept it")
                self.rm_tokenizer = other
                self.rm_chat_template = bool(rm_cfg.get("chat_template", False))
                self.rm_max_length = int(ModelConfig.from_dict(rm_cfg["model"]).max_position_embeddings)
                self._rm_prompt_cache: dict[int, list[int]] = {}
                if cfg.algo == "ppo" and cfg.critic_init == "reward":
                    log.warning("--allow-retokenize: the critic reads the actor's tokens, so it cannot start from the "
                                "reward model (another vocabulary); using --critic-init actor")
                    cfg.critic_init = "actor"
        if cfg.algo == "ppo" and cfg.critic_init == "checkpoint":
            if not cfg.critic_checkpoint:
                raise ValueError("--critic-init checkpoint needs --critic-checkpoint")
            _read(cfg.critic_checkpoint, "--critic-checkpoint")  # fail before building any model
        if cfg.algo == "reinforce":
            cfg.advantage = "returns"  # REINFORCE: standardised credits (Q-RM) or the sequence reward as returns
        elif cfg.advantage is None:
            cfg.advantage = "qrm" if self.rm_kind == "qrm" else "gae"
        if cfg.algo == "ppo" and cfg.advantage in ("qrm", "qrm-reference") and self.rm_kind != "qrm":
            raise ValueError(f"--advantage {cfg.advantage} needs a Q-RM; the reward model is {self.rm_kind} "
                             f"(use --advantage gae)")

        self.prompts = PromptDataset(dataclasses.replace(cfg.prompts, chat_template=resolve_chat_template(
            cfg.prompts.chat_template, self.tokenizer, actor_cfg)), self.tokenizer)
        self.dp_rank, self.dp_size = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
        if cfg.rollout_batch_size % self.dp_size:
            raise ValueError(f"--rollout-batch-size {cfg.rollout_batch_size} must be divisible by the "
                             f"data-parallel size {self.dp_size}")
        n_seq = cfg.rollout_batch_size * cfg.samples_per_prompt
        if n_seq % cfg.global_batch_size or cfg.global_batch_size % (cfg.micro_batch_size * self.dp_size):
            raise ValueError(f"--global-batch-size {cfg.global_batch_size} must divide the rollout "
                             f"({n_seq} sequences) and be a multiple of --micro-batch-size x data-parallel size")
        if cfg.pack_sequences and cfg.pack_tokens is not None and cfg.pack_tokens < cfg.prompts.seq_length:
            raise ValueError(f"--pack-tokens {cfg.pack_tokens} is smaller than --seq-length {cfg.prompts.seq_length} "
                             "(a rollout row's longest); raise it or leave it unset")
        self.sampler = GlobalBatchSampler(len(self.prompts), cfg.rollout_batch_size,
                                          cfg.rollout_batch_size // self.dp_size, self.dp_rank, self.dp_size,
                                          seed=cfg.parallel.seed)
        # pre-flight: --save / --log-dir writable, room for one actor (+ critic) checkpoint, before any model
        need = checkpointing.estimate_checkpoint_bytes(self.model_cfg, "policy", bf16=cfg.bf16)
        if cfg.algo == "ppo":
            need += checkpointing.estimate_checkpoint_bytes(self.model_cfg, "critic", bf16=cfg.bf16)
        checkpointing.preflight_save_dir(cfg.save, "--save", need)
        checkpointing.preflight_save_dir(cfg.log_dir, "--log-dir")
        self.roles = build_roles(cfg, actor_cfg, rm_cfg)
        self.state = checkpointing.TrainState()
        if resume_dir:
            self._load(resume_dir)
        self.ckpt_config = {"kind": "policy", "role": "policy", "model": self.model_cfg.to_dict(),
                            "tokenizer": os.path.abspath(tok_path) if os.path.exists(tok_path) else tok_path,
                            "chat_template": self.prompts.cfg.chat_template, "seq_length": cfg.prompts.seq_length,
                            "lora": dataclasses.asdict(LoRAConfig()), "rl": {"algo": cfg.algo, "advantage": cfg.advantage,
                                                                            "reward_model": cfg.reward_model,
                                                                            "reward_kind": self.rm_kind,
                                                                            "initial_actor": os.path.abspath(cfg.actor)},
                            **checkpointing.tokenizer_record(self.tokenizer, tok_path, actor_cfg, self.tokenizer_change)}
        self.logger = MetricsLogger(cfg.log_dir or cfg.save, enabled=parallel.is_rank0(), tensorboard=cfg.tensorboard,
                                    wandb_project=cfg.wandb_project, wandb_run_name=cfg.wandb_run_name,
                                    total_steps=cfg.train_iters, start_step=self.state.iteration,
                                    desc=f"train-{cfg.algo} ({self.rm_kind})", supersede_after_start=True)
        self.guards = {"actor": NonFiniteGuard(cfg.max_nonfinite_steps, what="iteration"),
                       "critic": NonFiniteGuard(cfg.max_nonfinite_steps, what="iteration")}
        if reward_fn is None:
            self.logger.message(f"actor {actor_src}, reward model {cfg.reward_model}")
        self.logger.message(f"{cfg.algo}: reward={self.rm_kind} advantage={cfg.advantage} prompts={len(self.prompts)} "
                            f"({self.prompts.stats}) rollout={cfg.rollout_batch_size}x{cfg.samples_per_prompt}"
                            + (" (reward model scores re-tokenised responses)" if self.rm_tokenizer is not None else ""))
        if resume_dir:
            self.logger.message(f"resumed from {resume_dir} at iteration {self.state.iteration}")

    # ---- checkpoints (critic first, actor last: the actor's `latest` commits the iteration)
    def _save(self) -> None:
        cfg, r = self.cfg, self.roles
        if not cfg.save:
            return
        if r.critic is not None:
            checkpointing.save_checkpoint(os.path.join(cfg.save, "critic"), self.state.iteration, r.critic,
                                          {"kind": "critic", "role": "critic", "model": self.model_cfg.to_dict()},
                                          optimizer=r.critic_optimizer, scheduler=r.critic_scheduler)
        path = checkpointing.save_checkpoint(os.path.join(cfg.save, "actor"), self.state.iteration, r.actor,
                                             self.ckpt_config, optimizer=r.actor_optimizer,
                                             scheduler=r.actor_scheduler, train_state=self.state)
        self.logger.message(f"saved {path}")

    def _load(self, actor_dir: str) -> None:
        r = self.roles
        _, ts = checkpointing.load_checkpoint(actor_dir, r.actor, optimizer=r.actor_optimizer, scheduler=r.actor_scheduler)
        self.state = ts or self.state
        if r.critic is not None:
            critic_dir = os.path.join(self.cfg.load, "critic", checkpointing.iter_dir_name(self.state.iteration))
            if checkpointing.resolve_checkpoint(critic_dir) is None:
                raise FileNotFoundError(f"--load {self.cfg.load}: critic checkpoint {critic_dir} is missing")
            checkpointing.load_checkpoint(critic_dir, r.critic, optimizer=r.critic_optimizer,
                                          scheduler=r.critic_scheduler, load_rng=False)

    # ---- 1. rollouts
    def _rollout_engine(self):
        """The sampling engine (rl/rollout_engine.py), built on first use and refitted to the actor's current
        weights (version = the iteration they come from; train() refits after every update)."""
        if getattr(self, "_engine", None) is None:
            from megatron_qrm.rl.rollout_engine import build_rollout_engine

            self._engine = build_rollout_engine(
                self.cfg.rollout_engine, self.roles.actor, self.model_cfg, eos_id=self.tokenizer.eos_id,
                pad_id=self.tokenizer.pad_id, vocab_size=self.tokenizer.vocab_size,
                max_length=self.cfg.prompts.seq_length, dtype=torch.bfloat16 if self.cfg.bf16 else torch.float32,
                engine_cfg=self.cfg.vllm, version=self.state.iteration)
        return self._engine

    def _engine_mismatch(self, exp: dict) -> dict[str, float]:
        """Mean and max |behaviour log-prob (rollout engine) - recomputed logp_old (trainer)| over response
        tokens, all data-parallel ranks (last stage computes; broadcast with the other stats)."""
        if exp.get("logp_old") is None:
            return {}
        m = exp["action_mask"] > 0
        d = (exp["behaviour_logp"] - exp["logp_old"]).abs()[m].double()
        t = torch.tensor([float(d.sum()), float(m.sum())], dtype=torch.float64)
        mx = torch.tensor([float(d.max()) if d.numel() else 0.0], dtype=torch.float64)
        if self.dp_size > 1:
            parallel.all_reduce_host(t, group=ps.get_data_parallel_group())
            parallel.all_reduce_host(mx, op=dist.ReduceOp.MAX, group=ps.get_data_parallel_group())
        return {"rollout_logp_diff_mean": float(t[0] / t[1].clamp(min=1)), "rollout_logp_diff_max": float(mx[0])}

    def rollout(self) -> dict[str, torch.Tensor]:
        cfg = self.cfg
        (indices,) = self.sampler.microbatches(self.state.consumed_samples)
        indices = np.repeat(indices, cfg.samples_per_prompt)
        prompts = [self.prompts.prompt_ids(i) for i in indices]
        parts = []
        for c in range(0, len(prompts), cfg.generation_batch_size):
            seed = (cfg.parallel.seed * 1_000_003 + self.state.iteration * 10_007 + self.dp_rank * 101 + c) % (2**31)
            try:
                parts.append(self._rollout_engine().generate(prompts[c:c + cfg.generation_batch_size], cfg.sampling,
                                                             seed=seed, max_length=cfg.prompts.seq_length,
                                                             expected_version=self.state.iteration))
            except RuntimeError as e:  # torch.multinomial on NaN/Inf probabilities
                if "probability tensor" not in str(e):
                    raise
                raise NonFiniteError(f"iteration {self.state.iteration + 1}: the actor's next-token distribution is "
                                     "not finite while sampling (its weights diverged in an earlier update); "
                                     "stopping before any update (the last checkpoint is untouched). Lower --lr") from None
        exp = _merge_rollouts(parts, self.tokenizer.pad_id)
        exp["prompt_index"] = torch.as_tensor(indices)
        return exp

    # ---- 2. scores
    def score(self, exp: dict) -> dict:
        cfg, r = self.cfg, self.roles
        mb, vocab = cfg.forward_micro_batch_size, self.tokenizer.vocab_size
        need_ref = r.reference is not None
        if need_ref and cfg.kl_estimator == "full":
            _offload(r.reference, True, cfg.offload)
            exp["logp_old"], exp["logp_ref"], exp["kl"] = policy_logprobs_and_full_kl(r.actor, r.reference, exp, mb, vocab)
            _offload(r.reference, False, cfg.offload)
        else:
            exp["logp_old"] = policy_logprobs(r.actor, exp, mb, vocab)
            if need_ref:
                _offload(r.reference, True, cfg.offload)
                exp["logp_ref"] = policy_logprobs(r.reference, exp, mb, vocab)
                _offload(r.reference, False, cfg.offload)
                if exp["logp_old"] is not None:
                    exp["kl"] = kl_penalty(cfg.kl_estimator, logp=exp["logp_old"], logp_ref=exp["logp_ref"])
        _offload(r.reward, True, cfg.offload)
        if self.reward_fn is not None:
            exp["credits"] = self.reward_fn(exp) if ps.is_pipeline_last_stage() else None
        elif self.rm_tokenizer is not None:
            exp["credits"] = self.retokenized_credits(exp)
        else:
            exp["credits"] = self._reward_credits(exp, vocab)
        _offload(r.reward, False, cfg.offload)
        if r.critic is not None:
            exp["values"] = head_scores(r.critic, exp, mb, shift_to_state=True)
        return exp

    def _reward_credits(self, exp: dict, vocab: int) -> Optional[torch.Tensor]:
        """Per-position credits [N, L] of the reward model on ``exp``'s tokens (last stage; None elsewhere)."""
        r, mb = self.roles, self.cfg.forward_micro_batch_size
        if self.rm_kind == "dpo":
            logp_dpo = policy_logprobs(r.reward, exp, mb, vocab)
            if r.reward_reference is None:
                with lora_disabled(r.reward):
                    logp_dpo_ref = policy_logprobs(r.reward, exp, mb, vocab)
            else:
                logp_dpo_ref = policy_logprobs(r.reward_reference, exp, mb, vocab)
            return None if logp_dpo is None else adv.dpo_token_rewards(logp_dpo, logp_dpo_ref, exp["action_mask"])
        return head_scores(r.reward, exp, mb, shift_to_state=False)

    def _rm_prompt_ids(self, index: int) -> list[int]:
        """Prompt ``index`` rendered and encoded for the reward model's tokenizer (BOS as in its training)."""
        ids = self._rm_prompt_cache.get(index)
        if ids is None:
            tok = self.rm_tokenizer
            text, has_bos = tok.render_prompt(self.prompts.instructions[index], self.rm_chat_template)
            ids = tok.encode(text)
            if tok.bos_id is not None and not has_bos:
                ids = [tok.bos_id] + ids
            self._rm_prompt_cache[index] = ids
        return ids

    def retokenized_credits(self, exp: dict) -> Optional[torch.Tensor]:
        """``--allow-retokenize``: score the decoded responses with the reward model's own tokenizer and give
        every actor token the credit of the reward-model token covering its last character
        (:func:`megatron_qrm.rl.experience.retokenize_for_reward`)."""
        rm_prompts = [self._rm_prompt_ids(int(i)) for i in exp["prompt_index"].tolist()]
        batch = retokenize_for_reward(exp, self.tokenizer, self.rm_tokenizer, rm_prompts, self.rm_max_length)
        rm_credits = self._reward_credits(batch.exp, self.rm_tokenizer.vocab_size)
        return None if rm_credits is None else batch.map_back(rm_credits)

    # ---- 3. advantages (last stage; statistics over every DP rank's rollout)
    def advantages(self, exp: dict) -> dict[str, float]:
        cfg = self.cfg
        if not ps.is_pipeline_last_stage():
            return {}
        mask = exp["action_mask"]
        n = mask.shape[0]
        g = {k: _dp_gather_rows(exp[k]) for k in ("credits", "action_mask")}
        gmask = g["action_mask"]
        if self.rm_kind == "orm":  # the ORM scores the last token: its credit is the sequence reward
            seq = last_token_values(g["credits"], gmask)
            rewards = adv.orm_token_rewards(seq, gmask)
        else:
            seq = None
            rewards = g["credits"] * gmask
        for k in ("values", "kl", "logp_old", "logp_ref"):
            if exp.get(k) is not None:
                g[k] = _dp_gather_rows(exp[k])
        values = g.get("values", torch.zeros_like(gmask))
        kl = g.get("kl", torch.zeros_like(gmask))
        if cfg.algo == "reinforce":
            if self.rm_kind == "qrm":
                returns = adv.reinforce_returns_qrm(rewards, gmask, center=cfg.reinforce_center, eos_rescore=cfg.eos_rescore)
            elif self.rm_kind == "orm":
                # centred (R - mean) / std over sequences; --no-reward-centering: the reference's broadcast
                # reward divided by sigma over tokens, uncentred (docs/rl.md)
                returns = (adv.reinforce_returns_orm(seq, gmask) if cfg.reinforce_center else
                           adv.orm_token_rewards(seq, gmask, last_token_only=False, normalize=True))
            else:
                returns = adv.reinforce_returns_qrm(rewards, gmask, center=cfg.reinforce_center, eos_rescore=cfg.eos_rescore)
            advantages = returns
        elif cfg.advantage == "qrm":
            out = adv.qrm_advantages(rewards, values, kl, gmask, kl_coef=cfg.kl_coef)
            advantages, returns = out.advantages, out.returns
        elif cfg.advantage == "qrm-reference":
            out = adv.qrm_reference_advantages(rewards, values, g.get("logp_old", torch.zeros_like(gmask)),
                                               g.get("logp_ref", g.get("logp_old", torch.zeros_like(gmask))), gmask,
                                               kl_coef=cfg.kl_coef, value_coef=cfg.value_coef)
            advantages, returns = out.advantages, out.returns
        else:  # gae on shaped rewards (ORM last-token / DPO-RM log-ratio), std-normalised, KL-penalised
            # ORM: sigma over the score broadcast to every action (the reference's), then last token only
            shaped = (adv.orm_token_rewards(seq, gmask, normalize=True) if self.rm_kind == "orm"
                      else adv.normalize_by_std(rewards, gmask))
            shaped = adv.add_kl_penalty(shaped, kl, gmask, cfg.kl_coef)
            out = adv.gae_advantages(shaped, values, gmask, gamma=cfg.gamma, lam=cfg.lam)
            advantages, returns = out.advantages, out.returns
        start = sum(int(x) for x in self._dp_counts()[: self.dp_rank])
        rows = slice(start, start + n)
        exp["advantages"] = advantages[rows, : mask.shape[1]].contiguous()
        exp["returns"] = returns[rows, : mask.shape[1]].contiguous()
        tok = gmask.sum().clamp(min=1)
        seq_score = (rewards * gmask).sum(-1) / gmask.sum(-1).clamp(min=1) if seq is None else seq
        stats = {
            "token_reward_mean": float((rewards * gmask).sum() / tok),
            "sequence_score_mean": float(seq_score.mean()),
            "kl_mean": float((kl * gmask).sum() / tok),
            "advantage_mean": float((advantages * gmask).sum() / tok),
            "response_length": float(gmask.sum(-1).float().mean()),
        }
        return stats

    def _dp_counts(self) -> list[int]:
        n = torch.tensor([self.cfg.rollout_batch_size // self.dp_size * self.cfg.samples_per_prompt])
        out = parallel.all_gather_host(n, group=ps.get_data_parallel_group())
        return [int(x) for x in out]

    # ---- 4. updates
    def _update(self, model, optimizer, scheduler, exp: dict, loss_fn, names: tuple[str, ...], epochs: int,
                keys: tuple[str, ...]) -> dict[str, float]:
        cfg = self.cfg
        n = exp["tokens"].shape[0]
        per_step = cfg.global_batch_size // self.dp_size
        totals: dict[str, float] = {k: 0.0 for k in names}
        steps = 0
        for epoch in range(epochs):
            order = np.random.RandomState(cfg.parallel.seed + 7919 * self.state.iteration + epoch).permutation(n)
            for s in range(0, n, per_step):
                rows = order[s:s + per_step]
                capacity = None
                if cfg.pack_sequences and not unsupported_reason(model):
                    capacity = cfg.pack_tokens or cfg.micro_batch_size * exp["tokens"].shape[1]
                micro = update_microbatches(exp, rows, keys, cfg.micro_batch_size, self.tokenizer.pad_id, capacity)
                model.zero_grad_buffer()
                optimizer.zero_grad()
                outs = run_global_batch(model, update_forward_step(loss_fn), micro, forward_only=False)
                sums = reduce_metric_sums(outs, names)
                label = "actor" if model is self.roles.actor else "critic"
                if not self.guards[label].allow_step(self.state.iteration + 1, sums[names[0]], model, label=label):
                    continue  # non-finite loss or gradients: no update (the guard stops a run that persists)
                _, grad_norm, _ = optimizer.step()
                scheduler.step(increment=1)
                self.guards[label].after_step(self.state.iteration + 1, grad_norm)
                for k in names:
                    totals[k] += sums[k]
                steps += 1
        return totals

    def _actor_loss(self, output, batch):
        cfg = self.cfg
        logp = token_logprobs(output, batch["tokens"], self.tokenizer.vocab_size)
        mask = batch["action_mask"]
        w = (rl_losses.truncated_is_weights(batch["logp_old"], batch["behaviour_logp"], mask, cfg.rollout_is_cap)
             if cfg.rollout_is_correction else None)  # --rollout-is-correction (rl/losses.py)
        if cfg.algo == "ppo":
            out = rl_losses.ppo_policy_loss(logp, batch["logp_old"], batch["advantages"], mask, clip_eps=cfg.clip_eps,
                                            token_weights=w)
        else:
            out = rl_losses.reinforce_loss(logp, batch["returns"], mask, token_weights=w)
        count = out.num_tokens.detach()
        # token means of this micro-batch -> sums, so the global batch can be averaged exactly
        metrics = {"policy_loss_sum": out.loss_sum.detach(), "tokens": count,
                   "clipped_sum": out.stats.get("clip_frac", torch.zeros(())) * count,
                   "ratio_sum": out.stats.get("ratio_mean", torch.ones(())) * count,
                   "approx_kl_sum": out.stats.get("approx_kl", torch.zeros(())) * count}
        # entropy of pi(.|s_t) at the state before each action, over vocab-parallel logits
        ent = vocab_parallel_entropy(mask_padded_vocab(output.float(), self.tokenizer.vocab_size),
                                     ps.get_tensor_model_parallel_group())
        ent_sum = (shift_right(ent) * mask).sum()
        metrics["entropy_sum"] = ent_sum.detach()
        loss_sum = out.loss_sum - cfg.entropy_coef * ent_sum if cfg.entropy_coef > 0 else out.loss_sum
        return loss_sum, count.to(torch.int), metrics

    def _critic_loss(self, output, batch):
        values = shift_right(output.squeeze(-1).float())  # V(s_t) for the action at p sits at p - 1
        # --value-clip: PPO value clipping around the rollout-time values (the reference does not clip)
        out = rl_losses.value_loss(values, batch["returns"], batch["action_mask"], clip_eps=self.cfg.value_clip,
                                   values_old=batch.get("values") if self.cfg.value_clip is not None else None)
        return out.loss_sum, out.num_tokens.to(torch.int), {"value_loss_sum": out.loss_sum.detach(),
                                                              "tokens": out.num_tokens.detach()}

    # ---- the loop
    def train(self) -> dict[str, float]:
        cfg, r = self.cfg, self.roles
        last: dict[str, float] = {}
        while self.state.iteration < cfg.train_iters:
            times = {}
            t0 = time.time()
            exp = self.rollout()
            times["generate_s"] = time.time() - t0
            self._rollout_engine().sleep()  # GPU colocated vLLM: free its memory for training (--vllm-sleep-level)
            t1 = time.time()
            exp = self.score(exp)
            stats = self.advantages(exp)
            stats.update(self._engine_mismatch(exp))
            self._check_finite(exp)
            times["score_s"] = time.time() - t1
            t2 = time.time()
            keys = ("tokens", "position_ids", "action_mask", "logp_old", "advantages", "returns", "values",
                    "behaviour_logp")
            for k in ("logp_old", "advantages", "returns", "values"):  # first stages carry placeholders (unused there)
                if exp.get(k) is None:
                    exp[k] = torch.zeros_like(exp["action_mask"])
            actor_names = ("policy_loss_sum", "tokens", "clipped_sum", "ratio_sum", "approx_kl_sum", "entropy_sum")
            a = self._update(r.actor, r.actor_optimizer, r.actor_scheduler, exp, self._actor_loss, actor_names,
                             cfg.ppo_epochs, keys)
            c = None
            if r.critic is not None:
                c = self._update(r.critic, r.critic_optimizer, r.critic_scheduler, exp, self._critic_loss,
                                 ("value_loss_sum", "tokens"), cfg.ppo_epochs, keys)
            times["update_s"] = time.time() - t2
            self.state.iteration += 1
            self.state.consumed_samples += cfg.rollout_batch_size
            t3 = time.time()
            self._rollout_engine().refit(r.actor, self.state.iteration)  # the next rollout samples these weights
            if cfg.rollout_engine != "megatron":  # (the project's decoder samples the live actor: no copy)
                times["refit_s"] = time.time() - t3
            stats = self._broadcast_stats(stats)
            tok = max(a["tokens"], 1.0)
            gen_tokens = float(exp["action_mask"].sum()) * self.dp_size
            last = dict(stats, policy_loss=a["policy_loss_sum"] / tok, clip_fraction=a["clipped_sum"] / tok,
                        ratio_mean=a["ratio_sum"] / tok, approx_kl_old=a["approx_kl_sum"] / tok,
                        entropy=a["entropy_sum"] / tok, **times,
                        iteration_s=time.time() - t0, generate_tokens_per_s=gen_tokens / max(times["generate_s"], 1e-9),
                        finished_fraction=float(exp["finished"].float().mean()))
            if c is not None:
                last["value_loss"] = c["value_loss_sum"] / max(c["tokens"], 1.0)
            if cfg.eval_data and cfg.task and (self.state.iteration % cfg.eval_interval == 0
                                               or self.state.iteration == cfg.train_iters):
                last.update(self.evaluate())
            self.logger.log(self.state.iteration, last)
            if cfg.save and (self.state.iteration % cfg.save_interval == 0 or self.state.iteration == cfg.train_iters):
                self._save()
            if cfg.exit_interval and self.state.iteration % cfg.exit_interval == 0 and self.state.iteration < cfg.train_iters:
                if cfg.save and self.state.iteration % cfg.save_interval != 0:
                    self._save()
                break
        self.logger.close()
        return last

    def _check_finite(self, exp: dict) -> None:
        """Stop before any update when the rollout's log-probs, rewards, values or advantages are not finite
        (on any rank); names the iteration and the tensors. Collective."""
        names = ("logp_old", "logp_ref", "credits", "values", "advantages", "returns")
        bad = [k for k in names if isinstance(exp.get(k), torch.Tensor) and not bool(torch.isfinite(exp[k]).all())]
        flags = torch.tensor([float(k in bad) for k in names])
        if dist.is_initialized() and dist.get_world_size() > 1:
            parallel.all_reduce_host(flags, op=dist.ReduceOp.MAX)
        bad = [k for k, f in zip(names, flags.tolist()) if f > 0]
        if bad:
            raise NonFiniteError(f"iteration {self.state.iteration + 1}: non-finite {', '.join(bad)} in the rollout; "
                                 "stopping before any update (the last checkpoint is untouched). Check the reward "
                                 "model and lower --lr")

    def _broadcast_stats(self, stats: dict[str, float]) -> dict[str, float]:
        names = ("token_reward_mean", "sequence_score_mean", "kl_mean", "advantage_mean", "response_length",
                 "rollout_logp_diff_mean", "rollout_logp_diff_max")
        t = torch.tensor([stats.get(k, 0.0) for k in names], dtype=torch.float64)
        if ps.get_pipeline_model_parallel_world_size() > 1:
            parallel.broadcast_host(t, src=ps.get_pipeline_model_parallel_last_rank(),
                                    group=ps.get_pipeline_model_parallel_group())
        return dict(zip(names, t.tolist()))

    def evaluate(self) -> dict[str, float]:
        from megatron_qrm.evaluation.policy_eval import evaluate_pass_at_1

        return evaluate_pass_at_1(self.roles.actor.module, self.tokenizer, self.cfg.eval_data, self.cfg.task,
                                  seq_length=self.cfg.prompts.seq_length, chat_template=self.prompts.cfg.chat_template,
                                  max_new_tokens=self.cfg.sampling.max_new_tokens,
                                  batch_size=self.cfg.generation_batch_size, max_prompts=self.cfg.eval_max_prompts)


def train_rl(cfg: RLConfig) -> dict[str, float]:
    return RLTrainer(cfg).train()
