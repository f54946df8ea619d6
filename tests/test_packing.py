"""Sequence packing (data/packing.py, models/packed_attention.py): the packer against plain loops written
here, the packed attention against per-sequence attention, and packed vs unpacked training steps --
loss sums, per-pair scores, every token's score / log-prob and the gradients within 1e-5 -- for qrm, orm,
dpo with and without LoRA at (TP, PP) = (1,1), (2,1), (1,2), an SFT step, and no cross-sequence leakage
(CPU, gloo; the multi-process part runs tests/workers/packing_worker.py under torchrun)."""

from __future__ import annotations

import math
import os
import random

import pytest
import torch

from launch import REPO, torchrun

from megatron.core.packed_seq_params import PackedSeqParams
from megatron_qrm.data.packing import (
    balance_across_ranks,
    first_fit_decreasing,
    group_by_length,
    pack_collated,
    pack_pairs_shared_prompt,
    packed_seq_params,
    padding_share,
    plan_microbatches,
    shared_prompt_pair_tokens,
    unpack,
)
from megatron_qrm.data.preference import TokenizedPair, collate_pairs
from megatron_qrm.models.packed_attention import PrefixSharingPackedSeqParams, packed_causal_attention, varlen_layout

WORKER = os.path.join(REPO, "tests", "workers", "packing_worker.py")
CASES = ("qrm", "orm", "dpo", "qrm_lora", "orm_lora", "dpo_lora")
LAYOUTS = {"tp1pp1": (1, 1), "tp2": (2, 1), "pp2": (1, 2)}
TOL = 1e-5


# ----------------------------------------------------------------------------- the packer
def test_first_fit_decreasing_matches_a_hand_loop():
    rng = random.Random(0)
    for _ in range(50):
        sizes = [rng.randint(1, 40) for _ in range(rng.randint(1, 30))]
        cap = rng.randint(40, 90)
        bins = first_fit_decreasing(sizes, cap)
        # the textbook algorithm, written out: items by decreasing size, each into the first bin with room
        expect, room = [], []
        for i in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
            for b in range(len(expect)):
                if room[b] >= sizes[i]:
                    expect[b].append(i)
                    room[b] -= sizes[i]
                    break
            else:
                expect.append([i])
                room.append(cap - sizes[i])
        assert bins == expect
        assert sorted(i for b in bins for i in b) == list(range(len(sizes)))
        assert all(sum(sizes[i] for i in b) <= cap for b in bins)
        # FFD never needs more than 11/9 OPT + 1 bins; OPT >= total / cap
        assert len(bins) <= 11 / 9 * math.ceil(sum(sizes) / cap) + 1


def test_first_fit_decreasing_rejects_an_item_too_large():
    with pytest.raises(ValueError, match="does not fit"):
        first_fit_decreasing([3, 11], 10)


def test_balance_across_ranks_is_a_partition_with_close_totals():
    rng = random.Random(1)
    for _ in range(30):
        sizes = [rng.randint(50, 900) for _ in range(rng.choice([8, 16, 32]))]
        n = rng.choice([1, 2, 4])
        parts = balance_across_ranks(sizes, n)
        assert sorted(i for p in parts for i in p) == list(range(len(sizes)))
        totals = [sum(sizes[i] for i in p) for p in parts]
        assert all(p for p in parts)
        # longest-processing-time: the spread is at most the largest item
        assert max(totals) - min(totals) <= max(sizes)


def test_plan_microbatches_covers_the_global_batch_across_ranks():
    sizes = [120, 80, 300, 40, 220, 60, 90, 310]
    plans = [plan_microbatches(sizes, 400, r, 2) for r in range(2)]
    flat = sorted(i for plan in plans for mb in plan for i in mb)
    assert flat == list(range(len(sizes)))
    assert all(sum(sizes[i] for i in mb) <= 400 for plan in plans for mb in plan)


def _pairs(seed: int, n: int) -> list[TokenizedPair]:
    rng = random.Random(seed)
    ids = lambda k: [rng.randint(4, 99) for _ in range(k)]  # noqa: E731
    return [TokenizedPair(ids(rng.randint(1, 6)), ids(rng.randint(1, 9)), ids(rng.randint(1, 9)), False)
            for _ in range(n)]


def test_pack_collated_lays_sequences_out_one_after_another():
    pairs = _pairs(2, 3)
    batch = collate_pairs(pairs, pad_id=0, pad_to_multiple=1)
    packed = pack_collated(batch, pad_id=0, pad_to_multiple=8)
    seqs = [p.prompt_ids + p.chosen_ids for p in pairs] + [p.prompt_ids + p.rejected_ids for p in pairs]
    real = sum(len(s) for s in seqs)
    total = math.ceil(real / 8) * 8
    # written out: concatenate, positions restart, labels = next token of the same sequence
    tokens = [t for s in seqs for t in s] + [0] * (total - real)
    positions = [p for s in seqs for p in range(len(s))] + list(range(total - real))
    labels = [t for s in seqs for t in s[1:] + [0]] + [0] * (total - real)
    bounds = [0]
    for s in seqs:
        bounds.append(bounds[-1] + len(s))
    if total > real:
        bounds.append(total)
    assert packed["tokens"].tolist() == [tokens]
    assert packed["position_ids"].tolist() == [positions]
    assert packed["labels"].tolist() == [labels]
    assert packed["cu_seqlens"].tolist() == bounds
    assert int(packed["max_seqlen"]) == max(max(len(s) for s in seqs), total - real)
    # unpack returns each row of the unpacked batch (0 beyond its length), and the masks are the unpacked ones
    back = unpack(packed["tokens"], packed)
    assert torch.equal(back, batch["tokens"])
    assert torch.equal(packed["response_mask"], batch["response_mask"])
    psp = packed_seq_params(packed)
    assert psp.qkv_format == "thd" and torch.equal(psp.cu_seqlens_q, packed["cu_seqlens"])
    assert padding_share([packed]) == pytest.approx((total - real) / total)
    longest = max(len(s) for s in seqs)  # the unpacked batch pads every row to the longest
    assert padding_share([batch]) == pytest.approx(sum(longest - len(s) for s in seqs) / (len(seqs) * longest))
    assert packed_seq_params(batch) is None


def test_unpack_is_differentiable_and_zero_on_padding():
    pairs = _pairs(3, 2)
    packed = pack_collated(collate_pairs(pairs, 0, 1), 0, 8)
    t = packed["tokens"].shape[1]
    v = torch.randn(1, t, requires_grad=True)
    out = unpack(v, packed)
    assert torch.equal(out[~packed["unpack_valid"]], torch.zeros(int((~packed["unpack_valid"]).sum())))
    out.sum().backward()
    n_real = int(packed["unpack_valid"].sum())
    assert torch.equal(v.grad[0, :n_real], torch.ones(n_real))  # each real token used once
    assert torch.equal(v.grad[0, n_real:], torch.zeros(t - n_real))  # the padding tail never


def test_group_by_length_sorts_then_cuts():
    idx = [10, 11, 12, 13, 14, 15]
    sizes = [5, 50, 20, 40, 10, 30]
    mbs = group_by_length(idx, sizes, 2)
    assert [m.tolist() for m in mbs] == [[11, 13], [15, 12], [14, 10]]


# ----------------------------------------------------------------------------- packed attention
@pytest.mark.parametrize("groups", [4, 2])
def test_packed_attention_equals_attention_per_sequence(groups):
    torch.manual_seed(0)
    lengths = [5, 1, 9, 3, 7]
    heads, d = 4, 8
    t = sum(lengths)
    q = torch.randn(t, heads, d, dtype=torch.float64, requires_grad=True)
    k = torch.randn(t, groups, d, dtype=torch.float64, requires_grad=True)
    v = torch.randn(t, groups, d, dtype=torch.float64, requires_grad=True)
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32)
    psp = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=9, max_seqlen_kv=9)
    out = packed_causal_attention(q, k, v, psp, softmax_scale=d ** -0.5, enable_gqa=False)
    # lengths 9, 7 | 5 | 3 | 1 fall in 4 length buckets (a bucket takes sequences >= 0.7 x its longest)
    layout = varlen_layout(psp, "cpu")
    assert [(n, length) for _, n, length in layout.buckets] == [(2, 9), (1, 5), (1, 3), (1, 1)]
    assert layout.padded_position.unique().numel() == t and layout.size == 2 * 9 + 5 + 3 + 1
    # reference: softmax attention written out, one sequence at a time
    rep = heads // groups
    expect = []
    for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()):
        qs, ks, vs = q[a:b], k[a:b].repeat_interleave(rep, 1), v[a:b].repeat_interleave(rep, 1)
        s = torch.einsum("qhd,khd->hqk", qs, ks) * d ** -0.5
        s = s.masked_fill(~torch.ones(b - a, b - a, dtype=torch.bool).tril(), float("-inf"))
        expect.append(torch.einsum("hqk,khd->qhd", s.softmax(-1), vs).reshape(b - a, heads * d))
    expect = torch.cat(expect)
    torch.testing.assert_close(out, expect, atol=1e-12, rtol=0)
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), g)
    grads_ref = torch.autograd.grad(expect, (q, k, v), g)
    for a, b in zip(grads, grads_ref):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=0)


def test_prefix_tree_attention_equals_attention_per_row():
    """Shared-prompt layout: each branch attends to its prefix and itself; compared with softmax attention
    written out per unpacked row (prefix + branch), values and gradients."""
    torch.manual_seed(1)
    # segments: prefix 0 (4 tokens) with branches 1 (3) and 2 (5); a lone sequence 3 (6); prefix 4 (2) with
    # branches 5 (1) and 6 (2); a padding segment 7 (3)
    lengths = [4, 3, 5, 6, 2, 1, 2, 3]
    parent = [-1, 0, 0, -1, -1, 4, 4, -1]
    heads, groups, d = 4, 2, 8
    t = sum(lengths)
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32)
    q = torch.randn(t, heads, d, dtype=torch.float64, requires_grad=True)
    k = torch.randn(t, groups, d, dtype=torch.float64, requires_grad=True)
    v = torch.randn(t, groups, d, dtype=torch.float64, requires_grad=True)
    psp = PrefixSharingPackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=9,
                                       max_seqlen_kv=9, segment_parent=torch.tensor(parent),
                                       position_ids=torch.zeros(t, dtype=torch.long))
    out = packed_causal_attention(q, k, v, psp, softmax_scale=d ** -0.5, enable_gqa=False)
    rows = [[0, 1], [0, 2], [3], [4, 5], [4, 6], [7]]  # the unpacked rows, as segment chains
    expect = torch.zeros(t, heads * d, dtype=torch.float64)
    seen = torch.zeros(t, dtype=torch.bool)
    for chain in rows:
        idx = torch.cat([torch.arange(int(cu[s]), int(cu[s + 1])) for s in chain])
        n = idx.numel()
        s_ = torch.einsum("qhd,khd->hqk", q[idx], k[idx].repeat_interleave(2, 1)) * d ** -0.5
        s_ = s_.masked_fill(~torch.ones(n, n, dtype=torch.bool).tril(), float("-inf"))
        ctx = torch.einsum("hqk,khd->qhd", s_.softmax(-1), v[idx].repeat_interleave(2, 1)).reshape(n, heads * d)
        fresh = ~seen[idx]  # a prefix's output is the same in every row that holds it: take it once
        expect = expect.index_put((idx[fresh],), ctx[fresh])
        seen[idx] = True
    torch.testing.assert_close(out, expect, atol=1e-12, rtol=0)
    g = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad(out, (q, k, v), g), torch.autograd.grad(expect, (q, k, v), g)):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=0)


def test_pack_pairs_shared_prompt_lays_out_a_prefix_tree():
    pairs = _pairs(4, 5) + [TokenizedPair([7], [8, 9], [10], False)]  # a 1-token prompt: nothing to share
    batch = collate_pairs(pairs, 0, 1)
    packed = pack_pairs_shared_prompt(batch, 0, 8)
    # a plain loop: per pair prompt[:-1], then prompt[-1] + chosen, prompt[-1] + rejected
    tokens, positions, parent, seg_lengths = [], [], [], []
    for p in pairs:
        pre = p.prompt_ids[:-1]
        first = None
        if pre:
            first = len(seg_lengths)
            tokens += pre
            positions += list(range(len(pre)))
            parent.append(-1)
            seg_lengths.append(len(pre))
        for resp in (p.chosen_ids, p.rejected_ids):
            branch = p.prompt_ids[-1:] + resp
            tokens += branch
            positions += list(range(len(pre), len(pre) + len(branch)))
            parent.append(-1 if first is None else first)
            seg_lengths.append(len(branch))
    real = len(tokens)
    assert packed["tokens"][0, :real].tolist() == tokens
    assert packed["position_ids"][0, :real].tolist() == positions
    assert packed["tokens"].shape[1] == math.ceil(real / 8) * 8
    assert padding_share([packed]) == pytest.approx(1 - real / packed["tokens"].shape[1])
    assert packed["segment_parent"][:len(parent)].tolist() == parent
    assert (packed["cu_seqlens"][1:len(seg_lengths) + 1] - packed["cu_seqlens"][:len(seg_lengths)]).tolist() == seg_lengths
    # unpacking gives back every row, labels included
    for key in ("tokens", "labels"):
        back = unpack(packed[key][..., None], packed)[..., 0]
        torch.testing.assert_close(back, torch.where(packed["unpack_valid"], batch[key], 0))
    assert packed["unpack_valid"].sum(1).tolist() == [len(p.prompt_ids) + len(getattr(p, r))
                                                      for r in ("chosen_ids", "rejected_ids") for p in pairs]
    assert int(packed["max_seqlen"]) == max(packed["unpack_valid"].sum(1).tolist() + [packed["tokens"].shape[1] - real])
    assert shared_prompt_pair_tokens(
        torch.tensor([[len(p.prompt_ids) + len(p.chosen_ids), len(p.prompt_ids) + len(p.rejected_ids)] for p in pairs]).numpy(),
        torch.tensor([len(p.prompt_ids) for p in pairs]).numpy()).sum() == real
    with pytest.raises(ValueError, match="different prompts"):
        bad = collate_pairs(pairs[:2], 0, 1)
        bad["tokens"][2, 0] += 1
        pack_pairs_shared_prompt(bad, 0, 8)


# ----------------------------------------------------------------------------- training steps
@pytest.fixture(scope="module")
def results(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("packing"))
    torchrun([WORKER, "init", "--dir", d, "--tag", "tp1pp1"], nproc=1)
    for tag, (tp, pp) in LAYOUTS.items():
        if tag != "tp1pp1":
            torchrun([WORKER, "run", "--dir", d, "--tp", str(tp), "--pp", str(pp), "--tag", tag], nproc=tp * pp)
    return {tag: torch.load(os.path.join(d, f"{tag}.pt"), weights_only=False) for tag in LAYOUTS}


@pytest.mark.dist
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("case", CASES)
def test_packed_step_equals_unpacked(results, layout, case):
    ref = results["tp1pp1"][case]["unpacked"]
    for other in (results[layout][case]["unpacked"], results[layout][case]["packed"], results[layout][case]["shared"]):
        assert other["sums"]["num_valid"] == ref["sums"]["num_valid"] > 0
        for k in ref["sums"]:
            assert abs(ref["sums"][k] - other["sums"][k]) <= TOL * max(1.0, abs(ref["sums"][k])), k
        torch.testing.assert_close(other["chosen"], ref["chosen"], atol=TOL, rtol=0)
        torch.testing.assert_close(other["rejected"], ref["rejected"], atol=TOL, rtol=0)
        assert len(other["tokens"]) == len(ref["tokens"]) == 12
        for a, b in zip(other["tokens"], ref["tokens"]):
            torch.testing.assert_close(a, b, atol=TOL, rtol=0)
        assert other["grads"].keys() == ref["grads"].keys()
        for k in ref["grads"]:
            assert ref["grads"][k].abs().max() > 0 or "embedding" in k, f"{k}: zero gradient"
            torch.testing.assert_close(other["grads"][k], ref["grads"][k], atol=TOL, rtol=0, msg=f"grad {k}")


@pytest.mark.dist
@pytest.mark.parametrize("case", CASES)
def test_no_cross_sequence_leakage(results, case):
    leak = results["tp1pp1"][case]["leakage"]
    others = leak["valid"].clone()
    others[leak["changed_row"]] = False
    assert others.sum() > 0
    assert torch.equal(leak["base"][others], leak["changed"][others])  # bit-identical
    row = leak["changed_row"]
    assert not torch.equal(leak["base"][row], leak["changed"][row])  # the changed sequence did change


@pytest.mark.dist
@pytest.mark.parametrize("case", CASES)
def test_shared_prompt_packing_has_no_leakage(results, case):
    """A changed rejected branch moves only its own row (not the chosen row sharing its prompt); a changed
    shared prefix moves both rows of that pair and nothing else."""
    leak = results["tp1pp1"][case]["shared_leakage"]
    valid = leak["valid"]
    assert int(leak["branch_rows"].sum()) == 1 and int(leak["prefix_rows"].sum()) == 2
    for name in ("branch", "prefix"):
        moved = leak[f"{name}_rows"]
        others = valid & ~moved[:, None]
        assert others.sum() > 0
        assert torch.equal(leak["base"][others], leak[name][others]), name  # bit-identical
        for row in moved.nonzero()[:, 0].tolist():
            assert not torch.equal(leak["base"][row], leak[name][row]), (name, row)


@pytest.mark.dist
@pytest.mark.parametrize("case", ["dpo", "dpo_lora"])
def test_sft_step_packed_equals_unpacked(results, case):
    unpacked, packed = results["tp1pp1"][case]["sft"]
    assert packed["n_micro"] >= 2
    assert unpacked["sums"]["tokens"] == packed["sums"]["tokens"] > 0
    assert abs(unpacked["sums"]["loss_sum"] - packed["sums"]["loss_sum"]) <= TOL * unpacked["sums"]["loss_sum"]
    for k in unpacked["grads"]:
        assert unpacked["grads"][k].abs().max() > 0 or "embedding" in k
        torch.testing.assert_close(packed["grads"][k], unpacked["grads"][k], atol=TOL, rtol=0, msg=k)


# ----------------------------------------------------------------------------- qrm train-rm / train-sft
E2E_FLAGS = ["--micro-batch-size", "2", "--global-batch-size", "8", "--lr", "3e-3", "--log-interval", "1",
             "--no-tensorboard", "--seed", "3"]
E2E_STEPS = 4


@pytest.fixture(scope="module")
def e2e(qrm_data, tiny_flags, qrm_batch, tmp_path_factory):
    """train-rm runs on the same data: packed (default: each pair's prompt once), packed with whole pairs
    (--no-pack-shared-prompts), --no-pack-sequences, --group-by-length, packed with 2 data-parallel ranks, and a
    packed run that exits at step 2 and resumes; qrm and dpo (whose reference log-probs are computed packed
    too)."""
    out = tmp_path_factory.mktemp("packing_e2e")
    common = ["train-rm", "--train-data", qrm_data.pairs, "--tokenizer", qrm_data.tokenizer, *tiny_flags, *E2E_FLAGS,
              "--train-iters", str(E2E_STEPS)]
    runs, names = [], []
    for kind in ("qrm", "dpo"):
        for variant, extra in (("packed", []), ("padded", ["--no-pack-sequences"]),
                               ("grouped", ["--no-pack-sequences", "--group-by-length"]),
                               ("small_packs", ["--pack-tokens", "160"]),
                               ("unshared", ["--no-pack-shared-prompts"]),
                               ("exit", ["--exit-interval", "2"])):
            names.append(f"{kind}_{variant}")
            runs.append([*common, "--reward-loss", kind, *extra, "--save", str(out / names[-1])])
    results = dict(zip(names, qrm_batch(runs)))
    # resume the exited runs in a new process; the DP=2 runs under torchrun
    resumed = [[*common, "--reward-loss", k, "--load", str(out / f"{k}_exit"), "--save", str(out / f"{k}_exit")]
               for k in ("qrm", "dpo")]
    results.update(zip(("qrm_resumed", "dpo_resumed"), qrm_batch(resumed)))
    dp2 = [[*common, "--reward-loss", k, "--save", str(out / f"{k}_dp2")] for k in ("qrm", "dpo")]
    results.update(zip(("qrm_dp2", "dpo_dp2"), qrm_batch(dp2, nproc=2)))
    # train-sft on the pairs' chosen responses
    sft = ["train-sft", "--train-data", qrm_data.pairs, "--response-field", "chosen", "--tokenizer",
           qrm_data.tokenizer, *tiny_flags, *E2E_FLAGS, "--train-iters", str(E2E_STEPS)]
    variants = {"sft_packed": [], "sft_padded": ["--no-pack-sequences"],
                "sft_grouped": ["--no-pack-sequences", "--group-by-length"]}
    results.update(zip(variants, qrm_batch([[*sft, *extra, "--save", str(out / name)]
                                            for name, extra in variants.items()])))
    # eval-rm of the packed Q-RM: packed with shared prompts (default), packed whole, padded
    evals = {"eval_shared": [], "eval_unshared": ["--no-pack-shared-prompts"], "eval_padded": ["--no-pack-sequences"]}
    results.update(zip(evals, qrm_batch([
        ["eval-rm", "--load", str(out / "qrm_packed"), "--data", qrm_data.pairs, "--micro-batch-size", "8",
         "--output", str(out / f"{name}.json"), "--dump-token-scores", str(out / f"{name}.jsonl"), *extra]
        for name, extra in evals.items()])))
    return out, results


@pytest.mark.dist
@pytest.mark.parametrize("kind", ["qrm", "dpo"])
def test_train_rm_packed_losses_equal_padded(e2e, kind):
    from conftest import losses

    out, results = e2e
    assert "batching: packed micro-batches of up to 256 tokens, each prompt once" in results[f"{kind}_packed"]["stdout"]
    assert "batching: packed micro-batches of up to 256 tokens\n" in results[f"{kind}_unshared"]["stdout"]
    assert "batching: padded, grouped by length" in results[f"{kind}_grouped"]["stdout"]
    want = losses(out / f"{kind}_padded")
    assert sorted(want) == list(range(1, E2E_STEPS + 1))
    for variant in ("packed", "grouped", "small_packs", "unshared", "dp2", "exit"):
        got = losses(out / f"{kind}_{variant}")
        for step in range(1, E2E_STEPS + 1):
            assert abs(got[step] - want[step]) <= 1e-5, (variant, step, got, want)


@pytest.mark.dist
@pytest.mark.parametrize("kind", ["qrm", "dpo"])
def test_train_rm_packed_resume_is_exact(e2e, kind):
    from conftest import losses

    out, results = e2e
    assert "at iteration 2" in results[f"{kind}_resumed"]["stdout"]
    uninterrupted = losses(out / f"{kind}_packed")
    resumed = losses(out / f"{kind}_exit")
    assert max(abs(resumed[s] - uninterrupted[s]) for s in range(1, E2E_STEPS + 1)) <= 1e-6


@pytest.mark.dist
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("role", ["policy", "critic"])
def test_ppo_update_packed_equals_padded(results, layout, role):
    padded, packed = results[layout]["rl"][f"{role}_padded"], results[layout]["rl"][f"{role}_packed"]
    assert packed["n_micro"] >= 2 and padded["n_micro"] == 3
    assert padded["sums"]["tokens"] == packed["sums"]["tokens"] > 0
    for k in padded["sums"]:
        assert abs(padded["sums"][k] - packed["sums"][k]) <= TOL * max(1.0, abs(padded["sums"][k])), k
    assert padded["grads"].keys() == packed["grads"].keys()
    for k in padded["grads"]:
        assert padded["grads"][k].abs().max() > 0 or "embedding" in k, f"{k}: zero gradient"
        torch.testing.assert_close(packed["grads"][k], padded["grads"][k], atol=TOL, rtol=0, msg=k)


@pytest.mark.dist
def test_eval_rm_packed_equals_padded(e2e):
    """eval-rm's metrics and every token's credit: packed (each prompt once, the default) and packed whole
    agree with padded micro-batches."""
    import json

    out, _ = e2e
    res = {k: json.loads((out / f"{k}.json").read_text()) for k in ("eval_shared", "eval_unshared", "eval_padded")}
    dumps = {k: [json.loads(line) for line in (out / f"{k}.jsonl").read_text().splitlines()] for k in res}
    want = res["eval_padded"]
    assert want["valid_pairs"] == want["pairs"] > 8
    for k in ("eval_shared", "eval_unshared"):
        for m in ("pairwise_accuracy", "mean_margin", "mean_chosen_score", "mean_rejected_score"):
            assert abs(res[k][m] - want[m]) <= 1e-5, (k, m, res[k][m], want[m])
        assert len(dumps[k]) == len(dumps["eval_padded"]) == 2 * want["pairs"]
        for a, b in zip(dumps[k], dumps["eval_padded"]):
            assert (a["index"], a["side"], a["tokens"]) == (b["index"], b["side"], b["tokens"])
            assert max(abs(x - y) for x, y in zip(a["scores"], b["scores"])) <= 1e-5


@pytest.mark.dist
def test_train_sft_packed_losses_equal_padded(e2e):
    from conftest import losses

    out, results = e2e
    want = losses(out / "sft_padded")
    assert sorted(want) == list(range(1, E2E_STEPS + 1))
    for variant in ("sft_packed", "sft_grouped"):
        got = losses(out / variant)
        assert max(abs(got[s] - want[s]) for s in want) <= 1e-5, (variant, got, want)


def test_pack_tokens_smaller_than_a_pair_is_a_clear_error(qrm_data, tiny_flags):
    from launch import qrm

    proc = qrm(["train-rm", "--train-data", qrm_data.pairs, "--tokenizer", qrm_data.tokenizer, *tiny_flags,
                "--train-iters", "1", "--pack-tokens", "10"], check=False)
    assert proc.returncode != 0
    assert "qrm train-rm: error: --pack-tokens 10 is smaller than the longest pair of --train-data" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("flags, message", [
    (["--no-pack-sequences"], "--pack-shared-prompts packs pairs; it cannot be combined with --no-pack-sequences"),
    (["--local-attention", "unfused"], "--pack-shared-prompts: megatron-core's unfused DotProductAttention"),
])
def test_pack_shared_prompts_without_a_prefix_tree_attention_is_a_clear_error(qrm_data, tiny_flags, flags, message):
    from launch import qrm

    proc = qrm(["train-rm", "--train-data", qrm_data.pairs, "--tokenizer", qrm_data.tokenizer, *tiny_flags,
                "--train-iters", "1", "--pack-shared-prompts", *flags], check=False)
    assert proc.returncode != 0
    assert f"qrm train-rm: error: {message}" in proc.stderr
    assert "Traceback" not in proc.stderr
