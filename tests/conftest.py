"""Shared fixtures for the CLI-level tests (train-rm / eval-rm).

* ``qrm_data`` (session): a temporary folder with a small learnable preference set (``pairs.jsonl``,
  :func:`megatron_qrm.data.synthetic.parity_pairs`) and a SentencePiece tokenizer trained on it whose
  pieces cover every number 1..39 as a single token.
* ``tiny_flags`` (session): model-size flags of a tiny Llama-style model (2 layers, hidden 64, GQA) that
  trains in a few seconds on 2 CPU cores.
* ``qrm_batch``: run several ``qrm`` command lines in ONE Python process (or one torchrun launch),
  one after the other, through :func:`megatron_qrm.cli.main`. Importing torch + megatron-core costs
  ~7 s per process on 2 cores while a tiny run takes ~2 s, so tests that need many runs batch them.
  Each command line still goes through the real argument parser, parallel setup and teardown
  (``main`` destroys the process groups at exit). Tests whose subject is a fresh process (resuming
  after an exit or a kill, the exit status and stderr of a failing command) use real processes.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from helpers_tokenizers import make_sentencepiece_model  # noqa: E402
from launch import REPO, _run, torchrun  # noqa: E402

TINY_MODEL_FLAGS = [
    "--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4", "--num-query-groups", "2",
    "--ffn-hidden-size", "128", "--seq-length", "64",
]

# Runs command lines (a JSON list of argv lists, file argv[1]) through the CLI's main() in this one
# process; writes [{argv, rc, stdout, seconds}] to argv[2] (global rank 0). Stops at the first failure.
# An exception escaping main() (a bug: user errors are turned into an exit status) aborts the process
# with its traceback, so that a torchrun launch does not hang on the other rank.
_BATCH_DRIVER = r'''
import contextlib, io, json, os, sys, time, traceback
from megatron_qrm.cli import main

def run():
    with open(sys.argv[1]) as f:
        runs = json.load(f)
    if "RANK" in os.environ:
        # Under torchrun, a default process group re-created after destroy_process_group() finds the
        # previous one's keys in torchrun's store and hangs: keep it for the whole batch, re-creating
        # only the model-parallel groups between commands (parallel.initialize skips a live world).
        from megatron_qrm import parallel

        def keep_world():
            from megatron.core import parallel_state as ps

            if ps.model_parallel_is_initialized():
                ps.destroy_model_parallel()

        parallel.destroy = keep_world
    results = []
    for argv in runs:
        out, t0 = io.StringIO(), time.time()
        try:
            with contextlib.redirect_stdout(out):
                rc = main(argv)
        except SystemExit as e:  # argparse errors
            rc = e.code if isinstance(e.code, int) else 1
        except BaseException:
            sys.stdout.write(out.getvalue())
            print(f"qrm_batch: exception escaped main({argv!r})", file=sys.stderr)
            traceback.print_exc()
            sys.stderr.flush()
            os._exit(3)
        sys.stderr.write(f"qrm_batch: rc={rc} {time.time() - t0:.1f}s: qrm {' '.join(argv)}\n")
        results.append({"argv": argv, "rc": rc, "stdout": out.getvalue(), "seconds": time.time() - t0})
        if rc:
            break
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
    if int(os.environ.get("RANK", "0")) == 0:
        with open(sys.argv[2], "w") as f:
            json.dump(results, f)
    return 0 if all(r["rc"] == 0 for r in results) and len(results) == len(runs) else 1

if __name__ == "__main__":
    sys.exit(run())
'''


@dataclass
class QrmData:
    root: str  # the session folder
    pairs: str  # pairs.jsonl: parity_pairs(64, seed=0)
    tokenizer: str  # SentencePiece .model
    rows: list  # the records of pairs.jsonl


@pytest.fixture(scope="session")
def qrm_data(tmp_path_factory) -> QrmData:
    from megatron_qrm.data.synthetic import corpus, parity_pairs, sorting_pairs, write_jsonl

    root = tmp_path_factory.mktemp("qrm_data")
    rows = parity_pairs(64, seed=0)
    pairs = write_jsonl(str(root / "pairs.jsonl"), rows)
    # vocab 400: enough merges that every number 1..39 is one piece (with 300 most are two digits)
    texts = corpus(rows) + corpus(sorting_pairs(64, seed=0)) + [" ".join(map(str, range(1, 40)))] * 4
    tok = make_sentencepiece_model(root / "tok", texts, vocab_size=400)
    return QrmData(str(root), pairs, tok, rows)


@pytest.fixture(scope="session")
def tiny_flags() -> list[str]:
    return list(TINY_MODEL_FLAGS)


@pytest.fixture(scope="session")
def qrm_batch(tmp_path_factory):
    """``qrm_batch(runs, nproc=1, timeout=600) -> [{"argv", "rc", "stdout", "seconds"}, ...]``.

    ``runs``: a list of argv lists (without the leading ``qrm``). Raises with the captured output when a
    command fails or an exception escapes; ``check=False`` returns the results so far instead.
    """
    root = tmp_path_factory.mktemp("qrm_batch")
    driver = root / "qrm_batch_driver.py"
    driver.write_text(_BATCH_DRIVER)
    counter = iter(range(10**6))

    def run(runs: list[list[str]], nproc: int = 1, timeout: int = 600, check: bool = True) -> list[dict]:
        n = next(counter)
        runs_file, results_file = root / f"runs_{n}.json", root / f"results_{n}.json"
        runs_file.write_text(json.dumps([[str(a) for a in argv] for argv in runs]))
        args = [str(driver), str(runs_file), str(results_file)]
        if nproc == 1:
            proc = _run([sys.executable, *args], timeout, None, False, REPO)
        else:
            proc = torchrun(args, nproc=nproc, timeout=timeout, check=False)
        results = json.loads(results_file.read_text()) if results_file.exists() else []
        if check and (proc.returncode != 0 or len(results) != len(runs)):
            raise AssertionError(
                f"qrm_batch failed (exit {proc.returncode}, {len(results)}/{len(runs)} commands done)\n"
                f"--- stdout\n{proc.stdout[-4000:]}\n--- stderr\n{proc.stderr[-10000:]}")
        for r in results:
            r["stderr"] = proc.stderr  # shared by the whole batch
        return results

    return run


def last_json_line(stdout: str) -> dict:
    """The JSON object printed on the last non-empty line of ``stdout`` (eval-rm's result)."""
    lines = [line for line in stdout.splitlines() if line.strip()]
    assert lines, "no output"
    return json.loads(lines[-1])


def losses(save_dir: str) -> dict[int, float]:
    """``{step: train/loss}`` of a run's metrics.jsonl; a step logged twice (a killed run's steps
    after its last checkpoint, then the resumed run's) keeps the later record."""
    from megatron_qrm.training.metrics_log import read_metrics

    return {int(r["step"]): float(r["train/loss"]) for r in read_metrics(save_dir) if "train/loss" in r}
