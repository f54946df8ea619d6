"""In-memory HF weights of a live Megatron policy (megatron_qrm.conversion.streaming), the refit source of
the vLLM engine; needs no vLLM.

One torchrun launch (tests/workers/vllm_worker.py) streams the same policy at (TP, PP) = (1,1) x DP 2,
(2,1) and (1,2); here every layout's tensors must be bit-identical to TP=1's and to ``export_hf`` of the
same checkpoint on disk (the exporter reads the dist checkpoint, an independent path), without and with
LoRA (merged). Only the model-parallel group's first rank receives tensors.
"""

from __future__ import annotations

import glob
import json
import os
import sys

import pytest
import torch

from launch import REPO, torchrun

sys.path.insert(0, REPO)

WORKER = os.path.join(REPO, "tests", "workers", "vllm_worker.py")


@pytest.fixture(scope="module", params=[False, True], ids=["plain", "lora"])
def streamed(request, tmp_path_factory):
    d = tmp_path_factory.mktemp("stream_lora" if request.param else "stream")
    with open(d / "jobs.json", "w") as f:
        json.dump({"stream": {"dir": str(d), "lora": request.param}}, f)
    torchrun([WORKER, "--jobs", str(d / "jobs.json"), "--out", str(d / "results.json")], nproc=2)
    from megatron_qrm.conversion import export_hf
    from safetensors.torch import load_file

    hf = export_hf(str(d / "ckpt"), str(d / "hf"), show_progress=False)
    exported = {}
    for f in sorted(glob.glob(os.path.join(hf, "*.safetensors"))):
        exported.update(load_file(f))
    with open(d / "results.json") as f:
        results = json.load(f)
    layouts = {name: torch.load(d / f"stream_{name}.pt") for name in ("tp1", "tp2", "pp2")}
    return {"dir": str(d), "exported": exported, "layouts": layouts, "counts": results["stream"]["counts"]}


@pytest.mark.dist
@pytest.mark.parametrize("layout", ["tp1", "tp2", "pp2"])
def test_streamed_weights_equal_export_bitwise(streamed, layout):
    got, want = streamed["layouts"][layout], streamed["exported"]
    assert list(got) == list(want) or sorted(got) == sorted(want), (sorted(set(got) ^ set(want)))
    assert len(want) == 3 + 4 * 9  # embed, final norm, lm_head + 4 layers x (2 norms, q, k, v, o, gate, up, down)
    for name, t in want.items():
        assert got[name].dtype == t.dtype and got[name].shape == t.shape, name
        assert torch.equal(got[name], t), f"{layout}: {name} differs from the exporter's"


@pytest.mark.dist
def test_layouts_agree_and_only_the_first_rank_receives(streamed):
    tp1 = streamed["layouts"]["tp1"]
    for layout in ("tp2", "pp2"):
        for name, t in tp1.items():
            assert torch.equal(streamed["layouts"][layout][name], t), (layout, name)
    n = len(tp1)
    assert streamed["counts"]["tp1"] == [n, n]  # data-parallel 2: each replica's own group of one
    assert streamed["counts"]["tp2"] == [n, 0]
    assert streamed["counts"]["pp2"] == [n, 0]


@pytest.mark.dist
def test_lora_is_merged(streamed, request):
    """q_proj of layer 0 == the q rows of (W_qkv + scale * B A), computed here from the raw adapter, and
    far from the base weight alone (the random B makes the merge matter)."""
    path = os.path.join(streamed["dir"], "layer0_qkv_lora.pt")
    if not os.path.exists(path):
        pytest.skip("plain model")
    raw = torch.load(path)
    merged = raw["weight"] + raw["scale"] * (raw["b"] @ raw["a"])  # [groups * (q/g + 2) * d, h]
    groups, q_per_group, d, h = 2, 2, 16, 64
    q_rows = merged.view(groups, q_per_group + 2, d, h)[:, :q_per_group].reshape(-1, h)
    base_q = raw["weight"].view(groups, q_per_group + 2, d, h)[:, :q_per_group].reshape(-1, h)
    got = streamed["layouts"]["tp1"]["model.layers.0.self_attn.q_proj.weight"]
    torch.testing.assert_close(got, q_rows, rtol=0, atol=1e-6)
    assert float((got - base_q).abs().max()) > 1e-2


def test_truncated_is_weights_and_weighted_losses():
    """--rollout-is-correction: w = min(exp(logp_old - behaviour), cap) on actions, 0 elsewhere (hand-derived),
    and the weighted PPO / REINFORCE token losses are the unweighted ones times w."""
    import math

    from megatron_qrm.rl import losses

    logp_old = torch.tensor([[0.0, -1.0, -2.0, -0.5]])
    behaviour = torch.tensor([[0.0, -1.5, -1.0, -3.0]])
    mask = torch.tensor([[0.0, 1.0, 1.0, 1.0]])
    w = losses.truncated_is_weights(logp_old, behaviour, mask, cap=2.0)
    assert torch.allclose(w, torch.tensor([[0.0, math.exp(0.5), math.exp(-1.0), 2.0]]))
    with pytest.raises(ValueError, match="rollout-is-cap"):
        losses.truncated_is_weights(logp_old, behaviour, mask, cap=0.0)
    logp = torch.tensor([[0.0, -0.9, -2.1, -0.4]])
    adv = torch.tensor([[0.0, 1.0, -1.0, 0.5]])
    plain = losses.reinforce_loss(logp, adv, mask)
    weighted = losses.reinforce_loss(logp, adv, mask, token_weights=w)
    assert torch.allclose(weighted.loss_sum, (-adv * logp * w * mask).sum())
    assert not torch.allclose(weighted.loss_sum, plain.loss_sum)
    ppo_w = losses.ppo_policy_loss(logp, logp_old, adv, mask, token_weights=w)
    ratio = torch.exp(logp - logp_old)
    per = -torch.minimum(ratio * adv, ratio.clamp(0.8, 1.2) * adv)
    assert torch.allclose(ppo_w.loss_sum, (per * w * mask).sum())
