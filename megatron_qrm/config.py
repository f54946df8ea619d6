"""Typed configuration: model architecture (with per-family presets) and parallel layout.

A :class:`ModelConfig` is everything needed to rebuild a model's weights layout; it is written into
every checkpoint (``qrm_config.json``) so that evaluation and resume need no size flags.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any, Optional

from megatron_qrm.errors import LayoutError, UserError

ROLES = ("policy", "reward", "critic")


@dataclass
class ModelConfig:
    """Architecture of a Llama/Qwen-style decoder (RMSNorm, SwiGLU, GQA, RoPE).

    ``vocab_size`` is the tokenizer's size; the embedding is padded to a multiple of
    ``make_vocab_size_divisible_by * TP`` the Megatron way (see :func:`padded_vocab_size`).
    """

    num_layers: int
    hidden_size: int
    num_attention_heads: int
    ffn_hidden_size: int
    num_query_groups: Optional[int] = None  # None = multi-head attention (no GQA)
    vocab_size: int = 0  # 0 -> the tokenizer's size (filled in by the trainer)
    max_position_embeddings: int = 4096
    rotary_base: float = 10000.0
    # Llama-3.1/3.2 RoPE frequency scaling factor (low/high frequency factors 1 and 4, original
    # context 8192: the values every Llama-3.x release uses and megatron-core implements).
    rope_scaling_factor: Optional[float] = None
    norm_epsilon: float = 1e-5
    qkv_bias: bool = False  # Qwen2 family
    tie_word_embeddings: bool = False  # small Qwen2.5 / Llama-3.2 models
    make_vocab_size_divisible_by: int = 128
    family: str = "custom"

    def __post_init__(self) -> None:
        if self.num_query_groups is None:
            self.num_query_groups = self.num_attention_heads
        if self.hidden_size % self.num_attention_heads:
            raise UserError(
                f"--hidden-size {self.hidden_size} is not divisible by --num-attention-heads "
                f"{self.num_attention_heads}"
            )
        if self.num_attention_heads % self.num_query_groups:
            raise UserError(
                f"--num-attention-heads {self.num_attention_heads} is not divisible by "
                f"--num-query-groups {self.num_query_groups}"
            )

    @property
    def kv_channels(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


def padded_vocab_size(vocab_size: int, divisible_by: int, tensor_parallel_size: int) -> int:
    """Megatron's vocabulary padding: round up to a multiple of ``divisible_by * TP``."""
    multiple = divisible_by * tensor_parallel_size
    return ((vocab_size + multiple - 1) // multiple) * multiple


def _llama(layers, hidden, heads, groups, ffn, vocab, theta, ctx, scaling=None, tied=False, fam="llama"):
    return dict(num_layers=layers, hidden_size=hidden, num_attention_heads=heads, num_query_groups=groups,
                ffn_hidden_size=ffn, vocab_size=vocab, rotary_base=theta, max_position_embeddings=ctx,
                rope_scaling_factor=scaling, tie_word_embeddings=tied, norm_epsilon=1e-5, family=fam)


def _qwen(layers, hidden, heads, groups, ffn, vocab, tied, ctx=32768):
    return dict(num_layers=layers, hidden_size=hidden, num_attention_heads=heads, num_query_groups=groups,
                ffn_hidden_size=ffn, vocab_size=vocab, rotary_base=1e6, max_position_embeddings=ctx,
                tie_word_embeddings=tied, norm_epsilon=1e-6, qkv_bias=True, family="qwen2")


# Published architectures (from each release's config.json). Names are what `--model` accepts.
MODEL_PRESETS: dict[str, dict[str, Any]] = {
    "llama2-7b": _llama(32, 4096, 32, 32, 11008, 32000, 1e4, 4096, fam="llama2"),
    "llama2-13b": _llama(40, 5120, 40, 40, 13824, 32000, 1e4, 4096, fam="llama2"),
    "llama2-70b": _llama(80, 8192, 64, 8, 28672, 32000, 1e4, 4096, fam="llama2"),
    "llama3-8b": _llama(32, 4096, 32, 8, 14336, 128256, 5e5, 8192, fam="llama3"),
    "llama3-70b": _llama(80, 8192, 64, 8, 28672, 128256, 5e5, 8192, fam="llama3"),
    "llama3.1-8b": _llama(32, 4096, 32, 8, 14336, 128256, 5e5, 131072, scaling=8.0, fam="llama3.1"),
    "llama3.1-70b": _llama(80, 8192, 64, 8, 28672, 128256, 5e5, 131072, scaling=8.0, fam="llama3.1"),
    "llama3.1-405b": _llama(126, 16384, 128, 8, 53248, 128256, 5e5, 131072, scaling=8.0, fam="llama3.1"),
    "llama3.2-1b": _llama(16, 2048, 32, 8, 8192, 128256, 5e5, 131072, scaling=32.0, tied=True, fam="llama3.2"),
    "llama3.2-3b": _llama(28, 3072, 24, 8, 8192, 128256, 5e5, 131072, scaling=32.0, tied=True, fam="llama3.2"),
    "qwen2-0.5b": _qwen(24, 896, 14, 2, 4864, 151936, True),
    "qwen2-1.5b": _qwen(28, 1536, 12, 2, 8960, 151936, True),
    "qwen2-7b": _qwen(28, 3584, 28, 4, 18944, 152064, False),
    "qwen2-72b": _qwen(80, 8192, 64, 8, 29568, 152064, False),
    "qwen2.5-0.5b": _qwen(24, 896, 14, 2, 4864, 151936, True),
    "qwen2.5-1.5b": _qwen(28, 1536, 12, 2, 8960, 151936, True),
    "qwen2.5-3b": _qwen(36, 2048, 16, 2, 11008, 151936, True),
    "qwen2.5-7b": _qwen(28, 3584, 28, 4, 18944, 152064, False),
    "qwen2.5-14b": _qwen(48, 5120, 40, 8, 13824, 152064, False),
    "qwen2.5-32b": _qwen(64, 5120, 40, 8, 27648, 152064, False),
    "qwen2.5-72b": _qwen(80, 8192, 64, 8, 29568, 152064, False),
}


def preset(name: str, **overrides: Any) -> ModelConfig:
    """The :class:`ModelConfig` of a named preset, with explicit overrides (``None`` ignored)."""
    if name not in MODEL_PRESETS:
        raise UserError(f"--model {name!r} is not a known preset; choose from {', '.join(MODEL_PRESETS)}")
    values = dict(MODEL_PRESETS[name])
    values.update({k: v for k, v in overrides.items() if v is not None})
    return ModelConfig(**values)


@dataclass
class ParallelConfig:
    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    sequence_parallel: bool = False
    seed: int = 1234


def check_parallel_layout(model: ModelConfig, par: ParallelConfig, world_size: int) -> None:
    """Fail early, naming the flag, when the layout cannot shard this model."""
    tp, pp = par.tensor_model_parallel_size, par.pipeline_model_parallel_size
    if tp < 1 or pp < 1:
        raise LayoutError("--tensor-model-parallel-size and --pipeline-model-parallel-size must be >= 1")
    if world_size % (tp * pp):
        raise LayoutError(
            f"world size {world_size} is not divisible by --tensor-model-parallel-size {tp} x "
            f"--pipeline-model-parallel-size {pp}"
        )
    if model.num_attention_heads % tp:
        raise LayoutError(
            f"--tensor-model-parallel-size {tp} does not divide the number of attention heads "
            f"({model.num_attention_heads})"
        )
    if model.num_query_groups % tp:
        raise LayoutError(
            f"--tensor-model-parallel-size {tp} does not divide the number of query groups "
            f"({model.num_query_groups}, --num-query-groups)"
        )
    if model.ffn_hidden_size % tp:
        raise LayoutError(f"--tensor-model-parallel-size {tp} does not divide --ffn-hidden-size {model.ffn_hidden_size}")
    if model.num_layers % pp:
        raise LayoutError(
            f"--pipeline-model-parallel-size {pp} does not divide --num-layers {model.num_layers}"
        )


def save_json(path: str, obj: Any) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
