"""DeepSeek-VL2 for current transformers and torch.

Importing the package registers the model with transformers' Auto classes, so
``AutoConfig``/``AutoModelForCausalLM.from_pretrained`` load the official checkpoints, whose
config.json names ``model_type: deepseek_vl_v2`` and no architectures.
"""

from transformers import AutoConfig, AutoModelForCausalLM

from .models import DeepseekVLV2Config, DeepseekVLV2ForCausalLM, DeepseekVLV2Processor

AutoConfig.register(DeepseekVLV2Config.model_type, DeepseekVLV2Config, exist_ok=True)
AutoModelForCausalLM.register(DeepseekVLV2Config, DeepseekVLV2ForCausalLM, exist_ok=True)

__all__ = ["DeepseekVLV2Config", "DeepseekVLV2ForCausalLM", "DeepseekVLV2Processor"]
__version__ = "0.1.0"
