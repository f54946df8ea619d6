"""tools/convert_hf.py: HF (Llama / Qwen2) <-> Megatron conversion on tiny random models (CPU, fp32).

* logit parity: HF vs the imported Megatron model (``convert_hf.py verify``: the trainers' build_model +
  load_checkpoint + megatron-core schedule) <= 1e-4 at (TP, PP) = (1,1), (2,1), (1,2), for Llama with GQA,
  Llama-3.1 RoPE scaling, Llama-3.2 tied embeddings, Qwen2 with q/k/v biases and tied embeddings, a token
  classification reward model, vocabularies not divisible by 128*TP (padded differently at TP 1 and 2, also
  loaded at another TP than imported for), a bf16 import loaded into an fp32 model;
* round trip: HF -> Megatron (TP=2, PP=2 chunks) -> HF is bitwise identical for every tensor;
* reward export: a Q-RM trained 3 steps with ``qrm train-rm`` from an import, exported, loaded with
  ``AutoModelForTokenClassification``: same token scores as Megatron (verify, and ``qrm eval-rm``'s dump);
  a LoRA reward model exports with its adapters merged;
* every bad input fails with a clear error before anything is written.

All Megatron-side checks run in ONE torchrun launch (tests/workers/convert_worker.py).
"""

from __future__ import annotations

import glob
import json
import os
import re
import sys

import pytest
import torch

from launch import REPO, _run, qrm, torchrun

sys.path.insert(0, REPO)

from megatron_qrm.conversion import ConversionError, export_hf, import_hf  # noqa: E402
from megatron_qrm.conversion.cli import main as convert_main  # noqa: E402
from megatron_qrm.conversion.dcp_io import DistCheckpointReader  # noqa: E402

WORKER = os.path.join(REPO, "tests", "workers", "convert_worker.py")
TOL = 1e-4
LAYOUTS = {"tp1pp1": (1, 1), "tp2pp1": (2, 1), "tp1pp2": (1, 2)}
BASE = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=256)
LLAMA3_SCALING = {"rope_type": "llama3", "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 8192}

# name -> (transformers class, config class, config overrides)
HF_MODELS = {
    "llama_gqa": ("LlamaForCausalLM", "LlamaConfig", dict(vocab_size=250)),
    "llama31": ("LlamaForCausalLM", "LlamaConfig",
                dict(vocab_size=300, rope_theta=500000.0, rope_scaling=dict(LLAMA3_SCALING, factor=8.0))),
    "llama32": ("LlamaForCausalLM", "LlamaConfig",
                dict(vocab_size=250, rope_theta=500000.0, tie_word_embeddings=True,
                     rope_scaling=dict(LLAMA3_SCALING, factor=32.0))),
    "qwen2": ("Qwen2ForCausalLM", "Qwen2Config", dict(vocab_size=250, rope_theta=1e6, tie_word_embeddings=True)),
    "llama_tokcls": ("LlamaForTokenClassification", "LlamaConfig", dict(vocab_size=250, num_labels=1)),
    "qwen2_seqcls": ("Qwen2ForSequenceClassification", "Qwen2Config", dict(vocab_size=250, num_labels=1)),
}
# import name -> (HF model, role, declared TP, PP, extra)
IMPORTS = {
    "llama_gqa": ("llama_gqa", "policy", 2, 2),
    "llama31": ("llama31", "policy", 2, 1),      # vocab 300: padded 512 at TP=2 (384 at TP=1)
    "llama31_tp1": ("llama31", "policy", 1, 1),  # padded 384, loaded at TP=2 (512) too
    "llama32": ("llama32", "policy", 1, 2),
    "qwen2": ("qwen2", "policy", 2, 1),
    "llama_tokcls": ("llama_tokcls", "reward", 2, 1),
    "qwen2_seqcls": ("qwen2_seqcls", "reward", 1, 1),
    "gqa_reward": ("llama_gqa", "reward", 1, 1),   # fresh token head
    "llama_bf16": ("llama_bf16", "policy", 1, 1),  # bf16 weights -> bf16 checkpoint, loaded into fp32
}
PARITY = [(imp, lay) for imp in ("llama_gqa", "llama31", "llama32", "qwen2", "llama_tokcls") for lay in LAYOUTS]
PARITY += [("llama31_tp1", "tp2pp1"), ("gqa_reward", "tp1pp1"), ("gqa_reward", "tp1pp2"),
           ("qwen2_seqcls", "tp1pp1"), ("llama_bf16", "tp1pp1")]


def _randomize(model, seed: int) -> None:
    """Weights ~N(0, 0.1), norms 1 + N(0, 0.1), biases N(0, 0.1) (score bias 0): every tensor matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g) * 0.1
            if name.endswith("norm.weight"):
                p.copy_(1 + noise)
            elif name == "score.bias":
                p.zero_()
            else:
                p.copy_(noise)


def _make_hf(out: str, cls_name: str, cfg_name: str, overrides: dict, seed: int, dtype=torch.float32,
             tokenizer_dir: str | None = None) -> str:
    import transformers

    cfg = getattr(transformers, cfg_name)(**{**BASE, **overrides})
    model = getattr(transformers, cls_name)(cfg)
    _randomize(model, seed)
    model.to(dtype).save_pretrained(out, max_shard_size="50KB")
    if tokenizer_dir:
        from transformers import AutoTokenizer

        AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(out)
    return out


def _tensors(directory: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(glob.glob(os.path.join(directory, "*.safetensors"))):
        out.update(load_file(f))
    return out


@pytest.fixture(scope="module")
def hf_models(tmp_path_factory):
    from helpers_tokenizers import make_hf_tokenizer_dir
    from transformers import AutoTokenizer

    root = tmp_path_factory.mktemp("hf")
    tok = make_hf_tokenizer_dir(root / "tok", with_chat_template=False)
    paths = {name: _make_hf(str(root / name), *spec, seed=k, tokenizer_dir=tok)
             for k, (name, spec) in enumerate(HF_MODELS.items())}
    paths["llama_bf16"] = _make_hf(str(root / "llama_bf16"), *HF_MODELS["llama_gqa"], seed=0, dtype=torch.bfloat16,
                                   tokenizer_dir=tok)
    # the reward model trained by `qrm train-rm` (its vocabulary covers the tokenizer: 3 extra rows)
    vocab = len(AutoTokenizer.from_pretrained(tok)) + 3
    paths["rm_base"] = _make_hf(str(root / "rm_base"), "LlamaForCausalLM", "LlamaConfig",
                                dict(vocab_size=vocab, num_hidden_layers=2), seed=42, tokenizer_dir=tok)
    # negative control for RoPE scaling: llama31 without it
    noscale = root / "llama31_noscale"
    noscale.mkdir()
    for f in os.listdir(paths["llama31"]):
        os.symlink(os.path.join(paths["llama31"], f), noscale / f)
    cfg = json.load(open(os.path.join(paths["llama31"], "config.json")))
    cfg.pop("rope_parameters", None)
    cfg.update(rope_scaling=None, rope_theta=500000.0)
    os.unlink(noscale / "config.json")
    json.dump(cfg, open(noscale / "config.json", "w"))
    paths["llama31_noscale"] = str(noscale)
    paths["tokenizer"] = tok
    return paths


@pytest.fixture(scope="module")
def env(hf_models, tmp_path_factory):
    """Imports (in this process), a 3-step `qrm train-rm` from an import, its export, then every
    Megatron-side check in one torchrun launch."""
    from megatron_qrm.data.synthetic import sorting_pairs, write_jsonl

    root = tmp_path_factory.mktemp("convert")
    imports = {}
    for name, (hf, role, tp, pp) in IMPORTS.items():
        imports[name] = import_hf(hf_models[hf], str(root / f"mg_{name}"), tp=tp, pp=pp, role=role,
                                  show_progress=False)
    imports["rm_base"] = import_hf(hf_models["rm_base"], str(root / "mg_rm_base"), role="reward", show_progress=False)

    data = write_jsonl(str(root / "pairs.jsonl"), sorting_pairs(8, seed=0))
    trained = str(root / "rm_trained")
    qrm(["train-rm", "--train-data", data, "--pretrained-checkpoint", imports["rm_base"], "--train-iters", "3",
         "--micro-batch-size", "2", "--global-batch-size", "2", "--lr", "1e-2", "--seq-length", "64",
         "--save", trained, "--no-tensorboard"])
    rm_hf = export_hf(trained, str(root / "rm_trained_hf"), max_shard_size="50KB", show_progress=False)

    jobs = {"verify": [], "lora": {"import": imports["rm_base"], "out": str(root / "rm_lora"),
                                   "hf_out": str(root / "rm_lora_hf")},
            "eval_rm": {"load": trained, "data": data, "dump": str(root / "dump.jsonl")}}
    for imp, lay in PARITY:
        tp, pp = LAYOUTS[lay]
        hf = hf_models[IMPORTS[imp][0]]
        jobs["verify"].append({"name": f"{imp}/{lay}", "hf": hf, "megatron": imports[imp], "tp": tp, "pp": pp})
    for lay, (tp, pp) in LAYOUTS.items():
        jobs["verify"].append({"name": f"rm_trained/{lay}", "hf": rm_hf, "megatron": trained, "tp": tp, "pp": pp})
    jobs["verify"].append({"name": "llama31_noscale/tp1pp1", "hf": hf_models["llama31_noscale"],
                           "megatron": imports["llama31"], "tp": 1, "pp": 1, "seq": 128})
    jobs["verify"].append({"name": "llama31/tp1pp1/seq128", "hf": hf_models["llama31"],
                           "megatron": imports["llama31"], "tp": 1, "pp": 1, "seq": 128})
    with open(root / "jobs.json", "w") as f:
        json.dump(jobs, f)
    torchrun([WORKER, "--jobs", str(root / "jobs.json"), "--out", str(root / "results.json")], nproc=2)
    with open(root / "results.json") as f:
        results = json.load(f)
    return {"root": str(root), "imports": imports, "results": results, "trained": trained, "rm_hf": rm_hf,
            "data": data, "dump": jobs["eval_rm"]["dump"], "hf": hf_models}


# ----------------------------------------------------------------------------------------------------
# parity
# ----------------------------------------------------------------------------------------------------
@pytest.mark.dist
@pytest.mark.parametrize("imp,layout", PARITY, ids=[f"{i}-{lay}" for i, lay in PARITY])
def test_logit_parity(env, imp, layout):
    r = env["results"]["verify"][f"{imp}/{layout}"]
    assert r["compared"] == ("logits" if IMPORTS[imp][1] == "policy" else "token_scores")
    assert (r["tensor_model_parallel_size"], r["pipeline_model_parallel_size"]) == LAYOUTS[layout]
    assert r["max_abs_reference"] > 0.5, "outputs too small for the tolerance to mean anything"
    assert r["max_abs_diff"] <= TOL, r
    if r["compared"] == "logits":
        assert r["shape"][-1] == {"llama31": 300, "llama31_tp1": 300}.get(imp, 250)
        imported_tp = IMPORTS[imp][2]
        if imported_tp == LAYOUTS[layout][0]:  # same padding as imported: the padded columns are the zero rows
            assert r.get("padded_logits_max_abs", 0.0) == 0.0


@pytest.mark.dist
def test_rope_scaling_matters_at_this_length(env):
    """Negative control: the same weights without Llama-3.1 scaling differ far beyond the tolerance, so
    the parity of the scaled model is not an accident of short sequences."""
    res = env["results"]["verify"]
    assert res["llama31/tp1pp1/seq128"]["max_abs_diff"] <= TOL
    assert res["llama31_noscale/tp1pp1"]["max_abs_diff"] > 100 * TOL


# ----------------------------------------------------------------------------------------------------
# round trip
# ----------------------------------------------------------------------------------------------------
@pytest.mark.dist
@pytest.mark.parametrize("imp", ["llama_gqa", "llama31", "llama32", "qwen2", "llama_tokcls", "qwen2_seqcls",
                                 "llama_bf16"])
def test_round_trip_is_bitwise(env, imp, tmp_path):
    out = export_hf(env["imports"][imp], str(tmp_path / "hf"), max_shard_size="20KB", show_progress=False)
    src, back = _tensors(env["hf"][IMPORTS[imp][0]]), _tensors(out)
    extra = set(back) - set(src)
    assert extra <= {"score.bias"}, extra  # a sequence classifier has no bias; the export writes zeros
    assert set(src) <= set(back)
    for name, t in src.items():
        assert back[name].dtype == t.dtype and back[name].shape == t.shape, name
        assert torch.equal(back[name].view(torch.uint8) if t.dtype == torch.bfloat16 else back[name],
                           t.view(torch.uint8) if t.dtype == torch.bfloat16 else t), name
    cfg = json.load(open(os.path.join(out, "config.json")))
    src_cfg = json.load(open(os.path.join(env["hf"][IMPORTS[imp][0]], "config.json")))
    for key in ("hidden_size", "num_hidden_layers", "num_key_value_heads", "vocab_size", "tie_word_embeddings",
                "rms_norm_eps"):
        assert cfg[key] == src_cfg[key], key
    assert os.path.exists(os.path.join(out, "model.safetensors.index.json"))
    assert os.path.exists(os.path.join(out, "tokenizer.json"))


@pytest.mark.dist
def test_import_layout_and_config(env):
    ckpt = os.path.join(env["imports"]["llama_gqa"], "iter_0000000")
    assert open(os.path.join(env["imports"]["llama_gqa"], "latest")).read() == "iter_0000000"
    # one file per (pp, tp) rank
    assert sorted(glob.glob(os.path.join(ckpt, "__*_0.distcp"))) == [os.path.join(ckpt, f"__{r}_0.distcp")
                                                                     for r in range(4)]
    cfg = json.load(open(os.path.join(ckpt, "qrm_config.json")))
    assert cfg["role"] == "policy" and cfg["tokenizer"] == "tokenizer" and cfg["padded_vocab_size"] == 256
    assert cfg["parallel"] == {"tensor_model_parallel_size": 2, "pipeline_model_parallel_size": 2}
    assert cfg["model"]["num_query_groups"] == 2 and cfg["model"]["family"] == "llama"
    assert os.path.exists(os.path.join(ckpt, "tokenizer", "tokenizer.json"))
    c31 = json.load(open(os.path.join(env["imports"]["llama31"], "iter_0000000", "qrm_config.json")))
    assert c31["model"]["rope_scaling_factor"] == 8.0 and c31["model"]["rotary_base"] == 500000.0
    assert c31["padded_vocab_size"] == 512
    cq = json.load(open(os.path.join(env["imports"]["qwen2"], "iter_0000000", "qrm_config.json")))
    assert cq["model"]["qkv_bias"] and cq["model"]["tie_word_embeddings"] and cq["model"]["norm_epsilon"] == 1e-6
    # padded vocabulary rows are zeros; an embedding row equals HF's
    reader = DistCheckpointReader(os.path.join(env["imports"]["llama31"], "iter_0000000"))
    emb = reader.read("embedding.word_embeddings.weight")
    hf = _tensors(env["hf"]["llama31"])
    assert emb.shape == (512, 64) and torch.equal(emb[:300], hf["model.embed_tokens.weight"])
    assert emb[300:].abs().max() == 0


@pytest.mark.dist
@pytest.mark.parametrize("imp", ["llama_tokcls", "qwen2_seqcls", "gqa_reward"])
def test_reward_head_from_hf_classifier_or_fresh(env, imp):
    head = DistCheckpointReader(os.path.join(env["imports"][imp], "iter_0000000")).read("token_head.weight")
    cfg = json.load(open(os.path.join(env["imports"][imp], "iter_0000000", "qrm_config.json")))
    if imp == "gqa_reward":  # an LM has no score head: fresh, as the trainers' TokenHead(seed=1234)
        gen = torch.Generator().manual_seed(1234)
        expected = (torch.rand(1, 64, generator=gen) * 2 - 1) * 64**-0.5
        assert cfg["hf_source"]["token_head"].startswith("fresh")
    else:
        expected = _tensors(env["hf"][IMPORTS[imp][0]])["score.weight"]
        assert cfg["hf_source"]["token_head"] == "score.weight"
    assert torch.equal(head, expected)


# ----------------------------------------------------------------------------------------------------
# reward export
# ----------------------------------------------------------------------------------------------------
@pytest.mark.dist
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_trained_reward_model_export_matches_megatron(env, layout):
    r = env["results"]["verify"][f"rm_trained/{layout}"]
    assert r["hf_class"] == "LlamaForTokenClassification" and r["compared"] == "token_scores"
    assert r["max_abs_diff"] <= TOL, r


@pytest.mark.dist
def test_exported_reward_model_serves_eval_rm_scores(env):
    """`qrm eval-rm --dump-token-scores` (Megatron) vs plain transformers on the exported model."""
    from transformers import AutoModelForTokenClassification

    from megatron_qrm.data import PreferenceDataConfig, PreferenceDataset, collate_pairs, load_tokenizer

    cfg = json.load(open(os.path.join(env["rm_hf"], "config.json")))
    assert cfg["architectures"] == ["LlamaForTokenClassification"] and len(cfg["id2label"]) == 1
    model = AutoModelForTokenClassification.from_pretrained(env["rm_hf"], dtype=torch.float32).eval()
    # training moved the head away from the fresh one the import wrote
    base = DistCheckpointReader(os.path.join(env["imports"]["rm_base"], "iter_0000000")).read("token_head.weight")
    assert (model.score.weight.detach() - base).abs().max() > 1e-4
    tok = load_tokenizer(env["rm_hf"])
    saved = json.load(open(os.path.join(env["trained"], "iter_0000003", "qrm_config.json")))
    ds = PreferenceDataset(PreferenceDataConfig(path=env["data"], seq_length=saved["seq_length"]), tok)
    rows = [json.loads(line) for line in open(env["dump"])]
    assert len(rows) == 2 * len(ds)
    worst = 0.0
    for row in rows:
        batch = collate_pairs([ds[row["index"]]], tok.pad_id, 1)
        r = 0 if row["side"] == "chosen" else 1
        with torch.no_grad():
            scores = model(input_ids=batch["tokens"][r:r + 1]).logits[0, :, 0]
        hf = scores[batch["response_mask"][r].bool()]
        assert len(hf) == len(row["scores"])
        worst = max(worst, float((hf - torch.tensor(row["scores"])).abs().max()))
    assert worst <= TOL, worst


@pytest.mark.dist
@pytest.mark.parametrize("tp", [1, 2])
def test_lora_reward_model_exports_merged(env, tp):
    r = env["results"]["lora"][f"lora_tp{tp}"]
    assert r["max_abs_diff"] <= TOL, r


# ----------------------------------------------------------------------------------------------------
# bad inputs
# ----------------------------------------------------------------------------------------------------
def _edit_copy(src: str, dst: str, config_edit=None, drop: str | None = None) -> str:
    os.makedirs(dst)
    for f in os.listdir(src):
        if f != drop:
            os.symlink(os.path.join(src, f), os.path.join(dst, f))
    if config_edit:
        cfg = json.load(open(os.path.join(src, "config.json")))
        config_edit(cfg)
        os.unlink(os.path.join(dst, "config.json"))
        json.dump(cfg, open(os.path.join(dst, "config.json"), "w"))
    return dst


def _second_shard(src: str) -> str:
    return sorted(set(json.load(open(os.path.join(src, "model.safetensors.index.json")))["weight_map"].values()))[1]


def _int8_copy(src: str, dst: str) -> str:
    """A copy whose q_proj of layer 0 is stored as int8 (a quantized checkpoint)."""
    from safetensors.torch import load_file, save_file

    _edit_copy(src, dst)
    index = json.load(open(os.path.join(src, "model.safetensors.index.json")))
    fn = index["weight_map"]["model.layers.0.self_attn.q_proj.weight"]
    tensors = load_file(os.path.join(src, fn))
    tensors["model.layers.0.self_attn.q_proj.weight"] = tensors["model.layers.0.self_attn.q_proj.weight"].to(torch.int8)
    os.unlink(os.path.join(dst, fn))
    save_file(tensors, os.path.join(dst, fn), metadata={"format": "pt"})
    return dst


BAD = {
    "unknown_architecture": (lambda s, d: _edit_copy(s, d, lambda c: c.update(architectures=["GPT2LMHeadModel"])),
                             {}, "unsupported HF architecture 'GPT2LMHeadModel'"),
    "heads_not_divisible_by_tp": (None, {"tp": 8}, "does not divide the number of attention heads"),
    "groups_not_divisible_by_tp": (None, {"tp": 4}, "does not divide the number of query groups"),
    "layers_not_divisible_by_pp": (None, {"pp": 3}, "does not divide --num-layers 4"),
    "missing_shard_file": (lambda s, d: _edit_copy(s, d, drop=_second_shard(s)), {}, "are missing: model-00002-of-"),
    "int8_weights": (_int8_copy, {}, "dtype(s) I8 are not supported"),
    "quantized_config": (lambda s, d: _edit_copy(s, d, lambda c: c.update(quantization_config={"quant_method": "awq"})),
                         {}, "quantized checkpoints (awq)"),
    "float16_without_dtype": (None, {"hf": "fp16"}, "weights are float16; pass --dtype"),
    "yarn_rope": (lambda s, d: _edit_copy(s, d, lambda c: (c.pop("rope_parameters", None), c.update(
        rope_scaling={"rope_type": "yarn", "factor": 4.0}))), {}, "rope scaling type 'yarn' is not supported"),
    "llama3_rope_other_constants": (lambda s, d: _edit_copy(s, d, lambda c: (c.pop("rope_parameters", None), c.update(
        rope_scaling=dict(LLAMA3_SCALING, factor=8.0, high_freq_factor=2.0)))), {}, "high_freq_factor=2.0"),
    "policy_from_token_classifier": (None, {"hf": "llama_tokcls"}, "has no LM head; import it with --role reward"),
    "output_not_empty": (None, {"out_file": True}, "is not empty; pass --overwrite"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_fails_before_writing(hf_models, tmp_path, case):
    make, kw, message = BAD[case]
    if kw.get("hf") == "fp16":
        src = _make_hf(str(tmp_path / "fp16"), *HF_MODELS["llama_gqa"], seed=0, dtype=torch.float16)
    else:
        src = hf_models[kw.get("hf", "llama_gqa")]
    if make is not None:
        src = make(src, str(tmp_path / "bad"))
    out = tmp_path / "out" / "ckpt"
    out.parent.mkdir()
    if kw.get("out_file"):
        out.mkdir()
        (out / "keep.txt").write_text("x")
    before = sorted(os.listdir(out.parent))
    with pytest.raises(ConversionError, match=re.escape(message)):
        import_hf(src, str(out), tp=kw.get("tp", 1), pp=kw.get("pp", 1), show_progress=False)
    assert sorted(os.listdir(out.parent)) == before  # no output, no partial directory
    if kw.get("out_file"):
        assert os.listdir(out) == ["keep.txt"]
        import_hf(src, str(out), overwrite=True, show_progress=False)  # --overwrite replaces it
        assert "keep.txt" not in os.listdir(out) and os.path.exists(out / "latest")


def test_failure_while_writing_leaves_nothing(hf_models, tmp_path, monkeypatch):
    """An error (or Ctrl-C) in the middle of writing removes the staging directory; --out never appears."""
    from megatron_qrm.conversion.dcp_io import DistCheckpointWriter

    calls = {"n": 0}
    original = DistCheckpointWriter.write_tensor

    def failing(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return original(self, *args, **kwargs)

    monkeypatch.setattr(DistCheckpointWriter, "write_tensor", failing)
    with pytest.raises(KeyboardInterrupt):
        import_hf(hf_models["llama_gqa"], str(tmp_path / "ckpt"), tp=2, show_progress=False)
    assert os.listdir(tmp_path) == []


def test_dry_run_prints_plan_and_writes_nothing(hf_models, tmp_path, capsys):
    out = tmp_path / "never"
    rc = convert_main(["import", "--hf-path", hf_models["llama_gqa"], "--out", str(out), "-tp", "2", "-pp", "2",
                       "--role", "reward", "--dry-run"])
    assert rc == 0 and not out.exists()
    text = capsys.readouterr().out
    assert "TP=2 PP=2" in text and "vocab 250 -> padded 256" in text and "token head: fresh" in text
    for r, (pp, tp) in enumerate([(0, 0), (0, 1), (1, 0), (1, 1)]):
        assert f"rank {r} (pp {pp}, tp {tp})" in text
    assert "embedding.word_embeddings.weight [128:256, 0:64] of [256, 64] <- model.embed_tokens.weight" in text
    # per query group interleaving: TP rank 1 holds rows 64:128 of the fused qkv (group 1: 2 q heads, k, v)
    assert "decoder.layers.self_attention.linear_qkv.weight [64:128, 0:64] of [128, 64]" in text
    # fc1: gate and up halves, each split across TP
    assert ("decoder.layers.mlp.linear_fc1.weight [48:96, 0:64] of [192, 64] <- model.layers.{i}.mlp.gate_proj.weight"
            in text)
    assert ("decoder.layers.mlp.linear_fc1.weight [144:192, 0:64] of [192, 64] <- model.layers.{i}.mlp.up_proj.weight"
            in text)
    assert "token_head.weight [0:1, 0:64] of [1, 64] <- fresh token head" in text
    assert "ignored HF tensors: lm_head.weight" in text


def test_cli_reports_errors_as_one_line(hf_models, tmp_path):
    shard = _second_shard(hf_models["llama_gqa"])
    bad = _edit_copy(hf_models["llama_gqa"], str(tmp_path / "bad"), drop=shard)
    proc = _run([sys.executable, os.path.join(REPO, "tools", "convert_hf.py"), "import", "--hf-path", bad,
                 "--out", str(tmp_path / "out")], 120, None, False, None)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"convert_hf.py import: error: {bad}: shard file(s) listed in model.safetensors.index.json are missing: "
        f"{shard}"]
    assert not (tmp_path / "out").exists()
