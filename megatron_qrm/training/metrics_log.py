"""Metrics logging hub shared by all trainers: JSONL file, TensorBoard, optional wandb, tqdm bar.

Only rank 0 does I/O. Other ranks construct the logger with ``enabled=False`` and get an instance whose
methods are no-ops, so trainer code can call ``logger.log(...)`` unconditionally::

    logger = MetricsLogger(out_dir, enabled=(rank == 0), total_steps=n_steps, start_step=resumed_step)
    ...
    logger.log(step, {"loss": 0.41, "acc": 0.75, "tok/s": 1.2e4})
    logger.close()

``OUT_DIR/metrics.jsonl`` holds one JSON object per :meth:`MetricsLogger.log` call and is flushed after
every line, so a killed run leaves a readable file and a resumed run appends to it. Use
:func:`read_metrics` to load it.

Nothing is created or changed on disk until the first :meth:`MetricsLogger.log` (or :meth:`open`): a
start that fails its checks (bad flag, tokenizer mismatch, unwritable ``--save``) leaves an earlier run's
``metrics.jsonl`` and ``run_config.json`` as they were. With ``supersede_after_start`` (the trainers), records
of steps after ``start_step`` (logged by an attempt that was killed after its last checkpoint) are dropped
when the files are opened, so after any number of kills and resumes the file holds each step once.
"""

from __future__ import annotations

import json
import math
import os
import time
import warnings
from numbers import Number
from typing import Any

from tqdm import tqdm

__all__ = ["METRICS_FILENAME", "TENSORBOARD_SUBDIR", "MetricsLogger", "read_metrics"]

#: Name of the JSON-lines metrics file inside ``out_dir``.
METRICS_FILENAME = "metrics.jsonl"
#: TensorBoard event files are written to ``out_dir/TENSORBOARD_SUBDIR``.
TENSORBOARD_SUBDIR = "tensorboard"

# metric-name suffixes shown in the progress-bar postfix, in display order: (postfix label, accepted keys)
_POSTFIX_KEYS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("loss", ("loss",)),
    ("acc", ("acc", "accuracy")),
    ("tok/s", ("tok/s", "tokens_per_s", "tokens_per_sec", "tok_per_s")),
)


def _to_float(value: Any) -> float | None:
    """Converts a Python/numpy/torch scalar to ``float``; ``None`` if it is not a scalar number."""
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, Number):
        return float(value)
    # torch / numpy scalars without importing either: both expose .item() on 1-element values
    item = getattr(value, "item", None)
    if callable(item):
        try:
            out = item()
        except (ValueError, RuntimeError):  # multi-element tensor / array
            return None
        return float(out) if isinstance(out, Number) else None
    return None


def _fmt(value: float) -> str:
    """Compact number for the progress bar (4 significant digits)."""
    if not math.isfinite(value):
        return str(value)
    if value != 0 and (abs(value) >= 1e5 or abs(value) < 1e-3):
        return f"{value:.3g}"
    return f"{value:.4g}"


def _repair_trailing_line(path: str) -> None:
    """Makes an existing JSONL file safe to append to after a crash.

    A run killed mid-write can leave a last line without its newline. Appending straight after it
    would glue the next record onto the fragment and lose both. If the fragment is a complete JSON
    object only the newline is missing, so one is added; otherwise the fragment is cut off.
    """
    if not os.path.exists(path) or os.path.getsize(path) == 0:
        return
    with open(path, "rb+") as f:
        f.seek(-1, os.SEEK_END)
        if f.read(1) == b"\n":
            return
        f.seek(0)
        data = f.read()
        cut = data.rfind(b"\n") + 1  # 0 if the whole file is one partial line
        fragment = data[cut:]
        try:
            json.loads(fragment.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            f.truncate(cut)
            return
        f.seek(0, os.SEEK_END)
        f.write(b"\n")


class MetricsLogger:
    """Rank-0 logging hub: ``metrics.jsonl`` + TensorBoard + optional wandb + tqdm progress bar.

    Args:
        out_dir: directory for ``metrics.jsonl`` and ``tensorboard/``; ``None`` disables file output
            (progress bar and wandb still work).
        enabled: ``False`` on non-zero ranks: every method becomes a no-op and nothing is created.
        tensorboard: write TensorBoard scalars (needs ``out_dir`` and the ``tensorboard`` package).
        wandb_project: if set, also log to Weights & Biases; if ``wandb`` is not importable or
            ``wandb.init`` fails, a single warning is emitted and the run continues without it.
        wandb_run_name: wandb run name.
        run_config: configuration dict stored with the wandb run (and written to ``run_config.json``
            in ``out_dir`` for reference).
        total_steps: progress-bar total (``None``: open-ended bar).
        start_step: steps already done (a resumed run's checkpoint iteration); the bar starts there, and
            on TensorBoard events at steps ``> start_step`` from an earlier, crashed attempt are purged.
        desc: progress-bar description.
        progress: show a tqdm progress bar.
        supersede_after_start: when the files are opened, drop ``metrics.jsonl`` records with a step
            after ``start_step`` (trainers: the steps a killed attempt logged past its last checkpoint,
            or, for a run started afresh in the same directory, an earlier run's steps), so that the file
            holds each step once.
    """

    def __init__(
        self,
        out_dir: str | os.PathLike[str] | None,
        *,
        enabled: bool = True,
        tensorboard: bool = True,
        wandb_project: str | None = None,
        wandb_run_name: str | None = None,
        run_config: dict[str, Any] | None = None,
        total_steps: int | None = None,
        start_step: int = 0,
        desc: str = "train",
        progress: bool = True,
        supersede_after_start: bool = False,
    ) -> None:
        self.enabled = enabled
        self.out_dir = os.fspath(out_dir) if out_dir is not None else None
        self.metrics_path: str | None = None
        #: steps already done (a resumed run's checkpoint iteration); may be set until the first log()
        self.start_step = start_step
        self._jsonl = None
        self._tb = None
        self._wandb = None
        self._bar = None
        self._postfix: dict[str, str] = {}
        self._closed = False
        self._opened = False
        self._supersede = supersede_after_start
        self._tensorboard = tensorboard
        self._wandb_args = (wandb_project, wandb_run_name)
        self._run_config = run_config
        self._progress = (progress, total_steps, desc)
        if not enabled:
            return
        if progress:
            self._bar = tqdm(total=total_steps, initial=start_step, desc=desc, dynamic_ncols=True)

    def open(self) -> None:
        """Create/trim the files and start TensorBoard/wandb (done by the first :meth:`log` otherwise).

        With ``supersede_after_start``, records of ``metrics.jsonl`` with a step after :attr:`start_step`
        are dropped (rewritten atomically): a resumed run logs those steps again.
        """
        if not self.enabled or self._opened or self._closed:
            return
        self._opened = True
        if self._bar is not None and self._bar.n < self.start_step:
            self._bar.update(self.start_step - self._bar.n)
        if self.out_dir is not None:
            os.makedirs(self.out_dir, exist_ok=True)
            self.metrics_path = os.path.join(self.out_dir, METRICS_FILENAME)
            _repair_trailing_line(self.metrics_path)
            if self._supersede:
                _drop_records_after(self.metrics_path, self.start_step)
            # append mode: a resumed run continues the same file
            self._jsonl = open(self.metrics_path, "a", encoding="utf-8")
            if self._run_config is not None:
                with open(os.path.join(self.out_dir, "run_config.json"), "w", encoding="utf-8") as f:
                    json.dump(self._run_config, f, indent=2, sort_keys=True, default=str)

        if self._tensorboard and self.out_dir is not None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as exc:  # tensorboard package missing
                warnings.warn(f"TensorBoard logging disabled: {exc}", stacklevel=2)
            else:
                self._tb = SummaryWriter(
                    log_dir=os.path.join(self.out_dir, TENSORBOARD_SUBDIR),
                    # on resume, hide events that a crashed attempt wrote past the checkpoint: steps
                    # 1..start_step are done (and logged), the first one this run logs is start_step + 1
                    purge_step=self.start_step + 1 if self.start_step > 0 else None,
                )

        project, name = self._wandb_args
        if project:
            self._init_wandb(project, name, self._run_config)

    # ------------------------------------------------------------------------------------------------

    def _init_wandb(self, project: str, name: str | None, config: dict[str, Any] | None) -> None:
        try:
            import wandb  # type: ignore[import-not-found]
        except ImportError:
            warnings.warn(
                f"wandb_project={project!r} was given but the 'wandb' package is not installed "
                "(pip install wandb); continuing without wandb logging.",
                stacklevel=3,
            )
            return
        try:
            self._wandb = wandb.init(project=project, name=name, config=config, dir=self.out_dir)
        except Exception as exc:  # noqa: BLE001 - no network / not logged in must not kill training
            warnings.warn(f"wandb.init failed ({exc!r}); continuing without wandb logging.", stacklevel=3)
            self._wandb = None

    def log(self, step: int, metrics: dict[str, Any], prefix: str = "train") -> None:
        """Records one set of scalar metrics at ``step``.

        Appends ``{"step": step, "time": unix_seconds, "<prefix>/<key>": value, ...}`` to
        ``metrics.jsonl`` (flushed), writes TensorBoard scalars, calls ``wandb.log`` and advances the
        progress bar to ``step``. Values may be Python numbers or 0-dim torch/numpy scalars; values that
        are not scalar numbers are skipped. Non-finite values are written to JSONL as ``null``.

        Args:
            step: global optimiser step.
            metrics: metric name -> scalar value.
            prefix: namespace prepended as ``"<prefix>/"`` (empty string for none).
        """
        if not self.enabled or self._closed:
            return
        self.open()
        scalars: dict[str, float] = {}
        for key, value in metrics.items():
            f = _to_float(value)
            if f is not None:
                scalars[f"{prefix}/{key}" if prefix else key] = f

        if self._jsonl is not None:
            record: dict[str, Any] = {"step": int(step), "time": time.time()}
            # strict JSON has no NaN/Infinity; null keeps the file readable by any JSON tool
            record.update({k: (v if math.isfinite(v) else None) for k, v in scalars.items()})
            self._jsonl.write(json.dumps(record) + "\n")
            self._jsonl.flush()

        if self._tb is not None:
            for k, v in scalars.items():
                self._tb.add_scalar(k, v, global_step=int(step))
            self._tb.flush()

        if self._wandb is not None:
            self._wandb.log(scalars, step=int(step))

        if self._bar is not None:
            self._update_bar(int(step), metrics, prefix)

    def _update_bar(self, step: int, metrics: dict[str, Any], prefix: str) -> None:
        if step > self._bar.n:
            self._bar.update(step - self._bar.n)
        # train metrics keep short labels; other prefixes (eval, ...) are labelled so they do not
        # overwrite the training loss in the postfix
        label_prefix = "" if prefix in ("", "train") else f"{prefix}_"
        for label, keys in _POSTFIX_KEYS:
            for key in keys:
                f = _to_float(metrics.get(key))
                if f is not None:
                    self._postfix[label_prefix + label] = _fmt(f)
                    break
        if self._postfix:
            self._bar.set_postfix(self._postfix, refresh=True)

    def message(self, text: str) -> None:
        """Prints ``text`` on rank 0 without breaking the progress bar."""
        if not self.enabled:
            return
        tqdm.write(str(text))

    def close(self) -> None:
        """Flushes and closes every sink. Safe to call more than once."""
        if not self.enabled or self._closed:
            return
        self._closed = True
        if self._bar is not None:
            self._bar.close()
        if self._jsonl is not None:
            self._jsonl.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()

    def __enter__(self) -> MetricsLogger:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _drop_records_after(path: str, step: int) -> None:
    """Rewrite ``path`` without the records whose ``step`` is greater than ``step`` (atomic replace).

    A resumed run restarts at its checkpoint's iteration ``step``; records after it come from an attempt
    that was killed before saving again, and the resumed run logs those steps anew.
    """
    if not os.path.exists(path):
        return
    with open(path, encoding="utf-8", errors="replace") as f:
        lines = f.readlines()
    kept = []
    for line in lines:
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            kept.append(line)  # left for read_metrics to warn about
            continue
        if not (isinstance(rec, dict) and isinstance(rec.get("step"), int) and rec["step"] > step):
            kept.append(line)
    if len(kept) == len(lines):
        return
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.writelines(kept)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_metrics(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Reads a ``metrics.jsonl`` file (or the directory containing it).

    A truncated last line (a run killed mid-write) is ignored silently; an unparseable line in the
    middle of the file is skipped with a warning. A resumed run may have re-logged steps already
    present; records are returned in file order, so later records for the same step win if the caller
    builds a ``{step: record}`` map.

    Args:
        path: path of ``metrics.jsonl`` or of its directory.

    Returns:
        List of records (dicts with ``"step"``, ``"time"`` and ``"<prefix>/<key>"`` entries).
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        path = os.path.join(path, METRICS_FILENAME)
    with open(path, encoding="utf-8", errors="replace") as f:
        lines = f.read().split("\n")
    records: list[dict[str, Any]] = []
    last = max((i for i, line in enumerate(lines) if line.strip()), default=-1)
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            if i != last:
                warnings.warn(f"{path}:{i + 1}: skipping malformed metrics line", stacklevel=2)
            continue
        if isinstance(rec, dict):
            records.append(rec)
    return records
