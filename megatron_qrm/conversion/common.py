"""Small pieces shared by import and export: output-directory safety, tokenizer files, progress."""

from __future__ import annotations

import logging
import os
import shutil
import sys
import tempfile
from contextlib import contextmanager
from typing import Iterator, Optional

from megatron_qrm.conversion.errors import ConversionError

log = logging.getLogger("megatron_qrm.conversion")

# The checkpoint layout of megatron_qrm.checkpointing (kept here so conversion does not import
# megatron-core; tests/test_convert.py checks they agree).
CONFIG_FILE = "qrm_config.json"
LATEST_FILE = "latest"
TOKENIZER_DIR = "tokenizer"
HF_CONFIG_DIR = "hf_config"

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
                   "added_tokens.json", "vocab.json", "vocab.txt", "merges.txt", "chat_template.jinja",
                   "chat_template.json", "spiece.model")
HF_SIDE_FILES = ("config.json", "generation_config.json")


def tokenizer_files(directory: Optional[str]) -> list[str]:
    if not directory or not os.path.isdir(directory):
        return []
    return sorted(fn for fn in os.listdir(directory)
                  if fn in TOKENIZER_FILES or fn.endswith(".tiktoken"))


def copy_files(src: str, names: list[str], dst: str) -> None:
    os.makedirs(dst, exist_ok=True)
    for fn in names:
        shutil.copy2(os.path.join(src, fn), os.path.join(dst, fn))


def check_output_dir(out: str, overwrite: bool, flag: str = "--out") -> None:
    """Refuse a non-empty output directory unless ``overwrite``; its parent must be writable."""
    if os.path.exists(out):
        if not os.path.isdir(out):
            raise ConversionError(f"{flag} {out} exists and is not a directory")
        if os.listdir(out) and not overwrite:
            raise ConversionError(f"{flag} {out} is not empty; pass --overwrite to replace it")
    parent = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(parent):
        raise ConversionError(f"{flag} {out}: parent directory {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise ConversionError(f"{flag} {out}: parent directory {parent} is not writable")


@contextmanager
def staged_output(out: str) -> Iterator[str]:
    """Write into a hidden sibling directory; move it to ``out`` only when the body succeeded, so a
    failure (or Ctrl-C) never leaves a partial ``out``."""
    out = os.path.abspath(out)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.partial-", dir=os.path.dirname(out))
    try:
        yield tmp
        if os.path.exists(out):
            shutil.rmtree(out)  # empty, or --overwrite (checked before anything was written)
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def progress(total: int, desc: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024, disable=not enabled,
                file=sys.stderr, leave=True, dynamic_ncols=True)


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n} B"
