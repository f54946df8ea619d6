"""Worker for the parallel-invariance and model tests (run under torchrun, gloo, CPU).

  init: build every case's model at TP=PP=1 from a fixed seed, perturb LoRA B (zero at init, which
        would hide the A path) and save it with dist_checkpointing; also dump the full weights and
        the token scores of the batch (for the hand-written forward in tests/test_model_parallel.py);
        then do what `run` does at TP=PP=1 (the reference layout).
  run:  load those weights at the requested (TP, PP, SP), run one global batch (2 micro-batches)
        forward+backward through megatron-core's schedule, one DistributedOptimizer step, and dump
        loss sums, full (gathered) gradients, grad norm and updated weights, keyed by checkpoint key.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from dataclasses import replace  # noqa: E402

from megatron.core.dist_checkpointing.dict_utils import nested_values  # noqa: E402
from megatron.core.dist_checkpointing.mapping import ShardedTensorFactory  # noqa: E402

from megatron_qrm import checkpointing, parallel  # noqa: E402
from megatron_qrm.config import ModelConfig, ParallelConfig  # noqa: E402
from megatron_qrm.models import LoRAConfig, build_model  # noqa: E402
from megatron_qrm.rewards.scoring import METRIC_NAMES, RewardLossConfig, train_forward_step  # noqa: E402
from megatron_qrm.training.engine import OptimConfig, build_optimizer, reduce_metric_sums, run_global_batch, wrap_ddp  # noqa: E402

VOCAB = 256  # a multiple of 128*TP for TP<=2: the padded vocabulary is identical in every layout
MODEL = ModelConfig(num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=96,
                    vocab_size=VOCAB, max_position_embeddings=64, rotary_base=10000.0)
CASES = {
    "qrm": dict(loss="qrm", lora=0),
    "orm": dict(loss="orm", lora=0),
    "dpo": dict(loss="dpo", lora=0),
    "qrm_lora": dict(loss="qrm", lora=4),
}


def make_batch(seed: int, pairs: int, seq: int) -> dict[str, torch.Tensor]:
    """Random pairs with varied prompt/response lengths, a truncated response (mask to the end), an
    all-padding rejected row and right padding; masks built as the collator does."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(4, VOCAB, (2 * pairs, seq), generator=g)
    resp = torch.zeros(2 * pairs, seq)
    for i in range(pairs):
        plen = int(torch.randint(2, 6, (1,), generator=g))
        for row in (i, pairs + i):
            rlen = int(torch.randint(1, seq - plen + 1, (1,), generator=g))
            resp[row, plen:plen + rlen] = 1
            tokens[row, plen + rlen:] = 0  # pad
    resp[0, 4:] = 1  # truncated: response runs to the last column
    tokens[0, 4:] = torch.randint(4, VOCAB, (seq - 4,), generator=g)
    labels = torch.cat([tokens[:, 1:], torch.zeros(2 * pairs, 1, dtype=torch.long)], 1)
    label_mask = torch.cat([resp[:, 1:], torch.zeros(2 * pairs, 1)], 1)
    return {
        "tokens": tokens, "position_ids": torch.arange(seq).expand(2 * pairs, seq).contiguous(),
        "response_mask": resp, "labels": labels, "label_mask": label_mask,
        "index": torch.arange(pairs), "ref_logps_sum": -5.0 * torch.rand(2 * pairs, generator=g) - 20.0,
    }


def build(case: dict, sequence_parallel: bool = False):
    cfg = RewardLossConfig(kind=case["loss"])
    model = build_model(MODEL, cfg.role, lora=LoRAConfig(rank=case["lora"]), sequence_parallel=sequence_parallel)
    return model, cfg


def full_tensors(model, attr: str | None) -> dict[str, torch.Tensor]:
    """Gather every parameter (attr None), or its DDP gradient (attr 'main_grad'), to full tensors on
    rank 0, keyed by checkpoint key. Replicated copies must agree (checked)."""
    module = model.module if hasattr(model, "module") else model
    pieces = []
    for st in nested_values(module.sharded_state_dict()):
        if not isinstance(st.data, torch.nn.Parameter):
            continue
        t = getattr(st.data, attr, None) if attr else st.data
        if t is None:
            continue
        # SwiGLU fc1 (and its LoRA B) are factories: build their shards over the tensor we gather
        shards = list(nested_values(replace(st, data=t).build())) if isinstance(st, ShardedTensorFactory) \
            else [replace(st, data=t)]
        for sh in shards:
            pieces.append((sh.key, tuple(sh.global_shape), tuple(sh.global_offset), sh.prepend_axis_num,
                           sh.data.detach().float().clone()))
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, pieces)
    if dist.get_rank() != 0:
        return {}
    full: dict[str, torch.Tensor] = {}
    seen: dict[str, torch.Tensor] = {}
    for part in gathered:
        for key, gshape, goff, pre, t in part:
            if key not in full:
                full[key] = torch.zeros(gshape)
                seen[key] = torch.zeros(gshape, dtype=torch.bool)
            idx = tuple(slice(o, o + 1) for o in goff[:pre]) + tuple(
                slice(o, o + n) for o, n in zip(goff[pre:], t.shape))
            view = t.reshape((1,) * pre + tuple(t.shape))
            region = full[key][idx]
            if seen[key][idx].any():  # replicated across TP: copies must be identical
                assert torch.allclose(region, view, atol=1e-6, rtol=0), f"replicas of {key} disagree"
            full[key][idx] = view
            seen[key][idx] = True
    for key in full:
        assert seen[key].all(), f"{key}: not every element was gathered"
    return full


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("mode", choices=("init", "run"))
    ap.add_argument("--dir", required=True)
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--pp", type=int, default=1)
    ap.add_argument("--sp", action="store_true")
    ap.add_argument("--tag", required=True)
    args = ap.parse_args()
    parallel.initialize(ParallelConfig(args.tp, args.pp, args.sp, seed=1234))
    micro = [make_batch(s, pairs=2, seq=16) for s in (11, 12)]
    results, init_results = {}, {}
    for name, case in CASES.items():
        ckpt = os.path.join(args.dir, f"weights_{name}")
        model, loss_cfg = build(case, args.sp)
        if args.mode == "init":
            torch.manual_seed(7)
            with torch.no_grad():
                for n, p in model.named_parameters():
                    if n.endswith("lora_b"):
                        p.normal_(0, 0.05)
            checkpointing.save_checkpoint(ckpt, 0, model, {"model": MODEL.to_dict()})
            # scores / per-token CE on one micro-batch, for the hand-written forward
            model.eval()
            with torch.no_grad():
                out = model(micro[0]["tokens"], micro[0]["position_ids"], attention_mask=None,
                            labels=micro[0]["labels"] if loss_cfg.kind == "dpo" else None)
            init_results[name] = {"weights": {k: v.detach().clone() for k, v in model.state_dict().items()
                                              if isinstance(v, torch.Tensor)}, "output": out.detach().clone()}
            model, loss_cfg = build(case, args.sp)  # the run below starts from the saved weights
        optim = OptimConfig(lr=1e-3, adam_eps=1e-2, clip_grad=1.0)  # large eps: the step is smooth in the grads
        ddp = wrap_ddp(model, optim)
        optimizer, _ = build_optimizer(ddp, optim, train_iters=10)
        checkpointing.load_checkpoint(ckpt, ddp, load_rng=False)
        ddp.zero_grad_buffer()
        optimizer.zero_grad()
        outs = run_global_batch(ddp, train_forward_step(loss_cfg), micro, forward_only=False)
        sums = reduce_metric_sums(outs, METRIC_NAMES)
        grads = full_tensors(ddp, "main_grad")
        _, grad_norm, _ = optimizer.step()
        params = full_tensors(ddp, None)
        results[name] = {"sums": sums, "grads": grads, "grad_norm": float(grad_norm), "params": params}
    if dist.get_rank() == 0:
        torch.save(results, os.path.join(args.dir, f"{args.tag}.pt"))
        if init_results:
            torch.save(init_results, os.path.join(args.dir, "init.pt"))
    parallel.destroy()


if __name__ == "__main__":
    main()
