"""Batched sampling from a policy, under tensor and pipeline parallelism.

Two paths, the same loop and the same token selection:

* KV cache (default): :class:`megatron_qrm.models.kv_decode.KVCacheDecoder` -- every prompt prefilled in
  one forward pass (left padding, per-row positions), then one new token per row per step for all rows at
  once, keys cached after RoPE (a step's cost does not grow with the cache beyond attention itself).
  Rows that finished are dropped from the batch (and the cache) once at least half of it is done.
* full recomputation (``SamplingConfig(use_kv_cache=False)``, the reference for tests): megatron-core's
  own ``GPTModel.forward`` on the whole right-padded prefix at every step.

Tokens are picked on the vocabulary-parallel logits of the last pipeline stage
(:func:`megatron_qrm.rl.vocab_sampling.select_tokens`: greedy / Gumbel-max / top-k merged across TP
ranks, the vocabulary gathered only for top-p without top-k) and broadcast to every stage with their
behaviour log-probs (untempered logits, i.e. pi_old itself), recorded in the same pass.

All per-token outputs are indexed by the POSITION of the token they describe: ``logprobs[b, p]`` is
log pi(tokens[b, p] | tokens[b, :p]) and ``action_mask[b, p] = 1`` where tokens[b, p] was generated.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

from megatron_qrm.errors import UserError
from megatron_qrm.models import backend
from megatron_qrm.models.kv_decode import KVCacheDecoder
from megatron_qrm.options import option
from megatron_qrm.rl.vocab_sampling import filter_logits, select_tokens
from megatron_qrm.rl.vocab_sampling import sample_tokens as _sample_full

__all__ = ["FullRecomputeDecoder", "KVCacheDecoder", "Rollout", "SamplingConfig", "filter_logits", "generate",
           "sample_tokens"]


@dataclass
class SamplingConfig:
    """How rollouts are sampled (``qrm train-ppo`` / ``train-reinforce`` flags of the same names)."""

    temperature: float = option(1.0, help="sampling temperature (0: greedy)")
    """Softmax temperature; 0 picks the argmax."""
    top_p: float = option(1.0, help="nucleus sampling mass (1: off)")
    """Keep the smallest set of tokens whose probability reaches ``top_p``."""
    top_k: int = option(0, help="sample among the k most likely tokens (0: off)")
    """Keep the ``top_k`` most likely tokens (0: all)."""
    max_new_tokens: int = option(512, help="response tokens per sample at most")
    """Response length limit (also cut where prompt + response would pass ``--seq-length``)."""
    stop_token_ids: tuple[int, ...] = option(default_factory=tuple,
                                             help="comma-separated extra stop ids (EOS always stops)")
    """Token ids that end a response besides EOS."""
    use_kv_cache: bool = option(True, flag="--kv-cache",
                                help="sample with a KV cache (--no-kv-cache recomputes the prefix every step: "
                                     "the reference path for tests)")
    """False: recompute the whole prefix each step (reference path for tests)."""


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


def sample_tokens(logits: torch.Tensor, cfg: SamplingConfig, generator: torch.Generator) -> torch.Tensor:
    """Full-vocabulary logits [B, V] (one process) -> token ids [B], by the sampler's rule."""
    return _sample_full(logits, cfg.temperature, cfg.top_k, cfg.top_p, generator)


class FullRecomputeDecoder:
    """Reference decoder: megatron-core's ``GPTModel.forward`` on the whole prefix at every step.

    Rows are kept right-padded ``[B, L]``; causal attention makes the padding after a row invisible to it,
    so each row's next-token logits are read at its own last column. Same interface as
    :class:`KVCacheDecoder` (``prefill`` / ``step`` / ``select``); returns vocabulary-parallel logits
    ``[B, V/tp]`` on the last pipeline stage, None elsewhere.
    """

    def __init__(self, model, batch_size: int, max_columns: int, device: torch.device):
        self.model = model
        config = getattr(model, "config", None) or model.module.config
        self.hidden, self.dtype = config.hidden_size, config.params_dtype
        self.tokens = torch.zeros(batch_size, max_columns, dtype=torch.long, device=device)
        self.lens = torch.zeros(batch_size, dtype=torch.long, device=device)

    def prefill(self, tokens: torch.Tensor, prompt_lens: torch.Tensor) -> Optional[torch.Tensor]:
        """tokens [B, P] LEFT-padded prompts (as the KV decoder takes them)."""
        b, p = tokens.shape
        lens = prompt_lens.to(self.tokens.device)
        cols = torch.arange(p, device=tokens.device)
        src = (cols.unsqueeze(0) + (p - lens).unsqueeze(1)).clamp(max=p - 1)  # left- -> right-padded
        self.tokens[:, :p] = torch.where(cols.unsqueeze(0) < lens.unsqueeze(1), tokens.gather(1, src), 0)
        self.lens = lens.clone()
        return self._logits()

    def step(self, tokens: torch.Tensor) -> Optional[torch.Tensor]:
        self.tokens.scatter_(1, self.lens.unsqueeze(1), tokens.unsqueeze(1))
        self.lens = self.lens + 1
        return self._logits()

    def select(self, rows: torch.Tensor) -> None:
        self.tokens = self.tokens.index_select(0, rows)
        self.lens = self.lens.index_select(0, rows)

    @torch.no_grad()
    def _logits(self) -> Optional[torch.Tensor]:
        width = int(self.lens.max())
        tokens = self.tokens[:, :width]
        b = tokens.shape[0]
        positions = torch.arange(width, device=tokens.device).unsqueeze(0).expand(b, width)
        multi_stage = ps.get_pipeline_model_parallel_world_size() > 1
        if multi_stage and not ps.is_pipeline_first_stage():
            recv = torch.empty(width, b, self.hidden, dtype=self.dtype, device=tokens.device)
            dist.recv(recv, src=ps.get_pipeline_model_parallel_prev_rank(), group=ps.get_pipeline_model_parallel_group())
            self.model.set_input_tensor(recv)
        out = self.model(tokens, positions, attention_mask=None)
        if multi_stage and not ps.is_pipeline_last_stage():
            dist.send(out.contiguous(), dst=ps.get_pipeline_model_parallel_next_rank(),
                      group=ps.get_pipeline_model_parallel_group())
            return None
        return out[torch.arange(b, device=tokens.device), self.lens - 1]  # [B, V/tp]


def _layout_prompts(prompts: Sequence[Sequence[int]], prompt_lens: torch.Tensor, pad_id: int,
                    total: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The prompts LEFT-padded to the longest, ``[B, P]`` (the prefill's input), and RIGHT-padded at the start
    of the output buffer ``[B, total]`` (the responses are written after them)."""
    bsz, longest = len(prompts), int(prompt_lens.max())
    flat = torch.tensor([t for p in prompts for t in p], dtype=torch.long)
    row = torch.repeat_interleave(torch.arange(bsz), prompt_lens)
    col = torch.arange(flat.numel()) - torch.repeat_interleave(torch.cumsum(prompt_lens, 0) - prompt_lens, prompt_lens)
    left = torch.full((bsz, longest), pad_id, dtype=torch.long)
    left[row, col + (longest - prompt_lens)[row]] = flat
    tokens = torch.full((bsz, total), pad_id, dtype=torch.long)
    tokens[row, col] = flat
    return left, tokens


def _next_tokens(logits: Optional[torch.Tensor], cfg: SamplingConfig, vocab_size: int, gen: torch.Generator,
                 n: int, dev: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The next token of each of the ``n`` rows and its behaviour log-prob, ``[n]`` each: picked on the last
    pipeline stage from the vocabulary-parallel ``logits`` ``[n, V/tp]``, broadcast to every stage."""
    if ps.is_pipeline_last_stage():
        new, logp = select_tokens(logits, temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p,
                                  vocab_size=vocab_size, generator=gen)
    else:
        new = torch.empty(n, dtype=torch.long, device=dev)
        logp = torch.empty(n, dtype=torch.float32, device=dev)
    if ps.get_pipeline_model_parallel_world_size() > 1:
        src, group = ps.get_pipeline_model_parallel_last_rank(), ps.get_pipeline_model_parallel_group()
        dist.broadcast(new, src=src, group=group)
        dist.broadcast(logp, src=src, group=group)
    return new, logp


def _decoder(model, cfg: SamplingConfig, batch_size: int, columns: int, dev: torch.device):
    """(decoder, the context its loop runs in): the KV-cache decoder (CPU runs suspend the CUDA emulation's
    per-op hook there: the loop creates no CUDA tensors), or full recomputation (``use_kv_cache`` False)."""
    if cfg.use_kv_cache:
        return KVCacheDecoder(model, batch_size, columns, columns + 1, dev), backend.decode_context()
    return FullRecomputeDecoder(model, batch_size, columns, dev), contextlib.nullcontext()


@torch.no_grad()
def generate(model, prompts: Sequence[Sequence[int]], cfg: SamplingConfig, *, eos_id: int, pad_id: int,
             vocab_size: int, max_length: int, seed: int = 0) -> Rollout:
    """Sample one response per prompt (duplicate prompts for several samples per prompt).

    ``max_length`` bounds prompt + response (the model's --seq-length); a prompt that does not
    leave room for one token raises ``ValueError``. Collective over the model-parallel groups: every rank
    of a TP/PP group calls it with the same prompts and seed and gets the same Rollout.
    """
    dev = _device()
    bsz = len(prompts)
    prompt_lens = torch.tensor([len(p) for p in prompts], dtype=torch.long)
    too_long = (prompt_lens >= max_length).nonzero().flatten().tolist()
    if too_long:
        raise UserError(f"{len(too_long)} prompt(s) (e.g. #{too_long[0]}, {int(prompt_lens[too_long[0]])} tokens) "
                        f"leave no room to generate within --seq-length {max_length}")
    longest = int(prompt_lens.max())
    total = int(min(max_length, longest + cfg.max_new_tokens))
    # each row's budget: max_new_tokens, cut where prompt + response would pass max_length
    budget = torch.clamp(max_length - prompt_lens, max=cfg.max_new_tokens).to(dev)  # [B] >= 1
    steps = int(budget.max())

    left, tokens = _layout_prompts(prompts, prompt_lens, pad_id, total)
    tokens, left, prompt_lens_d = tokens.to(dev), left.to(dev), prompt_lens.to(dev)
    logprobs = torch.zeros(bsz, total, dtype=torch.float32, device=dev)
    action = torch.zeros(bsz, total, dtype=torch.float32, device=dev)
    finished = torch.zeros(bsz, dtype=torch.bool, device=dev)
    stops = torch.tensor(sorted({eos_id, *cfg.stop_token_ids}), device=dev)
    gen = torch.Generator(device=dev).manual_seed(seed)

    was_training = model.training
    model.eval()
    decoder, suspend = _decoder(model, cfg, bsz, longest + steps, dev)
    rows = torch.arange(bsz, device=dev)  # original index of each row still in the decoder's batch
    alive = torch.ones(bsz, dtype=torch.bool, device=dev)  # per decoder row: still generating
    with suspend:
        logits = decoder.prefill(left, prompt_lens_d)
        for t in range(steps):
            n = rows.numel()
            new, logp = _next_tokens(logits, cfg, vocab_size, gen, n, dev)
            live = rows[alive]
            pos = prompt_lens_d[live] + t
            tokens[live, pos] = new[alive]
            logprobs[live, pos] = logp[alive].float()
            action[live, pos] = 1.0
            hit_stop = torch.isin(new, stops) & alive
            finished[rows[hit_stop]] = True
            alive = alive & ~hit_stop & (t + 1 < budget[rows])
            n_alive = int(alive.sum())
            if n_alive == 0 or t + 1 == steps:
                break
            feed = torch.where(alive, new, torch.full_like(new, pad_id))
            if n_alive <= n // 2:  # compact: the copy costs about one step over the cache, and saves many
                keep = alive.nonzero().flatten()
                decoder.select(keep)
                rows, feed, alive = rows[keep], feed[keep], alive[keep]
            logits = decoder.step(feed)
    if was_training:
        model.train()
    response_lens = action.sum(-1).long()
    return Rollout(tokens.cpu(), prompt_lens, response_lens.cpu(), logprobs.cpu(), action.cpu(), finished.cpu())
