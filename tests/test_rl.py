"""RL with token-level rewards: ``qrm train-ppo`` / ``qrm train-reinforce`` (CPU, gloo, fp32).

* learning: with a synthetic token reward (credit 1 for one token id, 0 otherwise, through
  ``RLTrainer(reward_fn=...)``) PPO and REINFORCE both raise that token's frequency in sampled responses
  several-fold within 5 iterations of a tiny random policy (frequencies measured with the sampler, same
  prompts and seeds before and after); one process, ``tests/workers/rl_worker.py learn``;
* end to end: a tiny actor and Q-RM made by ``qrm train-rm``; 2 iterations of PPO and of REINFORCE at TP=2
  (torchrun, 2 processes); stopping after iteration 1 (``--exit-interval 1``, and a real SIGKILL of a
  torchrun launch right after its iteration-1 checkpoint) then resuming in a new launch logs the same
  iteration-2 metrics as the uninterrupted run (1e-6; timings excepted);
* bad input: prompts longer than the context, a reward model with another tokenizer, a missing critic
  checkpoint, a missing reward model (and a few more) end with exit status 2 and one line naming the
  FILE:LINE or the flag, no traceback (batched in one process; the first one also as a real process);
* ``--allow-retokenize``: the credit mapping (experience.retokenize_for_reward) against an exact
  prefix-decoding oracle, SentencePiece actor / byte-level BPE reward model and back, EOS and truncation;
  the trainer's re-tokenising path gives exactly the direct path's credits when both tokenizers are the
  same; PPO and REINFORCE run with a Q-RM trained on an HF tokenizer.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from helpers_tokenizers import make_hf_tokenizer_dir, sample_texts  # noqa: E402
from launch import REPO, _env  # noqa: E402

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "workers", "rl_worker.py")
TIMING_KEYS = ("time", "train/generate_s", "train/score_s", "train/update_s", "train/iteration_s",
               "train/generate_tokens_per_s", "train/refit_s")


def _metrics(save_dir) -> dict[int, dict]:
    """{step: record} of a run's metrics.jsonl (a re-logged step keeps its later record)."""
    from megatron_qrm.training.metrics_log import read_metrics

    return {int(r["step"]): r for r in read_metrics(str(save_dir))}


def _assert_same_metrics(got: dict, want: dict, what: str) -> None:
    keys = sorted(k for k in want if k not in TIMING_KEYS and k != "step")
    assert keys and sorted(k for k in got if k not in TIMING_KEYS and k != "step") == keys, what
    diffs = {k: abs(float(got[k]) - float(want[k])) for k in keys}
    assert max(diffs.values()) <= 1e-6, f"{what}: {({k: v for k, v in diffs.items() if v > 1e-6})}"


# ----------------------------------------------------------------------------------------------------
# --allow-retokenize: the credit mapping (no process group)
# ----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizers(qrm_data, tmp_path_factory):
    """The SentencePiece tokenizer of the test data and a byte-level BPE with another vocabulary (300
    pieces learnt on other texts: its segmentation differs)."""
    from megatron_qrm.data import load_tokenizer

    d = tmp_path_factory.mktemp("hf_tok")
    hf_dir = make_hf_tokenizer_dir(d, with_chat_template=False, texts=sample_texts(200, seed=3), vocab_size=300)
    return {"sp": load_tokenizer(qrm_data.tokenizer), "hf": load_tokenizer(hf_dir), "hf_dir": hf_dir}


RESPONSES = [" 2 4 6", " 12 14 38", " hello there, friends", " 1", " 10 20 30 40", "  8", " x = y + 7",
             " 24é ünïcode", " the answer is 42.", "  two  spaces"]


def _rollout(tok, prompts: list[list[int]], responses: list[str], finished: list[bool]) -> dict:
    """A rollout batch of canonically tokenised responses (+ EOS where ``finished``)."""
    rows, pl, rl = [], [], []
    for p, text, fin in zip(prompts, responses, finished):
        r = tok.encode(text) + ([tok.eos_id] if fin else [])
        rows.append(p + r)
        pl.append(len(p))
        rl.append(len(r))
    length = max(map(len, rows)) + 2  # some right padding
    tokens = torch.full((len(rows), length), tok.pad_id, dtype=torch.long)
    mask = torch.zeros(len(rows), length)
    for i, row in enumerate(rows):
        tokens[i, :len(row)] = torch.tensor(row)
        mask[i, pl[i]:len(row)] = 1
    return {"tokens": tokens, "action_mask": mask, "prompt_lens": torch.tensor(pl), "response_lens": torch.tensor(rl),
            "finished": torch.tensor(finished), "prompt_index": torch.arange(len(rows))}


def _prompts(tok, n: int) -> list[list[int]]:
    texts = [f"Keep the even numbers: {i} {i + 3} {2 * i}" for i in range(n)]
    return [([tok.bos_id] if tok.bos_id is not None else []) + ids for ids in tok.encode_batch(texts)]


def _exact_ends(tok, ctx: list[int], ids: list[int]) -> tuple[str, list[int]]:
    """Oracle: the text ``ids`` add after the whole ``ctx`` and each id's end in it, by decoding every
    prefix in full (quadratic, exact)."""
    base = tok.decode(ctx)
    whole = tok.decode(ctx + ids)
    assert whole.startswith(base)
    ends = [len(tok.decode(ctx + ids[:k + 1])) - len(base) for k in range(len(ids))]
    return whole[len(base):], ends


def test_retokenize_identity_maps_every_token_to_itself(tokenizers):
    from megatron_qrm.rl.experience import retokenize_for_reward

    sp = tokenizers["sp"]
    prompts = _prompts(sp, len(RESPONSES))
    finished = [i % 2 == 0 for i in range(len(RESPONSES))]
    exp = _rollout(sp, prompts, RESPONSES, finished)
    b = retokenize_for_reward(exp, sp, sp, prompts, max_length=64)
    assert torch.equal(b.exp["tokens"][:, :exp["tokens"].shape[1]][b.exp["action_mask"] > 0],
                       exp["tokens"][exp["action_mask"] > 0])
    for i in range(len(RESPONSES)):
        p, r = int(exp["prompt_lens"][i]), int(exp["response_lens"][i])
        assert b.index[i, p:p + r].tolist() == list(range(p, p + r)), RESPONSES[i]
    assert torch.equal(b.valid, exp["action_mask"])
    values = torch.randn(b.exp["tokens"].shape)
    mapped = b.map_back(values)
    for i in range(len(RESPONSES)):
        p, r = int(exp["prompt_lens"][i]), int(exp["response_lens"][i])
        assert torch.equal(mapped[i, p:p + r], values[i, p:p + r])
    assert (mapped[exp["action_mask"] == 0] == 0).all()


@pytest.mark.parametrize("actor,rm", [("sp", "hf"), ("hf", "sp")])
def test_retokenize_credit_of_the_token_covering_the_last_character(tokenizers, actor, rm):
    """Against the oracle: each actor token takes the credit of the reward-model token whose characters
    include the actor token's last character (exact character positions where the reward model's tokens
    spell the same text, non-whitespace positions where its tokenizer normalised whitespace); the stop
    token takes the EOS's; the reward model's sequence is [BOS] its prompt, the re-encoded text, EOS."""
    from megatron_qrm.rl.experience import retokenize_for_reward

    ta, tr = tokenizers[actor], tokenizers[rm]
    pa, pr = _prompts(ta, len(RESPONSES)), _prompts(tr, len(RESPONSES))
    finished = [i % 3 != 1 for i in range(len(RESPONSES))]
    exp = _rollout(ta, pa, RESPONSES, finished)
    b = retokenize_for_reward(exp, ta, tr, pr, max_length=64)
    differs = 0
    for i, text in enumerate(RESPONSES):
        p, r = int(exp["prompt_lens"][i]), int(exp["response_lens"][i])
        body = exp["tokens"][i, p:p + r - (1 if finished[i] else 0)].tolist()
        a_text, a_ends = _exact_ends(ta, pa[i], body)
        rm_ids = tr.encode(a_text)
        q = len(pr[i])
        seq = b.exp["tokens"][i][b.exp["action_mask"][i] > 0].tolist()
        assert b.exp["tokens"][i, :q].tolist() == pr[i]
        assert seq == rm_ids + ([tr.eos_id] if finished[i] else []), (text, seq, rm_ids)
        r_text, r_ends = _exact_ends(tr, pr[i], rm_ids)
        differs += len(rm_ids) != len(body) or rm_ids != body
        if r_text == a_text:  # by characters
            pos_a, pos_r, units = a_ends, r_ends, a_text
        else:  # the reward model's tokenizer normalised the text: by non-whitespace characters
            assert "".join(r_text.split()) == "".join(a_text.split()), (a_text, r_text)

            def nonspace_ends(t, ends):
                return [sum(not c.isspace() for c in t[:e]) for e in ends]

            pos_a, pos_r, units = nonspace_ends(a_text, a_ends), nonspace_ends(r_text, r_ends), None
        for k in range(len(body)):
            j = int(b.index[i, p + k]) - q
            assert 0 <= j < len(rm_ids)
            start_k = pos_a[k - 1] if k else 0
            if pos_a[k] > start_k:  # the token has a (non-whitespace) character: its last one
                c = pos_a[k] - 1
                rj_start = pos_r[j - 1] if j else 0
                assert rj_start <= c < pos_r[j], (text, k, j, pos_a, pos_r)
            elif units is None:  # whitespace only: the token of the next character (or the last one)
                assert j == min(sum(e <= pos_a[k] for e in pos_r), len(rm_ids) - 1), (text, k, j)
        if finished[i]:
            assert int(b.index[i, p + r - 1]) == q + len(rm_ids)  # stop token -> EOS
            assert b.exp["tokens"][i, q + len(rm_ids)] == tr.eos_id
        assert b.valid[i].sum() == r
    assert differs >= 3  # the two tokenizers really segment differently


def test_retokenize_truncates_like_reward_training(tokenizers):
    from megatron_qrm.rl.experience import retokenize_for_reward

    sp, hf = tokenizers["sp"], tokenizers["hf"]
    pa, pr = _prompts(sp, 2), _prompts(hf, 2)
    exp = _rollout(sp, pa, [" 10 20 30 40 50 60 70", " 10 20 30 40 50 60 70"], [True, True])
    full = retokenize_for_reward(exp, sp, hf, pr, max_length=64)
    n_rm = int(full.exp["action_mask"][0].sum())
    cap = len(pr[0]) + n_rm - 3  # room for all but the EOS and the last two tokens of row 0
    b = retokenize_for_reward(exp, sp, hf, pr, max_length=cap)
    assert b.exp["tokens"].shape[1] <= cap
    kept = int(b.exp["action_mask"][0].sum())
    assert kept == cap - len(pr[0]) and tr_last(b, 0) != hf.eos_id  # the EOS went first
    p, r = int(exp["prompt_lens"][0]), int(exp["response_lens"][0])
    idx = b.index[0, p:p + r]
    assert idx.max() == len(pr[0]) + kept - 1  # past the cut (and the stop token): the last kept token
    assert torch.equal(idx[: r // 2], full.index[0, p:p + r // 2])  # before the cut: unchanged
    with pytest.raises(ValueError, match="no room for a response"):
        retokenize_for_reward(exp, sp, hf, pr, max_length=len(pr[1]))


def tr_last(b, i: int) -> int:
    return int(b.exp["tokens"][i][b.exp["action_mask"][i] > 0][-1])


# ----------------------------------------------------------------------------------------------------
# end to end: train-rm -> train-ppo / train-reinforce at TP=2, exit / SIGKILL + resume, bad input
# ----------------------------------------------------------------------------------------------------

RL_FLAGS = ["--seq-length", "64", "--max-new-tokens", "16", "--rollout-batch-size", "8", "--global-batch-size", "8",
            "--micro-batch-size", "4", "--forward-micro-batch-size", "4", "--lr", "1e-3", "--no-tensorboard"]
TP2 = ["--tensor-model-parallel-size", "2"]


def _descendants(pid: int) -> list[int]:
    """Every descendant of ``pid`` (torchrun starts each worker in its own session: killing torchrun's
    process group does not reach them)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        try:
            with open(f"/proc/{p}/task/{p}/children") as f:
                kids = [int(x) for x in f.read().split()]
        except OSError:
            kids = []
        out += kids
        todo += kids
    return out


def _kill_tree(proc: subprocess.Popen) -> None:
    for pid in [proc.pid, *_descendants(proc.pid)]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _popen_torchrun(args: list, nproc: int, log) -> subprocess.Popen:
    from launch import free_port

    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_addr",
           "127.0.0.1", "--master_port", str(free_port()), *[str(a) for a in args]]
    return subprocess.Popen(cmd, cwd=REPO, env=_env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def _cli(runs: list[list], nproc: int, d, name: str, timeout: int = 600) -> list[dict]:
    """Run command lines through the worker's in-process driver (one launch); per-command results."""
    runs_file, results_file, log_file = d / f"{name}_runs.json", d / f"{name}_results.json", d / f"{name}.log"
    runs_file.write_text(json.dumps([[str(a) for a in argv] for argv in runs]))
    args = [WORKER, "cli", str(runs_file), str(results_file)]
    with open(log_file, "w") as log:
        proc = subprocess.Popen([sys.executable, *args], cwd=REPO, env=_env(), stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True) if nproc == 1 else _popen_torchrun(args, nproc, log)
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill_tree(proc)  # no orphaned workers left behind
            rc = "timeout"
    results = json.loads(results_file.read_text()) if results_file.exists() else []
    assert rc == 0 and len(results) == len(runs), (
        f"{name}: exit {rc}, {len(results)}/{len(runs)} commands\n{log_file.read_text()[-8000:]}")
    return results


def _kill_after_first_checkpoint(proc: subprocess.Popen, save_dir: str, box: dict) -> None:
    """SIGKILL torchrun and its workers once the iteration-1 checkpoint is committed (the actor's
    ``latest``, written after the critic's)."""
    deadline = time.time() + 500
    marker = os.path.join(save_dir, "actor", "latest")
    while proc.poll() is None and time.time() < deadline:
        if os.path.exists(marker):
            _kill_tree(proc)
            break
        time.sleep(0.01)
    if proc.poll() is None:  # deadline: do not leave it running
        _kill_tree(proc)
    box["rc"] = proc.wait()


@pytest.fixture(scope="module")
def rl_runs(qrm_data, tiny_flags, tokenizers, learn_proc, tmp_path_factory):
    d = tmp_path_factory.mktemp("rl")
    rows = qrm_data.rows
    long_rows = list(rows[:16])  # line 3 has no room within --seq-length 64
    long_rows[2] = dict(rows[2], instruction="Keep the even numbers: " + " ".join(str(i % 39 + 1) for i in range(80)))
    long_file = d / "long.jsonl"
    long_file.write_text("".join(json.dumps(r) + "\n" for r in long_rows))
    rm_flags = ["--train-data", qrm_data.pairs, *tiny_flags, "--micro-batch-size", "8", "--global-batch-size", "8",
                "--train-iters", "3", "--lr", "1e-3", "--no-tensorboard"]
    actor, qrm, qrm_hf = d / "actor", d / "qrm", d / "qrm_hf"
    base = ["--actor-checkpoint", actor, "--prompt-data", qrm_data.pairs, *RL_FLAGS]
    one = ["--train-iters", "1"]

    # A. one process: the models, every bad input, the re-tokenising runs, --skip-long-prompts
    bad = {
        "long_prompt": ["train-ppo", *base, "--reward-model", qrm, *one, "--prompt-data", long_file],
        "rm_tokenizer": ["train-ppo", *base, "--reward-model", qrm_hf, *one],
        "critic_missing": ["train-ppo", *base, "--reward-model", qrm, *one, "--critic-init", "checkpoint",
                           "--critic-checkpoint", "/nonexistent/critic"],
        "critic_unset": ["train-ppo", *base, "--reward-model", qrm, *one, "--critic-init", "checkpoint"],
        "rm_missing": ["train-reinforce", *base, "--reward-model", d / "no_such_rm", *one],
        "actor_missing": ["train-reinforce", *base, "--reward-model", qrm, *one, "--actor-checkpoint", d / "nope"],
        "prompts_missing": ["train-reinforce", *base, "--reward-model", qrm, *one, "--prompt-data", d / "nope.jsonl"],
    }
    ok = {
        "retok_ppo": ["train-ppo", *base, "--reward-model", qrm_hf, "--allow-retokenize", "--train-iters", "2",
                      "--save", d / "retok_ppo"],
        "retok_reinforce": ["train-reinforce", *base, "--reward-model", qrm_hf, "--allow-retokenize", *one,
                            "--save", d / "retok_reinforce"],
        "skip_long": ["train-reinforce", *base, "--reward-model", qrm, *one, "--prompt-data", long_file,
                      "--skip-long-prompts", "--save", d / "skip_long"],
    }
    runs_a = [["train-rm", *rm_flags, "--tokenizer", qrm_data.tokenizer, "--reward-loss", "dpo", "--save", actor],
              ["train-rm", *rm_flags, "--tokenizer", qrm_data.tokenizer, "--save", qrm],
              ["train-rm", *rm_flags, "--tokenizer", tokenizers["hf_dir"], "--save", qrm_hf],
              *bad.values(), *ok.values()]
    res_a = _cli(runs_a, 1, d, "a")
    assert all(r["rc"] == 0 for r in res_a[:3]), [(r["rc"], r["stderr"][-2000:]) for r in res_a[:3]]
    results = dict(zip([*bad, *ok], res_a[3:]))

    # B. TP=2: 2 iterations uninterrupted, and exit after iteration 1, for both algorithms; meanwhile a
    # torchrun launch SIGKILLed right after its iteration-1 checkpoint, and one bad input as a real process
    killed = d / "killed"
    kill_log = open(d / "killed.log", "w")
    kill_proc = _popen_torchrun(["-m", "megatron_qrm", "train-ppo", *base, "--reward-model", qrm, *TP2,
                                 "--train-iters", "1000", "--save", killed], 2, kill_log)
    box: dict = {}
    killer = threading.Thread(target=_kill_after_first_checkpoint, args=(kill_proc, str(killed), box))
    killer.start()
    real = subprocess.Popen([sys.executable, "-m", "megatron_qrm", *[str(a) for a in bad["long_prompt"]]], cwd=REPO,
                            env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    runs_b = []
    for algo in ("ppo", "reinforce"):
        flags = [f"train-{algo}", *base, "--reward-model", qrm, *TP2, "--train-iters", "2"]
        runs_b += [[*flags, "--save", d / f"{algo}_full"], [*flags, "--exit-interval", "1", "--save", d / algo]]
    try:
        _cli(runs_b, 2, d, "b")
        real_out, real_err = real.communicate(timeout=600)
    finally:
        if real.poll() is None:
            real.kill()
        killer.join(timeout=600)
        if kill_proc.poll() is None:
            _kill_tree(kill_proc)
        kill_log.close()

    # C. resume in new processes: the exited runs, and the killed one (there to iteration 2, then exit;
    # without --actor-checkpoint: the RL checkpoint records the initial policy)
    runs_c = [[f"train-{algo}", *base, "--reward-model", qrm, *TP2, "--train-iters", "2", "--load", d / algo,
               "--save", d / algo] for algo in ("ppo", "reinforce")]
    resume_killed = ["train-ppo", *base[2:], "--reward-model", qrm, *TP2, "--train-iters", "1000", "--exit-interval",
                     "2", "--load", killed, "--save", killed]
    runs_c.append(resume_killed)
    res_c = _cli(runs_c, 2, d, "c")
    return {"dir": d, "bad": {k: results[k] for k in bad}, "ok": {k: results[k] for k in ok},
            "real": (real.returncode, real_out, real_err), "kill_rc": box.get("rc"),
            "killed_log": (d / "killed.log").read_text(), "resumed": res_c}


BAD_INPUT = {  # case -> substrings of the one error line
    "long_prompt": ["long.jsonl:3:", "the prompt is", "--seq-length 64", "--skip-long-prompts"],
    "rm_tokenizer": ["reward model's tokenizer", "hf_tok_plain", "--allow-retokenize"],
    "critic_missing": ["--critic-checkpoint", "/nonexistent/critic"],
    "critic_unset": ["--critic-init checkpoint needs --critic-checkpoint"],
    "rm_missing": ["--reward-model", "no_such_rm"],
    "actor_missing": ["--actor-checkpoint", "nope"],
    "prompts_missing": ["nope.jsonl", "no such file"],
}


@pytest.mark.dist
@pytest.mark.parametrize("case", list(BAD_INPUT))
def test_bad_input_is_one_clear_line(rl_runs, case):
    r = rl_runs["bad"][case]
    assert r["exception"] is None, r["exception"]
    assert r["rc"] == 2, r
    lines = [line for line in r["stderr"].splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"qrm {r['argv'][0]}: error: "), lines
    for s in BAD_INPUT[case]:
        assert s in lines[0], (s, lines[0])


@pytest.mark.dist
def test_bad_input_as_a_real_process(rl_runs):
    rc, out, err = rl_runs["real"]
    assert rc == 2, err[-3000:]
    assert "Traceback" not in err and "Traceback" not in out
    errors = [line for line in err.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and "long.jsonl:3:" in errors[0] and "--skip-long-prompts" in errors[0], errors


@pytest.mark.dist
def test_skip_long_prompts_runs(rl_runs):
    r = rl_runs["ok"]["skip_long"]
    assert r["rc"] == 0, r["stderr"]
    assert "'skipped_long_prompt': 1" in r["stdout"]
    assert sorted(_metrics(rl_runs["dir"] / "skip_long")) == [1]


@pytest.mark.dist
@pytest.mark.parametrize("algo", ["ppo", "reinforce"])
def test_two_iterations_at_tp2(rl_runs, algo):
    m = _metrics(rl_runs["dir"] / f"{algo}_full")
    assert sorted(m) == [1, 2]
    for rec in m.values():
        assert all(math.isfinite(v) for k, v in rec.items() if isinstance(v, float)), rec
        assert rec["train/response_length"] > 0 and rec["train/generate_s"] > 0
    assert ("train/value_loss" in m[2]) == (algo == "ppo")
    assert m[1]["train/policy_loss"] != m[2]["train/policy_loss"]
    from megatron_qrm import checkpointing

    d = rl_runs["dir"] / f"{algo}_full"
    assert checkpointing.resolve_checkpoint(str(d / "actor")).endswith("iter_0000002")
    assert (checkpointing.resolve_checkpoint(str(d / "critic")) is not None) == (algo == "ppo")
    cfg = checkpointing.read_config(str(d / "actor"))
    assert cfg["role"] == "policy" and cfg["rl"]["algo"] == algo


@pytest.mark.dist
@pytest.mark.parametrize("algo", ["ppo", "reinforce"])
def test_exit_and_resume_matches_uninterrupted(rl_runs, algo):
    i = ["ppo", "reinforce"].index(algo)
    res = rl_runs["resumed"][i]
    assert res["rc"] == 0 and "resumed from" in res["stdout"] and "at iteration 1" in res["stdout"], res["stdout"]
    want, got = _metrics(rl_runs["dir"] / f"{algo}_full"), _metrics(rl_runs["dir"] / algo)
    assert sorted(got) == [1, 2]
    for step in (1, 2):
        _assert_same_metrics(got[step], want[step], f"{algo} step {step} after exit at 1 + resume")


@pytest.mark.dist
def test_sigkill_and_resume_matches_uninterrupted(rl_runs):
    assert rl_runs["kill_rc"] == -signal.SIGKILL, rl_runs["killed_log"][-3000:]
    d = rl_runs["dir"] / "killed"
    res = rl_runs["resumed"][2]
    assert res["rc"] == 0, res["stderr"]
    killed_at = [line for line in res["stdout"].splitlines() if "resumed from" in line]
    assert killed_at and killed_at[0].endswith("at iteration 1"), res["stdout"]  # killed before iteration 2 ended
    got, want = _metrics(d), _metrics(rl_runs["dir"] / "ppo_full")
    assert sorted(got) == [1, 2]
    for step in (1, 2):
        _assert_same_metrics(got[step], want[step], f"SIGKILL after iteration 1 + resume, step {step}")


@pytest.mark.dist
@pytest.mark.parametrize("algo", ["ppo", "reinforce"])
def test_reward_model_with_another_tokenizer(rl_runs, algo):
    r = rl_runs["ok"][f"retok_{algo}"]
    assert r["rc"] == 0 and r["exception"] is None, (r["stderr"], r["exception"])
    assert "re-tokenised" in r["stdout"]
    m = _metrics(rl_runs["dir"] / f"retok_{algo}")
    assert sorted(m) == ([1, 2] if algo == "ppo" else [1])
    for rec in m.values():
        assert rec["train/token_reward_mean"] != 0.0 and math.isfinite(rec["train/token_reward_mean"])
    if algo == "ppo":  # the critic starts from the actor (the reward model reads another vocabulary)
        assert "train/value_loss" in m[2]


# ----------------------------------------------------------------------------------------------------
# learning with a synthetic token reward (one process; started by rl_runs when the end-to-end tests run,
# so that it trains while the other launches run: these tests come last)
# ----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def learn_proc(qrm_data, tmp_path_factory):
    """Start the learning worker in the background (other fixtures run while it trains)."""
    d = tmp_path_factory.mktemp("learn")
    log = open(d / "learn.log", "w")
    cmd = [sys.executable, WORKER, "learn", "--dir", str(d), "--tokenizer", qrm_data.tokenizer, "--prompts",
           qrm_data.pairs, "--iters", "5", "--lr", "1e-2", "--eval-rounds", "2"]
    proc = subprocess.Popen(cmd, cwd=REPO, env=_env(), stdout=log, stderr=subprocess.STDOUT)
    yield {"proc": proc, "dir": d, "log": log}
    if proc.poll() is None:
        proc.kill()
    log.close()


@pytest.fixture(scope="module")
def learned(learn_proc):
    rc = learn_proc["proc"].wait(timeout=600)
    learn_proc["log"].flush()
    out = (learn_proc["dir"] / "learn.log").read_text()
    assert rc == 0, out[-6000:]
    return json.loads((learn_proc["dir"] / "learn.json").read_text())


@pytest.mark.parametrize("algo", ["ppo", "reinforce"])
def test_token_reward_raises_token_frequency(learned, algo):
    res = learned[algo]
    before, after = res["before"], res["after"]
    assert before == learned["before"]  # the same initial policy, prompts and seeds
    # a random policy samples the rewarded token ~0.3% of the time; 5 iterations multiply that several times
    assert after > 3 * before and after >= 0.02, (learned["target"], before, after)
    rewards = res["rewards"]  # the logged mean token reward follows
    assert len(rewards) == 5 and rewards[-1] > 2 * max(rewards[0], 1e-3), rewards
    assert all(math.isfinite(v) for v in res["last"].values())


def test_retokenizing_path_equals_direct_path_with_the_same_tokenizer(learned):
    r = learned["retokenize"]
    assert r["n_actions"] >= 30 and r["credit_std"] > 1e-3  # real, varied credits
    assert r["max_abs_diff"] <= 1e-6
