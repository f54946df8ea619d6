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


def has_chat_template(directory: Optional[str]) -> bool:
    """Whether the HF tokenizer files in ``directory`` define a chat template (read from the files, without
    loading the tokenizer): chat_template.jinja / .json, or a ``chat_template`` in tokenizer_config.json."""
    names = tokenizer_files(directory)
    if "chat_template.jinja" in names or "chat_template.json" in names:
        return True
    if "tokenizer_config.json" in names:
        import json

        try:
            with open(os.path.join(directory, "tokenizer_config.json")) as f:
                return bool(json.load(f).get("chat_template"))
        except (OSError, ValueError):
            return False
    return False


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
        # mkdtemp makes the folder 0700 and safetensors writes its files 0600: give the result the
        # modes of any folder the user writes (0755 / 0644 under umask 022), so a team can read it
        normalise_permissions(tmp)
        if os.path.exists(out):
            shutil.rmtree(out)  # empty, or --overwrite (checked before anything was written)
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def current_umask() -> int:
    """The process umask (read by setting and restoring it: there is no getter)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def normalise_permissions(root: str) -> None:
    """chmod ``root`` and everything under it to 0777 (folders) / 0666 (files) less the umask."""
    mask = current_umask()
    os.chmod(root, 0o777 & ~mask)
    for folder, dirs, files in os.walk(root):
        for d in dirs:
            os.chmod(os.path.join(folder, d), 0o777 & ~mask)
        for f in files:
            path = os.path.join(folder, f)
            if not os.path.islink(path):
                os.chmod(path, 0o666 & ~mask)


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
