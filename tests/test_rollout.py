"""The batched sampler (:mod:`megatron_qrm.rl.rollout`).

* KV cache == full recomputation: for the same seed, the sampled tokens, masks, lengths and stop flags are
  identical and the behaviour log-probs agree to 1e-5, greedy and sampled (temperature, top-k, top-p,
  both, extra stop ids, a context that cuts responses), at TP=1 (DP=2), TP=2 and PP=2 under torchrun
  (ONE 2-process launch runs every layout and case, see ``tests/workers/rl_worker.py``). The three layouts
  load the same weights and must sample the same tokens too; the sampled tokens respect top-k / top-p
  (their rank and nucleus mass under teacher forcing) and the recorded log-probs are the untempered ones.
* Unit tests, no process group: :func:`filter_logits` against a hand-written loop, and the sampling loop's
  stop handling on a scripted model (EOS ends a row, extra stop ids, max_new_tokens, the --seq-length cut,
  prompts of different lengths: all prefilled in one call, generation starts at each row's own end, rows do
  not influence each other, finished rows are compacted out of the batch; padded vocabulary columns are
  never sampled; a prompt without room -> ValueError). The scripted model stands in for the KV-cache decoder
  (``kv``: a :class:`ScriptedDecoder` with the decoder's prefill/step/select interface) and is run by the
  real full-recompute decoder (``full``). The real KV-cache decoder is checked against Hugging Face and
  full recomputation in tests/test_attention.py and below.
"""

from __future__ import annotations

import math
import os
import sys
import types

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from launch import torchrun  # noqa: E402

from megatron_qrm.rl import rollout  # noqa: E402
from megatron_qrm.rl.rollout import SamplingConfig, filter_logits, generate  # noqa: E402

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "workers", "rl_worker.py")


# ----------------------------------------------------------------------------------------------------
# filter_logits against a hand loop
# ----------------------------------------------------------------------------------------------------


def _hand_filter(row: list[float], top_k: int, top_p: float) -> list[bool]:
    """Which entries of one row survive: the top-k (ties at the k-th value kept), then, over what is left,
    the smallest prefix of the probability-sorted tokens whose mass reaches top_p (the first always stays)."""
    n = len(row)
    keep = [True] * n
    if top_k and top_k < n:
        kth = sorted(row, reverse=True)[top_k - 1]
        keep = [x >= kth for x in row]
    if top_p < 1.0:
        kept = [i for i in range(n) if keep[i]]
        z = sum(math.exp(row[i]) for i in kept)
        order = sorted(kept, key=lambda i: -row[i])
        mass = 0.0
        for i in order:
            if mass >= top_p:
                keep[i] = False
            mass += math.exp(row[i]) / z
    return keep


@pytest.mark.parametrize("top_k,top_p", [(0, 1.0), (1, 1.0), (3, 1.0), (50, 1.0), (0, 0.5), (0, 0.9), (0, 0.999),
                                         (4, 0.7), (10, 0.3), (0, 1e-6)])
def test_filter_logits_matches_hand_loop(top_k, top_p):
    g = torch.Generator().manual_seed(top_k * 100 + int(top_p * 1000))
    logits = torch.randn(6, 17, generator=g, dtype=torch.float64) * 2
    out = filter_logits(logits, top_k, top_p)
    for b in range(logits.shape[0]):
        want = _hand_filter(logits[b].tolist(), top_k, top_p)
        got = torch.isfinite(out[b]).tolist()
        assert got == want, (b, got, want)
        kept = out[b][torch.isfinite(out[b])]
        assert torch.equal(kept, logits[b][torch.tensor(want)])  # survivors unchanged
        assert any(want)  # never empty


def test_filter_logits_ties_and_flat_rows():
    logits = torch.tensor([[1.0, 3.0, 2.0, 3.0, 0.5], [0.0] * 5])
    # top-k keeps every entry tied at the k-th value
    assert torch.isfinite(filter_logits(logits[:1], 1, 1.0)).tolist() == [[False, True, False, True, False]]
    assert torch.isfinite(filter_logits(logits[:1], 3, 1.0)).tolist() == [[False, True, True, True, False]]
    # a flat row under top-p keeps the smallest number of (equal) tokens whose mass reaches top_p
    for top_p, n in ((0.5, 3), (0.2, 1), (0.21, 2), (0.9, 5)):
        assert int(torch.isfinite(filter_logits(logits[1:], 0, top_p)).sum()) == n, top_p


def test_filter_logits_nucleus_mass():
    # probabilities 0.5, 0.3, 0.15, 0.05: top_p 0.8 keeps exactly 0.5 + 0.3; 0.81 adds the 0.15 one
    probs = torch.tensor([[0.15, 0.5, 0.05, 0.3]])
    logits = probs.log()
    assert torch.isfinite(filter_logits(logits, 0, 0.8)).tolist() == [[False, True, False, True]]
    assert torch.isfinite(filter_logits(logits, 0, 0.81)).tolist() == [[True, True, False, True]]
    assert torch.isfinite(filter_logits(logits, 2, 1.0)).tolist() == [[False, True, False, True]]
    assert torch.isfinite(filter_logits(logits, 0, 0.4)).tolist() == [[False, True, False, False]]


def test_sample_tokens_respects_filters():
    logits = torch.randn(4000, 12, generator=torch.Generator().manual_seed(0))
    for cfg in (SamplingConfig(top_k=3), SamplingConfig(top_p=0.6), SamplingConfig(top_k=5, top_p=0.5, temperature=0.7)):
        allowed = torch.isfinite(filter_logits(logits / cfg.temperature, cfg.top_k, cfg.top_p))
        s = rollout.sample_tokens(logits, cfg, torch.Generator().manual_seed(1))
        assert allowed.gather(-1, s[:, None]).all()
    assert torch.equal(rollout.sample_tokens(logits, SamplingConfig(temperature=0.0), torch.Generator()),
                       logits.argmax(-1))


# ----------------------------------------------------------------------------------------------------
# stop handling on a scripted model (no process group)
# ----------------------------------------------------------------------------------------------------

V = 40  # the tokenizer's vocabulary
V_PADDED = 48  # the model's (padded) output columns: the extra ones must never be sampled
EOS, PAD = 3, 0
PEAK = 10.0


def successor(tok: int) -> int:
    """The scripted model's favourite next token: tok + 1, EOS after 20, 4 after the last id."""
    if tok == 20:
        return EOS
    return tok + 1 if tok + 1 < V else 4


class ScriptedModel(torch.nn.Module):
    """Logits at a position depend on that position's token only (so the KV-cache path, which feeds one
    token per step, sees what full recomputation sees): PEAK at successor(token), 0 elsewhere, and a huge
    logit in the padded vocabulary columns."""

    def __init__(self):
        super().__init__()
        self.config = types.SimpleNamespace(hidden_size=8, params_dtype=torch.float32)
        table = torch.zeros(V_PADDED, V_PADDED)
        for t in range(V):
            table[t, successor(t)] = PEAK
        table[:, V:] = 100.0
        self.register_buffer("table", table)
        self.calls: list[tuple[int, int]] = []

    def forward(self, tokens, positions, attention_mask=None, inference_context=None, runtime_gather_output=None):
        assert tokens.shape == positions.shape
        self.calls.append(tuple(tokens.shape))
        return self.table[tokens]


class ScriptedDecoder:
    """The KV-cache decoder's interface over :class:`ScriptedModel`: ``prefill`` (left-padded prompts, the last
    column is each row's last prompt token), ``step`` (one token per row), ``select`` (compaction). Records
    ``("prefill", B, P)`` / ``("step", B)`` / ``("select", B)`` in ``model.calls``."""

    def __init__(self, model, batch_size, max_columns, max_positions, device):
        self.model = model
        model.calls.clear()

    def prefill(self, tokens, prompt_lens):
        self.model.calls.append(("prefill", *tokens.shape))
        return self.model.table[tokens[:, -1]]

    def step(self, tokens):
        self.model.calls.append(("step", tokens.shape[0]))
        return self.model.table[tokens]

    def select(self, rows):
        self.model.calls.append(("select", rows.shape[0]))


@pytest.fixture
def no_groups(monkeypatch):
    """One process, no model parallelism: the sampler's parallel-state queries answered without groups, and
    the KV-cache decoder replaced by :class:`ScriptedDecoder`."""
    from megatron_qrm.rl import vocab_sampling

    fake = types.SimpleNamespace(
        get_pipeline_model_parallel_group=lambda: None, get_pipeline_model_parallel_world_size=lambda: 1,
        is_pipeline_first_stage=lambda: True, is_pipeline_last_stage=lambda: True,
        get_tensor_model_parallel_world_size=lambda: 1, get_tensor_model_parallel_rank=lambda: 0)
    monkeypatch.setattr(rollout, "ps", fake)
    monkeypatch.setattr(vocab_sampling, "ps", fake)
    monkeypatch.setattr(rollout, "KVCacheDecoder", ScriptedDecoder)


def _gen(prompts, kv: bool, max_length: int = 64, **kw):
    model = ScriptedModel()
    cfg = SamplingConfig(use_kv_cache=kv, **{"temperature": 0.0, **kw})
    return generate(model, prompts, cfg, eos_id=EOS, pad_id=PAD, vocab_size=V, max_length=max_length, seed=0), model


LOGP_PEAK = PEAK - math.log(math.exp(PEAK) + V - 1)  # log-prob of the favourite among V (padding dropped)


@pytest.mark.parametrize("kv", [True, False], ids=["kv", "full"])
def test_eos_ends_a_row_and_max_new_tokens_ends_the_others(no_groups, kv):
    # row 0 reaches 20 -> EOS after 6 tokens; row 1 (30, 31, ...) never does; row 2 emits EOS at once
    prompts = [[2, 14, 15], [2, 30], [2, 7, 20]]
    r, _ = _gen(prompts, kv, max_new_tokens=8)
    assert r.response_ids(0) == [16, 17, 18, 19, 20, EOS]
    assert r.response_ids(1) == [31, 32, 33, 34, 35, 36, 37, 38]
    assert r.response_ids(2) == [EOS]
    assert r.response_lens.tolist() == [6, 8, 1]
    assert r.finished.tolist() == [True, False, True]
    for i, p in enumerate(prompts):
        n, m = len(p), int(r.response_lens[i])
        assert r.tokens[i, :n].tolist() == p
        assert r.action_mask[i].tolist() == [0.0] * n + [1.0] * m + [0.0] * (r.tokens.shape[1] - n - m)
        assert (r.tokens[i, n + m:] == PAD).all()  # nothing after the stop
        assert torch.allclose(r.logprobs[i, n:n + m], torch.full((m,), LOGP_PEAK), atol=1e-5)
        assert (r.logprobs[i][r.action_mask[i] == 0] == 0).all()
    assert r.tokens.shape[1] == 3 + 8  # the longest prompt + max_new_tokens


@pytest.mark.parametrize("kv", [True, False], ids=["kv", "full"])
def test_extra_stop_ids(no_groups, kv):
    r, _ = _gen([[2, 10], [2, 30]], kv, max_new_tokens=10, stop_token_ids=(13, 35))
    assert r.response_ids(0) == [11, 12, 13] and r.response_ids(1) == [31, 32, 33, 34, 35]
    assert r.finished.tolist() == [True, True]


@pytest.mark.parametrize("kv", [True, False], ids=["kv", "full"])
def test_prompts_of_different_lengths(no_groups, kv):
    """Every prompt is prefilled in one call whatever its length (the sample after a row's own last prompt
    token, successor(last), is its first response token), and each row's generation starts right after its
    own prompt."""
    prompts = [[2, 30], [2, 9, 33, 5, 26, 11, 8], [2, 24, 6, 25], [5]]
    r, model = _gen(prompts, kv, max_new_tokens=5)
    for i, p in enumerate(prompts):
        n = len(p)
        assert r.tokens[i, :n].tolist() == p, "prompt tokens must be forced, not sampled"
        assert r.prompt_lens[i] == n and r.response_lens[i] == 5
        want, t = [], p[-1]
        for _ in range(5):
            t = successor(t)
            want.append(t)
        assert r.response_ids(i) == want
        assert r.action_mask[i, :n].sum() == 0 and r.action_mask[i, n:n + 5].sum() == 5
        # each row alone gives the same response: rows do not influence each other
        alone, _ = _gen([p], kv, max_new_tokens=5)
        assert alone.response_ids(0) == want
    assert r.tokens.shape[1] == 7 + 5
    if kv:  # one prefill of all prompts (left-padded to 7), then one token per row per step: 5 tokens
        assert model.calls == [("prefill", 4, 7)] + [("step", 4)] * 4
    else:  # the whole (right-padded) prefix is recomputed every step
        assert [c[1] for c in model.calls] == list(range(7, 7 + 5))


@pytest.mark.parametrize("kv", [True, False], ids=["kv", "full"])
def test_finished_rows_are_compacted_out(no_groups, kv):
    """Rows 0-2 stop at once (EOS after 20), row 3 runs 6 tokens: after the first token the batch holds 1
    row (compacted once at least half of it is done), and every row's result is what it gets alone."""
    prompts = [[2, 20], [7, 20], [20], [2, 30]]
    r, model = _gen(prompts, kv, max_new_tokens=6)
    assert [r.response_ids(i) for i in range(3)] == [[EOS]] * 3 and r.response_ids(3) == [31, 32, 33, 34, 35, 36]
    assert r.finished.tolist() == [True, True, True, False]
    if kv:
        assert model.calls == [("prefill", 4, 2), ("select", 1)] + [("step", 1)] * 5
    else:
        assert len(model.calls) == 6 and all(c[0] == 1 for c in model.calls[1:])  # [rows, width] per forward
    for i, p in enumerate(prompts):
        alone, _ = _gen([p], kv, max_new_tokens=6)
        assert alone.response_ids(0) == r.response_ids(i)
        assert torch.equal(alone.logprobs[0, :len(p) + 6], r.logprobs[i, :len(p) + 6])


@pytest.mark.parametrize("kv", [True, False], ids=["kv", "full"])
def test_context_length_cuts_responses(no_groups, kv):
    # --seq-length 8: the 6-token prompt has room for 2 tokens, the 2-token one for 6 (< max_new_tokens 10)
    r, _ = _gen([[2, 21, 22, 23, 24, 25], [2, 30]], kv, max_length=8, max_new_tokens=10)
    assert r.tokens.shape[1] == 8
    assert r.response_ids(0) == [26, 27] and r.response_ids(1) == [31, 32, 33, 34, 35, 36]
    assert r.finished.tolist() == [False, False]


@pytest.mark.parametrize("kv", [True, False], ids=["kv", "full"])
def test_all_rows_stop_early_ends_generation(no_groups, kv):
    r, model = _gen([[2, 18], [2, 19]], kv, max_new_tokens=50)
    assert r.response_ids(0) == [19, 20, EOS] and r.response_ids(1) == [20, EOS]
    assert len(model.calls) <= 4  # stopped after the last EOS instead of running 50 steps


def test_sampling_never_picks_padded_vocabulary(no_groups):
    r, _ = _gen([[2, 5]] * 64, True, max_new_tokens=6, temperature=1.0)
    gen = r.tokens[r.action_mask > 0]
    assert gen.max() < V


def test_prompt_without_room_is_an_error(no_groups):
    with pytest.raises(ValueError, match=r"1 prompt\(s\) \(e.g. #1, 8 tokens\).*--seq-length 8"):
        _gen([[2, 5], [2] * 8], True, max_length=8)
    r, _ = _gen([[2] * 7], True, max_length=8, max_new_tokens=4)  # 7 tokens: room for exactly one
    assert r.response_lens.tolist() == [1]


# ----------------------------------------------------------------------------------------------------
# KV cache == full recomputation on a real GPTModel, TP=1 / TP=2 / PP=2 (one torchrun launch)
# ----------------------------------------------------------------------------------------------------

sys.path.insert(0, os.path.dirname(WORKER))
from rl_worker import LAYOUTS, ROLLOUT_CASES, ROLLOUT_VOCAB, rollout_prompts  # noqa: E402


@pytest.fixture(scope="module")
def sampled(tmp_path_factory):
    d = tmp_path_factory.mktemp("rollout")
    torchrun([WORKER, "rollout", "--dir", str(d), "--layouts", ",".join(LAYOUTS)], nproc=2)
    return torch.load(d / "rollout.pt", weights_only=False)


EXACT = ("tokens", "prompt_lens", "response_lens", "action_mask", "finished")


@pytest.mark.dist
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_kv_cache_matches_full_recompute(sampled, layout):
    for case in ROLLOUT_CASES:
        kv, full = sampled[layout][case]["kv"], sampled[layout][case]["full"]
        for k in EXACT:
            assert torch.equal(kv[k], full[k]), f"{layout}/{case}: {k} differs between KV cache and recompute"
        assert torch.allclose(kv["logprobs"], full["logprobs"], atol=1e-5, rtol=0), f"{layout}/{case}"
        # ... and every layout samples what TP=1 samples (the same weights, the same seed)
        ref = sampled["tp1"][case]["kv"]
        for k in EXACT:
            assert torch.equal(kv[k], ref[k]), f"{layout}/{case}: {k} differs from TP=1"
        assert torch.allclose(kv["logprobs"], ref["logprobs"], atol=1e-5, rtol=0), f"{layout}/{case}"


@pytest.mark.dist
def test_rollouts_are_well_formed_and_filters_hold(sampled):
    prompts = rollout_prompts()
    res = sampled["tp1"]
    tf = res["teacher_forced"]
    for case, (kw, max_length) in ROLLOUT_CASES.items():
        r = res[case]["kv"]
        for i, p in enumerate(prompts):
            assert r["tokens"][i, :len(p)].tolist() == p
            n, m = len(p), int(r["response_lens"][i])
            assert r["action_mask"][i, n:n + m].sum() == m == r["action_mask"][i].sum()
            assert m <= min(kw["max_new_tokens"], max_length - n)
            stops = {3, *kw.get("stop_token_ids", ())}
            ends_with_stop = int(r["tokens"][i, n + m - 1]) in stops
            assert bool(r["finished"][i]) == ends_with_stop
            assert m == min(kw["max_new_tokens"], max_length - n) or ends_with_stop
        gen = r["tokens"][r["action_mask"] > 0]
        assert gen.max() < ROLLOUT_VOCAB  # never a padded-vocabulary column
        # the recorded log-prob is log pi(token) under the UNtempered, unfiltered policy (pi_old itself)
        assert torch.allclose(tf[case]["recorded_logp"], tf[case]["logp"], atol=1e-5, rtol=0), case
        rank, mass = tf[case]["rank"], tf[case]["mass_before"]
        if kw.get("temperature", 1.0) == 0:
            assert (rank == 0).all(), "greedy must pick the argmax"
            assert tf[case]["gap"].min() > 1e-4  # far from ties: KV/full float noise (~1e-6) cannot flip it
        if kw.get("top_k"):
            assert rank.max() < kw["top_k"], case
        if kw.get("top_p", 1.0) < 1.0:
            assert mass.max() < kw["top_p"], case
    # the filters do bite: unfiltered sampling goes far down the ranks and outside a 0.9 nucleus
    assert tf["sampled"]["rank"].max() >= 20 and tf["sampled"]["mass_before"].max() > 0.9
    # stop ids end rows at different steps; the context cut ends the long prompts' rows early
    stops = res["top_k_top_p_stops"]["kv"]
    assert stops["finished"].sum() >= 3 and len(set(stops["response_lens"].tolist())) >= 3
    cut = res["context_cut"]["kv"]
    assert any(int(cut["prompt_lens"][i]) + int(cut["response_lens"][i]) == 20 and not cut["finished"][i]
               for i in range(len(prompts)))
    # sampled cases are not greedy in disguise
    assert not torch.equal(res["sampled"]["kv"]["tokens"], res["greedy"]["kv"]["tokens"])
    assert not torch.equal(res["sampled"]["kv"]["tokens"], res["top_k"]["kv"]["tokens"])
