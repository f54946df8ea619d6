"""Hugging Face <-> Megatron checkpoint conversion (``tools/convert_hf.py``; see docs/conversion.md).

* :func:`import_hf` / :func:`plan_import`: HF Llama / Qwen2 safetensors -> a Megatron dist checkpoint for
  any TP/PP, streamed (peak memory ~ one tensor group);
* :func:`export_hf` / :func:`plan_export`: a policy -> ``*ForCausalLM``, a reward model / critic ->
  ``*ForTokenClassification`` (``num_labels=1``), LoRA merged, vocabulary un-padded;
* :func:`megatron_qrm.conversion.verify.verify`: both models on the same tokens, max/mean abs difference.

The per-architecture mapping tables are data, in :mod:`megatron_qrm.conversion.families`.
Import and export need only torch (no megatron-core, no torch.distributed); verify builds the model.
"""

from megatron_qrm.conversion.errors import ConversionError
from megatron_qrm.conversion.exporter import export_hf, plan_export
from megatron_qrm.conversion.importer import import_hf, plan_import

__all__ = ["ConversionError", "export_hf", "import_hf", "plan_export", "plan_import"]
