"""Batched sampling from a policy with a KV cache, under tensor and pipeline parallelism.

A lean sampler on megatron-core's ``StaticInferenceContext``: prompts of different lengths sit
right-padded in one [B, L] buffer; the shortest prompt is prefilled at once, then every step feeds
one position for the whole batch. Where a row is still inside its prompt the prompt token is forced
instead of the sample (so positions stay aligned and no left padding is needed).

Logits are gathered across TP (``runtime_gather_output``), so every TP rank sees the same
distribution; the last pipeline stage samples and broadcasts the tokens to all stages. The
behaviour log-prob of each sampled token (untempered logits, i.e. the policy pi_old itself) is
recorded in the same pass.

All per-token outputs are indexed by the POSITION of the token they describe: ``logprobs[b, p]`` is
log pi(tokens[b, p] | tokens[b, :p]) and ``action_mask[b, p] = 1`` where tokens[b, p] was generated.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from megatron.core.inference.contexts import StaticInferenceContext


@dataclass
class SamplingConfig:
    temperature: float = 1.0  # 0 -> greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 -> off
    max_new_tokens: int = 256
    stop_token_ids: tuple[int, ...] = field(default_factory=tuple)  # EOS is always a stop token
    use_kv_cache: bool = True  # False: recompute the whole prefix each step (reference path for tests)


@dataclass
class Rollout:
    tokens: torch.Tensor  # [B, L] prompt + response, right-padded with pad_id
    prompt_lens: torch.Tensor  # [B]
    response_lens: torch.Tensor  # [B] generated tokens incl. the stop token
    logprobs: torch.Tensor  # [B, L] behaviour log-prob of generated tokens (0 elsewhere)
    action_mask: torch.Tensor  # [B, L] 1.0 at generated positions
    finished: torch.Tensor  # [B] bool: ended with a stop token (else cut at max_new_tokens/length)

    def response_ids(self, i: int) -> list[int]:
        p, r = int(self.prompt_lens[i]), int(self.response_lens[i])
        return self.tokens[i, p:p + r].tolist()


def _device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def filter_logits(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Mask logits [B, V] outside the top-k and the top-p nucleus with -inf (vectorised)."""
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # drop a token when the mass before it already reaches top_p (the first token always stays)
        drop_sorted = (probs.cumsum(-1) - probs) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample_tokens(logits: torch.Tensor, cfg: SamplingConfig, generator: torch.Generator) -> torch.Tensor:
    """logits [B, V] (fp32) -> token ids [B]."""
    if cfg.temperature <= 0:
        return logits.argmax(-1)
    probs = filter_logits(logits / cfg.temperature, cfg.top_k, cfg.top_p).softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


class PipelinedForward:
    """One forward of a (possibly pipelined) GPTModel on [B, s] tokens; returns the last position's
    full-vocabulary logits [B, V] on every rank (broadcast from the last stage)."""

    def __init__(self, model, vocab_size: int):
        self.model = model
        self.vocab_size = vocab_size
        self.hidden = model.config.hidden_size
        self.dtype = model.config.params_dtype

    def __call__(self, tokens: torch.Tensor, positions: torch.Tensor, ctx: Optional[StaticInferenceContext]):
        b, s = tokens.shape
        pp_group = ps.get_pipeline_model_parallel_group()
        multi_stage = ps.get_pipeline_model_parallel_world_size() > 1
        if multi_stage and not ps.is_pipeline_first_stage():
            recv = torch.empty(s, b, self.hidden, dtype=self.dtype, device=tokens.device)
            dist.recv(recv, src=ps.get_pipeline_model_parallel_prev_rank(), group=pp_group)
            self.model.set_input_tensor(recv)
        out = self.model(tokens, positions, attention_mask=None, inference_context=ctx, runtime_gather_output=True)
        if multi_stage and not ps.is_pipeline_last_stage():
            dist.send(out.contiguous(), dst=ps.get_pipeline_model_parallel_next_rank(), group=pp_group)
            logits = torch.empty(b, self.vocab_size, dtype=torch.float32, device=tokens.device)
        else:
            logits = out[:, -1, : self.vocab_size].float().contiguous()  # drop vocab padding
        if multi_stage:
            dist.broadcast(logits, src=ps.get_pipeline_model_parallel_last_rank(), group=pp_group)
        return logits


@torch.no_grad()
def generate(model, prompts: Sequence[Sequence[int]], cfg: SamplingConfig, *, eos_id: int, pad_id: int,
             vocab_size: int, max_length: int, seed: int = 0) -> Rollout:
    """Sample one response per prompt (duplicate prompts for several samples per prompt).

    ``max_length`` bounds prompt + response (the model's --seq-length); a prompt that does not
    leave room for one token raises ``ValueError``.
    """
    dev = _device()
    bsz = len(prompts)
    prompt_lens = torch.tensor([len(p) for p in prompts], dtype=torch.long)
    too_long = (prompt_lens >= max_length).nonzero().flatten().tolist()
    if too_long:
        raise ValueError(f"{len(too_long)} prompt(s) (e.g. #{too_long[0]}, {int(prompt_lens[too_long[0]])} tokens) "
                         f"leave no room to generate within --seq-length {max_length}")
    total = int(min(max_length, int(prompt_lens.max()) + cfg.max_new_tokens))
    tokens = torch.full((bsz, total), pad_id, dtype=torch.long)
    for i, p in enumerate(prompts):  # building the input buffer, once per batch
        tokens[i, : len(p)] = torch.as_tensor(p, dtype=torch.long)
    tokens = tokens.to(dev)
    prompt_lens_d = prompt_lens.to(dev)
    limit = torch.clamp(prompt_lens_d + cfg.max_new_tokens, max=total)  # first position not allowed
    logprobs = torch.zeros(bsz, total, dtype=torch.float32, device=dev)
    action = torch.zeros(bsz, total, dtype=torch.float32, device=dev)
    done = torch.zeros(bsz, dtype=torch.bool, device=dev)
    finished = torch.zeros(bsz, dtype=torch.bool, device=dev)
    stops = torch.tensor(sorted({eos_id, *cfg.stop_token_ids}), device=dev)
    gen = torch.Generator(device=dev).manual_seed(seed)
    forward = PipelinedForward(model, vocab_size)
    positions = torch.arange(total, device=dev).unsqueeze(0).expand(bsz, total)

    was_training = model.training
    model.eval()
    ctx = StaticInferenceContext(bsz, total) if cfg.use_kv_cache else None
    start = int(prompt_lens.min())
    if ctx is not None:  # prefill the common prompt prefix
        logits = forward(tokens[:, :start], positions[:, :start], ctx)
        ctx.increment_sequence_len_offset(start)
        ctx.enable_decode_mode()
    for t in range(start, total):
        if ctx is None:
            logits = forward(tokens[:, :t], positions[:, :t], None)
        sampled = sample_tokens(logits, cfg, gen)
        if ps.get_tensor_model_parallel_world_size() > 1:  # identical on all TP ranks, made certain
            dist.broadcast(sampled, src=ps.get_tensor_model_parallel_src_rank(),
                           group=ps.get_tensor_model_parallel_group())
        generating = (t >= prompt_lens_d) & ~done & (t < limit)
        new = torch.where(t < prompt_lens_d, tokens[:, t], torch.where(generating, sampled, torch.full_like(sampled, pad_id)))
        tokens[:, t] = new
        logp = torch.log_softmax(logits, -1).gather(-1, new.unsqueeze(-1)).squeeze(-1)
        logprobs[:, t] = torch.where(generating, logp, torch.zeros_like(logp))
        action[:, t] = generating.float()
        hit_stop = generating & torch.isin(new, stops)
        finished |= hit_stop
        done |= hit_stop | (generating & (t + 1 >= limit))
        if bool(done.all()) and t + 1 >= int(prompt_lens.max()):
            break
        if ctx is not None and t + 1 < total:
            logits = forward(tokens[:, t:t + 1], positions[:, t:t + 1], ctx)
            ctx.increment_sequence_len_offset(1)
    if was_training:
        model.train()
    response_lens = action.sum(-1).long()
    return Rollout(tokens.cpu(), prompt_lens, response_lens.cpu(), logprobs.cpu(), action.cpu(), finished.cpu())
