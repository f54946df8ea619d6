"""The model against a forward pass written by hand, and parallel invariance of loss, gradients and
one DistributedOptimizer step for (TP, PP) = (1,1), (2,1), (1,2) — CPU, fp32, gloo, 2 processes.

The worker (tests/workers/parallel_worker.py) saves one set of weights at TP=PP=1 and every layout
loads it, so the comparison also covers dist_checkpointing resharding.
"""

from __future__ import annotations

import math
import os

import pytest
import torch

from launch import REPO, torchrun

WORKER = os.path.join(REPO, "tests", "workers", "parallel_worker.py")
CASES = ("qrm", "orm", "dpo", "qrm_lora")
LAYOUTS = {"tp2": (2, 1), "pp2": (1, 2)}
TOL = 1e-5


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("parallel"))
    torchrun([WORKER, "init", "--dir", d, "--tag", "tp1pp1"], nproc=1)
    for tag, (tp, pp) in LAYOUTS.items():
        torchrun([WORKER, "run", "--dir", d, "--tp", str(tp), "--pp", str(pp), "--tag", tag], nproc=tp * pp)
    load = lambda name: torch.load(os.path.join(d, f"{name}.pt"), weights_only=False)  # noqa: E731
    return {"init": load("init"), "tp1pp1": load("tp1pp1"), **{t: load(t) for t in LAYOUTS}}


# ----------------------------------------------------------------------------- hand-written model
def _rms(x, w, eps=1e-5):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def _rope(x, theta=10000.0):
    """x [b, s, heads, d]: rotate-half RoPE, frequencies theta^(-2i/d), cos/sin over cat(f, f)."""
    d = x.shape[-1]
    inv = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float32) / d)
    ang = torch.arange(x.shape[1], dtype=torch.float32)[:, None] * inv[None]
    ang = torch.cat([ang, ang], -1)[None, :, None, :]
    x1, x2 = x[..., : d // 2], x[..., d // 2:]
    return x * ang.cos() + torch.cat([-x2, x1], -1) * ang.sin()


def _linear(w, x, name, lora_scale=1.0):
    y = x @ w[f"{name}.weight"].T
    if f"{name}.lora.lora_a" in w:  # LoRA delta: scale * B A x  (alpha = rank -> scale 1)
        y = y + lora_scale * (x @ w[f"{name}.lora.lora_a"].T) @ w[f"{name}.lora.lora_b"].T
    return y


def hand_forward(w, tokens, heads=4, groups=2, hidden=64):
    """Llama-style decoder from a TP=1 state dict: returns final normed hidden states [b, s, h]."""
    d = hidden // heads
    x = w["embedding.word_embeddings.weight"][tokens]
    b, s, _ = x.shape
    causal = torch.ones(s, s, dtype=torch.bool).tril()
    layer = 0
    while f"decoder.layers.{layer}.input_layernorm.weight" in w:
        p = f"decoder.layers.{layer}."
        h = _rms(x, w[p + "input_layernorm.weight"])
        qkv = _linear(w, h, p + "self_attention.linear_qkv").view(b, s, groups, heads // groups + 2, d)
        q = qkv[:, :, :, : heads // groups].reshape(b, s, heads, d)  # per group: its q heads, then k, then v
        k = qkv[:, :, :, -2].repeat_interleave(heads // groups, dim=2)
        v = qkv[:, :, :, -1].repeat_interleave(heads // groups, dim=2)
        q, k = _rope(q), _rope(k)
        att = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(d)
        att = att.masked_fill(~causal, float("-inf")).softmax(-1)
        o = torch.einsum("bhqk,bkhd->bqhd", att, v).reshape(b, s, hidden)
        x = x + _linear(w, o, p + "self_attention.linear_proj")
        h = _rms(x, w[p + "pre_mlp_layernorm.weight"])
        gate, up = _linear(w, h, p + "mlp.linear_fc1").chunk(2, dim=-1)
        x = x + _linear(w, torch.nn.functional.silu(gate) * up, p + "mlp.linear_fc2")
        layer += 1
    return _rms(x, w["decoder.final_layernorm.weight"])


def _batch():
    import sys

    sys.path.insert(0, os.path.join(REPO, "tests", "workers"))
    from parallel_worker import make_batch

    return make_batch(11, pairs=2, seq=16)


@pytest.mark.dist
@pytest.mark.parametrize("case", ["qrm", "orm", "qrm_lora"])
def test_token_score_is_head_on_hidden_state_of_that_token(results, case):
    r = results["init"][case]
    batch = _batch()
    hidden = hand_forward(r["weights"], batch["tokens"])
    expected = hidden @ r["weights"]["output_layer.weight"].T  # Z at position p = w . h_p
    assert r["output"].shape == expected.shape
    torch.testing.assert_close(r["output"], expected, atol=TOL, rtol=0)
    # causality: the score at p depends only on tokens <= p (a later token changed -> same prefix scores)
    tok2 = batch["tokens"].clone()
    tok2[:, 10] = (tok2[:, 10] + 1) % 256
    hidden2 = hand_forward(r["weights"], tok2)
    torch.testing.assert_close(hidden2[:, :10], hidden[:, :10])


@pytest.mark.dist
def test_policy_token_logprobs_by_hand(results):
    r = results["init"]["dpo"]
    batch = _batch()
    logits = hand_forward(r["weights"], batch["tokens"]) @ r["weights"]["output_layer.weight"].T
    logp = torch.log_softmax(logits, -1).gather(-1, batch["labels"][..., None]).squeeze(-1)
    torch.testing.assert_close(-r["output"], logp, atol=TOL, rtol=0)


@pytest.mark.dist
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("case", CASES)
def test_parallel_layouts_agree(results, layout, case):
    ref, other = results["tp1pp1"][case], results[layout][case]
    assert ref["sums"]["num_valid"] == other["sums"]["num_valid"] > 0
    for k in ref["sums"]:
        assert abs(ref["sums"][k] - other["sums"][k]) <= TOL * max(1.0, abs(ref["sums"][k])), k
    assert ref["grads"].keys() == other["grads"].keys()
    for k in ref["grads"]:
        assert ref["grads"][k].abs().max() > 0 or "embedding" in k, f"{k}: zero gradient"
        torch.testing.assert_close(other["grads"][k], ref["grads"][k], atol=TOL, rtol=0, msg=f"grad {k}")
    assert abs(ref["grad_norm"] - other["grad_norm"]) <= TOL * ref["grad_norm"]
    for k in ref["params"]:
        torch.testing.assert_close(other["params"][k], ref["params"][k], atol=TOL, rtol=0, msg=f"param {k}")


@pytest.mark.dist
def test_lora_trains_only_adapters_and_head(results):
    grads = results["tp1pp1"]["qrm_lora"]["grads"]
    assert grads and all(".lora." in k or "token_head" in k for k in grads), sorted(grads)
    assert any("token_head" in k for k in grads)
    # the step moved adapters but no base weight
    init_w = results["init"]["qrm_lora"]["weights"]
    after = results["tp1pp1"]["qrm_lora"]["params"]
    base = "decoder.layers.self_attention.linear_qkv.weight"
    torch.testing.assert_close(after[base][0], init_w["decoder.layers.0.self_attention.linear_qkv.weight"])
    lora_a = "decoder.layers.self_attention.linear_qkv.lora.lora_a"
    assert (after[lora_a][0] - init_w["decoder.layers.0.self_attention.linear_qkv.lora.lora_a"]).abs().max() > 0
