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
from typing import Callable, Optional

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

from megatron_qrm import checkpointing, parallel
from megatron_qrm.data import PromptDataset
from megatron_qrm.data.chat import resolve_chat_template
from megatron_qrm.data.packing import unpack
from megatron_qrm.data.sampler import GlobalBatchSampler
from megatron_qrm.errors import NonFiniteError, UserFileNotFoundError
from megatron_qrm.models import LoRAConfig
from megatron_qrm.models.lora import lora_disabled
from megatron_qrm.models.packing_support import unsupported_reason
from megatron_qrm.rewards.losses import last_token_values
from megatron_qrm.rl import advantages as adv
from megatron_qrm.rl import losses as rl_losses
from megatron_qrm.rl.batch import UPDATE_FIELDS, Experience, gather_rows_over_dp
from megatron_qrm.rl.config import RLConfig
from megatron_qrm.rl.estimators import ESTIMATORS, EstimatorInputs, EstimatorSettings
from megatron_qrm.rl.experience import (
    head_scores,
    policy_logprobs,
    policy_logprobs_and_full_kl,
    retokenize_for_reward,
    shift_right,
)
from megatron_qrm.rl.kl import kl_penalty
from megatron_qrm.rl.roles import build_roles, offload
from megatron_qrm.rl.rollout_engine import logprob_mismatch
from megatron_qrm.rl.run_setup import check_optimizer_flags, describe, resolve_rl_run
from megatron_qrm.rl.update_batching import (
    token_entropy_rows,
    token_logprobs_rows,
    update_forward_step,
    update_microbatches,
)
from megatron_qrm.training.checkpoint_record import checkpoint_record
from megatron_qrm.training.engine import NonFiniteGuard
from megatron_qrm.training.metrics_log import MetricsLogger
from megatron_qrm.training.step import optimizer_step

log = logging.getLogger("megatron_qrm")


# ----------------------------------------------------------------------------- the trainer
RewardFn = Callable[[dict], torch.Tensor]


class RLTrainer:
    """``reward_fn(exp) -> credits [N, L]`` replaces the reward model (rule-based token rewards, e.g.
    the demo's checker or a test's synthetic reward); ``rm_kind`` then says how to treat them."""

    def __init__(self, cfg: RLConfig, reward_fn: Optional[RewardFn] = None, reward_kind: str = "qrm"):
        check_optimizer_flags(cfg)
        parallel.initialize(cfg.parallel)
        run = resolve_rl_run(cfg, world_size=dist.get_world_size(), rule_based_reward=reward_fn is not None,
                             reward_kind=reward_kind)
        self.run, self.cfg, self.reward_fn = run, run.cfg, reward_fn
        self.rm_kind, self.model_cfg, self.resume_dir = run.reward_kind, run.model, run.resume_dir
        self.tokenizer, self.tokenizer_path = run.tokenizer, run.tokenizer_path
        # the reward model's own tokenizer, when responses are re-tokenised for it (tests may set these)
        self.rm_tokenizer, self.rm_chat_template, self.rm_max_length = (run.rm_tokenizer, run.rm_chat_template,
                                                                        run.rm_max_length)
        self._rm_prompt_cache: dict[int, list[int]] = {}
        self.estimator = ESTIMATORS[self.cfg.advantage]
        self.prompts = PromptDataset(dataclasses.replace(self.cfg.prompts, chat_template=resolve_chat_template(
            self.cfg.prompts.chat_template, self.tokenizer, run.actor_config)), self.tokenizer)
        self.dp_rank, self.dp_size = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
        self.sampler = GlobalBatchSampler(len(self.prompts), self.cfg.rollout_batch_size,
                                          self.cfg.rollout_batch_size // self.dp_size, self.dp_rank, self.dp_size,
                                          seed=self.cfg.parallel.seed)
        self.roles = build_roles(self.cfg, run.actor_config, run.reward_config)
        self.state = checkpointing.TrainState()
        if run.resume_dir:
            self._load(run.resume_dir)
        self.ckpt_config = self._checkpoint_record()
        self.logger = MetricsLogger(self.cfg.log_dir or self.cfg.save, enabled=parallel.is_rank0(),
                                    tensorboard=self.cfg.tensorboard, wandb_project=self.cfg.wandb_project,
                                    wandb_run_name=self.cfg.wandb_run_name, total_steps=self.cfg.train_iters,
                                    start_step=self.state.iteration, desc=f"train-{self.cfg.algo} ({self.rm_kind})",
                                    supersede_after_start=True)
        self.guards = {"actor": NonFiniteGuard(self.cfg.max_nonfinite_steps, what="iteration"),
                       "critic": NonFiniteGuard(self.cfg.max_nonfinite_steps, what="iteration")}
        for line in describe(run, self.prompts):
            self.logger.message(line)
        if run.resume_dir:
            self.logger.message(f"resumed from {run.resume_dir} at iteration {self.state.iteration}")

    def _checkpoint_record(self) -> dict:
        """The ``qrm_config.json`` of the actor's checkpoints."""
        cfg, run = self.cfg, self.run
        return checkpoint_record(
            "policy", "policy", self.model_cfg, tokenizer=self.tokenizer, tokenizer_path=self.tokenizer_path,
            inherited=run.actor_config, tokenizer_change=run.tokenizer_change, lora=LoRAConfig(),
            chat_template=self.prompts.cfg.chat_template, seq_length=cfg.prompts.seq_length,
            rl={"algo": cfg.algo, "advantage": cfg.advantage, "reward_model": cfg.reward_model,
                "reward_kind": self.rm_kind, "initial_actor": os.path.abspath(cfg.actor)})

    # ---- checkpoints (critic first, actor last: the actor's `latest` commits the iteration)
    def _save(self) -> None:
        cfg, r = self.cfg, self.roles
        if not cfg.save:
            return
        if r.critic is not None:
            checkpointing.save_checkpoint(os.path.join(cfg.save, "critic"), self.state.iteration, r.critic,
                                          checkpoint_record("critic", "critic", self.model_cfg),
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
                raise UserFileNotFoundError(f"--load {self.cfg.load}: critic checkpoint {critic_dir} is missing")
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

    def rollout(self) -> Experience:
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
        return Experience.from_rollouts(parts, torch.as_tensor(indices), self.tokenizer.pad_id)

    # ---- 2. scores
    def score(self, exp: Experience) -> Experience:
        cfg, r = self.cfg, self.roles
        mb, vocab = cfg.forward_micro_batch_size, self.tokenizer.vocab_size
        need_ref = r.reference is not None
        if need_ref and cfg.kl_estimator == "full":
            offload(r.reference, True, cfg.offload)
            exp.logp_old, exp.logp_ref, exp.kl = policy_logprobs_and_full_kl(r.actor, r.reference, exp, mb, vocab)
            offload(r.reference, False, cfg.offload)
        else:
            exp.logp_old = policy_logprobs(r.actor, exp, mb, vocab)
            if need_ref:
                offload(r.reference, True, cfg.offload)
                exp.logp_ref = policy_logprobs(r.reference, exp, mb, vocab)
                offload(r.reference, False, cfg.offload)
                if exp.logp_old is not None:
                    exp.kl = kl_penalty(cfg.kl_estimator, logp=exp.logp_old, logp_ref=exp.logp_ref)
        offload(r.reward, True, cfg.offload)
        if self.reward_fn is not None:
            exp.credits = self.reward_fn(exp) if ps.is_pipeline_last_stage() else None
        elif self.rm_tokenizer is not None:
            exp.credits = self.retokenized_credits(exp)
        else:
            exp.credits = self._reward_credits(exp, vocab)
        offload(r.reward, False, cfg.offload)
        if r.critic is not None:
            exp.values = head_scores(r.critic, exp, mb, shift_to_state=True)
        return exp

    def _reward_credits(self, exp, vocab: int) -> Optional[torch.Tensor]:
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
    def advantages(self, exp: Experience) -> dict[str, float]:
        """Adds ``advantages`` and ``returns`` ``[n, L]`` (this rank's rows) to ``exp``, computed by the run's
        estimator (:mod:`megatron_qrm.rl.estimators`) over every data-parallel rank's rows; returns the
        rollout's statistics. Last pipeline stage only (elsewhere: ``{}``)."""
        cfg = self.cfg
        if not ps.is_pipeline_last_stage():
            return {}
        mask = exp["action_mask"]
        n = mask.shape[0]
        g = {k: gather_rows_over_dp(exp[k]) for k in ("credits", "action_mask", "values", "kl", "logp_old", "logp_ref")
             if exp.get(k) is not None}
        gmask = g["action_mask"]
        zeros = torch.zeros_like(gmask)
        if self.rm_kind == "orm":  # the ORM scores the last token: its credit is the sequence reward
            seq = last_token_values(g["credits"], gmask)
            rewards = adv.orm_token_rewards(seq, gmask)
        else:
            seq, rewards = None, g["credits"] * gmask
        logp_old = g.get("logp_old", zeros)
        inputs = EstimatorInputs(rewards=rewards, sequence_reward=seq, values=g.get("values", zeros),
                                 kl=g.get("kl", zeros), logp_old=logp_old, logp_ref=g.get("logp_ref", logp_old),
                                 mask=gmask)
        out = self.estimator(inputs, EstimatorSettings(kl_coef=cfg.kl_coef, value_coef=cfg.value_coef,
                                                       gamma=cfg.gamma, lam=cfg.lam,
                                                       reinforce_center=cfg.reinforce_center,
                                                       eos_rescore=cfg.eos_rescore))
        start = sum(int(x) for x in self._dp_counts()[: self.dp_rank])
        rows = slice(start, start + n)
        exp.advantages = out.advantages[rows, : mask.shape[1]].contiguous()
        exp.returns = out.returns[rows, : mask.shape[1]].contiguous()
        tok = gmask.sum().clamp(min=1)
        seq_score = (rewards * gmask).sum(-1) / gmask.sum(-1).clamp(min=1) if seq is None else seq
        return {
            "token_reward_mean": float((rewards * gmask).sum() / tok),
            "sequence_score_mean": float(seq_score.mean()),
            "kl_mean": float((inputs.kl * gmask).sum() / tok),
            "advantage_mean": float((out.advantages * gmask).sum() / tok),
            "response_length": float(gmask.sum(-1).float().mean()),
        }

    def _dp_counts(self) -> list[int]:
        n = torch.tensor([self.cfg.rollout_batch_size // self.dp_size * self.cfg.samples_per_prompt])
        out = parallel.all_gather_host(n, group=ps.get_data_parallel_group())
        return [int(x) for x in out]

    # ---- 4. updates
    def _update(self, model, optimizer, scheduler, exp: Experience, loss_fn, names: tuple[str, ...]
                ) -> dict[str, float]:
        """``--ppo-epochs`` passes over the rollout in optimizer steps of ``--global-batch-size`` rows; returns the
        sums of the metrics ``names`` over the steps taken."""
        cfg = self.cfg
        n = exp["tokens"].shape[0]
        per_step = cfg.global_batch_size // self.dp_size
        totals: dict[str, float] = {k: 0.0 for k in names}
        for epoch in range(cfg.ppo_epochs):
            order = np.random.RandomState(cfg.parallel.seed + 7919 * self.state.iteration + epoch).permutation(n)
            for s in range(0, n, per_step):
                rows = order[s:s + per_step]
                capacity = None
                if cfg.pack_sequences and not unsupported_reason(model):
                    capacity = cfg.pack_tokens or cfg.micro_batch_size * exp["tokens"].shape[1]
                micro = update_microbatches(exp, rows, UPDATE_FIELDS, cfg.micro_batch_size, self.tokenizer.pad_id, capacity)
                label = "actor" if model is self.roles.actor else "critic"
                result = optimizer_step(model, optimizer, scheduler, forward_step=update_forward_step(loss_fn),
                                        microbatches=micro, metric_names=names, guard=self.guards[label],
                                        step=self.state.iteration + 1, loss_name=names[0], label=label)
                if not result.stepped:
                    continue  # non-finite loss or gradients: no update (the guard stops a run that persists)
                for k in names:
                    totals[k] += result.sums[k]
        return totals

    def _actor_loss(self, output, batch):
        """``output``: the actor's vocab-parallel logits as the model produced them (packed ``[1, T, V/tp]`` or
        padded ``[N, S, V/tp]``); log-probs and entropy are computed on that layout and unpacked as ``[N, S]``
        (rl/update_batching.py)."""
        cfg = self.cfg
        vocab = self.tokenizer.vocab_size
        logp = token_logprobs_rows(output, batch, vocab)
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
        # entropy of pi(.|s_t) at the state before each action; without an entropy bonus only logged (no_grad)
        ent = token_entropy_rows(output, batch, vocab, ps.get_tensor_model_parallel_group(),
                                 grad=cfg.entropy_coef > 0)
        ent_sum = (shift_right(ent) * mask).sum()
        metrics["entropy_sum"] = ent_sum.detach()
        loss_sum = out.loss_sum - cfg.entropy_coef * ent_sum if cfg.entropy_coef > 0 else out.loss_sum
        return loss_sum, count.to(torch.int), metrics

    def _critic_loss(self, output, batch):
        values = shift_right(unpack(output, batch).squeeze(-1).float())  # V(s_t) for the action at p sits at p - 1
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
            stats.update(logprob_mismatch(exp))
            self._check_finite(exp)
            times["score_s"] = time.time() - t1
            t2 = time.time()
            actor_names = ("policy_loss_sum", "tokens", "clipped_sum", "ratio_sum", "approx_kl_sum", "entropy_sum")
            a = self._update(r.actor, r.actor_optimizer, r.actor_scheduler, exp, self._actor_loss, actor_names)
            c = None
            if r.critic is not None:
                c = self._update(r.critic, r.critic_optimizer, r.critic_scheduler, exp, self._critic_loss,
                                 ("value_loss_sum", "tokens"))
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
            if self.state.iteration % cfg.log_interval == 0 or self.state.iteration == cfg.train_iters:
                self.logger.log(self.state.iteration, last)
            if cfg.save and (self.state.iteration % cfg.save_interval == 0 or self.state.iteration == cfg.train_iters):
                self._save()
            if cfg.exit_interval and self.state.iteration % cfg.exit_interval == 0 and self.state.iteration < cfg.train_iters:
                if cfg.save and self.state.iteration % cfg.save_interval != 0:
                    self._save()
                break
        self.logger.close()
        return last

    def _check_finite(self, exp: Experience) -> None:
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
