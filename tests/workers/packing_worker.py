"""Worker for tests/test_packing.py (torchrun, gloo, CPU): packed vs unpacked training steps.

  init: build every case's model at TP=PP=1 from a fixed seed (LoRA B perturbed so the A path counts) and
        save it with dist_checkpointing, then do what `run` does.
  run:  load those weights at the requested (TP, PP); on the same global batch of pairs run
        forward+backward through megatron-core's schedule three times -- unpacked (micro-batches of 2 pairs,
        right-padded), packed (THD streams planned by data/packing.py) and packed with shared prompts
        (prefix trees) -- and dump, for each, the metric
        sums, per-pair scores and every token's score / log-prob (forward-only pass), and the full
        (gathered) gradients. At TP=PP=1 also a leakage probe: one sequence of a packed stream changed,
        every token output of the others dumped (shared prompts: a branch changed, then a prefix); and an
        SFT step packed vs unpacked.
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np
import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from parallel_worker import full_tensors  # noqa: E402

from megatron_qrm import checkpointing, parallel  # noqa: E402
from megatron_qrm.config import ModelConfig, ParallelConfig  # noqa: E402
from megatron_qrm.data.packing import (  # noqa: E402
    pack_collated,
    plan_microbatches,
    shared_prompt_pair_tokens,
)
from megatron_qrm.data.preference import TokenizedPair, collate_sequences, pair_microbatch  # noqa: E402
from megatron_qrm.models import LoRAConfig, build_model  # noqa: E402
from megatron_qrm.rewards.scoring import (  # noqa: E402
    METRIC_NAMES,
    RewardLossConfig,
    reference_logps_forward_step,
    token_credit_forward_step,
    train_forward_step,
)
from megatron_qrm.training.engine import OptimConfig, build_optimizer, reduce_metric_sums, run_global_batch, wrap_ddp  # noqa: E402

VOCAB = 256
MODEL = ModelConfig(num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=96,
                    vocab_size=VOCAB, max_position_embeddings=64, rotary_base=10000.0)
CASES = {
    "qrm": dict(loss="qrm", lora=0), "orm": dict(loss="orm", lora=0), "dpo": dict(loss="dpo", lora=0),
    "qrm_lora": dict(loss="qrm", lora=4), "orm_lora": dict(loss="orm", lora=4), "dpo_lora": dict(loss="dpo", lora=4),
}
PAIRS = 6  # global batch
MBS = 2  # unpacked micro-batch (pairs)
CAPACITY = 96  # packed micro-batch tokens: the 6 pairs (~40-60 tokens each) need several micro-batches
PAD = 0


def make_pairs(seed: int) -> tuple[list[TokenizedPair], torch.Tensor]:
    """Pairs of varied prompt / response lengths (some prompts shared) and a reference log-prob sum per
    sequence ([N, 2]: chosen, rejected) for DPO."""
    g = torch.Generator().manual_seed(seed)
    rand = lambda lo, hi: int(torch.randint(lo, hi, (1,), generator=g))  # noqa: E731
    ids = lambda n: torch.randint(4, VOCAB, (n,), generator=g).tolist()  # noqa: E731
    prompts = [ids(rand(2, 9)) for _ in range(4)]
    pairs = [TokenizedPair(prompts[i % 4], ids(rand(1, 24)), ids(rand(1, 24)), False) for i in range(PAIRS)]
    ref = -5.0 * torch.rand(PAIRS, 2, generator=g) - 20.0
    return pairs, ref


def unpacked_microbatches(pairs, ref) -> list[dict]:
    return [pair_microbatch(pairs, range(s, s + MBS), PAD, 8, ref_sums=ref) for s in range(0, PAIRS, MBS)]


def packed_microbatches(pairs, ref, share_prompts: bool = False) -> list[dict]:
    """THD streams planned by data/packing.py; ``share_prompts``: each pair's prompt[:-1] once, then both
    branches (a prefix tree)."""
    lengths = np.array([[len(p.prompt_ids) + len(p.chosen_ids), len(p.prompt_ids) + len(p.rejected_ids)]
                        for p in pairs])
    sizes = shared_prompt_pair_tokens(lengths, np.array([len(p.prompt_ids) for p in pairs])) if share_prompts \
        else lengths.sum(axis=1)
    plan = plan_microbatches(sizes.tolist(), CAPACITY)
    assert len(plan) >= 2, plan
    return [pair_microbatch(pairs, idx, PAD, 8, pack=True, share_prompts=share_prompts, ref_sums=ref) for idx in plan]


def per_pair(outs: list[dict], key: str) -> torch.Tensor:
    """[PAIRS] values of a per-pair output, by dataset index."""
    res = torch.full((PAIRS,), float("nan"))
    for o in outs:
        res[o["index"].cpu()] = o[key].detach().float().cpu()
    return res


def per_token(outs: list[dict], key: str, mbs: list[dict]) -> list[torch.Tensor]:
    """Each sequence's per-token values over its real positions, ordered (pair index, side)."""
    res: dict[tuple[int, int], torch.Tensor] = {}
    for o, mb in zip(outs, mbs):
        v = o[key].detach().float().cpu()  # [2B, S]
        b = mb["index"].numel()
        lengths = mb["unpack_valid"].sum(1) if "unpack_valid" in mb else (
            (mb["response_mask"] > 0).int().cumsum(1).argmax(1) + 1)
        for row in range(2 * b):
            res[(int(mb["index"][row % b]), row // b)] = v[row, : int(lengths[row])]
    return [res[k] for k in sorted(res)]


def step(ddp, optimizer, loss_cfg, micro) -> dict:
    ddp.zero_grad_buffer()
    optimizer.zero_grad()
    outs = run_global_batch(ddp, train_forward_step(loss_cfg), micro, forward_only=False)
    sums = reduce_metric_sums(outs, METRIC_NAMES)
    grads = full_tensors(ddp, "main_grad")
    res = {"sums": sums, "grads": grads}
    last = {}
    if outs:  # the last pipeline stage
        last["chosen"], last["rejected"] = per_pair(outs, "chosen_score"), per_pair(outs, "rejected_score")
    fwd = reference_logps_forward_step() if loss_cfg.kind == "dpo" else token_credit_forward_step(loss_cfg)
    key = "ref_logps" if loss_cfg.kind == "dpo" else "token_credits"
    with torch.no_grad():
        outs = run_global_batch(ddp, fwd, micro, forward_only=True)
    if outs:
        last["tokens"] = per_token(outs, key, micro)
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, last)
    res.update(next(g for g in gathered if g))
    return res


def leakage(ddp, loss_cfg, pairs, ref) -> dict:
    """Token outputs of one packed stream, and of the same stream with one sequence's tokens changed."""
    mb = packed_microbatches(pairs, ref)[0]
    changed = {k: v.clone() for k, v in mb.items()}
    a, b = int(mb["cu_seqlens"][1]), int(mb["cu_seqlens"][2])  # the stream's second sequence
    changed["tokens"][0, a:b] = (changed["tokens"][0, a:b] + 7) % (VOCAB - 4) + 4
    fwd = reference_logps_forward_step() if loss_cfg.kind == "dpo" else token_credit_forward_step(loss_cfg)
    key = "ref_logps" if loss_cfg.kind == "dpo" else "token_credits"
    with torch.no_grad():
        out = [run_global_batch(ddp, fwd, [m], forward_only=True)[0][key] for m in (mb, changed)]
    return {"base": out[0], "changed": out[1], "changed_row": int((mb["unpack_index"] == a).nonzero()[0, 0]),
            "valid": mb["unpack_valid"]}


def shared_leakage(ddp, loss_cfg, pairs, ref) -> dict:
    """Token outputs of one shared-prompt stream; with a rejected branch changed; with a shared prefix changed."""
    mb = packed_microbatches(pairs, ref, share_prompts=True)[0]
    parent = mb["segment_parent"]
    seg = int((parent >= 0).nonzero()[1, 0])  # the second branch of the first prefix: a rejected branch
    prefix = int(parent[seg])
    fwd = reference_logps_forward_step() if loss_cfg.kind == "dpo" else token_credit_forward_step(loss_cfg)
    key = "ref_logps" if loss_cfg.kind == "dpo" else "token_credits"
    res = {"valid": mb["unpack_valid"]}
    with torch.no_grad():
        res["base"] = run_global_batch(ddp, fwd, [mb], forward_only=True)[0][key]
        for name, s in (("branch", seg), ("prefix", prefix)):
            changed = {k: v.clone() for k, v in mb.items()}
            a, b = int(mb["cu_seqlens"][s]), int(mb["cu_seqlens"][s + 1])
            changed["tokens"][0, a:b] = (changed["tokens"][0, a:b] + 7) % (VOCAB - 4) + 4
            res[name] = run_global_batch(ddp, fwd, [changed], forward_only=True)[0][key]
            # the rows holding a changed token
            res[f"{name}_rows"] = ((mb["unpack_index"] >= a) & (mb["unpack_index"] < b) & mb["unpack_valid"]).any(1)
    return res


def sft_step(ddp, optimizer, pairs) -> list[dict]:
    from megatron_qrm.training.sft_trainer import METRICS, sft_forward_step

    seqs = [(p.prompt_ids, p.chosen_ids) for p in pairs]
    unpacked = [collate_sequences(*zip(*seqs[s:s + MBS]), PAD, 8) for s in range(0, PAIRS, MBS)]
    sizes = [len(p) + len(r) for p, r in seqs]
    packed = [pack_collated(collate_sequences(*zip(*[seqs[i] for i in idx]), PAD, 1), PAD, 8)
              for idx in plan_microbatches(sizes, 48)]
    res = []
    for micro in (unpacked, packed):
        ddp.zero_grad_buffer()
        optimizer.zero_grad()
        sums = reduce_metric_sums(run_global_batch(ddp, sft_forward_step, micro, forward_only=False), METRICS)
        res.append({"sums": sums, "grads": full_tensors(ddp, "main_grad"), "n_micro": len(micro)})
    return res


def make_rollout(seed: int, rows: int = 6, length: int = 32) -> dict[str, torch.Tensor]:
    """A right-padded rollout as the RL trainer holds it: prompt + generated response per row, per-token
    old log-probs, advantages, returns and values on the generated positions."""
    g = torch.Generator().manual_seed(seed)
    prompt = torch.randint(2, 8, (rows,), generator=g)
    response = torch.randint(1, length - 8, (rows,), generator=g)
    response[0] = length - int(prompt[0])  # one row fills the buffer
    cols = torch.arange(length)
    real = cols[None] < (prompt + response)[:, None]
    action = (cols[None] >= prompt[:, None]) & real
    rnd = lambda: torch.randn(rows, length, generator=g) * action  # noqa: E731
    return {"tokens": torch.where(real, torch.randint(4, VOCAB, (rows, length), generator=g), 0),
            "position_ids": cols.expand(rows, length).contiguous(), "action_mask": action.float(),
            "logp_old": -torch.rand(rows, length, generator=g) * action - 3.0 * action, "advantages": rnd(),
            "returns": rnd(), "values": rnd(), "prompt_lens": prompt, "response_lens": response}


def rl_update_step() -> dict:
    """One PPO actor and one critic forward+backward on a rollout: padded vs packed micro-batches."""
    from types import SimpleNamespace

    from megatron_qrm.rl.trainer import RLTrainer
    from megatron_qrm.rl.update_batching import update_forward_step, update_microbatches

    stub = SimpleNamespace(cfg=SimpleNamespace(algo="ppo", clip_eps=0.2, entropy_coef=0.01, value_clip=0.2,
                                               rollout_is_correction=False),
                           tokenizer=SimpleNamespace(vocab_size=VOCAB - 7))  # a padded vocabulary tail too
    exp = make_rollout(9)
    keys = ("tokens", "position_ids", "action_mask", "logp_old", "advantages", "returns", "values")
    rows = [4, 1, 0, 5, 2, 3]
    res = {}
    for role, loss, names in (("policy", RLTrainer._actor_loss, ("policy_loss_sum", "tokens", "entropy_sum")),
                              ("critic", RLTrainer._critic_loss, ("value_loss_sum", "tokens"))):
        torch.manual_seed(3)
        model = build_model(MODEL, role, local_attention="sdpa")
        optim = OptimConfig(lr=1e-3)
        ddp = wrap_ddp(model, optim)
        optimizer, _ = build_optimizer(ddp, optim, train_iters=10)
        for mode, capacity in (("padded", None), ("packed", 48)):
            micro = update_microbatches(exp, rows, keys, 2, PAD, capacity)
            ddp.zero_grad_buffer()
            optimizer.zero_grad()
            outs = run_global_batch(ddp, update_forward_step(lambda o, b: loss(stub, o, b)), micro, forward_only=False)
            res[f"{role}_{mode}"] = {"sums": reduce_metric_sums(outs, names), "grads": full_tensors(ddp, "main_grad"),
                                     "n_micro": len(micro)}
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("mode", choices=("init", "run"))
    ap.add_argument("--dir", required=True)
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--pp", type=int, default=1)
    ap.add_argument("--tag", required=True)
    args = ap.parse_args()
    parallel.initialize(ParallelConfig(args.tp, args.pp, False, seed=1234))
    pairs, ref = make_pairs(5)
    results = {}
    for name, case in CASES.items():
        ckpt = os.path.join(args.dir, f"weights_{name}")
        loss_cfg = RewardLossConfig(kind=case["loss"])
        build = lambda: build_model(MODEL, loss_cfg.role, lora=LoRAConfig(rank=case["lora"]),  # noqa: E731
                                    local_attention="sdpa")
        model = build()
        if args.mode == "init":
            torch.manual_seed(7)
            with torch.no_grad():
                for n, p in model.named_parameters():
                    if n.endswith("lora_b"):
                        p.normal_(0, 0.05)
            checkpointing.save_checkpoint(ckpt, 0, model, {"model": MODEL.to_dict()})
            model = build()
        optim = OptimConfig(lr=1e-3, clip_grad=0.0)
        ddp = wrap_ddp(model, optim)
        optimizer, _ = build_optimizer(ddp, optim, train_iters=10)
        checkpointing.load_checkpoint(ckpt, ddp, load_rng=False)
        res = {"unpacked": step(ddp, optimizer, loss_cfg, unpacked_microbatches(pairs, ref)),
               "packed": step(ddp, optimizer, loss_cfg, packed_microbatches(pairs, ref)),
               "shared": step(ddp, optimizer, loss_cfg, packed_microbatches(pairs, ref, share_prompts=True))}
        if args.tp == args.pp == 1:
            res["leakage"] = leakage(ddp, loss_cfg, pairs, ref)
            res["shared_leakage"] = shared_leakage(ddp, loss_cfg, pairs, ref)
            if name in ("dpo", "dpo_lora"):
                res["sft"] = sft_step(ddp, optimizer, pairs)
        results[name] = res
    results["rl"] = rl_update_step()
    if dist.get_rank() == 0:
        torch.save(results, os.path.join(args.dir, f"{args.tag}.pt"))
    parallel.destroy()


if __name__ == "__main__":
    main()
