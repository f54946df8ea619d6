"""Fused attention and the KV-cache decoder against independent computations.

Two random HF models (a Llama-3.1-style one with RoPE scaling and GQA, untied; a Qwen2-style one with Q/K/V
biases and tied embeddings), imported with the project's converter, loaded at TP=1 (DP=2), TP=2 and PP=2
in ONE torchrun launch (``tests/workers/decode_worker.py``):

* greedy tokens of prompts of mixed lengths (1..17) are identical to ``transformers``' ``generate`` (left
  padding + attention mask) and to the project's full-recompute path, at every layout;
* the recorded behaviour log-probs equal a teacher-forced full forward (megatron-core's) within 1e-5, and
  HF's within 1e-4;
* with LoRA adapters attached (random B), KV cache == full recomputation at every layout, and the adapters
  change the tokens (their hooks run in the decoder);
* SDPA core attention vs megatron-core's DotProductAttention: the same Q-RM loss and gradients within 1e-5
  (TP=1 and TP=2);
* temperature-1 sampling under TP=2 (vocabulary never gathered: per-rank Gumbel-max, and per-rank top-k
  merged) draws from the model's distribution: a chi-square goodness-of-fit test of 4000 first tokens
  against the exact softmax (and the top-k-renormalised one), and a homogeneity test TP=2 vs TP=1 (different
  seeds); the same test rejects a wrong distribution (temperature 1.5 instead of 1), so it can fail.
"""

from __future__ import annotations

import json
import math
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from launch import torchrun  # noqa: E402

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "workers", "decode_worker.py")
VOCAB = 250  # not a multiple of 128: padded vocabulary columns exist at every TP size
BASE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=256, vocab_size=VOCAB)
MODELS = {
    "llama31": ("LlamaForCausalLM", "LlamaConfig",
                dict(rope_theta=500000.0, rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                        "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})),
    "qwen2": ("Qwen2ForCausalLM", "Qwen2Config", dict(rope_theta=1e6, tie_word_embeddings=True)),
}
PROMPT_LENS = (3, 17, 9, 1, 12, 6)
MAX_NEW = 12
MAX_LENGTH = 64
STAT_ROWS = 4000
STAT_TOP_K = 8
P_MIN = 1e-3  # chi-square tests reject below this p-value


def _make_hf(out: str, name: str) -> str:
    import transformers

    cls_name, cfg_name, overrides = MODELS[name]
    torch.manual_seed(0)
    model = getattr(transformers, cls_name)(getattr(transformers, cfg_name)(**{**BASE, **overrides}))
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():  # weights ~N(0, 0.1), norms 1 + N(0, 0.1): peaked logits, every tensor matters
        for pname, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g) * 0.1
            p.copy_(1 + noise if pname.endswith("norm.weight") else noise)
    model.save_pretrained(out)
    return out


def _prompts() -> list[list[int]]:
    g = torch.Generator().manual_seed(11)
    return [torch.randint(4, VOCAB, (n,), generator=g).tolist() for n in PROMPT_LENS]


def _hf_greedy(path: str, prompts: list[list[int]]) -> tuple[list[list[int]], object]:
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    width = max(map(len, prompts))
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    attn = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p)
        attn[i, width - len(p):] = 1
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=attn, do_sample=False, max_new_tokens=MAX_NEW,
                             min_new_tokens=MAX_NEW, pad_token_id=0, eos_token_id=None)
    return out[:, width:].tolist(), model


@pytest.fixture(scope="module")
def decoded(tmp_path_factory):
    from megatron_qrm.conversion import import_hf

    root = tmp_path_factory.mktemp("decode")
    hf, ckpts = {}, {}
    for name in MODELS:
        hf[name] = _make_hf(str(root / f"hf_{name}"), name)
        ckpts[name] = import_hf(hf[name], str(root / f"mcore_{name}"), role="policy", show_progress=False)
    prompts = _prompts()
    job = {"models": ckpts, "prompts": prompts, "max_new_tokens": MAX_NEW, "vocab_size": VOCAB,
           "max_length": MAX_LENGTH, "out": str(root / "decoded.pt"),
           "stat": {"rows": STAT_ROWS, "prompt": prompts[2], "top_k": STAT_TOP_K, "seeds": {"tp1": 101, "tp2": 202}}}
    (root / "job.json").write_text(json.dumps(job))
    torchrun([WORKER, "--job", str(root / "job.json")], nproc=2)
    return {"results": torch.load(job["out"], weights_only=False), "hf": hf, "prompts": prompts}


def _responses(r: dict) -> list[list[int]]:
    return [r["tokens"][i, int(r["prompt_lens"][i]):int(r["prompt_lens"][i]) + int(r["response_lens"][i])].tolist()
            for i in range(r["tokens"].shape[0])]


@pytest.mark.dist
@pytest.mark.parametrize("name", list(MODELS))
def test_greedy_tokens_match_hf_generate_and_full_recompute(decoded, name):
    prompts = decoded["prompts"]
    want, hf_model = _hf_greedy(decoded["hf"][name], prompts)
    assert len({tuple(w) for w in want}) == len(want)  # the rows really differ
    for layout, res in decoded["results"].items():
        for path in ("kv", "full"):
            r = res[name][path]
            assert r["prompt_lens"].tolist() == list(PROMPT_LENS)
            for i, p in enumerate(prompts):
                assert r["tokens"][i, :len(p)].tolist() == p
            assert _responses(r) == want, f"{name} {layout} {path}: greedy tokens differ from HF generate"
        kv, full = res[name]["kv"], res[name]["full"]
        assert torch.equal(kv["action_mask"], full["action_mask"])
        assert torch.allclose(kv["logprobs"], full["logprobs"], atol=1e-5, rtol=0), f"{name} {layout}"

    # behaviour log-probs == a teacher-forced forward: megatron-core's (1e-5) and HF's (1e-4)
    r = decoded["results"]["tp1"][name]
    mask = r["kv"]["action_mask"][:, 1:] > 0
    recorded = r["kv"]["logprobs"][:, 1:][mask]
    assert mask.sum() == len(PROMPT_LENS) * MAX_NEW
    assert torch.allclose(recorded, r["teacher_forced"][mask], atol=1e-5, rtol=0)
    with torch.no_grad():
        tokens = r["kv"]["tokens"]
        hf_lp = hf_model(input_ids=tokens).logits.float().log_softmax(-1)[:, :-1].gather(-1, tokens[:, 1:, None])
    assert torch.allclose(recorded, hf_lp.squeeze(-1)[mask], atol=1e-4, rtol=0)
    assert recorded.max() < -1e-3 and recorded.min() > -20  # real probabilities, not saturated ones


@pytest.mark.dist
def test_lora_adapters_act_in_the_kv_cache_decoder(decoded):
    for layout, res in decoded["results"].items():
        lora, base = res["llama31"]["lora"], res["llama31"]["kv"]
        assert torch.equal(lora["kv"]["tokens"], lora["full"]["tokens"]), layout
        assert torch.allclose(lora["kv"]["logprobs"], lora["full"]["logprobs"], atol=1e-5, rtol=0), layout
        assert not torch.equal(lora["kv"]["tokens"], base["tokens"]), layout


@pytest.mark.dist
@pytest.mark.parametrize("layout", ["tp1", "tp2"])
def test_sdpa_equals_dot_product_attention_loss_and_grads(decoded, layout):
    r = decoded["results"][layout]["sdpa_vs_unfused"]
    assert r["core"] == ["DotProductAttention", "SDPAttention"]
    assert r["loss_diff"] < 1e-5 and abs(r["losses"][0]) > 1e-3
    assert r["grad_maxdiff"] < 1e-5, r
    assert r["n_params"] >= 10


def _chi2_sf(x: float, df: int) -> float:
    """P(X >= x) for X ~ chi-square(df): the regularised upper incomplete gamma function."""
    return float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64), torch.tensor(x / 2, dtype=torch.float64)))


def _goodness_of_fit(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """p-value of Pearson's chi-square test of ``counts`` against ``probs`` (bins expecting < 5 pooled)."""
    n = float(counts.sum())
    expected = probs.double() * n
    big = expected >= 5
    obs = torch.cat([counts[big].double(), counts[~big].double().sum().view(1)])
    exp = torch.cat([expected[big], expected[~big].sum().view(1)])
    keep = exp > 0
    obs, exp = obs[keep], exp[keep]
    stat = float(((obs - exp) ** 2 / exp).sum())
    return _chi2_sf(stat, int(keep.sum()) - 1)


def _homogeneity(a: torch.Tensor, b: torch.Tensor) -> float:
    """p-value of the chi-square test that two count vectors come from one distribution."""
    table = torch.stack([a, b]).double()
    table = table[:, table.sum(0) >= 10]  # sparse columns dropped (expected counts too small)
    total = table.sum()
    expected = table.sum(1, keepdim=True) * table.sum(0, keepdim=True) / total
    stat = float(((table - expected) ** 2 / expected).sum())
    return _chi2_sf(stat, table.shape[1] - 1)


@pytest.mark.dist
def test_tp2_sampling_matches_the_model_distribution(decoded):
    res = decoded["results"]
    logits = res["tp1"]["llama31"]["stat_logits"]
    probs = logits.double().softmax(-1)
    assert probs.max() < 0.5 and (probs * STAT_ROWS >= 5).sum() >= 15  # a spread distribution: a real test
    kth = logits.topk(STAT_TOP_K).values[-1]
    probs_top_k = logits.masked_fill(logits < kth, float("-inf")).double().softmax(-1)
    for layout in ("tp1", "tp2"):
        plain, top_k = res[layout]["llama31"]["stat_plain"], res[layout]["llama31"]["stat_top_k"]
        assert int(plain.sum()) == int(top_k.sum()) == STAT_ROWS
        assert _goodness_of_fit(plain, probs) > P_MIN, layout
        assert int(top_k[logits < kth].sum()) == 0  # never outside the top-k
        assert _goodness_of_fit(top_k, probs_top_k) > P_MIN, layout
        # the recorded behaviour log-prob is the untempered, unfiltered one
        first = res[layout]["llama31"]["stat_plain_tokens"]
        lp = res[layout]["llama31"]["stat_plain_logp"]
        assert torch.allclose(lp, logits.log_softmax(-1)[first], atol=1e-5)
        # the test has power: the same counts are rejected against a wrong distribution
        assert _goodness_of_fit(plain, (logits / 1.5).double().softmax(-1)) < 1e-6, layout
    assert _homogeneity(res["tp1"]["llama31"]["stat_plain"], res["tp2"]["llama31"]["stat_plain"]) > P_MIN
    assert _homogeneity(res["tp1"]["llama31"]["stat_top_k"], res["tp2"]["llama31"]["stat_top_k"]) > P_MIN
    assert not torch.equal(res["tp1"]["llama31"]["stat_plain"], res["tp2"]["llama31"]["stat_plain"])  # seeds differ


def test_chi_square_helpers_against_known_values():
    # chi-square(2) survival is exp(-x/2); chi-square(1) at 3.841 is 0.05
    assert math.isclose(_chi2_sf(3.0, 2), math.exp(-1.5), rel_tol=1e-9)
    assert math.isclose(_chi2_sf(3.841458820694124, 1), 0.05, rel_tol=1e-6)
    g = torch.Generator().manual_seed(0)
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    counts = torch.bincount(torch.multinomial(probs, 5000, replacement=True, generator=g), minlength=4)
    assert _goodness_of_fit(counts, probs) > P_MIN
    assert _goodness_of_fit(counts, torch.tensor([0.45, 0.35, 0.15, 0.05])) < 1e-6
