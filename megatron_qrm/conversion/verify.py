"""`convert_hf.py verify`: run the HF model and the Megatron model on the same tokens and report the max
and mean absolute difference of their logits (policy) or per-token scores (reward / critic).

Runs at any TP/PP (``torchrun --nproc_per_node TP*PP tools/convert_hf.py verify ... -tp N -pp M``), in
fp32 on CPU (gloo) or GPU. The Megatron side is the trainers' own path: ``build_model`` +
``checkpointing.load_checkpoint`` + megatron-core's forward schedule; TP-split logits are gathered.
The HF side runs on the rank that holds the output (last pipeline stage, TP rank 0), which prints
the result as JSON.

What is compared:

* policy: ``*ForCausalLM`` logits vs Megatron logits over the real vocabulary (padded columns are
  reported separately);
* reward / critic: ``*ForTokenClassification`` ``logits[..., 0]`` (or ``score(h)`` of a
  ``*ForSequenceClassification`` at every position) vs Megatron's token scores; for an HF LM (the
  Megatron head was initialised fresh on import) the Megatron head is applied to the HF model's final
  hidden states.
"""

from __future__ import annotations

import json
import os
from typing import Any, Optional

import torch

from megatron_qrm.conversion.errors import ConversionError
from megatron_qrm.conversion.families import LM, SEQUENCE, TOKEN
from megatron_qrm.conversion.hf_config import architecture, read_hf_config


def _megatron_output(model, tokens: torch.Tensor, policy: bool) -> Optional[torch.Tensor]:
    """Full output on the last pipeline stage ([b, s, V_padded] logits or [b, s] scores), else None."""
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel.mappings import gather_from_tensor_model_parallel_region

    from megatron_qrm.training.engine import run_global_batch, to_device

    b, s = tokens.shape
    batch = {"tokens": tokens, "position_ids": torch.arange(s).expand(b, s).contiguous()}

    def forward_step(data_iterator, m):
        mb = to_device(next(data_iterator))
        out = m(mb["tokens"], mb["position_ids"], attention_mask=None)

        def loss_func(output):
            full = gather_from_tensor_model_parallel_region(output) if policy else output.squeeze(-1)
            return output.sum() * 0, torch.ones((), dtype=torch.int, device=output.device), {"out": full.detach()}

        return out, loss_func

    with torch.no_grad():
        outs = run_global_batch(model, forward_step, [batch], forward_only=True)
    if not ps.is_pipeline_last_stage():
        return None
    return outs[0]["out"].float().cpu()


def _hf_output(hf_path: str, kind: str, policy: bool, tokens: torch.Tensor, head: Optional[torch.Tensor],
               device: torch.device) -> tuple[torch.Tensor, str]:
    import transformers

    # transformers 5 takes `dtype`, 4.x `torch_dtype`
    dtype_kw = "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"
    cls = (transformers.AutoModelForCausalLM if policy else transformers.AutoModelForTokenClassification
           if kind == TOKEN else transformers.AutoModelForSequenceClassification if kind == SEQUENCE
           else transformers.AutoModel)
    model = cls.from_pretrained(hf_path, attn_implementation="eager", **{dtype_kw: torch.float32})
    return _run_hf(model, kind, policy, tokens, head, device)


def _run_hf(model, kind, policy, tokens, head, device) -> tuple[torch.Tensor, str]:
    model.to(device).eval()
    name = type(model).__name__
    with torch.no_grad():
        ids = tokens.to(device)
        if policy:
            return model(input_ids=ids).logits.float().cpu(), name
        if kind == TOKEN:
            return model(input_ids=ids).logits[..., 0].float().cpu(), name
        if kind == SEQUENCE:  # the same linear at every position
            hidden = getattr(model, model.base_model_prefix)(input_ids=ids).last_hidden_state
            return model.score(hidden)[..., 0].float().cpu(), name + " (score at every position)"
        hidden = model(input_ids=ids).last_hidden_state.float()
        return (hidden @ head.to(device).float().T)[..., 0].cpu(), name + " + Megatron token head"


def verify(hf_path: str, megatron_path: str, *, tp: int = 1, pp: int = 1, batch_size: int = 2,
           seq_length: int = 32, seed: int = 0, tolerance: Optional[float] = None,
           output: Optional[str] = None, quiet: bool = False,
           tokens: Optional[torch.Tensor] = None, local_attention: str = "auto") -> Optional[dict[str, Any]]:
    """Collective under torchrun. Returns the result dict on the rank that computed it, else None.

    ``tokens`` ([b, s] int64, the same on every rank): compare on these (e.g. chat-templated prompts,
    right-padded) instead of ``batch_size`` x ``seq_length`` random ids drawn with ``seed``.
    ``local_attention``: the core attention of the Megatron side (as the trainers' ``--local-attention``)."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from megatron_qrm import checkpointing, parallel
    from megatron_qrm.config import ModelConfig, ParallelConfig, check_parallel_layout
    from megatron_qrm.conversion.dcp_io import DistCheckpointReader
    from megatron_qrm.models import LoRAConfig, PrecisionConfig, build_model

    hf_cfg = read_hf_config(hf_path)
    _, kind, arch = architecture(hf_cfg, f"{hf_path}/config.json")
    ckpt = checkpointing.resolve_checkpoint(megatron_path)
    if ckpt is None:
        raise ConversionError(f"--megatron-path {megatron_path}: no complete checkpoint")
    saved = checkpointing.read_config(ckpt)
    model_cfg = ModelConfig.from_dict(saved["model"])
    role = saved.get("role") or "policy"
    policy = role == "policy"
    if policy and kind != LM:
        raise ConversionError(f"{megatron_path} is a policy but {hf_path} is a {arch}")
    if not policy and kind == LM and not quiet:
        print(f"note: {hf_path} is an LM; comparing the Megatron head applied to its hidden states")

    world = dist.get_world_size() if dist.is_initialized() else int(os.environ.get("WORLD_SIZE", "1"))
    try:
        check_parallel_layout(model_cfg, ParallelConfig(tp, pp), world)
    except ValueError as e:
        raise ConversionError(f"{e} (run verify under `torchrun --nproc_per_node {tp * pp}`)") from None
    parallel.initialize(ParallelConfig(tp, pp))
    lora = LoRAConfig(**{k: (tuple(v) if k == "targets" else v) for k, v in (saved.get("lora") or {}).items()})
    model = build_model(model_cfg, role, precision=PrecisionConfig(bf16=False), lora=lora,
                        local_attention=local_attention)
    checkpointing.load_checkpoint(ckpt, model, load_rng=False)
    model.eval()
    vocab = model_cfg.vocab_size
    if tokens is None:
        gen = torch.Generator().manual_seed(seed)
        tokens = torch.randint(0, vocab, (batch_size, seq_length), generator=gen)
    meg = _megatron_output(model, tokens, policy)

    writer = (ps.is_pipeline_last_stage() and ps.get_tensor_model_parallel_rank() == 0
              and ps.get_data_parallel_rank() == 0)
    result = None
    if writer:
        head = None
        if not policy and kind == LM:
            head = DistCheckpointReader(ckpt).read("token_head.weight")
        device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
        ref, hf_name = _hf_output(hf_path, kind, policy, tokens, head, device)
        got = meg[..., :vocab] if policy else meg
        if got.shape != ref.shape:
            raise RuntimeError(f"output shapes differ: Megatron {tuple(got.shape)} vs HF {tuple(ref.shape)}")
        diff = (got - ref).abs()
        result = {
            "compared": "logits" if policy else "token_scores",
            "max_abs_diff": float(diff.max()),
            "mean_abs_diff": float(diff.mean()),
            "max_abs_reference": float(ref.abs().max()),
            "shape": list(ref.shape),
            "hf_class": hf_name,
            "role": role,
            "tensor_model_parallel_size": tp,
            "pipeline_model_parallel_size": pp,
            "dtype": "float32",
            "local_attention": local_attention,
            "device": device.type,
            "hf_path": hf_path,
            "megatron_path": ckpt,
        }
        if policy and meg.shape[-1] > vocab:
            result["padded_logits_max_abs"] = float(meg[..., vocab:].abs().max())
        if tolerance is not None:
            result["tolerance"] = tolerance
            result["ok"] = result["max_abs_diff"] <= tolerance
        text = json.dumps(result, indent=2)
        if not quiet:
            print(text, flush=True)
        if output:
            os.makedirs(os.path.dirname(os.path.abspath(output)) or ".", exist_ok=True)
            with open(output, "w") as f:
                f.write(text)
    dist.barrier()
    return result
