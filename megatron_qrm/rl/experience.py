"""Per-token quantities of a rollout, computed with megatron-core's forward-only schedule.

Every tensor is [N, L] and indexed by the position of the token it describes (see
:mod:`megatron_qrm.rl.rollout`): ``logp[:, p] = log pi(tokens[:, p] | tokens[:, :p])``; the Q-RM credit
Z(s_t, a_t) is the reward head's output AT the action's position p; the critic's V(s_t) is its head
output at p - 1 (the state before the action). Results exist on the last pipeline stage (``None``
elsewhere), which is also where the update's loss functions run.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import torch
from megatron.core import parallel_state as ps
from megatron_qrm.errors import UserError
from megatron_qrm.models.logits import mask_padded_vocab, next_token_nll  # noqa: F401  (re-exported)
from megatron_qrm.rl.kl import vocab_parallel_full_kl
from megatron_qrm.training.engine import run_global_batch, to_device

def shift_right(x: torch.Tensor) -> torch.Tensor:
    """[b, s] values about the NEXT token (computed at p) -> indexed by that token's position (p+1)."""
    return torch.cat([torch.zeros_like(x[:, :1]), x[:, :-1]], dim=1)


def token_logprobs(local_logits: torch.Tensor, tokens: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Position-aligned log-probs [b, s] of ``tokens`` from vocab-parallel logits [b, s, V/tp]."""
    labels = torch.cat([tokens[:, 1:], tokens[:, -1:]], dim=1)
    return shift_right(-next_token_nll(local_logits, labels, vocab_size))


def _batches(exp: dict[str, torch.Tensor], micro_batch_size: int, keys=("tokens", "position_ids")) -> list[dict]:
    n = exp["tokens"].shape[0]
    return [{k: exp[k][i:i + micro_batch_size] for k in keys} | {"rows": torch.arange(i, min(i + micro_batch_size, n))}
            for i in range(0, n, micro_batch_size)]


def forward_collect(model, batches: list[dict], compute: Callable[[torch.Tensor, dict], dict]) -> list[dict]:
    """Forward-only pass over ``batches``; ``compute(output, batch)`` runs on the last stage and its
    dicts (detached tensors) are returned there (an empty list elsewhere)."""

    def forward_step(data_iterator, m):
        batch = to_device(next(data_iterator))
        out = m(batch["tokens"], batch["position_ids"], attention_mask=None)

        def loss_func(output):
            with torch.no_grad():
                res = compute(output, batch)
            return torch.zeros((), device=output.device), torch.zeros((), dtype=torch.int), res

        return out, loss_func

    was_training = model.training
    model.eval()
    with torch.no_grad():
        outs = run_global_batch(model, forward_step, batches, forward_only=True)
    if was_training:
        model.train()
    return outs


def _assemble(outs: list[dict], key: str, n: int, length: int) -> Optional[torch.Tensor]:
    if not outs:
        return None
    full = torch.zeros(n, length, dtype=torch.float32)
    for o in outs:
        full[o["rows"].cpu()] = o[key].float().cpu()
    return full


def policy_logprobs(model, exp: dict, micro_batch_size: int, vocab_size: int) -> Optional[torch.Tensor]:
    """Teacher-forced log-probs [N, L] of the rollout tokens under ``model``."""
    n, length = exp["tokens"].shape
    outs = forward_collect(model, _batches(exp, micro_batch_size),
                           lambda out, b: {"logp": token_logprobs(out, b["tokens"], vocab_size), "rows": b["rows"]})
    return _assemble(outs, "logp", n, length)


def policy_logprobs_and_full_kl(actor, reference, exp: dict, micro_batch_size: int, vocab_size: int):
    """(actor log-probs, reference log-probs, KL(pi_actor(.|s_t) || pi_ref(.|s_t))), each [N, L].

    The KL of the state before the action at p uses both models' full next-token distributions at
    p - 1, over vocab-parallel logits (never gathered). One micro-batch at a time: the actor's local
    logits are kept only until the reference's arrive.
    """
    n, length = exp["tokens"].shape
    tp_group = ps.get_tensor_model_parallel_group()
    logp, logp_ref, kl = [], [], []
    for batch in _batches(exp, micro_batch_size):
        stash = {}

        def actor_fn(out, b):
            stash["logits"] = mask_padded_vocab(out.float(), vocab_size)
            return {"logp": token_logprobs(out, b["tokens"], vocab_size), "rows": b["rows"]}

        def ref_fn(out, b):
            ref_logits = mask_padded_vocab(out.float(), vocab_size)
            kl_next = vocab_parallel_full_kl(stash.pop("logits"), ref_logits, tp_group)
            return {"logp": token_logprobs(out, b["tokens"], vocab_size), "kl": shift_right(kl_next),
                    "rows": b["rows"]}

        logp += forward_collect(actor, [batch], actor_fn)
        ref_out = forward_collect(reference, [batch], ref_fn)
        logp_ref += ref_out
        kl += ref_out
    return _assemble(logp, "logp", n, length), _assemble(logp_ref, "logp", n, length), _assemble(kl, "kl", n, length)


def head_scores(model, exp: dict, micro_batch_size: int, shift_to_state: bool) -> Optional[torch.Tensor]:
    """Token-head outputs [N, L]: at the action's own position (Q-RM credit Z, ``shift_to_state``
    False) or at the position before it (critic V(s_t), ``shift_to_state`` True)."""
    n, length = exp["tokens"].shape

    def fn(out, b):
        s = out.squeeze(-1).float()
        return {"v": shift_right(s) if shift_to_state else s, "rows": b["rows"]}

    return _assemble(forward_collect(model, _batches(exp, micro_batch_size), fn), "v", n, length)


# ----------------------------------------------------------------------------- re-tokenising for a reward model
# (--allow-retokenize: the reward model was trained with another tokenizer than the actor's)

RETOKENIZE_CONTEXT = 6  # ids decoded before each id: SentencePiece leading spaces, UTF-8 split over byte tokens


def _nonspace(text: str) -> int:
    return sum(1 for c in text if not c.isspace())


def _decode_many(tokenizer, seqs: list[list[int]]) -> list[str]:
    """Decode many id lists; one backend call when the tokenizer offers ``decode_batch``."""
    batch = getattr(tokenizer, "decode_batch", None)
    if batch is not None:
        return list(batch(seqs))
    return [tokenizer.decode(s) if s else "" for s in seqs]


def token_text_ends(tokenizer, contexts: list[list[int]], seqs: list[list[int]],
                    window: int = RETOKENIZE_CONTEXT) -> tuple[list[str], list[list[int]], list[list[int]]]:
    """For each row: the text ``seq`` adds after ``context`` (so a leading space survives) and, for each id
    of ``seq``, where it ends in that text: in characters, and in non-whitespace characters.

    Each id's share is measured with the ``window`` ids before it as context (decode(ctx + [id]) minus
    decode(ctx)): a SentencePiece word-initial piece keeps its space, an id that completes a UTF-8
    character split over byte tokens adds 0 (the replacement character was counted at the first byte).
    Non-whitespace counts make positions comparable between tokenizers that normalise whitespace
    differently.
    """
    requests: list[list[int]] = []
    layout = []
    for ctx, seq in zip(contexts, seqs):
        tail = list(ctx[-window:]) if window else []
        full = tail + list(seq)
        c = len(tail)
        first = len(requests)
        requests += [tail, full]
        for k in range(len(seq)):
            lo = max(0, c + k - window)
            requests += [full[lo:c + k], full[lo:c + k + 1]]
        layout.append((first, len(seq)))
    decoded = _decode_many(tokenizer, requests)
    texts, char_ends, nonspace_ends = [], [], []
    for (first, n), seq in zip(layout, seqs):
        before, whole = decoded[first], decoded[first + 1]
        text = whole[len(before):] if whole.startswith(before) else tokenizer.decode(list(seq))
        texts.append(text)
        pairs = decoded[first + 2:first + 2 + 2 * n]
        chars = [max(0, len(pairs[2 * k + 1]) - len(pairs[2 * k])) for k in range(n)]
        nonspace = [max(0, _nonspace(pairs[2 * k + 1]) - _nonspace(pairs[2 * k])) for k in range(n)]
        # the window can disagree with the whole decode in odd cases (invalid byte sequences): stay inside
        char_ends.append(np.minimum(np.cumsum(chars, dtype=np.int64), len(text)).tolist() if n else [])
        nonspace_ends.append(np.minimum(np.cumsum(nonspace, dtype=np.int64), _nonspace(text)).tolist() if n else [])
    return texts, char_ends, nonspace_ends


@dataclass
class RetokenizedBatch:
    """A rollout rendered for a reward model with another tokenizer, and the way back.

    ``exp``: ``tokens``/``position_ids``/``action_mask`` [N, L_rm] of the reward model's sequences
    ([BOS] its prompt, the decoded response re-encoded, EOS where the actor's response ended with a stop
    token), laid out as in reward-model training. ``index`` [N, L] (long): for each actor position the
    reward-model position whose credit it takes; ``valid`` [N, L]: 1 at actor actions that got one.
    """

    exp: dict[str, torch.Tensor]
    index: torch.Tensor
    valid: torch.Tensor

    def map_back(self, rm_values: torch.Tensor) -> torch.Tensor:
        """[N, L_rm] per-position values of the reward model -> [N, L] at the actor's positions."""
        return rm_values.gather(1, self.index.to(rm_values.device)) * self.valid.to(rm_values.device)


def covering_tokens(actor_ends: list[list[int]], rm_ends: list[list[int]],
                    by_char: list[bool]) -> tuple[torch.Tensor, torch.Tensor]:
    """For each token of one tokenization (the actor's), the token of another (the reward model's) that
    covers its last character, both spelling the same text.

    ``actor_ends[i]`` / ``rm_ends[i]``: where each token of row ``i`` ends in that text, in characters when
    ``by_char[i]`` (the two spell it exactly), else in non-whitespace characters (see
    :func:`token_text_ends`). By non-whitespace characters a whitespace-only actor token takes the token of
    the next character; by characters an actor token that adds none (it completes a character split over
    byte tokens) takes the reward-model token that completes that character. Past the last reward-model
    token (a cut response) the last one is taken.

    Returns ``j`` [N, max(1, max len(actor_ends[i]))] (long): the reward-model token index of each actor
    token (0 past a row's end, and where the row has no reward-model token), and ``a_len`` [N]: the number
    of actor tokens per row.
    """
    n = len(actor_ends)
    ra = max([len(e) for e in actor_ends] + [1])
    rb = max([len(e) for e in rm_ends] + [1])
    big = np.iinfo(np.int64).max // 4
    a = torch.zeros(n, ra, dtype=torch.long)
    a_len = torch.tensor([len(e) for e in actor_ends], dtype=torch.long)
    b = torch.full((n, rb), big, dtype=torch.long)
    for i in range(n):
        if actor_ends[i]:
            a[i, :len(actor_ends[i])] = torch.as_tensor(actor_ends[i])
        if rm_ends[i]:
            b[i, :len(rm_ends[i])] = torch.as_tensor(rm_ends[i])
    prev = torch.cat([torch.zeros(n, 1, dtype=torch.long), a[:, :-1]], dim=1)
    char_rows = torch.tensor(list(by_char), dtype=torch.bool)[:, None]
    empty = a == prev  # the token adds no (non-whitespace) character
    # its last character; by non-whitespace characters a whitespace-only token takes the next character's
    target = torch.where(empty & ~char_rows, a, (a - 1).clamp(min=0))
    kept = torch.tensor([len(e) for e in rm_ends], dtype=torch.long)
    last = (kept - 1).clamp(min=0)[:, None]
    j = torch.minimum(torch.searchsorted(b, target, right=True), last)
    # by characters, a token that adds none completes a character split over byte tokens: it takes the
    # reward model's token that completes that character (the last one ending there)
    j_end = torch.searchsorted(b, b.gather(1, j), right=True) - 1
    j = torch.where(empty & char_rows, torch.minimum(torch.maximum(j, j_end), last), j)
    return j, a_len


def _actor_rows(exp) -> tuple[list[list[int]], list[list[int]], list[bool]]:
    """Per row: the prompt ids, the response ids without a final stop token, and whether it had one."""
    rows = exp["tokens"].tolist()
    plens, rlens, finished = exp["prompt_lens"].tolist(), exp["response_lens"].tolist(), exp["finished"].tolist()
    prompts, bodies, stop = [], [], []
    for row, p, r, done in zip(rows, plens, rlens, finished):
        ends_with_stop = bool(done) and r > 0  # `finished`: the last generated token is a stop token
        prompts.append(row[:p])
        bodies.append(row[p:p + r - 1] if ends_with_stop else row[p:p + r])
        stop.append(ends_with_stop)
    return prompts, bodies, stop


def _reward_model_rows(rm_tok, rm_prompts: list[list[int]], rm_resp: list[list[int]], stop: list[bool],
                       max_length: int, prompt_ids: list[int]):
    """The reward model's rows: its prompt ids, the response cut to ``max_length`` (its end first), and its EOS
    where the response ended with a stop token and room is left. Returns ``tokens [N, L_rm]`` (right-padded),
    ``mask [N, L_rm]`` (1 on response tokens), and per row the prompt length, the kept response tokens and the
    EOS position (-1: none)."""
    seqs, plens, kept, eos_pos = [], [], [], []
    for i, (prompt, resp) in enumerate(zip(rm_prompts, rm_resp)):
        room = max_length - len(prompt)
        if room < 1:
            raise UserError(f"a prompt (#{prompt_ids[i]}) is {len(prompt)} tokens for the reward model's tokenizer, "
                            f"which leaves no room for a response within {max_length} tokens")
        body = resp[:room]
        with_eos = stop[i] and len(body) < room
        seqs.append(list(prompt) + body + ([rm_tok.eos_id] if with_eos else []))
        plens.append(len(prompt))
        kept.append(len(body))
        eos_pos.append(len(prompt) + len(body) if with_eos else -1)
    tokens = torch.full((len(seqs), max(map(len, seqs))), rm_tok.pad_id, dtype=torch.long)
    mask = torch.zeros(tokens.shape)
    for i, s in enumerate(seqs):
        tokens[i, :len(s)] = torch.as_tensor(s, dtype=torch.long)
        mask[i, plens[i]:len(s)] = 1.0
    return tokens, mask, plens, kept, eos_pos


def retokenize_for_reward(exp: dict[str, torch.Tensor], actor_tok, rm_tok, rm_prompts: list[list[int]],
                          max_length: int, window: int = RETOKENIZE_CONTEXT) -> RetokenizedBatch:
    """Map a rollout to a reward model's tokenizer (``--allow-retokenize``).

    Each response (without its final stop token) is decoded with the actor's tokenizer and encoded with
    the reward model's, after the reward model's own rendering of the prompt (``rm_prompts``: its ids,
    BOS included); a response that ended with a stop token gets the reward model's EOS. Credits come back
    by character position: every actor token takes the credit of the reward-model token that covers its
    last character (character positions in the decoded text when the reward model's tokens spell it
    exactly, else positions counted in non-whitespace characters, where a token of whitespace only takes
    the token of the next character); the stop token takes the EOS's. Sequences longer than ``max_length``
    lose the end of the response (EOS first), as in reward-model training; actor tokens past the cut take
    the last kept token's credit.
    """
    plens, rlens = exp["prompt_lens"].tolist(), exp["response_lens"].tolist()
    n, length = exp["tokens"].shape
    prompts, bodies, stop = _actor_rows(exp)
    texts, a_chars, a_nonspace = token_text_ends(actor_tok, prompts, bodies, window)
    rm_resp = rm_tok.encode_batch(texts)
    rm_texts, b_chars, b_nonspace = token_text_ends(rm_tok, rm_prompts, rm_resp, window)
    # character positions where the reward model's tokens spell the actor's text exactly (the usual case);
    # non-whitespace positions where its tokenizer normalised the text (e.g. SentencePiece whitespace)
    by_char = [rm_texts[i] == texts[i] for i in range(n)]
    actor_ends = [a_chars[i] if by_char[i] else a_nonspace[i] for i in range(n)]
    rm_ends = [b_chars[i] if by_char[i] else b_nonspace[i] for i in range(n)]

    prompt_ids = exp["prompt_index"].tolist() if "prompt_index" in exp else list(range(n))
    rm_tokens, rm_mask, rm_plens, kept_text, eos_pos = _reward_model_rows(rm_tok, rm_prompts, rm_resp, stop,
                                                                        max_length, prompt_ids)
    l_rm = rm_tokens.shape[1]

    j, a_len = covering_tokens(actor_ends, [rm_ends[i][:kept_text[i]] for i in range(n)], by_char)
    ra = j.shape[1]
    kept = torch.tensor(kept_text)
    plen_rm = torch.tensor(rm_plens)
    rm_pos = plen_rm[:, None] + j  # [N, ra]
    has_text = (kept > 0)[:, None]
    eos = torch.tensor(eos_pos)
    # rows without any kept response token: everything takes the EOS's credit (if any), else nothing
    rm_pos = torch.where(has_text, rm_pos, eos.clamp(min=0)[:, None].expand_as(rm_pos))
    ok = (torch.arange(ra)[None, :] < a_len[:, None]) & (has_text | (eos >= 0)[:, None])

    index = torch.zeros(n, length, dtype=torch.long)
    valid = torch.zeros(n, length)
    cols = torch.as_tensor(plens)[:, None] + torch.arange(ra)[None, :]  # actor positions of the body tokens
    in_range = ok & (cols < length)
    r_idx = torch.arange(n)[:, None].expand_as(cols)
    index[r_idx[in_range], cols[in_range]] = rm_pos[in_range]
    valid[r_idx[in_range], cols[in_range]] = 1.0
    for i in range(n):  # the stop token -> the EOS (or, when the EOS was cut, the last kept token)
        if stop[i]:
            p_stop = plens[i] + rlens[i] - 1
            target_pos = eos_pos[i] if eos_pos[i] >= 0 else (rm_plens[i] + kept_text[i] - 1 if kept_text[i] else -1)
            if target_pos >= 0:
                index[i, p_stop], valid[i, p_stop] = target_pos, 1.0
    rm_exp = {"tokens": rm_tokens, "position_ids": torch.arange(l_rm).expand(n, l_rm).contiguous(),
              "action_mask": rm_mask}
    return RetokenizedBatch(rm_exp, index, valid * (exp["action_mask"] > 0).float())
