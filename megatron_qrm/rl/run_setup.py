"""An RL run resolved once, before any model is built: :func:`resolve_rl_run` -> a frozen :class:`RLRun`.

Everything the flags leave open is decided here, in one place, and never changed afterwards:

* which checkpoint directories are read (``latest`` resolved ONCE, so what is loaded, checked and recorded
  is the same directory even while another run writes a newer ``latest`` there), and whether the run
  resumes (``--load``);
* the tokenizers: the actor's (checked against its checkpoint), the reward model's (the same ids, or a
  re-tokenising path with ``--allow-retokenize``);
* the reward model's kind, the advantage estimator (:func:`megatron_qrm.rl.estimators.estimator_name`),
  the critic's initialisation;
* the checks that cost nothing: batch sizes against the data-parallel size, ``--pack-tokens``, room on
  disk for one checkpoint.

The trainer reads ``run.cfg`` (a resolved copy: the caller's :class:`~megatron_qrm.rl.config.RLConfig`
is not modified) and the other fields; it makes no further decisions about the run's set-up.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass
from typing import Any, Optional

from megatron_qrm import checkpointing
from megatron_qrm.config import ModelConfig, check_parallel_layout
from megatron_qrm.data import load_tokenizer
from megatron_qrm.data.tokenizer import Tokenizer, check_tokenizer_identity
from megatron_qrm.errors import UserError, UserFileNotFoundError
from megatron_qrm.rl.config import RLConfig
from megatron_qrm.rl.estimators import estimator_name

log = logging.getLogger("megatron_qrm")


@dataclass(frozen=True)
class RLRun:
    """The resolved set-up of one RL run (see the module docstring).

    Attributes:
        cfg: the run's configuration with every open choice filled in (``actor``, ``reward_model``
            resolved to ``iter_*`` directories, ``load`` None unless resuming, ``critic_init``,
            ``advantage`` = the estimator's name).
        resume_dir: the RL checkpoint's actor directory being resumed, or None.
        actor_source: the checkpoint the actor's weights and config come from (``resume_dir`` or the
            initial actor).
        actor_config: that checkpoint's ``qrm_config.json``.
        model: the actor's model config.
        reward_config: the reward model's ``qrm_config.json`` (None with a rule-based ``reward_fn``).
        reward_kind: ``qrm`` | ``orm`` | ``dpo``.
        tokenizer, tokenizer_path: the actor's tokenizer (also the critic's and reference's).
        tokenizer_change: the ``--allow-tokenizer-change`` record for new checkpoints, or None.
        rm_tokenizer: the reward model's own tokenizer when responses must be re-tokenised for it, else None.
        rm_chat_template, rm_max_length: how the reward model's prompts are rendered, its longest sequence.
        dp_size: data-parallel size.
    """

    cfg: RLConfig
    resume_dir: Optional[str]
    actor_source: str
    actor_config: dict
    model: ModelConfig
    reward_config: Optional[dict]
    reward_kind: str
    tokenizer: Tokenizer
    tokenizer_path: str
    tokenizer_change: Optional[dict]
    rm_tokenizer: Optional[Tokenizer]
    rm_chat_template: bool
    rm_max_length: int
    dp_size: int


def _read(path: str, what: str) -> dict:
    if not path or checkpointing.resolve_checkpoint(path) is None:
        raise UserFileNotFoundError(f"{what} {path!r}: no complete checkpoint there")
    return checkpointing.read_config(path)


def _probe_tokenizers_match(a: Tokenizer, b: Tokenizer) -> bool:
    probes = ["The answer is 42.", "Sort ascending: 3 1 2", " x = y + 7\nTherefore"]
    return a.vocab_size == b.vocab_size and a.eos_id == b.eos_id and all(a.encode(p) == b.encode(p) for p in probes)


def check_optimizer_flags(cfg: RLConfig) -> None:
    """The checks that need nothing but the flags (run before the process groups are set up)."""
    cfg.actor_optim.check()
    cfg.critic_optim.check("--critic-lr")
    if cfg.value_clip is not None and not (cfg.value_clip > 0):
        raise UserError(f"--value-clip {cfg.value_clip}: must be positive")


def _check_batches(cfg: RLConfig, dp_size: int) -> None:
    if cfg.rollout_batch_size % dp_size:
        raise UserError(f"--rollout-batch-size {cfg.rollout_batch_size} must be divisible by the "
                         f"data-parallel size {dp_size}")
    n_seq = cfg.rollout_batch_size * cfg.samples_per_prompt
    if n_seq % cfg.global_batch_size or cfg.global_batch_size % (cfg.micro_batch_size * dp_size):
        raise UserError(f"--global-batch-size {cfg.global_batch_size} must divide the rollout "
                         f"({n_seq} sequences) and be a multiple of --micro-batch-size x data-parallel size")
    if cfg.pack_sequences and cfg.pack_tokens is not None and cfg.pack_tokens < cfg.prompts.seq_length:
        raise UserError(f"--pack-tokens {cfg.pack_tokens} is smaller than --seq-length {cfg.prompts.seq_length} "
                         "(a rollout row's longest); raise it or leave it unset")


def _checkpoints(cfg: RLConfig, rule_based_reward: bool) -> tuple[Optional[str], str, Optional[str], Optional[str]]:
    """(resume_dir, initial actor, reward model, load) with ``latest`` resolved once."""
    resume_dir = checkpointing.resolve_checkpoint(os.path.join(cfg.load, "actor")) if cfg.load else None
    if cfg.load and resume_dir is None and cfg.load != cfg.save:
        raise UserFileNotFoundError(f"--load {cfg.load}: no RL checkpoint (expected {cfg.load}/actor/latest)")
    if resume_dir is None and not cfg.actor:
        raise UserError("--actor-checkpoint (the initial policy) is required")
    actor = checkpointing.resolve_or_fail(cfg.actor, "--actor-checkpoint") if cfg.actor else None
    reward_model = cfg.reward_model
    if not rule_based_reward:
        if not reward_model:
            raise UserError("--reward-model is required")
        reward_model = checkpointing.resolve_or_fail(reward_model, "--reward-model")
    return resume_dir, actor, reward_model, (cfg.load if resume_dir else None)


def _reward_tokenizer(cfg: RLConfig, rm_cfg: dict, reward_model: str, tokenizer: Tokenizer, tok_path: str,
                      ) -> Optional[Tokenizer]:
    """The reward model's own tokenizer when its ids differ from the actor's (``--allow-retokenize``), else
    None after checking that the actor's ids are the ones it was trained on."""
    rm_tok = rm_cfg.get("tokenizer")
    if not (rm_tok and os.path.abspath(rm_tok) != os.path.abspath(tok_path)):
        check_tokenizer_identity(rm_cfg, tokenizer, tok_path, checkpoint=reward_model,
                                 flag="--tokenizer (for --reward-model)", allow_change=cfg.allow_tokenizer_change)
        return None
    other = load_tokenizer(rm_tok)
    check_tokenizer_identity(rm_cfg, other, rm_tok, checkpoint=reward_model,
                             flag="the reward model's recorded tokenizer", allow_change=cfg.allow_tokenizer_change)
    if _probe_tokenizers_match(tokenizer, other):
        return None
    if not cfg.allow_retokenize:
        raise UserError(f"the reward model's tokenizer ({rm_tok}) differs from the actor's ({tok_path}); "
                         f"its credits would not line up with the actor's tokens. Pass --allow-retokenize to accept it")
    return other


def _critic_init(cfg: RLConfig, rm_cfg: Optional[dict], retokenize: bool) -> str:
    if cfg.algo != "ppo":
        return cfg.critic_init
    if cfg.critic_init == "checkpoint":
        if not cfg.critic_checkpoint:
            raise UserError("--critic-init checkpoint needs --critic-checkpoint")
        _read(cfg.critic_checkpoint, "--critic-checkpoint")  # fail before building any model
        return "checkpoint"
    if cfg.critic_init == "reward" and rm_cfg is None:
        return "actor"  # rule-based rewards: no reward backbone to start from
    if cfg.critic_init == "reward" and retokenize:
        log.warning("--allow-retokenize: the critic reads the actor's tokens, so it cannot start from the "
                    "reward model (another vocabulary); using --critic-init actor")
        return "actor"
    return cfg.critic_init


def resolve_rl_run(cfg: RLConfig, *, world_size: int, rule_based_reward: bool = False,
                   reward_kind: str = "qrm") -> RLRun:
    """Resolve ``cfg`` into an :class:`RLRun` (reads checkpoint configs and tokenizers; builds no model).

    ``rule_based_reward``: a ``reward_fn`` replaces the reward model; ``reward_kind`` then says how its
    credits are treated. Raises ``ValueError`` / ``FileNotFoundError`` naming the flag at fault."""
    dp_size = world_size // (cfg.parallel.tensor_model_parallel_size * cfg.parallel.pipeline_model_parallel_size)
    resume_dir, actor, reward_model, load = _checkpoints(cfg, rule_based_reward)
    actor_source = resume_dir or actor
    actor_cfg = _read(actor_source, "--actor-checkpoint")
    if resume_dir and not actor:  # the reference (and an actor-initialised critic) start from it
        actor = actor_cfg.get("rl", {}).get("initial_actor")
        if not actor:
            raise UserError(f"--load {cfg.load}: the checkpoint does not record the initial policy; pass "
                             f"--actor-checkpoint")
    rm_cfg = None if rule_based_reward else _read(reward_model, "--reward-model")
    kind = reward_kind if rm_cfg is None else rm_cfg.get("reward_loss", {}).get("kind", "qrm")
    model = ModelConfig.from_dict(actor_cfg["model"])
    check_parallel_layout(model, cfg.parallel, world_size)

    tok_path = cfg.tokenizer or actor_cfg.get("tokenizer")
    if not tok_path:
        raise UserError("--tokenizer is required: the actor checkpoint does not record one")
    tokenizer = load_tokenizer(tok_path)
    change = check_tokenizer_identity(actor_cfg, tokenizer, tok_path, checkpoint=actor_source,
                                      allow_change=cfg.allow_tokenizer_change)
    rm_tokenizer = None if rm_cfg is None else _reward_tokenizer(cfg, rm_cfg, reward_model, tokenizer, tok_path)
    resolved = dataclasses.replace(
        cfg, load=load, actor=actor, reward_model=reward_model,
        critic_init=_critic_init(cfg, rm_cfg, rm_tokenizer is not None),
        advantage=estimator_name(cfg.algo, cfg.advantage, kind))
    _check_batches(resolved, dp_size)

    # pre-flight: --save / --log-dir writable, room for one actor (+ critic) checkpoint, before any model
    need = checkpointing.estimate_checkpoint_bytes(model, "policy", bf16=cfg.bf16)
    if cfg.algo == "ppo":
        need += checkpointing.estimate_checkpoint_bytes(model, "critic", bf16=cfg.bf16)
    checkpointing.preflight_save_dir(cfg.save, "--save", need)
    checkpointing.preflight_save_dir(cfg.log_dir, "--log-dir")
    return RLRun(
        cfg=resolved, resume_dir=resume_dir, actor_source=actor_source, actor_config=actor_cfg, model=model,
        reward_config=rm_cfg, reward_kind=kind, tokenizer=tokenizer, tokenizer_path=tok_path,
        tokenizer_change=change, rm_tokenizer=rm_tokenizer,
        rm_chat_template=bool((rm_cfg or {}).get("chat_template", False)),
        rm_max_length=int(ModelConfig.from_dict(rm_cfg["model"]).max_position_embeddings) if rm_cfg else 0,
        dp_size=dp_size)


def describe(run: RLRun, prompts: Any) -> list[str]:
    """The lines the trainer logs about its set-up (rank 0)."""
    cfg = run.cfg
    lines = []
    if cfg.reward_model and run.reward_config is not None:
        lines.append(f"actor {run.actor_source}, reward model {cfg.reward_model}")
    lines.append(f"{cfg.algo}: reward={run.reward_kind} advantage={cfg.advantage} prompts={len(prompts)} "
                 f"({prompts.stats}) rollout={cfg.rollout_batch_size}x{cfg.samples_per_prompt}"
                 + (" (reward model scores re-tokenised responses)" if run.rm_tokenizer is not None else ""))
    return lines
