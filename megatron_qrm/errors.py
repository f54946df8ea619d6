"""The project's exceptions and how they reach the terminal (docs/reliability.md "Exit status and error lines").

:class:`UserError` (a bad flag, file, data line, checkpoint choice: exit 2) and :class:`RunAborted` (a run
stopped on purpose: exit 3) are printed by ``qrm`` as one line ``qrm COMMAND: error: ...``; every other
exception is a bug and keeps its traceback.

A user error reaches the terminal as one line on stderr, written in one piece.

Under torchrun every rank reports the same error. ``print(msg, file=sys.stderr)`` writes the text and
the newline separately, so two ranks sharing a pipe can interleave into ``msg msg\\n\\n``. A single
``os.write`` of fewer than PIPE_BUF (4096) bytes to a pipe is atomic, so each rank's line stays whole.
"""

from __future__ import annotations

import os
import sys


def print_error_line(message: str) -> None:
    """Write ``message`` plus a newline to stderr as one write (flushing anything buffered first)."""
    line = (message + "\n").encode("utf-8", errors="replace")
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        fd = sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):  # stderr replaced (pytest capture, notebooks)
        sys.stderr.write(line.decode("utf-8"))
        sys.stderr.flush()
        return
    while line:
        line = line[os.write(fd, line):]


class UserError(ValueError):
    """A user's mistake (a bad flag, file, data line or checkpoint choice): ``qrm`` prints
    ``qrm COMMAND: error: <message>`` (one line, no traceback) and exits with :data:`EXIT_USER_ERROR`.

    Every other exception is a bug and keeps its traceback. A ``ValueError`` so that callers catching
    ``ValueError`` (and tests using ``pytest.raises(ValueError)``) keep working.
    ``rank0_only``: every rank raises the same error at the same point (e.g. a layout the world size
    cannot take); only global rank 0 prints it, the other ranks exit with the same status silently.
    """

    rank0_only = False


class UserFileNotFoundError(UserError, FileNotFoundError):
    """A file or checkpoint named by a flag does not exist (a :class:`UserError` and a ``FileNotFoundError``)."""


class LayoutError(UserError):
    """The parallel layout (``-tp`` / ``-pp``) cannot be used with this world size or model; raised alike
    on every rank, printed by rank 0 only."""

    rank0_only = True


class RunAborted(RuntimeError):
    """A run stopped on purpose because continuing would waste work or lose state (not a user error and
    not a bug): ``qrm`` prints ``qrm COMMAND: error: <message>`` and exits with :data:`EXIT_ABORTED`."""


class NonFiniteError(RunAborted):
    """Loss, gradients, weights, log-probs, rewards or advantages stopped being finite numbers."""


class CheckpointWriteError(RunAborted):
    """A checkpoint could not be written (no space, permissions); ``latest`` still names the previous one."""


class OutputWriteError(RunAborted):
    """A result file (``eval-rm --output``, a token dump) could not be written; no partial file is left."""


def is_user_error(exc: BaseException) -> bool:
    """Whether ``qrm`` reports ``exc`` as one line: a :class:`UserError` or a :class:`RunAborted`."""
    return isinstance(exc, (UserError, RunAborted))


#: exit status of a user error (a bad flag, file or data line): argparse uses 2 for its own errors too
EXIT_USER_ERROR = 2
#: exit status of a run stopped by :class:`RunAborted` (non-finite training, a failed checkpoint write)
EXIT_ABORTED = 3
