"""Fail loud, lose nothing: each attack of issue 11 on a tiny reward model (CPU, gloo, fp32).

For every attack: the expected error text or behaviour, and that the checkpoint ``latest`` named before
the attack still loads and resumes. Most command lines run one after the other in ONE process
(``_DRIVER``: a per-command environment and fault patch, then :func:`megatron_qrm.cli.main`); the kill
tests use real processes.

* non-finite: NaN gradients injected at chosen steps (``QRM_FAULT_NONFINITE_STEPS``) are skipped, three
  in a row stop the run (exit 3) naming the steps; ``--lr 1e20`` stops having saved nothing;
  ``--lr 1e6`` (collapse) is warned about; ``--lr -1`` / ``--lr 1e38`` are refused before any model;
* tokenizer identity: resume with another tokenizer is refused naming both (``--allow-tokenizer-change``
  records the change); eval with a larger vocabulary is a clear error;
* pre-flight: an unwritable ``--save`` fails before the first step; size flags that contradict the
  checkpoint name the flag and both values; a failed start leaves ``run_config.json``/``metrics.jsonl``;
* a full disk during a save (patched writer) names the cause and keeps ``latest``;
* eval while a trainer moves ``latest`` reports (and names its output after) what it evaluated;
* SIGKILL leaves no process of the trainer's tree (single process, and torchrun's launcher killed);
* ``metrics.jsonl`` holds each step once after two kills and a resume (losses as an uninterrupted run).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import losses
from launch import REPO, _env, free_port, run_cli_driver

TRAIN = ["--micro-batch-size", "4", "--global-batch-size", "4", "--no-tensorboard"]

# Commands run in one process through launch.run_cli_driver (tests/workers/cli_driver.py lists its fault patches).


def _latest(save: str) -> str:
    with open(os.path.join(save, "latest")) as f:
        return f.read().strip()


def _weights_finite(ckpt_dir: str, tmp) -> tuple[int, int]:
    """(non-finite, total) elements of the model tensors of a checkpoint, read from its files only."""
    import torch
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    out = tmp / f"{os.path.basename(ckpt_dir)}_{abs(hash(ckpt_dir))}.pt"
    dcp_to_torch_save(ckpt_dir, str(out))
    state = torch.load(out, weights_only=False)
    tensors = [v for k, v in state.items() if isinstance(v, torch.Tensor) and not k.startswith("optimizer.")]
    assert tensors, sorted(state)[:10]
    return sum(int((~torch.isfinite(t)).sum()) for t in tensors), sum(t.numel() for t in tensors)


def _error_line(result: dict, command: str) -> str:
    lines = [ln for ln in result["stderr"].splitlines() if ln.startswith(f"qrm {command}: error: ")]
    assert len(lines) == 1, result["stderr"][-3000:]
    return lines[0]


# ----------------------------------------------------------------------------------------------------
# one process: every attack that needs no kill
# ----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def attacks(qrm_data, tiny_flags, tmp_path_factory):
    from helpers_tokenizers import make_sentencepiece_model
    from megatron_qrm.data.synthetic import corpus, parity_pairs

    d = tmp_path_factory.mktemp("reliability")
    # another SentencePiece model of the same texts with a smaller vocabulary (the attack's tokenizer)
    small_tok = make_sentencepiece_model(d / "tok_small", corpus(parity_pairs(64, seed=0)), vocab_size=300)
    base = ["--train-data", qrm_data.pairs, "--tokenizer", qrm_data.tokenizer, *tiny_flags, *TRAIN]
    rm = ["train-rm", *base]
    B = d / "base"
    files = [B / "run_config.json", B / "metrics.jsonl"]
    not_a_dir = d / "a_file"
    not_a_dir.write_text("not a directory")
    nan_env = {"QRM_FAULT_NONFINITE_STEPS": "3,4,5"}
    commands = [
        {"name": "base", "argv": [*rm, "--train-iters", "4", "--save-interval", "2", "--save", B], "hash": files},
        # starts that must fail before any model is built, leaving B's files alone
        {"name": "lr_negative", "argv": [*rm, "--lr", "-1", "--train-iters", "6", "--load", B, "--save", B],
         "hash": files},
        {"name": "lr_overflow", "argv": [*rm, "--lr", "1e38", "--train-iters", "6", "--load", B, "--save", B],
         "hash": files},
        {"name": "tokenizer", "argv": [*rm, "--tokenizer", small_tok, "--train-iters", "6", "--load", B, "--save", B],
         "hash": files},
        {"name": "size_flags", "argv": [*rm, "--hidden-size", "128", "--train-iters", "6", "--load", B, "--save", B],
         "hash": files},
        {"name": "readonly_save", "argv": [*rm, "--train-iters", "20", "--save", not_a_dir / "ckpt",
                                           "--log-dir", d / "ro_logs"]},
        # the previous latest still loads and resumes
        {"name": "resume", "argv": [*rm, "--train-iters", "6", "--load", B, "--save", B], "hash": files},
        # a deliberate tokenizer change is accepted and recorded
        {"name": "tokenizer_change", "argv": [*rm, "--tokenizer", small_tok, "--allow-tokenizer-change",
                                              "--train-iters", "7", "--load", B, "--save", d / "tok_changed"]},
        # eval with a tokenizer of larger vocabulary than the model's
        {"name": "small_vocab_model", "argv": [*rm, "--tokenizer", small_tok, "--train-iters", "1",
                                               "--save", d / "small"]},
        {"name": "eval_bigger_vocab", "argv": ["eval-rm", "--load", d / "small", "--data", qrm_data.pairs,
                                               "--tokenizer", qrm_data.tokenizer, "--allow-tokenizer-change"]},
        # NaN gradients at chosen steps: one is skipped, three in a row stop the run
        {"name": "nan_once", "argv": [*rm, "--train-iters", "2", "--save-interval", "1", "--save", d / "nan_once"],
         "env": {"QRM_FAULT_NONFINITE_STEPS": "2"}},
        {"name": "nan_streak", "argv": [*rm, "--train-iters", "10", "--save-interval", "2", "--save", d / "nan"],
         "env": nan_env},
        {"name": "nan_resume", "argv": [*rm, "--train-iters", "6", "--load", d / "nan", "--save", d / "nan"]},
        {"name": "lr_1e20", "argv": [*rm, "--lr", "1e20", "--train-iters", "12", "--save-interval", "1",
                                     "--save", d / "lr20"]},
        {"name": "lr_1e6", "argv": [*rm, "--lr", "1e6", "--train-iters", "12", "--save", d / "lr6"]},
        # disk full during the second save, then resume from the kept latest
        {"name": "enospc", "argv": [*rm, "--train-iters", "4", "--save-interval", "2", "--save", d / "full"],
         "patch": "enospc_at_save=2"},
        {"name": "enospc_resume", "argv": [*rm, "--train-iters", "4", "--load", d / "full", "--save", d / "full"]},
        # eval while a trainer commits another checkpoint between resolving `latest` and loading
        {"name": "race_train", "argv": [*rm, "--train-iters", "4", "--save-interval", "2", "--save", d / "race"]},
        {"name": "eval_iter2", "argv": ["eval-rm", "--load", d / "race" / "iter_0000002", "--data", qrm_data.pairs,
                                        "--output", d / "iter2.json"]},
        {"name": "eval_iter4", "argv": ["eval-rm", "--load", d / "race" / "iter_0000004", "--data", qrm_data.pairs,
                                        "--output", d / "iter4.json"]},
        {"name": "eval_race", "argv": ["eval-rm", "--load", d / "race", "--data", qrm_data.pairs],
         "patch": "latest_moves=iter_0000002"},
        {"name": "eval_pruned", "argv": ["eval-rm", "--load", d / "race", "--data", qrm_data.pairs],
         "patch": "prune_after_read"},
    ]
    return {"dir": d, "small_tok": small_tok, "results": run_cli_driver(d, commands)}


def test_failed_starts_touch_nothing_and_latest_resumes(attacks):
    r = attacks["results"]
    assert r["base"]["rc"] == 0 and all(r["base"]["hashes"].values())
    for name in ("lr_negative", "lr_overflow", "tokenizer", "size_flags"):
        assert r[name]["rc"] == 2, (name, r[name]["stderr"][-2000:])
        assert r[name]["hashes"] == r["base"]["hashes"], f"{name} changed run_config.json / metrics.jsonl"
        assert "model: role=" not in r[name]["stdout"] + r[name]["stderr"], f"{name} built a model"
    assert r["resume"]["rc"] == 0, r["resume"]["stderr"][-3000:]
    steps = sorted(int(s) for s in losses(attacks["dir"] / "base"))
    assert steps == [1, 2, 3, 4, 5, 6]
    assert _latest(attacks["dir"] / "base") == "iter_0000006"


def test_optimizer_flags_are_refused_naming_the_flag(attacks):
    r = attacks["results"]
    assert "--lr -1.0: must be a finite number >= 0" in _error_line(r["lr_negative"], "train-rm")
    line = _error_line(r["lr_overflow"], "train-rm")
    assert "--lr 1e+38" in line and "overflows float32" in line
    assert "RuntimeError" not in r["lr_overflow"]["stderr"]


def test_size_flags_that_contradict_the_checkpoint(attacks):
    line = _error_line(attacks["results"]["size_flags"], "train-rm")
    assert "--hidden-size 128" in line and "hidden_size = 64" in line and str(attacks["dir"] / "base") in line
    assert "CheckpointingException" not in attacks["results"]["size_flags"]["stderr"]


def test_tokenizer_mismatch_names_both_and_change_is_recorded(attacks, qrm_data):
    from megatron_qrm.data.tokenizer import tokenizer_fingerprint

    r = attacks["results"]
    line = _error_line(r["tokenizer"], "train-rm")
    assert attacks["small_tok"] in line and qrm_data.tokenizer in line and "--allow-tokenizer-change" in line
    assert "vocab 300" in line and "vocab 400" in line
    assert tokenizer_fingerprint(attacks["small_tok"]) in line and tokenizer_fingerprint(qrm_data.tokenizer) in line
    # the deliberate change: trained on, recorded in the new checkpoint
    assert r["tokenizer_change"]["rc"] == 0, r["tokenizer_change"]["stderr"][-3000:]
    with open(attacks["dir"] / "tok_changed" / "iter_0000007" / "qrm_config.json") as f:
        config = json.load(f)
    assert config["tokenizer_identity"]["fingerprint"] == tokenizer_fingerprint(attacks["small_tok"])
    (change,) = config["tokenizer_changes"]
    assert change["from"]["fingerprint"] == tokenizer_fingerprint(qrm_data.tokenizer)
    assert change["to"]["vocab_size"] == 300


def test_eval_with_a_larger_vocabulary_is_a_clear_error(attacks):
    r = attacks["results"]
    assert r["small_vocab_model"]["rc"] == 0
    line = _error_line(r["eval_bigger_vocab"], "eval-rm")
    assert "400 token ids" in line and "vocabulary of 300" in line
    assert "IndexError" not in r["eval_bigger_vocab"]["stderr"]


def test_unwritable_save_fails_before_the_first_step(attacks):
    r = attacks["results"]["readonly_save"]
    line = _error_line(r, "train-rm")
    assert "--save" in line and "not writable" in line
    assert not (attacks["dir"] / "ro_logs" / "metrics.jsonl").exists()
    assert "model: role=" not in r["stdout"] + r["stderr"]


def _metrics(path) -> dict[int, dict]:
    from megatron_qrm.training.metrics_log import read_metrics

    return {int(rec["step"]): rec for rec in read_metrics(path)}


def test_one_nonfinite_step_is_skipped_without_update(attacks, tmp_path):
    """Step 2's gradients are NaN: no update, so the weights saved after step 2 are those after step 1."""
    import torch

    r = attacks["results"]["nan_once"]
    assert r["rc"] == 0, r["stderr"][-3000:]
    assert "iteration 2: gradients contain NaN/Inf: optimizer step skipped" in r["stderr"]
    m = _metrics(attacks["dir"] / "nan_once")
    assert m[2]["train/skipped"] == 1.0 and m[1]["train/skipped"] == 0.0

    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    def model(it):
        out = tmp_path / f"{it}.pt"
        dcp_to_torch_save(str(attacks["dir"] / "nan_once" / f"iter_000000{it}"), str(out))
        return {k: v for k, v in torch.load(out, weights_only=False).items()
                if isinstance(v, torch.Tensor) and not k.startswith("optimizer.")}

    one, two = model(1), model(2)
    assert "token_head.weight" in one and one.keys() == two.keys()
    assert all(torch.equal(one[k], two[k]) for k in one)


def test_nonfinite_streak_stops_naming_the_step_and_latest_resumes(attacks, tmp_path):
    r = attacks["results"]
    line = _error_line(r["nan_streak"], "train-rm")
    assert r["nan_streak"]["rc"] == 3
    assert "iteration 5:" in line and "since iteration 3" in line and "3 optimizer steps in a row" in line
    save = attacks["dir"] / "nan"
    # iteration 4 was skipped on NaN gradients under a finite loss: its (unchanged) weights were saved,
    # then the run stopped at 5; the resume starts from that checkpoint
    assert "saved checkpoint" in r["nan_streak"]["stdout"] and f"{save}/iter_0000004" in r["nan_streak"]["stdout"]
    assert f"{save}/iter_0000006" not in r["nan_streak"]["stdout"]
    assert _weights_finite(str(save / "iter_0000004"), tmp_path)[0] == 0
    assert r["nan_resume"]["rc"] == 0, r["nan_resume"]["stderr"][-3000:]
    assert f"resumed from {save}/iter_0000004 at iteration 4" in r["nan_resume"]["stdout"]
    m = _metrics(save)
    assert sorted(m) == [1, 2, 3, 4, 5, 6]  # step 5 of the stopped attempt superseded by the resumed run
    assert m[5]["train/skipped"] == 0.0 and m[6]["train/loss"] is not None


def test_huge_learning_rate_stops_and_saves_nothing(attacks, tmp_path):
    """`--lr 1e20`: iteration 1's update takes the weights to ~1e20 (finite, but the model's outputs are not):
    not saved (issue 21; tests/test_reliability_round2.py checks the probe); losses NaN from step 2; the run
    stops at step 4 (exit 3) and no checkpoint was ever written."""
    r = attacks["results"]["lr_1e20"]
    assert r["rc"] == 3, r["stderr"][-3000:]
    line = _error_line(r, "train-rm")
    assert "since iteration 1" in line and "loss nan" in line
    save = attacks["dir"] / "lr20"
    assert not os.path.exists(save / "latest")
    assert not [p for p in os.listdir(save) if p.startswith("iter_")]


def test_collapse_is_warned_about(attacks):
    r = attacks["results"]["lr_1e6"]
    assert r["rc"] == 0
    assert "the gradient norm has been exactly 0 for 10 steps" in r["stderr"]
    norms = [rec["train/grad_norm"] for rec in _metrics(attacks["dir"] / "lr6").values()]
    assert sum(n == 0.0 for n in norms) >= 10


def test_disk_full_during_save_names_the_cause_and_keeps_latest(attacks):
    r = attacks["results"]
    line = _error_line(r["enospc"], "train-rm")
    assert r["enospc"]["rc"] == 3
    assert "no space left on device: needed ~" in line and "GB, free " in line
    assert "`latest` still names iter_0000002" in line and "inline_container" not in line
    save = attacks["dir"] / "full"
    assert not (save / "iter_0000004.tmp").exists()
    assert r["enospc_resume"]["rc"] == 0, r["enospc_resume"]["stderr"][-3000:]
    assert _latest(save) == "iter_0000004"
    assert sorted(losses(save)) == [1, 2, 3, 4]


def test_eval_reports_the_checkpoint_it_evaluated(attacks):
    """`latest` names iter_4 when eval-rm resolves it and iter_2 before it loads (a trainer committing another
    checkpoint): the report, the weights and the output name are all of iter_4. A checkpoint removed in that
    window is a clear error."""
    r, d = attacks["results"], attacks["dir"]
    assert r["race_train"]["rc"] == 0
    direct2, direct4 = (json.loads((d / f"iter{i}.json").read_text()) for i in (2, 4))
    assert direct2["mean_margin"] != direct4["mean_margin"]  # the two checkpoints are distinguishable
    raced = json.loads(r["eval_race"]["stdout"].strip().splitlines()[-1])
    # resolved while `latest` named iter_0000004; the fault then pointed it at iter_0000002
    assert raced["checkpoint"] == str(d / "race" / "iter_0000004")
    assert raced["mean_margin"] == direct4["mean_margin"] and raced["pairwise_accuracy"] == direct4["pairwise_accuracy"]
    assert os.path.basename(raced["output"]).startswith("iter_0000004_")
    line = _error_line(r["eval_pruned"], "eval-rm")
    assert "was removed" in line or "removed after it was chosen" in line


# ----------------------------------------------------------------------------------------------------
# data: degenerate pairs
# ----------------------------------------------------------------------------------------------------


def test_degenerate_pairs_are_counted_and_skipped_with_one_warning(qrm_data, tmp_path, caplog):
    from megatron_qrm.data import PreferenceDataConfig, PreferenceDataset, load_tokenizer
    from megatron_qrm.data.sources import DataError

    rows = [dict(r) for r in qrm_data.rows[:6]]
    rows[1]["rejected"] = ""
    rows[3]["rejected"] = rows[3]["chosen"]
    rows[4]["chosen"] = "   "
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tok = load_tokenizer(qrm_data.tokenizer)
    with caplog.at_level("WARNING", logger="megatron_qrm"):
        ds = PreferenceDataset(PreferenceDataConfig(str(path), seq_length=64), tok)
    assert len(ds) == 3 and ds.locations == [f"{path}:1", f"{path}:3", f"{path}:6"]
    assert ds.stats["skipped_empty_response"] == 2 and ds.stats["skipped_identical"] == 1
    warnings = [r for r in caplog.records if "skipped" in r.getMessage()]
    assert len(warnings) == 1 and f"{path}:2" in warnings[0].getMessage()
    with pytest.raises(DataError, match=rf"{path}:2: an empty response \(--strict-data\)"):
        PreferenceDataset(PreferenceDataConfig(str(path), seq_length=64, strict=True), tok)


# ----------------------------------------------------------------------------------------------------
# real processes: SIGKILL
# ----------------------------------------------------------------------------------------------------


def _tree(pid: int) -> list:
    import psutil

    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def _wait_for(cond, proc, timeout: float, what: str, watch=None) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if watch is not None:
            watch()
        if cond():
            return
        if proc.poll() is not None:
            raise AssertionError(f"process ended (exit {proc.returncode}) before {what}")
        time.sleep(0.01)
    raise AssertionError(f"timed out waiting for {what}")


def _alive(procs) -> list:
    import psutil

    out = []
    for p in procs:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                out.append(p)
        except psutil.NoSuchProcess:
            pass
    return out


@pytest.mark.dist
def test_sigkill_leaves_no_process_behind(qrm_data, tiny_flags, tmp_path):
    """A trainer saving every step has no child process at any sampled moment; SIGKILL of torchrun's launcher
    takes its ranks (and anything they forked) down within 10 s."""
    pytest.importorskip("psutil")
    rm = ["train-rm", "--train-data", qrm_data.pairs, "--tokenizer", qrm_data.tokenizer, *tiny_flags, *TRAIN,
          "--train-iters", "100000", "--save-interval", "1", "--keep-last", "2"]

    # one process: sample its children while it writes checkpoints
    save = tmp_path / "single"
    proc = subprocess.Popen([sys.executable, "-m", "megatron_qrm", *map(str, rm), "--save", str(save)], cwd=REPO,
                            env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    seen: set = set()
    try:
        _wait_for(lambda: os.path.exists(save / "latest") and _latest(save) >= "iter_0000008", proc, 300,
                  "8 checkpoints", watch=lambda: seen.update(_tree(proc.pid)))
        tree = _tree(proc.pid)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert not seen, f"the trainer started helper processes: {[p.name() for p in seen]}"
    time.sleep(10)
    assert not _alive(tree)

    # torchrun (2 ranks): kill the launcher only
    save = tmp_path / "torchrun"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), "-m", "megatron_qrm", *map(str, rm), "--micro-batch-size", "2",
           "--save", str(save)]
    proc = subprocess.Popen(cmd, cwd=REPO, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        _wait_for(lambda: os.path.exists(save / "latest"), proc, 400, "the first checkpoint")
        tree = _tree(proc.pid)
        assert len(tree) >= 2, tree  # the two ranks
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        time.sleep(10)
        left = _alive(tree)
    finally:
        for p in _alive(_tree(proc.pid)) + _alive(tree if "tree" in dir() else []):
            p.kill()
    assert not left, f"alive 10 s after the launcher was killed: {[(p.pid, p.name()) for p in left]}"


def test_metrics_hold_each_step_once_after_two_kills(qrm_data, tiny_flags, tmp_path):
    """Killed twice after logging steps past its last checkpoint, then resumed: each step once, with the
    losses of an uninterrupted run."""
    rm = ["train-rm", "--train-data", qrm_data.pairs, "--tokenizer", qrm_data.tokenizer, *tiny_flags, *TRAIN,
          "--save-interval", "3"]
    save = tmp_path / "killed"
    for past in (4, 8):  # kill once the log is past the checkpoint before it (3, then 6)
        proc = subprocess.Popen([sys.executable, "-m", "megatron_qrm", *map(str, rm), "--train-iters", "100000",
                                 "--load", str(save), "--save", str(save)], cwd=REPO, env=_env(),
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        try:
            _wait_for(lambda: os.path.exists(save / "metrics.jsonl") and max(_metrics(save), default=0) >= past,
                      proc, 300, f"step {past}")
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
    raw_steps = [json.loads(line)["step"] for line in (save / "metrics.jsonl").read_text().splitlines() if line]
    assert len(raw_steps) > len(set(raw_steps)) or max(raw_steps) > int(_latest(save)[5:])  # the attack happened
    done = subprocess.run([sys.executable, "-m", "megatron_qrm", *map(str, rm), "--train-iters", "10", "--load",
                           str(save), "--save", str(save)], cwd=REPO, env=_env(), capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    full = subprocess.run([sys.executable, "-m", "megatron_qrm", *map(str, rm), "--train-iters", "10", "--save",
                           str(tmp_path / "full")], cwd=REPO, env=_env(), capture_output=True, text=True, timeout=600)
    assert full.returncode == 0, full.stderr[-3000:]
    steps = [json.loads(line)["step"] for line in (save / "metrics.jsonl").read_text().splitlines() if line]
    assert steps == list(range(1, 11))
    resumed, reference = losses(save), losses(tmp_path / "full")
    assert resumed.keys() == reference.keys()
    assert all(abs(resumed[s] - reference[s]) <= 1e-6 for s in reference), (resumed, reference)


# ----------------------------------------------------------------------------------------------------
# RL
# ----------------------------------------------------------------------------------------------------


def test_rl_stops_before_any_update_on_nonfinite_rollout_tensors():
    """``RLTrainer._check_finite`` names the iteration and every non-finite tensor (single process)."""
    from types import SimpleNamespace

    import torch

    from megatron_qrm.errors import NonFiniteError
    from megatron_qrm.rl.trainer import RLTrainer

    fake = SimpleNamespace(state=SimpleNamespace(iteration=6))
    ok = {"logp_old": torch.zeros(2, 3), "credits": torch.ones(2, 3), "advantages": torch.ones(2, 3)}
    RLTrainer._check_finite(fake, ok)
    bad = dict(ok, credits=torch.tensor([[0.0, float("nan"), 1.0], [1.0, 1.0, 1.0]]),
               returns=torch.tensor([[float("inf")] * 3] * 2))
    with pytest.raises(NonFiniteError, match=r"iteration 7: non-finite credits, returns in the rollout"):
        RLTrainer._check_finite(fake, bad)


def test_reinforce_orm_reference_form_is_broadcast_reward_over_token_sigma():
    """--no-reward-centering with an ORM: R broadcast to the actions, divided by the population std over those
    tokens (2 + 1 actions: sigma of [1, 1, 4] = sqrt(2)), no mean subtracted; the default standardises over
    the 2 sequences instead: (R - 2.5) / 1.5."""
    import torch

    from megatron_qrm.rl import advantages as adv

    seq = torch.tensor([1.0, 4.0])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    reference = adv.orm_token_rewards(seq, mask, last_token_only=False, normalize=True)
    s = 2.0 ** 0.5
    assert torch.allclose(reference, torch.tensor([[1 / s, 1 / s, 0.0], [4 / s, 0.0, 0.0]]))
    standardised = adv.reinforce_returns_orm(seq, mask)
    assert torch.allclose(standardised, torch.tensor([[-1.0, -1.0, 0.0], [1.0, 0.0, 0.0]]))


@pytest.fixture(scope="module")
def rl_attacks(qrm_data, tiny_flags, tmp_path_factory):
    d = tmp_path_factory.mktemp("reliability_rl")
    rm = ["train-rm", "--train-data", qrm_data.pairs, "--tokenizer", qrm_data.tokenizer, *tiny_flags,
          "--micro-batch-size", "8", "--global-batch-size", "8", "--train-iters", "3", "--lr", "1e-3",
          "--no-tensorboard"]
    rl = ["--actor-checkpoint", d / "actor", "--reward-model", d / "qrm", "--prompt-data", qrm_data.pairs,
          "--seq-length", "64", "--max-new-tokens", "16", "--rollout-batch-size", "8", "--global-batch-size", "8",
          "--micro-batch-size", "4", "--forward-micro-batch-size", "4", "--no-tensorboard"]
    commands = [
        {"name": "actor", "argv": [*rm, "--reward-loss", "dpo", "--save", d / "actor"]},
        {"name": "qrm", "argv": [*rm, "--save", d / "qrm"]},
        {"name": "ppo_lr20", "argv": ["train-ppo", *rl, "--lr", "1e20", "--train-iters", "4", "--save", d / "ppo20"]},
        {"name": "reinforce_nan", "argv": ["train-reinforce", *rl, "--lr", "1e-3", "--train-iters", "3",
                                           "--max-nonfinite-steps", "1", "--save", d / "rf"],
         "env": {"QRM_FAULT_NONFINITE_STEPS": "2"}},
        {"name": "reinforce_resume", "argv": ["train-reinforce", *rl, "--lr", "1e-3", "--train-iters", "3",
                                              "--load", d / "rf", "--save", d / "rf"]},
    ]
    return {"dir": d, "results": run_cli_driver(d, commands)}


def test_ppo_huge_lr_stops_and_saves_nothing_diverged(rl_attacks, tmp_path):
    """`train-ppo --lr 1e20`: iteration 1's update ruins the actor (finite weights of ~1e20, whose products
    overflow); its checkpoint is refused (exit 3, issue 21) instead of becoming `latest`, and iteration 2 never
    samples from it (the old failure: torch's `probability tensor contains either inf, nan`). A non-finite
    rollout stopping before any update is test_rl_stops_before_any_update_on_nonfinite_rollout_tensors."""
    r = rl_attacks["results"]
    assert r["actor"]["rc"] == 0 and r["qrm"]["rc"] == 0
    assert r["ppo_lr20"]["rc"] == 3, r["ppo_lr20"]["stderr"][-3000:]
    line = _error_line(r["ppo_lr20"], "train-ppo")
    assert line.startswith("qrm train-ppo: error: iteration 1:") and "overflow float32" in line, line
    save = rl_attacks["dir"] / "ppo20" / "actor"
    assert not os.path.exists(save / "latest")
    assert not [p for p in os.listdir(save) if p.startswith("iter_")] if os.path.isdir(save) else True


def test_reinforce_nonfinite_step_stops_naming_the_iteration_and_resumes(rl_attacks):
    r = rl_attacks["results"]
    assert r["reinforce_nan"]["rc"] == 3, r["reinforce_nan"]["stderr"][-3000:]
    line = _error_line(r["reinforce_nan"], "train-reinforce")
    assert "iteration 2: actor loss or gradients not finite for 1 optimizer steps in a row since iteration 2" in line
    assert f"{rl_attacks['dir']}/rf/actor/iter_0000001" in r["reinforce_nan"]["stdout"]
    assert r["reinforce_resume"]["rc"] == 0, r["reinforce_resume"]["stderr"][-3000:]
    assert f"resumed from {rl_attacks['dir']}/rf/actor/iter_0000001 at iteration 1" in r["reinforce_resume"]["stdout"]
    assert _latest(rl_attacks["dir"] / "rf" / "actor") == "iter_0000003"
    assert sorted(_metrics(rl_attacks["dir"] / "rf")) == [1, 2, 3]


def test_checkpoint_size_estimate_and_free_space_preflight(attacks, monkeypatch):
    """The estimate matches the bytes of a real checkpoint (weights + fp32 parameter copy + Adam moments)
    within 10 %; a file system with less free space than that fails the pre-flight naming --save."""
    from megatron_qrm import checkpointing
    from megatron_qrm.config import ModelConfig

    ckpt = attacks["dir"] / "base" / "iter_0000006"
    with open(ckpt / "qrm_config.json") as f:
        model = ModelConfig.from_dict(json.load(f)["model"])
    on_disk = sum(os.path.getsize(os.path.join(d, n)) for d, _, names in os.walk(ckpt) for n in names)
    estimate = checkpointing.estimate_checkpoint_bytes(model, "reward")
    assert 0.9 <= estimate / on_disk <= 1.1, (estimate, on_disk)

    class Usage:
        free = estimate // 2

    monkeypatch.setattr(checkpointing.shutil, "disk_usage", lambda path: Usage)
    with pytest.raises(ValueError, match=r"--save .*: no space left on device for one checkpoint: needed ~.* GB, "
                                         r"free .* GB"):
        checkpointing.preflight_save_dir(str(attacks["dir"] / "roomless"), "--save", estimate)
    checkpointing.preflight_save_dir(str(attacks["dir"] / "roomy"), "--save", estimate // 4)
