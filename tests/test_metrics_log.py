"""Tests for megatron_qrm.training.metrics_log."""

from __future__ import annotations

import json
import math
import os
import sys
import warnings

import pytest
import torch

from megatron_qrm.training.metrics_log import METRICS_FILENAME, TENSORBOARD_SUBDIR, MetricsLogger, read_metrics


def _event_files(out_dir) -> list[str]:
    tb_dir = os.path.join(out_dir, TENSORBOARD_SUBDIR)
    if not os.path.isdir(tb_dir):
        return []
    return [f for f in os.listdir(tb_dir) if f.startswith("events.out.tfevents")]


def test_jsonl_written_and_parsable(tmp_path) -> None:
    logger = MetricsLogger(tmp_path, total_steps=10, progress=False)
    logger.log(1, {"loss": 0.5, "acc": torch.tensor(0.25), "tok/s": 1234.0})
    logger.log(2, {"loss": 0.25, "skipped": "not a number", "vec": torch.ones(3)}, prefix="eval")
    logger.log(3, {"loss": float("nan")})
    # flushed on every call: readable before close()
    raw = (tmp_path / METRICS_FILENAME).read_text().splitlines()
    assert len(raw) == 3
    for line in raw:
        json.loads(line)  # strict enough for the stdlib; NaN is written as null
        assert "NaN" not in line
    logger.close()
    logger.close()  # idempotent

    recs = read_metrics(tmp_path / METRICS_FILENAME)
    assert [r["step"] for r in recs] == [1, 2, 3]
    assert recs[0]["train/loss"] == 0.5 and recs[0]["train/acc"] == 0.25 and recs[0]["train/tok/s"] == 1234.0
    assert set(recs[1]) == {"step", "time", "eval/loss"}
    assert recs[2]["train/loss"] is None
    assert all(isinstance(r["time"], float) and r["time"] > 1e9 for r in recs)
    assert read_metrics(tmp_path) == recs  # directory path also accepted


def test_append_on_resume(tmp_path) -> None:
    first = MetricsLogger(tmp_path, progress=False)
    for step in range(1, 4):
        first.log(step, {"loss": 1.0 / step})
    first.close()
    second = MetricsLogger(tmp_path, start_step=3, total_steps=6, progress=False)
    for step in range(4, 7):
        second.log(step, {"loss": 1.0 / step})
    second.close()
    recs = read_metrics(tmp_path / METRICS_FILENAME)
    assert [r["step"] for r in recs] == [1, 2, 3, 4, 5, 6]
    assert recs[-1]["train/loss"] == pytest.approx(1 / 6)


def test_truncated_last_line_ignored_and_repaired_on_resume(tmp_path) -> None:
    logger = MetricsLogger(tmp_path, progress=False, tensorboard=False)
    logger.log(1, {"loss": 1.0})
    logger.log(2, {"loss": 0.5})
    logger.close()
    path = tmp_path / METRICS_FILENAME
    # simulate a kill in the middle of writing step 3
    with open(path, "a") as f:
        f.write('{"step": 3, "time": 1.0, "train/lo')
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a truncated *last* line must be silent
        recs = read_metrics(path)
    assert [r["step"] for r in recs] == [1, 2]

    # a resumed run must not glue its first record onto the fragment
    resumed = MetricsLogger(tmp_path, progress=False, tensorboard=False, start_step=2)
    resumed.log(3, {"loss": 0.25})
    resumed.close()
    recs = read_metrics(path)
    assert [r["step"] for r in recs] == [1, 2, 3]
    assert recs[-1]["train/loss"] == 0.25
    assert all(json.loads(line) for line in path.read_text().splitlines())


def test_complete_last_record_without_newline_is_kept(tmp_path) -> None:
    path = tmp_path / METRICS_FILENAME
    path.write_text('{"step": 1, "time": 1.0, "train/loss": 2.0}')
    assert [r["step"] for r in read_metrics(path)] == [1]
    logger = MetricsLogger(tmp_path, progress=False, tensorboard=False)
    logger.log(2, {"loss": 1.0})
    logger.close()
    assert [r["step"] for r in read_metrics(path)] == [1, 2]


def test_malformed_middle_line_skipped_with_warning(tmp_path) -> None:
    path = tmp_path / METRICS_FILENAME
    path.write_text('{"step": 1}\n{"step": 2, "tra\n{"step": 3}\n')
    with pytest.warns(UserWarning, match="malformed"):
        recs = read_metrics(path)
    assert [r["step"] for r in recs] == [1, 3]


def test_tensorboard_event_file_created(tmp_path) -> None:
    logger = MetricsLogger(tmp_path, progress=False)
    logger.log(1, {"loss": 0.5})
    logger.log(2, {"loss": 0.4}, prefix="eval")
    logger.close()
    files = _event_files(tmp_path)
    assert files, "no TensorBoard event file written"
    assert os.path.getsize(os.path.join(tmp_path, TENSORBOARD_SUBDIR, files[0])) > 0
    # the scalars are really in there
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(os.path.join(tmp_path, TENSORBOARD_SUBDIR))
    acc.Reload()
    tags = acc.Tags()["scalars"]
    assert "train/loss" in tags and "eval/loss" in tags
    (ev,) = acc.Scalars("train/loss")
    assert ev.step == 1 and math.isclose(ev.value, 0.5, rel_tol=1e-6)


def test_tensorboard_can_be_turned_off(tmp_path) -> None:
    logger = MetricsLogger(tmp_path, tensorboard=False, progress=False)
    logger.log(1, {"loss": 0.5})
    logger.close()
    assert not _event_files(tmp_path)
    assert (tmp_path / METRICS_FILENAME).exists()


def test_disabled_logger_writes_nothing(tmp_path, capsys) -> None:
    out = tmp_path / "run"
    logger = MetricsLogger(out, enabled=False, wandb_project="proj", run_config={"a": 1}, total_steps=5)
    logger.log(1, {"loss": 0.5})
    logger.message("hello from rank 1")
    logger.close()
    assert not out.exists()
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == ""


def test_no_out_dir_still_runs(tmp_path, capsys) -> None:
    logger = MetricsLogger(None, total_steps=3)
    logger.log(1, {"loss": 0.5, "acc": 0.5})
    logger.message("note")
    logger.close()
    assert list(tmp_path.iterdir()) == []
    assert "note" in capsys.readouterr().out


def test_progress_bar_position_and_postfix(tmp_path) -> None:
    logger = MetricsLogger(tmp_path, tensorboard=False, total_steps=10, start_step=4, desc="qrm")
    assert logger._bar is not None and logger._bar.n == 4 and logger._bar.total == 10
    logger.log(5, {"loss": 0.123456, "acc": 0.5, "tok/s": 12345.6, "lr": 1e-5})
    assert logger._bar.n == 5
    logger.log(5, {"loss": 0.9, "acc": 0.75}, prefix="eval")  # same step: no advance
    assert logger._bar.n == 5
    postfix = logger._bar.postfix
    assert "loss=0.1235" in postfix and "acc=0.5" in postfix and "tok/s=1.235e+04" in postfix
    assert "eval_loss=0.9" in postfix and "lr" not in postfix
    logger.close()


def test_run_config_written(tmp_path) -> None:
    logger = MetricsLogger(tmp_path, tensorboard=False, progress=False, run_config={"lr": 1e-5, "beta": 0.2})
    logger.open()
    logger.close()
    assert json.loads((tmp_path / "run_config.json").read_text()) == {"beta": 0.2, "lr": 1e-5}


def test_nothing_touched_before_the_first_log(tmp_path) -> None:
    """A start that fails its checks after creating the logger leaves the earlier run's files as they were."""
    (tmp_path / "run_config.json").write_text('{"lr": 1}')
    (tmp_path / METRICS_FILENAME).write_text('{"step": 1, "time": 1.0}\n{"step": 2, "time": 2.0}\n')
    logger = MetricsLogger(tmp_path, progress=False, run_config={"lr": 2}, start_step=1, supersede_after_start=True)
    logger.close()
    assert (tmp_path / "run_config.json").read_text() == '{"lr": 1}'
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2]
    assert not (tmp_path / "tensorboard").exists()


def test_resumed_run_supersedes_steps_after_its_checkpoint(tmp_path) -> None:
    """Two killed attempts logged steps 1-5 and 4-6 past checkpoint 3; the resume from 3 keeps each step once."""
    path = tmp_path / METRICS_FILENAME
    path.write_text("".join(f'{{"step": {s}, "time": 0, "train/loss": {s}}}\n' for s in (1, 2, 3, 4, 5, 4, 5, 6)))
    logger = MetricsLogger(tmp_path, progress=False, tensorboard=False, start_step=3, supersede_after_start=True)
    for s in (4, 5, 6, 7):
        logger.log(s, {"loss": 10 * s})
    logger.close()
    records = read_metrics(tmp_path)
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6, 7]
    assert [r["train/loss"] for r in records] == [1, 2, 3, 40, 50, 60, 70]


def test_wandb_missing_warns_once_and_continues(tmp_path, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "wandb", None)  # makes `import wandb` raise ImportError
    with pytest.warns(UserWarning, match="wandb") as record:
        logger = MetricsLogger(tmp_path, tensorboard=False, progress=False, wandb_project="proj")
        logger.log(1, {"loss": 0.5})
        logger.log(2, {"loss": 0.4})
        logger.close()
    assert sum("wandb" in str(w.message) for w in record) == 1
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2]


def test_wandb_used_when_importable(tmp_path, monkeypatch) -> None:
    calls: list[tuple] = []

    class FakeRun:
        def log(self, data, step=None):
            calls.append(("log", dict(data), step))

        def finish(self):
            calls.append(("finish",))

    class FakeWandb:
        @staticmethod
        def init(**kwargs):
            calls.append(("init", kwargs))
            return FakeRun()

    monkeypatch.setitem(sys.modules, "wandb", FakeWandb)
    logger = MetricsLogger(
        tmp_path, tensorboard=False, progress=False, wandb_project="proj", wandb_run_name="r1",
        run_config={"beta": 0.2},
    )
    logger.log(7, {"loss": 0.5})
    logger.close()
    assert calls[0][0] == "init"
    assert calls[0][1]["project"] == "proj" and calls[0][1]["name"] == "r1"
    assert calls[0][1]["config"] == {"beta": 0.2}
    assert calls[1] == ("log", {"train/loss": 0.5}, 7)
    assert calls[2] == ("finish",)
