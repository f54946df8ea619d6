"""Whether a built model can run packed sequences, and shared-prompt (prefix-tree) packing: model capabilities,
asked by the trainers and evaluators before they pack (``data/packing.py`` builds the packed batches and
knows nothing about models)."""

from __future__ import annotations

from megatron_qrm.errors import UserError


def resolve_shared_prompts(requested: bool | None, packing: bool, models=()) -> tuple[bool, str | None]:
    """Whether pairs are packed with their prompt once: ``(on, why it is off)``.

    ``requested``: ``--pack-shared-prompts`` (True), ``--no-pack-shared-prompts`` (False) or neither (None: on
    wherever ``models`` can run it). Raises ValueError when the flag demands it and packing is off or one of
    ``models`` cannot run a prefix tree (:func:`unsupported_reason`)."""
    why = next((r for r in (unsupported_reason(m, shared_prompts=True) for m in models) if r), None)
    if requested and why:
        raise UserError(f"--pack-shared-prompts: {why}")
    if requested and not packing:
        raise UserError("--pack-shared-prompts packs pairs; it cannot be combined with --no-pack-sequences")
    if not packing or requested is False:
        return False, None
    return why is None, why


def unsupported_reason(model, shared_prompts: bool = False) -> str | None:
    """Why ``model`` cannot run packed sequences (None when it can): megatron-core's unfused
    ``DotProductAttention`` (local spec, ``--local-attention unfused``) refuses ``PackedSeqParams``;
    :class:`~megatron_qrm.models.attention.SDPAttention` and Transformer Engine's attention accept them.
    ``shared_prompts`` (:func:`pack_pairs_shared_prompt`): a prefix-tree mask, which only the local spec's
    SDPA attention with megatron_qrm's RoPE (:class:`~megatron_qrm.models.attention.RopeSelfAttention`) runs."""
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    if any(isinstance(m, DotProductAttention) for m in model.modules()):
        return "megatron-core's unfused DotProductAttention (local spec) has no packed-sequence support"
    if shared_prompts:
        from megatron.core.transformer.attention import SelfAttention

        from megatron_qrm.models import rope
        from megatron_qrm.models.attention import RopeSelfAttention, SDPAttention

        layers = [m for m in model.modules() if isinstance(m, SelfAttention)]
        if any(not isinstance(m, RopeSelfAttention) or not isinstance(m.core_attention, SDPAttention) for m in layers):
            return ("shared-prompt packing needs the local spec's SDPA attention (Transformer Engine's fused "
                    "varlen attention cannot mask a prefix tree); use --transformer-impl local")
        why = rope.supported(layers[0].config) if layers else None
        if why is not None:
            return f"shared-prompt packing does not support {why}"
    return None
