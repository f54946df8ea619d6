"""Fail loud, round 2 (issue 21): each attack on a tiny reward model (CPU, gloo, fp32), written as a user
would try it. ``qrm serve``'s two rows (a stalled client at SIGTERM, a client that disconnects mid-body) are in
tests/test_serve.py, beside the server fixtures.

* ``--lr 1e20 --save-interval 1``: nothing is saved whose outputs are not finite; ``eval-rm`` on a checkpoint
  whose scores are not finite (finite weights of ~1e20) says so and exits 3, writing no result file;
* the same command rerun after a kill -9 (``--save DIR``, no ``--load``) resumes from ``DIR/latest`` with a
  one-line message: each step logged once, the checkpoints of the first attempt kept;
* ``-tp 3`` / ``-pp 3`` with a world size they do not divide: one line naming the flags and the world size,
  exit 2, from rank 0 only (one process, and torchrun with 3 ranks);
* numeric flags: zero / negative / non-finite values refused naming the flag (``--seq-length 0``), for every
  numeric flag of every subcommand (each has a rule in ``arguments.NUMERIC_FLAG_RULES``);
* ``eval-rm --output`` on a full disk (a 64 KiB tmpfs filled up; an ENOSPC injection where mounting is not
  allowed): the metrics printed first, the failure named in one line, no empty file left;
* a byte-identical tokenizer copy under another file name is the same tokenizer (and a checkpoint written
  with the older, name-including fingerprint still loads);
* resume with another ``--lr``: one line says which value wins (``--override-opt-param-scheduler`` /
  ``--use-checkpoint-opt-param-scheduler``, Megatron's convention);
* a blank line in a ``.jsonl`` is skipped and counted with the other skips;
* ``qrm``: a user error is one line (exit 2); any other exception (a bug) keeps its traceback.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest
from conftest import losses
from launch import REPO, _env, run_cli_driver, torchrun

TRAIN = ["--micro-batch-size", "4", "--global-batch-size", "4", "--no-tensorboard"]

# Commands run in one process through launch.run_cli_driver (tests/workers/cli_driver.py lists its fault patches).


def _error_lines(result: dict, command: str) -> list[str]:
    return [ln for ln in result["stderr"].splitlines() if ln.startswith(f"qrm {command}: error: ")]


def _error_line(result: dict, command: str) -> str:
    lines = _error_lines(result, command)
    assert len(lines) == 1, result["stderr"][-3000:]
    assert "Traceback" not in result["stderr"], result["stderr"][-3000:]
    return lines[0]


def _metrics(path) -> dict[int, dict]:
    from megatron_qrm.training.metrics_log import read_metrics

    return {int(r["step"]): r for r in read_metrics(str(path))}


def _legacy_fingerprint(path: str) -> str:
    """The tokenizer fingerprint of older versions: the file's name, a NUL, then its bytes."""
    h = hashlib.sha256(os.path.basename(path).encode() + b"\0")
    with open(path, "rb") as f:
        h.update(f.read())
    return h.hexdigest()[:16]


@pytest.fixture(scope="module")
def full_disk(tmp_path_factory):
    """(directory, patch): a 64 KiB tmpfs filled to the last byte (root, Linux), else a plain directory and
    the driver's ENOSPC injection for files opened under it."""
    d = tmp_path_factory.mktemp("full_disk")
    mounted = (shutil.which("mount") is not None and not os.environ.get("QRM_TEST_NO_MOUNT")  # 1: the injection
               and subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(d)],
                                  capture_output=True).returncode == 0)
    if mounted:
        try:  # fill it: every further byte fails with ENOSPC (tmpfs allocates whole pages)
            fd = os.open(d / "filler", os.O_WRONLY | os.O_CREAT)
            try:
                while os.write(fd, b"\0" * 4096):
                    pass
            except OSError:
                pass
            os.close(fd)
            fd = os.open(d / "probe", os.O_WRONLY | os.O_CREAT)
            try:
                os.write(fd, b"x")
                filled = False
            except OSError:
                filled = True
            os.close(fd)
            os.unlink(d / "probe")
            assert filled, "could not fill the tmpfs"
        except BaseException:
            subprocess.run(["umount", "-l", str(d)], check=False)
            raise
    yield d, (None if mounted else f"enospc_under={d}")
    if mounted:
        subprocess.run(["umount", "-l", str(d)], check=False)


@pytest.fixture(scope="module")
def attacks(qrm_data, tiny_flags, tmp_path_factory, full_disk):
    d = tmp_path_factory.mktemp("round2")
    rm = ["train-rm", "--train-data", qrm_data.pairs, "--tokenizer", qrm_data.tokenizer, *tiny_flags, *TRAIN]
    B = d / "base"
    tok_copy = d / "same_bytes_other_name.model"
    shutil.copyfile(qrm_data.tokenizer, tok_copy)
    full_dir, full_patch = full_disk
    commands = [
        {"name": "base", "argv": [*rm, "--train-iters", "2", "--save", B]},
        # row 1: --lr 1e20 saves nothing; eval-rm on finite weights whose scores are NaN fails loud
        {"name": "lr_1e20", "argv": [*rm, "--lr", "1e20", "--train-iters", "12", "--save-interval", "1",
                                     "--save", d / "lr20"]},
        {"name": "huge_refused", "argv": [*rm, "--train-iters", "1", "--save", d / "huge_refused"],
         "patch": "scale_weights_at_save=1e20"},
        {"name": "huge_weights", "argv": [*rm, "--train-iters", "1", "--save", d / "huge"],
         "patch": "scale_weights_at_save_unchecked=1e20"},
        {"name": "eval_nan", "argv": ["eval-rm", "--load", d / "huge", "--data", qrm_data.pairs,
                                      "--output", d / "nan_eval.json"]},
        # row 5: layouts the world size cannot take
        {"name": "tp3", "argv": [*rm, "--train-iters", "1", "-tp", "3"]},
        {"name": "pp3", "argv": [*rm, "--train-iters", "1", "--pipeline-model-parallel-size", "3"]},
        # row 6: numeric flags
        {"name": "seq0", "argv": [*rm, "--train-iters", "1", "--seq-length", "0"]},
        {"name": "save_interval0", "argv": [*rm, "--train-iters", "1", "--save-interval", "0", "--save", d / "x"]},
        {"name": "lr_inf", "argv": [*rm, "--train-iters", "1", "--lr", "inf"]},
        {"name": "eval_mbs_neg", "argv": ["eval-rm", "--load", B, "--data", qrm_data.pairs,
                                          "--micro-batch-size", "-1"]},
        {"name": "serve_wait_nan", "argv": ["serve", "--load", B, "--max-wait-ms", "nan"]},
        # row 7: eval-rm's result onto a full disk
        {"name": "eval_full", "argv": ["eval-rm", "--load", B, "--data", qrm_data.pairs,
                                       "--output", full_dir / "result.json"], "patch": full_patch},
        # row 8: the same tokenizer bytes under another name
        {"name": "tok_copy", "argv": [*rm, "--tokenizer", tok_copy, "--train-iters", "3", "--load", B,
                                      "--save", d / "tok_copy"]},
        {"name": "eval_tok_copy", "argv": ["eval-rm", "--load", B, "--data", qrm_data.pairs, "--tokenizer", tok_copy,
                                           "--output", d / "tok_copy.json"]},
        # row 9: resume with another --lr
        {"name": "lr_default", "argv": [*rm, "--lr", "1e-3", "--train-iters", "3", "--load", B,
                                        "--save", d / "lr_default"]},
        {"name": "lr_override", "argv": [*rm, "--lr", "1e-3", "--train-iters", "3", "--load", B,
                                         "--save", d / "lr_override", "--override-opt-param-scheduler"]},
        {"name": "lr_checkpoint", "argv": [*rm, "--lr", "1e-3", "--train-iters", "3", "--load", B,
                                           "--save", d / "lr_checkpoint", "--use-checkpoint-opt_param-scheduler"]},
        {"name": "lr_both", "argv": [*rm, "--lr", "1e-3", "--train-iters", "3", "--load", B,
                                     "--override-opt-param-scheduler", "--use-checkpoint-opt-param-scheduler"]},
        # cli: a bug keeps its traceback
        {"name": "internal_bug", "argv": [*rm, "--train-iters", "1"], "patch": "internal_bug"},
    ]
    results = run_cli_driver(d, commands)
    return {"dir": d, "results": results, "full_dir": full_dir, "tok_copy": tok_copy}


# ------------------------------------------------------------------------------------------- row 1
def test_huge_lr_saves_nothing_whose_outputs_are_not_finite(attacks):
    r = attacks["results"]["lr_1e20"]
    assert r["rc"] == 3, r["stderr"][-3000:]
    _error_line(r, "train-rm")
    save = attacks["dir"] / "lr20"
    # iteration 1's update took the weights to ~1e20: finite, but every output is NaN -> never saved
    assert not os.path.exists(save / "latest"), open(save / "latest").read()
    assert not [p for p in os.listdir(save) if p.startswith("iter_")], os.listdir(save)
    assert "iteration 1: not saving" in r["stdout"] + r["stderr"] and "probe batch" in r["stdout"] + r["stderr"]


def test_save_refuses_weights_whose_products_overflow(attacks):
    """The last line of defence, in checkpointing.save_checkpoint (every trainer, RL included): finite weights
    of ~1e20 are not written."""
    r = attacks["results"]["huge_refused"]
    assert r["rc"] == 3, r["stderr"][-3000:]
    assert "overflow float32" in _error_line(r, "train-rm")
    assert not [p for p in os.listdir(attacks["dir"] / "huge_refused") if p.startswith("iter_")]


def test_eval_with_nonfinite_scores_says_so_and_exits_nonzero(attacks):
    assert attacks["results"]["huge_weights"]["rc"] == 0, attacks["results"]["huge_weights"]["stderr"][-3000:]
    r = attacks["results"]["eval_nan"]
    assert r["rc"] == 3, (r["rc"], r["stdout"][-2000:], r["stderr"][-3000:])
    line = _error_line(r, "eval-rm")
    assert "not finite" in line and "64 of 64 pairs" in line and "huge" in line, line
    assert not os.path.exists(attacks["dir"] / "nan_eval.json")
    printed = json.loads(r["stdout"].strip().splitlines()[-1])  # the metrics are still shown
    assert printed["nonfinite_pairs"] == 64


# ------------------------------------------------------------------------------------------- row 5
@pytest.mark.parametrize("name,flag", [("tp3", "--tensor-model-parallel-size 3"),
                                       ("pp3", "--pipeline-model-parallel-size 3")])
def test_layout_the_world_size_cannot_take_is_one_line(attacks, name, flag):
    r = attacks["results"][name]
    assert r["rc"] == 2, r["stderr"][-3000:]
    line = _error_line(r, "train-rm")
    assert flag in line and "world size 1" in line, line


@pytest.mark.dist
def test_layout_under_torchrun_is_one_line_from_rank0(qrm_data, tiny_flags, tmp_path):
    """``-tp 3`` under torchrun with 3 ranks (the tiny model's 4 heads cannot be split 3 ways) and ``-tp 2``
    (3 ranks cannot be split into groups of 2): one error line, from rank 0, no rank dying in a collective."""
    base = ["-m", "megatron_qrm", "train-rm", "--train-data", qrm_data.pairs, "--tokenizer", qrm_data.tokenizer,
            *tiny_flags, *TRAIN, "--train-iters", "1"]
    for flags, expect in ((["-tp", "3"], "attention heads (4)"), (["-tp", "2"], "world size 3")):
        proc = torchrun([*base, *flags], nproc=3, timeout=300, check=False, cwd=str(tmp_path))
        out = proc.stdout + proc.stderr
        lines = [ln for ln in out.splitlines() if "qrm train-rm: error: " in ln]
        assert len(lines) == 1, out[-6000:]
        assert f"--tensor-model-parallel-size {flags[1]}" in lines[0] and expect in lines[0], lines[0]
        assert proc.returncode != 0
        assert "gloo" not in out.lower(), out[-6000:]  # no rank died in a collective
        assert not re.search(r'File "[^"]*megatron_qrm', out), out[-6000:]
        assert re.search(r"exitcode\s*:\s*2", out), out[-3000:]  # every rank exited with the user-error status


# ------------------------------------------------------------------------------------------- row 6
@pytest.mark.parametrize("name,command,expect", [
    ("seq0", "train-rm", "--seq-length 0: must be"),
    ("save_interval0", "train-rm", "--save-interval 0: must be"),
    ("lr_inf", "train-rm", "--lr inf: must be a finite number"),
    ("eval_mbs_neg", "eval-rm", "--micro-batch-size -1: must be"),
    ("serve_wait_nan", "serve", "--max-wait-ms nan: must be a finite number"),
])
def test_meaningless_numbers_are_refused_naming_the_flag(attacks, name, command, expect):
    r = attacks["results"][name]
    assert r["rc"] == 2, r["stderr"][-3000:]
    assert expect in _error_line(r, command)
    assert "model: role=" not in r["stdout"] + r["stderr"]  # refused before any model was built


def test_every_numeric_flag_has_a_rule():
    """The mechanism is general: each int/float flag of every subcommand is covered by the table (or is
    explicitly any-value), so a new flag cannot slip through unchecked."""
    import argparse

    from megatron_qrm.arguments import NUMERIC_FLAG_RULES
    from megatron_qrm.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    missing = set()
    for name, p in sub.choices.items():
        for a in p._actions:
            if a.option_strings and a.type in (int, float) and a.dest not in NUMERIC_FLAG_RULES:
                missing.add(f"{name} {a.option_strings[0]}")
    assert not missing, sorted(missing)


def test_numeric_rules_against_hand_cases():
    import argparse

    from megatron_qrm.arguments import check_numeric_flags
    from megatron_qrm.errors import UserError

    def check(**kw):
        check_numeric_flags(argparse.Namespace(**kw))

    check(seq_length=1, lr=0.0, lora_rank=0, seed=0, max_pairs=None, clip_grad=0.0, adam_beta1=0.0)
    for bad in (dict(seq_length=0), dict(seq_length=-3), dict(lr=float("nan")), dict(lr=-1e-5),
                dict(lora_rank=-1), dict(adam_beta1=1.0), dict(max_pairs=0), dict(norm_epsilon=0.0),
                dict(rotary_base=float("inf")), dict(port=70000)):
        with pytest.raises(UserError, match="^--"):
            check(**bad)


# ------------------------------------------------------------------------------------------- row 7
def test_eval_on_a_full_disk_prints_metrics_names_the_failure_and_leaves_no_file(attacks):
    r = attacks["results"]["eval_full"]
    assert r["rc"] == 3, (r["rc"], r["stderr"][-3000:])
    line = _error_line(r, "eval-rm")
    target = str(attacks["full_dir"] / "result.json")
    assert target in line and "no space left on device" in line.lower(), line
    printed = json.loads(r["stdout"].strip().splitlines()[-1])
    assert 0.0 <= printed["pairwise_accuracy"] <= 1.0 and printed["pairs"] == 64
    assert sorted(os.listdir(attacks["full_dir"])) in (["filler"], []), os.listdir(attacks["full_dir"])


# ------------------------------------------------------------------------------------------- row 8
def test_same_tokenizer_bytes_under_another_name_is_the_same_tokenizer(attacks):
    for name in ("tok_copy", "eval_tok_copy"):
        r = attacks["results"][name]
        assert r["rc"] == 0, (name, r["stderr"][-3000:])


def test_checkpoint_with_the_older_fingerprint_still_loads(attacks, qrm_data):
    from megatron_qrm.data import load_tokenizer
    from megatron_qrm.data.tokenizer import TokenizerMismatchError, check_tokenizer_identity

    cfg = json.loads((attacks["dir"] / "base" / "iter_0000002" / "qrm_config.json").read_text())
    tok = load_tokenizer(qrm_data.tokenizer)
    legacy = dict(cfg, tokenizer_identity=dict(cfg["tokenizer_identity"],
                                               fingerprint=_legacy_fingerprint(qrm_data.tokenizer)))
    assert legacy["tokenizer_identity"]["fingerprint"] != cfg["tokenizer_identity"]["fingerprint"]
    assert check_tokenizer_identity(legacy, tok, qrm_data.tokenizer, checkpoint="old") is None
    # another tokenizer is still refused against a legacy record
    other = dict(legacy, tokenizer_identity=dict(legacy["tokenizer_identity"], fingerprint="0" * 16))
    with pytest.raises(TokenizerMismatchError):
        check_tokenizer_identity(other, tok, qrm_data.tokenizer, checkpoint="old")


# ------------------------------------------------------------------------------------------- row 9
def test_resume_with_another_lr_says_which_value_wins(attacks):
    r = attacks["results"]
    d = attacks["dir"]
    for name in ("lr_default", "lr_override", "lr_checkpoint"):
        assert r[name]["rc"] == 0, (name, r[name]["stderr"][-3000:])

    def said(name):
        text = r[name]["stdout"] + r[name]["stderr"]
        found = [ln for ln in text.splitlines() if "learning rate" in ln and "checkpoint" in ln and "--lr" in ln]
        assert len(found) == 1, (name, text[-3000:])
        return found[0]

    assert "kept" in said("lr_default") and "--override-opt-param-scheduler" in said("lr_default")
    assert "--override-opt-param-scheduler" in said("lr_override") and "0.001" in said("lr_override")
    assert "--use-checkpoint-opt-param-scheduler" in said("lr_checkpoint")
    # and the value said is the value used (step 3 is the resumed run's first step)
    assert _metrics(d / "lr_default")[3]["train/lr"] == pytest.approx(1e-5)
    assert _metrics(d / "lr_checkpoint")[3]["train/lr"] == pytest.approx(1e-5)
    assert _metrics(d / "lr_override")[3]["train/lr"] == pytest.approx(1e-3)
    assert r["lr_both"]["rc"] == 2
    assert "--override-opt-param-scheduler" in _error_line(r["lr_both"], "train-rm")


# ------------------------------------------------------------------------------------------- row 10
def test_blank_lines_are_skipped_and_counted(qrm_data, tmp_path, caplog):
    from megatron_qrm.data import PreferenceDataConfig, PreferenceDataset, load_tokenizer

    rows = [json.dumps(r) for r in qrm_data.rows[:6]]
    path = tmp_path / "blank.jsonl"
    path.write_text("\n".join(rows[:3]) + "\n\n   \n" + "\n".join(rows[3:]) + "\n")
    ds = PreferenceDataset(PreferenceDataConfig(path=str(path), seq_length=64), load_tokenizer(qrm_data.tokenizer))
    assert len(ds) == 6 and ds.stats["records"] == 6
    assert ds.stats["skipped_blank_lines"] == 2, ds.stats
    assert ds.locations[3] == f"{path}:6"  # line numbers still count the blank lines


# ------------------------------------------------------------------------------------------- cli
def test_a_bug_keeps_its_traceback_a_user_error_is_one_line(attacks):
    r = attacks["results"]["internal_bug"]
    assert r["rc"] == "exception", r  # escaped main(): the driver printed its traceback
    assert "Traceback" in r["stderr"] and "an internal invariant broke" in r["stderr"]
    assert not _error_lines(r, "train-rm")
    from megatron_qrm.data.sources import DataError
    from megatron_qrm.data.tokenizer import TokenizerMismatchError
    from megatron_qrm.errors import UserError

    assert issubclass(DataError, UserError) and issubclass(TokenizerMismatchError, UserError)
    assert issubclass(UserError, ValueError)  # callers that catch ValueError keep working


# ------------------------------------------------------------------------------------------- row 2
def test_rerun_of_the_same_command_resumes_from_latest(qrm_data, tiny_flags, tmp_path):
    """kill -9, then the identical command line (``--save DIR``, no ``--load``), as a requeued SLURM job
    runs it: it resumes from DIR/latest saying so in one line; the first attempt's checkpoints are kept,
    each step is logged once and the losses are an uninterrupted run's."""
    save = tmp_path / "requeued"
    cmd = [sys.executable, "-m", "megatron_qrm", "train-rm", "--train-data", qrm_data.pairs, "--tokenizer",
           qrm_data.tokenizer, *tiny_flags, *TRAIN, "--train-iters", "30", "--save-interval", "3", "--save", str(save)]
    cmd = [str(c) for c in cmd]
    proc = subprocess.Popen(cmd, cwd=REPO, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        deadline = time.time() + 300
        while not (os.path.exists(save / "metrics.jsonl") and max(_metrics(save), default=0) >= 4):
            assert proc.poll() is None, "the run ended before it could be killed"
            assert time.time() < deadline, "no step 4 in 300 s"
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(30)
    first = sorted(p for p in os.listdir(save) if p.startswith("iter_") and not p.endswith(".tmp"))
    assert first and max(_metrics(save)) < 30, "the attack did not happen"
    kept = {p: os.stat(save / p / "qrm_config.json").st_mtime_ns for p in first}
    latest = (save / "latest").read_text().strip()
    done = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    said = [ln for ln in (done.stdout + done.stderr).splitlines() if "resuming from" in ln]
    assert len(said) == 1 and f"{save}/{latest}" in said[0] and "--save" in said[0], said
    for p, mtime in kept.items():  # the first attempt's checkpoints were not rewritten
        assert os.stat(save / p / "qrm_config.json").st_mtime_ns == mtime, p
    steps = [json.loads(line)["step"] for line in (save / "metrics.jsonl").read_text().splitlines() if line]
    assert steps == list(range(1, 31)), steps
    full = subprocess.run([*cmd[:-1], str(tmp_path / "full")], cwd=REPO, env=_env(), capture_output=True, text=True,
                          timeout=600)
    assert full.returncode == 0, full.stderr[-3000:]
    resumed, reference = losses(save), losses(tmp_path / "full")
    assert resumed.keys() == reference.keys()
    assert all(abs(resumed[s] - reference[s]) <= 1e-6 for s in reference), (resumed, reference)


def test_slurm_examples_rely_on_rerun_resuming():
    """The requeue path of examples/slurm: each attempt runs examples/run_qrm_70b.sh, whose train-rm and
    train-ppo command lines carry --save and no --load (a requeued attempt is the rerun tested above)."""
    script = open(os.path.join(REPO, "examples", "run_qrm_70b.sh")).read()
    for command in ("train-rm", "train-ppo"):
        start = script.index(f"-m megatron_qrm {command} ")
        end = start
        while script[end:script.index("\n", end)].rstrip().endswith("\\"):  # continued lines
            end = script.index("\n", end) + 1
        line = script[start:script.index("\n", end)]
        assert "--save " in line and "--load " not in line, (command, line)
    for sbatch in ("qrm_rm.sbatch", "qrm_ppo.sbatch"):
        text = open(os.path.join(REPO, "examples", "slurm", sbatch)).read()
        assert "run_qrm_70b.sh" in text and "docs/reliability.md" in text, sbatch
