"""Run ``qrm`` command lines one after another in ONE process, through ``megatron_qrm.cli.main``, for the
failure-handling tests (``tests/test_reliability*.py``; started by ``launch.run_cli_driver``).

``python cli_driver.py RUNS RESULTS``: RUNS is a JSON list of ``{"argv", "env"?, "patch"?, "hash"?}``; RESULTS
gets ``[{"rc", "stdout", "stderr", "hashes"}]`` after every command (``rc`` "exception" when an exception
escaped ``main()``: its traceback is then in ``stderr``; ``hashes``: sha256 of each ``hash`` path afterwards).
A patch injects a fault for the duration of one command:

    enospc_at_save=N        the N-th checkpoint write fails inside torch's file writer with ENOSPC
    latest_moves=NAME       after the command read the checkpoint config, `latest` is rewritten to NAME
    prune_after_read        after the command read the checkpoint config, that checkpoint directory is removed
    scale_weights_at_save=F every save multiplies the model's weights by F first (finite, huge weights whose
                            outputs are not finite)
    scale_weights_at_save_unchecked=F  the same, with checkpointing's weight-scale check off (an older version)
    internal_bug            the trainer raises a plain ValueError (a bug, not a user error)
    enospc_under=DIR        opening a file under DIR for writing succeeds but every write fails with ENOSPC
"""

import builtins
import contextlib
import errno
import hashlib
import io
import json
import os
import shutil
import sys

from megatron_qrm import checkpointing
from megatron_qrm.cli import main


def apply_patch(patch):
    """Install ``patch``; returns the functions that undo it."""
    undo = []
    if not patch:
        return undo
    kind, _, arg = patch.partition("=")
    if kind == "enospc_at_save":
        import torch.distributed.checkpoint.filesystem as fs

        count = {"n": 0}
        real_write, real_item = checkpointing._write_checkpoint, fs._write_item

        def counting_write(*a, **k):
            count["n"] += 1
            return real_write(*a, **k)

        def failing_item(*a, **k):
            if count["n"] == int(arg):
                raise OSError(errno.ENOSPC, "No space left on device")
            return real_item(*a, **k)

        checkpointing._write_checkpoint, fs._write_item = counting_write, failing_item
        undo.append(lambda: (setattr(checkpointing, "_write_checkpoint", real_write),
                             setattr(fs, "_write_item", real_item)))
    elif kind in ("latest_moves", "prune_after_read"):
        real = checkpointing.read_config

        def read_then_interfere(path):
            out = real(path)
            resolved = checkpointing.resolve_checkpoint(path)
            save_dir = os.path.dirname(resolved)
            if kind == "latest_moves":  # a trainer commits another checkpoint meanwhile
                with open(os.path.join(save_dir, "latest"), "w") as f:
                    f.write(arg)
            else:  # a trainer's --keep-last prunes it meanwhile
                shutil.rmtree(resolved)
            return out

        checkpointing.read_config = read_then_interfere
        undo.append(lambda: setattr(checkpointing, "read_config", real))
    elif kind in ("scale_weights_at_save", "scale_weights_at_save_unchecked"):
        import torch

        real = checkpointing.save_checkpoint
        if kind.endswith("_unchecked"):  # as an older version, without the weight-scale check
            real_limit = checkpointing.weight_overflow_limit
            checkpointing.weight_overflow_limit = lambda hidden: float("inf")
            undo.append(lambda: setattr(checkpointing, "weight_overflow_limit", real_limit))

        def scaled(save_dir, iteration, model, *a, **k):
            with torch.no_grad():
                for p in model.parameters():
                    p.mul_(float(arg))
            return real(save_dir, iteration, model, *a, **k)

        checkpointing.save_checkpoint = scaled
        undo.append(lambda: setattr(checkpointing, "save_checkpoint", real))
    elif kind == "internal_bug":
        from megatron_qrm.training import reward_trainer

        real = reward_trainer.train_reward_model

        def bug(cfg):
            raise ValueError("an internal invariant broke")

        reward_trainer.train_reward_model = bug
        undo.append(lambda: setattr(reward_trainer, "train_reward_model", real))
    elif kind == "enospc_under":
        real_open, real_fdopen = builtins.open, os.fdopen

        class Full(io.RawIOBase):
            def writable(self):
                return True

            def write(self, b):
                raise OSError(errno.ENOSPC, "No space left on device")

        def wrap(f, name, mode):
            if any(c in str(mode) for c in "wax+") and os.path.abspath(str(name)).startswith(arg):
                f.write = Full().write
            return f

        def fake_open(file, mode="r", *a, **k):
            return wrap(real_open(file, mode, *a, **k), file, mode)

        def fake_fdopen(fd, mode="r", *a, **k):
            f = real_fdopen(fd, mode, *a, **k)
            return wrap(f, os.readlink(f"/proc/self/fd/{fd}"), mode)

        builtins.open, os.fdopen = fake_open, fake_fdopen
        undo.append(lambda: (setattr(builtins, "open", real_open), setattr(os, "fdopen", real_fdopen)))
    else:
        raise ValueError(f"unknown patch {patch!r}")
    return undo


def digest(path):
    if not os.path.exists(path):
        return None
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def run(runs_path, results_path):
    results = []
    for i, cmd in enumerate(json.load(open(runs_path))):
        saved_env = dict(os.environ)
        os.environ.update(cmd.get("env") or {})
        undo = apply_patch(cmd.get("patch"))
        err_path = f"{results_path}.{i}.stderr"
        sys.stderr.flush()
        saved_fd = os.dup(2)
        with open(err_path, "w") as err:
            os.dup2(err.fileno(), 2)
        out = io.StringIO()
        try:
            with contextlib.redirect_stdout(out):
                rc = main(cmd["argv"])
        except SystemExit as e:
            rc = e.code if isinstance(e.code, int) else 1
        except BaseException:  # a raw exception escaped main(): a failure of what is tested, reported as such
            import traceback

            traceback.print_exc()
            rc = "exception"
        finally:
            sys.stderr.flush()
            os.dup2(saved_fd, 2)
            os.close(saved_fd)
            for u in undo:
                u()
            os.environ.clear()
            os.environ.update(saved_env)
        results.append({"rc": rc, "stdout": out.getvalue(), "stderr": open(err_path).read(),
                        "hashes": {p: digest(p) for p in cmd.get("hash", [])}})
        json.dump(results, open(results_path, "w"))


if __name__ == "__main__":
    run(sys.argv[1], sys.argv[2])
