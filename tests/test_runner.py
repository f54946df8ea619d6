"""The supervised runner (:mod:`megatron_qrm.training.runner`) with a task plugged in through its interface:
the hooks run in the documented order, and a run stopped at ``exit_interval`` and resumed gives the metrics of
an uninterrupted run (train-sft's task; train-rm's exact resume is in test_train_rm.py). One subprocess, three
tiny runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from launch import REPO, _env  # noqa: E402

_SCRIPT = r"""
import json, sys
from megatron_qrm import parallel
from megatron_qrm.config import ModelConfig
from megatron_qrm.data.sft import SFTDataConfig
from megatron_qrm.training.engine import OptimConfig
from megatron_qrm.training.runner import run_supervised
from megatron_qrm.training.sft_trainer import SFTTask, SFTTrainConfig

pairs, tok, out = sys.argv[1:4]
HOOKS = ["check_resume", "build_dataset", "check_capacity", "configure", "prepare", "checkpoint_record",
         "microbatch", "summarize"]


class Recording(SFTTask):
    def __init__(self):
        super().__init__()
        self.calls = []


def recorder(name):
    def hook(self, *args, **kwargs):
        if name == "prepare":
            self.calls.append(["prepare", args[2]])  # (cfg, ddp, resume_dir, ...)
        elif not self.calls or self.calls[-1][0] != name:
            self.calls.append([name])
        return getattr(SFTTask, name)(self, *args, **kwargs)
    return hook


for name in HOOKS:
    setattr(Recording, name, recorder(name))


def run(save, load=None, exit_interval=None):
    cfg = SFTTrainConfig(
        model=ModelConfig(num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2,
                          ffn_hidden_size=128),
        tokenizer=tok, data=SFTDataConfig(path=pairs, response_field="chosen", seq_length=64),
        optim=OptimConfig(lr=1e-3), train_iters=4, global_batch_size=4, micro_batch_size=2, save=save, load=load,
        exit_interval=exit_interval, tensorboard=False)
    task = Recording()
    try:
        run_supervised(cfg, task)
    finally:
        parallel.destroy()
    return task.calls


result = {"full": run(f"{out}/full"), "first": run(f"{out}/part", exit_interval=2),
          "second": run(f"{out}/part", load=f"{out}/part")}
print(json.dumps(result))
"""


def _metrics(path) -> list[dict]:
    rows = [json.loads(line) for line in open(os.path.join(path, "metrics.jsonl"))]
    return [{k: v for k, v in r.items() if k not in ("time", "train/tokens_per_s", "train/step_time_s")}
            for r in rows]


def test_runner_hook_order_and_exact_resume(qrm_data, tmp_path):
    proc = subprocess.run([sys.executable, "-c", _SCRIPT, qrm_data.pairs, qrm_data.tokenizer, str(tmp_path)],
                          capture_output=True, text=True, cwd=REPO, env=_env(), timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    calls = json.loads(proc.stdout.strip().splitlines()[-1])
    setup = [["check_resume"], ["build_dataset"], ["check_capacity"], ["configure"]]
    loop = [["microbatch"], ["summarize"]]
    assert calls["full"] == setup + [["prepare", None], ["checkpoint_record"]] + loop * 4
    assert calls["first"] == setup + [["prepare", None], ["checkpoint_record"]] + loop * 2
    resumed_from = os.path.join(str(tmp_path), "part", "iter_0000002")
    assert calls["second"] == setup + [["prepare", resumed_from], ["checkpoint_record"]] + loop * 2
    full, part = _metrics(tmp_path / "full"), _metrics(tmp_path / "part")
    assert [r["step"] for r in part] == [1, 2, 3, 4]
    assert part == full
