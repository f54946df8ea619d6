"""`qrm demo` and `qrm make-pairs`.

* the arithmetic task's checker: first wrong step of hand-written responses, the generators' flaws;
* credit localisation on hand-made token credits;
* make-pairs: deduplication, correct/incorrect labelling, the GSM8K checker path, labels joined from a file;
* a miniature of the whole pipeline (``--quick`` with tiny sizes) in a fresh process: every stage's outputs,
  the report files (PNG plots that open), finite numbers in report.json, then a rerun with the same --out
  that skips every finished stage.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import time

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from launch import _run  # noqa: E402

from megatron_qrm.demo import task as arith  # noqa: E402

PROMPT = "Compute: 7 + 5 - 3 + 8"  # 7 + 5 = 12, 12 - 3 = 9, 9 + 8 = 17


# ----------------------------------------------------------------------------------------------------
# the task's checker
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("response, correct, first_error", [
    ("7 + 5 = 12\n12 - 3 = 9\n9 + 8 = 17\nAnswer: 17", True, None),
    ("7 + 5 = 12\n\n12 - 3 = 9\n9 + 8 = 17\nAnswer: 17\n", True, None),  # blank lines are not steps
    ("7 + 5 = 13\n13 - 3 = 10\n10 + 8 = 18\nAnswer: 18", False, 0),  # wrong result, the chain goes on from it
    ("7 + 5 = 12\n12 - 3 = 8\n8 + 8 = 16\nAnswer: 16", False, 1),
    ("7 + 5 = 12\n12 - 4 = 8\n8 + 8 = 16\nAnswer: 16", False, 1),  # wrong operand copied
    ("7 + 5 = 12\n12 + 3 = 15\n15 + 8 = 23\nAnswer: 23", False, 1),  # wrong operator
    ("7 + 5 = 12\n12 - 3 = 9\n9 + 8 = 18\nAnswer: 18", False, 2),
    ("7 + 5 = 12\n12 - 3 = 9\n9 + 8 = 17\nAnswer: 18", False, 3),  # only the answer line is wrong
    ("7 + 5 = 12\n12 - 3 = 9\n9 + 8 = 17", False, 3),  # no answer line
    ("7 + 5 = 12", False, 1),  # stops early: the missing step is the first wrong one
    ("7 + 5 = 13\n13 - 3 = 9\n9 + 8 = 17\nAnswer: 17", True, 0),  # right answer, wrong step (outcome label)
    ("7 + 5 = 1 2\n12 - 3 = 9\n9 + 8 = 17\nAnswer: 17", True, 0),  # malformed step
    ("hello", False, 0),
])
def test_check_first_wrong_step(response, correct, first_error):
    c = arith.check(PROMPT, response)
    assert c.correct is correct
    assert c.first_error == first_error
    assert c.n_steps == 4


def test_judge_and_prompt_parsing():
    assert arith.judge("7 + 5 = 12\nAnswer: 17", "17") == (True, True)
    assert arith.judge("Answer: 16", "17") == (False, True)
    assert arith.judge("no answer here", "17") == (False, False)
    p = arith.parse_prompt(PROMPT)
    assert (p.start, p.ops, p.operands, p.answer) == (7, ["+", "-", "+"], [5, 3, 8], 17)
    with pytest.raises(ValueError):
        arith.parse_prompt("Sort ascending: 3 1 2")
    from megatron_qrm.evaluation.tasks import task_judges

    assert task_judges("arith")["exact"]("Answer: 17", "17") == (True, True)


def test_generators_know_their_first_error():
    cfg = arith.TaskConfig()
    rng = random.Random(0)
    for _ in range(300):
        p = arith.random_problem(rng, cfg)
        assert cfg.min_steps <= len(p.ops) <= cfg.max_steps
        assert all(0 <= v <= cfg.max_value for v in p.values())
        good = arith.check(p.prompt, arith.correct_response(p))
        assert good.correct and good.first_error is None
        text, k = arith.flawed_response(p, rng, cfg)
        bad = arith.check(p.prompt, text)
        assert not bad.correct and bad.first_error == k
        assert all(0 <= int(x) <= cfg.max_value for x in text.replace("=", " ").split() if x.lstrip("-").isdigit())
    rows = arith.sft_examples(400, seed=3, cfg=cfg)
    share = sum(r["flawed"] for r in rows) / len(rows)
    assert abs(share - cfg.flaw_rate) < 0.08
    for r in rows:
        c = arith.check(r["instruction"], r["response"])
        assert c.first_error == r["first_error"] and c.correct is (not r["flawed"])
        assert c.correct is arith.judge(r["response"], r["label"])[0]
    test = arith.prompts(50, seed=4, cfg=cfg)
    rl = arith.prompts(50, seed=5, cfg=cfg, exclude={r["instruction"] for r in test})
    assert len({r["instruction"] for r in test + rl}) == 100


# ----------------------------------------------------------------------------------------------------
# credit localisation
# ----------------------------------------------------------------------------------------------------
def test_localization_on_hand_made_credits():
    from megatron_qrm.demo.localization import localize, step_credits, token_steps

    tokens = ["7", " +", " 5", " =", " 12", "\n", "12", " -", " 3", " =", " 8", "\n", "8", " +", " 8", " =",
              " 16", "\n", "Answer", ":", " 16", "</s>"]
    steps = token_steps(tokens)
    assert steps == [0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 3, 3, 3, None]
    scores = [1.0] * len(tokens)
    scores[10] = -5.0  # the wrong result " 8" of step 1
    scores[21] = -100.0  # EOS belongs to no step
    rec = localize(PROMPT, tokens, scores)
    assert rec["first_error"] == 1 and rec["steps"] == 3  # the answer line is not a step
    assert rec["argmin_mean"] == 1 and rec["argmin_min"] == 1 and rec["hit_mean"] and rec["hit_min"]
    assert step_credits(tokens, scores, "min") == [1.0, -5.0, 1.0, 1.0]
    assert rec["argmin_result"] == 1 and rec["hit_result"] and rec["first_low"] == 1 and rec["hit_first_low"]
    # the result rule reads only the number after "=": a low credit on a copied operand or operator (the
    # copy of the previous result, "12", or the prompt's " -") does not make its step the lowest
    scores3 = [1.0] * len(tokens)
    scores3[6], scores3[7] = -9.0, -9.0  # step 1's copied "12" and " -"
    scores3[16] = -2.0  # step 2's result " 16"
    rec3 = localize(PROMPT, tokens, scores3)
    assert step_credits(tokens, scores3, "result") == [1.0, 1.0, -2.0, 1.0]
    assert rec3["argmin_result"] == 2 and rec3["argmin_min"] == 1 and not rec3["hit_result"]
    assert step_credits(tokens, scores3, "mean")[1] == (1.0 * 4 - 18.0) / 6
    # a piece that merges "=" with the result carries the result; a line without "=" falls back to its min
    assert step_credits(["7", " +", " 5", " = 12", "\n", "oops", "\n"], [0.0, -1.0, 0.0, -3.0, 0.0, -4.0, 2.0],
                        "result") == [-3.0, -4.0]
    # a low credit on the newline that ends the wrong step counts for that step
    scores2 = [1.0] * len(tokens)
    scores2[11] = -5.0
    assert localize(PROMPT, tokens, scores2)["argmin_min"] == 1
    # an error only in the answer line has no step to point at
    ok = ["7", " +", " 5", " =", " 12", "\n", "12", " -", " 3", " =", " 9", "\n", "9", " +", " 8", " =", " 17",
          "\n", "Answer", ":", " 17"]
    assert localize(PROMPT, ok[:-1] + [" 18"], [0.0] * len(ok)) is None
    # a correct response is not localised
    assert localize(PROMPT, ok, [0.0] * len(ok)) is None


# ----------------------------------------------------------------------------------------------------
# make-pairs
# ----------------------------------------------------------------------------------------------------
def _make_pairs_cli(argv: list[str]) -> int:
    from megatron_qrm.demo.cli import add_make_pairs_parser

    parser = argparse.ArgumentParser(prog="qrm")
    add_make_pairs_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["make-pairs", *argv])
    return args.func(args)


def _write(path, rows):
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return str(path)


def _read(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def test_make_pairs_arith_dedup_and_labels(tmp_path, capsys):
    right = "7 + 5 = 12\n12 - 3 = 9\n9 + 8 = 17\nAnswer: 17"
    wrong1 = "7 + 5 = 12\n12 - 3 = 8\n8 + 8 = 16\nAnswer: 16"
    wrong2 = "7 + 5 = 13\n13 - 3 = 10\n10 + 8 = 18\nAnswer: 18"
    rows = [
        {"instruction": PROMPT, "label": "17", "responses": [right, right + "\n", wrong1, wrong1, wrong2]},
        {"instruction": PROMPT, "label": "17", "responses": wrong2},  # the same prompt again: merged
        {"instruction": "Compute: 1 + 1", "label": "2", "responses": ["1 + 1 = 2\nAnswer: 2"]},  # no incorrect
    ]
    src = _write(tmp_path / "responses.jsonl", rows)
    out = tmp_path / "pairs.jsonl"
    assert _make_pairs_cli(["--responses", src, "--task", "arith", "--output", str(out)]) == 0
    stats = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    pairs = _read(out)
    assert {(p["chosen"], p["rejected"]) for p in pairs} == {(right, wrong1), (right, wrong2)}
    assert len(pairs) == 2 and all(p["label"] == "17" and p["instruction"] == PROMPT for p in pairs)
    assert stats["pairs"] == 2 and stats["prompts"] == 2 and stats["prompts_with_pairs"] == 1
    assert stats["responses"] == 7 and stats["unique_responses"] == 4
    assert (stats["correct"], stats["incorrect"]) == (2, 2)
    # a cap per prompt keeps a subset
    assert _make_pairs_cli(["--responses", src, "--task", "arith", "--output", str(out),
                            "--max-pairs-per-prompt", "1"]) == 0
    assert len(_read(out)) == 1


def test_make_pairs_gsm8k_checker_and_label_file(tmp_path, capsys):
    q1, q2 = "Janet has 3 apples and buys 15 more. How many?", "Tom earns 9 dollars twice. Total?"
    rows = [
        {"instruction": q1, "responses": ["3 + 15 = 18\nTherefore the answer is 18.",
                                          "She has 18 apples.", "3 + 15 = 17\nSo the answer is 17",
                                          "  She has 18 apples.  ", "no idea"]},
        {"instruction": q2, "responses": ["9 * 2 = 18.0", "9 * 2 = 18.50", "it is 018"]},
    ]
    src = _write(tmp_path / "gsm.jsonl", rows)
    labels = _write(tmp_path / "labels.jsonl", [{"instruction": q1, "label": "18"}, {"instruction": q2, "label": "18"}])
    out = tmp_path / "pairs.jsonl"
    assert _make_pairs_cli(["--responses", src, "--labels", labels, "--task", "gsm8k", "--output", str(out)]) == 0
    stats = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    pairs = _read(out)
    assert stats["checker"] == "reference" and stats["unparsable"] == 1  # "no idea" has no number
    by_q = {}
    for p in pairs:
        by_q.setdefault(p["instruction"], set()).add((p["chosen"], p["rejected"]))
    # q1: 2 unique correct (the padded duplicate is dropped) x 2 incorrect
    assert by_q[q1] == {(c, r) for c in ("3 + 15 = 18\nTherefore the answer is 18.", "She has 18 apples.")
                        for r in ("3 + 15 = 17\nSo the answer is 17", "no idea")}
    # q2 under the reference rule (strings): "18.0" == "18", but "18.50" and "018" are not
    assert by_q[q2] == {("9 * 2 = 18.0", "9 * 2 = 18.50"), ("9 * 2 = 18.0", "it is 018")}
    # the strict checker compares numbers: 018 is 18, 18.50 is still not
    assert _make_pairs_cli(["--responses", src, "--labels", labels, "--task", "gsm8k", "--checker", "strict",
                            "--output", str(out)]) == 0
    strict = {(p["chosen"], p["rejected"]) for p in _read(out) if p["instruction"] == q2}
    assert strict == {("9 * 2 = 18.0", "9 * 2 = 18.50"), ("it is 018", "9 * 2 = 18.50")}
    # a row without label and no --labels is an error naming the line
    from megatron_qrm.evaluation.check_answers import AnswerFileError

    with pytest.raises(AnswerFileError, match="gsm.jsonl:1"):
        _make_pairs_cli(["--responses", src, "--task", "gsm8k", "--output", str(out)])


# ----------------------------------------------------------------------------------------------------
# the pipeline, in miniature
# ----------------------------------------------------------------------------------------------------
#: tiny sizes: an easy task (2 steps) so that a short SFT already yields correct and incorrect samples
MINI = ["--quick", "--seed", "3", "--max-steps", "2", "--n-sft", "2000", "--sft-iters", "150", "--n-rl-prompts", "64",
        "--pair-prompts", "32", "--n-heldout-prompts", "16", "--n-test", "16", "--rm-iters", "4", "--rl-iters", "1",
        "--rl-rollout", "16", "--rl-global-batch", "16", "--rl-micro-batch", "8"]


def _demo(out: str) -> tuple[str, float]:
    t0 = time.time()
    proc = _run([sys.executable, "-m", "megatron_qrm.demo.cli", "demo", "--out", out, *MINI], 600, None, True, None)
    return proc.stdout, time.time() - t0


def _finite_numbers(obj, path="report") -> list[str]:
    """Paths of non-finite numbers (None is allowed only where a value is undefined by design)."""
    bad = []
    if isinstance(obj, float) and not math.isfinite(obj):
        bad.append(path)
    elif isinstance(obj, dict):
        for k, v in obj.items():
            bad += _finite_numbers(v, f"{path}.{k}")
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            bad += _finite_numbers(v, f"{path}[{i}]")
    return bad


def test_demo_miniature_and_resume(tmp_path):
    out = str(tmp_path / "demo")
    stdout, first = _demo(out)
    assert "report:" in stdout
    stages = ["data", "sft", "pairs", "rm-qrm", "rm-orm", "rm-dpo", "rl-ppo-qrm", "rl-ppo-orm", "rl-ppo-dpo",
              "rl-reinforce-qrm", "rl-reinforce-orm", "rl-reinforce-dpo", "localization"]
    for s in stages:
        assert os.path.exists(os.path.join(out, "stages", f"{s}.json")), s
    from megatron_qrm import checkpointing

    for d in ["sft", "rm/qrm", "rm/orm", "rm/dpo"] + [f"rl/{a}_{k}/actor" for a in ("ppo", "reinforce")
                                                      for k in ("qrm", "orm", "dpo")]:
        assert checkpointing.resolve_checkpoint(os.path.join(out, d)), d
    for f in ["tokenizer/tokenizer.model", "data/sft.jsonl", "data/test.jsonl", "pairs/train.jsonl",
              "pairs/heldout.jsonl", "rm/qrm_tokens_heldout.jsonl", "rm/dpo_tokens_heldout.jsonl",
              "localization/qrm.json", "report.md", "report.json"]:
        assert os.path.getsize(os.path.join(out, f)) > 0, f
    rep = json.load(open(os.path.join(out, "report.json")))
    assert _finite_numbers(rep) == []
    for kind in ("qrm", "orm", "dpo"):
        acc = rep["reward_models"][kind]["heldout_accuracy"]
        assert isinstance(acc, float) and 0.0 <= acc <= 1.0
        for algo in ("ppo", "reinforce"):
            curve = rep["rl"][algo][kind]["pass@1"]
            assert len(curve) == 2 and all(isinstance(x, float) and 0 <= x <= 1 for x in curve)
    for kind in ("qrm", "dpo"):
        loc = rep["localization"][kind]
        assert 0 <= loc["hit_rate"] <= 1 and 0 <= loc["hit_rate_mean"] <= 1 and 0 < loc["chance"] <= 1
    assert rep["localization"]["orm"]["hit_rate"] == rep["localization"]["orm"]["chance"]
    import matplotlib.image as mpimg

    for name in ("pass_at_1", "reward_models", "timings", "token_credits"):
        path = rep["plots"].get(name)
        assert path and os.path.exists(path), name
        img = mpimg.imread(path)
        assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100
    md = open(os.path.join(out, "report.md")).read()
    assert "pairwise accuracy" in md and "![Pass@1](pass_at_1.png)" in md

    # a rerun with the same --out resumes: every stage is skipped, only the report is rewritten
    os.remove(os.path.join(out, "report.md"))
    stdout2, second = _demo(out)
    assert stdout2.count("skipped") == len(stages), stdout2
    assert os.path.exists(os.path.join(out, "report.md"))
    assert json.load(open(os.path.join(out, "report.json")))["rl"] == rep["rl"]
    assert second < first / 2, (first, second)


# ----------------------------------------------------------------------------------------------------
# flags -> demo settings
# ----------------------------------------------------------------------------------------------------
def test_demo_flags_override_the_preset():
    from megatron_qrm.cli import build_parser
    from megatron_qrm.demo.cli import demo_config_from_args
    from megatron_qrm.demo.pipeline import default_config, quick_config

    args = build_parser().parse_args(["demo", "--quick", "--qrm-lr", "5e-4", "--ppo-qrm-advantage", "qrm",
                                      "--reward-models", "qrm,orm", "--algos", "ppo"])
    cfg = demo_config_from_args(args, seed=7)
    assert (cfg.seed, cfg.qrm_lr, cfg.ppo_qrm_advantage, cfg.rm_kinds, cfg.algos) == (
        7, 5e-4, "qrm", ("qrm", "orm"), ("ppo",))
    assert cfg.rm_lr == quick_config().rm_lr and cfg.sft_iters == quick_config().sft_iters
    plain = demo_config_from_args(build_parser().parse_args(["demo"]), seed=1)
    assert plain.to_dict() == default_config(1).to_dict() and plain.ppo_qrm_advantage == "qrm-reference"
    with pytest.raises(SystemExit):  # argparse rejects an unknown estimator
        build_parser().parse_args(["demo", "--ppo-qrm-advantage", "gae"])
