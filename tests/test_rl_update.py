"""The RL update's per-token log-probs, entropy and losses on the packed stream (rl/update_batching.py,
``RLTrainer._actor_loss`` / ``_critic_loss``) against an independent computation.

The reference is written here: ``log_softmax`` over the full (gathered, un-padded) vocabulary of row-layout
logits ``[N, S, V]``, the entropy as ``-sum p log p``, and the losses from megatron_qrm.rl.losses on those
log-probs (the functions the update used before it moved to the stream). The update's inputs are the same
logits laid out as the model produces them -- a packed ``[1, T, V/tp]`` stream (random values in the stream's
padding tail and in the TP-padding vocabulary columns, which must not matter) or padded ``[N, S, V/tp]`` rows
-- sliced per tensor-parallel rank. Checked in fp32 to 1e-6: log-probs and entropy at every action, the actor
loss (PPO with and without an entropy bonus, REINFORCE), its gradient with respect to the logits, and the
critic loss; for TP = 1 and TP = 2 (two gloo processes).
"""

from __future__ import annotations

import os
import socket
from types import SimpleNamespace

import pytest
import torch
import torch.multiprocessing as mp

V_REAL = 37  # padded to 128 (TP 1) / 256 (TP 2) columns: the padding columns hold random logits
LENGTHS = [(3, 4), (2, 2), (4, 3), (1, 5)]  # (prompt, response) per row


def _scenario():
    g = torch.Generator().manual_seed(7)
    n = len(LENGTHS)
    s = max(p + r for p, r in LENGTHS) + 2  # column padding past the longest row
    tokens = torch.zeros(n, s, dtype=torch.long)
    action = torch.zeros(n, s)
    for i, (p, r) in enumerate(LENGTHS):
        tokens[i, :p + r] = torch.randint(1, V_REAL, (p + r,), generator=g)
        action[i, p:p + r] = 1.0
    exp = {
        "tokens": tokens,
        "position_ids": torch.arange(s).expand(n, s).clone(),
        "action_mask": action,
        "logp_old": -torch.rand(n, s, generator=g) * 3,
        "advantages": torch.randn(n, s, generator=g),
        "returns": torch.randn(n, s, generator=g),
        "values": torch.randn(n, s, generator=g),
        "prompt_lens": torch.tensor([p for p, _ in LENGTHS]),
        "response_lens": torch.tensor([r for _, r in LENGTHS]),
    }
    return exp, g


def _reference(rows_logits: torch.Tensor, tokens: torch.Tensor):
    """log pi(token_p | prefix) at column p (0 at column 0) and the entropy at column p of the distribution the
    logits at p - 1 give (0 at column 0), over the real vocabulary only."""
    logp_all = torch.log_softmax(rows_logits[..., :V_REAL].double(), dim=-1)  # [N, S, V]
    n, s = tokens.shape
    logp = torch.zeros(n, s, dtype=torch.float64)
    ent = torch.zeros(n, s, dtype=torch.float64)
    for i in range(n):  # plain loop over positions
        for p in range(1, s):
            logp[i, p] = logp_all[i, p - 1, tokens[i, p]]
            ent[i, p] = -(logp_all[i, p - 1].exp() * logp_all[i, p - 1]).sum()
    return logp, ent


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    from megatron.core import parallel_state as ps

    from megatron_qrm import parallel
    from megatron_qrm.config import ParallelConfig, padded_vocab_size
    from megatron_qrm.rl import losses as rl_losses
    from megatron_qrm.rl.trainer import RLTrainer
    from megatron_qrm.rl.update_batching import token_entropy_rows, token_logprobs_rows, update_microbatches

    parallel.initialize(ParallelConfig(tensor_model_parallel_size=world))
    try:
        exp, g = _scenario()
        n, s = exp["tokens"].shape
        vpad = padded_vocab_size(V_REAL, 128, world)
        rows_logits = torch.randn(n, s, vpad, generator=g) * 2  # the "gathered" logits of every row
        keys = ("tokens", "position_ids", "action_mask", "logp_old", "advantages", "returns", "values")
        (packed,) = update_microbatches(exp, list(range(n)), keys, n, pad_id=0, pack_capacity=64)
        (padded,) = update_microbatches(exp, list(range(n)), keys, n, pad_id=0, pack_capacity=None)
        t = packed["tokens"].shape[1]
        stream = torch.randn(1, t, vpad, generator=g) * 2  # the padding tail: random
        valid, index = packed["unpack_valid"], packed["unpack_index"]
        stream[0, index[valid]] = rows_logits[:, :valid.shape[1]][valid]
        per = vpad // world
        cols = slice(rank * per, (rank + 1) * per)
        results = {}
        for layout, batch, full in (("packed", packed, stream), ("padded", padded, rows_logits)):
            ref_logp, ref_ent = _reference(rows_logits[:, :batch["action_mask"].shape[1]], exp["tokens"][:, :batch["action_mask"].shape[1]])
            for algo, coef in (("ppo", 0.0), ("ppo", 0.01), ("reinforce", 0.0)):
                local = full[..., cols].clone().requires_grad_(True)
                logp = token_logprobs_rows(local, batch, V_REAL)
                ent = token_entropy_rows(local, batch, V_REAL, ps.get_tensor_model_parallel_group(), grad=coef > 0)
                me = SimpleNamespace(cfg=SimpleNamespace(algo=algo, clip_eps=0.2, entropy_coef=coef,
                                                         rollout_is_correction=False),
                                     tokenizer=SimpleNamespace(vocab_size=V_REAL))
                loss, count, metrics = RLTrainer._actor_loss(me, local, batch)
                loss.backward()
                # the reference loss: the same loss functions on the reference log-probs, entropy written out
                ref = full[..., :].clone().requires_grad_(True)
                mask = batch["action_mask"]
                if layout == "packed":
                    ref_rows = torch.zeros(n, mask.shape[1], vpad, dtype=ref.dtype)
                    ref_rows = torch.where(valid[..., None], ref[0][index], ref_rows)
                else:
                    ref_rows = ref
                lp_all = torch.log_softmax(ref_rows[..., :V_REAL], dim=-1)
                toks = exp["tokens"][:, :mask.shape[1]]
                lp = torch.cat([torch.zeros(n, 1), lp_all[:, :-1].gather(-1, toks[:, 1:, None])[..., 0]], dim=1)
                en = torch.cat([torch.zeros(n, 1), -(lp_all.exp() * lp_all).sum(-1)[:, :-1]], dim=1)
                if algo == "ppo":
                    out = rl_losses.ppo_policy_loss(lp, batch["logp_old"], batch["advantages"], mask, clip_eps=0.2)
                else:
                    out = rl_losses.reinforce_loss(lp, batch["returns"], mask)
                ref_loss = out.loss_sum - coef * (en * mask).sum()
                ref_loss.backward()
                results[f"{layout}-{algo}-{coef}"] = {
                    "logp": logp.detach(), "ref_logp": ref_logp.float(), "ent": ent.detach(),
                    "ref_ent": ref_ent.float(), "mask": mask, "loss": loss.detach(), "ref_loss": ref_loss.detach(),
                    "entropy_sum": metrics["entropy_sum"], "ref_entropy_sum": (en * mask).sum().detach(),
                    "count": count, "grad": local.grad, "ref_grad": ref.grad[..., cols],
                    "grad_rows_valid": valid if layout == "packed" else None,
                }
            # critic: values from a [.., 1] head output in the same layout
            head = full[..., :1].clone()
            me = SimpleNamespace(cfg=SimpleNamespace(value_clip=None))
            c_loss, _, _ = RLTrainer._critic_loss(me, head, batch)
            head_rows = head if layout == "padded" else torch.where(valid[..., None], head[0][index], 0.0)
            v = torch.cat([torch.zeros(n, 1), head_rows[:, :-1, 0]], dim=1)
            ref_c = rl_losses.value_loss(v, batch["returns"], batch["action_mask"]).loss_sum
            results[f"{layout}-critic"] = {"loss": c_loss.detach(), "ref_loss": ref_c.detach()}
        # the logged entropy's chunked no_grad kernel: chunks smaller than the stream, a -inf logit, bf16 input
        from megatron_qrm.rl.kl import vocab_parallel_entropy_no_grad

        def entropy_by_hand(x):  # -sum p log p over the real vocabulary; a -inf logit contributes 0
            lp = torch.log_softmax(x[..., :V_REAL].double(), dim=-1)
            return -torch.where(torch.isfinite(lp), lp.exp() * lp, torch.zeros((), dtype=lp.dtype)).sum(-1)

        full = torch.randn(2, 7, vpad, generator=g) * 3
        full[0, 2, 5] = -float("inf")
        full[1, 4, V_REAL - 1] = -float("inf")
        want = entropy_by_hand(full)
        group = ps.get_tensor_model_parallel_group()
        results["entropy_chunks"] = {
            "fp32": vocab_parallel_entropy_no_grad(full[..., cols], V_REAL, group, chunk_tokens=3), "want": want,
            "bf16": vocab_parallel_entropy_no_grad(full[..., cols].bfloat16(), V_REAL, group, chunk_tokens=5),
            "want_bf16": entropy_by_hand(full.bfloat16()),
        }
        # megatron-core's cross-entropy works in place on its input: the caller's fp32 logits of one row with no
        # padded vocabulary columns (where no up-cast or mask copies them) must come back unchanged (they are
        # also the full KL's input, rl/experience.py)
        from megatron_qrm.models.logits import next_token_nll

        row = torch.randn(1, 6, per, generator=g)
        kept = row.clone()
        next_token_nll(row, torch.randint(0, per * world, (1, 6), generator=g), per * world)
        results["nll_leaves_input"] = {"row": row, "kept": kept}
        # the entropy bonus's recomputing backward, chunks smaller than the stream: against autograd of the formula
        from megatron_qrm.rl.kl import vocab_parallel_entropy_recomputed

        z = torch.randn(2, 7, vpad, generator=g) * 3
        w = torch.randn(2, 7, generator=g)
        local = z[..., cols].clone().requires_grad_(True)
        (w * vocab_parallel_entropy_recomputed(local, V_REAL, group, chunk_tokens=4)).sum().backward()
        zd = z.double().requires_grad_(True)
        (w.double() * entropy_by_hand(zd)).sum().backward()
        results["entropy_grad"] = {"grad": local.grad, "want": zd.grad[..., cols]}
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        ps.destroy_model_parallel()
        torch.distributed.destroy_process_group()


@pytest.mark.parametrize("tp", [1, 2])
def test_update_logprobs_entropy_losses_on_the_stream_equal_the_reference(tmp_path, tp):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.start_processes(_worker, args=(tp, port, str(tmp_path)), nprocs=tp, join=True, start_method="spawn")
    for rank in range(tp):
        res = torch.load(tmp_path / f"rank{rank}.pt")
        eg = res.pop("entropy_grad")
        torch.testing.assert_close(eg["grad"].double(), eg["want"], atol=1e-6, rtol=1e-5)
        kept = res.pop("nll_leaves_input")
        assert torch.equal(kept["row"], kept["kept"])
        chunks = res.pop("entropy_chunks")
        torch.testing.assert_close(chunks["fp32"].double(), chunks["want"], atol=1e-5, rtol=1e-6)
        torch.testing.assert_close(chunks["bf16"].double(), chunks["want_bf16"], atol=1e-5, rtol=1e-6)
        assert len(res) == 8
        for name, r in res.items():
            close = lambda a, b, what: torch.testing.assert_close(a.float(), b.float(), atol=1e-6, rtol=1e-6,
                                                                  msg=lambda m: f"{name} {what}: {m}")
            close(r["loss"], r["ref_loss"], "loss")
            if "critic" in name:
                continue
            act = r["mask"].bool()
            assert int(act.sum()) == sum(rr for _, rr in LENGTHS) == int(r["count"])
            close(r["logp"][act], r["ref_logp"][act], "log-probs")
            close(r["ent"][:, :-1][act[:, 1:]], r["ref_ent"][act], "entropy")  # ent at p feeds the action at p+1
            close(r["entropy_sum"], r["ref_entropy_sum"], "entropy sum")
            close(r["grad"], r["ref_grad"], "gradient")  # packed: the stream's padding tail gets none
