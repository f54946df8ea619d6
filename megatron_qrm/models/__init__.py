from megatron_qrm.models.builder import PrecisionConfig, build_model, count_parameters, layer_spec
from megatron_qrm.models.lora import LoRAConfig, apply_lora
from megatron_qrm.models.token_head import TokenHead

__all__ = ["PrecisionConfig", "build_model", "count_parameters", "layer_spec", "LoRAConfig", "apply_lora", "TokenHead"]
