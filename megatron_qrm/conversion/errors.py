"""The one exception type of the converter: a user error found before anything is written."""

from __future__ import annotations

from megatron_qrm.errors import UserError


class ConversionError(UserError):
    """Bad input to ``tools/convert_hf.py`` (unknown architecture, layout that cannot shard the model,
    missing shard file, unsupported dtype, non-empty output directory, ...). Raised before any output
    is written; the CLI prints it as one line and exits with status 2."""
